"""One self-contained HTML file: CSS, JavaScript, data and SVG charts inline.

The Content-Security-Policy forbids every load: nothing from the network or the file system
(``default-src 'none'``), only the page's own script (by its hash) and inline styles (the SVG
charts carry style attributes), and images only as ``data:`` URLs.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
from importlib import resources
from typing import Any


def _asset(name: str) -> str:
    return resources.files("kzprobe.report").joinpath("assets", name).read_text(encoding="utf-8")


def csp(script: str) -> str:
    digest = base64.b64encode(hashlib.sha256(script.encode("utf-8")).digest()).decode()
    return ("default-src 'none'; script-src 'sha256-" + digest + "'; style-src 'unsafe-inline'; "
            "img-src data:; font-src 'none'; connect-src 'none'; frame-src 'none'; object-src 'none'; "
            "base-uri 'none'; form-action 'none'")


def embed_json(obj: Any) -> str:
    """JSON that cannot end its <script> element: every '<' is escaped (valid JSON, same value)."""
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).replace("<", "\\u003c")


def render_html(rep: dict[str, Any], plots: dict[str, str]) -> str:
    js = _asset("report.js")
    period = rep["period"]
    nets = rep["networks"]
    filters = rep.get("filters") or {}
    title = "kzprobe — website blocking report"
    if period["start"]:
        period_text = (f"From {period['start'][:10]} to {period['end'][:10]} (UTC): {period['runs']} runs on "
                       f"{len(nets)} vantage network(s).")
    else:
        period_text = "No run matches the filters."
    meta = f"{period_text} Generated {rep['generated']} by {rep['software']}."
    if filters:
        meta += " Filters: " + "; ".join(f"{k} = {', '.join(map(str, v)) if isinstance(v, list) else v}"
                                          for k, v in filters.items()) + "."
    lim = rep["limits"]
    footer = (f"{lim['cells']} cells; evidence embedded for {lim['evidence_full']} cells (every step) and "
              f"{lim['evidence_summary'] - lim['evidence_full']} more (verdict only). Built in "
              f"{lim['build_seconds']} s. Every verdict points at its observations in the database.")
    fields = {
        "csp": html.escape(csp(js)), "software": html.escape(rep["software"]), "title": html.escape(title),
        "meta": html.escape(meta), "period": html.escape(period_text), "footer": html.escape(footer),
        "css": _asset("report.css"), "js": js, "data": embed_json(rep),
        **{f"plot_{k}": v for k, v in plots.items()},
    }
    out = _asset("template.html")
    # One pass over the template's placeholders, so that nothing inserted is itself expanded.
    parts = out.split("{{")
    res = [parts[0]]
    for p in parts[1:]:
        name, sep, rest = p.partition("}}")
        res.append(fields[name] + rest if sep and name in fields else "{{" + p)
    return "".join(res)
