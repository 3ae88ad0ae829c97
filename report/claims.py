"""The 2014 report's claims beside what was measured, per network.

The claims are the built-in list's (``targets/kz2014.toml``: quote, section, footnote, dates, the
mechanism the report names, and whether the report calls the site blocked or accessible).  They
are matched to measured cells by domain, ignoring a leading ``www.``, since a lab run or an OONI
measurement may use another URL for the same site.
"""

from __future__ import annotations

from typing import Any

#: What the report's words about a mechanism say, in kzprobe's terms.  "domain-based" means the
#: block reads the name (resolver or DPI of SNI / Host), not the address.
DOMAIN_BASED = ("dns", "dpi")


def bare(domain: str) -> str:
    d = domain.lower().rstrip(".")
    return d[4:] if d.startswith("www.") else d


def agreement(role: str, claim_mechanism: str, status: str | None, mechanism: str | None) -> tuple[str, str]:
    """(agrees | differs | not measured, why) for one claim on one network."""
    if status is None:
        return "not measured", "no measurement of this site on this network"
    if status in ("down", "inconclusive"):
        return "not measured", f"the measurement is {status}: it says nothing about blocking"
    if role == "control":
        if status == "ok":
            return "agrees", "accessible, as the report says"
        return "differs", "the report names it accessible; it is blocked here"
    if status == "ok":
        return "differs", "the report says blocked; it is reachable here"
    cm = claim_mechanism.lower()
    if "domain" in cm:
        if mechanism in DOMAIN_BASED:
            return "agrees", f"blocked by name ({mechanism}), not by address, as the report says"
        return "differs", f"blocked by {mechanism or 'an unknown mechanism'}, but the report says by domain name"
    if "dpi" in cm:
        if mechanism == "dpi":
            return "agrees", "blocked by DPI, as the report says"
        return "differs", f"blocked by {mechanism}, but the report says DPI"
    return "agrees", "blocked, as the report says" + (f" (mechanism: {mechanism})" if mechanism else "")


def claims_view(cells_by_domain: dict[str, list[dict[str, Any]]], networks: list[dict[str, Any]],
                traces_by_domain: dict[str, list[dict[str, Any]]], list_name: str = "kz2014") -> list[dict[str, Any]]:
    """One row per claim: the claim, then per network the measured state and the agreement."""
    from kzprobe.targets import load_builtin, load_builtin_roles

    roles = load_builtin_roles(list_name)
    rows: list[dict[str, Any]] = []
    for t in load_builtin(list_name):
        if t.claim is None:
            continue
        dom = bare(t.host)
        role = roles.get(t.url, "censored")
        measured = []
        cells = cells_by_domain.get(dom, [])
        for ni in range(len(networks)):
            mine = [c for c in cells if c["net"] == ni]
            # Several URLs of one site on one network: the one measured most often speaks for it.
            c = max(mine, key=lambda c: (c["total"], c["last"] or 0), default=None)
            verdict, how = agreement(role, t.claim.mechanism, c["status"] if c else None,
                                     c["mechanism"] if c else None)
            measured.append({
                "net": ni, "status": c["status"] if c else None, "mechanism": c["mechanism"] if c else None,
                "detail": c["detail"] if c else None, "blocked": c["blocked"] if c else 0,
                "total": c["total"] if c else 0, "verdict": c["vid"] if c else None,
                "target": c["target"] if c else None, "agreement": verdict, "why": how,
            })
        traces = traces_by_domain.get(dom, [])
        rows.append({
            "url": t.url, "domain": dom, "role": role, "category": t.category, "quote": t.claim.quote,
            "section": t.claim.section, "footnote": t.claim.footnote, "dates": t.claim.dates,
            "mechanism": t.claim.mechanism, "notes": t.notes, "measured": measured, "traces": traces,
            "summary": summarise(measured),
        })
    return rows


def summarise(measured: list[dict[str, Any]]) -> str:
    votes = [m["agreement"] for m in measured if m["agreement"] != "not measured"]
    if not votes:
        return "not measured"
    if all(v == "agrees" for v in votes):
        return "agrees"
    if all(v == "differs" for v in votes):
        return "differs"
    return "mixed"
