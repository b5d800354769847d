"""MLflow tracking: one run per stage execution, tagged with its provenance.

The store defaults to SQLite at the repository root (MLflow 3.13+ refuses the ./mlruns file
store); the artifact root is an absolute path so that runs started from DVC's temporary
experiment copies still land in the real repository.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from charaforge.config import TrackingConfig

log = logging.getLogger(__name__)


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


def flatten(mapping: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in mapping.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            flat.update(flatten(value, name))
        else:
            flat[name] = value
    return flat


class StageRun:
    """What a stage logs to: a thin wrapper that is a no-op when tracking is disabled."""

    def __init__(self, mlflow_module: Any | None) -> None:
        self._mlflow = mlflow_module

    @property
    def run_id(self) -> str | None:
        if self._mlflow is None:
            return None
        active = self._mlflow.active_run()
        return active.info.run_id if active else None

    def log_params(self, params: Mapping[str, Any]) -> None:
        if self._mlflow is not None:
            flat = {key: str(value)[:6000] for key, value in flatten(params).items()}
            self._mlflow.log_params(flat)

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        if self._mlflow is not None:
            self._mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if self._mlflow is not None and Path(path).exists():
            if Path(path).is_dir():
                self._mlflow.log_artifacts(str(path), artifact_path=artifact_path)
            else:
                self._mlflow.log_artifact(str(path), artifact_path=artifact_path)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        if self._mlflow is not None:
            self._mlflow.set_tags({k: str(v) for k, v in tags.items()})


@contextlib.contextmanager
def stage_run(
    config: TrackingConfig, stage: str, tags: Mapping[str, Any] | None = None
) -> Iterator[StageRun]:
    """Open an MLflow run for one stage execution (or a no-op run when tracking is disabled)."""
    if not config.enabled:
        yield StageRun(None)
        return
    import mlflow

    root = repository_root()
    mlflow.set_tracking_uri(tracking_uri(config, root))
    experiment = mlflow.get_experiment_by_name(config.experiment)
    if experiment is None:
        artifact_root = (root / "mlartifacts").resolve().as_uri()
        mlflow.create_experiment(config.experiment, artifact_location=artifact_root)
    mlflow.set_experiment(config.experiment)
    all_tags = {
        "charaforge.pipeline.stage": stage,
        "mlflow.source.git.commit": git_commit(root),
        "dvc.experiment": os.environ.get("DVC_EXP_NAME", "workspace"),
        **(tags or {}),
    }
    with mlflow.start_run(run_name=stage, tags={k: str(v) for k, v in all_tags.items()}):
        yield StageRun(mlflow)
