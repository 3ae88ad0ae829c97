"""The report's circumvention section (issue 15, acceptance 4): Tor's relays and directories,
messaging endpoints, proxies and circumvention sites, per vantage network; and the 2014 report's
three claims about them (Tor's DPI finding, footnote 94; proxies blocked while Opera and VPNs
worked, footnotes 92-93; the 13 February 2014 WhatsApp/Viber outage, footnote 32) set beside
what was measured.

Input is the matrix's cells (already aggregated in the database); the only queries here are
bounded ones: the sentences of the blocked cells shown, and the time span of the messaging
endpoints' failures (one GROUP BY over those few targets), which is what tells a time-boxed
outage from a lasting block.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from sqlalchemy import Connection, and_, func, select

from kzprobe.model import Target
from kzprobe.report import query as q
from kzprobe.storage.models import ObservationRow, VerdictRow

GROUPS = ("tor", "messaging", "proxies")
TOR_KINDS = ("tor-or", "tor-dir", "obfs4")
#: Details this section names (CONTRACTS.md, "Verdicts of the new kinds").
KEY_DETAILS = ("dpi.tls_fingerprint", "ip.tcp_timeout", "ip.tcp_refused", "dpi.proxy_connect")
#: Rows shown (20 networks x 500 rows stay well under a megabyte), and blocked cells whose
#: sentence is embedded (the sentence names the hello).
ROW_LIMIT = 500
SENTENCE_LIMIT = 400
#: Messaging targets whose failure times are read for the outage view.
OUTAGE_TARGET_LIMIT = 2000
#: The report's outage: "unavailable for nearly 1.5 hours".
OUTAGE_REPORTED_S = 90 * 60


def _builtin() -> dict[str, tuple[str, str, Any]]:
    """Canonical URL -> (list, role, claim) for the three built-in lists of issue 15."""
    from kzprobe.targets import load_builtin, load_builtin_roles
    from kzprobe.targets._urls import check_url

    out: dict[str, tuple[str, str, Any]] = {}
    for name in ("tor", "messaging", "circumvention"):
        roles = load_builtin_roles(name)
        for t in load_builtin(name):
            out.setdefault(check_url(t.url), (name, roles.get(t.url, "censored"), t.claim))
    return out


def _key(url: str) -> str:
    from kzprobe.targets._urls import URLProblem, check_url

    try:
        return check_url(url)
    except URLProblem:
        return url


def group_of(url: str, category: str, listed: tuple[str, str, Any] | None) -> str | None:
    """Which part of the section a target belongs to, or None (an ordinary web target)."""
    kind = Target(url).kind
    if kind in TOR_KINDS:
        return "tor"
    if kind == "proxy+http":
        return "proxies"
    if listed is not None:
        return {"tor": "tor", "messaging": "messaging", "circumvention": "proxies"}[listed[0]]
    if kind in ("tcp", "udp-dns"):
        return "messaging"
    if category == "ANON":
        return "proxies"
    return None


def view(conn: Connection, cells: list[dict[str, Any]], targets: list[str], cats: dict[str, str],
         nets: list[q.Network], tt: q.TempTables) -> dict[str, Any]:
    builtin = _builtin()
    # Per target, not per cell: a big database has 20 cells per target and 10,000 targets.
    placed: dict[int, tuple[str, tuple[str, str, Any] | None]] = {}
    ordinary: set[int] = set()
    mine: dict[int, list[dict[str, Any]]] = {}
    for c in cells:
        t = c["t"]
        if t in ordinary:
            continue
        if t not in placed:
            url = targets[t]
            listed = builtin.get(_key(url))
            group = group_of(url, cats.get(url, ""), listed)
            if group is None:
                ordinary.add(t)
                continue
            placed[t] = (group, listed)
        mine.setdefault(t, []).append(c)
    # Within the size budget, the non-web kinds and the built-in lists' entries first, then the
    # ANON sites most often blocked (a big database may hold thousands of those).
    def priority(t: int) -> tuple[int, int, int]:
        special = Target(targets[t]).kind != "url" or placed[t][1] is not None
        return (0 if special else 1, -sum(c["blocked"] for c in mine[t]), t)

    rows: dict[int, dict[str, Any]] = {}
    for t in sorted(mine, key=priority)[:ROW_LIMIT]:
        group, listed = placed[t]
        url = targets[t]
        claim = listed[2] if listed else None
        rows[t] = {
            "t": t, "target": url, "kind": Target(url).kind, "group": group,
            "role": listed[1] if listed else ("censored" if group != "messaging" else "listed"),
            "claim": claim.to_dict() if claim else None,
            # Compact: the matrix holds the rest (rule, days); first/last only where blocked.
            "cells": [{"net": c["net"], "status": c["status"], "mechanism": c["mechanism"], "detail": c["detail"],
                       "blocked": c["blocked"], "total": c["total"], "vid": c["vid"],
                       **({"first": q.iso(c["first"]), "last": q.iso(c["last"])} if c["blocked"] else {})}
                      for c in mine[t]]}
    _sentences(conn, list(rows.values()))
    out_rows = sorted(rows.values(), key=lambda r: (GROUPS.index(r["group"]), r["kind"], r["target"]))
    outage = _outage(conn, tt, [r["target"] for r in out_rows if r["group"] == "messaging"], nets)
    return {
        "rows": out_rows, "rows_total": len(mine),
        "groups": {g: _group_summary([r for r in out_rows if r["group"] == g], nets) for g in GROUPS},
        "claims": _claims(out_rows, nets, outage),
        "outage": outage,
        "key_details": list(KEY_DETAILS),
    }


def _sentences(conn: Connection, rows: list[dict[str, Any]]) -> None:
    """The verdict sentence of blocked cells: for dpi.tls_fingerprint it names which ClientHello
    was blocked, which is the point of the finding."""
    cells = [c for r in rows for c in r["cells"] if c["status"] == "blocked" and c["vid"]][:SENTENCE_LIMIT]
    full = q.latest_verdicts(conn, [c["vid"] for c in cells], full=True)
    for c in cells:
        v = full.get(c["vid"])
        if v is not None:
            c["sentence"] = v.get("sentence") or ""
            c["run"] = v.get("run_id")


def _group_summary(rows: list[dict[str, Any]], nets: list[q.Network]) -> list[dict[str, Any]]:
    """Per network: targets measured, ok, blocked now by detail."""
    out = []
    for ni in range(len(nets)):
        mine = [c for r in rows for c in r["cells"] if c["net"] == ni]
        if not mine:
            continue
        details = Counter((c["detail"] or c["mechanism"] or "blocked") for c in mine if c["status"] == "blocked")
        out.append({"net": ni, "measured": len(mine), "ok": sum(c["status"] == "ok" for c in mine),
                    "blocked": sum(c["status"] == "blocked" for c in mine),
                    "other": sum(c["status"] in ("down", "inconclusive") for c in mine), "details": dict(details)})
    return out


def _outage(conn: Connection, tt: q.TempTables, messaging: list[str], nets: list[q.Network]) -> list[dict[str, Any]]:
    """Per network, when the messaging endpoints' probe-side steps failed in blocked verdicts, and
    when they were measured fine: a block with fine measurements after it has ended (time-boxed,
    like the report's outage); one without is still on."""
    if not messaging:
        return []
    v, m, o = VerdictRow.__table__, tt.runs, ObservationRow.__table__
    names = messaging[:OUTAGE_TARGET_LIMIT]
    span: dict[int, dict[str, Any]] = {}
    for status, failed in (("blocked", True), ("ok", False)):
        cond = [v.c.status == status, v.c.target.in_(names), o.c.vantage == "probe"]
        if failed:
            cond.append(o.c.failure.is_not(None))
        stmt = (select(m.c.net, func.min(o.c.t_start), func.max(o.c.t_end), func.count(func.distinct(v.c.target)))
                .select_from(v.join(m, m.c.run_id == v.c.run_id)
                             .join(o, and_(o.c.run_id == v.c.run_id, o.c.target == v.c.target)))
                .where(*cond).group_by(m.c.net))
        for net, t0, t1, n in conn.execute(stmt):
            span.setdefault(int(net), {})[status] = (t0, t1, int(n))
    out = []
    for ni in sorted(span):
        s = span[ni]
        row: dict[str, Any] = {"net": ni, "blocked_targets": 0, "ok_targets": 0}
        if "ok" in s:
            row["ok_from"], row["ok_until"], row["ok_targets"] = q.iso(s["ok"][0]), q.iso(s["ok"][1]), s["ok"][2]
        if "blocked" in s:
            b0, b1, n = s["blocked"]
            row.update({"blocked_from": q.iso(b0), "blocked_until": q.iso(b1), "blocked_targets": n,
                        "minutes": round((b1 - b0) / 60, 1)})
            ok = s.get("ok")
            row["ended"] = bool(ok and ok[1] > b1)  # measured fine after the last failure
            row["began_after_ok"] = bool(ok and ok[0] < b0)
        out.append(row)
    return out


def _tor_agreement(cells: list[dict[str, Any]]) -> tuple[str, str]:
    judged = [c for c in cells if c["status"] in ("ok", "blocked")]
    if not judged:
        return "not measured", "no Tor relay or directory measured with a conclusive verdict"
    dpi = [c for c in judged if c["status"] == "blocked" and c["mechanism"] == "dpi"]
    blocked = [c for c in judged if c["status"] == "blocked"]
    if dpi:
        det = ", ".join(sorted({c["detail"] or "dpi" for c in dpi}))
        return "agrees", f"{len(dpi)} of {len(judged)} Tor target(s) blocked by DPI ({det}), as Tor reported"
    if blocked:
        mech = ", ".join(sorted({c["detail"] or c["mechanism"] or "?" for c in blocked}))
        return "differs", f"{len(blocked)} of {len(judged)} blocked, but by {mech}, not DPI"
    return "differs", f"all {len(judged)} Tor target(s) reachable"


def _proxy_agreement(cells: list[dict[str, Any]], control: bool) -> tuple[str, str]:
    judged = [c for c in cells if c["status"] in ("ok", "blocked")]
    if not judged:
        return "not measured", "nothing measured with a conclusive verdict"
    blocked = [c for c in judged if c["status"] == "blocked"]
    if control:
        if blocked:
            return "differs", f"{len(blocked)} of {len(judged)} blocked: the report says these still worked"
        return "agrees", f"all {len(judged)} reachable, as the report says"
    if blocked:
        det = ", ".join(sorted({c["detail"] or c["mechanism"] or "?" for c in blocked}))
        return "agrees", f"{len(blocked)} of {len(judged)} blocked ({det})"
    return "differs", f"all {len(judged)} reachable"


def _outage_agreement(row: dict[str, Any] | None) -> tuple[str, str]:
    if row is None:
        return "not measured", "no messaging endpoint measured"
    if not row.get("blocked_targets"):
        return "differs", f"no outage: {row['ok_targets']} endpoint(s) measured fine, none blocked"
    when = f"{row['blocked_targets']} endpoint(s) failed from {row['blocked_from']} to {row['blocked_until']}"
    if row.get("ended"):
        return "agrees", (f"a time-boxed outage: {when} (≈{row['minutes']} min; the report's lasted about "
                          f"{OUTAGE_REPORTED_S // 60} min), and measured fine again afterwards")
    return "differs", f"{when}, and not measured fine since: a lasting block, not an outage"


def _claims(rows: list[dict[str, Any]], nets: list[q.Network], outage: list[dict[str, Any]]) -> list[dict[str, Any]]:
    from kzprobe.targets import shared_claim

    tor_cells = [c for r in rows if r["group"] == "tor" and r["kind"] in TOR_KINDS for c in r["cells"]]
    prox = [r for r in rows if r["group"] == "proxies"]
    blocked_side = [c for r in prox if r["role"] != "control" for c in r["cells"]]
    open_side = [c for r in prox if r["role"] == "control" for c in r["cells"]]
    msg = {o["net"]: o for o in outage}
    specs = [
        ("tor-dpi", shared_claim("tor", "tor-dpi"), "Tor's OR ports and directories",
         lambda ni: _tor_agreement([c for c in tor_cells if c["net"] == ni])),
        ("proxies-blocked", shared_claim("circumvention", "anonymizers"),
         "proxy sites, proxies and circumvention software",
         lambda ni: _proxy_agreement([c for c in blocked_side if c["net"] == ni], control=False)),
        ("opera-vpn-open", shared_claim("circumvention", "opera"), "Opera's proxies and VPN providers",
         lambda ni: _proxy_agreement([c for c in open_side if c["net"] == ni], control=True)),
        ("messaging-outage", shared_claim("messaging", "outage-2014-02-13"),
         "WhatsApp, Viber, Telegram and Signal endpoints",
         lambda ni: _outage_agreement(msg.get(ni))),
    ]
    out = []
    for key, claim, what, judge in specs:
        per = []
        for ni in range(len(nets)):
            agreement, why = judge(ni)
            per.append({"net": ni, "agreement": agreement, "why": why})
        votes = {p["agreement"] for p in per} - {"not measured"}
        summary = "not measured" if not votes else (votes.pop() if len(votes) == 1 else "mixed")
        out.append({"key": key, "what": what, **claim.to_dict(), "measured": per, "summary": summary})
    return out

