"""kzprobe.analysis."""
