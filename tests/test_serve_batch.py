"""Seed 001's /api/v1 and its batch jobs: CSV and JSON job files, failed rows, cancel, and a
server killed mid-job (SIGKILL) that finishes the job after a restart with no duplicate and no
missing image."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
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
from charaforge.generate.request import RenderRequest
from charaforge.serve import batch
from charaforge.serve.app import create_app
from charaforge.serve.batch_store import BatchRow
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


def test_status_waits_for_the_end_of_the_job(server: tuple[str, object]) -> None:
    url, app = server
    worker = app.state.service.workers[0]
    row = {"prompt": PROMPT, "seed": 1, "width": 64, "height": 64, "steps": 2}
    worker.lock.acquire()  # released a second later: the job cannot end before it is asked for
    threading.Timer(1.0, worker.lock.release).start()
    job_id = requests.post(f"{url}/api/v1/batch/submit", json=[row], timeout=30).json()["job_id"]
    status = requests.get(
        f"{url}/api/v1/batch/status/{job_id}", params={"wait": 30}, timeout=120
    ).json()
    assert (status["state"], status["done"]) == ("done", 1)
    too_long = requests.get(f"{url}/api/v1/batch/status/{job_id}", params={"wait": 31}, timeout=30)
    assert too_long.status_code == 422
    unknown = requests.get(f"{url}/api/v1/batch/status/nope", params={"wait": 1}, timeout=30)
    assert unknown.status_code == 404


class _Spies:
    """What the queue did: the seeds of each engine call, and per commit the rows it marked
    done, whether their PNG and JSON were complete at that moment, and the thread."""

    def __init__(self, engine: GenerationEngine, store: object) -> None:
        self.calls: list[list[int]] = []
        self.commits: list[tuple[list[int], str]] = []
        self.problems: list[str] = []
        self.second_render = threading.Event()
        self.commit_bytes: dict[str, bytes] = {}
        self._render, self._finish = engine.render_batch, store.finish_rows

    def render_batch(self, requests_: list) -> list:
        self.calls.append([request.seed for request in requests_])
        if len(self.calls) == 2:
            self.second_render.set()
        return self._render(requests_)

    def finish_rows(self, job_id: str, images: list[tuple[int, str]]) -> None:
        for idx, path in images:
            png, sidecar = Path(path), Path(path).with_suffix(".json")
            if not (png.is_file() and sidecar.is_file()):
                self.problems.append(f"row {idx} committed before its files")
                continue
            self.commit_bytes[path] = png.read_bytes()
            if json.loads(sidecar.read_text())["seed"] != idx:
                self.problems.append(f"row {idx}: another row's sidecar")
        # The first group is committed only once the second renders: written on a thread of
        # its own while the next group renders (a sequential queue never gets here).
        if not self.commits and not self.second_render.wait(timeout=300):
            self.problems.append("the next group did not render while a group was written")
        self.commits.append(([idx for idx, _ in images], threading.current_thread().name))
        self._finish(job_id, images)


class _SeenWaiting(threading.Event):
    """The runner's wake-up event, telling when the runner first waits on it."""

    def __init__(self) -> None:
        super().__init__()
        self.waiting = threading.Event()

    def wait(self, timeout: float | None = None) -> bool:
        self.waiting.set()
        return super().wait(timeout)


@pytest.fixture
def quiet_runner(server: tuple[str, object], tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A runner of its own on the server's device queue, whose idle fallback poll never comes
    during the test: a job runs only if `submit` wakes it. Yields it with its spies."""
    _, app = server
    monkeypatch.setattr(batch, "IDLE_POLL_S", 3600.0)
    settings = dataclasses.replace(app.state.batches.settings, outputs_dir=tmp_path / "out")
    runner = batch.BatchRunner(app.state.service, settings)
    runner.wake = _SeenWaiting()
    store = runner.store  # the runner thread starts, finds no job and waits to be woken
    assert runner.wake.waiting.wait(timeout=300)
    spies = _Spies(app.state.service.engine, store)
    monkeypatch.setattr(app.state.service.engine, "render_batch", spies.render_batch)
    monkeypatch.setattr(store, "finish_rows", spies.finish_rows)
    yield runner, spies
    runner.stop()


def _ended(runner: batch.BatchRunner, job_id: str) -> dict:
    """The status once the job ends, through the long poll; a wake-up or end notice that never
    comes fails the outer bound."""
    return asyncio.run(asyncio.wait_for(runner.wait_job(job_id, 3600), timeout=300))


def test_a_woken_pipelined_queue_commits_rows_after_their_files_with_the_engines_bytes(
    quiet_runner: tuple[batch.BatchRunner, _Spies], workspace: Path
) -> None:
    runner, spies = quiet_runner
    rows = [BatchRow(prompt=PROMPT, seed=seed, width=64, height=64, steps=2) for seed in range(10)]
    status = _ended(runner, runner.submit(rows))
    assert (status["state"], status["done"], status["failed"]) == ("done", 10, 0)
    assert spies.problems == []
    assert spies.calls == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]  # every row rendered once
    assert [rows for rows, _ in spies.commits] == spies.calls
    assert all(thread.startswith("batch-writer") for _, thread in spies.commits)
    folder = Path(status["images"][0]).parent
    names = sorted(path.name for path in folder.iterdir())
    assert names == sorted(f"{i:05d}.{suffix}" for i in range(10) for suffix in ("png", "json"))
    engine = GenerationEngine(workspace / "base", device="cpu")
    for seeds in spies.calls:
        requests_ = [
            RenderRequest(prompt=PROMPT, seed=seed, width=64, height=64, steps=2) for seed in seeds
        ]
        for seed, image in zip(seeds, engine.render_batch(requests_), strict=True):
            path = folder / f"{seed:05d}.png"
            assert path.read_bytes() == png_bytes(image) == spies.commit_bytes[str(path)]


def test_a_job_cancelled_while_a_group_is_written_keeps_only_whole_rows(
    quiet_runner: tuple[batch.BatchRunner, _Spies],
) -> None:
    runner, spies = quiet_runner
    rows = [BatchRow(prompt=PROMPT, seed=seed, width=64, height=64, steps=2) for seed in range(10)]

    def cancel_at_the_first_commit(job: str, images: list[tuple[int, str]]) -> None:
        if spies.second_render.wait(timeout=300):
            runner.cancel(job)  # while the second group renders
            time.sleep(0.5)  # an end notice sent with the cancel would be read before this commit
        spies.finish_rows(job, images)

    runner.store.finish_rows = cancel_at_the_first_commit
    job = runner.submit(rows)
    # The end notice comes once the runner has committed what it was writing: the status it
    # wakes is final (the same once a second job is done; jobs run one at a time).
    status = _ended(runner, job)
    runner.store.finish_rows = spies.finish_rows
    calls = len(spies.calls)
    assert _ended(runner, runner.submit(rows[:1]))["state"] == "done"
    assert runner.job(job) == status
    assert status["state"] == "cancelled" and spies.problems == []
    # Group 2 was stopped mid-render or finished and written; group 3 never started.
    assert status["done"] in (4, 8) and calls == 2
    folder = Path(status["images"][0]).parent
    done = [Path(image).name for image in status["images"]]
    expected = sorted(done + [name.replace(".png", ".json") for name in done])
    assert sorted(path.name for path in folder.iterdir()) == expected  # whole rows only


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
