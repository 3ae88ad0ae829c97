"""kzprobe.helper."""
