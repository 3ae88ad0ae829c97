"""kzprobe.trace."""
