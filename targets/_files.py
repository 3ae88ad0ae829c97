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
#: The largest list read (Citizen Lab's global list is ~200 KiB; 64 MiB is millions of URLs).
MAX_FILE_BYTES = 64 * 1024 * 1024
#: The longest line kept; a URL that long is not a target (browsers stop near 2 KiB).
MAX_LINE_CHARS = 8192
#: How much of a bad entry a warning quotes.
_QUOTE = 120


def _read_bytes(path: Path, label: str) -> bytes:
    """Read at most MAX_FILE_BYTES (+1 to notice more), checking the head for binary data first,
    so ``/dev/zero`` or a disk image fails at once instead of filling memory."""
    import sys

    try:
        fh = sys.stdin.buffer if label == "-" else path.open("rb")
    except FileNotFoundError:
        raise TargetListError(f"{label}: no such file") from None
    except IsADirectoryError:
        raise TargetListError(f"{label}: is a directory, not a target list") from None
    except PermissionError:
        raise TargetListError(f"{label}: permission denied") from None
    except OSError as exc:
        raise TargetListError(f"{label}: cannot read ({exc.strerror or exc})") from None
    try:
        head = fh.read(_BINARY_PROBE)
        nul = head.find(b"\x00")
        if nul >= 0:
            raise TargetListError(f"{label}: binary file (NUL byte at offset {nul}), not a target list")
        rest = fh.read(MAX_FILE_BYTES + 1 - len(head)) if len(head) == _BINARY_PROBE else b""
    except OSError as exc:
        raise TargetListError(f"{label}: cannot read ({exc.strerror or exc})") from None
    finally:
        if fh is not sys.stdin.buffer:
            fh.close()
    data = head + rest
    if len(data) > MAX_FILE_BYTES:
        raise TargetListError(f"{label}: larger than {MAX_FILE_BYTES >> 20} MiB; split the list")
    return data


def _read_text(path: Path, label: str | None = None) -> tuple[str, list[tuple[int, str]]]:
    """The file's text, and (line, reason) for each line that is not UTF-8 (replaced by an empty
    line, so line numbers stay right and the other lines are kept)."""
    label = label or str(path)
    data = _read_bytes(path, label)
    try:
        return data.decode("utf-8-sig"), []
    except UnicodeDecodeError:
        pass
    bad: list[tuple[int, str]] = []
    lines = []
    for n, raw in enumerate(re.split(rb"\r\n|\r|\n", data), start=1):
        try:
            lines.append(raw.decode("utf-8-sig" if n == 1 else "utf-8"))
        except UnicodeDecodeError as exc:
            bad.append((n, f"not UTF-8 (invalid byte 0x{raw[exc.start]:02x} at column {exc.start + 1}); line skipped"))
            lines.append("")
    return "\n".join(lines), bad


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
        # A warning quotes at most a little of the entry: a 1 MB bad line is one short line.
        if len(reason) > 2 * _QUOTE:
            reason = reason[:_QUOTE] + f"… ({len(reason)} characters)"
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
        if sum(len(c) for c in row) > MAX_LINE_CHARS:
            out.error(line, f"line longer than {MAX_LINE_CHARS} characters; skipped")
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
        if len(raw) > MAX_LINE_CHARS:
            out.error(lineno, f"line longer than {MAX_LINE_CHARS} characters; skipped")
            continue
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
    label = str(path)
    text, bad = _read_text(p, label)
    out = _Collector(label)
    for line, reason in bad:
        out.error(line, reason)
    first = next((line for line in _LINE_END.split(text) if line.strip()), "")
    if _is_citizenlab_header(first):
        _load_csv(text, out)
        fmt = "csv"
    elif "," in first and not first.lstrip().startswith("#"):
        # Comma-separated but not a header we know: reading it as plain text would turn
        # "https://a.example/,NEWS,News" into a target.  Say what is expected instead.
        shown = first.strip()[:_QUOTE]
        raise TargetListError(f"{label}:1: unknown CSV header {shown!r}; a Citizen Lab test list starts with "
                              "'url,category_code,...' (a plain list has one URL or host per line)")
    else:
        _load_text(text, out)
        fmt = "text"
    out.errors.sort(key=lambda e: int(e[len(label) + 1:].split(":", 1)[0]))
    return LoadResult(targets=out.targets, errors=out.errors, duplicates=out.duplicates, format=fmt)
