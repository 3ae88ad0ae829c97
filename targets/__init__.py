"""kzprobe.targets."""
