"""Select the champion: the best measured Pareto candidate of a study, marked with a registry alias.

    python -m search.selection --experiment mambalitesr                      # the knee of the front
    python -m search.selection --experiment mambalitesr --max-power-mw 3000  # within a power budget
    python -m search.selection --experiment mambalitesr --rule best-psnr --json

The candidates are the registered versions (``mambalitesr-student``) of the study's trial runs.
Only those the edge agent measured on the device (status ``done``, figures on the trial run) are
compared. Pending, measuring and failed ones appear in the table with their status; they are never
chosen, and nothing is guessed for them.

Objectives: validation PSNR-Y (max); energy per image (min) when the device measured power; latency
(min): the mean over the agent's windows, whose standard deviation across windows is the noise a
margin is judged against (an agent that reports no mean: its p50). A device without a power sensor
gives latency only, and selection says so. The limits (``--max-power-mw``, ``--max-latency-ms``,
``--min-psnr``) filter the measured candidates, and the Pareto front is taken over those within the
limits.

Rules, applied to that front:
- ``knee`` (default): each objective is normalised over the front to [0, 1], 0 being the front's best
  value and 1 its worst (an objective equal on the whole front is 0 everywhere). The chosen point is
  the one nearest the ideal point (0, ..., 0) in Euclidean distance: the best compromise, with every
  objective weighted by its spread on the front. Ties go to the higher PSNR; a one-point front
  chooses that point.
- ``best-psnr``: the highest PSNR within the limits (ties: the lower cost).

The chosen version gets the alias ``champion`` and a paragraph in its description saying why; the
study run gets ``selection.*`` tags, the same words in its description, the study's Pareto plot with
the measured panel (``pareto/pareto.png`` and ``.html``) and the table under ``selection/`` (Markdown
and JSON). When nothing is
within the limits or nothing is measured yet, the exit code is 1 and the alias stays where it was.
A tracking server that does not answer, or an MLflow error, also exits 1, with one line on stderr;
a wrong flag, experiment or study run exits 2.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from edge_agent import argtypes, contract, errors, preflight
from edge_agent.errors import UserError
from search import mlflow_util, study
from search.config import SearchConfig, knob_columns, knob_label, knobs_of
from search.study import FINAL_QUALITY, QUALITY

RULES = ("knee", "best-psnr")
ENERGY, LATENCY = contract.ENERGY, contract.LATENCY_MEAN  # the two possible costs


class SelectionError(UserError, RuntimeError):
    """Nothing can be chosen (nothing measured, nothing within the limits); the alias is untouched.

    ``selection`` holds the candidates as far as they were evaluated (None before any was read).
    """

    def __init__(self, message: str, selection: Selection | None = None):
        super().__init__(message)
        self.selection = selection


@dataclass(frozen=True)
class Limits:
    max_power_mw: float | None = None  # on power_mw, mean module power while running
    max_latency_ms: float | None = None  # on latency_ms_mean
    min_psnr: float | None = None  # on val_psnr_y, dB

    def __post_init__(self) -> None:
        for name in ("max_power_mw", "max_latency_ms"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be positive, got {value}")

    def checks(self) -> list[tuple[str, str, float]]:
        """(row field, operator, bound) of each limit set."""
        out = [
            (contract.POWER, "<=", self.max_power_mw),
            (contract.LATENCY_MEAN, "<=", self.max_latency_ms),
            ("psnr", ">=", self.min_psnr),
        ]
        return [c for c in out if c[2] is not None]

    def describe(self) -> str:
        return ", ".join(f"{_label(f)} {op} {bound:g}" for f, op, bound in self.checks()) or "none"


@dataclass(frozen=True)
class Row:
    """One candidate: a registered version, its trial's knobs and PSNR, its figures on the device."""

    version: str
    run_id: str
    run_name: str
    knobs: dict  # the trial's knobs (search.config.KNOBS), typed; empty for a reference model
    psnr: float  # val_psnr_y of the trial run (final_val_psnr_y if it was finalized), dB; nan if none
    status: str  # edge.<device>.status: pending | measuring | done | failed
    latency_ms_mean: float | None = None  # over the agent's windows (its p50 where it reports no mean)
    latency_ms_p50: float | None = None
    latency_ms_p99: float | None = None
    power_mw: float | None = None
    energy_mj_per_image: float | None = None
    power_source: str = ""
    latency_ms_std: float | None = None  # across the agent's windows (edge_agent/measure.py)
    energy_cv: float | None = None
    unstable: bool = False  # the agent's windows disagreed beyond its limit twice: never ranked
    reference: str = ""  # a reference model's name (study.TAG_REFERENCE): compared, never chosen
    note: str = ""  # why a candidate is out of the comparison (error, missing figures, a failed limit)
    within_limits: bool | None = None  # None: not measured
    on_front: bool = False  # on the Pareto front of the measured candidates within the limits
    chosen: bool = False

    @property
    def measured(self) -> bool:
        done = self.status == contract.DONE and not self.unstable
        return done and self.latency_ms_mean is not None and math.isfinite(self.psnr)

    @property
    def knob_text(self) -> str:
        """``C32 r4 a0.60``, as in the trials' names; empty for a reference model."""
        return knob_label(self.knobs) if self.knobs else ""

    @property
    def name(self) -> str:
        """Its trial's run name, which holds the knobs (``t01 C8 r6 a0.60``), else the knobs."""
        if self.knob_text and self.knob_text not in self.run_name:
            return f"{self.run_name}, {self.knob_text}" if self.run_name else self.knob_text
        return self.run_name

    @property
    def label(self) -> str:
        return " ".join(x for x in (f"v{self.version}", self.reference, self.knob_text) if x)


@dataclass(frozen=True)
class Selection:
    rows: tuple[Row, ...]
    champion: Row | None
    device: str
    cost: str | None  # ENERGY or LATENCY: the cost objective compared beside PSNR
    message: str
    rule: str = "knee"
    limits: Limits = field(default_factory=Limits)
    study_run_id: str = ""
    trade: str = ""  # what the champion gains and pays against the runner-up, one sentence

    def to_dict(self) -> dict:
        return {
            "study_run_id": self.study_run_id,
            "device": self.device,
            "rule": self.rule,
            "cost": self.cost,
            "limits": asdict(self.limits),
            "champion_version": self.champion.version if self.champion else None,
            "message": self.message,
            "rows": [asdict(r) for r in self.rows],
        }


def _first(*values: float | None) -> float | None:
    return next((v for v in values if v is not None), None)


def _label(row_field: str) -> str:
    return QUALITY if row_field == "psnr" else row_field


# ---------------------------------------------------------------------------------------- reading


def find_study(client, tracking_uri: str, experiment: str, study_run_id: str | None) -> tuple[str, str]:
    """(experiment id, study run id): the given study run, or the experiment's latest one."""
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise ValueError(
            f"there is no experiment '{experiment}' at {tracking_uri}; check --experiment and --tracking-uri"
        )
    if study_run_id is None:
        run = mlflow_util.find_run(tracking_uri, exp.experiment_id, **{contract.ROLE: contract.ROLE_STUDY})
        if run is None:
            raise ValueError(
                f"experiment '{experiment}' has no study run ({contract.ROLE}={contract.ROLE_STUDY}): "
                "run the search first"
            )
        return exp.experiment_id, run.info.run_id
    from mlflow.exceptions import MlflowException

    try:
        run = client.get_run(study_run_id)
    except MlflowException as exc:  # anything else (a dead server) is not the user's run id
        if exc.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise
        raise ValueError(f"there is no run {study_run_id!r} at {tracking_uri}; check --study") from None
    if run.info.experiment_id != exp.experiment_id or run.data.tags.get(contract.ROLE) != contract.ROLE_STUDY:
        raise ValueError(
            f"run {study_run_id} is not a study run ({contract.ROLE}={contract.ROLE_STUDY}) "
            f"of experiment '{experiment}'"
        )
    return exp.experiment_id, study_run_id


def busiest_device(versions: list) -> str | None:
    """The device type with the most ``done`` measurements (then the most status tags, then by name)."""
    done: dict[str, int] = {}
    tagged: dict[str, int] = {}
    for v in versions:
        for key, value in v.tags.items():
            device, name = contract.split_edge_key(key) or ("", "")
            if device and name == "status":  # contract.status_tag(device)
                tagged[device] = tagged.get(device, 0) + 1
                done[device] = done.get(device, 0) + (value == contract.DONE)
    if not tagged:
        return None
    return min(tagged, key=lambda d: (-done[d], -tagged[d], d))


def make_row(version, run, device: str) -> Row:
    """A candidate from its version's tags and its trial run's params and metrics (nothing guessed);
    a reference model's row says so in its note."""
    row = _make_row(version, run, device)
    if row.reference and not row.note:
        row = replace(row, note=f"reference ({row.reference}): compared, never chosen")
    return row


def _make_row(version, run, device: str) -> Row:
    params, metrics, tags = run.data.params, run.data.metrics, run.data.tags

    def edge(name: str) -> float | None:
        return metrics.get(contract.edge_key(device, name))

    # no status tag: the agent treats the version as pending (edge_agent/agent.py)
    status = version.tags.get(contract.status_tag(device), contract.PENDING)
    row = Row(
        version=str(version.version),
        run_id=run.info.run_id,
        run_name=(run.info.run_name or run.info.run_id[:8]).replace(study.CHAMPION_SUFFIX, ""),
        knobs=knobs_of(params),
        # the registered weights' quality: a finalized candidate ships its retrained weights
        psnr=float(metrics.get(FINAL_QUALITY, metrics.get(QUALITY, math.nan))),
        status=status,
        reference=tags.get(study.TAG_REFERENCE, ""),
    )
    if status == contract.FAILED:
        return replace(row, note=version.tags.get(contract.error_tag(device), "failed, no error recorded"))
    if status != contract.DONE:
        return row
    row = replace(
        row,
        latency_ms_mean=_first(edge(contract.LATENCY_MEAN), edge(contract.LATENCY_P50)),
        latency_ms_p50=edge(contract.LATENCY_P50),
        latency_ms_p99=edge(contract.LATENCY_P99),
        power_mw=edge(contract.POWER),
        energy_mj_per_image=edge(contract.ENERGY),
        power_source=tags.get(contract.edge_key(device, contract.TAG_POWER_SOURCE), ""),
        latency_ms_std=edge(contract.LATENCY_STD),
        energy_cv=edge(contract.ENERGY_CV),
        unstable=edge(contract.UNSTABLE) == 1.0,
    )
    if row.unstable:
        cvs = [edge(contract.LATENCY_CV), row.energy_cv]
        spread = max((c for c in cvs if c is not None), default=math.inf)
        return replace(
            row,
            note=f"unstable: its figures varied by {spread:.1%} across the agent's windows, twice; "
            "measure it again on a quiet device",
        )
    if row.latency_ms_mean is None:
        missing = contract.edge_key(device, contract.LATENCY_MEAN)
        return replace(row, note=f"done, but the run has no {missing}")
    if not math.isfinite(row.psnr):
        return replace(row, note=f"the run has no {QUALITY}")
    return row


# ---------------------------------------------------------------------------------------- choosing


def objectives(cost: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(row fields, senses) compared: PSNR, energy (when measured), mean latency."""
    if cost == ENERGY:
        return ("psnr", ENERGY, LATENCY), ("max", "min", "min")
    return ("psnr", LATENCY), ("max", "min")


def knee(points: list[tuple[float, ...]], senses: tuple[str, ...]) -> int:
    """Index of the point nearest the ideal after normalising each objective to [0, 1] (best = 0).

    Ties go to the higher first objective (PSNR), then to the earlier point.
    """
    normalised = []
    for j, sense in enumerate(senses):
        column = [p[j] for p in points]
        lo, hi = min(column), max(column)
        span = hi - lo
        best = hi if sense == "max" else lo
        normalised.append([abs(x - best) / span if span > 0 else 0.0 for x in column])
    distances = [math.hypot(*(col[i] for col in normalised)) for i in range(len(points))]
    nearest = min(distances)
    tied = [i for i, d in enumerate(distances) if math.isclose(d, nearest, rel_tol=1e-9, abs_tol=1e-12)]
    return max(tied, key=lambda i: (points[i][0], -i))


def rank(rows: list[Row], device: str, limits: Limits, rule: str) -> Selection:
    """Limits, Pareto front and the rule applied to the measured rows (no MLflow calls).

    Raises:
        SelectionError: a power limit on a device without power figures, or nothing within the limits.
    """
    measured = [r for r in rows if r.measured]
    assert measured, "rank() needs measured candidates"
    notes = []
    cost = ENERGY if all(r.energy_mj_per_image is not None for r in measured) else LATENCY
    if cost == LATENCY:
        powered = sum(r.power_mw is not None for r in measured)
        sources = ", ".join(
            sorted({r.power_source or "not recorded" for r in measured if r.power_mw is None})
        )
        notes.append(
            f"{device}: no power measured (power source: {sources}); the cost compared is latency only."
            if powered == 0
            else f"{device}: power measured for {powered} of {len(measured)} candidates only; "
            "energy is not compared, the cost compared is latency only."
        )
    partial = Selection(tuple(rows), None, device, cost, " ".join(notes), rule, limits)
    if limits.max_power_mw is not None and all(r.power_mw is None for r in measured):
        raise SelectionError(
            f"--max-power-mw {limits.max_power_mw:g} was asked, but {device} measured no power for any of "
            f"the {len(measured)} measured candidates (its power source is "
            f"{measured[0].power_source or 'unavailable'}), so no candidate can be shown to satisfy it. "
            "Drop the power limit, or measure on a device with a power sensor.",
            partial,
        )

    def failures(r: Row) -> list[str]:
        out = []
        for name, op, bound in limits.checks():
            value = getattr(r, name)
            if value is None or (value > bound if op == "<=" else value < bound):
                out.append(name)
        return out

    def judged(r: Row) -> Row:
        failed = [c for c in limits.checks() if c[0] in failures(r)]
        outside = ", ".join(f"{_label(name)} {op} {bound:g}" for name, op, bound in failed)
        return replace(r, within_limits=not failed, note=f"fails {outside}" if failed else r.note)

    rows = [judged(r) if r.measured else r for r in rows]
    feasible = [r for r in rows if r.within_limits and not r.reference]  # references are never chosen
    if not feasible:
        parts = []
        for name, op, bound in limits.checks():
            excluded = sum(name in failures(r) for r in measured if not r.reference)
            known = [getattr(r, name) for r in measured if getattr(r, name) is not None and not r.reference]
            if excluded:
                best = f"{'lowest' if op == '<=' else 'highest'} {(min if op == '<=' else max)(known):.4g}"
                parts.append(f"{_label(name)} {op} {bound:g} excludes {excluded} ({best})")
        references = sum(bool(r.reference and r.within_limits) for r in rows)
        if references:
            parts.append(f"{references} reference(s) are, but references are never chosen")
        raise SelectionError(
            f"{len(measured)} measured candidates on {device}; none within the limits: {'; '.join(parts)}.",
            replace(partial, rows=tuple(rows)),
        )
    front, champion = _choose(feasible, cost, rule)
    on_front = {r.version for r in front}
    rows = [replace(r, on_front=r.version in on_front, chosen=r.version == champion.version) for r in rows]
    champion = next(r for r in rows if r.chosen)
    limited = f" within limits ({limits.describe()})" if limits.checks() else ""
    notes.append(
        f"champion: v{champion.version} ({champion.name}): {QUALITY} "
        f"{champion.psnr:.3f} dB, {_figures(champion, cost)} on {device}; rule {rule} over the "
        f"{len(front)}-point front of {len(feasible)} measured candidates{limited}."
    )
    others = [r for r in feasible if r.version != champion.version]
    trade = ""
    if others:
        runner_up = _choose(others, cost, rule)[1]
        trade = _trade(champion, runner_up, cost)
        notes.append(trade)
        notes.extend(_within_noise(champion, runner_up, cost))
    notes.extend(_references_over(champion, [r for r in rows if r.reference and r.within_limits], cost))
    return Selection(tuple(rows), champion, device, cost, " ".join(notes), rule, limits, trade=trade)


def _choose(feasible: list[Row], cost: str, rule: str) -> tuple[list[Row], Row]:
    """(the Pareto front of ``feasible``, the candidate ``rule`` picks on it)."""
    from search.pareto import pareto_front

    fields, senses = objectives(cost)
    points = [tuple(getattr(r, f) for f in fields) for r in feasible]
    front = [feasible[i] for i in pareto_front(points, senses)]
    if rule == "knee":
        return front, front[knee([tuple(getattr(r, f) for f in fields) for r in front], senses)]
    return front, max(front, key=lambda r: (r.psnr, -getattr(r, cost)))


def _spread(r: Row, cost: str) -> float | None:
    """A row's cost's standard deviation across the agent's windows (None: not reported)."""
    if cost == LATENCY:
        return r.latency_ms_std
    return None if r.energy_cv is None else r.energy_cv * abs(r.energy_mj_per_image)


def _noise(a: Row, b: Row, cost: str) -> float | None:
    """The two rows' spreads added: cost differences within it cannot be told apart."""
    spreads = [_spread(a, cost), _spread(b, cost)]
    return None if None in spreads else sum(spreads)


def _within_noise(champion: Row, runner_up: Row, cost: str) -> list[str]:
    """A sentence when the champion's cost and the runner-up's (the candidate the rule picks without
    the champion) differ by no more than their spreads across the agent's windows added."""
    noise = _noise(champion, runner_up, cost)
    if noise is None:
        return []  # measured by an agent that did not report its spread
    diff = getattr(runner_up, cost) - getattr(champion, cost)
    if abs(diff) > noise:
        return []
    what, unit = _what(cost)
    return [
        f"The runner-up v{runner_up.version} ({runner_up.name}, {QUALITY} {runner_up.psnr:.3f} dB) "
        f"differs from the champion by {diff:+.3g} {unit} in {what}, within the measurement noise "
        f"(+/-{noise:.3g} {unit}: the two candidates' standard deviations across the agent's "
        "windows added): on this device the two cannot be told apart by cost."
    ]


def _trade(champion: Row, runner_up: Row, cost: str) -> str:
    """What the champion gains and pays against the runner-up (the rule's pick without it)."""
    what, unit = _what(cost)
    diff = getattr(champion, cost) - getattr(runner_up, cost)
    return (
        f"v{champion.version}: {champion.psnr - runner_up.psnr:+.2f} dB for {diff:+.3g} {unit} ({what}) "
        f"over the runner-up v{runner_up.version} ({runner_up.name})."
    )


def _what(cost: str) -> tuple[str, str]:
    return ("mean latency", "ms") if cost == LATENCY else ("energy", "mJ/image")


def _references_over(champion: Row, references: list[Row], cost: str) -> list[str]:
    """A sentence naming each measured reference that dominates the champion (as good or better in
    every objective compared, better in one), or that has more PSNR at a cost within the
    measurement noise of the champion's: the search's best loses to it on this device."""
    from search.pareto import dominates

    fields, senses = objectives(cost)
    point = lambda r: tuple(getattr(r, f) for f in fields)  # noqa: E731
    out = []
    for r in references:
        named = f"The reference {r.reference} (v{r.version}: {QUALITY} {r.psnr:.3f} dB, {_figures(r, cost)})"
        noise = _noise(r, champion, cost)
        if dominates(point(r), point(champion), senses):
            out.append(
                f"{named} dominates the champion on {', '.join(_label(f) for f in fields)}: on this "
                "device it is the better model. References are never made champion."
            )
        elif (
            r.psnr > champion.psnr
            and noise is not None
            and abs(getattr(r, cost) - getattr(champion, cost)) <= noise
        ):
            what, unit = _what(cost)
            out.append(
                f"{named} has {r.psnr - champion.psnr:+.3f} dB over the champion at a {what} within the "
                f"measurement noise of the champion's ({getattr(r, cost) - getattr(champion, cost):+.3g} "
                f"{unit}, +/-{noise:.3g}): on this device it is at least as good a model. References "
                "are never made champion."
            )
    return out


def _figures(r: Row, cost: str) -> str:
    out = f"latency {r.latency_ms_mean:.3f} ms mean"
    if r.latency_ms_std is not None:
        out += f" (SD {r.latency_ms_std:.3g} ms across windows)"
    if r.power_mw is not None:
        out = f"power {r.power_mw:.0f} mW, " + out
    if cost == ENERGY:
        out = f"energy {r.energy_mj_per_image:.4g} mJ/image, " + out
    return out


# ---------------------------------------------------------------------------------------- reporting


def table(rows: tuple[Row, ...] | list[Row], markdown: bool = False) -> str:
    """One line per candidate; ``*`` marks the champion."""

    def num(value: float | None, fmt: str) -> str:
        return "-" if value is None or not math.isfinite(value) else format(value, fmt)

    knobs = knob_columns([r.knobs for r in rows])
    head = ["", "version", "run", *(k.column for k in knobs), "PSNR-Y", "mean ms", "SD ms", "p50 ms"]
    head += ["p99 ms", "power mW", "mJ/image", "status", "front", "limits", "note"]
    left = {"version", "run", "status", "front", "limits", "note"}  # the others are numbers
    body = []
    for r in rows:
        limits = "" if r.within_limits is None else ("yes" if r.within_limits else "no")
        body.append(
            [
                "*" if r.chosen else "",
                f"v{r.version}",
                r.run_name[:24],
                *(k.show(r.knobs[k.name]) if k.name in r.knobs else "-" for k in knobs),
                num(r.psnr, ".3f"),
                num(r.latency_ms_mean, ".3f"),
                num(r.latency_ms_std, ".3f"),
                num(r.latency_ms_p50, ".3f"),
                num(r.latency_ms_p99, ".3f"),
                num(r.power_mw, ".0f"),
                num(r.energy_mj_per_image, ".4g"),
                r.status,
                "yes" if r.on_front else "",
                limits,
                r.note.replace("|", "/").replace("\n", " ")[:60],
            ]
        )
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        return "\n".join(lines + ["| " + " | ".join(cells) + " |" for cells in body])
    widths = [max(len(x) for x in column) for column in zip(head, *body)]
    return "\n".join(
        "  ".join(
            x.ljust(w) if name in left else x.rjust(w) for name, x, w in zip(head, cells, widths)
        ).rstrip()
        for cells in [head, *body]
    )


def log_selection_report(
    handle: study.Study, selection: Selection, title: str, trials: list, cost: str
) -> None:
    """The study's one Pareto plot (``pareto/pareto.png`` and ``.html``, replacing the search's):
    its trials against the search's cost on the left, the measured candidates against the cost
    compared here on the right, the champion starred; the table and the choice under ``selection/``."""
    from search import report

    measured = [r for r in selection.rows if r.within_limits is not None]
    plot_rows = [
        {
            "quality": r.psnr,
            "cost": getattr(r, selection.cost),
            "label": r.label,
            "on_front": r.on_front,
            "chosen": r.chosen,
        }
        for r in measured
    ]
    fields, _ = objectives(selection.cost)
    panel = {
        "rows": plot_rows,
        "cost": f"{selection.device} {selection.cost} (measured)",
        "title": f"chosen: front over {', '.join(_label(f) for f in fields)}"
        + (f"\nwithin {selection.limits.describe()}" if selection.limits.checks() else ""),
    }
    report.log_front_plot(handle, trials, cost, title, selection=panel)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        (out / "table.md").write_text(f"{table(selection.rows, markdown=True)}\n\n{selection.message}\n")
        (out / "selection.json").write_text(json.dumps(selection.to_dict(), indent=2))
        handle.log_artifacts(out, study.SELECTION_DIR)


def select_champion(
    tracking_uri: str,
    experiment: str,
    *,
    device: str | None = None,
    limits: Limits = Limits(),
    rule: str = "knee",
    model_name: str = contract.REGISTERED_MODEL,
    study_run_id: str | None = None,
    log_report: bool = True,
) -> Selection:
    """Choose the study's champion among its measured candidates and mark it in the registry.

    Args:
        device: device type whose measurements count; None: the one with the most ``done``.
        study_run_id: the study run; None: the experiment's latest.
        log_report: log the plot and tables under ``selection/`` on the study run.

    Returns:
        The selection; the champion now carries the alias ``champion``.

    Raises:
        ValueError: no such experiment, study run or rule.
        SelectionError: nothing measured yet, or nothing within the limits (the alias is untouched).
    """
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
    tracking_uri = mlflow_util.absolute_tracking_uri(tracking_uri)
    client = mlflow_util.client(tracking_uri)
    experiment_id, study_run_id = find_study(client, tracking_uri, experiment, study_run_id)
    versions = study.registered_versions(client, experiment_id, model_name, study_run_id)
    if not versions:
        raise SelectionError(
            f"study run {study_run_id} has no registered versions of '{model_name}': the search registers "
            "its Pareto candidates when it finishes; run or resume it first."
        )
    device = device or busiest_device([v for v, _ in versions])
    if device is None:
        raise ValueError(
            f"no version of '{model_name}' has an edge.<device>.status tag: name the device with --device"
        )
    contract.status_tag(device)  # a ValueError naming the rule for device names
    rows = [make_row(v, run, device) for v, run in versions]
    handle = study.Study.of_run(tracking_uri, study_run_id)
    previous = handle.alias_version(model_name, contract.CHAMPION_ALIAS)
    kept = f"The '{contract.CHAMPION_ALIAS}' alias stays on " + (
        f"v{previous}." if previous else "no version."
    )
    if not any(r.measured and not r.reference for r in rows):
        rows = [r for r in rows if not r.reference] or rows
        states = [
            r.status if r.status != contract.DONE else ("unstable" if r.unstable else "done without figures")
            for r in rows
        ]
        summary = ", ".join(f"{states.count(s)} {s}" for s in dict.fromkeys(states))
        raise SelectionError(
            f"none of the {len(rows)} candidates of study run {study_run_id} is measured on {device} "
            f"({summary}). The edge agent must measure them first: "
            f"edge-agent run --device {device} --tracking-uri {tracking_uri}. {kept}",
            Selection(tuple(rows), None, device, None, "", rule, limits, study_run_id),
        )
    try:
        selection = replace(rank(rows, device, limits, rule), study_run_id=study_run_id)
    except SelectionError as exc:
        partial = replace(exc.selection, study_run_id=study_run_id) if exc.selection else None
        raise SelectionError(f"{exc} {kept}", partial) from None
    champion = selection.champion
    handle.set_alias(model_name, contract.CHAMPION_ALIAS, champion.version)
    moved = (
        f"alias '{contract.CHAMPION_ALIAS}' was already on v{champion.version}."
        if previous == champion.version
        else f"alias '{contract.CHAMPION_ALIAS}' set on v{champion.version}"
        + (f" (was v{previous})." if previous else ".")
    )
    selection = replace(selection, message=f"{selection.message} {moved}")
    handle.set_tags(
        {
            study.TAG_CHAMPION: champion.version,
            study.TAG_RULE: rule,
            study.TAG_DEVICE: device,
            study.TAG_LIMITS: limits.describe(),
        }
    )
    trial_run = {str(v.version): v.tags.get(contract.TAG_TRIAL_RUN) or v.run_id for v, _ in versions}
    for version in {previous, champion.version} - {None}:  # the old champion's trial run loses its mark
        if version in trial_run:
            handle.mark_champion_run(trial_run[version], version == champion.version)
    from search import report

    # the search's trials, read once for the study page and the plot
    cost = handle.params().get("cost", "flops_g")
    trials = report.with_front(handle.trials(cost, model_name=model_name))
    describe_champion(handle, selection, model_name, previous, trials, cost)
    if log_report:
        log_selection_report(handle, selection, experiment, trials, cost)
    return selection


CHAMPION_NOTE = "**Champion**"  # the paragraph selection adds to the chosen version's description


def describe_champion(
    handle: study.Study,
    selection: Selection,
    model_name: str,
    previous: str | None,
    trials: list,
    cost: str,
) -> None:
    """Why the champion won, where users look: the study run's description says it once ("Champion":
    the choice, what it trades against the runner-up, how to load it; "Result": the front with the
    device's figures); the champion version's description points there; a version that lost the
    alias loses its paragraph. ``trials``: the search's rows with their front, against ``cost``."""
    from search import report

    champion = selection.champion
    uri = f"models:/{model_name}@{contract.CHAMPION_ALIAS}"
    load = f'Load it with `mlflow.onnx.load_model("{uri}")` (an ONNX model).'
    # first and short: the UI shows about 150 px of a description before "Show more"
    figures = f"{champion.psnr:.2f} dB, {_figures(champion, selection.cost)}"
    head = f"**v{champion.version}** (`{champion.name}`) on {selection.device}: {figures}."
    handle.describe("Champion", " ".join(x for x in (head, selection.trade, load) if x))
    handle.describe("Why", selection.message)
    if trials:  # a study the search ran (not references alone): its front, now with the device's figures
        measured = {r.version: r for r in selection.rows}
        summary = report.summarize(trials)
        text = report.describe_result(trials, summary, cost, selection.device, measured, handle.experiment_id)
        handle.describe("Result", text)
    for version in {previous, champion.version} - {None}:
        text = handle.version_description(model_name, version)
        kept = [p for p in text.split("\n\n") if p and not p.startswith(CHAMPION_NOTE)]
        if version == champion.version:
            kept.append(
                f"{CHAMPION_NOTE} of study run `{selection.study_run_id}` on {selection.device} (rule "
                f"{selection.rule}): why it won is on the study run's page. Load it as `{uri}`."
            )
        handle.set_version_description(model_name, version, "\n\n".join(kept))


# ---------------------------------------------------------------------------------------- CLI


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m search.selection", description=__doc__.split("\n")[0])
    p.add_argument("--experiment", required=True, help="MLflow experiment of the search")
    default_uri = SearchConfig.tracking_uri
    p.add_argument("--tracking-uri", default=default_uri, help=f"MLflow tracking URI (default {default_uri})")
    p.add_argument(
        "--model-name", default=contract.REGISTERED_MODEL, help="registered model of the candidates"
    )
    p.add_argument("--study", help="study run id (default: the experiment's latest study run)")
    p.add_argument("--device", help="device type (default: the one with the most done measurements)")
    p.add_argument(
        "--max-power-mw", type=argtypes.positive_float, help="limit on the mean power while running, mW"
    )
    p.add_argument("--max-latency-ms", type=argtypes.positive_float, help="limit on the mean latency, ms")
    p.add_argument("--min-psnr", type=argtypes.finite_float, help=f"limit on {QUALITY}, dB")
    p.add_argument("--rule", choices=RULES, default="knee", help="how to choose on the front (default knee)")
    p.add_argument("--json", action="store_true", help="print a JSON summary instead of the table")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    problem = contract.credential_problem(args.tracking_uri)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    preflight.limit_mlflow_retries()
    problem = preflight.study_store_problem(args.tracking_uri)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 1
    from mlflow.exceptions import MlflowException

    try:
        limits = Limits(args.max_power_mw, args.max_latency_ms, args.min_psnr)
        selection = select_champion(
            args.tracking_uri,
            args.experiment,
            device=args.device,
            limits=limits,
            rule=args.rule,
            model_name=args.model_name,
            study_run_id=args.study,
        )
    except ValueError as exc:  # no such experiment, study run or device: as the flags name them
        return errors.fail(exc, code=errors.USAGE)
    except SelectionError as exc:
        if args.json:
            out = exc.selection.to_dict() if exc.selection else {"champion_version": None}
            print(json.dumps({**out, "message": str(exc)}, indent=2))
        else:
            if exc.selection:
                print(table(exc.selection.rows))
            print(f"no champion: {exc}", file=sys.stderr)
        return 1
    except MlflowException as exc:  # e.g. the server went away mid-way, a name MLflow refuses
        first = (exc.message or type(exc).__name__).strip().splitlines()[0]
        print(f"error: MLflow at {args.tracking_uri} failed the request: {first}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(selection.to_dict(), indent=2))
    else:
        print(table(selection.rows))
        print(selection.message)
    return 0


if __name__ == "__main__":
    sys.exit(main())
