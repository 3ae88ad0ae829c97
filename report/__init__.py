"""kzprobe.report: the analyst's report over a whole database, across vantage networks and time.

``kzprobe report --format html`` writes one self-contained page (matrix, evidence, time,
mechanisms, the 2014 report's claims, TLS interception, blockpages, sources) and
``--format json`` the same aggregates.  Aggregation happens in the database (:mod:`.query`);
this package only shapes the grouped rows.
"""

from __future__ import annotations

import json
from typing import Any

from kzprobe.report.filters import Filters

__all__ = ["Filters", "build_report", "render_html_report", "render_json_report"]


def build_report(engine: Any, filters: Filters, **kw: Any) -> dict[str, Any]:
    from kzprobe.report.build import build

    return build(engine, filters, **kw)


def render_html_report(rep: dict[str, Any]) -> str:
    from kzprobe.report.html import render_html
    from kzprobe.report.plots import all_plots

    return render_html(rep, all_plots(rep))


def render_json_report(rep: dict[str, Any]) -> str:
    return json.dumps(rep, ensure_ascii=False, indent=1)
