"""The Hydra sweep as a SLURM job array: the sweep is expanded by Hydra's own sweeper, and the
generated sbatch script, run by bash as SLURM would run array task i (a `dvc` on PATH that
records its arguments), runs `dvc exp run --temp` with exactly the i-th override set."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SWEEP = ["train.candidates.0.learning_rate=1e-4,3e-4", "seed=1,2", "data.trigger='a b'"]


def _run_task(script: Path, task: int, tmp_path: Path) -> list[str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    recorder = bin_dir / "dvc"
    recorder.write_text('#!/bin/bash\nprintf "%s\\n" "$@" > "$RECORD"\n', encoding="utf-8")
    recorder.chmod(0o755)
    record = tmp_path / f"args-{task}.txt"
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "RECORD": str(record),
           "SLURM_ARRAY_TASK_ID": str(task), "SLURM_SUBMIT_DIR": str(tmp_path)}  # fmt: skip
    subprocess.run(["bash", str(script)], env=env, check=True, timeout=60)
    return record.read_text(encoding="utf-8").splitlines()


def test_sbatch_array_runs_one_dvc_experiment_per_override_set(tmp_path: Path) -> None:
    made = subprocess.run(
        [sys.executable, "-m", "charaforge.distributed.slurm", "--gpus", "2", "--parallel", "3",
         *SWEEP],
        capture_output=True, text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
        timeout=120,
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    script = tmp_path / "sweep.sbatch"
    script.write_text(made.stdout, encoding="utf-8")
    assert "#SBATCH --array=0-3%3" in made.stdout and "#SBATCH --gpus=2" in made.stdout
    expected = [  # Hydra's order: the cartesian product, the last key fastest
        (lr, seed) for lr in ("0.0001", "0.0003") for seed in ("1", "2")
    ]
    for task, (lr, seed) in enumerate(expected):
        assert _run_task(script, task, tmp_path) == [
            "exp", "run", "--temp",
            "-S", f"train.candidates.0.learning_rate={lr}",
            "-S", f"seed={seed}",
            "-S", "data.trigger='a b'",
        ]  # fmt: skip


def test_a_bad_sweep_is_one_line_exit_2() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "charaforge.distributed.slurm", "seed=1,,"],
        capture_output=True, text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
        timeout=120,
    )  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.startswith("error: overrides:") and done.stderr.count("\n") == 1


def test_hydra_multirun_runs_one_dvc_experiment_per_job(tmp_path: Path) -> None:
    """`charaforge.distributed.hydra_exp`: Hydra composes and launches (its basic launcher here;
    submitit's on SLURM), and each job runs `dvc exp run --temp` with its own overrides."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    recorder = bin_dir / "dvc"
    recorder.write_text('#!/bin/bash\nprintf "%s\\n" "$@" -- >> "$RECORD"\n', encoding="utf-8")
    recorder.chmod(0o755)
    record = tmp_path / "args.txt"
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "RECORD": str(record),
           "PYTHONPATH": str(REPO)}  # fmt: skip
    done = subprocess.run(
        [sys.executable, "-m", "charaforge.distributed.hydra_exp", "--multirun",
         "--config-name", "stand_in", "seed=1,2", "train.max_steps=2,4"],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    jobs = record.read_text(encoding="utf-8").split("--\n")[:-1]
    assert [job.splitlines() for job in jobs] == [
        ["exp", "run", "--temp", "-S", f"seed={seed}", "-S", f"train.max_steps={steps}"]
        for seed in (1, 2)
        for steps in (2, 4)
    ]
    assert (tmp_path / ".dvc" / "tmp" / "hydra").is_dir()  # Hydra's files, not in the repo
    # A key the config lacks fails in Hydra's composition, before any experiment runs.
    record.unlink()
    bad = subprocess.run(
        [sys.executable, "-m", "charaforge.distributed.hydra_exp", "--multirun",
         "--config-name", "stand_in", "no_such_key=1,2"],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300,
    )  # fmt: skip
    assert bad.returncode != 0 and "no_such_key" in bad.stderr
    assert not record.exists()
