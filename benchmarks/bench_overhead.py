"""Per-trial overhead of Ray Tune and MLflow: trials that train no steps.

    python -m benchmarks.bench_overhead [--trials 20]

Two studies on a local Ray with MLflow in SQLite: (a) an empty trainable that only reports one
result (Ray's own cost), (b) the search's real trial function with training replaced by one
reported validation (Ray + our MLflow bookkeeping: the trial run, params, metrics, status).
Trials run one at a time; the per-trial figure is the study's wall time divided by the trials.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from search import mlflow_util, study
from search.config import load_config


def empty_trial(params):
    from ray import tune

    tune.report({"val_psnr_y": 20.0, "step": 1})


def no_training_trial(params, ctx):
    import search.trainable as trainable

    def no_train(cfg, tracker):  # stands in for trainers.train.train: one validation, no steps
        tracker.log_params(cfg.to_dict())
        tracker.log_metrics({"val_psnr_y": 20.0, "val_ssim_y": 0.5}, cfg.iterations)

    trainable.train = no_train
    trainable.run_trial(params, ctx)


def timed_study(fn, n: int, storage: str, reuse: bool = False) -> float:
    from ray import tune

    tuner = tune.Tuner(
        tune.with_resources(fn, {"cpu": 1}),
        param_space={"embed_dim": 8, "rank": 2, "alpha": 0.0},
        tune_config=tune.TuneConfig(num_samples=n, max_concurrent_trials=1, reuse_actors=reuse),
        run_config=tune.RunConfig(storage_path=storage, verbose=0),
    )
    start = time.monotonic()
    tuner.fit()
    return time.monotonic() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--trials", type=int, default=20)
    args = p.parse_args()
    import ray
    from ray import tune

    from search.trainable import StudyContext

    with tempfile.TemporaryDirectory() as tmp:
        uri = f"sqlite:///{Path(tmp) / 'mlflow.db'}"
        cfg = load_config(overrides={"base_model": "tiny", "experiment": "overhead"})
        exp_id = study.ensure_experiment(uri, cfg.experiment)
        parent = mlflow_util.client(uri).create_run(exp_id, tags={"role": "study"}).info.run_id
        handle = study.Study(uri, exp_id, parent, cfg.experiment, cfg.training.iterations)
        ctx = StudyContext(config=cfg.to_dict(), study=handle, teacher_uri=None)
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        timed_study(empty_trial, 2, f"{tmp}/warm")  # start worker processes once
        empty = timed_study(empty_trial, args.trials, f"{tmp}/empty")
        ours = timed_study(tune.with_parameters(no_training_trial, ctx=ctx), args.trials, f"{tmp}/ours")
        reused = timed_study(
            tune.with_parameters(no_training_trial, ctx=ctx), args.trials, f"{tmp}/reuse", True
        )
        ray.shutdown()
    print(f"{args.trials} trials, one at a time, local Ray, MLflow in SQLite")
    print(f"Ray alone (empty trainable):             {empty / args.trials:.2f} s per trial")
    print(f"Ray + MLflow (search trial, no training): {ours / args.trials:.2f} s per trial")
    print(f"  the same, actors reused across trials:  {reused / args.trials:.2f} s per trial")


if __name__ == "__main__":
    main()
