"""What the report stage records in MLflow: champion metrics and tags, per-candidate series, the
report files, and the registry alias `@champion` on the champion's checkpoint (a model version
created by `register_champion`; the alias moves in `log_selection`, after the pages are written)."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import pandas as pd

from charaforge.core import layout
from charaforge.pipeline.child_runs import open_child_run
from charaforge.pipeline.tracking import StageRun
from charaforge.selection.champion import Selection

log = logging.getLogger(__name__)

# Columns of the ranking that are not a metric of the row (identity, counts, flags, CI bounds).
_NOT_METRICS = {"rank", "candidate", "step", "lora_scale", "n_images", "pareto", "memorising"}
_NOT_METRICS |= {"ci_low", "ci_high"}
REPORT_FILES = ("metrics.json", "selection.md", "selection.html")


def metric_columns(table: pd.DataFrame) -> list[str]:
    """The ranking's numeric per-row values that are logged as metrics (composite included)."""
    return [column for column in table.columns if column not in _NOT_METRICS]


def _finite(row: pd.Series, names: list[str], suffix: str = "") -> dict[str, float]:
    return {
        f"{name}{suffix}": float(row[name]) for name in names if not math.isnan(float(row[name]))
    }


def log_selection(
    run: StageRun,
    selection: Selection,
    train_dir: str | Path,
    registered_model: str,
    report_dir: str | Path,
    character: str = "",
    registered: bool = False,
    registry_version: str | None = None,
) -> None:
    """Log the selection to the stage's run and promote the champion in the registry.

    `registered`: `register_champion` already created `registry_version` for this selection
    (the report links to it); otherwise it is registered here. The alias moves only now, after
    the pages are written.
    """
    champion, table = selection.champion, selection.table
    names = metric_columns(table)
    run.log_metrics({f"champion_{name}": value for name, value in _finite(champion, names).items()})
    if selection.baseline is not None:
        run.log_metrics({"champion_minus_baseline": selection.baseline.difference})
    run.set_tags(
        {
            "charaforge.champion": f"{champion['candidate']}/step-{champion['step']}"
            f"/scale-{champion['lora_scale']:g}",
            "charaforge.statistical_tie": selection.statistical_tie,
            "charaforge.beats_baseline": selection.baseline is not None
            and selection.baseline.verdict == "beats",
            "charaforge.stand_in": bool(selection.stand_in),
        }
    )
    # One nested run per candidate, its metrics under the same names in every child (MLflow step
    # = training step, at each checkpoint's best LoRA scale): the compare view overlays them.
    for candidate in sorted(table["candidate"].unique()):
        child = open_child_run(
            run, f"{candidate} · {character} · scores", tags={"charaforge.candidate": candidate}
        )
        rows = table[table["candidate"] == candidate]
        for step, group in rows.groupby("step", sort=True):
            best = group.sort_values(["composite", "lora_scale"], ascending=[False, True]).iloc[0]
            child.log_metrics(_finite(best, names), step=int(step))
        child.end()
    if run.run_id is not None:
        version = (
            registry_version
            if registered
            else register_champion(
                selection, train_dir, registered_model, bool(selection.stand_in), character
            )
        )
        if version is not None:
            set_champion_alias(registered_model, version)
        run.set_tags({"charaforge.registry_version": version or "none"})
    report_dir = Path(report_dir)
    for name in REPORT_FILES:
        run.log_artifact(report_dir / name, artifact_path="report")
    run.log_artifact(report_dir / "plots/score_by_step", artifact_path="report/score_by_step")
    run.log_artifact(report_dir / "plots/pareto.csv", artifact_path="report")


def set_champion_alias(registered_model: str, version: str) -> None:
    from mlflow import MlflowClient

    MlflowClient().set_registered_model_alias(registered_model, "champion", version)
    log.info("registry: %s version %s is now @champion", registered_model, version)


def register_champion(
    selection: Selection,
    train_dir: str | Path,
    registered_model: str,
    stand_in: bool,
    character: str = "",
) -> str | None:
    """A new model version of the champion checkpoint (the alias is not moved here).

    Needs an active MLflow run (the stage's): the checkpoint folder is logged to it as the
    artifact `champion` and the version is created from that artifact. Returns the version, or
    None when the checkpoint folder is absent (nothing to register).
    """
    import mlflow
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    champion = selection.champion
    checkpoint = layout.checkpoint_dir(
        Path(train_dir) / str(champion["candidate"]), champion["step"]
    )
    if not checkpoint.is_dir():
        log.warning(
            "champion checkpoint %s not found: nothing promoted in the registry", checkpoint
        )
        return None
    mlflow.log_artifacts(str(checkpoint), artifact_path="champion")
    client = MlflowClient()
    description = (
        f"CharaForge character LoRA for {character or registered_model}: each version is a "
        "selection report's champion (candidate, step, LoRA scale in its tags); the alias "
        "@champion names the latest."
    )
    try:
        client.create_registered_model(registered_model, description=description)
    except MlflowException as error:
        if error.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        client.update_registered_model(registered_model, description=description)
    tags = {
        "candidate": str(champion["candidate"]),
        "step": str(int(champion["step"])),
        "lora_scale": f"{champion['lora_scale']:g}",
        "composite": f"{champion['composite']:.6f}",
        "statistical_tie": str(selection.statistical_tie),
        "stand_in": str(stand_in),
        "character": character,
    }
    version = client.create_model_version(
        registered_model,
        source=mlflow.get_artifact_uri("champion"),
        run_id=mlflow.active_run().info.run_id,
        tags=tags,
        description=(
            f"{tags['candidate']} step {tags['step']} at LoRA scale {tags['lora_scale']}"
            + (" (computed with stand-in models)" if stand_in else "")
        ),
    )
    return str(version.version)
