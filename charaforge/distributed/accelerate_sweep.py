"""The evaluation sweep over the processes of an `accelerate launch` (several GPUs, no Ray).

`accelerate launch --multi_gpu --num_processes N -m stages.generate` with `eval.executor:
accelerate`: the same work items as the sequential sweep, dealt by whole cells
(`shard_by_cell`), each process taking its share with `PartialState().split_between_processes`
and rendering it on its own device. Only the main process writes index.parquet and the grids,
after every process has finished (`wait_for_everyone`).
"""

from __future__ import annotations

from typing import Any

from charaforge.generate import sweep
from charaforge.generate.engine import GenerationEngine
from charaforge.generate.sweep import SweepJob, SweepWork


class AccelerateSweepExecutor:
    """This process's share of the sweep, on `engine` (see the module docstring)."""

    def __init__(self, engine: GenerationEngine, state: Any | None = None) -> None:
        import torch
        from accelerate import PartialState

        self.engine = engine
        # cpu=True on a machine without CUDA: without it, each process of a torchrun launch
        # there sees itself alone (num_processes 1) and renders the whole sweep.
        self.state = state or PartialState(cpu=not torch.cuda.is_available())

    @property
    def writes_outputs(self) -> bool:
        return self.state.is_main_process

    def render(self, jobs: list[SweepJob], work: SweepWork) -> tuple[int, int]:
        from accelerate.utils import gather_object

        shares = sweep.shard_by_cell(jobs, self.state.num_processes)
        with self.state.split_between_processes(shares) as mine:
            counts = [sweep.render_jobs(self.engine, share, work) for share in mine]
        rendered = sum(count[0] for count in counts)
        skipped = sum(count[1] for count in counts)
        self.state.wait_for_everyone()
        if self.state.num_processes == 1:
            return rendered, skipped
        totals = gather_object([(rendered, skipped)])
        return sum(t[0] for t in totals), sum(t[1] for t in totals)
