"""MLflow as its users expect it, queried from a real SQLite store after real stage runs: an
experiment marked as model training, a parent run per stage execution named after stage and
character, a nested child run per candidate with metric histories under the same names, and a
registered model per character whose @champion no other character takes away; the report pages
link to those runs and to the champion's model version."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from test_score_report import CANDIDATES, _stage_repo

pytestmark = pytest.mark.slow


def _stage(root: Path, repo_root: Path, stage: str) -> None:
    env = {"PYTHONPATH": str(repo_root), "PATH": str(Path(sys.executable).parent)}
    done = subprocess.run(
        [sys.executable, "-m", f"stages.{stage}"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr


def test_child_runs_per_candidate_and_a_champion_per_character(
    tmp_path: Path, params_dict: dict, repo_root: Path
) -> None:
    from mlflow import MlflowClient

    root = _stage_repo(tmp_path, params_dict, repo_root, tracking=True)
    _stage(root, repo_root, "score")
    _stage(root, repo_root, "report")  # character aoi
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["data"] = {**params["data"], "character": "bob"}
    params["report"]["registered_model"] = "charaforge-bob"
    (root / "params.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")
    _stage(root, repo_root, "report")  # character bob, the same scores

    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("test")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    runs = client.search_runs([experiment.experiment_id])
    parents = [run for run in runs if "mlflow.parentRunId" not in run.data.tags]
    children = [run for run in runs if "mlflow.parentRunId" in run.data.tags]
    assert sorted(run.info.run_name for run in parents) == [
        "report · aoi · workspace",
        "report · bob · workspace",
        "score · aoi · workspace",
    ]
    reports = {
        run.data.tags["charaforge.character"]: run
        for run in parents
        if "report" in run.info.run_name
    }
    for character, parent in reports.items():
        mine = [c for c in children if c.data.tags["mlflow.parentRunId"] == parent.info.run_id]
        # The base model's row (no LoRA) is a child too: the line every candidate is compared with.
        names = sorted(c.data.tags["charaforge.candidate"] for c in mine)
        assert names == sorted([*CANDIDATES, "base"])
        for child in (c for c in mine if c.data.tags["charaforge.candidate"] != "base"):
            assert child.info.run_name.endswith(f"· {character} · scores")
            steps = CANDIDATES[child.data.tags["charaforge.candidate"]]
            history = client.get_metric_history(child.info.run_id, "composite")
            assert sorted(m.step for m in history) == steps
        # The candidates' metrics share their names (no ".<candidate>" suffix on the parent).
        assert not any("." in name for name in parent.data.metrics)

    champions = {}
    for character in ("aoi", "bob"):
        model = client.get_registered_model(f"charaforge-{character}")
        assert character in model.description
        version = client.get_model_version_by_alias(model.name, "champion")
        assert version.tags["character"] == character
        assert version.run_id == reports[character].info.run_id
        champions[character] = version
    assert champions["aoi"].run_id != champions["bob"].run_id  # bob did not take aoi's alias

    # The pages link to the runs behind them and to the champion's model version (bob's pages
    # are the last written), at `mlflow ui`'s address in MLflow's own URL form.
    ui, experiment_id = "http://127.0.0.1:5000", experiment.experiment_id
    score = next(run for run in parents if run.info.run_name.startswith("score"))
    markdown = (root / "reports/selection.md").read_text()
    page = (root / "reports/selection.html").read_text()
    linked = {
        "score stage": score.info.run_id,
        "report stage (this report)": reports["bob"].info.run_id,
    }
    for label, run_id in linked.items():
        url = f"{ui}/#/experiments/{experiment_id}/runs/{run_id}"
        assert f"- {label}: [{run_id}]({url})" in markdown, label
        assert f'<a href="{url}">{run_id}</a>' in page, label
    # Every run id a page links to is one of these (no train stage ran: it says so).
    for text in (markdown, page):
        shown = set(re.findall(rf"#/experiments/{experiment_id}/runs/(\w+)", text))
        assert shown == set(linked.values()), shown
        assert "no finished run in this store wrote data/train/summary.json" in text
    version = champions["bob"].version
    version_url = f"{ui}/#/models/charaforge-bob/versions/{version}"
    assert client.get_model_version("charaforge-bob", version).run_id == reports["bob"].info.run_id
    assert f"[version {version}]({version_url})" in markdown
    assert f'<a href="{version_url}">version {version}</a>' in page
    assert "make mlflow-ui" in markdown

    # Switched off: no run ids in the pages; the champion is still registered.
    params["report"]["mlflow_links"] = False
    (root / "params.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")
    _stage(root, repo_root, "report")
    for name in ("selection.md", "selection.html"):
        text = (root / "reports" / name).read_text()
        assert "mlflow links" not in text and "/runs/" not in text, name
    latest = client.get_model_version_by_alias("charaforge-bob", "champion")
    assert int(latest.version) == int(version) + 1
