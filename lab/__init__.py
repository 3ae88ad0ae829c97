"""kzprobe.lab."""
