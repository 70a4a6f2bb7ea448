"""A real study on this machine's CPU, end to end, beside the models it has to beat.

    bash benchmarks/real_study.sh OUT
    python -m benchmarks.real_study --out OUT [--config search/configs/cpu.yaml] \
        [--train-data PHOTOS] [--val-images 10] [--bench BENCH] [--teacher dvmsr:PATH]

Stages, each done once: run it again with the same OUT after a crash or a kill -9 and it goes on
where it stopped (``OUT/stages.json`` holds what each finished stage took, and which stages were
interrupted and run again: their time is their last attempt's):

- split: ``OUT/data/train`` and ``OUT/data/val``, links to the photos of ``--train-data``; the last
  ``--val-images`` by file name are held out, the validation set trials are judged on (the test
  sets Set5, Set14 and BSD100 are never used for a choice).
- study: ``search/run.py --config CONFIG`` on them: the teacher, the trials, the front's
  finalization, registration, the local agent's measurements on this CPU, selection (``--resume``
  when an earlier attempt was interrupted).
- references, trained into the study's experiment as runs tagged ``search.reference`` and
  registered as its candidates are: the paper's hand pick (C 32, rank 2, alpha 0.8) with the
  study's recipe and initialisation for the champion's total steps (its trial's plus its
  finalization's); the convolutional nets of ``model/conv.py`` (fsrcnn, espcn, fsrcnn-student)
  with the same recipe, steps and alpha as the champion, from scratch; and bicubic.
- measure: the local agent measures them, with nothing else running.
- select: selection again; the references are in its table, never chosen, and it says when one
  dominates the champion.
- evaluate: each entry's ONNX (static 1x3x64x64, as registered) through 64x64 tiles in ONNX
  Runtime on Set5, Set14 and BSD100 (``--bench``).
- summary: ``OUT/summary.json`` (shape below) and ``OUT/front.png``.

summary.json: ``{"wall_s", "stages_s", "search_cpu_s", "champion": E, "hand_pick": E, "front": [E],
"references": [E], "resumed_stages", "selection" (its message)}``; each E is ``{"name", "knobs"
(or null), "params", "gflops" (at 64x64), "onnx",
"psnr_y": {"Set5", "Set14", "BSD100"}, "ssim_y": {...}, "val_psnr_y", "latency_ms_mean",
"latency_ms_sd", "cpu_s"}``: latency as the agent measured it (the mean over its windows and the
standard deviation across them), ``cpu_s`` the CPU seconds spent training that model (a candidate:
its trial and its finalization). ``search_cpu_s`` is every trial's and finalization's.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

from edge_agent import argtypes

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
HAND_PICK = {"embed_dim": 32, "rank": 2, "alpha": 0.8}  # the seed paper's student
CONV_REFERENCES = ("fsrcnn", "espcn", "fsrcnn-student")  # model/conv.py's presets
SETS = ("Set5", "Set14", "BSD100")


class Stages:
    """``OUT/stages.json``: the wall time of each stage done (a stage done is not run again), and
    the stages that were interrupted and run again (their time is the last attempt's only)."""

    def __init__(self, out: Path):
        self.path = out / "stages.json"
        saved = json.loads(self.path.read_text()) if self.path.exists() else {}
        self.done: dict[str, float] = saved.get("done", {})
        self.started: list[str] = saved.get("started", [])
        self.resumed: list[str] = saved.get("resumed", [])

    def _save(self) -> None:
        from edge_agent.fileio import atomic_write_bytes

        state = {"done": self.done, "started": self.started, "resumed": self.resumed}
        atomic_write_bytes(self.path, json.dumps(state, indent=1).encode())

    def run(self, name: str, fn, *args):
        if name in self.done:
            print(f"[{time.strftime('%T')}] {name}: done before ({self.done[name]:.0f} s)", flush=True)
            return None
        if name in self.started and name not in self.resumed:
            self.resumed.append(name)
        self.started.append(name)
        self._save()
        print(f"[{time.strftime('%T')}] {name}", flush=True)
        t0 = time.monotonic()
        result = fn(*args)
        self.done[name] = time.monotonic() - t0
        self._save()
        return result


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.real_study", description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="where everything goes (a rerun continues it)")
    p.add_argument("--config", type=Path, default=ROOT / "search" / "configs" / "cpu.yaml")
    p.add_argument("--train-data", type=Path, default=SHARED / "data" / "train" / "SunHays80" / "HR")
    p.add_argument("--val-images", type=argtypes.positive_int, default=10)
    p.add_argument(
        "--bench", type=Path, default=SHARED / "data" / "sr-benchmarks", help="holds Set5, Set14, BSD100"
    )
    p.add_argument("--teacher", help="the study's teacher (teacher.checkpoint; default: the config's)")
    return p.parse_args(argv)


class Run:
    """What the stages share: the paths, the study's configuration, its MLflow handles."""

    def __init__(self, args: argparse.Namespace):
        from search.config import load_config

        self.args, self.out = args, args.out.resolve()
        self.tracking_uri = f"sqlite:///{self.out / 'mlflow.db'}"
        self.train_dir, self.val_dir = self.out / "data" / "train", self.out / "data" / "val"
        self.teacher = teacher = args.teacher
        overrides = {
            "tracking_uri": self.tracking_uri,
            "storage_dir": str(self.out / "search"),
            "training.train_data": [str(self.train_dir)],
            "training.val_data": [str(self.val_dir)],
        }
        if teacher:
            overrides["teacher.checkpoint"] = teacher
        self.cfg = load_config(args.config, overrides)

    # -------------------------------------------------------------------------------- the study

    def search_command(self, resume: bool) -> list[str]:
        cmd = [sys.executable, str(ROOT / "search" / "run.py"), "--config", str(self.args.config)]
        cmd += ["--tracking-uri", self.tracking_uri, "--storage-dir", str(self.out / "search")]
        cmd += ["--train-data", str(self.train_dir), "--val-data", str(self.val_dir)]
        cmd += ["--json", str(self.out / "study.json")]
        if self.teacher:
            cmd += ["--teacher", self.teacher]
        return cmd + (["--resume"] if resume else [])

    def study(self) -> None:
        resume = (self.out / "search" / "LATEST").exists()  # an earlier attempt started it
        cmd = self.search_command(resume)
        print(" ".join(cmd), flush=True)
        with open(self.out / "study.log", "ab") as log:
            code = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        if code != 0:
            tail = (self.out / "study.log").read_text(errors="replace").splitlines()[-20:]
            raise SystemExit(
                f"error: the study exited {code}; the end of {self.out / 'study.log'}:\n" + "\n".join(tail)
            )

    def handle(self):
        """The study's ``search.study.Study`` (from OUT/study.json, which the study stage wrote)."""
        from search import mlflow_util, study

        run_id = json.loads((self.out / "study.json").read_text())["study_run_id"]
        run = mlflow_util.client(self.tracking_uri).get_run(run_id)
        return study.Study(
            self.tracking_uri, run.info.experiment_id, run_id, run.info.run_name, self.cfg.training.iterations
        )

    def context(self):
        """A trial's view of the study (``search.trainable.StudyContext``): its recipe, teacher, init."""
        from search import stages
        from search.trainable import StudyContext

        handle = self.handle()
        init, _ = stages.student_init(self.cfg, handle, handle.teacher_uri)
        return StudyContext(self.cfg.to_dict(), handle, handle.teacher_uri, init=init)

    # ---------------------------------------------------------------------------- the references

    def champion(self) -> tuple[dict, int]:
        """(the champion's knobs, its total training steps: its trial's plus its finalization's)."""
        from mlflow.exceptions import MlflowException

        from edge_agent import contract
        from search import config, mlflow_util, study

        c = mlflow_util.client(self.tracking_uri)
        try:
            version = c.get_model_version_by_alias(self.cfg.registry.model_name, contract.CHAMPION_ALIAS)
        except MlflowException:
            log = self.out / "study.log"
            said = [
                line for line in log.read_text(errors="replace").splitlines() if line.startswith("selection:")
            ]
            why = said[-1] if said else f"no 'selection:' line in {log}"
            raise SystemExit(
                f"error: the study chose no champion, and the references are trained as long as it was; "
                f"the study said: {why}\nMeasure its candidates and choose one as it says (then "
                f"`python -m search.selection --experiment {self.cfg.experiment} --tracking-uri "
                f"{self.tracking_uri} --model-name {self.cfg.registry.model_name}`), and run this command "
                "again: it goes on from here."
            ) from None
        trial = c.get_run(version.tags.get(contract.TAG_TRIAL_RUN, version.run_id))
        knobs = config.knobs_of(trial.data.params)
        steps = max(int(m.step) for m in c.get_metric_history(trial.info.run_id, study.QUALITY))
        if version.tags.get(study.TAG_WEIGHTS_RUN):
            steps += self.cfg.finalize.iterations
        return knobs, steps

    def references(self) -> None:
        """Trained one after another with every core (nothing else runs now), each registered."""
        from model.conv import BICUBIC, CONV_PRESETS
        from search.trainable import student_config

        ctx = self.context()
        knobs, steps = self.champion()
        val_every = min(self.cfg.training.val_every, steps)
        print(f"the champion {knobs} trained {steps} steps in all: so do the references", flush=True)
        hand = student_config(ctx, HAND_PICK, steps, val_every)
        self.train_reference(ctx, "hand-pick", hand, HAND_PICK)
        for name in CONV_REFERENCES:
            conv = student_config(ctx, {**HAND_PICK, "alpha": knobs.get("alpha", 0.0)}, steps, val_every)
            conv = replace(conv, model=CONV_PRESETS[name], init="scratch")
            self.train_reference(ctx, name, conv, {"alpha": conv.alpha})
        self.bicubic_reference(ctx, BICUBIC)

    def _reference_run(self, ctx, name: str):
        """The reference's run (an unfinished one of an earlier attempt is continued), and whether it
        finished."""
        from edge_agent import contract
        from search import mlflow_util, study
        from search.trainable import SearchRunTracker

        tags = {study.PARENT: ctx.study.run_id, study.TAG_REFERENCE: name}
        found = mlflow_util.find_run(self.tracking_uri, ctx.study.experiment_id, **tags)
        if found is not None:
            tracker = SearchRunTracker(
                self.tracking_uri, run_id=found.info.run_id, keep=("iterations", "init")
            )
            return tracker, found.info.status == "FINISHED"
        tags[contract.ROLE] = study.ROLE_REFERENCE
        tracker = SearchRunTracker(
            self.tracking_uri,
            self.cfg.experiment,
            run_name=f"reference {name}",
            tags=tags,
            keep=("iterations", "init"),
        )
        return tracker, False

    def train_reference(self, ctx, name: str, train_cfg, knobs: dict) -> None:
        from trainers.train import train

        tracker, finished = self._reference_run(ctx, name)
        if finished:
            print(f"reference {name}: trained before", flush=True)
        else:
            out = self.out / "references" / name
            print(f"reference {name}: {train_cfg.iterations} steps", flush=True)
            status = "FAILED"
            try:
                tracker.client.log_batch(
                    tracker.run_id,
                    params=[_param(k, v) for k, v in knobs.items() if k not in _params(tracker)],
                )
                result = train(
                    replace(train_cfg, out_dir=str(out)), tracker, resume=(out / "last.pt").exists()
                )
                status = "FINISHED"
                print(f"reference {name}: validation PSNR-Y {result.val_psnr_y:.3f} dB", flush=True)
            finally:
                tracker.close(status)
        self.register(tracker.run_id, name)

    def bicubic_reference(self, ctx, cfg) -> None:
        """Bicubic: no weights; its run holds a checkpoint of nothing, its validation PSNR-Y, cpu_s 0."""
        import dataclasses

        import torch

        from model import build_model, count_flops
        from search import study
        from trainers.data import load_sets
        from trainers.train import validate

        tracker, finished = self._reference_run(ctx, "bicubic")
        if not finished:
            net = build_model(cfg)
            folder = self.out / "references" / "bicubic"
            folder.mkdir(parents=True, exist_ok=True)
            torch.save(
                {"model_config": dataclasses.asdict(cfg), "model": net.state_dict()}, folder / "last.pt"
            )
            pairs = load_sets([str(self.val_dir)], "val", cfg.scale)
            metrics = validate(net, pairs, torch.device("cpu"))
            metrics.update(cpu_s=0.0, params=0.0, flops_g=count_flops(cfg, 64, 64).gflops)
            tracker.log_metrics(metrics, 0)
            tracker.log_artifact(folder / "last.pt", study.CHECKPOINT_DIR)
            tracker.close("FINISHED")
        self.register(tracker.run_id, "bicubic")

    def register(self, run_id: str, name: str) -> None:
        from search.registry import register_candidate

        reg = self.cfg.registry
        v = register_candidate(
            self.tracking_uri,
            run_id,
            reg.model_name,
            reg.devices,
            reg.input_size,
            label=f"reference {name}",
            fp16=reg.fp16,
        )
        print(f"reference {name}: registered as v{v.version}", flush=True)

    # ------------------------------------------------------------------- measure, select, evaluate

    def reference_versions(self) -> list:
        from search import mlflow_util, study

        c = mlflow_util.client(self.tracking_uri)
        handle = self.handle()
        pairs = study.registered_versions(
            c, handle.experiment_id, self.cfg.registry.model_name, handle.run_id
        )
        return [(v, run) for v, run in pairs if run.data.tags.get(study.TAG_REFERENCE)]

    def measure(self) -> None:
        from edge_agent import contract
        from search import loop

        device = self.cfg.loop.device
        todo = [
            str(v.version)
            for v, _ in self.reference_versions()
            if v.tags.get(contract.status_tag(device)) not in (contract.DONE,)
        ]
        if todo:
            status = loop.measure(self.tracking_uri, self.cfg, todo, self.out / "agent")
            missing = {v: s for v, s in status.items() if s != contract.DONE}
            if missing:
                raise SystemExit(
                    f"error: the references {missing} were not measured; see {self.out}/agent/agent.log"
                )

    def select(self) -> None:
        from search.selection import select_champion, table

        sel = select_champion(
            self.tracking_uri,
            self.cfg.experiment,
            device=self.cfg.loop.device,
            rule=self.cfg.loop.select_rule,
            model_name=self.cfg.registry.model_name,
            study_run_id=self.handle().run_id,
        )
        print(table(sel.rows))
        print(sel.message, flush=True)
        (self.out / "selection.json").write_text(json.dumps(sel.to_dict(), indent=2))

    def entries(self) -> list[dict]:
        """Every measured registered version of the study (candidates and references), as summary
        entries without the test-set figures."""
        from edge_agent import contract
        from search import config, mlflow_util

        sel = json.loads((self.out / "selection.json").read_text())
        c = mlflow_util.client(self.tracking_uri)
        device = self.cfg.loop.device
        out = []
        for row in sel["rows"]:
            version = c.get_model_version(self.cfg.registry.model_name, row["version"])
            weights = version.run_id
            runs = [c.get_run(weights)]
            trial_id = version.tags.get(contract.TAG_TRIAL_RUN)
            if trial_id and trial_id != weights:
                runs.append(c.get_run(trial_id))  # a finalized candidate: its trial spent compute too
            metrics = runs[0].data.metrics
            knobs = row["knobs"] or None
            if knobs is None and not row["reference"]:  # a finalization run without knobs (before 2026-12)
                knobs = config.knobs_of(runs[-1].data.params)
            # a candidate by its trial's name without its verdict: "t02 C32 r14 a0.65"
            trial_name = (runs[-1].info.run_name or row["run_name"]).split(" · ")[0]
            out.append(
                {
                    "name": row["reference"] or trial_name,
                    "version": row["version"],
                    "reference": row["reference"],
                    "chosen": row["chosen"],
                    "knobs": knobs,
                    "params": int(metrics.get("params", runs[-1].data.metrics.get("params", 0))),
                    "gflops": metrics.get("flops_g", runs[-1].data.metrics.get("flops_g")),
                    "onnx": None,
                    "val_psnr_y": row["psnr"],
                    "latency_ms_mean": metrics.get(contract.edge_key(device, contract.LATENCY_MEAN)),
                    "latency_ms_sd": metrics.get(contract.edge_key(device, contract.LATENCY_STD)),
                    "latency_ms_p50": row["latency_ms_p50"],
                    "status": row["status"],
                    "cpu_s": sum(r.data.metrics.get("cpu_s", math.nan) for r in runs),
                    "source": version.source,
                }
            )
        return out

    def evaluate(self) -> None:
        from edge_agent.fileio import atomic_write_bytes
        from search import mlflow_util
        from trainers.data import load_pairs
        from trainers.evaluate import evaluate_set, onnx_upscaler

        folder = self.out / "eval"
        folder.mkdir(exist_ok=True)
        sets = {name: load_pairs(str(self.args.bench / name), 4) for name in SETS}
        for e in self.entries():
            done = folder / f"v{e['version']}.json"
            if done.exists():
                continue
            onnx = self.out / "onnx" / f"v{e['version']}.onnx"
            onnx.parent.mkdir(exist_ok=True)
            shutil.copyfile(
                mlflow_util.single_file(mlflow_util.download(e["source"], self.tracking_uri), ".onnx"), onnx
            )
            upscale, scale = onnx_upscaler(str(onnx))
            t0 = time.monotonic()
            results = {name: evaluate_set(upscale, pairs, scale, name) for name, pairs in sets.items()}
            figures = {
                "onnx": str(onnx),
                "psnr_y": {k: r.psnr_y for k, r in results.items()},
                "ssim_y": {k: r.ssim_y for k, r in results.items()},
                "eval_s": time.monotonic() - t0,
            }
            atomic_write_bytes(done, json.dumps(figures, indent=1).encode())  # never half a file
            print(
                f"v{e['version']} {e['name']}: "
                + ", ".join(f"{k} {v:.2f}" for k, v in figures["psnr_y"].items()),
                flush=True,
            )

    # ------------------------------------------------------------------------------------ summary

    def summary(self, stages: Stages) -> dict:
        from edge_agent import contract
        from search import mlflow_util, study

        entries = []
        for e in self.entries():
            figures = json.loads((self.out / "eval" / f"v{e['version']}.json").read_text())
            entries.append({**e, **figures})
        c = mlflow_util.client(self.tracking_uri)
        handle = self.handle()
        spent: dict[str, float] = {}  # per trial: its compute, and its finalization's
        for role in (contract.ROLE_TRIAL, study.ROLE_FINALIZE):  # every trial, stopped ones too
            query = f"tags.`{study.PARENT}` = '{handle.run_id}' and tags.`{contract.ROLE}` = '{role}'"
            for r in mlflow_util.all_pages(c.search_runs, [handle.experiment_id], query):
                # a finalization resumed after a kill is a second run whose cpu_s counts the first's
                key = f"{role}:{r.data.tags.get(study.TAG_FINALIZED_FROM, r.info.run_id)}"
                spent[key] = max(spent.get(key, 0.0), r.data.metrics.get("cpu_s", 0.0))
        report = json.loads((self.out / "study.json").read_text())
        stages_s = dict(stages.done)
        stages_s.update({f"study.{k}": v for k, v in report.get("timings_s", {}).items()})
        entry = lambda e: {k: e.get(k) for k in ENTRY_KEYS}  # noqa: E731
        champion = next(e for e in entries if e["chosen"])
        summary = {
            "wall_s": sum(stages.done.values()),
            "stages_s": stages_s,
            "search_cpu_s": sum(spent.values()),
            "resumed_stages": stages.resumed,  # interrupted, then run again: the last attempt's time
            "champion": entry(champion),
            "hand_pick": next((entry(e) for e in entries if e["reference"] == "hand-pick"), None),
            "front": [entry(e) for e in entries if not e["reference"]],
            "references": [entry(e) for e in entries if e["reference"] and e["reference"] != "hand-pick"],
            "selection": json.loads((self.out / "selection.json").read_text())["message"],
        }
        (self.out / "summary.json").write_text(json.dumps(summary, indent=2))
        plot(entries, self.out / "front.png", f"{self.cfg.experiment} on {self.cfg.loop.device}")
        return summary


ENTRY_KEYS = (
    "name",
    "knobs",
    "params",
    "gflops",
    "onnx",
    "psnr_y",
    "ssim_y",
    "val_psnr_y",
    "latency_ms_mean",
    "latency_ms_sd",
    "cpu_s",
)


def _param(key: str, value):
    from mlflow.entities import Param

    return Param(key, str(value))


def _params(tracker) -> dict:
    return tracker.client.get_run(tracker.run_id).data.params


def plot(entries: list[dict], png: Path, title: str) -> None:
    """PSNR-Y against measured latency, every measured model: on the validation set the study chose
    on (left) and on BSD100 (right, never used for a choice); the champion starred, references
    marked and named."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.5))
    for ax, (key, label) in zip(
        fig.subplots(1, 2), (("val", "validation (held-out photos)"), ("BSD100", "BSD100 (test)"))
    ):
        for e in entries:
            y = e["val_psnr_y"] if key == "val" else e["psnr_y"]["BSD100"]
            x = e["latency_ms_mean"]
            if x is None or y is None or not math.isfinite(y):
                continue
            if e["latency_ms_sd"]:  # the spread across the agent's windows
                ax.errorbar(x, y, xerr=e["latency_ms_sd"], color="0.6", lw=0.8, capsize=2, zorder=1)
            if e["chosen"]:
                ax.scatter(x, y, marker="*", s=220, color="tab:red", zorder=3)
            elif e["reference"]:
                ax.scatter(x, y, marker="s", s=40, color="tab:gray", zorder=2)
            else:
                ax.scatter(x, y, marker="o", s=30, color="tab:blue", zorder=2)
            # a candidate by its trial's number ("t02"): the table in the docs gives its knobs
            tag = e["reference"] or e["name"].split(" ")[0]
            ax.annotate(tag, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        ax.set_xscale("log")
        ax.set_xlabel("latency per 64x64 tile, mean over the agent's windows (ms, log)")
        ax.set_ylabel(f"PSNR-Y (dB), {label}")
        ax.grid(alpha=0.3)
    fig.suptitle(
        f"{title}: candidates (blue), champion (red star), references (grey squares); "
        "bars: latency SD across windows"
    )
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.train_data.is_dir():
        print(
            f"error: {args.train_data} is not a folder of training photos; give --train-data", file=sys.stderr
        )
        return 2
    for name in SETS:
        if not (args.bench / name).is_dir():
            print(
                f"error: {args.bench / name} not found; give --bench, the folder holding {', '.join(SETS)}",
                file=sys.stderr,
            )
            return 2
    from benchmarks.inherit_curve import split

    stages = Stages(args.out.resolve())
    stages.run("split", split, args.train_data, args.val_images, args.out.resolve() / "data")
    run = Run(args)
    stages.run("study", run.study)
    stages.run("references", run.references)
    stages.run("measure", run.measure)
    stages.run("select", run.select)
    stages.run("evaluate", run.evaluate)
    summary = run.summary(stages)
    print(json.dumps({k: summary[k] for k in ("wall_s", "stages_s", "search_cpu_s")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
