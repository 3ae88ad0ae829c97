"""kzprobe.probes."""
