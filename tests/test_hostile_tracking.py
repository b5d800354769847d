"""Tracking faults with real sockets, a real SQLite lock and a corrupt store; kills and a second
run beside a live one. Each case runs a real stage process (`run_stage`, the edge every DVC stage
goes through) and must end within 30 s (the subprocess timeout) with one line, or go on with a
warning and lose no work."""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml
from conftest import stand_in_params_dict

from charaforge.train.launch import free_local_port

pytestmark = pytest.mark.slow

# A stage whose "work" is a file it writes; PROBE picks what happens while it runs.
PROBE = textwrap.dedent(
    """
    import os, signal, subprocess, sys, time
    from pathlib import Path
    from charaforge.pipeline.stage import run_stage

    def body(ctx):
        mode = os.environ["PROBE"]
        if mode == "lock_midway":
            holder = subprocess.Popen(
                [sys.executable, "-c", os.environ["HOLDER"]], stdout=subprocess.PIPE, text=True
            )
            assert holder.stdout.readline().strip() == "held"
        for step in range(5):
            ctx.run.log_metrics({"loss": 1.0 / (step + 1)}, step=step)
            Path("work.txt").open("a").write(f"step {step}\\n")
        if mode == "sigkill":
            os.kill(os.getpid(), signal.SIGKILL)
        if mode == "sigterm":
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(30)
        if mode == "wait":
            Path("started").write_text("1")
            while not Path("release").exists():
                time.sleep(0.1)
        Path("done.txt").write_text("ok")

    run_stage("probe", body, sections=("data",))
    """
)
HOLDER = textwrap.dedent(
    """
    import sqlite3, sys, time
    connection = sqlite3.connect(sys.argv[1] if len(sys.argv) > 1 else "mlflow.db")
    connection.execute("BEGIN EXCLUSIVE")
    print("held", flush=True)
    time.sleep(float(__import__("os").environ.get("HOLD_S", "8")))
    connection.rollback()
    """
)


# One experiment per character (conf/tracking: charaforge-${data.character}).
EXPERIMENT = stand_in_params_dict()["tracking"]["experiment"]


def _workspace(tmp_path: Path, uri: str | None = None) -> Path:
    raw = stand_in_params_dict()
    raw["tracking"]["uri"] = uri or f"sqlite:///{tmp_path / 'mlflow.db'}"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw), encoding="utf-8")
    (tmp_path / ".dvc").mkdir(exist_ok=True)  # the workspace lock lives in .dvc/tmp
    return tmp_path


def _env(mode: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    root = str(Path(__file__).resolve().parents[1])
    env.update(PROBE=mode, HOLDER=HOLDER, PYTHONPATH=root, HOLD_S="8")
    return env


def _probe(workdir: Path, mode: str, timeout: int = 30) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", PROBE],
        cwd=workdir,
        env=_env(mode),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _one_line_error(result: subprocess.CompletedProcess, expected: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and expected in errors[0], result.stderr


def _runs(workdir: Path) -> list:
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(EXPERIMENT)
    return client.search_runs([experiment.experiment_id]) if experiment else []


def test_unreachable_server_fails_in_one_line_before_work(tmp_path: Path) -> None:
    workdir = _workspace(tmp_path, f"http://127.0.0.1:{free_local_port()}")
    _one_line_error(_probe(workdir, "plain"), "is not reachable")
    assert not (workdir / "work.txt").exists()


def test_server_that_never_answers_fails_in_one_line(tmp_path: Path) -> None:
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)  # the kernel accepts connections; nobody ever answers
        workdir = _workspace(tmp_path, f"http://127.0.0.1:{silent.getsockname()[1]}")
        _one_line_error(_probe(workdir, "plain"), "no answer within")
    assert not (workdir / "work.txt").exists()


def test_corrupt_store_fails_in_one_line(tmp_path: Path) -> None:
    workdir = _workspace(tmp_path)
    (workdir / "mlflow.db").write_bytes(b"this is not a database" * 100)
    _one_line_error(_probe(workdir, "plain"), "corrupt")


def test_store_locked_at_start_fails_in_one_line(tmp_path: Path) -> None:
    workdir = _workspace(tmp_path)
    assert _probe(workdir, "plain", timeout=120).returncode == 0  # creates the store
    env = {**_env("plain"), "HOLD_S": "25"}
    with subprocess.Popen(
        [sys.executable, "-c", HOLDER], cwd=workdir, env=env, stdout=subprocess.PIPE, text=True
    ) as holder:
        assert holder.stdout.readline().strip() == "held"
        _one_line_error(_probe(workdir, "plain"), "is locked by another process")
        holder.kill()


def test_lock_taken_mid_run_costs_a_warning_not_the_work(tmp_path: Path) -> None:
    workdir = _workspace(tmp_path)
    assert _probe(workdir, "plain", timeout=120).returncode == 0
    (workdir / "work.txt").unlink()
    # Held for 30 s: longer than MLflow's own waiting, which then fails the call.
    result = subprocess.run(
        [sys.executable, "-c", PROBE],
        cwd=workdir,
        env={**_env("lock_midway"), "HOLD_S": "30"},
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stderr
    assert "kept and retried later" in result.stderr and "Traceback" not in result.stderr
    assert (workdir / "done.txt").read_text() == "ok"
    assert (workdir / "work.txt").read_text().count("step") == 5
    # The holder let go after 8 s: the buffered metrics reached the store, or the backlog file.
    backlog = workdir / ".charaforge/tracking-backlog.jsonl"
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}")
    latest = max(_runs(workdir), key=lambda run: run.info.start_time)
    history = client.get_metric_history(latest.info.run_id, "loss")
    assert len(history) == 5 or backlog.read_text().count('"log_metrics"') == 5


def test_killed_runs_are_marked_killed(tmp_path: Path) -> None:
    workdir = _workspace(tmp_path)
    killed = _probe(workdir, "sigkill", timeout=120)
    assert killed.returncode == -signal.SIGKILL
    assert [run.info.status for run in _runs(workdir)] == ["RUNNING"]
    terminated = _probe(workdir, "sigterm", timeout=120)
    assert terminated.returncode == 143 and "Traceback" not in terminated.stderr
    statuses = sorted(run.info.status for run in _runs(workdir))
    assert statuses == ["KILLED", "KILLED"], statuses  # SIGTERM's own, and the SIGKILLed one


def test_fresh_store_created_once_by_parallel_stages(tmp_path: Path) -> None:
    workdirs = [
        _workspace(tmp_path / f"w{index}", f"sqlite:///{tmp_path / 'mlflow.db'}")
        for index in range(3)
        if (tmp_path / f"w{index}").mkdir() is None
    ]
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", PROBE],
            cwd=w,
            env=_env("plain"),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for w in workdirs
    ]
    results = [process.communicate(timeout=180) for process in processes]
    assert [process.returncode for process in processes] == [0, 0, 0], results
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(EXPERIMENT)
    runs = client.search_runs([experiment.experiment_id])
    assert sorted(run.info.status for run in runs) == ["FINISHED"] * 3


def test_second_run_beside_a_live_one_refuses_in_one_line(tmp_path: Path) -> None:
    workdir = _workspace(tmp_path)
    with subprocess.Popen(
        [sys.executable, "-c", PROBE],
        cwd=workdir,
        env=_env("wait"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as first:
        deadline = time.monotonic() + 120
        while not (workdir / "started").exists():
            assert first.poll() is None and time.monotonic() < deadline, first.stderr.read()
            time.sleep(0.2)
        _one_line_error(_probe(workdir, "plain"), "is already running in this workspace")
        (workdir / "release").write_text("1")
        first.communicate(timeout=60)
    assert first.returncode == 0
    assert sqlite3.connect(workdir / "mlflow.db").execute("SELECT 1").fetchone() == (1,)
