"""Scrubbing error text before it leaves the machine.

OONI's netxlite replaces every IP endpoint in an error string with ``[scrubbed]`` before it
reaches a report; we do the same and go further, because a Python exception's text can also carry
file paths (``/etc/resolv.conf``), URLs with the operator's internal names, errno dumps and
exception type names -- none of which tells a probe anything about the network it measures.
"""

from __future__ import annotations

import re

SCRUBBED = "[scrubbed]"
UNKNOWN = "unknown_failure"
MAX_TEXT = 120

_URL = re.compile(r"\b[a-zA-Z][a-zA-Z0-9+.-]{0,15}://[^\s'\"<>]*")
# IPv6 is matched loosely (hex groups and colons, optional brackets and port): over-scrubbing a
# stray "a:b:c" costs nothing, missing an address leaks it.
_V6 = re.compile(r"\[?\b(?:[0-9a-fA-F]{0,4}:){2,7}[0-9a-fA-F.]{0,15}(?:%\w+)?\]?(?::\d{1,5})?")
_V4 = re.compile(r"\b\d{1,3}(?:\.\d{1,3}){3}(?::\d{1,5})?\b")
_PATH = re.compile(r"(?<![\w.])(?:~|\.{1,2})?/[^\s'\"]+")
_HOSTPORT = re.compile(r"\b[a-zA-Z0-9-]+(?:\.[a-zA-Z0-9-]+)+:\d{1,5}\b")
_ERRNO = re.compile(r"\[Errno -?\d+\]\s*")
_TYPENAME = re.compile(r"^[A-Za-z_][\w.]*\s*:\s*")  # a leading "SomeError: " (the Python type)


def scrub(text: str, limit: int = MAX_TEXT) -> str:
    """``text`` without endpoints, URLs and paths, on one line, at most ``limit`` characters."""
    out = _URL.sub(SCRUBBED, text)
    out = _V6.sub(lambda m: SCRUBBED if m.group(0).count(":") >= 2 else m.group(0), out)
    out = _V4.sub(SCRUBBED, out)
    out = _HOSTPORT.sub(SCRUBBED, out)
    out = _PATH.sub(SCRUBBED, out)
    out = " ".join(out.split())
    return out[:limit]


def scrub_failure(failure: str | None) -> str | None:
    """Keep OONI failure strings; reduce ``unknown_failure: <anything>`` to a clean, short text."""
    if failure is None:
        return None
    head, sep, rest = failure.partition(":")
    if head.strip() != UNKNOWN:
        # A vocabulary word never contains spaces; anything else is free text that needs scrubbing.
        word = failure.strip()
        return word if re.fullmatch(r"[a-z0-9_]{1,64}", word) else f"{UNKNOWN}: {scrub(failure)}"
    text = rest.strip() if sep else ""
    text = _TYPENAME.sub("", text)
    text = _ERRNO.sub("", text)
    text = scrub(text)
    return f"{UNKNOWN}: {text}" if text else UNKNOWN
