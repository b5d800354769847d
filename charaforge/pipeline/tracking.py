"""MLflow tracking: one run per stage execution, tagged with its provenance.

The store defaults to SQLite at the repository root (MLflow 3.13+ refuses the ./mlruns file
store); the artifact root is an absolute path so that runs started from DVC's temporary
experiment copies still land in the real repository.

Tracking must never destroy work. So the store is checked once at the start with a short timeout
(an unreachable or silent server, a corrupt or locked SQLite file: one line, exit 2, before any
work); a fresh SQLite store and the experiment are created under a file lock (two queued
experiments would otherwise race in MLflow's migration); and every call during the run goes
through `StageRun._call`, which buffers what fails and retries later, so a lock or a slow server
mid-run costs a warning, never the stage (anything still unsent at the end is written to a
backlog file beside the store).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import sqlite3
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from charaforge.config import TrackingConfig
from charaforge.core.files import sha256_file
from charaforge.errors import CharaForgeError

log = logging.getLogger(__name__)

# Seconds the start-up check waits for the store; also MLflow's own HTTP timeout for later calls.
CONNECT_TIMEOUT_S = 5.0
# Seconds between retries of buffered calls once a call failed.
RETRY_INTERVAL_S = 10.0
STAGE_TAG = "charaforge.pipeline.stage"
# The hash of a stage's key output: how the report finds the run that wrote what it reads.
OUTPUT_HASH_TAG = "charaforge.output_hash"


class TrackingError(CharaForgeError):
    """The tracking store cannot be used: the message says which and what to do."""


def _hint() -> str:
    return "start it, fix tracking.uri, or run with tracking.enabled=false"


def repository_root(start: Path | None = None) -> Path:
    """The real repository root: DVC_ROOT inside `dvc exp run` copies, else the git top level."""
    if os.environ.get("DVC_ROOT"):
        return Path(os.environ["DVC_ROOT"]).resolve()
    start = (start or Path.cwd()).resolve()
    for candidate in (start, *start.parents):
        if (candidate / ".dvc").is_dir() or (candidate / ".git").exists():
            return candidate
    return start


def tracking_uri(config: TrackingConfig, root: Path | None = None) -> str:
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    if config.uri:
        return config.uri
    return f"sqlite:///{(root or repository_root()) / 'mlflow.db'}"


def git_commit(root: Path | None = None) -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=root or Path.cwd(),
            capture_output=True,
            text=True,
            check=True,
        )
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def content_digest(*paths: str | Path) -> str:
    """The files' SHA-256 (first 16 hex digits each, joined by '-'); absent files left out."""
    return "-".join(sha256_file(path)[:16] for path in paths if Path(path).is_file())


def flatten(mapping: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in mapping.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            flat.update(flatten(value, name))
        else:
            flat[name] = value
    return flat


def check_http_store(uri: str, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """An MLflow server that answers `/health` within `timeout` seconds, or TrackingError."""
    url = uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 (http only)
            response.read(64)
    except urllib.error.HTTPError as error:
        if error.code >= 500:
            raise TrackingError(f"tracking.uri: {uri} answers {error.code}; {_hint()}") from None
    except (TimeoutError, urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", error)
        if isinstance(reason, socket.timeout | TimeoutError):
            reason = f"no answer within {timeout:g} s"
        raise TrackingError(f"tracking.uri: {uri} is not reachable ({reason}); {_hint()}") from None
    # Later calls: a short timeout and few retries instead of MLflow's ~250 s of back-off.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(int(timeout * 2)))
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")


def sqlite_path(uri: str) -> Path | None:
    """The file of a `sqlite:///...` URI (None for other stores)."""
    if not uri.startswith("sqlite:///"):
        return None
    return Path(urllib.parse.unquote(uri[len("sqlite:///") :]))


def check_sqlite_store(path: Path, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """An existing SQLite store that is a readable MLflow database, or TrackingError."""
    if not path.exists() or path.stat().st_size == 0:
        return  # MLflow creates it (under the store lock)
    try:
        connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=timeout)
        try:
            connection.execute("SELECT version_num FROM alembic_version").fetchall()
        finally:
            connection.close()
    except sqlite3.OperationalError as error:
        if "locked" in str(error):
            raise TrackingError(
                f"tracking store {path} is locked by another process for over {timeout:g} s; "
                "wait for it or end it"
            ) from None
        raise TrackingError(
            f"tracking store {path} is not an MLflow database ({error}); move it aside"
        ) from None
    except sqlite3.DatabaseError as error:
        raise TrackingError(
            f"tracking store {path} is corrupt ({error}); move it aside to start a new one"
        ) from None


@contextlib.contextmanager
def store_lock(path: Path, timeout: float = 60.0) -> Iterator[None]:
    """Serialise store creation and experiment creation between processes."""
    try:
        with FileLock(f"{path}.lock", timeout=timeout):
            yield
    except Timeout:
        message = f"tracking store {path}: its lock {path}.lock was held for {timeout:g} s"
        raise TrackingError(message) from None


def close_stale_runs(mlflow_module: Any, experiment_id: str) -> list[str]:
    """Mark KILLED the RUNNING runs of this host whose process is gone (a killed stage)."""
    client = mlflow_module.MlflowClient()
    host = socket.gethostname()
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"attributes.status = 'RUNNING' and tags.`charaforge.host` = '{host}'",
        max_results=1000,
    )
    closed = []
    for run in runs:
        pid = run.data.tags.get("charaforge.pid", "")
        if pid.isdigit() and not _alive(int(pid)):
            client.set_terminated(run.info.run_id, status="KILLED")
            closed.append(run.info.run_id)
    if closed:
        log.warning("marked %d run(s) of killed stages KILLED: %s", len(closed), ", ".join(closed))
    return closed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class StageRun:
    """What a stage logs to: a thin wrapper that is a no-op when tracking is disabled.

    Every call goes through `_call`: a failure (a locked SQLite store, a slow or gone server)
    is logged as a warning and the call is kept; kept calls are retried at most every
    `RETRY_INTERVAL_S` seconds and at `flush()`, in their original order.
    """

    def __init__(self, mlflow_module: Any | None, backlog: Path | None = None) -> None:
        self._mlflow = mlflow_module
        self._pending: list[tuple[str, Callable[[], None], dict[str, Any]]] = []
        self._failed_at: float | None = None
        self._backlog = backlog
        self._run_id: str | None = None

    @property
    def run_id(self) -> str | None:
        if self._mlflow is None:
            return None
        if self._run_id is None:
            active = self._mlflow.active_run()
            self._run_id = active.info.run_id if active else None
        return self._run_id

    @property
    def pending(self) -> int:
        """Calls that failed and wait for a retry."""
        return len(self._pending)

    def _call(self, what: str, call: Callable[[], None], record: dict[str, Any]) -> None:
        if self._mlflow is None:
            return
        self._pending.append((what, call, record))
        if self._failed_at is not None and time.monotonic() - self._failed_at < RETRY_INTERVAL_S:
            return  # still failing recently: keep it for the next retry
        self._send()

    def _send(self) -> bool:
        while self._pending:
            what, call, _record = self._pending[0]
            try:
                call()
            except Exception as error:  # noqa: BLE001 (any store error: keep the work going)
                if self._failed_at is None:
                    first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
                    log.warning(
                        "tracking: %s failed (%s); kept and retried later", what, first_line
                    )
                self._failed_at = time.monotonic()
                return False
            self._pending.pop(0)
        if self._failed_at is not None:
            log.warning("tracking: the store answers again; buffered calls sent")
        self._failed_at = None
        return True

    def flush(self, attempts: int = 3, wait_s: float = 2.0) -> None:
        """Send what is kept; after `attempts`, write it to the backlog file with a warning."""
        for attempt in range(attempts):
            if self._send():
                return
            if attempt + 1 < attempts:
                time.sleep(wait_s)
        if self._backlog is not None:
            self._backlog.parent.mkdir(parents=True, exist_ok=True)
            with self._backlog.open("a", encoding="utf-8") as handle:
                for what, _call, record in self._pending:
                    line = {"run_id": self.run_id, "call": what, **record}
                    handle.write(json.dumps(line, default=str) + "\n")
        log.warning(
            "tracking: %d call(s) could not be sent; written to %s",
            len(self._pending),
            self._backlog,
        )
        self._pending.clear()

    def log_params(self, params: Mapping[str, Any]) -> None:
        if self._mlflow is not None:
            flat = {key: str(value)[:6000] for key, value in flatten(params).items()}
            self._call("log_params", lambda: self._mlflow.log_params(flat), {"params": flat})

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        if self._mlflow is not None:
            values = {k: float(v) for k, v in metrics.items()}
            self._call(
                "log_metrics",
                lambda: self._mlflow.log_metrics(values, step=step),
                {"metrics": values, "step": step},
            )

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if self._mlflow is not None and Path(path).exists():
            if Path(path).is_dir():
                call = lambda: self._mlflow.log_artifacts(str(path), artifact_path=artifact_path)  # noqa: E731
            else:
                call = lambda: self._mlflow.log_artifact(str(path), artifact_path=artifact_path)  # noqa: E731
            self._call("log_artifact", call, {"path": str(path), "artifact_path": artifact_path})

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        if self._mlflow is not None:
            values = {k: str(v) for k, v in tags.items()}
            self._call("set_tags", lambda: self._mlflow.set_tags(values), {"tags": values})


def check_store(uri: str) -> None:
    """Fail in one line (TrackingError) when the store cannot be used, before any work."""
    if uri.startswith(("http://", "https://")):
        check_http_store(uri)
    elif (path := sqlite_path(uri)) is not None:
        check_sqlite_store(path)


def open_experiment(mlflow_module: Any, config: TrackingConfig, uri: str, root: Path) -> str:
    """The experiment's id, creating the store and the experiment once, under a file lock."""
    path = sqlite_path(uri)
    lock = store_lock(path) if path is not None else contextlib.nullcontext()
    with lock:
        experiment = mlflow_module.get_experiment_by_name(config.experiment)
        if experiment is None:
            artifact_root = (root / "mlartifacts").resolve().as_uri()
            return mlflow_module.create_experiment(
                config.experiment, artifact_location=artifact_root
            )
        return experiment.experiment_id


class Terminated(BaseException):
    """SIGTERM turned into an exception, so the run is closed as KILLED on the way out."""


def _raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated(f"signal {signum}")


@contextlib.contextmanager
def stage_run(
    config: TrackingConfig,
    stage: str,
    tags: Mapping[str, Any] | None = None,
    run_name: str | None = None,
) -> Iterator[StageRun]:
    """Open an MLflow run for one stage execution (or a no-op run when tracking is disabled).

    `run_name` (default: the stage) is what MLflow's run list shows (see `stage_run_name`).
    """
    if not config.enabled:
        yield StageRun(None)
        return
    import mlflow

    root = repository_root()
    uri = tracking_uri(config, root)
    check_store(uri)
    mlflow.set_tracking_uri(uri)
    try:
        experiment_id = open_experiment(mlflow, config, uri, root)
        mlflow.set_experiment(experiment_id=experiment_id)
        mark_model_training(experiment_id)
        close_stale_runs(mlflow, experiment_id)
    except TrackingError:
        raise
    except Exception as error:  # noqa: BLE001 (an MLflow store error at start: one line)
        raise TrackingError(f"tracking store {uri}: {str(error).splitlines()[0]}") from None
    all_tags = {
        STAGE_TAG: stage,
        "mlflow.source.git.commit": git_commit(root),
        "dvc.experiment": os.environ.get("DVC_EXP_NAME", "workspace"),
        "charaforge.host": socket.gethostname(),
        "charaforge.pid": os.getpid(),
        **(tags or {}),
    }
    backlog = root / ".charaforge" / "tracking-backlog.jsonl"
    previous = signal.getsignal(signal.SIGTERM)
    in_main = _in_main_thread()
    if in_main:
        signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        active = mlflow.start_run(
            run_name=run_name or stage, tags={k: str(v) for k, v in all_tags.items()}
        )
        run = StageRun(mlflow, backlog)
        status = "FINISHED"
        try:
            yield run
        except (KeyboardInterrupt, Terminated):
            status = "KILLED"
            raise
        except BaseException:
            status = "FAILED"
            raise
        finally:
            run.flush()
            with contextlib.suppress(Exception):
                mlflow.end_run(status=status)
            del active
    finally:
        if in_main:
            signal.signal(signal.SIGTERM, previous)


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


# --- run structure and names: a parent run per stage execution, a child run per candidate ------

# MLflow 3 opens an experiment in its GenAI view unless this tag says it is model training
# (the UI reads `mlflow.experimentKind`; "custom_model_development" is its training kind).
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING_KIND = "custom_model_development"


def mark_model_training(experiment_id: str) -> None:
    """Tag the experiment as model training (once), so MLflow shows its training views."""
    from mlflow import MlflowClient

    client = MlflowClient()
    experiment = client.get_experiment(experiment_id)
    if experiment.tags.get(EXPERIMENT_KIND_TAG) != MODEL_TRAINING_KIND:
        client.set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND)


def stage_run_name(stage: str, character: str) -> str:
    """`<stage> · <character> · <DVC experiment>`: what a run list needs to tell runs apart."""
    return f"{stage} · {character} · {os.environ.get('DVC_EXP_NAME', 'workspace')}"
