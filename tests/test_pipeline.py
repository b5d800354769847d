"""The whole pipeline through real DVC, real MLflow and real models (stand-ins), as a user runs it.

Slow: one full `dvc repro` of the demo in a fresh copy of the repository (the session's shared
stand-in reference run, conftest.py), then partial re-runs in a copy of it. Still run in CI
(`make test`). A second run from scratch gives the same bytes: tests/test_hostile_kill_repro.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import STAND_IN_CONFIG, reference_repro_log, stand_in_params_text

pytestmark = pytest.mark.slow

STAGES = [
    "world",
    "demo",
    "scan",
    "ingest",
    "dedupe",
    "tag",
    "pose",
    "dataset",
    "base",
    "train",
    "generate",
    "score",
    "report",
]


def _env() -> dict[str, str]:
    venv_bin = str(Path(sys.executable).parent)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    env.update(
        PATH=f"{venv_bin}{os.pathsep}{env.get('PATH', '')}",
        DVC_NO_ANALYTICS="1",
        DVC_NO_UPDATER="1",
        GIT_AUTHOR_NAME="t",
        GIT_AUTHOR_EMAIL="t@example.com",
        GIT_COMMITTER_NAME="t",
        GIT_COMMITTER_EMAIL="t@example.com",
        # Fixed dates: two fresh clones of the same tree get the same commit id, which the LoRA
        # files record as provenance.
        GIT_AUTHOR_DATE="2026-01-01T00:00:00+00:00",
        GIT_COMMITTER_DATE="2026-01-01T00:00:00+00:00",
    )
    return env


def _run(args: list[str], cwd: Path, timeout: int = 900) -> str:
    result = subprocess.run(
        args, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, f"{args} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout + result.stderr


def _dvc(cwd: Path, *args: str) -> str:
    return _run([str(Path(sys.executable).parent / "dvc"), *args], cwd)


# `scan` lists data.source on every repro (always_changed: DVC never hashes a user's folder
# itself); it takes about a second and changes nothing downstream when the folder did not.
ALWAYS_RUN = {"scan"}


def _demo_images(workdir: Path) -> list[Path]:
    folder = workdir / "data" / "demo"
    suffixes = {".png", ".jpg", ".jpeg", ".webp"}
    return [p for p in folder.rglob("*") if p.suffix.lower() in suffixes] if folder.is_dir() else []


def _stages_run(output: str, always: bool = False) -> set[str]:
    """The stages this `dvc repro` ran (the always-run ones only when `always`)."""
    ran = {name for name in STAGES if f"Running stage '{name}'" in output}
    return ran if always else ran - ALWAYS_RUN


def _fresh_copy(repo_root: Path, destination: Path, stand_in: bool = True) -> Path:
    """A clean clone as a new user gets it: the files git would carry, committed.

    `stand_in`: switched to the stand-in pipeline (conf/stand_in.yaml, for params.yaml and for
    `dvc exp run`'s Hydra composition) so the test runs in seconds rather than pretraining the
    world; the world pipeline has its own test (test_world_pipeline.py).
    """
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=repo_root,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split("\0")
    for relative in filter(None, listed):
        source = repo_root / relative
        if source.is_file():
            target = destination / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    if stand_in:
        (destination / "params.yaml").write_text(stand_in_params_text(), encoding="utf-8")
    _run(["git", "init", "-q"], destination)
    if stand_in:
        _dvc(destination, "config", "hydra.config_name", STAND_IN_CONFIG)
    _run(["git", "add", "-A"], destination)
    _run(["git", "commit", "-q", "-m", "fresh clone"], destination)
    return destination


# The report pages link to this execution's MLflow runs (run ids, model version): outside the
# marked links, their bytes are compared by `_pages_without_run_links`.
RUN_LINKED_PAGES = ("reports/selection.md", "reports/selection.html")
_RUN_LINKS = re.compile(r"<!-- mlflow links -->.*?<!-- /mlflow links -->", re.DOTALL)


def _lock_outputs(lock_path: Path) -> dict[str, str]:
    lock = yaml.safe_load(lock_path.read_text(encoding="utf-8"))
    hashes = {}
    for name, stage in lock["stages"].items():
        for out in stage.get("outs", []):
            if out["path"] not in RUN_LINKED_PAGES:
                hashes[f"{name}:{out['path']}"] = out["md5"]
    return hashes


def _pages_without_run_links(workdir: Path) -> dict[str, str]:
    pages = {}
    for page in RUN_LINKED_PAGES:
        text = (workdir / page).read_text(encoding="utf-8")
        assert "/runs/" in text, f"{page} has no MLflow run links"
        pages[page] = _RUN_LINKS.sub("", text)
    return pages


# Where an MLflow store records absolute paths: the artifact roots, and the registered champion's
# source (and the tags that name the workspace).
STORE_PATH_COLUMNS = (
    ("experiments", "artifact_location"),
    ("runs", "artifact_uri"),
    ("tags", "value"),
    ("model_versions", "source"),
    ("model_versions", "storage_location"),
)


def _copy_workspace(source: Path, destination: Path) -> Path:
    """A copy of a workspace that has run, as if it had run there: its git history, DVC cache and
    MLflow store, with the store's absolute paths moved to the copy (new runs then log their
    artifacts into the copy's own mlartifacts/, never into the source's)."""
    shutil.copytree(source, destination, symlinks=True)
    with contextlib.closing(sqlite3.connect(destination / "mlflow.db")) as db, db:
        for table, column in STORE_PATH_COLUMNS:
            db.execute(
                f"UPDATE {table} SET {column} = replace({column}, ?, ?)",
                (str(source), str(destination)),
            )
    return destination


@pytest.fixture(scope="module")
def pipeline_repo(stand_in_reference_run: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A copy of the session's stand-in reference run, for the tests that go on from there (a
    second repro, changed parameters, an experiment, a new character). That run and a second one
    from scratch, killed at four points, give the same bytes: tests/test_hostile_kill_repro.py."""
    workdir = _copy_workspace(stand_in_reference_run, tmp_path_factory.mktemp("clone_a") / "repo")
    return {
        "path": workdir,
        "first_output": reference_repro_log(stand_in_reference_run).read_text(encoding="utf-8"),
    }


def test_repro_runs_every_stage_and_writes_the_report(pipeline_repo: dict) -> None:
    assert _stages_run(pipeline_repo["first_output"], always=True) == set(STAGES)
    workdir: Path = pipeline_repo["path"]
    for name in ("selection.md", "selection.html", "metrics.json"):
        assert (workdir / "reports" / name).stat().st_size > 0
    metrics = json.loads((workdir / "reports" / "metrics.json").read_text())
    assert metrics["champion"]["candidate"] in {"r4_lr1e-3", "r8_lr3e-4"}
    assert "stand-in" in (workdir / "reports" / "selection.md").read_text().lower()


def test_the_copy_logs_into_its_own_store(pipeline_repo: dict) -> None:
    """_copy_workspace moves the store's absolute paths: the copy's runs and artifact root are
    its own, so new runs never write into the shared reference run's folders."""
    from mlflow.tracking import MlflowClient

    workdir: Path = pipeline_repo["path"]
    client = MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("charaforge-aoi")
    assert str(workdir / "mlartifacts") in experiment.artifact_location
    for run in client.search_runs([experiment.experiment_id]):
        assert str(workdir / "mlartifacts") in run.info.artifact_uri, run.info.artifact_uri


def test_second_repro_runs_no_stage(pipeline_repo: dict) -> None:
    output = _dvc(pipeline_repo["path"], "repro")
    assert _stages_run(output) == set(), output


def test_mlflow_store_holds_every_stage_run(pipeline_repo: dict) -> None:
    from mlflow.tracking import MlflowClient

    workdir: Path = pipeline_repo["path"]
    client = MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("charaforge-aoi")
    assert experiment is not None
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    runs = client.search_runs([experiment.experiment_id])
    children = [run for run in runs if "mlflow.parentRunId" in run.data.tags]
    runs = [run for run in runs if "mlflow.parentRunId" not in run.data.tags]
    by_stage = {run.data.tags["charaforge.pipeline.stage"]: run for run in runs}
    assert by_stage["train"].info.run_name == "train · aoi · workspace"
    assert set(by_stage) == set(STAGES)
    for run in runs:
        assert run.data.tags["mlflow.source.git.commit"] != "unknown"
        assert run.data.tags["dvc.experiment"] == "workspace"
        assert "seed" in run.data.params
    train = by_stage["train"]
    assert "train.max_steps" in train.data.params
    # A nested child run per candidate, with the same metric names: MLflow overlays them.
    trained = {
        run.data.tags["charaforge.candidate"]: run
        for run in children
        if run.data.tags["mlflow.parentRunId"] == train.info.run_id
    }
    assert sorted(trained) == ["r4_lr1e-3", "r8_lr3e-4"]
    for name, child in trained.items():
        assert child.data.params["rank"] in {"4", "8"}
        assert len(client.get_metric_history(child.info.run_id, "loss")) >= 2
        lora = {item.path for item in client.list_artifacts(child.info.run_id, "lora")}
        assert "lora/pytorch_lora_weights.safetensors" in lora, (name, lora)
    assert by_stage["report"].data.metrics, "report must log the champion's metrics"

    # The report links to the train run, each candidate's child run, the score and report runs,
    # and the champion's model version: MLflow UI URLs of runs that are in this store.
    markdown = (workdir / "reports/selection.md").read_text(encoding="utf-8")
    page = (workdir / "reports/selection.html").read_text(encoding="utf-8")
    ui = f"http://127.0.0.1:5000/#/experiments/{experiment.experiment_id}"
    linked = {
        "train stage": train,
        **{f"train · {name}": child for name, child in trained.items()},
        "score stage": by_stage["score"],
        "report stage (this report)": by_stage["report"],
    }
    for label, run in linked.items():
        url = f"{ui}/runs/{run.info.run_id}"
        assert f"- {label}: [{run.info.run_id}]({url})" in markdown, label
        assert f'<td>{label}</td><td><a href="{url}">' in page, label
    version = client.get_model_version_by_alias("charaforge-aoi", "champion")
    assert version.run_id == by_stage["report"].info.run_id
    version_url = f"http://127.0.0.1:5000/#/models/charaforge-aoi/versions/{version.version}"
    assert f"]({version_url})" in markdown and f'href="{version_url}"' in page


def test_metrics_and_plots_show(pipeline_repo: dict) -> None:
    workdir: Path = pipeline_repo["path"]
    metrics = json.loads(_dvc(workdir, "metrics", "show", "--json"))
    assert "reports/metrics.json" in json.dumps(metrics)
    plots = json.loads(_dvc(workdir, "plots", "show", "--json"))
    plotted = set(plots["data"])
    assert any(key.startswith("reports/plots/train_loss/") for key in plotted), plotted
    assert any(key.startswith("reports/plots/score_by_step/") for key in plotted), plotted
    assert "reports/plots/images/train_loss.png" in plotted, plotted
    # The page `dvc plots show` writes loads nothing from the network (the project's template).
    _dvc(workdir, "plots", "show", "-o", "plots_page")
    page = (workdir / "plots_page/index.html").read_text(encoding="utf-8")
    # Vega-Lite specs name their JSON schema by URL ("$schema"), an identifier never fetched.
    page = re.sub(r'"\$schema": ?"https://vega\.github\.io/schema/[^"]*"', "", page)
    assert "http://" not in page and "https://" not in page
    assert "<img" in page and "function vegaEmbed" in page


def test_exp_run_with_set_param_reruns_only_generate_score_report(pipeline_repo: dict) -> None:
    """An eval parameter set through `dvc exp run -S` (composed by Hydra into params.yaml) reruns
    the three stages that read it and nothing upstream."""
    workdir: Path = pipeline_repo["path"]
    _run(["git", "add", "-A"], workdir)
    _run(["git", "commit", "-q", "-m", "after first run"], workdir)
    output = _dvc(workdir, "exp", "run", "-S", "eval.lora_scales=[0.0,0.75]")
    assert _stages_run(output) == {"generate", "score", "report"}, output
    composed = yaml.safe_load((workdir / "params.yaml").read_text())
    assert composed["eval"]["lora_scales"] == [0.0, 0.75], "Hydra composition must apply -S"
    shown = json.loads(_dvc(workdir, "exp", "show", "--json"))
    assert "0.75" in json.dumps(shown)


def _new(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    """`charaforge new` with the copy's own code (the editable install may be another tree)."""
    command = [sys.executable, "-c", "from charaforge.cli import app; app()", "new", *args]
    return subprocess.run(
        command, cwd=workdir, env=_env(), capture_output=True, text=True, timeout=1200
    )


def test_new_character_from_a_folder_without_captions(
    pipeline_repo: dict, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """The one command on new images without captions: it stops before training with the fix;
    with a tagger it trains on real captions, evaluates the folder's own tags, never runs the
    demo stage, and bob's @champion leaves aoi's in place."""
    import numpy as np
    import pandas as pd
    from mlflow.tracking import MlflowClient
    from PIL import Image

    workdir: Path = pipeline_repo["path"]
    folder = tmp_path_factory.mktemp("bob_images")
    for index in range(8):
        blocks = np.random.default_rng(100 + index).integers(0, 255, (8, 8, 3), dtype=np.uint8)
        Image.fromarray(blocks).resize((96, 96), Image.NEAREST).save(folder / f"bob{index}.png")
    name = ["--name", "bob", "--trigger", "bob_cf"]

    stopped = _new(workdir, str(folder), *name)
    assert stopped.returncode == 2, stopped.stdout + stopped.stderr
    output = stopped.stdout + stopped.stderr
    assert "8 of 8 images have no caption" in output and "tagger=clip" in output
    assert "Running stage 'train'" not in output
    # The demo stage may run (the scan stage is ordered after it), but renders nothing for a
    # user's folder: it writes only its note.
    assert not _demo_images(workdir)
    assert (workdir / "conf/experiment/bob.yaml").is_file()

    # The stand-in CLIP tags at threshold 0: every image gets the vocabulary's tags.
    done = _new(workdir, str(folder), *name, "--tagger", "clip", "-S", "tagger.clip.threshold=0")
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert "Running stage 'train'" in output and not _demo_images(workdir)
    metadata = pd.read_parquet(workdir / "data/dataset/metadata.parquet")
    assert set(metadata["character"]) == {"bob"}
    assert all(len(caption.split(", ")) > 3 for caption in metadata["caption"])
    # The evaluation prompts carry the dataset's most frequent tags (counted here directly).
    counts = pd.Series([t for tags in metadata["tags"] for t in set(tags)]).value_counts()
    top = [tag for tag in counts.index if counts[tag] == len(metadata)]
    index = pd.read_parquet(workdir / "data/generate/index.parquet")
    from_data = set(index.loc[index["suite"].isna() | (index["suite"] == ""), "prompt"])
    assert len(from_data) == 4 and all(p.startswith("bob_cf, ") for p in from_data)
    carried = [tag for tag in top if all(tag in prompt for prompt in from_data)]
    assert len(carried) >= 3, (top, from_data)  # eval.from_data.max_tags of them, contexts aside

    client = MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}")
    aoi = client.get_model_version_by_alias("charaforge-aoi", "champion")
    bob = client.get_model_version_by_alias("charaforge-bob", "champion")
    assert aoi.run_id != bob.run_id
    assert client.get_run(bob.run_id).data.tags["charaforge.character"] == "bob"
    assert client.get_experiment_by_name("charaforge-bob") is not None
