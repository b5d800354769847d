"""The evaluation sweep over several devices of this machine, without Ray or a launcher:
`eval.devices: [0, 1, ...]` gives one engine per CUDA device, each rendering its share of the
work items (whole cells, `shard_by_cell`) in its own thread. CUDA kernels run outside the GIL,
so the devices render at the same time. The files are the sequential run's: each image depends
only on its own job and is written atomically to its own path.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from charaforge.errors import ConfigError
from charaforge.generate import sweep
from charaforge.generate.engine import GenerationEngine
from charaforge.generate.sweep import SweepJob, SweepWork


def check_device_ids(key: str, ids: Sequence[int], available: int | None = None) -> list[str]:
    """The torch device names for GPU ids; asking for a GPU the machine lacks is a one-line
    configuration error naming `key`."""
    if available is None:
        import torch

        available = torch.cuda.device_count() if torch.cuda.is_available() else 0
    missing = [device for device in ids if device >= available]
    if missing:
        raise ConfigError(
            f"{key}: GPU(s) {missing} asked for, but this machine has {available} GPU(s)"
        )
    return [f"cuda:{device}" for device in ids]


class DevicesSweepExecutor:
    """One engine per device, one thread per engine (see the module docstring)."""

    def __init__(self, engines: Sequence[GenerationEngine]) -> None:
        if not engines:
            raise ValueError("DevicesSweepExecutor: give at least one engine")
        self.engines = list(engines)
        self.threads_used: set[int] = set()  # ids of the threads that rendered (for tests)

    def render(self, jobs: list[SweepJob], work: SweepWork) -> tuple[int, int]:
        shares = sweep.shard_by_cell(jobs, len(self.engines))

        def render_share(engine: GenerationEngine, share: list[SweepJob]) -> tuple[int, int]:
            if not share:
                return 0, 0
            self.threads_used.add(threading.get_ident())
            return sweep.render_jobs(engine, share, work)

        with ThreadPoolExecutor(max_workers=len(self.engines)) as pool:
            counts = list(pool.map(render_share, self.engines, shares))
        return sum(c[0] for c in counts), sum(c[1] for c in counts)
