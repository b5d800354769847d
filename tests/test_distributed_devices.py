"""`eval.devices`: one engine per device in this process, each rendering its share of the
sweep in its own thread, gives the in-process bytes (two CPU engines stand in for two GPUs
here); GPU ids the machine lacks, or devices with another executor, fail with one line."""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path

import pytest
import torch
from test_models_train import tiny_train

from charaforge.config import validate_params
from charaforge.distributed.devices_sweep import DevicesSweepExecutor, check_device_ids
from charaforge.errors import ConfigError
from charaforge.generate import sweep
from charaforge.generate.engine import GenerationEngine
from charaforge.models.base import load_base_pipeline
from charaforge.train import train_all

OPTIONS = {"scheduler": "euler", "controlnets": {}, "cpu_threads": 1}


def _hashes(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _eval(params_dict: dict, **changes):
    params_dict["eval"].update(
        prompts=["{trigger}, red hair", "{trigger}, blue hair"],  # hand-written: no dataset here
        from_data={**params_dict["eval"]["from_data"], "enabled": False},
        suites={},
        pose={**params_dict["eval"]["pose"], "enabled": False},
        **changes,
    )
    return validate_params(params_dict).eval


@pytest.mark.slow
def test_sweep_on_two_engines_gives_the_in_process_bytes(
    base_dir: Path, dataset_dir: Path, tmp_path: Path, params_dict: dict, monkeypatch
) -> None:
    evaluation = _eval(params_dict)
    monkeypatch.chdir(tmp_path)
    train = tiny_train(max_steps=2, checkpoint_every=2, cpu_threads=1)
    train_all(base_dir, dataset_dir, train, 64, 5, "train", "plots", state_dir="state")
    engine = GenerationEngine(base_dir, **OPTIONS)
    expected = sweep.run_sweep(engine, "train", evaluation, "aoi_cf", 64, 5, "one")
    executor = DevicesSweepExecutor([engine, GenerationEngine(base_dir, **OPTIONS)])
    result = sweep.run_sweep(engine, "train", evaluation, "aoi_cf", 64, 5, "two",
                             executor=executor)  # fmt: skip
    assert result.rendered == expected.rendered > 0
    assert len(executor.threads_used) == 2  # both engines rendered, each in its own thread
    two, one = _hashes(tmp_path / "two"), _hashes(tmp_path / "one")
    del two["index.parquet"], one["index.parquet"]  # they name their folders ("one", "two")
    assert two == one
    columns = [c for c in expected.index.columns if c != "image_path"]
    assert result.index[columns].equals(expected.index[columns])


def _loads_overlap(monkeypatch, loads: list) -> bool:
    """Run the loads in threads started together; True if two threads were ever building modules
    at once. Each thread's first `register_parameter` call waits at a barrier for one in the other
    thread, which comes only if the loads overlap (otherwise the barrier times out)."""
    unpatched = torch.nn.Module.register_parameter
    both_building, overlapped = threading.Barrier(len(loads), timeout=2), []

    def watched_register_parameter(module, name, param):
        if not overlapped and not both_building.broken:
            try:
                both_building.wait()
                overlapped.append(threading.get_ident())
            except threading.BrokenBarrierError:
                pass  # the other thread is not building: the loads take turns
        unpatched(module, name, param)

    monkeypatch.setattr(torch.nn.Module, "register_parameter", watched_register_parameter)
    start = threading.Barrier(len(loads))

    def run(load) -> None:
        start.wait()
        load()

    threads = [threading.Thread(target=run, args=(load,)) for load in loads]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert torch.nn.Module.register_parameter is watched_register_parameter
    assert torch.nn.Linear(2, 2).weight.device.type == "cpu"
    return bool(overlapped)


def test_loras_loading_in_two_threads_at_once_take_turns(
    base_dir: Path, dataset_dir: Path, tmp_path: Path, monkeypatch
) -> None:
    """diffusers builds a LoRA's layers under peft's `init_empty_weights`, which swaps
    `torch.nn.Module.register_parameter` for the whole process and puts back what it found. Two
    loads at once (one engine per device, each in its own thread) can each put back the other's
    swap, leaving every module built afterwards on the meta device (seen in CI). So two threads
    must never be building modules at the same time."""
    monkeypatch.chdir(tmp_path)
    train = tiny_train(max_steps=1, checkpoint_every=1, cpu_threads=1)
    train_all(base_dir, dataset_dir, train, 64, 5, "train", "plots")
    checkpoints = sorted(p.parent for p in (tmp_path / "train").rglob("*.safetensors"))
    assert len(checkpoints) >= 2
    engines = [GenerationEngine(base_dir, **OPTIONS) for _ in range(2)]
    loads = [
        lambda engine=engine, folder=folder: engine.load_lora("c", folder)
        for engine, folder in zip(engines, checkpoints[:2], strict=True)
    ]
    assert not _loads_overlap(monkeypatch, loads)
    assert all(list(engine.loras) == ["c"] for engine in engines)


def test_base_pipelines_loading_in_two_threads_at_once_take_turns(
    base_dir: Path, monkeypatch
) -> None:
    """The same for `from_pretrained` (accelerate's `init_empty_weights`): engines built for two
    devices, or two server workers, load their base pipelines in their own threads."""
    pipelines: list = []
    loads = [lambda: pipelines.append(load_base_pipeline(base_dir)) for _ in range(2)]
    assert not _loads_overlap(monkeypatch, loads)
    assert len(pipelines) == 2


def test_devices_are_checked(params_dict: dict) -> None:
    assert check_device_ids("eval.devices", [0, 1], available=2) == ["cuda:0", "cuda:1"]
    with pytest.raises(ConfigError, match=r"eval\.devices: GPU\(s\) \[2\] asked for, but this "
                                          r"machine has 2 GPU\(s\)"):  # fmt: skip
        check_device_ids("eval.devices", [0, 2], available=2)
    with pytest.raises(ConfigError, match=r"eval.*devices: \[1, 1\]: give distinct GPU ids"):
        _eval(dict(params_dict), devices=[1, 1])
    with pytest.raises(ConfigError, match=r"eval.*devices: for executor local.*gpus_per_task"):
        _eval(params_dict, devices=[0], executor="ray")
