"""Checks every CLI runs before any work, so a dead tracking server is a sentence, not a hang.

MLflow's client retries a server that does not answer for minutes (7 retries with back-off, 120 s
per request) and prints nothing meanwhile. A CLI calls ``limit_mlflow_retries()`` first, then
``tracking_server_problem(uri)`` (and, where it reads what a search wrote,
``missing_database_problem(uri)``); a problem is printed as ``error: ...`` and the CLI exits 1 (2 is
kept for a wrong command line or config). Torch-free: the edge agent uses it too.
"""

from __future__ import annotations

import http.client
import os
import ssl
import urllib.error
import urllib.parse
import urllib.request

PROBE_TIMEOUT_S = 5.0  # connect + first answer; a live server's /health answers in milliseconds
# Setting these bounds a server that dies mid-run to tens of seconds per call, not minutes.
MLFLOW_RETRY_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}


def limit_mlflow_retries() -> None:
    """Fewer, shorter MLflow HTTP retries for this process and the processes it starts; values
    already in the environment win."""
    for key, value in MLFLOW_RETRY_DEFAULTS.items():
        os.environ.setdefault(key, value)


def tracking_server_problem(tracking_uri: str, timeout_s: float = PROBE_TIMEOUT_S) -> str | None:
    """Why nothing answers at an http(s) tracking URI (None if something does, or not http(s)).

    One GET of ``{uri}/health``: any HTTP answer counts, even an error status, since an auth proxy
    or a path prefix may answer differently and MLflow itself will say what is wrong then. Proxies
    in the environment are honoured, as MLflow's client honours them. A TLS failure also counts as
    an answer: MLflow has its own settings for certificates (MLFLOW_TRACKING_INSECURE_TLS, ...).
    """
    parts = urllib.parse.urlsplit(tracking_uri)
    if parts.scheme not in ("http", "https"):
        return None  # sqlite:, file:, databricks: ... have no server of ours to probe
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        return f"the tracking URI {tracking_uri} has an invalid port; give it as http://host:port"
    where = f"{parts.hostname}:{port}"
    try:
        with urllib.request.urlopen(f"{tracking_uri.rstrip('/')}/health", timeout=timeout_s):
            return None
    except urllib.error.HTTPError:
        return None  # it answered
    except urllib.error.URLError as exc:
        if isinstance(exc.reason, ssl.SSLError):
            return None
        why = _reason(exc.reason, timeout_s)
    except (OSError, http.client.HTTPException) as exc:  # timeouts, resets, not HTTP at all
        why = _reason(exc, timeout_s)
    return (
        f"no MLflow tracking server answers at {where} ({why}): start one there "
        f"(`mlflow server --host {parts.hostname} --port {port}`) or pass the right --tracking-uri"
    )


def missing_database_problem(tracking_uri: str | None) -> str | None:
    """Why a ``sqlite:`` tracking URI names no database (None for any other URI, or a file that
    exists). For commands that read what a search wrote: MLflow would create an empty database at
    a mistyped path and then report that nothing is in it."""
    prefix = "sqlite:///"
    if not tracking_uri or not tracking_uri.startswith(prefix):
        return None
    path = urllib.parse.urlsplit(tracking_uri).path[1:]  # sqlite:///rel.db, sqlite:////abs.db
    if not path or path == ":memory:" or os.path.isfile(path):
        return None
    return (
        f"no MLflow database at {path} (from the tracking URI {tracking_uri}); check the path: "
        "nothing was created there (a search creates the database)"
    )


def study_store_problem(tracking_uri: str) -> str | None:
    """For commands that read what a search wrote: ``missing_database_problem``, else
    ``tracking_server_problem``."""
    return missing_database_problem(tracking_uri) or tracking_server_problem(tracking_uri)


def _reason(exc: object, timeout_s: float) -> str:
    if isinstance(exc, TimeoutError):
        return f"no answer within {timeout_s:g} s"
    if isinstance(exc, http.client.HTTPException):
        return "what answers there does not speak HTTP"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    return str(exc) or type(exc).__name__
