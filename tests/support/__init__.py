"""Shared test machinery (importable as kzprobe.tests.support.*)."""
