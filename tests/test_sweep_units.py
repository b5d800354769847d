"""The sweep's work units for pulling workers (generate/sweep_units.py): cells cut only where
their jobs are independent and only at whole batches, the next-unit rule, and units rendered in
any order on one kept engine giving the sequential bytes with at most one LoRA loaded."""

from __future__ import annotations

import hashlib
import random
from itertools import groupby
from pathlib import Path

import pytest
from engine_fixtures import (
    make_workspace,
    one_thread,  # noqa: F401  (a fixture: pytest finds it by name)
)

from charaforge.config import EvalConfig
from charaforge.generate import sweep, sweep_units
from charaforge.generate.engine import GenerationEngine
from charaforge.generate.sweep import SweepWork, plan_jobs

pytestmark = pytest.mark.usefixtures("one_thread")

CANDIDATES = [{"name": "c1", "checkpoints": [1, 2]}, {"name": "c2", "checkpoints": [1, 2]}]
SUITE = "room#{trigger}, 1girl#standing\nroom#{trigger}, 1girl#waving\n"


def _eval(**changes) -> EvalConfig:
    values = {
        "prompts": ["{trigger}, standing", "{trigger}, sitting", "{trigger}, arms up"],
        "seeds": [0, 1],
        "lora_scales": [0.0, 0.5, 1.0],
        "steps": 2,
        "guidance_scale": 4.0,
        "scheduler": "euler",
        "batch_size": 4,
    }
    return EvalConfig(**{**values, **changes})


def _cells(jobs: list) -> list[list]:
    return [list(cell) for _, cell in groupby(jobs, key=sweep.SweepJob.cell)]


def test_units_cut_independent_cells_at_whole_batches() -> None:
    evaluation = _eval()
    jobs = plan_jobs(CANDIDATES, evaluation, "t", 7)
    assert len(jobs) == 54 and [len(cell) for cell in _cells(jobs)] == [6] * 9
    # One worker: whole cells, as before (a unit per LoRA state, nothing to balance).
    assert sweep_units.work_units(jobs, evaluation, 1) == _cells(jobs)
    # Two workers: 9 cells would split 5/4; runs of whole batches (4) give 18 units.
    units = sweep_units.work_units(jobs, evaluation, 2)
    assert [len(unit) for unit in units] == [4, 2] * 9
    assert [job for unit in units for job in unit] == jobs
    assert all(len({job.cell() for job in unit}) == 1 for unit in units)
    # A larger sweep keeps bigger units: 54 jobs on 2 workers at batch 2 -> units of 6.
    small_batches = _eval(batch_size=2)
    assert {len(u) for u in sweep_units.work_units(jobs, small_batches, 2)} == {6}
    keys = [sweep_units.unit_lora(unit) for unit in units[:4]]
    assert keys == [None, None, ("c1", 1), ("c1", 1)]


@pytest.mark.parametrize("method", ["shared_attention", "ip_adapter"])
def test_cells_with_dependent_jobs_stay_whole(tmp_path: Path, method: str) -> None:
    (tmp_path / "suite.txt").write_text(SUITE)
    suites = {"s": {"file": str(tmp_path / "suite.txt"), "seeds": [0, 1], "method": method}}
    evaluation = _eval(suites=suites, prompts=["{trigger}, a", "{trigger}, b"], seeds=[0])
    jobs = plan_jobs(CANDIDATES, evaluation, "t", 7, root=tmp_path)
    assert [len(cell) for cell in _cells(jobs)] == [6] * 9  # 2 plain + 2 groups of 2 frames
    assert sweep_units.work_units(jobs, evaluation, 2) == _cells(jobs)
    # Independent suite lines are cut like plain prompts.
    independent = _eval(suites={"s": {**suites["s"], "method": "independent"}},
                        prompts=["{trigger}, a", "{trigger}, b"], seeds=[0])  # fmt: skip
    jobs = plan_jobs(CANDIDATES, independent, "t", 7, root=tmp_path)
    assert len(sweep_units.work_units(jobs, independent, 2)) == 18


def test_next_unit_prefers_the_held_lora_then_one_nobody_holds() -> None:
    a, b = ("c1", 1), ("c2", 1)
    loras = [None, a, a, b, b]
    assert sweep_units.next_unit([1, 2, 3, 4], loras, held=a, others={b}) == 1
    assert sweep_units.next_unit([3, 4], loras, held=a, others={b}) == 3  # none left of a
    assert sweep_units.next_unit([1, 2, 3, 4], loras, held=None, others={a}) == 3
    assert sweep_units.next_unit([2, 4], loras, held=None, others={a, b}) == 2
    assert sweep_units.next_unit([0, 1], loras, held=b, others=set()) == 0


def _hashes(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted((folder / "images").rglob("*"))
        if p.is_file()
    }


def test_units_in_any_order_on_a_kept_engine_give_the_sequential_bytes(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    root = make_workspace(tmp_path_factory.mktemp("units"), max_steps=4)  # checkpoints 2, 4
    evaluation = _eval(prompts=["{trigger}, standing"], seeds=[0, 1, 2], batch_size=2)
    engine = GenerationEngine(root / "base", scheduler="euler", cpu_threads=1)
    sweep.run_sweep(engine, root / "train", evaluation, "aoi_cf", 64, 3, root / "sequential")
    assert not engine.loras

    jobs = sweep.sweep_work_items(root / "train", evaluation, "aoi_cf", 3)
    work = SweepWork(str(root / "train"), evaluation, 64, str(root / "units"))
    units = sweep_units.work_units(jobs, evaluation, 2)
    assert len(units) == 10  # 5 cells of 3 images, cut into 2 + 1
    random.Random(0).shuffle(units)  # LoRAs change between calls, base cells come late
    held = []
    for unit in units:
        sweep.render_jobs(engine, unit, work, keep_lora=True)
        held.append(sorted(engine.loras))
        lora = sweep_units.unit_lora(unit)
        assert held[-1] == ([] if lora is None else [f"r4-{lora[1]}"]), held
    assert _hashes(root / "units") == _hashes(root / "sequential")
