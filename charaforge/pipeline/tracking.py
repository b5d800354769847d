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
    mlflow.set_tracking_uri(tracking_uri(config, root))
    experiment = mlflow.get_experiment_by_name(config.experiment)
    if experiment is None:
        artifact_root = (root / "mlartifacts").resolve().as_uri()
        mlflow.create_experiment(config.experiment, artifact_location=artifact_root)
    mark_model_training(mlflow.set_experiment(config.experiment).experiment_id)
    all_tags = {
        "charaforge.pipeline.stage": stage,
        "mlflow.source.git.commit": git_commit(root),
        "dvc.experiment": os.environ.get("DVC_EXP_NAME", "workspace"),
        **(tags or {}),
    }
    name = run_name or stage
    with mlflow.start_run(run_name=name, tags={k: str(v) for k, v in all_tags.items()}):
        yield StageRun(mlflow)


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


class ChildRun:
    """A nested MLflow run (one per candidate) under a stage's run, logged by run id so that
    several can be open at once; metric names are the same in every child, so MLflow's compare
    view overlays the candidates."""

    def __init__(self, client: Any, run_id: str) -> None:
        self._client, self.run_id = client, run_id

    def log_params(self, params: Mapping[str, Any]) -> None:
        for key, value in flatten(params).items():
            self._client.log_param(self.run_id, key, str(value)[:6000])

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        for key, value in metrics.items():
            self._client.log_metric(self.run_id, key, float(value), step=step or 0)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if Path(path).is_dir():
            self._client.log_artifacts(self.run_id, str(path), artifact_path=artifact_path)
        elif Path(path).exists():
            self._client.log_artifact(self.run_id, str(path), artifact_path=artifact_path)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        for key, value in tags.items():
            self._client.set_tag(self.run_id, key, str(value))

    def end(self, status: str = "FINISHED") -> None:
        self._client.set_terminated(self.run_id, status=status)


class _NoChildRun(ChildRun):
    """Tracking disabled: a child that records nothing."""

    def __init__(self) -> None:
        self.run_id = None  # type: ignore[assignment]

    def log_params(self, params: Mapping[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        pass

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        pass

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        pass

    def end(self, status: str = "FINISHED") -> None:
        pass


def open_child_run(run: StageRun, name: str, tags: Mapping[str, Any] | None = None) -> ChildRun:
    """A nested run under the stage's active run (`mlflow.parentRunId`), named `name`; the
    caller ends it (`ChildRun.end`)."""
    parent = run.run_id
    if parent is None:
        return _NoChildRun()
    from mlflow import MlflowClient

    client = MlflowClient()
    parent_run = client.get_run(parent)
    inherited = {
        key: value
        for key, value in parent_run.data.tags.items()
        if key.startswith(("charaforge.", "dvc.", "mlflow.source.git"))
    }
    child = client.create_run(
        parent_run.info.experiment_id,
        run_name=name,
        tags={
            **inherited,
            "mlflow.parentRunId": parent,
            **{key: str(value) for key, value in (tags or {}).items()},
        },
    )
    return ChildRun(client, child.info.run_id)
