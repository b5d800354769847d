"""The sweep's work units for workers that pull their next unit when free (Ray engine actors).

Static shares of whole cells (`sweep.shard_by_cell`) leave a worker idle whenever the cells do
not divide evenly (9 equal cells on 2 workers: 5 against 4, a ceiling of x1.8) or one worker is
slower (a busier node, a smaller GPU). Here the cells are cut into units of whole batches, so
there are several per worker, and each free worker takes the next one, preferring the LoRA it
already holds, then a LoRA no other worker holds, so that each checkpoint is loaded by few
workers. The bytes do not depend on who renders what: a cell is cut only where its jobs are
independent (`sweep_methods.is_independent`) and only at multiples of `eval.batch_size`, so
every batch is the one the sequential sweep renders.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from itertools import groupby

from charaforge.config import EvalConfig
from charaforge.generate.sweep import BASE_CANDIDATE, SweepJob
from charaforge.generate.sweep_methods import is_independent

# Units per worker aimed at: enough that the last ones even out the workers' finishing times,
# few enough that a sweep of thousands of images is not cut below whole cells.
UNITS_PER_WORKER = 4

LoraKey = tuple[str, int] | None  # (candidate, step) of a unit's LoRA; None for the base model


def work_units(jobs: Sequence[SweepJob], eval: EvalConfig, workers: int) -> list[list[SweepJob]]:
    """The jobs (in plan order) as units: whole cells, the independent ones cut into runs of
    whole batches when the cells are too few for `workers`; concatenated, the plan again."""
    batch = max(1, eval.batch_size)
    per_unit = batch * max(1, len(jobs) // (max(1, workers) * UNITS_PER_WORKER * batch))
    units: list[list[SweepJob]] = []
    for _, grouped in groupby(jobs, key=SweepJob.cell):
        cell = list(grouped)
        if workers > 1 and all(is_independent(job, eval) for job in cell):
            units += [cell[start : start + per_unit] for start in range(0, len(cell), per_unit)]
        else:
            units.append(cell)
    return units


def unit_lora(unit: Sequence[SweepJob]) -> LoraKey:
    """The LoRA a unit needs loaded (every job of a unit is of one cell)."""
    first = unit[0]
    return None if first.candidate == BASE_CANDIDATE else (first.candidate, first.step)


def next_unit(
    pending: Sequence[int], loras: Sequence[LoraKey], held: LoraKey, others: Collection[LoraKey]
) -> int:
    """Which of the `pending` units (indices into `loras`, in plan order) a free worker that
    holds `held` takes: the first needing `held`, else the first whose LoRA no other worker
    holds (`others`), else the first."""
    for wanted in (lambda key: key == held, lambda key: key not in others):
        for index in pending:
            if wanted(loras[index]):
                return index
    return pending[0]
