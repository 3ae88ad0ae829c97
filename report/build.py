"""Assemble the report's aggregates (the JSON the HTML page is drawn from, and what
``--format json`` writes)."""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from typing import Any

from sqlalchemy.engine import Engine

from kzprobe import __version__
from kzprobe.report import circumvention
from kzprobe.report import query as q
from kzprobe.report.claims import bare, claims_view
from kzprobe.report.evidence import evidence, observations_for, trace_view

#: Cells whose evidence (every observation) is embedded; the rest carry verdict, rule and
#: observation ids (``SUMMARY_LIMIT``) or just rule and verdict id.  Keeps a 200,000-cell matrix
#: under 10 MB.
EVIDENCE_LIMIT = 400
SUMMARY_LIMIT = 4000
#: (target, network) pairs drawn day by day in the time view.
TIMELINE_PAIRS = 24
MITM_DETAILS = ("dpi.tls_mitm",)
BLOCKPAGE_DETAILS = ("dns.blockpage", "dpi.blockpage")
VIEW_LIMIT = 1500


def build(engine: Engine, f: q.Filters, *, evidence_limit: int = EVIDENCE_LIMIT,
          summary_limit: int = SUMMARY_LIMIT, claims_list: str = "kz2014") -> dict[str, Any]:
    t0 = time.monotonic()
    clock = _Clock()
    with engine.connect() as conn:
        metas, nets = q.select_runs(conn, f)
        clock.lap("runs")
        domains = set()
        for d in f.domains:
            domains |= {d, bare(d), "www." + bare(d)}
        tt = q.TempTables(conn, metas, domains)
        clock.lap("temp")
        totals = q.matrix_totals(conn, tt)
        clock.lap("totals")
        blocked = q.blocked_cells(conn, tt)
        clock.lap("blocked")
        wanted = [(t, n) for t, per in totals.items() for n, k in enumerate(per) if k]
        latest = q.latest_cells(conn, tt, wanted)
        clock.lap("latest")
        per_run = q.per_run_counts(conn, tt)
        clock.lap("per_run")
        changed = q.changes(conn, tt)
        clock.lap("changes")

        targets = sorted(totals, key=lambda u: (_host(u), u))
        tindex = {u: i for i, u in enumerate(targets)}
        cats = q.categories(conn, metas, set(targets))
        clock.lap("categories")
        cells = _cells(totals, blocked, latest, tindex)
        blocked_ids = [c["vid"] for c in cells if c["code"] in "dipb"]
        light = q.latest_verdicts(conn, blocked_ids)
        clock.lap("details")
        for c in cells:
            v = light.get(c["vid"])
            if v is not None:
                c["detail"], c["rule"], c["mechanism"], c["run"] = v["detail"], v["rule"], v["mechanism"], v["run_id"]

        traces = q.stored_traces(conn, [m.id for m in metas])
        ev_cells = _pick_evidence(cells, targets, summary_limit)
        full = q.latest_verdicts(conn, [c["vid"] for c in ev_cells], full=True)
        evid: dict[str, Any] = {}
        for i, c in enumerate(ev_cells):
            v = full.get(c["vid"])
            if v is None:
                continue
            if i < evidence_limit:
                evid[str(c["vid"])] = evidence(conn, v, targets[c["t"]], traces)
            else:
                evid[str(c["vid"])] = {k: v[k] for k in ("rule", "confidence", "sentence", "observations")} | {
                    "verdict": v["id"], "run": v["run_id"], "detail": v["detail"], "status": v["status"],
                    "summary_only": True}
        issuers = _issuers(conn, cells, targets, nets)
        clock.lap("evidence")
        blockpages = _blockpages(conn, cells, targets, nets)
        tdays = _pair_days(conn, tt, cells, targets)
        circ = circumvention.view(conn, cells, targets, cats, nets, tt)
        clock.lap("views")
        basis = "each network's previous run"
        if f.since is not None and metas:
            # A bounded period: compare with the period of the same length just before it.
            changed, basis = _previous_period(conn, f, metas, nets, cells, targets, domains)
            clock.lap("previous_period")

    net_dicts = [n.to_dict() for n in nets]
    by_dom: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for c in cells:
        by_dom[bare(_host(targets[c["t"]]))].append(_cell_public(c, targets))
    traces_by_dom: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for t in traces:
        traces_by_dom[bare(str(t.get("target") or ""))].append(trace_view(t))
    claims = claims_view(by_dom, net_dicts, traces_by_dom, claims_list)

    return {
        "kind": "kzprobe-report", "version": 1, "software": f"kzprobe {__version__}",
        "generated": q.iso(time.time()), "filters": f.describe(),
        "period": {"start": q.iso(min((m.started for m in metas), default=None)),
                   "end": q.iso(max((m.started for m in metas), default=None)), "runs": len(metas)},
        "networks": net_dicts,
        "summary": _summary(cells, targets, nets, changed, basis),
        "matrix": _matrix(cells, targets, cats, nets),
        "evidence": evid,
        "time": _time(per_run, metas, nets, cells, targets, tdays),
        "mechanisms": _mechanisms(cells, nets),
        "claims": claims,
        "tls_interception": issuers,
        "blockpages": blockpages,
        "circumvention": circ,
        "sources": _sources(per_run, metas, nets, cells),
        "cross_source": _cross_source(cells, targets, nets),
        "traces": [trace_view(t) for t in traces][:200],
        "limits": {"evidence_full": min(evidence_limit, len(ev_cells)), "evidence_summary": len(evid),
                   "cells": len(cells), "build_seconds": round(time.monotonic() - t0, 2),
                   "seconds": clock.laps},
    }


class _Clock:
    """Wall and CPU time per build step, reported in the JSON (where the 30 s go on a big database)."""

    def __init__(self) -> None:
        self.t, self.c = time.monotonic(), time.process_time()
        self.laps: dict[str, list[float]] = {}

    def lap(self, name: str) -> None:
        now, cpu = time.monotonic(), time.process_time()
        self.laps[name] = [round(now - self.t, 3), round(cpu - self.c, 3)]
        self.t, self.c = now, cpu


def _host(url: str) -> str:
    from kzprobe.model import Target

    return Target(url).host or url


_STATUS = {"o": "ok", "w": "down", "u": "inconclusive", ".": "inconclusive"}


def _cells(totals: dict[str, list[int]], blocked: list[tuple[str, int, int, float, float]],
           latest: dict[tuple[str, int], tuple[str, int]], tindex: dict[str, int]) -> list[dict[str, Any]]:
    bl = {(t, int(n)): (int(k), first, last) for t, n, k, first, last in blocked}
    out = []
    for target, per in totals.items():
        for net, total in enumerate(per):
            if not total:
                continue
            code, vid = latest.get((target, net), (q.NO_DATA, 0))
            k, first, last = bl.get((target, net), (0, None, None))
            out.append({"t": tindex[target], "net": net, "total": total, "blocked": k, "code": code, "vid": vid,
                        "first": first, "last": last,
                        "status": _STATUS.get(code, "blocked"),
                        "mechanism": {"d": "dns", "i": "ip", "p": "dpi"}.get(code), "detail": None, "rule": None})
    out.sort(key=lambda c: (c["t"], c["net"]))
    return out


def _cell_public(c: dict[str, Any], targets: list[str]) -> dict[str, Any]:
    return {"net": c["net"], "status": c["status"], "mechanism": c["mechanism"], "detail": c["detail"],
            "blocked": c["blocked"], "total": c["total"], "vid": c["vid"], "last": c["last"],
            "target": targets[c["t"]]}


def _pick_evidence(cells: list[dict[str, Any]], targets: list[str], limit: int) -> list[dict[str, Any]]:
    """Which cells carry evidence, most telling first: every cell of a small database; else the
    cells blocked now, those of claimed sites first, then the most often blocked."""
    if len(cells) <= limit:
        return sorted(cells, key=lambda c: (c["code"] not in "dipb", -c["blocked"], c["t"], c["net"]))
    from kzprobe.targets import load_builtin

    claimed = {bare(t.host) for t in load_builtin("kz2014") if t.claim}
    pick = [c for c in cells if c["code"] in "dipb"]
    pick.sort(key=lambda c: (bare(_host(targets[c["t"]])) not in claimed, -c["blocked"], c["t"], c["net"]))
    return pick[:limit]


def _matrix(cells: list[dict[str, Any]], targets: list[str], cats: dict[str, str],
            nets: list[q.Network]) -> dict[str, Any]:
    """Columnar, so 200,000 cells stay small: per network a string of state codes (one character
    per target), the totals and the blocked counts; blocked cells' details sparsely."""
    n_t, n_n = len(targets), len(nets)
    codes = [[q.NO_DATA] * n_t for _ in range(n_n)]
    totals = [[0] * n_t for _ in range(n_n)]
    blocked = [[0] * n_t for _ in range(n_n)]
    details: list[str] = []
    rules: list[str] = []
    didx: dict[str, int] = {}
    ridx: dict[str, int] = {}
    sparse = []
    for c in cells:
        codes[c["net"]][c["t"]] = c["code"]
        totals[c["net"]][c["t"]] = c["total"]
        blocked[c["net"]][c["t"]] = c["blocked"]
        if c["blocked"] or c["code"] in "dipb" or n_t * n_n <= 5000:
            d = c["detail"] or ""
            r = c["rule"] or ""
            sparse.append([c["t"], c["net"], c["vid"], didx.setdefault(d, len(didx)), ridx.setdefault(r, len(ridx)),
                           int(c["first"] // q.DAY) if c["first"] else None,
                           int(c["last"] // q.DAY) if c["last"] else None])
    details = list(didx)
    rules = list(ridx)
    catlist = sorted(set(cats.values()))
    cidx = {c: i for i, c in enumerate(catlist)}
    return {
        "targets": [[u, _host(u), cidx.get(cats.get(u, ""), -1)] for u in targets],
        "categories": catlist, "codes": ["".join(c) for c in codes], "totals": totals, "blocked": blocked,
        "details": details, "rules": rules, "cells": sparse,
    }


def _previous_period(conn: Any, f: q.Filters, metas: list[q.RunMeta], nets: list[q.Network],
                     cells: list[dict[str, Any]], targets: list[str],
                     domains: set[str]) -> tuple[list[tuple[str, int, str, str]], str]:
    """Cells whose latest state in the previous period (same length, just before) differs from
    their latest state now: (target, network, before, now)."""
    import dataclasses

    since = float(f.since or 0)
    end = f.until if f.until is not None else max(m.started for m in metas) + 1
    prev = dataclasses.replace(f, runs=(), since=since - (end - since), until=since)
    metas_p, nets_p = q.select_runs(conn, prev)
    basis = f"the previous period ({q.iso(prev.since)} to {q.iso(since)})"
    if not metas_p:
        return [], basis
    key_p = {n.key: i for i, n in enumerate(nets_p)}
    tt = q.TempTables(conn, metas_p, domains)
    wanted = [(targets[c["t"]], key_p[nets[c["net"]].key]) for c in cells if nets[c["net"]].key in key_p]
    before = q.latest_cells(conn, tt, wanted)
    out = []
    for c in cells:
        ni = key_p.get(nets[c["net"]].key)
        old = before.get((targets[c["t"]], ni)) if ni is not None else None
        if old is not None and old[0] != c["code"]:
            out.append((targets[c["t"]], c["net"], old[0], c["code"]))
    return out, basis


def _summary(cells: list[dict[str, Any]], targets: list[str], nets: list[q.Network],
             changed: list[tuple[str, int, str, str]], basis: str) -> dict[str, Any]:
    status = Counter(c["status"] for c in cells)
    by_mech: dict[str, set[int]] = defaultdict(set)
    for c in cells:
        if c["status"] == "blocked":
            by_mech[c["mechanism"] or "other"].add(c["t"])
    newly = [ch for ch in changed if ch[2] not in "dipb" and ch[3] in "dipb"]
    lifted = [ch for ch in changed if ch[2] in "dipb" and ch[3] not in "dipb"]
    return {
        "targets": len(targets), "networks": len(nets), "cells": len(cells),
        "measurements": sum(c["total"] for c in cells),
        "cells_by_status": dict(status),
        "targets_blocked_by_mechanism": {k: len(v) for k, v in sorted(by_mech.items())},
        "targets_blocked_anywhere": len({c["t"] for c in cells if c["status"] == "blocked"}),
        "changes": {"basis": basis, "newly_blocked": len(newly), "unblocked": len(lifted),
                    "other": len(changed) - len(newly) - len(lifted),
                    "rows": [{"target": t, "net": n, "before": b, "now": a} for t, n, b, a in changed[:300]]},
    }


def _time(per_run: list[tuple[int, str, str | None, str | None, int]], metas: list[q.RunMeta],
          nets: list[q.Network], cells: list[dict[str, Any]], targets: list[str],
          tdays: list[tuple[str, int, int, int, int]]) -> dict[str, Any]:
    run_of = {m.id: m for m in metas}
    agg: dict[tuple[int, int], list[int]] = defaultdict(lambda: [0, 0])
    for rid, status, _mech, _det, n in per_run:
        m = run_of[rid]
        a = agg[(m.net, m.day)]
        a[1] += n
        if status == "blocked":
            a[0] += n
    days = sorted({d for _, d in agg})
    series = []
    for ni in range(len(nets)):
        pts = [[d, agg[(ni, d)][0], agg[(ni, d)][1]] for d in days if (ni, d) in agg]
        series.append({"net": ni, "points": pts})
    blocks = sorted((c for c in cells if c["blocked"]), key=lambda c: (-c["blocked"], c["t"], c["net"]))
    block_rows = [{"target": targets[c["t"]], "net": c["net"], "first": q.iso(c["first"]), "last": q.iso(c["last"]),
                   "blocked": c["blocked"], "total": c["total"], "now": c["status"], "detail": c["detail"],
                   "ongoing": c["status"] == "blocked"} for c in blocks[:VIEW_LIMIT]]
    pairs: dict[tuple[str, int], list[list[int]]] = defaultdict(list)
    for t, ni, d, b, n in tdays:
        pairs[(t, int(ni))].append([int(d), int(b), int(n)])
    return {"days": days, "series": series, "blocks": block_rows, "blocks_total": len(blocks),
            "pairs": [{"target": t, "net": ni, "points": sorted(p)} for (t, ni), p in pairs.items()]}


def _pair_days(conn: Any, tt: q.TempTables, cells: list[dict[str, Any]],
               targets: list[str]) -> list[tuple[str, int, int, int, int]]:
    top = sorted((c for c in cells if c["blocked"]), key=lambda c: (-c["blocked"], c["t"]))
    names = list(dict.fromkeys(targets[c["t"]] for c in top))[:TIMELINE_PAIRS]
    return q.pair_days(conn, tt, names)


def _mechanisms(cells: list[dict[str, Any]], nets: list[q.Network]) -> dict[str, Any]:
    per: dict[int, Counter[str]] = defaultdict(Counter)
    for c in cells:
        if c["status"] == "blocked":
            per[c["net"]][c["detail"] or f"{c['mechanism'] or 'blocked'}.?"] += 1
    details = sorted({d for cnt in per.values() for d in cnt})
    return {"details": details, "per_network": [{"net": ni, "counts": dict(per[ni])} for ni in range(len(nets))]}


def _sources(per_run: list[tuple[int, str, str | None, str | None, int]], metas: list[q.RunMeta],
             nets: list[q.Network], cells: list[dict[str, Any]]) -> list[dict[str, Any]]:
    run_of = {m.id: m for m in metas}
    out = []
    for src in ("live", "pcap", "ooni"):
        idx = {i for i, n in enumerate(nets) if n.source == src}
        status: Counter[str] = Counter()
        for rid, st, _m, _d, n in per_run:
            if run_of[rid].source == src:
                status[st] += n
        mine = [c for c in cells if c["net"] in idx]
        out.append({"source": src, "runs": sum(1 for m in metas if m.source == src),
                    "networks": [nets[i].name for i in sorted(idx)],
                    "targets": len({c["t"] for c in mine}), "measurements": sum(status.values()),
                    "by_status": dict(status),
                    "blocked_now": sum(1 for c in mine if c["status"] == "blocked"),
                    "states": {s: n for s, n in Counter(m.state for m in metas if m.source == src).items()}})
    return out


def _cross_source(cells: list[dict[str, Any]], targets: list[str], nets: list[q.Network]) -> list[dict[str, Any]]:
    """Sites measured by more than one source (live, pcap, OONI), each source's latest verdicts
    side by side: the same site seen three ways."""
    per: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    for c in cells:
        label = c["status"] + (f"/{c['mechanism']}" if c["mechanism"] else "")
        per[bare(_host(targets[c["t"]]))][nets[c["net"]].source].append(f"{label} ({nets[c['net']].name})")
    rows = [{"domain": d, "sources": {s: sorted(set(v)) for s, v in by.items()}}
            for d, by in sorted(per.items()) if len(by) > 1]
    return rows[:VIEW_LIMIT]


def _step_cells(cells: list[dict[str, Any]], details: tuple[str, ...]) -> list[dict[str, Any]]:
    return [c for c in cells if c["detail"] in details and c.get("run") is not None][:VIEW_LIMIT]


def _issuers(conn: Any, cells: list[dict[str, Any]], targets: list[str], nets: list[q.Network]) -> list[dict[str, Any]]:
    """Issuers of the certificates an interceptor presented, per network (latest verdicts)."""
    seen: dict[tuple[int, str], dict[str, Any]] = {}
    for c in _step_cells(cells, MITM_DETAILS):
        for s in observations_for(conn, c["run"], targets[c["t"]]):
            if s["step"] != "tls" or s["vantage"] != "probe":
                continue
            iss = s["data"].get("issuer")
            if not iss or s["data"].get("cert_valid") is not False:
                continue
            row = seen.setdefault((c["net"], iss), {"net": c["net"], "issuer": iss, "targets": [], "chain": [],
                                                    "cert_failure": s["data"].get("cert_failure")})
            if targets[c["t"]] not in row["targets"]:
                row["targets"].append(targets[c["t"]])
            if not row["chain"]:
                row["chain"] = s["data"].get("certificates") or []
    return sorted(seen.values(), key=lambda r: (r["net"], r["issuer"]))


def _blockpages(conn: Any, cells: list[dict[str, Any]], targets: list[str],
                nets: list[q.Network]) -> list[dict[str, Any]]:
    """Blockpage fingerprints seen, with the page's title and a text sample, per network."""
    seen: dict[str, dict[str, Any]] = {}
    for c in _step_cells(cells, BLOCKPAGE_DETAILS):
        for s in observations_for(conn, c["run"], targets[c["t"]]):
            fp = s["data"].get("blockpage") if s["step"] == "http" and s["vantage"] == "probe" else None
            if not fp:
                continue
            row = seen.setdefault(fp, {"fingerprint": fp, "title": s["data"].get("title") or "",
                                       "sample": _text_sample(s["data"].get("body_head") or ""),
                                       "status": s["data"].get("status"), "networks": {}, "observation": s["id"]})
            row["networks"].setdefault(str(c["net"]), [])
            if targets[c["t"]] not in row["networks"][str(c["net"])]:
                row["networks"][str(c["net"])].append(targets[c["t"]])
    return sorted(seen.values(), key=lambda r: r["fingerprint"])


def _text_sample(html: str) -> str:
    import re

    text = re.sub(r"(?is)<(script|style)\b.*?</\1\s*>", " ", html[:4096])
    text = re.sub(r"(?s)<[^>]*>", " ", text)
    return " ".join(text.split())[:240]
