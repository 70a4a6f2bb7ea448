"""LCBench (Zimmer et al. 2021) through YAHPO Gym's surrogate, as an objective for the search.

The surrogate (``model.onnx`` from yahpo_data's ``lcbench/``, Apache-2.0) predicts, for one of 34
OpenML tasks, seven hyperparameters of a funnel MLP and an epoch count (1-52), the validation
accuracy and the training time of that network. Read here with ONNX Runtime directly, as the
``yahpo-gym`` package does it (``BenchmarkSet._config_to_xs``): the continuous inputs, raw, in the
order of ``CONT``; the task as its integer code from ``encoding.json``; the outputs in the order of
``OUTPUTS``. The surrogate is deterministic.

``lcbench_trial`` is a Ray Tune trainable that reports one epoch per step, through the same
``search.compat.report`` the SR trials use.
"""

from __future__ import annotations

import json
import os
import time
from functools import lru_cache
from pathlib import Path

import numpy as np

from edge_agent.errors import UserError

BUDGET = 52  # epochs of a fully trained configuration
QUALITY, COST, RUNG = "val_accuracy", "time", "epoch"  # accuracy in %, training time in s
CONT = (
    "epoch",
    "batch_size",
    "learning_rate",
    "momentum",
    "weight_decay",
    "num_layers",
    "max_units",
    "max_dropout",
)
OUTPUTS = (
    "time",
    "val_accuracy",
    "val_cross_entropy",
    "val_balanced_accuracy",
    "test_cross_entropy",
    "test_balanced_accuracy",
)
TASKS = ("3945", "7593", "34539", "126025", "126026")  # the five the docs report on
DEFAULT_DIR = Path(__file__).resolve().parents[2] / "shared" / "bench" / "yahpo-lcbench"


class SurrogateMissing(UserError, FileNotFoundError):
    """The surrogate's files are not where they were looked for; the message says what to do."""


def data_dir(given: str | Path | None = None) -> Path:
    """The folder holding ``model.onnx``, ``encoding.json`` and ``config_space.json``: ``given``,
    else ``$LCBENCH_DATA``, else ``../shared/bench/yahpo-lcbench`` beside the project."""
    path = Path(given or os.environ.get("LCBENCH_DATA") or DEFAULT_DIR)
    missing = [n for n in ("model.onnx", "encoding.json", "config_space.json") if not (path / n).is_file()]
    if missing:
        raise SurrogateMissing(
            f"the LCBench surrogate is not in {path} (missing {', '.join(missing)}): pass --data DIR or "
            "set LCBENCH_DATA to a folder with YAHPO Gym's lcbench files (github.com/slds-lmu/yahpo_data, "
            "folder lcbench/)"
        )
    return path


class Surrogate:
    """The ONNX surrogate of one data folder (one thread: trials run side by side)."""

    def __init__(self, folder: Path):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = opts.inter_op_num_threads = 1
        self.session = ort.InferenceSession(
            str(folder / "model.onnx"), opts, providers=["CPUExecutionProvider"]
        )
        self.codes = json.loads((folder / "encoding.json").read_text())["OpenML_task_id"]
        space = json.loads((folder / "config_space.json").read_text())["hyperparameters"]
        self.space = [h for h in space if h["name"] not in ("OpenML_task_id", "epoch")]

    def predict(self, task: str, configs: list[dict], epochs: list[int]) -> np.ndarray:
        """(len(configs), len(epochs), len(OUTPUTS)): every config at every epoch count."""
        if task not in self.codes:
            raise ValueError(f"task {task} is not one of LCBench's: {sorted(self.codes, key=str)}")
        x = np.array([[e, *(c[k] for k in CONT[1:])] for c in configs for e in epochs], np.float32)
        cat = np.full((len(x), 1), self.codes[task], np.int32)
        (out,) = self.session.run(None, {"x_cat": cat, "x_cont": x})
        return out.reshape(len(configs), len(epochs), len(OUTPUTS))

    def curve(self, task: str, config: dict) -> list[dict[str, float]]:
        """The learning curve of one config: accuracy and time after each epoch 1..BUDGET."""
        out = self.predict(task, [config], list(range(1, BUDGET + 1)))[0]
        q, c = OUTPUTS.index(QUALITY), OUTPUTS.index(COST)
        return [{RUNG: e, QUALITY: float(row[q]), COST: float(row[c])} for e, row in enumerate(out, 1)]

    def random_configs(self, n: int, seed: int) -> list[dict]:
        """``n`` configs drawn uniformly from the space (log-uniform where it says log)."""
        rng = np.random.default_rng(seed)
        out = []
        for _ in range(n):
            c = {}
            for h in self.space:
                lo, hi = h["lower"], h["upper"]
                x = np.exp(rng.uniform(np.log(lo), np.log(hi))) if h["log"] else rng.uniform(lo, hi)
                c[h["name"]] = int(round(x)) if h["type"] == "uniform_int" else float(x)
            out.append(c)
        return out


@lru_cache(maxsize=4)
def surrogate(folder: str) -> Surrogate:
    """One session per folder and process (a Ray worker keeps it between trials)."""
    return Surrogate(Path(folder))


def define_space(trial, folder: str) -> None:
    """The seven hyperparameters, for Optuna's define-by-run API, as ``config_space.json`` gives them."""
    for h in surrogate(folder).space:
        suggest = trial.suggest_int if h["type"] == "uniform_int" else trial.suggest_float
        suggest(h["name"], h["lower"], h["upper"], log=h["log"])


def reference_point(folder: str, task: str, n: int = 2000, seed: int = 0) -> tuple[float, float]:
    """The task's fixed hypervolume reference: (the median accuracy, the longest training time) of
    ``n`` random configs trained the full budget. Points worse than median random count nothing."""
    s = surrogate(folder)
    out = s.predict(task, s.random_configs(n, seed), [BUDGET])[:, 0, :]
    q, c = out[:, OUTPUTS.index(QUALITY)], out[:, OUTPUTS.index(COST)]
    return float(np.median(q)), float(np.max(c))


def lcbench_trial(config: dict, folder: str, task: str) -> None:
    """Ray Tune trainable: one result per epoch, ``clock`` the wall time it was reported at."""
    from search import compat

    for row in surrogate(folder).curve(task, config):
        compat.report({**row, "clock": time.time()})


def main() -> None:
    """How well a learning curve's early epochs predict its end: Spearman's rank correlation of
    the accuracy (and the time) at epoch k with epoch 52, over random configs, per task."""
    import argparse

    from scipy.stats import spearmanr

    p = argparse.ArgumentParser(description=main.__doc__.split("\n")[0])
    p.add_argument("--tasks", nargs="+", default=list(TASKS))
    p.add_argument("--configs", type=int, default=300)
    p.add_argument("--data", help="the surrogate's folder (default $LCBENCH_DATA or ../shared/...)")
    args = p.parse_args()
    s = surrogate(str(data_dir(args.data)))
    epochs = [1, 2, 4, 9, 18, 27]
    configs = s.random_configs(args.configs, seed=5)
    q, c = OUTPUTS.index(QUALITY), OUTPUTS.index(COST)
    print(f"{args.configs} random configs; Spearman rho of the value at epoch k with epoch {BUDGET}")
    print("| task | " + " | ".join(f"acc@{e}" for e in epochs) + " | time@1 |")
    print("|---|" + "---:|" * (len(epochs) + 1))
    for task in args.tasks:
        out = s.predict(task, configs, [*epochs, BUDGET])
        rho = [spearmanr(out[:, i, q], out[:, -1, q])[0] for i in range(len(epochs))]
        rho_t = spearmanr(out[:, 0, c], out[:, -1, c])[0]
        print(f"| {task} | " + " | ".join(f"{r:.2f}" for r in rho) + f" | {rho_t:.2f} |")


if __name__ == "__main__":
    main()
