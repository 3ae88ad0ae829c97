"""kzprobe.replay: classify censorship from packet captures (pcap / pcapng, plain or gzip).

- :mod:`kzprobe.replay.pcapio` -- streaming raw reader and header decoder (``iter_packets``,
  the typed :class:`~kzprobe.replay.pcapio.Packet`).
- :mod:`kzprobe.replay.engine` -- the pass over a capture, or over a run rotated across files
  (``Replayer``, ``replay``, ``group_rotated``); per-file state in :mod:`.state`.
- :mod:`kzprobe.replay.flows` (TCP, ICMP), :mod:`.dns`, :mod:`.trigger` (outcome, injection),
  :mod:`.naming` (targets, follow-ups), :mod:`.helperflows` + :mod:`.control` (control from the
  probe's exchanges with its helper), :mod:`.parsers` (bounded TLS/HTTP/DNS parsers).
- :mod:`kzprobe.replay.cli` -- ``kzprobe replay FILE... [--format table|json] [--store --db PATH]``.

Nothing heavy is imported here, so that ``kzprobe --help`` stays fast.
"""
