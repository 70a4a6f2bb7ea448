"""The agent's side of the MLflow contract: every MLflow client call the agent makes is here.

Works with the full ``mlflow`` package or ``mlflow-skinny`` (what the device installs).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from edge_agent import contract
from edge_agent.errors import UserError
from edge_agent.outbox import Report


class RegistryError(UserError, RuntimeError):
    """The tracking server could not be reached or refused a call; the message names the server."""


_ERRNO = re.compile(r"\[Errno -?\d+\] [^'\")]+|Read timed out|timed out")
_HINTS = {  # what to do, by the error code the server sent back
    "RESOURCE_DOES_NOT_EXIST": "check the name, version or run id, and that it was logged to this server",
    "INVALID_PARAMETER_VALUE": "check the name, version or run id",
    "PERMISSION_DENIED": "set MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD or MLFLOW_TRACKING_TOKEN",
    "UNAUTHENTICATED": "set MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD or MLFLOW_TRACKING_TOKEN",
}


@contextmanager
def server_errors(tracking_uri: str, what: str) -> Iterator[None]:
    """Turn MLflow's exceptions inside the block into a ``RegistryError`` saying ``what`` failed.

    The one place that words MLflow's failures (the agent's registry calls, trainers.evaluate's
    downloads): a server that did not answer, an error it sent back (an unknown model, a refused
    permission), or a request MLflow refused to make (a malformed ``runs:/`` URI).
    """
    from mlflow.exceptions import MlflowException, RestException

    try:
        yield
    except MlflowException as exc:
        detail = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        if isinstance(exc, RestException):
            hint = _HINTS.get(exc.error_code, "")
            raise RegistryError(
                f"the MLflow server at {tracking_uri} refused to {what}: {detail}"
                + (f"; {hint}" if hint else "")
            ) from exc
        if isinstance(exc.__context__, OSError):  # requests' connection errors: nothing answered
            found = _ERRNO.search(str(exc))
            raise RegistryError(
                f"could not reach the MLflow server at {tracking_uri} to {what} "
                f"({found.group(0).strip() if found else type(exc.__context__).__name__}): check that the "
                "server is running and that the tracking URI is right"
            ) from exc
        raise RegistryError(f"MLflow could not {what} (tracking URI {tracking_uri}): {detail}") from exc


@dataclass(frozen=True)
class Version:
    name: str
    version: str
    run_id: str
    tags: dict[str, str]

    def status(self, device: str) -> str | None:
        return self.tags.get(contract.status_tag(device))


class Registry:
    """Model versions, their tags, their ONNX artifact, and reports onto their trial runs.

    Every method raises ``RegistryError`` (a sentence naming the server) where MLflow fails.
    """

    def __init__(self, tracking_uri: str, model_name: str = contract.REGISTERED_MODEL):
        from mlflow.tracking import MlflowClient

        self.tracking_uri = tracking_uri
        self.model_name = model_name
        self.client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)

    @staticmethod
    def _version(v) -> Version:
        run_id = v.run_id or v.tags.get(contract.TAG_TRIAL_RUN, "")
        return Version(v.name, str(v.version), run_id, dict(v.tags))

    def versions(self) -> list[Version]:
        """Every version of the model, oldest first (all pages)."""
        out, token = [], None
        with self._calls(f"list the versions of {self.model_name}"):
            while True:
                page = self.client.search_model_versions(
                    f"name='{self.model_name}'", max_results=200, page_token=token
                )
                out += [self._version(v) for v in page]
                token = page.token
                if not token:
                    break
        return sorted(out, key=lambda v: int(v.version))

    def _calls(self, what: str):
        return server_errors(self.tracking_uri, what)

    def get(self, version: str) -> Version:
        with self._calls(f"read version {version} of {self.model_name}"):
            return self._version(self.client.get_model_version(self.model_name, version))

    def set_tags(self, version: str, tags: dict[str, str]) -> None:
        with self._calls(f"tag version {version} of {self.model_name}"):
            for k, v in tags.items():
                self.client.set_model_version_tag(self.model_name, version, k, v)

    def delete_tag(self, version: str, key: str) -> None:
        with self._calls(f"untag version {version} of {self.model_name}"):
            self.client.delete_model_version_tag(self.model_name, version, key)

    def download_onnx(self, version: str, dest: Path) -> Path:
        """The version's ``model.onnx`` under ``dest`` (a fresh directory)."""
        import mlflow.artifacts

        dest.mkdir(parents=True, exist_ok=True)
        # the version's own artifact location: a models:/ URI would be resolved against the default
        # registry, not this tracking server
        with self._calls(f"download version {version} of {self.model_name}"):
            uri = self.client.get_model_version_download_uri(self.model_name, version)
            local = mlflow.artifacts.download_artifacts(
                artifact_uri=uri, dst_path=str(dest), tracking_uri=self.tracking_uri
            )
        hits = sorted(Path(local).rglob(contract.ONNX_FILE)) if Path(local).is_dir() else [Path(local)]
        if not hits:
            raise FileNotFoundError(f"version {version} of {self.model_name} has no {contract.ONNX_FILE}")
        return hits[0]

    def release_claim(self, version: str, device: str) -> None:
        """Remove the claim's tags (``contract.CLAIM_TAGS``) from a version, where present."""
        tags = self.get(version).tags
        for name in contract.CLAIM_TAGS:
            if contract.edge_key(device, name) in tags:
                self.delete_tag(version, contract.edge_key(device, name))

    def deliver(self, report: Report) -> None:
        """Log a report onto its trial run and version. Safe to call again after a partial failure.

        On the run: the figures as metrics, the report's tags (``contract.REPORT_TAGS``) and error,
        and the whole report as one JSON artifact (``contract.measurement_artifact``). Every metric
        carries the report's timestamp; one the run's history already holds at that timestamp is
        not sent again, so metrics are never logged twice. (MLflow's SQL store would drop an
        identical metric itself, its file store would not: this does not rely on either.) Tags and
        the artifact are written again with the same values. On the version: the figures and tags,
        then the status, last, so ``done`` means everything landed; then the claim's tags go (a
        finished version is nobody's to claim; a retry removes what a failure left).
        """
        from mlflow.entities import Metric, RunTag

        d = report.device
        if report.run_id:
            with self._calls(f"log the {d} report for version {report.version} on run {report.run_id}"):
                metrics = [
                    Metric(contract.edge_key(d, k), float(v), report.timestamp_ms, 0)
                    for k, v in report.metrics.items()
                ]
                metrics = [m for m in metrics if not self._logged(report.run_id, m)]
                tags = [RunTag(contract.edge_key(d, k), str(v)[:5000]) for k, v in report.tags.items()]
                if report.error:
                    tags.append(RunTag(contract.error_tag(d), report.error[:5000]))
                self.client.log_batch(report.run_id, metrics=metrics, tags=tags)
                self.client.log_dict(report.run_id, asdict(report), contract.measurement_artifact(d))
        version_tags = {contract.edge_key(d, k): f"{v:.6g}" for k, v in report.metrics.items()}
        for name in contract.REPORT_TAGS:
            if report.tags.get(name):
                version_tags[contract.edge_key(d, name)] = str(report.tags[name])[:5000]
        if report.error:
            version_tags[contract.error_tag(d)] = report.error[:5000]
        self.set_tags(report.version, version_tags)
        self.set_tags(report.version, {contract.status_tag(d): report.status})
        self.release_claim(report.version, d)
        self.describe_status(report)

    def describe_status(self, report: Report) -> None:
        """Rewrite the device's line of the version's description with what was measured (or why
        it failed), so that the page agrees with the status tag; after the status, as a page."""
        line = contract.status_line(report.device, report.status, report.metrics, report.tags, report.error)
        with self._calls(f"describe version {report.version}'s {report.device} status"):
            text = self.client.get_model_version(self.model_name, report.version).description or ""
            new = contract.with_status_line(text, report.device, line)
            if new != text:
                self.client.update_model_version(self.model_name, report.version, description=new)

    def _logged(self, run_id: str, metric) -> bool:
        """Whether the run's history holds ``metric``'s key at its timestamp and step (a report's)."""
        history = self.client.get_metric_history(run_id, metric.key)
        return any(m.timestamp == metric.timestamp and m.step == metric.step for m in history)
