"""Importers for user-supplied target lists: Citizen Lab test-list CSV and plain text."""

from __future__ import annotations

import csv
import io
import re
from dataclasses import dataclass, field
from pathlib import Path

from kzprobe.model import Target
from kzprobe.targets._urls import URLProblem, check_url, url_from_line


class TargetListError(Exception):
    """A target list that cannot be used at all (missing, unreadable, not text, malformed built-in).

    The message is one line, starting with the file or list it is about.
    """


@dataclass
class LoadResult:
    """What a file yielded: the good targets (in file order, de-duplicated) and one error line per
    bad entry, formatted ``PATH:LINE: reason``."""

    targets: list[Target]
    errors: list[str]
    #: Entries dropped because an earlier entry had the same (canonical) URL.
    duplicates: int = 0
    #: "csv" or "text".
    format: str = field(default="text")


#: Old Citizen Lab category codes and the new code that replaced each (from the legend's
#: "Replaces old code(s)" column), so that old lists keep meaningful categories.
_OLD_CATEGORY_CODES = {
    "POLT": "POLR",
    "MINR": "HUMR",
    "WOMR": "HUMR",
    "MINF": "HUMR",
    "FEXP": "NEWS",
    "SELFHARM": "PUBH",
    "GAYL": "LGBT",
    "P2P": "FILE",
    "SFTWR": "FILE",
    "WRZ": "FILE",
    "VOIP": "COMT",
    "EMAIL": "COMT",
    "TRNS": "COMT",
    "MSG": "COMT",
    "BLGSERV": "HOST",
    "CLOUD": "HOST",
    "HAL": "CULTR",
    "DEV": "ECON",
    "FREL": "GOVT",
    "USMIL": "GOVT",
    "CACH": "CTRL",
    "KWRD": "MISC",
}

# A NUL byte never occurs in a text list; a few of them mean a binary file was passed by mistake.
_BINARY_PROBE = 8192


def _read_text(path: Path) -> str:
    label = str(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise TargetListError(f"{label}: no such file") from None
    except IsADirectoryError:
        raise TargetListError(f"{label}: is a directory, not a target list") from None
    except PermissionError:
        raise TargetListError(f"{label}: permission denied") from None
    except OSError as exc:
        raise TargetListError(f"{label}: cannot read ({exc.strerror or exc})") from None
    nul = data.find(b"\x00", 0, _BINARY_PROBE)
    if nul >= 0:
        raise TargetListError(f"{label}: binary file (NUL byte at offset {nul}), not a target list")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise TargetListError(
            f"{label}: not UTF-8 text (invalid byte 0x{data[exc.start]:02x} at offset {exc.start})"
        ) from None


def _is_citizenlab_header(first_line: str) -> bool:
    cols = [c.strip().lower() for c in first_line.split(",")]
    return len(cols) >= 2 and cols[0] == "url" and "category_code" in cols


class _Collector:
    """Accumulates targets, de-duplicating on the canonical URL."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.targets: list[Target] = []
        self.errors: list[str] = []
        self.duplicates = 0
        self._seen: set[str] = set()

    def error(self, line: int, reason: str) -> None:
        self.errors.append(f"{self.label}:{line}: {reason}")

    def add(self, line: int, url: str, category: str = "", notes: str = "") -> None:
        try:
            key = check_url(url)
        except URLProblem as exc:
            self.error(line, str(exc))
            return
        if key in self._seen:
            self.duplicates += 1
            return
        self._seen.add(key)
        self.targets.append(Target(url=url, category=category, notes=notes))


def _load_csv(text: str, out: _Collector) -> None:
    reader = csv.reader(io.StringIO(text, newline=""))
    header: list[str] = []
    for row in reader:  # leading blank lines
        if any(c.strip() for c in row):
            header = [c.strip().lower() for c in row]
            break
    if not header:  # pragma: no cover - the caller only comes here with a header line
        return
    col_url = header.index("url")
    col_cat = header.index("category_code") if "category_code" in header else None
    col_notes = header.index("notes") if "notes" in header else None
    start = reader.line_num + 1
    while True:
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            out.error(start, f"malformed CSV: {exc}")
            start = reader.line_num + 1
            continue
        line, start = start, reader.line_num + 1
        if not row or all(not c.strip() for c in row):
            continue
        if len(row) != len(header):
            out.error(line, f"expected {len(header)} CSV fields, got {len(row)}")
            continue
        url = row[col_url].strip()
        category = row[col_cat].strip().upper() if col_cat is not None else ""
        category = _OLD_CATEGORY_CODES.get(category, category)
        notes = row[col_notes].strip() if col_notes is not None else ""
        out.add(line, url, category, notes)


def _strip_comment(line: str) -> str:
    # A "#" starts a comment at the beginning of a line or after whitespace; elsewhere it is a
    # URL fragment ("http://namba.kz/#!/").
    if line.startswith("#"):
        return ""
    for i, ch in enumerate(line):
        if ch == "#" and line[i - 1].isspace():
            return line[:i]
    return line


# The line ends the csv module counts, so that both formats number lines alike; str.splitlines()
# would also split on form feeds and U+2028 and shift every later line number.
_LINE_END = re.compile(r"\r\n|\r|\n")


def _load_text(text: str, out: _Collector) -> None:
    for lineno, raw in enumerate(_LINE_END.split(text), start=1):
        entry = _strip_comment(raw.strip()).strip()
        if not entry:
            continue
        out.add(lineno, url_from_line(entry))


def load_file(path: str | Path) -> LoadResult:
    """Load a Citizen Lab test-list CSV or a plain-text list (one URL or host[:port] per line).

    Bad entries become ``errors`` and the good ones are kept; duplicates are dropped silently
    and counted.  Raises :class:`TargetListError` when the file cannot be used at all.
    """
    p = Path(path)
    text = _read_text(p)
    out = _Collector(str(path))
    first = next((line for line in _LINE_END.split(text) if line.strip()), "")
    if _is_citizenlab_header(first):
        _load_csv(text, out)
        fmt = "csv"
    else:
        _load_text(text, out)
        fmt = "text"
    return LoadResult(targets=out.targets, errors=out.errors, duplicates=out.duplicates, format=fmt)
