"""A synthetic OONI archive in OONI's published layout, built from the shapes of the QA files.

``raw/YYYYMMDD/HH/CC/webconnectivity/YYYYMMDDHH_CC_webconnectivity.n0.K.jsonl.gz``, one
measurement per line, as in the ``ooni-data-eu-fra`` bucket.  Each measurement is one of the 20
real QA measurements (``../shared/ooni-qa/``) with its input host renamed (so inputs differ),
and its network, country, report, uid and start time set from the measurement's index, so that
the archive spans days, hours, countries and networks the way a real one does.

Used by ``bench/ooni_import.py`` and by the tests (small sizes).
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import urlsplit

QA = Path(__file__).resolve().parent.parent.parent / "shared" / "ooni-qa"
#: (country, ASN, network name): a mix, Kazakhstan first.
NETWORKS = [
    ("KZ", "AS9198", "JSC Kazakhtelecom"), ("KZ", "AS21299", "Kar-Tel LLC"),
    ("KZ", "AS206026", "Kcell JSC"), ("KZ", "AS35104", "2Day Telecom LLP"),
    ("UZ", "AS8193", "Uzbektelekom"), ("KG", "AS8449", "ElCat Ltd."),
    ("RU", "AS12389", "Rostelecom"), ("TJ", "AS43197", "Babilon-T"),
]
START = datetime(2024, 2, 1, tzinfo=UTC)


def templates(qa: Path = QA) -> list[tuple[str, str]]:
    """(name, compact JSON with placeholders) for each QA file."""
    out = []
    for f in sorted(qa.glob("*.json")):
        m = json.loads(f.read_text())
        host = urlsplit(m["input"]).hostname or ""
        for k in ("measurement_start_time", "test_start_time"):
            m[k] = "@@TIME@@"
        m.update(probe_cc="@@CC@@", probe_asn="@@ASN@@", probe_network_name="@@NET@@", report_id="@@RID@@",
                 measurement_uid="@@UID@@", probe_ip="127.0.0.1")
        text = json.dumps(m, separators=(",", ":"), ensure_ascii=True)
        if host and host.isascii():
            text = text.replace(host, "@@HOST@@")
        out.append((f.stem, text))
    return out


def measurement(tpl: list[tuple[str, str]], i: int, n: int, days: int) -> tuple[datetime, str, str]:
    """(start time, country, line) of measurement number ``i`` of ``n``, spread over ``days``."""
    _, text = tpl[i % len(tpl)]
    cc, asn, net = NETWORKS[(i // 7) % len(NETWORKS)]
    t = START + timedelta(seconds=i * 86400 * days // max(n, 1))
    stamp = t.strftime("%Y-%m-%d %H:%M:%S")
    rid = f"{t:%Y%m%dT%H%M%SZ}_{asn}_{(i // 50):012x}"
    line = (text.replace("@@HOST@@", f"s{(i // len(tpl)) % 5000}.example-{i % 97}.kz")
            .replace("@@TIME@@", stamp).replace("@@CC@@", cc).replace("@@ASN@@", asn).replace("@@NET@@", net)
            .replace("@@RID@@", rid).replace("@@UID@@", f"20240201000000.{i:09d}_{cc}_webconnectivity_{i:016x}"))
    return t, cc, line


def generate(root: Path, n: int, days: int = 30, qa: Path = QA, per_file: int = 20000) -> Iterator[Path]:
    """Write ``n`` measurements under ``root`` in the archive layout; yields each file written."""
    tpl = templates(qa)
    buckets: dict[tuple[str, str], list[str]] = {}
    counts: dict[tuple[str, str], int] = {}

    def flush(key: tuple[str, str]) -> Path:
        hour, cc = key
        k = counts.get(key, 0)
        counts[key] = k + 1
        d = root / "raw" / hour[:8] / hour[8:] / cc / "webconnectivity"
        d.mkdir(parents=True, exist_ok=True)
        p = d / f"{hour}_{cc}_webconnectivity.n0.{k}.jsonl.gz"
        with gzip.open(p, "wt", compresslevel=1, encoding="ascii") as fh:
            fh.write("\n".join(buckets.pop(key)) + "\n")
        return p

    hour = ""
    for i in range(n):
        t, cc, line = measurement(tpl, i, n, days)
        key = (t.strftime("%Y%m%d%H"), cc)
        if key[0] != hour:  # time only moves forward: the previous hour's cans are complete
            for k in sorted(buckets):
                yield flush(k)
            hour = key[0]
        buckets.setdefault(key, []).append(line)
        if len(buckets[key]) >= per_file:
            yield flush(key)
    for key in sorted(buckets):
        yield flush(key)


if __name__ == "__main__":
    import sys

    files = list(generate(Path(sys.argv[1]), int(sys.argv[2])))
    print(f"{len(files)} files")
