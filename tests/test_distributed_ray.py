"""The candidate grid and the sweep on a real local Ray cluster (2 CPU workers) against the
sequential in-process run: the same bytes for every output, also when one engine actor's
process is SIGKILLed mid-sweep (Ray restarts it; it renders only what is not on disk yet)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

import pytest
from test_models_train import tiny_train

from charaforge.config import validate_params
from charaforge.config.resources import RayConfig
from charaforge.distributed.cluster import connect
from charaforge.distributed.engine_pool import EngineActor, kept_pool
from charaforge.distributed.pools import release_pools
from charaforge.distributed.ray_grid import train_grid
from charaforge.distributed.ray_sweep import RaySweepExecutor
from charaforge.generate import sweep
from charaforge.generate.engine import GenerationEngine
from charaforge.train import RunContext, train_all

CONTEXT = RunContext(trigger="aoi_cf", git_commit="unknown")
ENGINE_OPTIONS = {"scheduler": "euler", "controlnets": {}, "cpu_threads": 1}


def _hashes(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _eval(params_dict: dict):
    # The stand-in sweep without poses and suites: 2 candidates x 2 checkpoints x 2 scales x 3
    # prompts x 2 seeds + the base row = 54 images.
    # Hand-written prompts: the demo's come from the dataset (eval.from_data), which the generate
    # stage resolves, and run_sweep is called directly here.
    params_dict["eval"].update(
        prompts=[
            "{trigger}, 1girl, red hair, standing, white background",
            "{trigger}, 1girl, red hair, arms up, outdoors",
            "{trigger}, 1girl, red hair, sitting, indoors",
        ],
        from_data={**params_dict["eval"]["from_data"], "enabled": False},
        suites={},
        pose={**params_dict["eval"]["pose"], "enabled": False},
    )
    return validate_params(params_dict).eval


@pytest.fixture(scope="module")
def ray_cluster():
    ray = connect(RayConfig(num_cpus=2))
    yield ray
    ray.shutdown()


@pytest.mark.slow
def test_grid_and_sweep_on_ray_give_the_sequential_bytes(
    base_dir: Path, dataset_dir: Path, tmp_path: Path, params_dict: dict, ray_cluster, monkeypatch
) -> None:
    train = tiny_train(max_steps=2, checkpoint_every=1, cpu_threads=1)
    eval = _eval(params_dict)
    runs = {name: tmp_path / name for name in ("sequential", "ray", "killed")}
    for folder in runs.values():
        folder.mkdir()

    # Sequential: train_all, then the in-process sweep.
    monkeypatch.chdir(runs["sequential"])
    train_all(base_dir, dataset_dir, train, 64, 5, "train", "plots", context=CONTEXT,
              state_dir="state")  # fmt: skip
    engine = GenerationEngine(base_dir, **ENGINE_OPTIONS)
    sequential = sweep.run_sweep(engine, "train", eval, "aoi_cf", 64, 5, "generate")
    assert sequential.rendered == len(sequential.index) == 54

    # Ray: both candidates in parallel tasks, the sweep on 2 engine actors.
    config = RayConfig(num_cpus=2)
    monkeypatch.chdir(runs["ray"])
    train_grid(config, base_dir, dataset_dir, train, 64, 5, "train", "plots", CONTEXT, "state")
    executor = RaySweepExecutor(config, 2, str(base_dir), ENGINE_OPTIONS)
    result = sweep.run_sweep(None, "train", eval, "aoi_cf", 64, 5, "generate",
                             executor=executor, stand_in=True)  # fmt: skip
    assert result.rendered == 54
    assert len(set(executor.worker_pids)) == 2 and os.getpid() not in executor.worker_pids
    # The embedded Ray's workers run at the driver's niceness (RAY_worker_niceness=0), not the
    # 15 levels below it that Ray gives them by default.
    driver = os.getpriority(os.PRIO_PROCESS, 0)
    assert [os.getpriority(os.PRIO_PROCESS, pid) for pid in executor.worker_pids] == [driver] * 2
    for part in ("train", "plots", "generate"):
        assert _hashes(runs["ray"] / part) == _hashes(runs["sequential"] / part), part
    # The actors render those bytes without what diffusers imports only because it is installed
    # (skip_unused_imports: bitsandbytes), and they time their start-up in order.
    actors, _ = kept_pool(config, base_dir, ENGINE_OPTIONS).ready(2)
    assert ray_cluster.get(actors[0].imported.remote(["diffusers", "bitsandbytes"])) == {
        "diffusers": True,
        "bitsandbytes": False,
    }
    times = ray_cluster.get(actors[0].start_times.remote())
    assert times["imported"] <= times["init"] <= times["libraries"] <= times["loaded"]
    # The actors are kept: the next sweep of this process finds them warm (no start-up, the
    # same processes); everything is on disk already, so nothing is rendered again.
    pids = list(executor.worker_pids)
    assert executor.startup_seconds > 0.0
    again = sweep.run_sweep(None, "train", eval, "aoi_cf", 64, 5, "generate",
                            executor=RaySweepExecutor(config, 2, str(base_dir), ENGINE_OPTIONS),
                            stand_in=True)  # fmt: skip
    assert (again.rendered, again.skipped) == (0, 54)
    assert kept_pool(config, base_dir, ENGINE_OPTIONS).pids == pids

    # Killed: one actor's process SIGKILLed once the sweep is under way; same bytes.
    monkeypatch.chdir(runs["killed"])
    killer = RaySweepExecutor(RayConfig(num_cpus=2, max_retries=2), 2, str(base_dir),
                              ENGINE_OPTIONS)  # fmt: skip
    killed: list[int] = []

    def kill_one_worker() -> None:
        images = runs["killed"] / "generate" / "images"
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if killer.worker_pids and images.is_dir() and any(images.rglob("*.png")):
                os.kill(killer.worker_pids[1], signal.SIGKILL)
                killed.append(killer.worker_pids[1])
                return
            time.sleep(0.05)

    thread = threading.Thread(target=kill_one_worker, daemon=True)
    thread.start()
    killed_run = sweep.run_sweep(None, runs["ray"] / "train", eval, "aoi_cf", 64, 5, "generate",
                                 executor=killer, stand_in=True)  # fmt: skip
    thread.join(timeout=5)
    assert killed, "the worker was not killed during the sweep"
    generated = _hashes(runs["killed"] / "generate")
    expected = _hashes(runs["sequential"] / "generate")
    # index.parquet names the train folder only through image paths (out_dir), which agree.
    assert generated == expected
    assert killed_run.rendered <= 54


def test_ray_section_is_validated(params_dict: dict) -> None:
    from charaforge.errors import ConfigError

    params_dict["ray"] = {"address": " ", "num_cpus": 0}
    with pytest.raises(ConfigError) as error:
        validate_params(params_dict)
    assert "ray.address" in str(error.value) and "ray.num_cpus" in str(error.value)
    params_dict["ray"] = {"adress": "auto"}
    with pytest.raises(ConfigError, match="ray.adress: unknown key"):
        validate_params(params_dict)
    del params_dict["ray"]
    params_dict["eval"].update(workers=0, executor="spark")
    with pytest.raises(ConfigError) as error:
        validate_params(params_dict)
    assert "eval.workers" in str(error.value) and "eval.executor" in str(error.value)
    params_dict["eval"].update(workers=2, executor="ray")
    params_dict["train"].update(processes=2, executor="ray")
    with pytest.raises(ConfigError, match="train: .*executor: ray trains each candidate in one"):
        validate_params(params_dict)


def test_engine_actors_skip_bitsandbytes_only_before_diffusers_decides() -> None:
    """diffusers and transformers decide at import whether bitsandbytes is there; hidden before,
    they leave it out (its import compiles kernels); once diffusers is in, nothing is hidden."""
    script = (
        "import sys\n"
        "from charaforge.distributed.engine_pool import skip_unused_imports\n"
        "print(skip_unused_imports())\n"
        "from diffusers.utils import is_bitsandbytes_available\n"
        "from transformers.utils import is_bitsandbytes_available as in_transformers\n"
        "print(is_bitsandbytes_available(), in_transformers(), 'bitsandbytes' in sys.modules)\n"
        "del sys.modules['bitsandbytes']\n"
        "print(skip_unused_imports())\n"
    )
    import subprocess

    lines = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                           check=True).stdout.splitlines()  # fmt: skip
    assert lines == ["['bitsandbytes']", "False False True", "[]"]


def test_generate_stage_starts_the_ray_actors_before_tracking(
    params_dict: dict, monkeypatch
) -> None:
    """The pool starts in `before` (ahead of the MLflow set-up), not in the body."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import stages.generate as stage

    started: list[int] = []
    monkeypatch.setattr(RaySweepExecutor, "start", lambda self: started.append(self.workers))
    monkeypatch.setattr(stage.prompts, "check_suites", lambda eval: None)
    params_dict["eval"].update(executor="ray", workers=2)
    stage.before(validate_params(params_dict))
    assert started == [2]
    params_dict["eval"].update(executor="local", workers=1)
    stage.before(validate_params(params_dict))
    assert started == [2]


class GatedActor(EngineActor):
    """An engine actor that is slow for a while: the first to get a unit holds it until every
    other image of the sweep is on disk (gate.json in the working directory: how many images
    the sweep has), or two minutes have passed."""

    def render_unit(self, jobs: list, work: sweep.SweepWork) -> tuple[int, int]:
        try:
            os.close(os.open("gate.claimed", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return super().render_unit(jobs, work)
        others = json.loads(Path("gate.json").read_text())["images"] - len(jobs)
        images = Path(work.out_dir) / "images"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and len(list(images.rglob("*.png"))) < others:
            time.sleep(0.2)
        return super().render_unit(jobs, work)


@pytest.mark.slow
def test_a_worker_that_is_held_up_takes_one_unit_the_other_pulls_the_rest(
    base_dir: Path, dataset_dir: Path, tmp_path: Path, params_dict: dict, ray_cluster, monkeypatch
) -> None:
    """Workers pull units: while one actor is stuck on its first unit, the other renders every
    other unit (static shares of whole cells would leave it idle with half the sweep left)."""
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # GatedActor, for the actors
    monkeypatch.chdir(tmp_path)
    train = tiny_train(max_steps=2, checkpoint_every=1, cpu_threads=1)
    train_all(base_dir, dataset_dir, train, 64, 5, "train", "plots", context=CONTEXT,
              state_dir="state")  # fmt: skip
    params_dict["eval"].update(lora_scales=[0.0, 1.0], batch_size=4)
    eval = _eval(params_dict)  # 5 cells of 6 images: 10 units of 4 + 2 on 2 workers
    engine = GenerationEngine(base_dir, **ENGINE_OPTIONS)
    sequential = sweep.run_sweep(engine, "train", eval, "aoi_cf", 64, 5, "sequential")
    assert sequential.rendered == 30
    Path("gate.json").write_text(json.dumps({"images": 30}))
    executor = RaySweepExecutor(RayConfig(num_cpus=2), 2, str(base_dir), ENGINE_OPTIONS,
                                actor_class=GatedActor)  # fmt: skip
    try:
        result = sweep.run_sweep(None, "train", eval, "aoi_cf", 64, 5, "pulled",
                                 executor=executor, stand_in=True)  # fmt: skip
    finally:
        release_pools()  # the gated actors are for this test only
    assert result.rendered == 30
    assert sorted(executor.units_done) == [1, 9], executor.units_done
    pulled, expected = _hashes(tmp_path / "pulled"), _hashes(tmp_path / "sequential")
    del pulled["index.parquet"], expected["index.parquet"]  # they name their folders
    assert pulled == expected


def test_a_sweep_removes_the_temporary_folders_a_killed_actor_left(tmp_path: Path) -> None:
    """SIGKILL mid-write skips atomic_path's clean-up; once every unit is done, the executor
    removes such folders (the retry wrote the image), and nothing else."""
    from charaforge.core.files import atomic_path
    from charaforge.distributed.ray_sweep import _remove_stale_temps

    cell = tmp_path / "images" / "base" / "step-000000" / "scale-0"
    cell.mkdir(parents=True)
    (cell / "p02_s0.png").write_bytes(b"png")
    (cell / ".keep").write_bytes(b"")
    with pytest.raises(RuntimeError), atomic_path(cell / "p03_s0.png") as temp:
        temp.write_bytes(b"")
        stale = temp.parent
        (cell / ".copy").mkdir()
        shutil.copytree(stale, cell / stale.name.replace(stale.name[-8:], "abcd1234"))
        raise RuntimeError("killed")
    _remove_stale_temps(tmp_path)
    assert sorted(p.name for p in cell.iterdir()) == [".copy", ".keep", "p02_s0.png"]
