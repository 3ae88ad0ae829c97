"""`kzprobe verdicts` across runs: filters on the declared vantage and time, the latest
verdict per target grouped by vantage, --list; on SQLite and on a real PostgreSQL (--db
postgresql://...)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner

from kzprobe.cli import main
from kzprobe.model import Target, Verdict
from kzprobe.storage import Store
from kzprobe.storage.pgcluster import Cluster, ClusterUnavailable, throwaway_cluster, unavailable_reason

DAY = 86400.0
T0 = 1_790_000_000.0  # 2026-09-21
PG_REASON = unavailable_reason()


@pytest.fixture(scope="module")
def pg_cluster() -> Iterator[Cluster]:
    if PG_REASON is not None:
        pytest.skip(f"no PostgreSQL: {PG_REASON}")
    try:
        with throwaway_cluster() as cluster:
            yield cluster
    except ClusterUnavailable as exc:
        pytest.skip(f"PostgreSQL cannot start here: {exc}")


def populate(db: str) -> None:
    """Three runs: KazNet on day 0 and day 2 (news.example changes), Beeline on day 1."""
    store = Store(db)
    plan = [("KazNet", "AS9198", "KZ", 0, {"news.example": ("blocked", "dns"), "gov.example": ("ok", None)}),
            ("Beeline KZ", "AS21299", "KZ", 1, {"news.example": ("blocked", "dpi"), "gov.example": ("ok", None)}),
            ("KazNet", "AS9198", "KZ", 2, {"news.example": ("ok", None), "gov.example": ("ok", None)})]
    for net, asn, cc, day, verdicts in plan:
        rid = store.new_run(vantage={"network_name": net, "asn": asn, "country": cc}, started=T0 + day * DAY)
        store.add_targets(rid, [Target(f"https://{h}/") for h in verdicts])
        store.set_verdicts(rid, [Verdict(f"https://{h}/", h, st, f"rule.{st}", f"day {day}", mechanism=m)
                                 for h, (st, m) in verdicts.items()])
        store.finish_run(rid, ended=T0 + day * DAY + 60)
    store.close()


@dataclass
class Out:
    returncode: int
    stdout: str
    stderr: str


def kz(*args: str) -> Out:
    """The CLI in-process (click's runner): the same code path, without a Python start-up per call."""
    r = CliRunner().invoke(main, list(args), catch_exceptions=False)
    return Out(r.exit_code, r.stdout, r.stderr)


def grouped(db: str, *filters: str) -> dict[tuple[str, str], tuple[str, str | None, int]]:
    p = kz("verdicts", "--db", db, "--format", "json", *filters)
    assert p.returncode == 0, p.stderr
    return {(v["vantage"]["network_name"], v["domain"]): (v["status"], v["mechanism"], v["run"])
            for v in json.loads(p.stdout)}


def tmp_list(db: str) -> Path:
    import tempfile

    f = Path(tempfile.mkdtemp()) / "only.txt"
    f.write_text("https://gov.example/\n")
    return f


def check_queries(db: str) -> None:
    every = grouped(db, "--country", "kz")
    # Latest per vantage: KazNet's day-2 run wins over its day-0 run; Beeline has its own group.
    assert every == {("KazNet", "news.example"): ("ok", None, 3), ("KazNet", "gov.example"): ("ok", None, 3),
                     ("Beeline KZ", "news.example"): ("blocked", "dpi", 2),
                     ("Beeline KZ", "gov.example"): ("ok", None, 2)}
    assert grouped(db, "--network", "kaznet", "--until", "2026-09-22") == {
        ("KazNet", "news.example"): ("blocked", "dns", 1), ("KazNet", "gov.example"): ("ok", None, 1)}
    assert set(grouped(db, "--asn", "21299")) == {("Beeline KZ", "news.example"), ("Beeline KZ", "gov.example")}
    assert {k[0] for k in grouped(db, "--since", "2026-09-22T00:00:00Z")} == {"Beeline KZ", "KazNet"}
    listed = kz("verdicts", "--db", db, "--runs", "--network", "KazNet", "--format", "json")
    assert listed.returncode == 0, listed.stderr
    assert [(r["id"], r["network_name"], r["verdicts"]) for r in json.loads(listed.stdout)] == [
        (1, "KazNet", 2), (3, "KazNet", 2)]
    none = kz("verdicts", "--db", db, "--country", "FR")
    assert none.returncode == 1 and "no verdicts" in none.stderr
    bad = kz("verdicts", "--db", db, "--since", "last tuesday")
    assert bad.returncode == 2 and "--since" in bad.stderr
    only = tmp_list(db)
    assert set(grouped(db, "--list", str(only))) == {("KazNet", "gov.example"), ("Beeline KZ", "gov.example")}


def test_filters_and_grouping_on_sqlite(tmp_path: Path) -> None:
    db = str(tmp_path / "analyst.db")
    populate(db)
    check_queries(db)
    # Without filters, `verdicts` is still the latest run's, as before.
    p = kz("verdicts", "--db", db, "--format", "json")
    single = json.loads(p.stdout)  # cli-durable's envelope: {"command", "run", "counts", "verdicts", ...}
    assert {v["domain"]: v["status"] for v in single["verdicts"]} == {"news.example": "ok", "gov.example": "ok"}


@pytest.mark.postgres
def test_filters_and_grouping_on_postgresql(pg_cluster: Cluster) -> None:
    url = pg_cluster.create_database()  # postgresql+psycopg://...
    populate(url)
    check_queries(url.replace("postgresql+psycopg://", "postgresql://"))  # as an analyst types it
