"""kzprobe.replay."""
