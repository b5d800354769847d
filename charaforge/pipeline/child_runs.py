"""Nested MLflow runs: one child run per candidate under a stage's run (`tracking.StageRun`).

Children are logged by run id through an `MlflowClient`, so several can be open at once, and
their metrics go out in batches (one SQLite transaction per batch, not per value).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from charaforge.pipeline.tracking import StageRun, flatten

# A child run's metrics go to MLflow in batches of this many points. One `log_metric` call per
# value was one SQLite transaction each: 5 metrics x 2,400 steps cost ~300 s of the world demo's
# train stage (75 s without tracking). A killed run loses at most the unsent batch's points.
METRIC_BATCH = 200


class ChildRun:
    """A nested MLflow run (one per candidate) under a stage's run, logged by run id so that
    several can be open at once; metric names are the same in every child, so MLflow's compare
    view overlays the candidates. Metrics are sent in batches (`flush`, `end`)."""

    def __init__(self, client: Any, run_id: str) -> None:
        self._client, self.run_id = client, run_id
        self._metrics: list[Any] = []

    def log_params(self, params: Mapping[str, Any]) -> None:
        for key, value in flatten(params).items():
            self._client.log_param(self.run_id, key, str(value)[:6000])

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        self._metrics += [
            Metric(key, float(value), stamp, step or 0) for key, value in metrics.items()
        ]
        if len(self._metrics) >= METRIC_BATCH:
            self.flush()

    def flush(self) -> None:
        """Send the metrics logged so far (MLflow takes up to 1,000 per call)."""
        while self._metrics:
            batch, self._metrics = self._metrics[:1000], self._metrics[1000:]
            self._client.log_batch(self.run_id, metrics=batch)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if Path(path).is_dir():
            self._client.log_artifacts(self.run_id, str(path), artifact_path=artifact_path)
        elif Path(path).exists():
            self._client.log_artifact(self.run_id, str(path), artifact_path=artifact_path)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        for key, value in tags.items():
            self._client.set_tag(self.run_id, key, str(value))

    def end(self, status: str = "FINISHED") -> None:
        self.flush()
        self._client.set_terminated(self.run_id, status=status)


class _NoChildRun(ChildRun):
    """Tracking disabled: a child that records nothing."""

    def __init__(self) -> None:
        self.run_id = None  # type: ignore[assignment]

    def log_params(self, params: Mapping[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        pass

    def flush(self) -> None:
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
