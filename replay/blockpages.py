"""Blockpage matching for replay, pluggable.

Replay asks one question of a response: "is this a known blockpage, and which?".  The answer
comes from the project's fingerprint file (:mod:`kzprobe.analysis.fingerprints`) when it is
importable, else from a small built-in list, so replay keeps working if analysis changes.
Anything with a ``match(body, headers) -> str | None`` method can be passed instead.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Protocol


class BlockpageMatcher(Protocol):
    def match(self, body: str, headers: Mapping[str, str]) -> str | None: ...


#: (name, substring) pairs used when the fingerprint file is unavailable.
BUILTIN: tuple[tuple[str, str], ...] = (
    ("kz_blockpage_zablokirovana", "Страница заблокирована"),
    ("kz_blockpage_ogranichen", "Доступ к ресурсу ограничен"),
    ("pk_surf_safely", "Surf Safely!"),
    ("pk_surf_safely_title", "<title>Surf Safely</title>"),
)


class BuiltinMatcher:
    def __init__(self, patterns: Iterable[tuple[str, str]] = BUILTIN) -> None:
        self.patterns = list(patterns)

    def match(self, body: str, headers: Mapping[str, str]) -> str | None:
        for name, pattern in self.patterns:
            if pattern in body:
                return name
        return None


class FingerprintMatcher:
    """Adapter over :class:`kzprobe.analysis.fingerprints.Fingerprints`."""

    def __init__(self, extra: Iterable[str | Path] = ()) -> None:
        from kzprobe.analysis.fingerprints import Fingerprints

        self.fp = Fingerprints.default(extra=list(extra))

    def match(self, body: str, headers: Mapping[str, str]) -> str | None:
        m = self.fp.blockpage(body, dict(headers))
        return m.name if m else None


def default_matcher(extra: Iterable[str | Path] = ()) -> BlockpageMatcher:
    """The fingerprint file (plus ``extra`` CSV files), or the built-in list if analysis is absent."""
    extra = list(extra)
    try:
        return FingerprintMatcher(extra)
    except ImportError:
        if extra:
            raise
        return BuiltinMatcher()
