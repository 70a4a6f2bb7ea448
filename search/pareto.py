"""Pareto fronts, hypervolume, and the plots of quality against cost."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

STOPPED = "stopped early"  # legend name of early-stopped trials in both plots


def dominates(a: Sequence[float], b: Sequence[float], senses: Sequence[str]) -> bool:
    """True when ``a`` is at least as good as ``b`` in every objective and better in one.

    Args:
        senses: "max" or "min" for each objective.
    """
    better = False
    for x, y, sense in zip(a, b, senses, strict=True):
        if sense == "max":
            x, y = -x, -y
        if x > y:
            return False
        better = better or x < y
    return better


def pareto_front(points: Sequence[Sequence[float]], senses: Sequence[str]) -> list[int]:
    """Indices of the points no other point dominates (ties all kept), in input order."""
    return [i for i, p in enumerate(points) if not any(dominates(q, p, senses) for q in points)]


def hypervolume_2d(points: Sequence[tuple[float, float]], reference: tuple[float, float]) -> float:
    """Area dominated by (quality up, cost down) points and bounded by ``reference``.

    ``reference`` = (lowest quality, highest cost) that counts; points outside it add nothing.
    """
    q_ref, c_ref = reference
    inside = sorted((c, q) for q, c in points if q > q_ref and c < c_ref)  # by cost, ascending
    area, best_q = 0.0, q_ref
    for i, (c, q) in enumerate(inside):
        best_q = max(best_q, q)
        next_c = inside[i + 1][0] if i + 1 < len(inside) else c_ref
        area += (next_c - c) * (best_q - q_ref)
    return area


def _groups(rows: list[dict]) -> dict[str, list[dict]]:
    """The rows of one panel by how they are drawn: front (by cost), stopped, other trials, chosen.

    A row without a finite quality and cost (a trial stopped before its first validation) has no
    point to draw and is left out.
    """
    rows = [r for r in rows if math.isfinite(r["quality"]) and math.isfinite(r["cost"])]
    front = sorted((r for r in rows if r["on_front"]), key=lambda r: r["cost"])
    return {
        "trials": [r for r in rows if not r["on_front"] and not r.get("stopped")],
        STOPPED: [r for r in rows if not r["on_front"] and r.get("stopped")],
        "Pareto front": front,
        "chosen": [r for r in rows if r.get("chosen")],
    }


def _panels(rows, cost, title, selection) -> list[tuple[list[dict], str, str]]:
    """(rows, cost label, title) per panel: the search's, then the selection's when given."""
    panels = [(rows, cost, title)]
    if selection is not None:
        panels.append((selection["rows"], selection["cost"], selection.get("title", "")))
    return panels


def _xy(rows: list[dict]) -> tuple[list[float], list[float]]:
    return [r["cost"] for r in rows], [r["quality"] for r in rows]


def _draw_panel(ax, rows: list[dict], quality: str, cost: str, title: str) -> None:
    g = _groups(rows)
    if g["trials"]:
        ax.scatter(*_xy(g["trials"]), c="0.6", label="trials")
    if g[STOPPED]:
        ax.scatter(*_xy(g[STOPPED]), facecolors="none", edgecolors="0.5", label=STOPPED)
    if g["Pareto front"]:
        ax.plot(*_xy(g["Pareto front"]), "o-", c="tab:red", label="Pareto front")
    if g["chosen"]:
        ax.scatter(*_xy(g["chosen"]), marker="*", s=220, c="gold", edgecolors="k", zorder=3, label="chosen")
    for r in [*g["trials"], *g[STOPPED], *g["Pareto front"]]:  # every point has its name beside it
        ax.annotate(
            r["label"], (r["cost"], r["quality"]), fontsize=6, xytext=(4, 3), textcoords="offset points"
        )
    ax.set_xlabel(f"{cost} (lower is better)")
    ax.set_ylabel(f"{quality} (higher is better)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()


def front_figure(rows: list[dict], quality: str, cost: str, title: str = "", selection: dict | None = None):
    """The matplotlib figure ``plot_front`` saves as PNG (arguments as there)."""
    from matplotlib.figure import Figure  # no pyplot: no global figure state, no backend to pick

    panels = _panels(rows, cost, title, selection)
    fig = Figure(figsize=(7 * len(panels), 4.5), dpi=120)
    for ax, (panel_rows, panel_cost, panel_title) in zip(
        fig.subplots(1, len(panels), squeeze=False)[0], panels
    ):
        _draw_panel(ax, panel_rows, quality, panel_cost, panel_title)
    fig.tight_layout()
    return fig


def front_html(
    rows: list[dict], quality: str, cost: str, title: str = "", selection: dict | None = None
) -> str:
    """The page ``plot_front`` writes: the same figure as the PNG, inline as SVG (its text kept as
    text, so names can be searched), then a table of every point of each panel. Nothing is loaded
    from elsewhere: it works offline."""
    import html
    import io

    import matplotlib

    with matplotlib.rc_context({"svg.fonttype": "none"}):
        buf = io.StringIO()
        front_figure(rows, quality, cost, title, selection).savefig(buf, format="svg")
    svg = buf.getvalue()
    svg = svg[svg.index("<svg") :]  # the element alone, without the XML prologue
    esc = html.escape
    parts = [
        "<!DOCTYPE html>",
        '<html><head><meta charset="utf-8"><title>Pareto front</title>',
        "<style>body{font-family:sans-serif} td,th{padding:2px 8px;text-align:left}</style></head>",
        f"<body><h3>{esc(title).replace(chr(10), '<br>')}</h3>",
        svg,
    ]
    for panel_rows, panel_cost, panel_title in _panels(rows, cost, title, selection):
        parts.append(f"<h4>{esc(panel_title).replace(chr(10), '<br>')}</h4>")
        parts.append(
            f"<table><tr><th>name</th><th>{esc(quality)}</th><th>{esc(panel_cost)}</th><th></th></tr>"
        )
        groups = _groups(panel_rows)
        chosen = [id(r) for r in groups.pop("chosen")]
        for group, members in groups.items():
            for r in members:
                kind = "chosen" if id(r) in chosen else group
                parts.append(
                    f"<tr><td>{esc(r['label'])}</td><td>{r['quality']:.4g}</td><td>{r['cost']:.4g}</td>"
                    f"<td>{esc(kind)}</td></tr>"
                )
        parts.append("</table>")
    return "\n".join([*parts, "</body></html>"])


def plot_front(
    rows: list[dict],
    quality: str,
    cost: str,
    out_png: str | Path,
    out_html: str | Path,
    title: str = "",
    selection: dict | None = None,
) -> None:
    """Scatter of the trials (quality against cost) with the Pareto front, as a PNG and an HTML page.

    Filled grey: complete trials off the front; hollow grey: early-stopped trials, at their last
    validation; red line: the front; star: the chosen point. With ``selection``, a second panel
    beside the first shows the selection's candidates against the cost it compared (e.g. the
    measured latency on a device), so one figure holds the search and the selection.

    Every point is labelled with its name. The HTML page holds the same figure as SVG and a table
    of every point; it needs nothing from the network (``front_html``).

    Args:
        rows: dicts with ``quality``, ``cost``, ``label`` and ``on_front`` keys, and optionally
            ``stopped`` (an early-stopped trial, at its last validation) and ``chosen`` (drawn as
            a star, e.g. the selected champion). Rows without a finite quality and cost are left
            out.
        selection: the second panel: ``rows`` (dicts as above), ``cost`` (its x-axis label) and
            ``title``; the quality axis is labelled ``quality`` in both panels.
    """
    fig = front_figure(rows, quality, cost, title, selection)
    fig.savefig(out_png)
    Path(out_html).write_text(front_html(rows, quality, cost, title, selection))
