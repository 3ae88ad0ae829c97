"""Alembic migrations of the kzprobe schema (run by ``kzprobe db upgrade``; see storage/upgrade.py)."""
