"""The search judged at equal compute on LCBench: schedulers and searchers over seeds and tasks.

    python -m benchmarks.bench_lcbench --tasks 3945 7593 --seeds 10 --trials 60 \\
        --schedulers none,pareto,moasha,asha --searchers random,tpe,nsga2 --out outputs/lcbench

Each run is one Ray Tune study through ``search.engine`` (the code SR studies run): the trainable
``benchmarks.lcbench.lcbench_trial`` reports one epoch per step of YAHPO Gym's LCBench surrogate,
Optuna searches (validation accuracy up, training time down), the scheduler stops trials.

Written to ``--out``:
- ``runs/<task>/<scheduler>_<searcher>_s<seed>.json``: the trials, and the hypervolume against
  cumulative epochs (trials taken in the order they ended; the hypervolume counts fully trained
  trials, normalised by the task's reference box, see ``lcbench.reference_point``). A run whose
  file exists is not run again, so an interrupted benchmark continues where it stopped.
- ``hv_vs_epochs.png``: mean +- standard error over the seeds, one panel per task.
- ``summary.json``: ``{task: {"<scheduler>/<searcher>": {hv_mean, hv_se, epochs_mean, epochs_se,
  n}}}``, the final hypervolume and cumulative epochs over the seeds.
- ``comparisons.json`` and ``comparisons.md``: the comparisons at equal compute that
  docs/benchmarks.md reports (``--baseline`` scheduler and searcher, default pareto/tpe).

``--pareto KEY=VALUE ...`` sets our scheduler's rule (``search.engine.StoppingRule``); runs with a
non-default rule are named ``pareto[KEY=VALUE,...]``.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import logging
import math
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, fields, replace
from pathlib import Path

from benchmarks import lcbench
from edge_agent.fileio import atomic_write_bytes
from search import engine
from search.pareto import hypervolume_2d
from search.searcher import SAMPLERS

SCHEDULERS = (*engine.SCHEDULERS, "syne-moasha")  # the last: Syne Tune's own (benchmarks/syne_moasha.py)
GOAL = engine.Objectives(lcbench.QUALITY, lcbench.COST, lcbench.RUNG, lcbench.BUDGET, first_rung=1)


# ---------------------------------------------------------------------------- one run


def scheduler_label(name: str, rule: engine.StoppingRule) -> str:
    """``pareto`` on the default rule, ``pareto[min_rung=2,...]`` on another; other names as is."""
    if name != "pareto":
        return name
    default = engine.StoppingRule()
    changed = [
        f"{f.name}={getattr(rule, f.name):g}"
        if not isinstance(getattr(rule, f.name), str)
        else f"{f.name}={getattr(rule, f.name)}"
        for f in fields(rule)
        if getattr(rule, f.name) != getattr(default, f.name)
    ]
    return f"pareto[{','.join(changed)}]" if changed else "pareto"


def run_one(
    folder: str,
    task: str,
    scheduler: str,
    searcher: str,
    seed: int,
    trials: int,
    rule: engine.StoppingRule,
    max_concurrent: int,
    cpus: float,
) -> dict:
    """One study; returns what ``runs/...json`` holds."""
    from ray import tune

    from search import compat

    space = functools.partial(lcbench.define_space, folder=folder)  # picklable: Tune saves the searcher
    search_alg = engine.make_searcher(searcher, space, GOAL, seed=seed)
    if scheduler == "syne-moasha":
        from benchmarks.syne_moasha import SyneTuneMOASHA

        sched = SyneTuneMOASHA(GOAL, seed)
    else:
        sched = engine.make_scheduler(scheduler, GOAL, rule)
    trainable = tune.with_resources(
        tune.with_parameters(lcbench.lcbench_trial, folder=folder, task=task), {"cpu": cpus / max_concurrent}
    )
    storage = tempfile.mkdtemp(prefix="lcbench-ray-")
    start = time.monotonic()
    try:
        results = engine.tune_run(
            trainable,
            search_alg,
            sched,
            trials,
            "run",
            storage,
            max_concurrent=max_concurrent,
            verbose=0,
        )
    finally:
        shutil.rmtree(storage, ignore_errors=True)
    wall = time.monotonic() - start
    rows = []
    for r in results:
        m = r.metrics or {}
        rows.append(
            {
                "config": {k: v for k, v in (r.config or {}).items()},
                "epochs": int(m.get(GOAL.rung, 0)),
                GOAL.quality: m.get(GOAL.quality),
                GOAL.cost: m.get(GOAL.cost),
                "end": m.get("clock"),
                "error": str(r.error)[:300] if r.error else None,
            }
        )
    states: dict[str, int] = {}
    for t in compat.optuna_study(search_alg).trials:
        states[t.state.name] = states.get(t.state.name, 0) + 1
    return {
        "task": task,
        "scheduler": scheduler_label(scheduler, rule),
        "searcher": searcher,
        "seed": seed,
        "rule": asdict(rule) if scheduler == "pareto" else None,
        "wall_s": wall,
        "optuna_states": states,
        "trials": rows,
    }


def curve(run: dict, reference: tuple[float, float]) -> list[tuple[int, float]]:
    """(cumulative epochs, normalised hypervolume) after each trial, in the order trials ended."""
    q_ref, c_ref = reference
    box = (100.0 - q_ref) * c_ref
    done = sorted((t for t in run["trials"] if t["end"] is not None), key=lambda t: t["end"])
    points, out, epochs = [], [], 0
    for t in done:
        epochs += t["epochs"]
        if t["epochs"] >= GOAL.budget and t[GOAL.quality] is not None and t[GOAL.cost] is not None:
            points.append((t[GOAL.quality], t[GOAL.cost]))
        out.append((epochs, hypervolume_2d(points, reference) / box))
    return out


def hv_at(points: list[tuple[int, float]], epochs: float) -> float:
    """The hypervolume a run had reached when it had spent ``epochs`` (0 before its first trial)."""
    return max((hv for e, hv in points if e <= epochs), default=0.0)


# ---------------------------------------------------------------------------- over the runs


def mean_se(xs: list[float]) -> tuple[float, float]:
    """Mean and standard error of the mean (0 for a single value)."""
    m = statistics.fmean(xs)
    return m, (statistics.stdev(xs) / math.sqrt(len(xs)) if len(xs) > 1 else 0.0)


def load_runs(out: Path) -> list[dict]:
    runs = [json.loads(p.read_text()) for p in sorted((out / "runs").glob("*/*.json"))]
    references = json.loads((out / "references.json").read_text())
    for r in runs:
        r["curve"] = curve(r, tuple(references[r["task"]]))
    return runs


def summarise(runs: list[dict]) -> dict:
    """``summary.json``: per task and "<scheduler>/<searcher>", final hypervolume and epochs."""
    groups: dict[str, dict[str, list[dict]]] = {}
    for r in runs:
        groups.setdefault(r["task"], {}).setdefault(f"{r['scheduler']}/{r['searcher']}", []).append(r)
    summary = {}
    for task, combos in groups.items():
        summary[task] = {}
        for key, rs in sorted(combos.items()):
            hv_m, hv_se = mean_se([r["curve"][-1][1] if r["curve"] else 0.0 for r in rs])
            ep_m, ep_se = mean_se([r["curve"][-1][0] if r["curve"] else 0.0 for r in rs])
            summary[task][key] = {
                "hv_mean": hv_m,
                "hv_se": hv_se,
                "epochs_mean": ep_m,
                "epochs_se": ep_se,
                "n": len(rs),
            }
    return summary


def _by(runs: list[dict]) -> dict[tuple[str, str, str], dict[int, dict]]:
    out: dict[tuple[str, str, str], dict[int, dict]] = {}
    for r in runs:
        out.setdefault((r["task"], r["scheduler"], r["searcher"]), {})[r["seed"]] = r
    return out


def equal_compute(a: dict[int, dict], b: dict[int, dict]) -> dict | None:
    """a's hypervolume minus b's, each seed at the compute the cheaper of the two spent."""
    diffs, budgets = [], []
    for seed in sorted(set(a) & set(b)):
        ca, cb = a[seed]["curve"], b[seed]["curve"]
        if not ca or not cb:
            continue
        e = min(ca[-1][0], cb[-1][0])
        diffs.append(hv_at(ca, e) - hv_at(cb, e))
        budgets.append(e)
    if not diffs:
        return None
    m, se = mean_se(diffs)
    return {"diff_mean": m, "diff_se": se, "n": len(diffs), "epochs_mean": statistics.fmean(budgets)}


def compare(runs: list[dict], baseline: str, searcher: str) -> dict:
    """The figures the targets are judged on, per task and pooled over the tasks:

    - for each scheduler against "none" (same searcher, same trials): epochs saved, final
      hypervolume kept;
    - ``baseline`` against every other scheduler at equal compute (same searcher);
    - with ``baseline``, ``searcher`` and every other searcher against random at equal compute.
    """
    by = _by(runs)
    tasks = sorted({r["task"] for r in runs}, key=int)
    out: dict = {"baseline": baseline, "searcher": searcher, "tasks": {}}
    for task in tasks:
        t: dict = {"vs_none": {}, "vs_scheduler": {}, "vs_random": {}}
        for (tk, sched, srch), seeds in by.items():
            if tk != task or srch != searcher:
                continue
            none = by.get((task, "none", srch))
            if none and sched != "none":
                e = statistics.fmean(r["curve"][-1][0] for r in seeds.values())
                e0 = statistics.fmean(r["curve"][-1][0] for r in none.values())
                hv = statistics.fmean(r["curve"][-1][1] for r in seeds.values())
                hv0 = statistics.fmean(r["curve"][-1][1] for r in none.values())
                t["vs_none"][sched] = {
                    "epochs_saved": 1 - e / e0,
                    "hv_kept": hv / hv0 if hv0 else float("nan"),
                }
            base = by.get((task, baseline, srch))
            if base and sched != baseline:
                t["vs_scheduler"][sched] = equal_compute(base, seeds)
        for (tk, sched, srch), seeds in by.items():
            if tk == task and sched == baseline and srch != "random" and (task, baseline, "random") in by:
                t["vs_random"][srch] = equal_compute(seeds, by[(task, baseline, "random")])
        out["tasks"][task] = t
    pooled: dict = {"vs_none": {}, "vs_scheduler": {}, "vs_random": {}}
    for part in pooled:
        names = {n for t in out["tasks"].values() for n, v in t[part].items() if v}
        for n in names:
            vals = [t[part][n] for t in out["tasks"].values() if t[part].get(n)]
            if part == "vs_none":
                pooled[part][n] = {
                    k: statistics.fmean(v[k] for v in vals) for k in ("epochs_saved", "hv_kept")
                }
            else:  # per-seed differences pooled over the tasks
                diffs = [v["diff_mean"] for v in vals]
                se = math.sqrt(sum(v["diff_se"] ** 2 for v in vals)) / len(vals)
                pooled[part][n] = {"diff_mean": statistics.fmean(diffs), "diff_se": se, "tasks": len(vals)}
    out["pooled"] = pooled
    return out


def comparisons_markdown(c: dict) -> str:
    b, s = c["baseline"], c["searcher"]
    lines = [f"Baseline scheduler `{b}`, searcher `{s}` (hypervolume normalised; differences x1000).", ""]
    lines += [
        "| task | scheduler | epochs saved vs none | HV kept vs none | HV("
        + b
        + ") - HV(it) at equal epochs |"
    ]
    lines += ["|---|---|---:|---:|---:|"]
    for task, t in [*c["tasks"].items(), ("pooled", c["pooled"])]:
        for sched in sorted(set(t["vs_none"]) | set(t["vs_scheduler"])):
            vn, vs = t["vs_none"].get(sched), t["vs_scheduler"].get(sched)
            saved = f"{100 * vn['epochs_saved']:.0f}%" if vn else ""
            kept = f"{100 * vn['hv_kept']:.1f}%" if vn else ""
            diff = f"{1000 * vs['diff_mean']:+.2f} ± {1000 * vs['diff_se']:.2f}" if vs else ""
            lines.append(f"| {task} | {sched} | {saved} | {kept} | {diff} |")
    lines += [
        "",
        f"| task | searcher | HV(it) - HV(random) at equal epochs, scheduler `{b}` (x1000) | > 2 SE |",
    ]
    lines += ["|---|---|---:|:---:|"]
    for task, t in [*c["tasks"].items(), ("pooled", c["pooled"])]:
        for srch, v in sorted(t["vs_random"].items()):
            if v:
                yes = "yes" if v["diff_mean"] > 2 * v["diff_se"] else "no"
                lines.append(
                    f"| {task} | {srch} | {1000 * v['diff_mean']:+.2f} ± {1000 * v['diff_se']:.2f} | {yes} |"
                )
    return "\n".join(lines) + "\n"


def plot(runs: list[dict], path: Path) -> None:
    """Hypervolume against cumulative epochs, mean +- SE over seeds, one panel per task."""
    from matplotlib.figure import Figure

    tasks = sorted({r["task"] for r in runs}, key=int)
    fig = Figure(figsize=(5 * len(tasks), 4), dpi=110)
    axes = fig.subplots(1, len(tasks), squeeze=False)[0]
    for ax, task in zip(axes, tasks):
        combos: dict[str, list[dict]] = {}
        for r in runs:
            if r["task"] == task:
                combos.setdefault(f"{r['scheduler']}/{r['searcher']}", []).append(r)
        for key, rs in sorted(combos.items()):
            end = statistics.median(r["curve"][-1][0] for r in rs if r["curve"])
            grid = [end * i / 50 for i in range(51)]
            values = [[hv_at(r["curve"], e) for r in rs] for e in grid]
            m = [statistics.fmean(v) for v in values]
            se = [mean_se(v)[1] for v in values]
            (line,) = ax.plot(grid, m, label=key)
            ax.fill_between(
                grid,
                [a - b for a, b in zip(m, se)],
                [a + b for a, b in zip(m, se)],
                color=line.get_color(),
                alpha=0.15,
            )
        ax.set_title(f"LCBench task {task}")
        ax.set_xlabel("cumulative epochs")
        ax.set_ylabel("hypervolume (normalised)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)


def report(out: Path, baseline: str, searcher: str) -> dict:
    runs = load_runs(out)
    summary = summarise(runs)
    atomic_write_bytes(out / "summary.json", json.dumps(summary, indent=1).encode())
    c = compare(runs, baseline, searcher)
    atomic_write_bytes(out / "comparisons.json", json.dumps(c, indent=1).encode())
    md = comparisons_markdown(c)
    atomic_write_bytes(out / "comparisons.md", md.encode())
    plot(runs, out / "hv_vs_epochs.png")
    print(md)
    return summary


# ---------------------------------------------------------------------------- command line


def parse_rule(pairs: list[str]) -> engine.StoppingRule:
    rule = engine.StoppingRule()
    known = {f.name: f.type for f in fields(rule)}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or key not in known:
            raise SystemExit(f"error: --pareto takes KEY=VALUE with KEY one of {sorted(known)}, got {pair!r}")
        try:
            typed = value if key == "rule" else (int(value) if key == "min_rung" else float(value))
        except ValueError:
            raise SystemExit(f"error: --pareto {key} must be a number, got {value!r}") from None
        try:
            rule = replace(rule, **{key: typed})  # a StoppingRule checks its values
        except ValueError as exc:
            raise SystemExit(f"error: --pareto: {exc}") from None
    return rule


def names(value: str, allowed: tuple[str, ...], flag: str) -> list[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    bad = [v for v in items if v not in allowed]
    if bad or not items:
        raise argparse.ArgumentTypeError(
            f"{flag} takes a comma-separated list of {', '.join(allowed)}; got {value!r}"
        )
    return items


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tasks", nargs="+", default=list(lcbench.TASKS), help="OpenML task ids")
    p.add_argument("--seeds", type=int, default=10, help="seeds 0..N-1 for every combination")
    p.add_argument("--trials", type=int, default=60, help="trials per study")
    p.add_argument(
        "--schedulers",
        type=lambda v: names(v, SCHEDULERS, "--schedulers"),
        default=list(engine.SCHEDULERS),
    )
    p.add_argument(
        "--searchers", type=lambda v: names(v, SAMPLERS, "--searchers"), default=["random", "tpe", "nsga2"]
    )
    p.add_argument("--pareto", nargs="*", default=[], metavar="KEY=VALUE", help="our scheduler's rule")
    p.add_argument("--out", default="outputs/bench_lcbench")
    p.add_argument(
        "--data", help="the surrogate's folder (default $LCBENCH_DATA or ../shared/bench/yahpo-lcbench)"
    )
    p.add_argument("--max-concurrent", type=int, default=4)
    p.add_argument("--baseline", default="pareto", help="the scheduler the comparisons are made against")
    p.add_argument("--baseline-searcher", default="tpe")
    p.add_argument("--report-only", action="store_true", help="only write the summary and plot of --out")
    args = p.parse_args(argv)
    if args.seeds < 1 or args.trials < 1 or args.max_concurrent < 1:
        print("error: --seeds, --trials and --max-concurrent must be at least 1", file=sys.stderr)
        return 2
    rule = parse_rule(args.pareto)
    try:
        folder = str(lcbench.data_dir(args.data))
    except lcbench.SurrogateMissing as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    refs_path = out / "references.json"
    refs = json.loads(refs_path.read_text()) if refs_path.exists() else {}
    for task in args.tasks:
        try:
            refs.setdefault(task, list(lcbench.reference_point(folder, task)))
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    atomic_write_bytes(refs_path, json.dumps(refs, indent=1).encode())
    if not args.report_only:
        # no per-trial result files; restored after, so that a caller's later Tune runs keep theirs
        logger_setting = os.environ.get("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS")
        os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = "1"
        import ray

        # without those files, each ResultGrid warns it found none; the last results are in memory
        logging.getLogger("ray.tune.analysis.experiment_analysis").setLevel(logging.ERROR)

        cpus = float(os.cpu_count() or 1)
        # a Ray of its own: never join a cluster that `ray start` left on this machine
        ray.init(address="local", num_cpus=int(cpus), include_dashboard=False, log_to_driver=False)
        print(
            f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
            f"Ray {ray.__version__}; {args.trials} trials per study, {args.max_concurrent} at a time",
            flush=True,
        )
        try:
            for task, seed, sched, srch in itertools.product(
                args.tasks, range(args.seeds), args.schedulers, args.searchers
            ):
                label = scheduler_label(sched, rule)
                path = out / "runs" / task / f"{label}_{srch}_s{seed}.json"
                if path.exists():
                    continue
                run = run_one(folder, task, sched, srch, seed, args.trials, rule, args.max_concurrent, cpus)
                path.parent.mkdir(parents=True, exist_ok=True)
                atomic_write_bytes(path, json.dumps(run).encode())
                (epochs, hv), *_ = reversed(curve(run, tuple(refs[task])) or [(0, 0.0)])
                print(
                    f"task {task} {label}/{srch} seed {seed}: HV {hv:.4f} after {epochs} epochs, "
                    f"{run['wall_s']:.1f} s",
                    flush=True,
                )
        finally:
            ray.shutdown()
            if logger_setting is None:
                os.environ.pop("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", None)
            else:
                os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = logger_setting
    report(out, args.baseline, args.baseline_searcher)
    return 0


if __name__ == "__main__":
    sys.exit(main())
