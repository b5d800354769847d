"""HTTP batch jobs on Ray: with `RayBatchRows` given to the app, a job's rows are rendered by
the kept Ray engine actors (a local 2-CPU Ray), 2 rows at once, with the bytes of the server's
own device queue; a row naming an unknown LoRA is recorded as failed as on the local queue."""

from __future__ import annotations

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
from serve_fixtures import running

from charaforge.config.resources import RayConfig
from charaforge.distributed.cluster import connect
from charaforge.distributed.pools import release_pools
from charaforge.distributed.ray_batch import RayBatchRows
from charaforge.serve.app import create_app
from charaforge.serve.limits import ServerSettings

pytestmark = pytest.mark.usefixtures("one_thread")

ROWS = [
    {"prompt": PROMPT, "negative": "lowres", "seed": 5, "width": 64, "height": 64, "steps": 2},
    {"prompt": PROMPT, "lora": "r4:0.5", "seed": 6, "width": 64, "height": 64, "steps": 2},
    {"prompt": PROMPT, "lora": "nope", "seed": 7, "width": 64, "height": 64, "steps": 2},
    {"prompt": PROMPT, "lora": "r4", "seed": 8, "width": 64, "height": 64, "steps": 2},
]


@pytest.fixture(scope="module")
def ray_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, object]]:
    workspace = make_workspace(tmp_path_factory.mktemp("batch_ray"), max_steps=2)
    config = RayConfig(num_cpus=2)
    ray = connect(config)
    settings = ServerSettings(
        base_dir=workspace / "base",
        lora_dir=workspace / "none",
        train_dir=workspace / "train",
        devices=["cpu"],
        cpu_threads=1,
        outputs_dir=workspace / "outputs",
    )
    options = {"scheduler": "euler", "cpu_threads": 1, "memory": "device"}
    app = create_app(settings, batch_rows=RayBatchRows(config, 2, workspace / "base", options))
    with running(app) as url:
        yield url, app
    app.state.batches.stop()
    app.state.service.stop()
    release_pools()
    ray.shutdown()


def _run_job(url: str) -> dict:
    job_id = requests.post(f"{url}/api/v1/batch/submit", json={"rows": ROWS}, timeout=30).json()
    deadline = time.monotonic() + 600
    while True:
        status = requests.get(f"{url}/api/v1/batch/status/{job_id['job_id']}", timeout=30).json()
        if status["state"] == "done":
            return status
        assert status["state"] in ("queued", "running"), status
        assert time.monotonic() < deadline, status
        time.sleep(0.2)


@pytest.mark.slow
def test_batch_rows_render_on_ray_actors_with_the_local_bytes(ray_server) -> None:
    import ray

    from charaforge.distributed.pools import KEPT

    url, app = ray_server
    on_ray = _run_job(url)
    assert (on_ray["total"], on_ray["done"], on_ray["failed"]) == (4, 3, 1)
    assert on_ray["errors"][0]["row"] == 2 and "unknown LoRA 'nope'" in on_ray["errors"][0]["error"]
    [pool] = KEPT.values()
    counts = ray.get([actor.rendered.remote() for actor in pool.actors])
    assert sorted(counts) == [1, 2]  # both actors rendered, each row once
    assert len(set(pool.pids)) == 2

    app.state.batches.remote_rows = None  # the same job on the server's own device queue
    local = _run_job(url)
    assert ray.get([actor.rendered.remote() for actor in pool.actors]) == counts
    ray_folder, local_folder = Path(on_ray["folder"]), Path(local["folder"])
    names = sorted(p.name for p in ray_folder.iterdir())
    assert names == sorted(p.name for p in local_folder.iterdir())
    assert names == [f"{i:05d}.{ext}" for i in (0, 1, 3) for ext in ("json", "png")]
    for name in ("00000.png", "00001.png", "00003.png"):
        assert (ray_folder / name).read_bytes() == (local_folder / name).read_bytes(), name
