"""The report's aggregates, computed in the database.

Verdicts are the big table (targets x networks x runs: 18 M rows for 10,000 targets, 20 networks
and 90 daily runs).  Nothing here loads them row by row.  The runs table is small (one row per
run), so the run-level filters and the run -> (network, day) mapping are worked out in Python
and handed to the database as a temporary table; every question about verdicts is then one
``GROUP BY`` joined to it.  Temporary tables work alike on SQLite and PostgreSQL.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import (
    BigInteger,
    Column,
    Connection,
    Float,
    Integer,
    MetaData,
    String,
    Table,
    and_,
    case,
    cast,
    func,
    insert,
    literal,
    select,
)

from kzprobe.report.filters import Filters, iso, norm_asn
from kzprobe.storage.models import RunRow, TargetRow, VerdictRow

DAY = 86400
#: A latest key is rank * 16 * RANK_SHIFT + state * RANK_SHIFT + verdict id: one integer whose
#: MAX is the latest verdict of a group, with its state (see _latest_key).  Verdict ids < 2**40.
RANK_SHIFT = 1 << 40
#: The matrix code of a (target, network) pair that has no verdict.
NO_DATA = "."


@dataclass(slots=True)
class Network:
    """A column of the matrix: one vantage network as seen by one source (live, pcap, ooni)."""

    key: str
    name: str
    asn: str
    country: str
    source: str
    runs: list[int] = field(default_factory=list)
    first: float = 0.0
    last: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"key": self.key, "name": self.name, "asn": self.asn, "country": self.country,
                "source": self.source, "runs": len(self.runs), "first": iso(self.first), "last": iso(self.last)}


@dataclass(slots=True)
class RunMeta:
    id: int
    source: str
    started: float
    state: str
    net: int
    day: int
    rank: int


def vantage_fields(v: dict[str, Any], name: str | None = None, asn: str | None = None,
                   country: str | None = None) -> tuple[str, str, str]:
    """(network name, ASN, country) of a run: its vantage columns, else its vantage JSON (runs
    stored before the columns existed, or by a source that only wrote OONI's probe_* keys)."""
    asn_s = norm_asn(asn or v.get("asn") or v.get("probe_asn"))
    cc = str(country or v.get("country") or v.get("probe_cc") or "").upper()
    nm = str(name or v.get("network_name") or v.get("probe_network_name") or asn_s or "unnamed network")
    return nm, asn_s, cc


def _capture_name(options: Any) -> str:
    """A replay without vantage metadata is named after its capture file(s)."""
    files = options.get("files") if isinstance(options, dict) else None
    if isinstance(files, list) and files:
        first = str(files[0]).replace("\\", "/").rsplit("/", 1)[-1]
        return f"capture {first}" + (f" (+{len(files) - 1})" if len(files) > 1 else "")
    return "unnamed capture"


def select_runs(conn: Connection, f: Filters) -> tuple[list[RunMeta], list[Network]]:
    """The runs the filters keep, each mapped to its network column and UTC day.

    The runs table is one row per run (thousands, not millions), so the filters are applied
    here, on the names as the report shows them; every verdict query then joins this set."""
    cols = [RunRow.id, RunRow.source, RunRow.started, RunRow.state, RunRow.vantage,
            RunRow.network_name, RunRow.asn, RunRow.country, RunRow.options]
    rows: list[tuple[Any, ...]] = [tuple(r) for r in conn.execute(select(*cols).order_by(RunRow.started, RunRow.id))]
    nets: dict[str, Network] = {}
    metas: list[RunMeta] = []
    want_net = {n.casefold() for n in f.networks}
    want_asn = {norm_asn(a) for a in f.asns}
    want_cc = {c.upper() for c in f.countries}
    for rank, (rid, source, started, state, vantage, v_name, v_asn, v_cc, options) in enumerate(rows):
        if f.runs and rid not in f.runs:
            continue
        if f.since is not None and started < f.since:
            continue
        if f.until is not None and started >= f.until:
            continue
        name, asn, cc = vantage_fields(vantage or {}, v_name, v_asn, v_cc)
        if source == "pcap" and name == "unnamed network":
            name = _capture_name(options)
        if want_net and name.casefold() not in want_net:
            continue
        if want_asn and asn not in want_asn:
            continue
        if want_cc and cc not in want_cc:
            continue
        key = f"{source}:{name}"
        net = nets.get(key)
        if net is None:
            net = nets[key] = Network(key, name, asn, cc, source, first=started)
        net.runs.append(rid)
        net.last = started
        metas.append(RunMeta(rid, source, started, state, -1, int(started // DAY), rank))
    order = sorted(nets.values(), key=lambda n: (("live", "pcap", "ooni").index(n.source)
                                                 if n.source in ("live", "pcap", "ooni") else 3, n.name.casefold()))
    index = {n.key: i for i, n in enumerate(order)}
    by_run = {rid: index[n.key] for n in order for rid in n.runs}
    for m in metas:
        m.net = by_run[m.id]
    return metas, order


class TempTables:
    """The run map and the domain filter, as temporary tables on one connection.

    Besides each run's network, day and rank, the run map holds *packed units*: the totals of
    all networks travel in a few integers per target, each network owning a slot of ``bits``
    bits in one of them (``u0``, ``u1`` ...).  Summing a run's unit over a target's verdicts counts
    that target's measurements on every network at once, with ``GROUP BY target`` alone, which
    the (target, run_id) index streams without sorting 18 M rows.  The slot is wide enough for
    every run of the network (plus headroom for duplicate URLs), and :func:`matrix_totals`
    checks the sums against ``COUNT(*)``, so an overflow can never go unnoticed.
    """

    def __init__(self, conn: Connection, metas: Sequence[RunMeta], domains: Iterable[str]) -> None:
        runs_per_net: dict[int, int] = {}
        for m in metas:
            runs_per_net[m.net] = runs_per_net.get(m.net, 0) + 1
        self.bits = max(runs_per_net.values(), default=1).bit_length() + 2
        self.per_int = max(1, 62 // self.bits)
        self.n_nets = len(runs_per_net)
        self.groups = max(1, -(-self.n_nets // self.per_int))
        md = MetaData()
        self.runs = Table("kzr_runs", md, Column("run_id", Integer, primary_key=True), Column("net", Integer),
                          Column("day", Integer), Column("rank", BigInteger), Column("t", Float),
                          Column("role", Integer), *[Column(f"u{g}", BigInteger) for g in range(self.groups)],
                          prefixes=["TEMPORARY"])
        self.domains = Table("kzr_domains", md, Column("domain", String(255), primary_key=True),
                             prefixes=["TEMPORARY"])
        md.drop_all(conn, checkfirst=True)
        md.create_all(conn)
        latest, prev = last_two(metas)
        # Literal id lists (not a join on role) so that the planner reads these runs by index.
        self.latest, self.previous = latest, prev
        rows = []
        for m in metas:
            g, slot = divmod(m.net, self.per_int)
            rows.append({"run_id": m.id, "net": m.net, "day": m.day, "rank": m.rank, "t": m.started,
                         "role": 2 if m.id in latest else (1 if m.id in prev else 0),
                         **{f"u{k}": (1 << (self.bits * slot)) if k == g else 0 for k in range(self.groups)}})
        if rows:
            conn.execute(insert(self.runs), rows)
        doms = sorted(set(domains))
        self.filter_domains = bool(doms)
        if doms:
            conn.execute(insert(self.domains), [{"domain": d} for d in doms])

    def verdict_filter(self, v: Any) -> Any:
        if not self.filter_domains:
            return True
        return v.c.domain.in_(select(self.domains.c.domain))

    def unpack(self, sums: Sequence[int]) -> list[int]:
        """Per network counts from the packed sums."""
        mask = (1 << self.bits) - 1
        out = []
        for net in range(self.n_nets):
            g, slot = divmod(net, self.per_int)
            out.append((int(sums[g]) >> (self.bits * slot)) & mask)
        return out


def last_two(metas: Sequence[RunMeta]) -> tuple[set[int], set[int]]:
    """Per network, the latest run and the one before it (for "what changed")."""
    per: dict[int, list[RunMeta]] = {}
    for m in metas:
        per.setdefault(m.net, []).append(m)
    latest, prev = set(), set()
    for ms in per.values():
        ms.sort(key=lambda m: m.rank)
        latest.add(ms[-1].id)
        if len(ms) > 1:
            prev.add(ms[-2].id)
    return latest, prev


def _state_code(v: Any) -> Any:
    """The cell state as a small integer (index into STATE_CODES), computed by the database."""
    return case(
        (v.c.status == "ok", 1), (and_(v.c.status == "blocked", v.c.mechanism == "dns"), 2),
        (and_(v.c.status == "blocked", v.c.mechanism == "ip"), 3),
        (and_(v.c.status == "blocked", v.c.mechanism == "dpi"), 4), (v.c.status == "blocked", 5),
        (v.c.status == "down", 6), else_=7)


def _latest_key(m: Any, v: Any) -> Any:
    """rank * 2**44 + state * 2**40 + id, in 64-bit arithmetic on every database (PostgreSQL
    would otherwise multiply 32-bit integers and overflow)."""
    big = BigInteger()
    return (cast(m.c.rank, big) * literal(RANK_SHIFT * 16, big) + cast(_state_code(v), big) * literal(RANK_SHIFT, big)
            + cast(v.c.id, big))


#: _state_code -> the one-character code of CODE.
STATE_CODES = ".odipbwu"


def matrix_totals(conn: Connection, tt: TempTables) -> dict[str, list[int]]:
    """Per target, the number of verdicts on each network (one streaming GROUP BY target)."""
    v, m = VerdictRow.__table__, tt.runs
    units = [func.sum(m.c[f"u{g}"]) for g in range(tt.groups)]
    q = (select(v.c.target, func.count(), *units)
         .select_from(v.join(m, m.c.run_id == v.c.run_id))
         .where(tt.verdict_filter(v))
         .group_by(v.c.target))
    out: dict[str, list[int]] = {}
    for target, n, *sums in conn.execute(q):
        per = tt.unpack(sums)
        if sum(per) != n:  # pragma: no cover - the slot width makes this impossible; never trust it
            raise RuntimeError(f"packed totals overflowed for {target!r}")
        out[target] = per
    return out


def blocked_cells(conn: Connection, tt: TempTables) -> list[tuple[str, int, int, float, float]]:
    """(target, network, blocked verdicts, first and last time blocked): only blocked rows are
    grouped, which is a small share of the table."""
    v, m = VerdictRow.__table__, tt.runs
    q = (select(v.c.target, m.c.net, func.count(), func.min(m.c.t), func.max(m.c.t))
         .select_from(v.join(m, m.c.run_id == v.c.run_id))
         .where(v.c.status == "blocked", tt.verdict_filter(v))
         .group_by(v.c.target, m.c.net))
    return [tuple(r) for r in conn.execute(q)]


def latest_cells(conn: Connection, tt: TempTables, missing: Iterable[tuple[str, int]] = ()) -> dict[
        tuple[str, int], tuple[str, int]]:
    """(target, network) -> (state code, verdict id) of the latest verdict.

    Read from each network's latest run (by the run_id index); a target that run did not
    measure is looked up among its own verdicts (by the target index), a few at a time."""
    v, m = VerdictRow.__table__, tt.runs
    out: dict[tuple[str, int], tuple[str, int]] = {}
    q = (select(v.c.target, m.c.net, _state_code(v), v.c.id)
         .select_from(v.join(m, m.c.run_id == v.c.run_id))
         .where(v.c.run_id.in_(sorted(tt.latest)), tt.verdict_filter(v)).order_by(v.c.id))
    for target, net, code, vid in conn.execute(q):
        out[(target, int(net))] = (STATE_CODES[int(code)], int(vid))
    rest = sorted({t for t, n in missing if (t, n) not in out})
    key = _latest_key(m, v)
    for i in range(0, len(rest), 500):
        q2 = (select(v.c.target, m.c.net, func.max(key))
              .select_from(v.join(m, m.c.run_id == v.c.run_id))
              .where(v.c.target.in_(rest[i:i + 500]), tt.verdict_filter(v))
              .group_by(v.c.target, m.c.net))
        for target, net, k in conn.execute(q2):
            out.setdefault((target, int(net)), unpack_key(int(k)))
    return out


def unpack_key(key: int) -> tuple[str, int]:
    """(cell code, verdict id) of a latest key."""
    return STATE_CODES[(key // RANK_SHIFT) % 16], key % RANK_SHIFT


def latest_verdicts(conn: Connection, ids: Sequence[int], *, full: bool = False) -> dict[int, dict[str, Any]]:
    """Verdict rows by id (the latest of each cell), fetched in chunks by primary key."""
    v = VerdictRow.__table__
    cols = [v.c.id, v.c.run_id, v.c.domain, v.c.status, v.c.mechanism, v.c.detail, v.c.rule, v.c.confidence]
    if full:
        cols += [v.c.sentence, v.c.observations, v.c.packets]
    out: dict[int, dict[str, Any]] = {}
    for i in range(0, len(ids), 900):
        for r in conn.execute(select(*cols).where(v.c.id.in_(ids[i:i + 900]))):
            out[r.id] = dict(r._mapping)
    return out


def per_run_counts(conn: Connection, tt: TempTables) -> list[tuple[int, str, str | None, str | None, int]]:
    """(run, status, mechanism, detail, n): the input of the time and mechanism views."""
    v, m = VerdictRow.__table__, tt.runs
    q = (select(v.c.run_id, v.c.status, v.c.mechanism, v.c.detail, func.count())
         .select_from(v.join(m, m.c.run_id == v.c.run_id))
         .where(tt.verdict_filter(v))
         .group_by(v.c.run_id, v.c.status, v.c.mechanism, v.c.detail))
    return [tuple(r) for r in conn.execute(q)]


def pair_days(conn: Connection, tt: TempTables, targets: Sequence[str]) -> list[tuple[str, int, int, int, int]]:
    """(target, network, day, blocked, total) for a few targets: the per-target time lines."""
    if not targets:
        return []
    v, m = VerdictRow.__table__, tt.runs
    q = (select(v.c.target, m.c.net, m.c.day, func.sum(case((v.c.status == "blocked", 1), else_=0)), func.count())
         .select_from(v.join(m, m.c.run_id == v.c.run_id))
         .where(v.c.target.in_(list(targets)))
         .group_by(v.c.target, m.c.net, m.c.day))
    return [tuple(r) for r in conn.execute(q)]


def changes(conn: Connection, tt: TempTables) -> list[tuple[str, int, str, str]]:
    """Cells whose state differs between each network's latest run and the run before it:
    (target, network, before, now) as cell codes."""
    v, m = VerdictRow.__table__, tt.runs
    code = _state_code(v)
    now_c = func.max(case((m.c.role == 2, code), else_=0))
    before_c = func.max(case((m.c.role == 1, code), else_=0))
    q = (select(v.c.target, m.c.net, before_c, now_c)
         .select_from(v.join(m, m.c.run_id == v.c.run_id))
         .where(v.c.run_id.in_(sorted(tt.latest | tt.previous)), tt.verdict_filter(v))
         .group_by(v.c.target, m.c.net)
         .having(and_(before_c > 0, now_c > 0, before_c != now_c)))
    return [(t, n, STATE_CODES[int(b)], STATE_CODES[int(a)]) for t, n, b, a in conn.execute(q)]


def categories(conn: Connection, metas: Sequence[RunMeta], targets: set[str]) -> dict[str, str]:
    """Category per target URL, from the targets table of the latest runs of each network (a
    target's category does not change between runs; reading every run's copy would be a scan of
    runs x targets rows)."""
    per: dict[int, list[RunMeta]] = {}
    for mm in metas:
        per.setdefault(mm.net, []).append(mm)
    run_ids = sorted({r.id for ms in per.values() for r in sorted(ms, key=lambda x: x.rank)[-3:]})
    t = TargetRow.__table__
    out: dict[str, str] = {}
    for i in range(0, len(run_ids), 500):
        q = (select(t.c.url, func.max(t.c.category)).where(t.c.run_id.in_(run_ids[i:i + 500]))
             .group_by(t.c.url))
        for url, cat in conn.execute(q):
            if url in targets and cat:
                out[url] = cat
    return out


def stored_traces(conn: Connection, run_ids: Sequence[int]) -> list[dict[str, Any]]:
    from kzprobe.storage.models import TraceRow

    t = TraceRow.__table__
    out: list[dict[str, Any]] = []
    for i in range(0, len(run_ids), 900):
        for r in conn.execute(select(t.c.id, t.c.run_id, t.c.target, t.c.result)
                              .where(t.c.run_id.in_(list(run_ids[i:i + 900]))).order_by(t.c.id)):
            out.append({"id": r.id, "run_id": r.run_id, "target": r.target, **(r.result or {})})
    return out
