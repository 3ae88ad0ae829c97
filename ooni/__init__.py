"""kzprobe.ooni."""
