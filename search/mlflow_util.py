"""MLflow calls that are not about studies: a client, every page of a search, a run by tags, an
artifact downloaded once per node, the one file of a download, a SQLite URI every worker can open.

The study's own MLflow state (its runs, tags and registry) is written by ``search.study`` and the
modules it names; these helpers only read, or fetch artifacts.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path


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


def find_run(tracking_uri: str, experiment_id: str, **tags: str):
    """The newest run of the experiment carrying all ``tags``, or None."""
    query = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
    runs = client(tracking_uri).search_runs(
        [experiment_id], filter_string=query, max_results=1, order_by=["attributes.start_time DESC"]
    )
    return runs[0] if runs else None


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
