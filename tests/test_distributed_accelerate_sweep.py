"""The sweep over 2 processes of `accelerate launch` (PartialState.split_between_processes)
gives the in-process sweep's bytes, and each process rendered its own share."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from test_models_train import tiny_train

from charaforge.config import validate_params
from charaforge.generate import sweep
from charaforge.generate.engine import GenerationEngine
from charaforge.train import train_all
from charaforge.train.launch import free_local_port

REPO = Path(__file__).resolve().parents[1]
OPTIONS = {"scheduler": "euler", "controlnets": {}, "cpu_threads": 1}

SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    from charaforge.config import EvalConfig
    from charaforge.distributed.accelerate_sweep import AccelerateSweepExecutor
    from charaforge.generate import sweep
    from charaforge.generate.engine import GenerationEngine

    base_dir, eval_json = sys.argv[1], sys.argv[2]
    evaluation = EvalConfig.model_validate_json(open(eval_json).read())
    engine = GenerationEngine(base_dir, scheduler="euler", controlnets={}, cpu_threads=1)
    executor = AccelerateSweepExecutor(engine)
    rank = executor.state.process_index
    result = sweep.run_sweep(engine, "train", evaluation, "aoi_cf", 64, 5, "generate",
                             executor=executor, on_image=None)
    with open(f"rank-{rank}.json", "w") as handle:
        json.dump({"rendered": result.rendered, "pid": os.getpid()}, handle)
    """
)


def _hashes(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.mark.slow
def test_sweep_over_two_accelerate_processes(
    base_dir: Path, dataset_dir: Path, tmp_path: Path, params_dict: dict, monkeypatch
) -> None:
    params_dict["eval"].update(
        prompts=["{trigger}, red hair", "{trigger}, blue hair"],  # hand-written: no dataset here
        from_data={**params_dict["eval"]["from_data"], "enabled": False},
        suites={},
        pose={**params_dict["eval"]["pose"], "enabled": False},
    )
    evaluation = validate_params(params_dict).eval
    sequential, launched = tmp_path / "sequential", tmp_path / "launched"
    sequential.mkdir()
    monkeypatch.chdir(sequential)
    train = tiny_train(max_steps=2, checkpoint_every=2, cpu_threads=1)
    train_all(base_dir, dataset_dir, train, 64, 5, "train", "plots", state_dir="state")
    engine = GenerationEngine(base_dir, **OPTIONS)
    expected = sweep.run_sweep(engine, "train", evaluation, "aoi_cf", 64, 5, "generate")

    launched.mkdir()
    (launched / "train").symlink_to(sequential / "train")
    (launched / "sweep_script.py").write_text(SCRIPT, encoding="utf-8")
    (launched / "eval.json").write_text(evaluation.model_dump_json(), encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
         "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
         "--dynamo_backend", "no", "--main_process_port", str(free_local_port()),
         "sweep_script.py", str(base_dir), "eval.json"],
        cwd=launched, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((launched / f"rank-{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["pid"] != ranks[1]["pid"]
    # Both processes rendered (the totals are gathered: every rank reports the sum).
    assert ranks[0]["rendered"] == ranks[1]["rendered"] == expected.rendered
    assert _hashes(launched / "generate") == _hashes(sequential / "generate")


def test_cells_are_dealt_deterministically(params_dict: dict) -> None:
    params_dict["eval"].update(
        prompts=["{trigger}, red hair", "{trigger}, blue hair"],  # hand-written: no dataset here
        from_data={**params_dict["eval"]["from_data"], "enabled": False},
        suites={},
        pose={**params_dict["eval"]["pose"], "enabled": False},
    )
    evaluation = validate_params(params_dict).eval
    candidates = [{"name": "a", "checkpoints": [1, 2]}, {"name": "b", "checkpoints": [2]}]
    jobs = sweep.plan_jobs(candidates, evaluation, "t", 5)
    shares = sweep.shard_by_cell(jobs, 2)
    # Every job exactly once, whole cells together, plan order inside each share.
    assert sorted(j.relative_path() for s in shares for j in s) == sorted(
        j.relative_path() for j in jobs
    )
    for share in shares:
        assert [jobs.index(j) for j in share] == sorted(jobs.index(j) for j in share)
    cells = [{j.cell() for j in share} for share in shares]
    assert not cells[0] & cells[1]
    assert all(share for share in shares)
    assert sweep.shard_by_cell(jobs, 2) == shares
