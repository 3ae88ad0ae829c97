"""Reading OONI's archive as a stream of raw lines: files, folders, the S3 layout, filters.

OONI publishes raw measurements as hourly "cans" in the ``ooni-data-eu-fra`` bucket, laid out as
``raw/YYYYMMDD/HH/CC/TESTNAME/YYYYMMDDHH_CC_TESTNAME.nN.M.jsonl.gz`` (one measurement per line;
the ``.tar.gz`` "postcans" beside them hold the same measurements again and are skipped).  A
local mirror of that layout, a folder of ``.json``/``.jsonl``/``.jsonl.gz`` files, single files,
and fsspec URLs (``s3://…``, where the filesystem package is installed) all read the same way.

Nothing here parses JSON.  Reading yields raw lines (bytes), because parsing is the expensive
part and belongs in the worker processes.  Filters are applied as early and as cheaply as
possible: first on the path (the layout names the day, hour, country and test), then on the raw
line with a byte pattern, and only then, precisely, on the parsed measurement (in the worker).
The byte pattern may let a line through that the precise check then drops, never the reverse.
"""

from __future__ import annotations

import dataclasses
import gzip
import io
import os
import re
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, cast

#: A measurement larger than this is not a measurement (OONI's are 1 KB to about 1 MB).
MAX_LINE = 16 * 1024 * 1024
SUFFIXES = (".json", ".jsonl", ".json.gz", ".jsonl.gz")
#: OONI's test names in the layout drop the underscore (``webconnectivity``).
_LAYOUT = re.compile(r"(?:^|/)(\d{8})/(\d{2})/([A-Z]{2}|ZZ)/([a-z0-9_]+)/[^/]+$")


class ArchiveError(Exception):
    """A path or URL that cannot be read at all; one line, naming it."""


@dataclass(frozen=True, slots=True)
class Filters:
    """What to keep.  Empty means everything; ``test`` defaults to Web Connectivity."""

    countries: frozenset[str] = frozenset()
    asns: frozenset[str] = frozenset()
    since: datetime | None = None
    until: datetime | None = None
    test: str = "web_connectivity"

    # --- on the path (free) ------------------------------------------------------------------
    def keep_path(self, path: str) -> bool:
        m = _LAYOUT.search(path.replace("\\", "/"))
        if not m:
            return True  # not in the archive layout: decide line by line
        day, hour, cc, test = m.groups()
        if self.test and test.replace("_", "") != self.test.replace("_", ""):
            return False
        if self.countries and cc not in self.countries:
            return False
        start = datetime.strptime(day + hour, "%Y%m%d%H").replace(tzinfo=UTC)
        # The bucket hour is when the collector received it; a measurement started up to a day
        # earlier can land in it, so the path filter is generous by a day on the lower bound.
        if self.until and start > self.until:
            return False
        return not (self.since and start.timestamp() + 3600 < self.since.timestamp() - 86400)

    # --- on the raw line (cheap) ---------------------------------------------------------------
    def _needles(self) -> list[re.Pattern[bytes]]:
        out: list[re.Pattern[bytes]] = []
        if self.test:
            out.append(re.compile(rb'"test_name"\s*:\s*"' + re.escape(self.test.encode()) + rb'"'))
        if self.countries:
            alt = b"|".join(re.escape(c.encode()) for c in sorted(self.countries))
            out.append(re.compile(rb'"probe_cc"\s*:\s*"(?:' + alt + rb')"'))
        if self.asns:
            alt = b"|".join(re.escape(a.encode()) for a in sorted(self.asns))
            out.append(re.compile(rb'"probe_asn"\s*:\s*"(?:' + alt + rb')"'))
        return out

    def line_prefilter(self) -> LinePrefilter:
        return LinePrefilter(self._needles())

    # --- on the parsed measurement (exact; in the worker) ----------------------------------------
    def keep(self, m: dict[str, Any], started: float) -> bool:
        if self.test and m.get("test_name") != self.test:
            return False
        if self.countries and m.get("probe_cc") not in self.countries:
            return False
        if self.asns and m.get("probe_asn") not in self.asns:
            return False
        if self.since and started < self.since.timestamp():
            return False
        return not (self.until and started >= self.until.timestamp())

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["countries"] = sorted(self.countries)
        d["asns"] = sorted(self.asns)
        d["since"] = self.since.isoformat() if self.since else None
        d["until"] = self.until.isoformat() if self.until else None
        return d


class LinePrefilter:
    """Byte patterns every kept line must contain (searched only in the line's first 64 KiB,
    where OONI's serialisers put the top-level keys; a measurement whose keys come later is still
    caught by the exact check if this lets it through — so the prefilter only ever skips lines
    whose head names another country, ASN or test)."""

    def __init__(self, needles: list[re.Pattern[bytes]]) -> None:
        self.needles = needles
        #: Lines skipped so far (counted in the import's summary as filtered).
        self.skipped = 0
        self._names = [re.compile(rb'"' + key + rb'"\s*:') for key in (b"test_name", b"probe_cc", b"probe_asn")]

    def __call__(self, line: bytes) -> bool:
        if not self.needles:
            return True
        head = line[:65536]
        for needle in self.needles:
            if needle.search(head) is None:
                # Skip only when the key is present in the head with another value; if the key is
                # not in the head at all (odd key order, or a huge line), let the exact check decide.
                key = needle.pattern.split(b'"')[1]
                if re.search(rb'"' + re.escape(key) + rb'"\s*:', head):
                    self.skipped += 1
                    return False
        return True


# --- sources -----------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Source:
    """One file to read: a local path or an fsspec URL."""

    name: str

    @property
    def is_url(self) -> bool:
        return "://" in self.name


def discover(paths: Iterable[str | Path], filters: Filters) -> Iterator[Source | tuple[str, str]]:
    """Every readable file under ``paths`` that the path filter keeps, in a stable order.

    Yields ``(where, reason)`` for a path that cannot be used; the rest goes on."""
    for p in paths:
        s = str(p)
        if "://" in s:
            yield from _discover_url(s, filters)
            continue
        path = Path(s)
        if path.is_dir():
            # os.walk, not Path.rglob: an archive folder holds tens of thousands of cans, and
            # rglob's per-entry objects cost more than reading the smaller ones.
            found = sorted(os.path.join(d, f) for d, _, files in os.walk(path) for f in files
                           if f.endswith(SUFFIXES))
            if not found:
                yield (s, "no .json, .jsonl or .jsonl.gz files in this folder")
            yield from (Source(f) for f in found if filters.keep_path(f))
        elif path.exists() or s == "-":
            yield Source(s)
        else:
            yield (s, "no such file or folder")


def _discover_url(url: str, filters: Filters) -> Iterator[Source | tuple[str, str]]:
    try:
        import fsspec
    except ImportError:
        yield (url, "reading URLs needs fsspec and the filesystem's package (pip install fsspec s3fs)")
        return
    try:
        fs, _, roots = fsspec.get_fs_token_paths(url)
        names: list[str] = []
        for root in roots:
            if fs.isdir(root):
                names.extend(f for f in fs.find(root) if f.endswith(SUFFIXES))
            else:
                names.append(root)
    except Exception as exc:  # any filesystem backend's error: one line naming the URL
        yield (url, f"cannot list: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
        return
    proto = url.split("://", 1)[0]
    for n in sorted(names):
        if filters.keep_path(n):
            yield Source(n if "://" in n else f"{proto}://{n}")


def _open(source: Source) -> IO[bytes]:
    if source.name == "-":
        import sys

        return sys.stdin.buffer
    if source.is_url:
        import fsspec

        return fsspec.open(source.name, "rb").open()
    return open(source.name, "rb")  # closed by read_lines


def read_lines(source: Source, prefilter: LinePrefilter | None = None) -> Iterator[tuple[int, bytes] | tuple[int, str]]:
    """``(line number, raw line)`` for every measurement in the file, streaming.

    A ``.json`` file holding one pretty-printed object (as OONI's QA files and the API's single
    measurements are) is one measurement, numbered line 1.  A line that cannot be read yields
    ``(line number, reason)`` (a ``str``) and reading goes on; a file that breaks off (a truncated
    gzip) yields the reason at the line where it broke off."""
    try:
        raw = _open(source)
    except OSError as exc:
        yield (0, f"cannot read: {exc.strerror or exc}")
        return
    with raw:
        fh = cast(IO[bytes], gzip.GzipFile(fileobj=raw)) if source.name.endswith(".gz") else raw
        n = 0
        try:
            first = fh.read(1)
            while first in (b" ", b"\n", b"\r", b"\t"):
                first = fh.read(1)
            if not first:
                yield (0, "empty file")
                return
            stream = io.BufferedReader(_Prepend(first, fh), buffer_size=1 << 20)
            if first in (b"{", b"[") and source.name.endswith((".json", ".json.gz")):
                # One object, possibly pretty-printed: read it whole (bounded), it is one line.
                whole = stream.read(MAX_LINE + 1)
                if len(whole) > MAX_LINE:
                    yield (1, f"larger than {MAX_LINE // (1024 * 1024)} MiB")
                    return
                if first == b"[" or b"\n{" not in whole.strip():
                    yield (1, whole)
                    return
                lines: Iterable[bytes] = io.BytesIO(whole)
            else:
                lines = stream
            for line in _bounded_lines(lines):
                n += 1
                if line is None:
                    yield (n, f"line longer than {MAX_LINE // (1024 * 1024)} MiB")
                    continue
                if not line.strip():
                    continue
                if prefilter is None or prefilter(line):
                    yield (n, line)
        except (OSError, EOFError, zlib.error) as exc:
            yield (n + 1, f"cannot read past here: {getattr(exc, 'strerror', None) or exc}")


def _bounded_lines(fh: Iterable[bytes]) -> Iterator[bytes | None]:
    """Lines, but a line over MAX_LINE is skipped without holding it in memory (None)."""
    read = getattr(fh, "readline", None)
    if read is None:
        yield from fh
        return
    while True:
        line = read(MAX_LINE + 1)
        if not line:
            return
        if len(line) > MAX_LINE and not line.endswith(b"\n"):
            while line and not line.endswith(b"\n"):
                line = read(1 << 20)
            yield None
            continue
        yield line


class _Prepend(io.RawIOBase):
    """A raw stream that gives back a byte already peeked, then the rest."""

    def __init__(self, head: bytes, rest: IO[bytes]) -> None:
        self.head, self.rest = head, rest

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        if self.head:
            n = len(self.head)
            b[:n] = self.head
            self.head = b""
            return n
        chunk = self.rest.read(len(b))
        b[: len(chunk)] = chunk
        return len(chunk)
