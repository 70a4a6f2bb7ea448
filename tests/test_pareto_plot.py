"""The Pareto plot: stopped trials hollow, every point named, one or two panels, a small HTML page
that works offline."""

from __future__ import annotations

import math
import re

import numpy as np
from PIL import Image

from search.pareto import STOPPED, front_figure, front_html, plot_front


def search_rows() -> list[dict]:
    return [
        {"quality": 30.0, "cost": 1.0, "label": "a", "on_front": True},
        {"quality": 31.0, "cost": 2.0, "label": "b", "on_front": True},
        {"quality": 29.0, "cost": 2.5, "label": "c", "on_front": False},
        {"quality": 27.0, "cost": 0.8, "label": "s1", "on_front": False, "stopped": True},
        {"quality": 26.5, "cost": 3.0, "label": "s2", "on_front": False, "stopped": True},
        {
            "quality": math.nan,
            "cost": 0.5,
            "label": "s0",
            "on_front": False,
            "stopped": True,
        },  # never validated
    ]


def selection_panel() -> dict:
    rows = [
        {"quality": 30.0, "cost": 4.0, "label": "a", "on_front": True},
        {"quality": 31.0, "cost": 9.0, "label": "b", "on_front": True, "chosen": True},
    ]
    return {"rows": rows, "cost": "orin-nano latency_ms_p50", "title": "selection\nwithin limits"}


def by_label(ax) -> dict:
    handles, labels = ax.get_legend_handles_labels()
    return dict(zip(labels, handles))


def test_stopped_trials_are_hollow_and_complete_ones_filled():
    fig = front_figure(search_rows(), "PSNR-Y (dB)", "gflops", title="study")
    (ax,) = fig.axes
    groups = by_label(ax)
    assert set(groups) == {"trials", STOPPED, "Pareto front"}  # nothing chosen in this panel

    stopped = groups[STOPPED]
    np.testing.assert_allclose(stopped.get_offsets(), [[0.8, 27.0], [3.0, 26.5]])
    assert np.all(stopped.get_facecolors()[:, 3] == 0)  # hollow
    edge = stopped.get_edgecolors()
    assert edge.shape[0] >= 1 and np.all(edge[:, 3] > 0) and np.allclose(edge[:, 0], edge[:, 1])  # grey

    trials = groups["trials"]
    np.testing.assert_allclose(trials.get_offsets(), [[2.5, 29.0]])  # neither stopped nor on the front
    assert np.all(trials.get_facecolors()[:, 3] > 0)  # filled

    front = groups["Pareto front"]
    assert list(front.get_xdata()) == [1.0, 2.0]  # by cost
    assert front.get_color() == "tab:red"
    # every point drawn is named beside it (s0 was never validated: no point, no name)
    named = {t.get_text(): t.xy for t in ax.texts}
    assert named == {
        "a": (1.0, 30.0),
        "b": (2.0, 31.0),
        "c": (2.5, 29.0),
        "s1": (0.8, 27.0),
        "s2": (3.0, 26.5),
    }


def test_a_selection_adds_a_second_panel_with_the_chosen_star():
    fig = front_figure(search_rows(), "PSNR-Y (dB)", "gflops", title="study", selection=selection_panel())
    left, right = fig.axes
    assert left.get_xlabel().startswith("gflops") and right.get_xlabel().startswith("orin-nano latency")
    assert right.get_title() == "selection\nwithin limits"
    assert "chosen" not in by_label(left)
    chosen = by_label(right)["chosen"]
    np.testing.assert_allclose(chosen.get_offsets(), [[9.0, 31.0]])
    assert STOPPED not in by_label(right)


def rows_of(page: str) -> list[tuple[str, ...]]:
    return re.findall(r"<tr><td>([^<]*)</td><td>([^<]*)</td><td>([^<]*)</td><td>([^<]*)</td></tr>", page)


def test_html_is_the_png_s_figure_with_a_table_of_every_point_in_both_panels():
    page = front_html(search_rows(), "PSNR-Y (dB)", "gflops", "study", selection_panel())
    assert page.count("<svg") == 1 and "<h4>selection<br>within limits</h4>" in page
    # names are text in the SVG (searchable), as in the PNG
    for label in ("a", "b", "c", "s1", "s2"):
        assert re.search(rf">{label}</text>", page), label
    left, right = rows_of(page)[:5], rows_of(page)[5:]
    assert sorted(left) == sorted(
        [
            ("c", "29", "2.5", "trials"),
            ("s1", "27", "0.8", STOPPED),
            ("s2", "26.5", "3", STOPPED),
            ("a", "30", "1", "Pareto front"),
            ("b", "31", "2", "Pareto front"),
        ]
    )
    assert right == [("a", "30", "4", "Pareto front"), ("b", "31", "9", "chosen")]


def test_plot_front_writes_a_png_and_a_small_html(tmp_path):
    png, html = tmp_path / "pareto.png", tmp_path / "pareto.html"
    plot_front(search_rows(), "PSNR-Y (dB)", "gflops", png, html, title="study", selection=selection_panel())
    width, height = Image.open(png).size
    assert width > 1.8 * height  # two panels side by side
    page = html.read_text()
    assert len(page.encode()) < 200_000
    # offline: nothing loaded from elsewhere (no script, no stylesheet or image from a URL)
    assert "<script" not in page and not re.search(r'(src|href)="(https?:)?//', page)
    assert len(rows_of(page)) == 7 and ("s1", "27", "0.8", STOPPED) in rows_of(page)


def test_single_panel_without_a_selection(tmp_path):
    png, html = tmp_path / "pareto.png", tmp_path / "pareto.html"
    plot_front(search_rows(), "PSNR-Y (dB)", "gflops", png, html, title="study")
    width, height = Image.open(png).size
    assert width < 1.8 * height
    page = html.read_text()
    assert page.count("<table>") == 1 and "<h3>study</h3>" in page and len(rows_of(page)) == 5
