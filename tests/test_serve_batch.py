"""Seed 001's /api/v1 and its batch jobs: CSV and JSON job files, failed rows, cancel, and a
server killed mid-job (SIGKILL) that finishes the job after a restart with no duplicate and no
missing image."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from engine_fixtures import (
    PROMPT,
    make_workspace,
    one_thread,  # noqa: F401  (a fixture: pytest finds it by name)
)
from serve_fixtures import free_port, running

from charaforge.generate.engine import GenerationEngine
from charaforge.generate.records import png_bytes
from charaforge.serve.app import create_app
from charaforge.serve.limits import ServerSettings

pytestmark = pytest.mark.usefixtures("one_thread")

CSV = (
    "prompt,negative,pose_image,lora,seed,width,height,steps\n"
    f'"{PROMPT}","lowres",,,5,64,64,2\n'
    f'"{PROMPT}",,,r4:0.5,6,64,64,2\n'
    f'"{PROMPT}",,,nope,7,64,64,2\n'
)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_workspace(tmp_path_factory.mktemp("batch"), max_steps=2)


@pytest.fixture(scope="module")
def server(workspace: Path) -> Iterator[tuple[str, object]]:
    settings = ServerSettings(
        base_dir=workspace / "base",
        lora_dir=workspace / "none",
        train_dir=workspace / "train",
        devices=["cpu"],
        cpu_threads=1,
        outputs_dir=workspace / "outputs",
    )
    app = create_app(settings)
    with running(app) as url:
        yield url, app
    app.state.batches.stop()
    app.state.service.stop()


def _wait(url: str, job_id: str, states: tuple[str, ...] = ("done",)) -> dict:
    deadline = time.monotonic() + 300
    while True:
        status = requests.get(f"{url}/api/v1/batch/status/{job_id}", timeout=30).json()
        if status["state"] in states:
            return status
        assert status["state"] in ("queued", "running"), status
        assert time.monotonic() < deadline, status
        time.sleep(0.2)


def test_seed_txt2img_saves_image_and_metadata(server: tuple[str, object], workspace) -> None:
    url, _ = server
    assert requests.get(f"{url}/api/v1/health", timeout=30).json()["ok"] is True
    body = {"prompt": PROMPT, "steps": 2, "seed": 3, "lora_ids": ["r4"], "lora_scales": [0.5]}
    saved = requests.post(f"{url}/api/v1/txt2img", json=body, timeout=300).json()
    assert saved["elapsed_ms"] >= 0
    image, metadata = Path(saved["image_path"]), Path(saved["metadata_path"])
    assert image.is_relative_to((workspace / "outputs").resolve())
    assert json.loads(metadata.read_text())["loras"][0]["name"] == "r4@2"
    again = requests.post(f"{url}/api/v1/txt2img", json=body, timeout=300).json()
    assert again["image_path"] == saved["image_path"]  # same content, same file: no copy
    listed = requests.get(f"{url}/api/v1/lora/list", timeout=30).json()
    assert [item["lora_id"] for item in listed] == ["r4@2"]
    bad = requests.post(f"{url}/api/v1/txt2img", json={**body, "lora_ids": ["x"]}, timeout=30)
    assert bad.status_code == 422 and "unknown LoRA 'x'" in bad.text


def test_a_csv_job_renders_every_row_and_records_the_failed_one(
    server: tuple[str, object], workspace: Path
) -> None:
    url, _ = server
    submitted = requests.post(
        f"{url}/api/v1/batch/submit", files={"file": ("job.csv", CSV)}, timeout=30
    ).json()
    status = _wait(url, submitted["job_id"])
    assert (status["total"], status["done"], status["failed"]) == (3, 2, 1)
    assert status["errors"][0]["row"] == 2 and "unknown LoRA 'nope'" in status["errors"][0]["error"]
    folder = Path(status["folder"])
    assert sorted(p.name for p in folder.iterdir()) == [
        "00000.json",
        "00000.png",
        "00001.json",
        "00001.png",
    ]
    engine = GenerationEngine(workspace / "base", device="cpu")
    direct = engine.render(PROMPT, 5, steps=2, negative_prompt="lowres", width=64, height=64)
    assert (folder / "00000.png").read_bytes() == png_bytes(direct)

    # The same rows as JSON: the same bytes.
    rows = [
        {"prompt": PROMPT, "negative": "lowres", "seed": 5, "width": 64, "height": 64, "steps": 2},
        {"prompt": PROMPT, "lora": "r4:0.5", "seed": 6, "width": 64, "height": 64, "steps": 2},
    ]
    as_json = requests.post(f"{url}/api/v1/batch/submit", json={"rows": rows}, timeout=30).json()
    other = Path(_wait(url, as_json["job_id"])["folder"])
    for name in ("00000.png", "00001.png"):
        assert (other / name).read_bytes() == (folder / name).read_bytes()

    refused = requests.post(f"{url}/api/v1/batch/submit", json={"rows": [{"seed": 1}]})
    assert refused.status_code == 422 and "row 0: prompt" in refused.text


def test_cancel_stops_a_job(server: tuple[str, object]) -> None:
    url, app = server
    worker = app.state.service.workers[0]
    rows = [{"prompt": PROMPT, "seed": seed, "steps": 2} for seed in range(20)]
    worker.lock.acquire()  # nothing renders until the job is cancelled
    try:
        job_id = requests.post(f"{url}/api/v1/batch/submit", json=rows, timeout=30).json()["job_id"]
        assert requests.post(f"{url}/api/v1/batch/cancel/{job_id}", timeout=30).json()["cancelled"]
    finally:
        worker.lock.release()
    status = _wait(url, job_id, ("cancelled",))
    time.sleep(1.0)  # the runner has let go of the job: nothing more is rendered
    status = requests.get(f"{url}/api/v1/batch/status/{job_id}", timeout=30).json()
    assert status["state"] == "cancelled" and status["done"] == 0
    assert requests.get(f"{url}/api/v1/batch/status/nope", timeout=30).status_code == 404


# Generous deadlines for the kill-and-restart test: on shared, loaded cores a server start
# (torch, diffusers, gradio imports) or a render can take minutes. The test waits on what it
# can observe (the health route, the rows done), never on fixed sleeps.
START_DEADLINE_S = 900
JOB_DEADLINE_S = 1200


def _start(project: Path, port: int, cache: Path) -> subprocess.Popen:
    command = [str(Path(sys.executable).parent / "charaforge"), "serve", "--port", str(port)]
    command += ["--device", "cpu", "--cpu-threads", "1"]
    env = {**os.environ, "AI_CACHE_ROOT": str(cache)}
    process = subprocess.Popen(command, cwd=project, env=env, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + START_DEADLINE_S
    while True:
        assert process.poll() is None, "charaforge serve exited"
        assert time.monotonic() < deadline, "charaforge serve did not start"
        try:
            if requests.get(f"http://127.0.0.1:{port}/health", timeout=30).ok:
                return process
        except requests.RequestException:  # not listening yet, or too busy to answer in time
            time.sleep(0.3)


def _status(url: str, job_id: str) -> dict:
    """The job's status, asked again while a loaded server is too slow to answer."""
    deadline = time.monotonic() + JOB_DEADLINE_S
    while True:
        try:
            response = requests.get(f"{url}/api/v1/batch/status/{job_id}", timeout=60)
            response.raise_for_status()
            return response.json()
        except requests.RequestException:
            assert time.monotonic() < deadline, "the status route did not answer"
            time.sleep(0.5)


def _stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=120)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=60)


@pytest.mark.slow
def test_a_server_killed_mid_job_finishes_it_after_a_restart(
    workspace: Path, tmp_path: Path
) -> None:
    project, cache = tmp_path / "project", tmp_path / "cache"
    (project / "data").mkdir(parents=True)
    (project / "data" / "base").symlink_to(workspace / "base")
    (project / "data" / "train").symlink_to(workspace / "train")
    rows = [{"prompt": PROMPT, "seed": seed, "steps": 4} for seed in range(24)]
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = _start(project, port, cache)
    try:
        submitted = requests.post(f"{url}/api/v1/batch/submit", json=rows, timeout=120)
        job_id = submitted.json()["job_id"]
        deadline = time.monotonic() + JOB_DEADLINE_S
        while (status := _status(url, job_id))["done"] < 2:
            assert process.poll() is None, "charaforge serve exited mid-job"
            assert time.monotonic() < deadline, status
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    database = cache / "outputs" / "charaforge" / "jobs.sqlite"
    with sqlite3.connect(database) as db:
        done_at_kill = db.execute("SELECT count(*) FROM rows WHERE state = 'done'").fetchone()[0]
    assert 2 <= done_at_kill < len(rows)  # killed mid-job for sure
    finished_before = {path: os.stat(path).st_mtime_ns for path in status["images"]}

    # A fresh port: the killed server's may have been taken meanwhile by another test's server.
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = _start(project, port, cache)
    try:
        deadline = time.monotonic() + JOB_DEADLINE_S
        while (status := _status(url, job_id))["state"] != "done":
            assert status["state"] in ("queued", "running"), status
            assert process.poll() is None, "the restarted server exited"
            assert time.monotonic() < deadline, status
            time.sleep(0.2)
    finally:
        _stop(process)
    folder = Path(status["folder"])
    names = sorted(path.name for path in folder.iterdir())
    expected = sorted(f"{i:05d}.{suffix}" for i in range(len(rows)) for suffix in ("png", "json"))
    assert names == expected  # no duplicate, no missing image, no temporary file left
    assert status["done"] == len(rows) and status["failed"] == 0
    for path, mtime in finished_before.items():
        assert os.stat(path).st_mtime_ns == mtime  # finished images were not rendered again
    engine = GenerationEngine(workspace / "base", device="cpu")
    for index in (0, len(rows) - 1):
        direct = engine.render(PROMPT, index, steps=4)
        assert (folder / f"{index:05d}.png").read_bytes() == png_bytes(direct)
