"""The report's links into MLflow: the runs behind the ranking and the champion's model version.

The report finds the runs by what they wrote, not by when they ran: the train and score stages
tag their run with the hash of their key output (`charaforge.output_hash`, set by
`StageContext.tag_output_hash`), and the report looks up the latest finished run whose hash is
that of the file it reads. So a stage that DVC skipped (its outputs unchanged) still links to the
run that wrote those bytes; when no run in this store did (tracking was off, another store, a run
from before the tag existed), the report says so instead of guessing.

URLs are the MLflow UI's own: `<ui>/#/experiments/<id>/runs/<run id>` and
`<ui>/#/models/<name>/versions/<n>`. `<ui>` is `tracking.ui_url` when set, the tracking server
itself for an http(s) store, else `mlflow ui`'s default address http://127.0.0.1:5000 (where
`make mlflow-ui` serves the local SQLite store).

Run ids and the version number are the only bytes of the report pages that differ between two
executions of the same params and data: the pages keep them between the `LINKS_BEGIN` and
`LINKS_END` comments (`report.mlflow_links=false` leaves them out).
"""

from __future__ import annotations

import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from charaforge.config import TrackingConfig
from charaforge.pipeline.tracking import (
    OUTPUT_HASH_TAG,
    STAGE_TAG,
    content_digest,
    repository_root,
    sqlite_path,
    tracking_uri,
)

DEFAULT_UI = "http://127.0.0.1:5000"  # `mlflow ui` (and `make mlflow-ui`) listens here
LINKS_BEGIN = "<!-- mlflow links -->"
LINKS_END = "<!-- /mlflow links -->"
_PARENT_TAG = "mlflow.parentRunId"


@dataclass(frozen=True)
class RunLink:
    """One MLflow run the report names (url None: not found, `note` says why)."""

    label: str
    run_id: str | None
    url: str | None
    note: str = ""


@dataclass(frozen=True)
class MlflowLinks:
    ui: str
    ui_command: str  # how to start the UI for this store ("" when it is a server)
    experiment_id: str
    experiment_url: str
    registered_model: str
    model_version: str | None
    model_version_url: str | None
    runs: list[RunLink] = field(default_factory=list)


def ui_base(config: TrackingConfig, uri: str) -> str:
    """The MLflow UI's address: `tracking.ui_url`, else the server itself, else DEFAULT_UI."""
    if config.ui_url:
        return config.ui_url.rstrip("/")
    if uri.startswith(("http://", "https://")):
        return uri.rstrip("/")
    return DEFAULT_UI


def ui_command(uri: str, root: Path) -> str:
    """What starts a UI on this store: nothing for a server, `mlflow ui` for a local store."""
    if uri.startswith(("http://", "https://")):
        return ""
    path = sqlite_path(uri)
    if path is not None and path.resolve() == (root / "mlflow.db").resolve():
        return "make mlflow-ui (or: mlflow ui --backend-store-uri sqlite:///mlflow.db)"
    return f"mlflow ui --backend-store-uri {uri}"


def run_url(ui: str, experiment_id: str, run_id: str) -> str:
    return f"{ui}/#/experiments/{experiment_id}/runs/{run_id}"


def model_version_url(ui: str, name: str, version: str) -> str:
    return f"{ui}/#/models/{urllib.parse.quote(name, safe='')}/versions/{version}"


def find_stage_run(client: Any, experiment_id: str, stage: str, digest: str) -> Any | None:
    """The latest finished parent run of `stage` whose output hash is `digest`."""
    runs = client.search_runs(
        [experiment_id],
        filter_string=(
            f"tags.`{STAGE_TAG}` = '{stage}' and tags.`{OUTPUT_HASH_TAG}` = '{digest}' "
            "and attributes.status = 'FINISHED'"
        ),
        order_by=["attributes.start_time DESC"],
        max_results=50,
    )
    return next((run for run in runs if _PARENT_TAG not in run.data.tags), None)


def child_runs(client: Any, experiment_id: str, parent_id: str) -> list[Any]:
    """The nested runs of `parent_id`, by candidate name."""
    runs = client.search_runs(
        [experiment_id], filter_string=f"tags.`{_PARENT_TAG}` = '{parent_id}'", max_results=1000
    )
    return sorted(
        runs, key=lambda run: run.data.tags.get("charaforge.candidate", run.info.run_name)
    )


def report_links(
    report_run_id: str,
    config: TrackingConfig,
    registered_model: str,
    model_version: str | None,
    outputs: Mapping[str, Sequence[str | Path]],
) -> MlflowLinks:
    """Links to the runs that wrote `outputs` (stage -> its key output files), their child runs,
    the report's own run and the champion's model version. Needs the stage's MLflow store set."""
    from mlflow import MlflowClient

    root = repository_root()
    uri = tracking_uri(config, root)
    client = MlflowClient(tracking_uri=uri)
    experiment_id = client.get_run(report_run_id).info.experiment_id
    ui = ui_base(config, uri)
    runs: list[RunLink] = []
    for stage, paths in outputs.items():
        digest = content_digest(*paths)
        found = find_stage_run(client, experiment_id, stage, digest) if digest else None
        if found is None:
            names = ", ".join(Path(path).as_posix() for path in paths)
            note = f"no finished run in this store wrote {names}" + (
                f" (sha256 {digest})" if digest else " (not found)"
            )
            runs.append(RunLink(f"{stage} stage", None, None, note))
            continue
        runs.append(
            RunLink(
                f"{stage} stage", found.info.run_id, run_url(ui, experiment_id, found.info.run_id)
            )
        )
        for child in child_runs(client, experiment_id, found.info.run_id):
            name = child.data.tags.get("charaforge.candidate", child.info.run_name)
            url = run_url(ui, experiment_id, child.info.run_id)
            runs.append(RunLink(f"{stage} · {name}", child.info.run_id, url))
    runs.append(
        RunLink(
            "report stage (this report)", report_run_id, run_url(ui, experiment_id, report_run_id)
        )
    )
    return MlflowLinks(
        ui=ui,
        ui_command=ui_command(uri, root),
        experiment_id=experiment_id,
        experiment_url=f"{ui}/#/experiments/{experiment_id}",
        registered_model=registered_model,
        model_version=model_version,
        model_version_url=None
        if model_version is None
        else model_version_url(ui, registered_model, model_version),
        runs=runs,
    )
