"""kzprobe.storage."""
