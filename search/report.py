"""What a study shows of its trials: the table, the Pareto plot, the summary metrics.

Everything lands on the study run (``pareto/``) and in its description; nothing here decides
anything (the front is ``search.pareto.pareto_front`` over fully trained trials).
"""

from __future__ import annotations

import json
import math
import tempfile
from dataclasses import asdict, replace
from pathlib import Path

from search.config import COST_UNITS, knob_label
from search.pareto import hypervolume_2d, pareto_front, plot_front
from search.study import (
    COMPLETE,
    FAILED,
    PARETO_DIR,
    QUALITY,
    STOPPED,
    SUMMARY_ARTIFACT,
    Study,
    TrialRow,
    run_page,
)


def with_front(rows: list[TrialRow]) -> list[TrialRow]:
    """The rows, ``on_front`` for the fully trained ones no other fully trained row dominates."""
    complete = [r for r in rows if r.status == COMPLETE and math.isfinite(r.val_psnr_y)]
    front = pareto_front([(r.val_psnr_y, r.cost) for r in complete], ("max", "min"))
    ids = {id(complete[i]) for i in front}
    return [replace(r, on_front=id(r) in ids) for r in rows]


def format_table(rows: list[TrialRow], cost: str) -> str:
    head = f"{'trial':30s} {'status':9s} {'step':>5s}"
    lines = [f"{head} {'PSNR-Y':>7s} {cost:>8s}  front"]
    for r in sorted(rows, key=lambda r: (r.status != COMPLETE, r.cost)):
        mark = f"v{r.version}" if r.version else ("*" if r.on_front else "")
        name = r.name or f"{r.trial_id[:8]} {knob_label(r.knobs)}"
        lines.append(f"{name[:30]:30s} {r.status:9s} {r.step:5d} {r.val_psnr_y:7.2f} {r.cost:8.4f}  {mark}")
    return "\n".join(lines)


def plot_rows(rows: list[TrialRow]) -> list[dict]:
    """The plot's points: fully trained trials, and stopped ones at their last validation."""
    return [
        {
            "quality": r.val_psnr_y,
            "cost": r.cost,
            "on_front": r.on_front,
            "stopped": r.status == STOPPED,
            "label": r.name or knob_label(r.knobs),
        }
        for r in rows
        if r.status in (COMPLETE, STOPPED) and math.isfinite(r.val_psnr_y) and math.isfinite(r.cost)
    ]


def summarize(rows: list[TrialRow]) -> dict[str, float]:
    complete = [r for r in rows if r.status == COMPLETE and math.isfinite(r.val_psnr_y)]
    worst_q = min((r.val_psnr_y for r in complete), default=0.0)
    worst_c = max((r.cost for r in complete), default=1.0)
    return {
        "trials": len(rows),
        "complete": len(complete),
        "stopped_early": sum(r.status == STOPPED for r in rows),
        "failed": sum(r.status not in (COMPLETE, STOPPED) for r in rows),
        "front_size": sum(r.on_front for r in rows),
        "hypervolume": hypervolume_2d(
            [(r.val_psnr_y, r.cost) for r in complete], (worst_q - 0.1, worst_c * 1.1)
        ),
    }


def write_report(study: Study, rows: list[TrialRow], cost: str, title: str, out_dir: Path) -> dict:
    """The plot (``log_front_plot``), the table (text and JSON) and the summary (``summary.json``)
    under ``pareto/`` on the study run; returns the summary."""
    log_front_plot(study, rows, cost, f"{title}: trials (stopped early: hollow)")
    out_dir.mkdir(parents=True, exist_ok=True)
    table = format_table(rows, cost)
    summary = summarize(rows)
    (out_dir / "trials.txt").write_text(table + "\n")
    (out_dir / "trials.json").write_text(json.dumps([asdict(r) for r in rows], indent=2))
    (out_dir / Path(SUMMARY_ARTIFACT).name).write_text(json.dumps(summary, indent=2))
    study.log_artifacts(out_dir, PARETO_DIR)
    return summary


def log_front_plot(
    study: Study, rows: list[TrialRow], cost: str, title: str, selection: dict | None = None
) -> None:
    """The study's one Pareto plot, ``pareto/pareto.png`` and ``.html``: its trials against the
    search's ``cost``; with ``selection`` (a second panel, see ``search.pareto.plot_front``) the
    measured candidates beside them. The search logs it after each round and selection logs it
    again with its panel, over the same two files. A study without trial verdicts (references
    only) gets the selection's panel alone; with neither, nothing is logged."""
    points = plot_rows(rows)
    if not points and selection is None:
        return
    with tempfile.TemporaryDirectory() as tmp:
        png, html = Path(tmp) / "pareto.png", Path(tmp) / "pareto.html"
        if points:
            plot_front(points, f"{QUALITY} (dB)", cost, png, html, title=title, selection=selection)
        else:
            plot_front(
                selection["rows"],
                f"{QUALITY} (dB)",
                selection["cost"],
                png,
                html,
                f"{title}: {selection['title']}",
            )
        study.log_artifacts(tmp, PARETO_DIR)


def describe_result(
    rows: list[TrialRow],
    summary: dict,
    cost: str,
    device: str = "",
    measured: dict | None = None,
    experiment_id: str = "",
) -> str:
    """The "Result" section of the study run's description: how many trials ended how, the front
    as a table (knobs, validation PSNR, cost with its unit and, once measured, the device's mean
    and SD), then each stopped trial with its reason and each failed one with its error.

    ``measured``: version -> selection.Row of ``device`` (after selection); the champion starred.
    With ``experiment_id``, each trial links to its run's page in the model-training view."""
    measured = measured or {}

    def trial(r: TrialRow) -> str:
        name = f"`{r.name or knob_label(r.knobs)}`"
        return f"[{name}]({run_page(experiment_id, r.run_id)})" if experiment_id and r.run_id else name

    unit = COST_UNITS.get(cost, "")
    lines = [
        f"{summary['trials']} trials: {summary['complete']} fully trained, {summary['stopped_early']} "
        f"stopped early, {summary['failed']} failed; each is a child run named by its knobs.",
        "",
        f"Pareto front (val_psnr_y against {cost}):",
        "",
    ]
    head = ["version", "trial", "val PSNR-Y (dB)", f"{cost} ({unit})" if unit else cost]
    if device:
        head.append(f"{device} latency (ms, mean ± SD)")
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in sorted((r for r in rows if r.on_front), key=lambda r: r.cost):
        m = measured.get(str(r.version)) if r.version else None
        version = f"v{r.version}" if r.version else "-"
        if m is not None and m.chosen:
            version += " ★ champion"
        cells = [version, trial(r), f"{r.val_psnr_y:.2f}", f"{r.cost:.4g}"]
        if device:
            mean, sd = (m.latency_ms_mean, m.latency_ms_std) if m is not None else (None, None)
            cells.append("-" if mean is None else f"{mean:.4g}" + ("" if sd is None else f" ± {sd:.2g}"))
        lines.append("| " + " | ".join(cells) + " |")
    for title, status in (("Stopped early", STOPPED), ("Failed", FAILED)):
        ended = [r for r in rows if r.status == status]
        if ended:
            lines += ["", f"{title}:"]
            for r in ended:
                reason = r.stop_reason if status == STOPPED else r.error
                lines.append(f"- {trial(r)}: {reason or 'no reason recorded'}")
    return "\n".join(lines)
