"""Kills through `dvc repro`, the documented path: SIGKILL of the whole `dvc` process group
mid-ingest, mid-sweep and mid-score (once its MLflow run is open), and of the `dvc` parent alone
mid-training (its stage process lives on, then is SIGKILLed in turn), in one workspace. Each kill
waits for a sign of progress (a file, a checkpoint, an open run), never for a time. The next
`dvc repro` finishes with the outputs (dvc.lock hashes) of an uninterrupted run in a second copy
(the session's stand-in reference run): two runs from scratch give the same bytes, also when one
of them is killed along the way. A second run beside the orphaned stage refuses in one line; no
MLflow run is left RUNNING (each killed stage's run is marked KILLED) and no temporary folder of
a killed atomic write is left.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from test_pipeline import _env, _fresh_copy, _lock_outputs, _pages_without_run_links, _run

pytestmark = pytest.mark.slow

DVC = str(Path(sys.executable).parent / "dvc")


def _group_alive(group: int) -> list[int]:
    """Live (non-zombie) processes of a process group, read from /proc."""
    alive = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        state, _, pgrp = stat.rsplit(")", 1)[1].split()[:3]
        if int(pgrp) == group and state != "Z":
            alive.append(int(entry.name))
    return alive


def _wait_gone(group: int) -> None:
    deadline = time.monotonic() + 60
    while _group_alive(group):
        assert time.monotonic() < deadline, f"processes of group {group} outlived SIGKILL"
        time.sleep(0.1)


def _repro_until(workdir: Path, reached: Callable[[], bool], log: Path) -> subprocess.Popen:
    """Start `dvc repro` in its own process group; return it once `reached()` is true."""
    with log.open("w") as output:
        process = subprocess.Popen(
            [DVC, "repro"], cwd=workdir, env=_env(), stdout=output, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    deadline = time.monotonic() + 1800
    while not reached():
        assert process.poll() is None, f"dvc repro ended first:\n{log.read_text()}"
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.05)
    return process


def _kill_group(process: subprocess.Popen) -> None:
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    _wait_gone(process.pid)


def _ingest_temps(workdir: Path) -> list[Path]:
    return [path for path in (workdir / "data").glob(".ingest.*") if path.is_dir()]


def _stage_run_open(workdir: Path, stage: str) -> bool:
    """Whether the stage's MLflow run is open (RUNNING): its process is past its lock and its
    store checks and is doing the stage's work. Read-only, so a missing store is not created."""
    try:
        db = sqlite3.connect(f"file:{workdir / 'mlflow.db'}?mode=ro", uri=True, timeout=1)
        with contextlib.closing(db):
            found = db.execute(
                "SELECT 1 FROM runs JOIN tags ON tags.run_uuid = runs.run_uuid WHERE "
                "tags.key = 'charaforge.pipeline.stage' AND tags.value = ? "
                "AND runs.status = 'RUNNING'",
                (stage,),
            ).fetchone()
    except sqlite3.Error:  # absent, or locked by a writer for a moment: look again
        return False
    return found is not None


def _statuses(workdir: Path) -> dict[str, set[str]]:
    """MLflow run statuses by stage (the candidates' nested runs carry their stage's tag)."""
    with sqlite3.connect(workdir / "mlflow.db") as db:
        rows = db.execute(
            "SELECT tags.value, runs.status FROM runs JOIN tags ON tags.run_uuid = runs.run_uuid "
            "WHERE tags.key = 'charaforge.pipeline.stage'"
        ).fetchall()
    statuses: dict[str, set[str]] = {}
    for stage, status in rows:
        statuses.setdefault(stage, set()).add(status)
    return statuses


def test_kills_at_several_points_then_repro_gives_the_uninterrupted_bytes(
    repo_root: Path, tmp_path_factory: pytest.TempPathFactory, stand_in_reference_run: Path
) -> None:
    workdir = _fresh_copy(repo_root, tmp_path_factory.mktemp("killed"))
    logs = tmp_path_factory.mktemp("logs")
    data = workdir / "data"

    # 1. Mid-ingest: the images are being written into the atomic write's temporary folder.
    _kill_group(_repro_until(workdir, lambda: bool(_ingest_temps(workdir)), logs / "1.log"))
    assert _ingest_temps(workdir), "SIGKILL leaves the temporary folder (the case to clean)"
    assert not (data / "ingest").exists()

    # 2. Mid-training, the `dvc` parent alone: its stage process trains on, orphaned.
    first_checkpoint = lambda: any(data.glob("train_state/*/step-*/progress.json"))  # noqa: E731
    training = _repro_until(workdir, first_checkpoint, logs / "2.log")
    assert not _ingest_temps(workdir)  # removed when ingest started again
    training.kill()
    training.wait()
    assert _group_alive(training.pid), "the stage process outlives its dvc parent"
    # Paused, so that it is surely still alive (and holds its lock) when the second run's stage
    # gets there: on a loaded machine the orphan could otherwise finish first. (DVC deletes
    # data/train before that stage starts; the state folder is what the lock protects.)
    os.killpg(training.pid, signal.SIGSTOP)
    beside = subprocess.run(
        [DVC, "repro", "--single-item", "train"], cwd=workdir, env=_env(), capture_output=True,
        text=True, timeout=600,
    )  # fmt: skip
    assert beside.returncode != 0
    refusals = [line for line in beside.stderr.splitlines() if "already running" in line]
    assert len(refusals) == 1, beside.stderr
    assert "stage train is already running in this workspace" in refusals[0]
    assert "Traceback" not in beside.stderr
    _kill_group(training)  # the orphan, SIGKILLed mid-training in turn

    # 3. Mid-sweep: some images are rendered into the sweep's work folder.
    rendered = lambda: len(list(data.glob("generate_work/**/*.png"))) >= 2  # noqa: E731
    _kill_group(_repro_until(workdir, rendered, logs / "3.log"))

    # 4. Mid-score: its MLflow run is open (it is loading its scorers or scoring). Waiting for
    # the run itself, not for a time, keeps the point the same however loaded the machine is.
    _kill_group(_repro_until(workdir, lambda: _stage_run_open(workdir, "score"), logs / "4.log"))
    # On the way there the sweep killed in 3 resumed from its kept work items (DVC had deleted
    # data/generate): it reused what it had rendered instead of rendering everything again.
    sweep = re.search(
        r"sweep: \d+ images \(\d+ rendered, (\d+) reused\)", (logs / "4.log").read_text()
    )
    assert sweep and int(sweep[1]) >= 1, (logs / "4.log").read_text()[-3000:]

    output = _run([DVC, "repro"], workdir, timeout=3600)  # a loaded CI machine is slow
    assert "already running" not in output and "Running stage 'report'" in output

    reference = stand_in_reference_run  # the same fresh copy, uninterrupted
    killed, expected = _lock_outputs(workdir / "dvc.lock"), _lock_outputs(reference / "dvc.lock")
    assert killed.keys() == expected.keys()
    differing = sorted(key for key in expected if killed[key] != expected[key])
    assert not differing, f"outputs differ from an uninterrupted run: {differing}"
    assert _pages_without_run_links(workdir) == _pages_without_run_links(reference)

    assert not _ingest_temps(workdir)
    statuses = _statuses(workdir)
    assert not any("RUNNING" in found for found in statuses.values()), statuses
    for stage in ("ingest", "train", "generate", "score"):
        assert {"KILLED", "FINISHED"} <= statuses[stage], (stage, statuses)
