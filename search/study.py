"""MLflow bookkeeping of a study: the parent run, trial runs, artifacts reachable from any node.

Every process (driver, trials, the teacher task) talks to MLflow through ``MlflowClient`` with the
same tracking URI; artifacts move as ``runs:/`` URIs, never as paths on the driver's disk.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

from edge_agent import contract

TAG_TRIAL_ID = "ray.trial_id"
TAG_STUDY = "search.study"
TAG_TEACHER_URI = "search.teacher_uri"
ROLE_FINALIZE = "finalize"  # role tag of a front candidate's retraining (finalize.iterations)
TAG_FINALIZED_FROM = "search.finalized_from"  # on a finalization run: its trial's run id
TAG_TEACHER = "search.teacher"  # .file, .sha256, .repository of published weights (dvmsr)
TAG_EARLY_STOPPED = "search.early_stopped"
TAG_NODE_ID = "ray.node_id"  # the Ray node a trial ran on
PARENT = "mlflow.parentRunId"
TAG_ROUND = "search.round"  # the learning loop's round a trial ran in
TAG_COST_SOURCE = "search.cost_source"  # costmodel | flops_fallback, for edge_* costs


def prediction_key(device: str, metric: str) -> str:
    """``pred.<device>.<metric>``: a cost model's prediction, logged beside ``edge.<device>.<metric>``."""
    contract.status_tag(device)  # validates the name
    return f"pred.{device}.{metric}"


def absolute_tracking_uri(uri: str) -> str:
    """sqlite:///relative.db made absolute, so Ray workers with another working directory find it."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        return prefix + str(Path(uri[len(prefix) :]).resolve())
    return uri


def client(tracking_uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri)


def all_pages(search, *args, **kwargs) -> list:
    """Every result of an MLflow ``search_*`` call, following its page tokens."""
    out, token = [], None
    while True:
        page = search(*args, page_token=token, **kwargs)
        out += list(page)
        token = page.token
        if not token:
            return out


def ensure_experiment(tracking_uri: str, name: str, artifact_root: str | None = None) -> str:
    """Experiment id, creating the experiment (with a local artifact root for SQLite stores)."""
    c = client(tracking_uri)
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = None
    if tracking_uri.startswith("sqlite:"):
        # the server-less default: artifacts beside the database, absolute for every worker
        db = Path(tracking_uri[len("sqlite:///") :])
        location = str(Path(artifact_root or db.parent / "mlartifacts").resolve() / name)
    return c.create_experiment(name, artifact_location=location)


def find_run(tracking_uri: str, experiment_id: str, **tags: str):
    """The newest run of the experiment carrying all ``tags``, or None."""
    query = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
    runs = client(tracking_uri).search_runs(
        [experiment_id], filter_string=query, max_results=1, order_by=["attributes.start_time DESC"]
    )
    return runs[0] if runs else None


def trial_run_id(tracking_uri: str, experiment_id: str, study_run_id: str, trial_id: str, name: str) -> str:
    """The trial's MLflow run: the existing one when a trial restarts, else a new child run."""
    run = find_run(tracking_uri, experiment_id, **{PARENT: study_run_id, TAG_TRIAL_ID: trial_id})
    c = client(tracking_uri)
    if run is not None:
        c.update_run(run.info.run_id, status="RUNNING")
        return run.info.run_id
    tags = {contract.ROLE: contract.ROLE_TRIAL, PARENT: study_run_id, TAG_TRIAL_ID: trial_id}
    return c.create_run(experiment_id, run_name=name, tags=tags).info.run_id


def close_running_children(tracking_uri: str, experiment_id: str, study_run_id: str, status: str) -> int:
    """Set every RUNNING child run of the study to ``status``; returns how many."""
    c = client(tracking_uri)
    query = f"tags.`{PARENT}` = '{study_run_id}' and attributes.status = 'RUNNING'"
    runs = all_pages(c.search_runs, [experiment_id], filter_string=query)
    for run in runs:
        c.set_terminated(run.info.run_id, status=status)
    return len(runs)


def download(uri: str, tracking_uri: str, cache_dir: str | Path | None = None) -> Path:
    """Download an artifact URI once per node into a cache; concurrent callers see a whole copy."""
    import mlflow

    cache = Path(cache_dir or Path.home() / ".cache" / "mambalitesr")
    target = cache / hashlib.sha256(f"{tracking_uri}|{uri}".encode()).hexdigest()[:20]
    if target.exists():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=cache, prefix=".partial-"))
    try:
        mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(tmp), tracking_uri=tracking_uri)
        try:
            os.rename(tmp, target)  # atomic; loses harmlessly to a concurrent identical download
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def single_file(folder: Path, suffix: str) -> Path:
    """The one file with ``suffix`` under ``folder`` (downloads of runs:/ URIs are folders or files)."""
    if folder.is_file():
        return folder
    found = sorted(folder.rglob(f"*{suffix}"))
    if not found:
        raise FileNotFoundError(f"no {suffix} file in downloaded artifact {folder}")
    return found[0]
