"""kzprobe.replay: classify censorship from packet captures (pcap / pcapng, plain or gzip).

- :mod:`kzprobe.replay.pcapio` -- streaming raw reader and header decoder (``iter_packets``).
- :mod:`kzprobe.replay.engine` -- flow / DNS / TLS / HTTP reconstruction, injection detection,
  observations in the one model (``Replayer``, ``replay``).
- :mod:`kzprobe.replay.cli` -- ``kzprobe replay FILE... [--format table|json] [--store --db PATH]``.

Nothing heavy is imported here, so that ``kzprobe --help`` stays fast.
"""
