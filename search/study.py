"""One study's MLflow state, owned by one object: ``Study``.

A study is one MLflow run (role ``study``) in its experiment; each trial is a child run. MLflow is
the study's record, and the only one: ``--resume`` reads the study run (its tags, its config
artifact) and the trial runs back from it, and Ray's own experiment state says which trials still
have to run. The storage folder keeps Ray's state, the Optuna database and ``LATEST``, a pointer
naming the newest study.

Who writes what: everything a study writes to MLflow goes through a ``Study``'s methods, except
the two modules it heads for their own runs:
- the driver creates or resumes the study and writes each trial's verdict, once
  (``Study.close_trial``: complete, stopped early with the rule's reason, or failed); the rounds
  (``search.loop``), the report (``search.report``), the teacher stage (``search.stages``) and
  selection (``search.selection``: the champion's alias, tags and descriptions) write through it;
- a trial's worker opens its run, logs knobs, metrics and artifacts, and never closes it
  (``search.trainable``, through the training's tracker);
- ``search.registry`` logs a candidate's ONNX on its weights' run and registers the version;
- reading (``Study.trials``, ``registered_versions``, ``measurements``) writes nothing. Calls that
  are not about a study (a client, paging, downloads) are in ``search.mlflow_util``.

Every process talks to MLflow through ``MlflowClient`` with the same tracking URI; artifacts move as
``runs:/`` URIs, never as paths on the driver's disk. ``Study`` is a frozen dataclass of strings, so
it travels to Ray workers as it is.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge_agent import contract
from edge_agent.errors import UsageError
from search.config import knob_label, knob_params, knobs_of
from search.mlflow_util import all_pages, client, download, find_run, single_file

TAG_TRIAL_ID = "ray.trial_id"
TAG_STUDY = "search.study"
TAG_TEACHER_URI = "search.teacher_uri"
ROLE_FINALIZE = "finalize"  # role tag of a front candidate's retraining (finalize.iterations)
TAG_FINALIZED_FROM = "search.finalized_from"  # on a finalization run: its trial's run id
# on a finalization run: the trial's step its weights went on from (0: it started again)
TAG_FROM_TRIAL_STEP = "search.from_trial_step"
# on a reference model's run (bicubic, a hand-picked student, a convolutional net: its name):
# registered and measured beside the study's candidates, compared with them, never made champion
TAG_REFERENCE = "search.reference"
ROLE_REFERENCE = "reference"
TAG_TEACHER = "search.teacher"  # .file, .sha256, .repository of published weights (dvmsr)
TAG_VERDICT = "search.verdict"  # on a trial run: complete | stopped | failed, written once
TAG_EARLY_STOPPED = "search.early_stopped"  # "true"/"false", derived from the verdict (for filters)
TAG_STOP_REASON = "search.stop_reason"  # why the rule stopped a trial: the peer that dominated it
TAG_STOP_STEP = "search.stop_step"
TAG_ERROR = "search.error"  # a failed trial's exception, in one line
TAG_NODE_ID = "ray.node_id"  # the Ray node a trial ran on
TAG_ROUND = "search.round"  # the learning loop's round a trial ran in
TAG_ROUNDS_DONE = "search.rounds_done"  # on the study run: rounds searched, registered and measured
TAG_COST_SOURCE = "search.cost_source"  # costmodel | flops_fallback, for edge_* costs
PARENT = "mlflow.parentRunId"
CHECKPOINT_DIR = "checkpoint"  # a trial run's artifact folder holding its weights (trainers.train)
NOTE = "mlflow.note.content"  # a run's or an experiment's description in the MLflow UI
EXPERIMENT_KIND = "mlflow.experimentKind"  # the UI opens a custom_model_development one on its runs
TAG_WEIGHTS_RUN = "weights_run_id"  # on a version whose weights are its trial's finalization
# on the study run, set by selection: the champion's version, the rule, the device, the limits
TAG_CHAMPION, TAG_RULE, TAG_DEVICE, TAG_LIMITS = (
    "selection.champion_version",
    "selection.rule",
    "selection.device",
    "selection.limits",
)
# MLflow 3.17's UI opens in its GenAI view unless the link says otherwise (a server flag, an
# environment variable or an experiment tag cannot change that: docs/mlflow.md); these links do
VIEW = "workflowType=machine_learning"
UI_VIEW_NOTE = (
    "(MLflow's UI shows its GenAI view on pages whose link lacks ?workflowType=machine_learning: "
    'click "Model training" at the top left once, and the browser keeps it)'
)


def run_page(experiment_id: str, run_id: str) -> str:
    """A run's page in the MLflow UI, relative to the server's root, in the model-training view."""
    return f"#/experiments/{experiment_id}/runs/{run_id}?{VIEW}"


TAG_IS_CHAMPION = "selection.is_champion"  # on the champion's trial run: "true"
CHAMPION_SUFFIX = " · champion"  # ends the champion's trial run's name
# on the study run: the last round's trial counts, front size and hypervolume
SUMMARY_ARTIFACT = "pareto/summary.json"
TIMINGS_ARTIFACT = "timings.json"  # on the study run: each stage's wall time, s
PARETO_DIR = "pareto"  # artifact folder on the study run: pareto.png/.html, trials.txt/.json
SELECTION_DIR = "selection"  # artifact folder on the study run: table.md, selection.json
CONFIG_ARTIFACT = "config/study.json"  # on the study run: SearchConfig.to_dict()
TRIAL_CONFIG_ARTIFACT = "config/trial.json"  # on a trial run: the drawn knobs and the whole training
LATEST = "LATEST"  # file in storage_dir naming the newest study, for --resume

COMPLETE, STOPPED, FAILED = "complete", "stopped", "failed"
QUALITY, QUALITY_MODE = "val_psnr_y", "max"  # the search's first objective, on every trial run
FINAL_QUALITY = "final_val_psnr_y"  # on a trial run: the PSNR of its finalized (retrained) weights
STUDY_PARAMS = ("searcher", "num_samples", "seed", "cost", "base_model", "training.iterations")

# May differ between a study and its --resume; everything else is the study's and must not change.
RESUMABLE = {
    "address",
    "loop.rounds",
    "loop.wait_timeout_s",
    "loop.local_agent",
    "loop.agent_args",
    "loop.select",
}


class StudyError(UsageError, ValueError):
    """A study that cannot be started or resumed as asked; the message says what to do."""


def missing_objectives(result: dict | None, keys: list[str] | tuple[str, ...]) -> list[str]:
    """The objective keys of ``result`` that are absent or not a finite number (the searcher and
    the verdict use this one test, so Optuna and MLflow agree on which trials failed)."""
    result = result or {}
    out = []
    for k in keys:
        v = result.get(k)
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
            out.append(k)
    return out


def fully_trained(step: float | None, iterations: int) -> bool:
    """The one definition: a trial is fully trained when its last validation is at the budget."""
    return step is not None and step >= iterations


def trial_label(number: int | None, params: dict[str, Any], round: int = 1) -> str:
    """A trial's run name: its number in the round and its knobs, e.g. ``t03 C32 r4 a0.60``
    (``R2 t03 ...`` in round 2); without a number (a worker naming its new run), the knobs alone."""
    number_part = "" if number is None else f"t{number:02d} "
    return f"{'' if round == 1 else f'R{round} '}{number_part}{knob_label(params)}"


@dataclass(frozen=True)
class TrialRow:
    """One trial as the study records it (read back from its MLflow run); a round's cost rule, the
    front and registration give new rows (``dataclasses.replace``), never change one."""

    trial_id: str
    run_id: str | None
    status: str  # COMPLETE, STOPPED (early), FAILED
    step: int
    val_psnr_y: float
    cost: float
    on_front: bool = False
    version: int | None = None
    round: int = 1
    cost_source: str = ""  # for edge_* costs: measured | predicted | flops
    knobs: dict = field(default_factory=dict)  # the trial's drawn knobs (search.config.KNOBS), typed
    name: str = ""  # its run name, e.g. t03 C32 r4 a0.60
    stop_reason: str = ""
    error: str = ""  # a failed trial's, in one line


@dataclass(frozen=True)
class Study:
    """A handle on one study's MLflow state; the driver's and the workers' only way to it."""

    tracking_uri: str  # absolute
    experiment_id: str
    run_id: str  # the study run
    name: str
    iterations: int  # training.iterations: the budget that makes a trial fully trained

    # ------------------------------------------------------------------ create, resume, close

    @classmethod
    def start(cls, cfg, tracking_uri: str) -> Study:
        """A new study: its run (described, the configuration as params and as one artifact) and
        ``LATEST`` pointing at it."""
        experiment_id = ensure_experiment(tracking_uri, cfg.experiment)
        name = f"{cfg.experiment}-{time.strftime('%Y%m%d-%H%M%S')}"
        c = client(tracking_uri)
        tags = {
            contract.ROLE: contract.ROLE_STUDY,
            TAG_STUDY: name,
            NOTE: f"### Search\n{describe_study(cfg)}",
        }
        run_id = c.create_run(experiment_id, run_name=name, tags=tags).info.run_id
        from mlflow.entities import Param

        # the whole configuration as one artifact; as params (columns of the runs table) the few
        # that tell studies apart, and those selection reads back
        flat = _flat(cfg.to_dict())
        c.log_batch(run_id, params=[Param(k, str(flat[k])) for k in STUDY_PARAMS])
        c.log_dict(run_id, cfg.to_dict(), CONFIG_ARTIFACT)
        storage = Path(cfg.storage_dir).resolve()
        (storage / name).mkdir(parents=True, exist_ok=True)
        from edge_agent.fileio import atomic_write_bytes

        atomic_write_bytes(storage / LATEST, name.encode())
        return cls(tracking_uri, experiment_id, run_id, name, cfg.training.iterations)

    @classmethod
    def find(cls, cfg, tracking_uri: str) -> Study:
        """The study ``LATEST`` names, read back from MLflow (nothing written); refused when its
        configuration differs from ``cfg`` outside ``RESUMABLE``. ``reopen()`` then resumes it."""
        from edge_agent.preflight import missing_database_problem

        name = latest_name(Path(cfg.storage_dir).resolve())
        problem = missing_database_problem(tracking_uri)  # MLflow would make an empty one there
        if problem:
            raise StudyError(problem)
        experiment = client(tracking_uri).get_experiment_by_name(cfg.experiment)
        run = find_run(tracking_uri, experiment.experiment_id, **{TAG_STUDY: name}) if experiment else None
        if run is None:
            raise StudyError(
                f"study {name} has no run in experiment '{cfg.experiment}' at {tracking_uri}; resume with "
                "the tracking URI and experiment it started with, or start a new study without --resume"
            )
        self = cls(tracking_uri, run.info.experiment_id, run.info.run_id, name, cfg.training.iterations)
        changed = config_changes(self.saved_config(), cfg.to_dict())
        if changed:
            raise StudyError(
                f"--resume continues study {name} with the configuration it started with, but these "
                f"differ: {changed}; give the original config and flags, or start a new study "
                "without --resume"
            )
        return self

    @classmethod
    def of_run(cls, tracking_uri: str, run_id: str) -> Study:
        """The study whose run is ``run_id``, read back from MLflow (nothing written): for tools
        that are given the run, such as selection."""
        run = client(tracking_uri).get_run(run_id)
        iterations = int(float(run.data.params.get("training.iterations", "0")))
        name = run.data.tags.get(TAG_STUDY) or run.info.run_name or run_id
        return cls(tracking_uri, run.info.experiment_id, run_id, name, iterations)

    def reopen(self) -> int:
        """The study run RUNNING again; the child runs the crash left RUNNING marked KILLED (Ray
        reruns their trials). Returns how many were marked."""
        client(self.tracking_uri).update_run(self.run_id, status="RUNNING")
        return self.mark_interrupted()

    def saved_config(self) -> dict:
        """The configuration the study started with (its run's config artifact)."""
        from mlflow.exceptions import MlflowException

        try:
            folder = download(f"runs:/{self.run_id}/{CONFIG_ARTIFACT}", self.tracking_uri)
            return json.loads(single_file(folder, ".json").read_text())
        except (MlflowException, OSError, json.JSONDecodeError) as exc:
            raise StudyError(
                f"study {self.name}'s run {self.run_id} has no readable {CONFIG_ARTIFACT} "
                f"({type(exc).__name__}); it cannot be resumed: start a new study without --resume"
            ) from None

    def mark_interrupted(self) -> int:
        """Every RUNNING child run (a trial, the teacher, a finalization) to KILLED; how many.

        Not a verdict: Ray reruns an interrupted trial, and its run then carries on."""
        c = client(self.tracking_uri)
        query = f"tags.`{PARENT}` = '{self.run_id}' and attributes.status = 'RUNNING'"
        runs = all_pages(c.search_runs, [self.experiment_id], filter_string=query)
        for run in runs:
            c.set_terminated(run.info.run_id, status="KILLED")
        return len(runs)

    def close(self, status: str) -> None:
        self.mark_interrupted()
        client(self.tracking_uri).set_terminated(self.run_id, status=status)

    # ------------------------------------------------------------------ the study run's record

    def tags(self) -> dict[str, str]:
        return client(self.tracking_uri).get_run(self.run_id).data.tags

    def set_tags(self, tags: dict[str, str]) -> None:
        self.set_run_tags(self.run_id, tags)

    def metrics(self) -> dict[str, float]:
        return client(self.tracking_uri).get_run(self.run_id).data.metrics

    def log_json(self, data: dict, artifact_file: str) -> None:
        """A JSON artifact on the study run: figures that are the study's alone, kept out of the
        metrics so that the runs table shows no study-only columns beside the trials."""
        client(self.tracking_uri).log_dict(self.run_id, data, artifact_file)

    def read_json(self, artifact_file: str) -> dict | None:
        """A JSON artifact of the study run as it is now (not cached), or None when there is none."""
        from mlflow.exceptions import MlflowException

        with tempfile.TemporaryDirectory() as tmp:
            try:
                path = client(self.tracking_uri).download_artifacts(self.run_id, artifact_file, tmp)
                return json.loads(Path(path).read_text())
            except (MlflowException, OSError, json.JSONDecodeError):
                return None

    def log_metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        self.log_run_metrics(self.run_id, metrics, step)

    def log_artifacts(self, folder: str | Path, artifact_path: str) -> None:
        client(self.tracking_uri).log_artifacts(self.run_id, str(folder), artifact_path)

    def log_artifact(self, path: str | Path, artifact_path: str) -> str:
        """Log one file; returns its runs:/ URI."""
        client(self.tracking_uri).log_artifact(self.run_id, str(path), artifact_path)
        return f"runs:/{self.run_id}/{artifact_path}/{Path(path).name}"

    def describe(self, section: str, text: str) -> None:
        """Set one ``### section`` of the study run's description (``describe_run``)."""
        describe_run(client(self.tracking_uri), self.run_id, section, text)

    def params(self) -> dict[str, str]:
        return client(self.tracking_uri).get_run(self.run_id).data.params

    # ------------------------------------------------------------------ its trials' runs and versions

    def mark_champion_run(self, run_id: str, on: bool) -> None:
        """Mark one of the study's runs (the champion's trial) in the runs table, by its name
        (``... · champion``) and the tag ``selection.is_champion``; or take the mark away."""
        c = client(self.tracking_uri)
        run = c.get_run(run_id)
        name = (run.info.run_name or "").replace(CHAMPION_SUFFIX, "")
        if on:
            c.set_tag(run_id, TAG_IS_CHAMPION, "true")
        elif TAG_IS_CHAMPION in run.data.tags:
            c.delete_tag(run_id, TAG_IS_CHAMPION)
        c.update_run(run_id, name=name + (CHAMPION_SUFFIX if on else ""))

    def log_run_metrics(self, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
        """Metrics on one of the study's runs (a trial's prediction error after a round, say)."""
        c = client(self.tracking_uri)
        for key, value in metrics.items():
            c.log_metric(run_id, key, float(value), step=step)

    def alias_version(self, model_name: str, alias: str) -> str | None:
        """The version ``alias`` names, or None (no such alias, or no such model)."""
        try:
            return str(client(self.tracking_uri).get_model_version_by_alias(model_name, alias).version)
        except Exception:  # MlflowException
            return None

    def set_alias(self, model_name: str, alias: str, version: str) -> None:
        client(self.tracking_uri).set_registered_model_alias(model_name, alias, version)

    def version_description(self, model_name: str, version: str) -> str:
        return client(self.tracking_uri).get_model_version(model_name, version).description or ""

    def set_version_description(self, model_name: str, version: str, text: str) -> None:
        client(self.tracking_uri).update_model_version(model_name, version, description=text)

    @property
    def teacher_uri(self) -> str | None:
        return self.tags().get(TAG_TEACHER_URI)

    def rounds_done(self) -> int:
        return int(self.tags().get(TAG_ROUNDS_DONE, "0"))

    def round_done(self, k: int) -> None:
        self.set_tags({TAG_ROUNDS_DONE: str(k)})

    # ------------------------------------------------------------------ trials (workers)

    def _trial_run(self, trial_id: str):
        return find_run(
            self.tracking_uri, self.experiment_id, **{PARENT: self.run_id, TAG_TRIAL_ID: trial_id}
        )

    def open_trial(
        self, trial_id: str, params: dict[str, Any], round: int = 1, tags: dict[str, str] | None = None
    ) -> str:
        """The trial's run, RUNNING: the one it had when a restarted trial runs again, else new
        (named by its knobs, which are logged as params once; the verdict adds its number).
        ``tags``: where it runs (the node, the source of its cost), set either way."""
        c = client(self.tracking_uri)
        run = self._trial_run(trial_id)
        if run is not None:
            c.update_run(run.info.run_id, status="RUNNING")
            self.set_run_tags(run.info.run_id, tags or {})
            return run.info.run_id
        own = {
            contract.ROLE: contract.ROLE_TRIAL,
            PARENT: self.run_id,
            TAG_TRIAL_ID: trial_id,
            TAG_ROUND: str(round),
        }
        tags = {**(tags or {}), **own}
        run_id = c.create_run(self.experiment_id, run_name=trial_label(None, params, round), tags=tags)
        from mlflow.entities import Param

        knobs = [Param(k, v) for k, v in knob_params(params).items()]
        c.log_batch(run_id.info.run_id, params=knobs)
        return run_id.info.run_id

    def set_run_tags(self, run_id: str, tags: dict[str, str]) -> None:
        """Tags on one of the study's runs, in one request."""
        if tags:
            from mlflow.entities import RunTag

            client(self.tracking_uri).log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])

    def prepare_rerun(self, trial_id: str, quality: str) -> dict[str, float] | None:
        """For a trial Ray runs again after --resume: the result MLflow shows it reached, to report
        again instead of training (Ray's experiment state can lag behind MLflow), else None.

        A trial has a result when its verdict is complete or stopped, or when it failed after its
        last validation reached the budget with its checkpoint logged (a disk that filled once it
        had trained, say). A failed verdict is removed: the rerun gets a verdict of its own.
        """
        run = self._trial_run(trial_id)
        if run is None:
            return None
        c, verdict = client(self.tracking_uri), run.data.tags.get(TAG_VERDICT)
        if verdict == FAILED:
            for tag in (TAG_VERDICT, TAG_ERROR):
                if tag in run.data.tags:
                    c.delete_tag(run.info.run_id, tag)
        if quality not in run.data.metrics:
            return None
        last = max(c.get_metric_history(run.info.run_id, quality), key=lambda m: m.step)
        trained = verdict in (COMPLETE, STOPPED) or (
            fully_trained(last.step, self.iterations)
            and bool(c.list_artifacts(run.info.run_id, CHECKPOINT_DIR))
        )
        return {**run.data.metrics, quality: last.value, "step": last.step} if trained else None

    # ------------------------------------------------------------------ verdicts (the driver)

    def close_trial(
        self,
        trial_id: str,
        result: dict | None = None,
        error: str | None = None,
        reason: str | None = None,
        params: dict[str, Any] | None = None,
        round: int = 1,
        number: int | None = None,
        objectives: tuple[str, ...] = (),
    ) -> bool:
        """Write the trial's verdict, unless its run has one: complete or stopped (from its last
        result's step and the budget), or failed (``error``, or a last result without a finite
        value for one of ``objectives``). Returns whether it wrote.

        The one writer of a trial run's end: Tune's callback calls it as each trial ends, and the
        driver again for every trial after the round (a driver killed between Tune's checkpoint and
        the callback, then --resume). A trial that failed before it opened its run gets one here.
        ``number`` (the trial's place in its round, from 1) goes into the run's name.
        """
        c = client(self.tracking_uri)
        run = self._trial_run(trial_id)
        if run is not None and run.data.tags.get(TAG_VERDICT):
            return False
        run_id = run.info.run_id if run is not None else self.open_trial(trial_id, params or {}, round)
        step = (result or {}).get("step")
        missing = missing_objectives(result, objectives) if error is None and result else []
        if missing:
            error = (
                f"its last result (step {step}) has no finite {', '.join(missing)}, so it cannot be "
                "placed against the other trials (the searcher was told FAIL)"
            )
        if error is not None:
            verdict = FAILED
        else:
            verdict = COMPLETE if fully_trained(step, self.iterations) else STOPPED
        tags = {TAG_VERDICT: verdict, TAG_EARLY_STOPPED: str(verdict == STOPPED).lower()}
        knobs = params if params is not None else knobs_of(run.data.params if run is not None else {})
        name = trial_label(number, knobs, round)
        if verdict == STOPPED:
            tags[TAG_STOP_STEP] = str(int(step or 0))
            tags[TAG_STOP_REASON] = (reason or f"stopped early at step {int(step or 0)}")[:5000]
            tags[NOTE] = (
                f"**Stopped early** at step {int(step or 0)} of {self.iterations}: {tags[TAG_STOP_REASON]}"
            )
            c.update_run(run_id, name=_with_suffix(name, f"stopped@{int(step or 0)}"))
        elif verdict == FAILED:
            recorded = run.data.tags.get(TAG_ERROR) if run is not None else None
            tags[TAG_ERROR] = recorded or error[:500]
            tags[NOTE] = f"**Failed**: {tags[TAG_ERROR]}"
            c.update_run(run_id, name=_with_suffix(name, "failed"))
        else:
            tags[NOTE] = f"Fully trained ({self.iterations} steps)."
            c.update_run(run_id, name=name)
        self.set_run_tags(run_id, tags)
        c.set_terminated(run_id, status="FAILED" if verdict == FAILED else "FINISHED")
        return True

    def settle(self, results, round: int, objectives: tuple[str, ...] = ()) -> int:
        """After a round: ``close_trial`` for each of Tune's results, in Tune's order of trials (a
        no-op where the callback wrote the verdict); returns how many it had to write."""
        written = 0
        for number, r in enumerate(results, 1):
            m = r.metrics or {}
            trial_id = m.get("trial_id") or (r.path and Path(r.path).name)
            error = error_line(r.error) if r.error else None
            config = dict(r.config or {})
            written += self.close_trial(
                trial_id, m, error, params=config, round=round, number=number, objectives=objectives
            )
        return written

    # ------------------------------------------------------------------ reading (writes nothing)

    def trials(self, cost: str, model_name: str | None = None) -> list[TrialRow]:
        """Every trial run of the study with a verdict, oldest first; ``version`` filled from
        ``model_name``'s registered versions when given."""
        c = client(self.tracking_uri)
        query = f"tags.`{PARENT}` = '{self.run_id}' and tags.`{contract.ROLE}` = '{contract.ROLE_TRIAL}'"
        runs = all_pages(
            c.search_runs, [self.experiment_id], filter_string=query, order_by=["attributes.start_time ASC"]
        )
        versions = {}
        if model_name:
            for v, _ in registered_versions(c, self.experiment_id, model_name, self.run_id):
                versions[v.tags.get(contract.TAG_TRIAL_RUN) or v.run_id] = int(v.version)
        rows = []
        for run in runs:
            tags, metrics = run.data.tags, run.data.metrics
            if not tags.get(TAG_VERDICT):
                continue
            knobs = knobs_of(run.data.params)
            rows.append(
                TrialRow(
                    trial_id=tags[TAG_TRIAL_ID],
                    run_id=run.info.run_id,
                    status=tags[TAG_VERDICT],
                    step=int(
                        tags.get(TAG_STOP_STEP) or (self.iterations if tags[TAG_VERDICT] == COMPLETE else 0)
                    ),
                    val_psnr_y=float(metrics.get(QUALITY, math.nan)),
                    cost=float(metrics.get(cost, math.nan)),
                    version=versions.get(run.info.run_id),
                    round=int(tags.get(TAG_ROUND, "1")),
                    knobs=knobs,
                    name=run.info.run_name or "",
                    stop_reason=tags.get(TAG_STOP_REASON, ""),
                    error=tags.get(TAG_ERROR, ""),
                )
            )
        return rows


@dataclass(frozen=True)
class Measurement:
    """One registered candidate as the device measured it."""

    trial_run_id: str  # the trial (a finalized version's run is its retraining; this is its trial)
    version: str
    knobs: dict[str, Any]
    value: float
    predicted: float | None  # what the trial was told when it ran (pred.<device>.<metric>), if any


def registered_versions(c, experiment_id: str, model_name: str, study_run_id: str | None = None) -> list:
    """(model version, its run) for every version of ``model_name`` whose run is in the experiment,
    oldest first; with ``study_run_id``, only those whose run is a child of that study (its trials,
    finalizations and references). The one reader of what a study registered."""
    query = f"tags.`{PARENT}` = '{study_run_id}'" if study_run_id else ""
    runs = {r.info.run_id: r for r in all_pages(c.search_runs, [experiment_id], query)}
    versions = all_pages(c.search_model_versions, f"name='{model_name}'", max_results=200)
    out = []
    for v in sorted(versions, key=lambda v: int(v.version)):
        run_id = v.run_id or v.tags.get(contract.TAG_TRIAL_RUN, "")
        if run_id in runs:
            out.append((v, runs[run_id]))
    return out


def measurements(
    tracking_uri: str, experiment_id: str, model_name: str, device: str, metric: str
) -> list[Measurement]:
    """Every version of ``model_name`` from this experiment's trial runs (reference models left
    out) that ``device`` measured (status done) with a finite ``edge.<device>.<metric>``, oldest
    first."""
    c = client(tracking_uri)
    out = []
    for v, run in registered_versions(c, experiment_id, model_name):
        value = run.data.metrics.get(contract.edge_key(device, metric))
        if v.tags.get(contract.status_tag(device)) != contract.DONE:
            continue
        if value is None or not math.isfinite(value):
            continue
        if run.data.tags.get(TAG_REFERENCE):  # not a student of the space: no point of its cost model
            continue
        # the architecture, and so the cost, is the trial's; so is the search's prediction
        trial_id = run.data.tags.get(TAG_FINALIZED_FROM)
        trial = c.get_run(trial_id) if trial_id else run
        predicted = trial.data.metrics.get(prediction_key(device, metric))
        out.append(
            Measurement(trial.info.run_id, str(v.version), knobs_of(run.data.params), value, predicted)
        )
    return out


# a study run's description, in this order: the UI shows its first lines without a click
SECTIONS = ("Champion", "Result", "Why", "Search")


def describe_run(c, run_id: str, section: str, text: str) -> None:
    """Set one ``### section`` of a run's description (the top of its page in the UI), keeping the
    others; ``SECTIONS`` come first in their order, so the UI's first lines say who won."""
    found = {}
    for part in (c.get_run(run_id).data.tags.get(NOTE) or "").split("### ")[1:]:
        head, _, body = part.partition("\n")
        found[head.strip()] = body.strip()
    found[section] = text.strip()
    order = [s for s in SECTIONS if s in found] + [s for s in found if s not in SECTIONS]
    c.set_tag(run_id, NOTE, "\n\n".join(f"### {s}\n{found[s]}" for s in order))


def _with_suffix(name: str, suffix: str) -> str:
    return f"{name} · {suffix}"


def error_line(error) -> str:
    """An exception in one line: its type and its last line."""
    cause = getattr(error, "cause", None) or error  # Ray wraps the trial's exception
    lines = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {lines[-1] if lines else ''}"[:500]


def describe_study(cfg) -> str:
    """The study run's description: what is searched, how, and where to look."""
    knobs = ", ".join(f"{k.name} {k.short} in [{r.low:g}, {r.high:g}]" for k, r in cfg.space.ranges())
    stop = (
        f"dominated trials are stopped at each validation from rung {cfg.early_stopping.min_rung} "
        f"(margin {cfg.early_stopping.margin:g} dB)"
        if cfg.early_stopping.enabled
        else "no early stopping"
    )
    return (
        f"MambaLiteSR x4 students distilled from a teacher: {cfg.num_samples} trials per round "
        f"({cfg.searcher}, seed {cfg.seed}) over {knobs}; objectives val_psnr_y (max) and "
        f"{cfg.cost} (min); {cfg.training.iterations} steps each; {stop}.\n\n"
        "Trials are this run's children, named by their knobs (`t03 C32 r4 a0.60`); the Pareto plot "
        "and the trial table are under `pareto/`; the front is registered as versions of "
        f"`{cfg.registry.model_name}`."
    )


# -------------------------------------------------------------------------------------- resume


def latest_name(storage: Path) -> str:
    """The study ``storage/LATEST`` names; a missing or empty file is a StudyError saying so."""
    latest = storage / LATEST
    if not latest.exists():
        raise StudyError(f"nothing to resume in {storage}: no study has been started there")
    name = latest.read_text().strip()
    if not name or "/" in name:
        raise StudyError(f"{latest} does not name a study; start a new one (without --resume)")
    return name


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_changes(then: dict, now: dict) -> str:
    """The keys (outside ``RESUMABLE``) whose values differ, as ``key (old -> new)``; "" if none."""
    now, then = _flat(json.loads(json.dumps(now))), _flat(then)
    changed = sorted(k for k in set(now) | set(then) if k not in RESUMABLE and now.get(k) != then.get(k))
    return ", ".join(f"{k} ({then.get(k)!r} -> {now.get(k)!r})" for k in changed)


# -------------------------------------------------------------------------------------- helpers


def prediction_key(device: str, metric: str) -> str:
    """``pred.<device>.<metric>``: a cost model's prediction, logged beside ``edge.<device>.<metric>``."""
    contract.status_tag(device)  # validates the name
    return f"pred.{device}.{metric}"


EXPERIMENT_NOTE = (
    "Searches for MambaLiteSR x4 super-resolution students (embed_dim, rank, distillation alpha) "
    "against what the device measures. Each study is a parent run (role=study) whose description "
    "says what it searched and which version became champion; its trials are child runs named by "
    "their knobs. Candidates are versions of the registered model; the champion carries the alias "
    "`champion`."
)


def ensure_experiment(tracking_uri: str, name: str, artifact_root: str | None = None) -> str:
    """Experiment id, creating the experiment (with a local artifact root for SQLite stores), tagged
    so that the MLflow UI opens it on its runs, with a description."""
    c = client(tracking_uri)
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        exp_id = exp.experiment_id
    else:
        location = None
        if tracking_uri.startswith("sqlite:"):
            # the server-less default: artifacts beside the database, absolute for every worker
            db = Path(tracking_uri[len("sqlite:///") :])
            location = str(Path(artifact_root or db.parent / "mlartifacts").resolve() / name)
        exp_id = c.create_experiment(name, artifact_location=location)
    tags = {} if exp is None else exp.tags
    if EXPERIMENT_KIND not in tags:
        c.set_experiment_tag(exp_id, EXPERIMENT_KIND, "custom_model_development")
    if NOTE not in tags:
        c.set_experiment_tag(exp_id, NOTE, EXPERIMENT_NOTE)
    return exp_id
