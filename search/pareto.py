"""Pareto fronts, hypervolume, and the plots of quality against cost."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path


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


def plot_front(
    rows: list[dict], quality: str, cost: str, out_png: str | Path, out_html: str | Path, title: str = ""
) -> None:
    """Scatter of all trials (quality against cost) with the Pareto front highlighted.

    Args:
        rows: dicts with ``quality``, ``cost``, ``label`` and ``on_front`` keys, and optionally
            ``chosen`` (the point drawn as a star, e.g. the selected champion).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    others = [r for r in rows if not r["on_front"]]
    front = sorted((r for r in rows if r["on_front"]), key=lambda r: r["cost"])
    ax.scatter([r["cost"] for r in others], [r["quality"] for r in others], c="0.6", label="trials")
    ax.plot(
        [r["cost"] for r in front], [r["quality"] for r in front], "o-", c="tab:red", label="Pareto front"
    )
    chosen = [r for r in rows if r.get("chosen")]
    if chosen:
        ax.scatter(
            [r["cost"] for r in chosen],
            [r["quality"] for r in chosen],
            marker="*",
            s=220,
            c="gold",
            edgecolors="k",
            zorder=3,
            label="chosen",
        )
    for r in front:
        ax.annotate(
            r["label"], (r["cost"], r["quality"]), fontsize=7, xytext=(4, 4), textcoords="offset points"
        )
    ax.set_xlabel(f"{cost} (lower is better)")
    ax.set_ylabel(f"{quality} (higher is better)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_png)
    plt.close(fig)

    import plotly.graph_objects as go

    hover = [r["label"] for r in rows]
    fig2 = go.Figure()
    fig2.add_trace(
        go.Scatter(
            x=[r["cost"] for r in rows],
            y=[r["quality"] for r in rows],
            mode="markers",
            text=hover,
            name="trials",
            marker={"color": "grey"},
        )
    )
    fig2.add_trace(
        go.Scatter(
            x=[r["cost"] for r in front],
            y=[r["quality"] for r in front],
            mode="lines+markers",
            text=[r["label"] for r in front],
            name="Pareto front",
        )
    )
    if chosen:
        fig2.add_trace(
            go.Scatter(
                x=[r["cost"] for r in chosen],
                y=[r["quality"] for r in chosen],
                mode="markers",
                text=[r["label"] for r in chosen],
                name="chosen",
                marker={
                    "symbol": "star",
                    "size": 16,
                    "color": "gold",
                    "line": {"color": "black", "width": 1},
                },
            )
        )
    fig2.update_layout(title=title, xaxis_title=cost, yaxis_title=quality)
    fig2.write_html(str(out_html), include_plotlyjs=True)
