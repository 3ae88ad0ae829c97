"""The report's charts: matplotlib figures rendered to inline SVG.

Text is rendered as paths (``svg.fonttype = path``) from DejaVu Sans, so labels in Cyrillic
read the same on a machine without the font, and the page needs no font file.  Colours are
Okabe and Ito's colour-blind-safe set; the heat map uses cividis (designed for colour-vision
deficiency).  Each SVG's ids are prefixed, since several SVGs share one HTML document.
"""

from __future__ import annotations

import datetime as dt
import io
import re
from typing import Any

#: Okabe & Ito (2008), "Color Universal Design": distinguishable under the common deficiencies.
OKABE_ITO = ["#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#000000"]
#: Status colours, shared with the page's CSS.
STATUS_COLOURS = {"ok": "#009E73", "blocked": "#D55E00", "down": "#999999", "inconclusive": "#CC79A7"}
LINESTYLES = ["-", "--", ":", "-."]
MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*"]

_RC: Any = {
    "svg.fonttype": "path",
    "svg.hashsalt": "kzprobe-report",
    "font.family": "DejaVu Sans",
    "font.size": 9,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.titlesize": 10,
    "axes.titleweight": "bold",
    "axes.titlelocation": "left",
    "axes.grid": True,
    "grid.color": "#e4e4e4",
    "grid.linewidth": 0.6,
    "legend.frameon": False,
    "svg.image_inline": True,
}


def _svg(fig: Any, prefix: str) -> str:
    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight", metadata={"Date": None, "Creator": None})
    s = buf.getvalue()
    s = s[s.index("<svg"):]
    s = re.sub(r'\bid="([^"]+)"', lambda m: f'id="{prefix}-{m.group(1)}"', s)
    s = re.sub(r"url\(#([^)]+)\)", lambda m: f"url(#{prefix}-{m.group(1)})", s)
    s = re.sub(r'href="#([^"]+)"', lambda m: f'href="#{prefix}-{m.group(1)}"', s)
    return s.replace("<svg ", f'<svg class="plot" data-plot="{prefix}" role="img" ', 1)


def _figure(w: float, h: float) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(w, h), dpi=100, layout="constrained")


def _day(d: int) -> dt.date:
    return dt.date(1970, 1, 1) + dt.timedelta(days=int(d))


def _net_label(n: dict[str, Any]) -> str:
    extra = " ".join(x for x in (n.get("asn"), n.get("country")) if x)
    src = "" if n.get("source") == "live" else f" [{n.get('source')}]"
    return f"{n['name']}{src}" + (f" ({extra})" if extra else "")


def _no_data(ax: Any, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="#666666")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.grid(False)


def time_plot(rep: dict[str, Any]) -> str:
    """Blocked share per network over time (one line per network)."""
    import matplotlib
    from matplotlib.dates import AutoDateLocator, ConciseDateFormatter

    nets = rep["networks"]
    with matplotlib.rc_context(_RC):
        fig = _figure(9.5, 3.6)
        ax = fig.add_subplot()
        drawn = 0
        for s in rep["time"]["series"]:
            pts = [(p[0], p[1] / p[2]) for p in s["points"] if p[2]]
            if not pts:
                continue
            i = s["net"]
            ax.plot([_day(d) for d, _ in pts], [100 * y for _, y in pts], label=_net_label(nets[i]),
                    color=OKABE_ITO[i % len(OKABE_ITO)], linestyle=LINESTYLES[(i // len(OKABE_ITO)) % 4],
                    marker=MARKERS[i % len(MARKERS)], markersize=3 if len(pts) > 30 else 5, linewidth=1.4)
            drawn += 1
        if drawn:
            loc = AutoDateLocator()
            ax.xaxis.set_major_locator(loc)
            ax.xaxis.set_major_formatter(ConciseDateFormatter(loc))
            ax.set_ylabel("measurements blocked (%)")
            ax.set_ylim(bottom=0)
            ax.set_title("Blocked share of measurements per day, by network")
            ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8, ncols=1 if drawn <= 12 else 2)
        else:
            _no_data(ax, "no measurement in this period")
        return _svg(fig, "time")


def pairs_plot(rep: dict[str, Any]) -> str:
    """Per target and network, the blocked share day by day (the most often blocked pairs)."""
    import matplotlib
    import numpy as np

    nets = rep["networks"]
    pairs = sorted(rep["time"]["pairs"], key=lambda p: (-sum(x[1] for x in p["points"]), p["target"], p["net"]))
    pairs = pairs[:24]
    days = sorted({d for p in pairs for d, _, _ in p["points"]})
    with matplotlib.rc_context(_RC):
        fig = _figure(9.5, max(1.8, 0.6 + 0.24 * len(pairs)))
        ax = fig.add_subplot()
        if not pairs:
            _no_data(ax, "nothing blocked in this period")
            return _svg(fig, "pairs")
        col = {d: i for i, d in enumerate(days)}
        grid = np.full((len(pairs), len(days)), np.nan)
        for r, p in enumerate(pairs):
            for d, b, n in p["points"]:
                grid[r, col[d]] = b / n if n else np.nan
        cmap = matplotlib.colormaps["cividis"].with_extremes(bad="#f2f2f2")
        im = ax.imshow(np.ma.masked_invalid(grid), aspect="auto", cmap=cmap, vmin=0, vmax=1,
                       interpolation="nearest")
        ax.set_yticks(range(len(pairs)))
        ax.set_yticklabels([f"{_short(p['target'])} @ {nets[p['net']]['name']}" for p in pairs], fontsize=7.5)
        step = max(1, len(days) // 10)
        ax.set_xticks(range(0, len(days), step))
        ax.set_xticklabels([_day(days[i]).isoformat() for i in range(0, len(days), step)], rotation=30,
                           ha="right", fontsize=7.5)
        ax.grid(False)
        ax.set_title("Blocked share per day: the most often blocked target × network pairs")
        cb = fig.colorbar(im, ax=ax, fraction=0.03, pad=0.01)
        cb.set_label("blocked share")
        return _svg(fig, "pairs")


def mechanisms_plot(rep: dict[str, Any]) -> str:
    """Per network, targets blocked now, stacked by detail."""
    import matplotlib

    nets = rep["networks"]
    from matplotlib.ticker import MaxNLocator

    mech = rep["mechanisms"]
    details = mech["details"]
    rows = [p for p in mech["per_network"] if p["counts"]]
    with matplotlib.rc_context(_RC):
        fig = _figure(9.5, max(1.8, 0.9 + 0.32 * len(rows)))
        ax = fig.add_subplot()
        if not rows:
            _no_data(ax, "nothing blocked in this period")
            return _svg(fig, "mechanisms")
        labels = [_net_label(nets[p["net"]]) for p in rows]
        left = [0] * len(rows)
        styles = detail_styles(details)
        for d in details:
            vals = [p["counts"].get(d, 0) for p in rows]
            ax.barh(labels, vals, left=left, label=d, color=styles[d][0],
                    hatch=styles[d][1], edgecolor="white", linewidth=0.6)
            left = [a + b for a, b in zip(left, vals, strict=True)]
        ax.invert_yaxis()
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("targets blocked in the latest measurement")
        ax.grid(axis="y", visible=False)
        ax.set_title("How targets are blocked, per network (stacked by detail)")
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8)
        return _svg(fig, "mechanisms")


#: Detail families share a hue family: DNS blues, IP oranges, DPI vermilion/purple.
_FAMILY = {"dns": ["#0072B2", "#56B4E9", "#003f63", "#9ecae1"], "ip": ["#E69F00", "#F0E442", "#8c6000"],
           "dpi": ["#D55E00", "#CC79A7", "#7a3500", "#e6a3c7", "#000000"]}


_HATCHES = ["", "//", "..", "xx", "\\\\"]


def detail_styles(details: list[str]) -> dict[str, tuple[str, str]]:
    """A (colour, hatch) per detail, never the same twice: the n-th detail of a family gets the
    family's n-th shade, and a hatch once the family's shades are used up."""
    seen: dict[str, int] = {}
    out: dict[str, tuple[str, str]] = {}
    for d in details:
        fam = d.split(".", 1)[0]
        shades = _FAMILY.get(fam, OKABE_ITO)
        k = seen.get(fam, 0)
        seen[fam] = k + 1
        out[d] = (shades[k % len(shades)], _HATCHES[(k // len(shades)) % len(_HATCHES)])
    return out


def sources_plot(rep: dict[str, Any]) -> str:
    """Measurements per source, by status: live, pcap and OONI side by side."""
    import matplotlib

    srcs = [s for s in rep["sources"] if s["measurements"]]
    with matplotlib.rc_context(_RC):
        fig = _figure(9.5, max(1.6, 0.8 + 0.45 * len(srcs)))
        ax = fig.add_subplot()
        if not srcs:
            _no_data(ax, "no measurement in this period")
            return _svg(fig, "sources")
        labels = [f"{s['source']} ({s['runs']} runs)" for s in srcs]
        left = [0] * len(srcs)
        for st in ("ok", "blocked", "down", "inconclusive"):
            vals = [s["by_status"].get(st, 0) for s in srcs]
            ax.barh(labels, vals, left=left, label=st, color=STATUS_COLOURS[st], edgecolor="white", linewidth=0.6)
            left = [a + b for a, b in zip(left, vals, strict=True)]
        ax.invert_yaxis()
        ax.set_xlabel("measurements (verdicts)")
        ax.grid(axis="y", visible=False)
        ax.set_title("Measurements by source and verdict")
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8)
        return _svg(fig, "sources")


def _short(url: str, n: int = 38) -> str:
    s = url.split("://", 1)[-1].rstrip("/")
    return s if len(s) <= n else s[: n - 1] + "…"


def all_plots(rep: dict[str, Any]) -> dict[str, str]:
    return {"time": time_plot(rep), "pairs": pairs_plot(rep), "mechanisms": mechanisms_plot(rep),
            "sources": sources_plot(rep)}
