"""The classifier's version, stored with each verdict.

Derived from the rule table and the fingerprints rather than kept by hand: a verdict computed
by a changed rule set then carries a different version even when nobody remembered to bump
one, and two collectors running the same release agree on it.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

from kzprobe import __version__


@functools.cache
def classifier_version() -> str:
    """``<release>+<first 10 hex of sha256 over analysis/*.py and *.csv>``."""
    folder = Path(__file__).resolve().parent.parent / "analysis"
    digest = hashlib.sha256()
    for path in sorted(folder.glob("*.py")) + sorted(folder.glob("*.csv")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return f"{__version__}+{digest.hexdigest()[:10]}"
