"""The local route of a hyper-parameter sweep (docs/distributed.md): experiments queued with
`dvc exp run --queue -S ...` on the stand-in pipeline in a fresh copy of the project, run by
`dvc queue start -j 2` (two queue workers, each experiment in its own temporary copy), then
both in DVC's ledger (`dvc exp show`, with their params and output hashes) and in the MLflow
store of the repository (DVC_ROOT), tagged with their experiment's name.

The two experiments differ in who trains the candidate grid: in order in the stage's process,
or as parallel tasks on an embedded 2-CPU Ray (`train.executor=ray`). DVC records the same
`data/train` hash for both: the Ray grid gives the sequential bytes, as dvc.lock sees them.

Lean: the workspace is a copy of the session's stand-in reference run (every stage run once,
its DVC cache with it), committed, so each queued experiment checks the stages before `train` out
from the cache and runs only `train` (the target), for 4 steps.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from test_pipeline import _copy_workspace, _dvc, _run

pytestmark = pytest.mark.slow

COMMON = ["-S", "train.max_steps=4", "-S", "train.checkpoint_every=2"]
EXPERIMENTS = {  # name -> its own overrides
    "grid-local": ["-S", "train.executor=local"],
    "grid-ray": ["-S", "train.executor=ray", "-S", "ray.num_cpus=2"],
}


def _experiments(shown: object) -> dict[str, dict]:
    """name -> its `data` entry, wherever `dvc exp show --json` nests the experiments."""
    found: dict[str, dict] = {}
    if isinstance(shown, dict):
        if shown.get("name") in EXPERIMENTS and isinstance(shown.get("data"), dict):
            found[shown["name"]] = shown["data"]
        for value in shown.values():
            found.update(_experiments(value))
    elif isinstance(shown, list):
        for value in shown:
            found.update(_experiments(value))
    return found


def _wait_for_queue(workdir: Path, timeout: float = 1500) -> str:
    deadline = time.monotonic() + timeout
    status = ""
    while time.monotonic() < deadline:
        status = _dvc(workdir, "queue", "status")
        rows = [line for line in status.splitlines() if any(n in line for n in EXPERIMENTS)]
        if len(rows) == len(EXPERIMENTS) and not any(
            word in line for line in rows for word in ("Queued", "Running")
        ):
            return status
        time.sleep(5)
    raise AssertionError(f"the queue did not finish:\n{status}")


def test_queued_experiments_run_two_at_a_time_into_dvc_and_mlflow(
    stand_in_reference_run: Path, tmp_path: Path
) -> None:
    from mlflow.tracking import MlflowClient

    workdir = _copy_workspace(stand_in_reference_run, tmp_path / "repo")
    _run(["git", "add", "-A"], workdir)
    _run(["git", "commit", "-q", "-m", "the data and the base model"], workdir)
    for name, overrides in EXPERIMENTS.items():
        _dvc(workdir, "exp", "run", "--queue", "train", "-n", name, *COMMON, *overrides)
    _dvc(workdir, "queue", "start", "-j", "2")
    status = _wait_for_queue(workdir)
    for name in EXPERIMENTS:
        row = next(line for line in status.splitlines() if name in line)
        assert "Success" in row, status + _dvc(workdir, "queue", "logs", name)

    shown = _experiments(json.loads(_dvc(workdir, "exp", "show", "--json")))
    assert set(shown) == set(EXPERIMENTS), shown.keys()
    for name in EXPERIMENTS:
        train = shown[name]["params"]["params.yaml"]["data"]["train"]
        assert (train["max_steps"], train["checkpoint_every"]) == (4, 2)
        assert train["executor"] == name.removeprefix("grid-")
    hashes = {name: shown[name]["outs"]["data/train"]["hash"] for name in EXPERIMENTS}
    assert len(set(hashes.values())) == 1, hashes  # the Ray grid's bytes are the sequential's

    client = MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("charaforge-aoi")
    runs = client.search_runs(
        [experiment.experiment_id], "tags.`charaforge.pipeline.stage` = 'train'"
    )
    by_experiment = {
        run.data.tags["dvc.experiment"]: run
        for run in runs
        if "mlflow.parentRunId" not in run.data.tags  # the stage runs, not the candidates'
    }
    assert set(EXPERIMENTS) <= set(by_experiment), sorted(by_experiment)
    for name in EXPERIMENTS:
        run = by_experiment[name]
        assert run.data.params["train.max_steps"] == "4"
        assert run.data.params["train.executor"] == name.removeprefix("grid-")
        assert run.info.status == "FINISHED"
