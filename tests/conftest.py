"""Shared fixtures: the repository root and a params dictionary composed from the real conf/.

The fast tests run the stand-in pipeline (conf/stand_in.yaml: random-weight models, the drawn
demo character); params.yaml, the demo's, is the world (conf/config.yaml).
"""

from __future__ import annotations

import copy
import functools
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
STAND_IN_CONFIG = "stand_in"


@functools.cache
def stand_in_params_text() -> str:
    """params.yaml as `charaforge params --config-name stand_in` writes it (composed once)."""
    from charaforge.pipeline.compose import compose_params

    with tempfile.TemporaryDirectory() as folder:
        output = Path(folder) / "params.yaml"
        compose_params(REPO_ROOT, output=output, config_name=STAND_IN_CONFIG)
        return output.read_text(encoding="utf-8")


def stand_in_params_dict() -> dict:
    """A fresh, mutable copy of the stand-in params."""
    return yaml.safe_load(stand_in_params_text())


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--world-budget",
        action="store_true",
        help="also run the world_budget tests (world models trained at their real budget)",
    )
    parser.addoption(
        "--world-demo",
        action="store_true",
        help="also run the world demo end to end, judged by the oracle (make world-check)",
    )


# The longest test modules run first: `make test` spreads modules over 2 xdist workers in
# collection order (--dist loadfile --no-loadscope-reorder), so the short modules fill in at the
# end instead of a 3-minute module starting last. test_pipeline builds the shared stand-in
# reference run; the kill and queue tests wait for it, so two modules that do not come between.
# (Seconds of test time per module, measured in one full run.)
LONGEST_FIRST = (
    "test_world_pipeline.py",  # 927 (only with --world-demo)
    "test_pipeline.py",  # 533 (builds the shared stand-in reference run)
    "test_distributed_ray.py",  # 100
    "test_train_distributed.py",  # 81
    "test_hostile_kill_repro.py",  # 212
    "test_distributed_queue.py",  # 111
)
# Tests that take many minutes each run on request (like the benchmarks), not in every CI run:
# the world's training recipe at its real budget, and the world demo end to end (CI stays under
# 30 minutes; `make world-check`, or `make demo` then CHARAFORGE_WORLD_RUN, runs the latter).
ON_REQUEST = {"world_budget": "--world-budget", "world_demo": "--world-demo"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    rank = {name: index for index, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: order kept
    for marker, option in ON_REQUEST.items():
        if config.getoption(option):
            continue
        skip = pytest.mark.skip(reason=f"{marker}: run with {option}")
        for item in items:
            if marker in item.keywords:
                item.add_marker(skip)


@pytest.fixture(autouse=True)
def _restore_torch_threads() -> Iterator[None]:
    """A test that sets torch's thread count must not change the numbers of the tests after it
    (CPU reductions block differently with other thread counts)."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


_REGISTER_PARAMETER = torch.nn.Module.register_parameter


@pytest.fixture(autouse=True)
def _torch_modules_build_on_the_cpu() -> Iterator[None]:
    """A load that leaves accelerate's or peft's meta-device swap of register_parameter in place
    breaks every later test in the worker; fail the test that left it, not the ones after."""
    yield
    assert torch.nn.Module.register_parameter is _REGISTER_PARAMETER, (
        "torch.nn.Module.register_parameter was left swapped (a model load raced another)"
    )


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def _stand_in_params() -> dict:
    return stand_in_params_dict()


@pytest.fixture
def params_dict(_stand_in_params: dict) -> dict:
    """A fresh, mutable copy of the stand-in params (conf/stand_in.yaml composed)."""
    return copy.deepcopy(_stand_in_params)


# The trainer tests share a tiny stand-in base model and dataset, built once per test module
# (module scope: a module that changes the dataset cannot leak into another).
@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from test_models_train import STAND_IN

    from charaforge.models.base import write_base

    out = tmp_path_factory.mktemp("base") / "base"
    write_base(STAND_IN, out)
    return out


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from test_models_train import make_dataset

    return make_dataset(tmp_path_factory.mktemp("dataset") / "dataset")


@pytest.fixture(scope="session")
def stand_in_reference_run(
    repo_root: Path, tmp_path_factory: pytest.TempPathFactory, worker_id: str
) -> Path:
    """A fresh copy of the project after one uninterrupted `dvc repro` of the stand-in pipeline,
    made once per test session and shared by the xdist workers: a second run from scratch,
    killed at several points, must give its bytes; the pipeline tests and the DVC queue test go
    on from copies of it. Read-only: a test that changes a workspace copies it first.

    The first worker that asks builds it under a file lock in the session's shared temporary
    folder; the other waits for it, then reuses it (an attempt that failed is built again)."""
    from filelock import FileLock
    from test_pipeline import _dvc, _fresh_copy

    base = tmp_path_factory.getbasetemp()
    shared = base.parent if worker_id != "master" else base  # workers: .../pytest-N/popen-gwK
    workdir = shared / "stand_in_reference"
    log = reference_repro_log(workdir)  # written last: the run is complete
    with FileLock(str(shared / "stand_in_reference.lock")):
        if not log.exists():
            shutil.rmtree(workdir, ignore_errors=True)
            _fresh_copy(repo_root, workdir)
            output = _dvc(workdir, "repro")
            log.write_text(output, encoding="utf-8")
    return workdir


def reference_repro_log(workdir: Path) -> Path:
    """What the reference run's `dvc repro` printed (beside its workspace, not in it)."""
    return workdir.with_name(workdir.name + ".repro.log")
