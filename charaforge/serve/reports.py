"""What the server shows of the pipeline's results: the latest selection report (its
metrics.json, ranking.csv and plot images, as the `report` stage wrote them) and the training
curves of the runs in MLflow. Read by `/api/v1/eval/report` and by the UI's Selection and
Training tabs, so both show the same numbers.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

RANKING_FILE = "ranking.csv"  # selection.report.RANKING_FILE (serve may not import selection)
PLOT_IMAGES = "plots/images"
CURVE_METRICS = ("loss", "val_loss")
CANDIDATE_TAG = "charaforge.candidate"  # set on each candidate's nested run by the train stage


class NoReport(LookupError):
    """No selection report in the reports folder yet (run the `report` stage)."""


@dataclass(frozen=True)
class SelectionReport:
    metrics: dict[str, Any]  # metrics.json as written
    ranking: list[dict[str, Any]]  # ranking.csv, numbers parsed, rank order
    plots: list[Path]  # the report's PNG plots (score by step, Pareto, training loss)

    @property
    def champion(self) -> dict[str, Any]:
        return self.metrics["champion"]

    def rows_for(self, candidate: str, step: int | None) -> list[dict[str, Any]]:
        """The ranked rows of one candidate (at one checkpoint step, when given)."""
        return [
            row
            for row in self.ranking
            if row["candidate"] == candidate and (step is None or row["step"] == step)
        ]


def _value(text: str) -> Any:
    if text in ("True", "False"):
        return text == "True"
    try:
        number = float(text)
    except ValueError:
        return text
    if math.isnan(number):
        return None
    return int(number) if number.is_integer() and "." not in text else number


def read_report(reports_dir: str | Path | None) -> SelectionReport:
    """The latest report in `reports_dir`; NoReport when there is none."""
    if reports_dir is None:
        raise NoReport("no reports folder configured")
    folder = Path(reports_dir)
    try:
        metrics = json.loads((folder / "metrics.json").read_text())
    except FileNotFoundError:
        raise NoReport(f"no selection report in {folder} (run the report stage)") from None
    except (OSError, json.JSONDecodeError) as error:
        raise NoReport(f"{folder / 'metrics.json'}: unreadable ({error})") from None
    ranking: list[dict[str, Any]] = []
    if (folder / RANKING_FILE).is_file():
        with (folder / RANKING_FILE).open(newline="") as handle:
            ranking = [{k: _value(v) for k, v in row.items()} for row in csv.DictReader(handle)]
    ranking.sort(key=lambda row: (row.get("rank") is None, row.get("rank")))
    plots = sorted((folder / PLOT_IMAGES).glob("*.png")) if (folder / PLOT_IMAGES).is_dir() else []
    return SelectionReport(metrics, ranking, plots)


def training_curves(tracking_uri: str | None) -> list[dict[str, Any]]:
    """Every logged point of `loss` and `val_loss` of the candidates' runs in MLflow:
    {run, candidate, metric, step, value}, ordered by run, metric and step."""
    if not tracking_uri:
        return []
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    experiments = [experiment.experiment_id for experiment in client.search_experiments()]
    if not experiments:
        return []
    runs = client.search_runs(
        experiments, filter_string=f"tags.`{CANDIDATE_TAG}` != ''", max_results=500
    )
    points = []
    for run in runs:
        candidate = run.data.tags.get(CANDIDATE_TAG, "")
        for metric in CURVE_METRICS:
            for point in client.get_metric_history(run.info.run_id, metric):
                points.append(
                    {
                        "run": run.info.run_name or run.info.run_id,
                        "candidate": candidate,
                        "metric": metric,
                        "step": int(point.step),
                        "value": float(point.value),
                    }
                )
    points.sort(key=lambda p: (p["run"], p["metric"], p["step"]))
    return points
