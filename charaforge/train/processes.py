"""What changes when one candidate trains in N processes (`accelerate launch`, DDP).

The global batch, the data order, the noise and the caption augmentations are drawn once from
the seed, identically on every process (the trainer's generators are seeded alike and every
process draws for the whole global batch); each process then keeps its own contiguous share of
the batch's positions (accelerate's `split_between_processes`). Gradients are averaged by DDP,
so each process weights its mean loss by `share * processes / global`: the averaged gradient is
the gradient of the global batch's mean loss, whatever the split (uneven bucket batches
included). N processes x batch b thus train on exactly the samples 1 process x batch N*b sees,
and the LoRA agrees to float rounding.

Only the main process writes files; `CHARAFORGE_SAMPLE_LOG=<folder>` makes every process append
the samples it trained on to `<folder>/rank-<r>.jsonl` (the multi-process test reads it).
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from charaforge.errors import ConfigError

SAMPLE_LOG_ENV = "CHARAFORGE_SAMPLE_LOG"


@dataclass(frozen=True)
class Share:
    """One process's part of a global batch."""

    positions: list[int]  # positions in the global batch this process trains on
    weight: float  # its mean loss is multiplied by this (0 for a padding sample)

    def take(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor[self.positions]


def batch_share(accelerator: Any, global_size: int) -> Share:
    """This process's contiguous share of a global batch of `global_size` samples.

    A process left without a sample (a small bucket batch) trains on position 0 with weight 0:
    it still joins the gradient all-reduce, and adds nothing to it.
    """
    processes = accelerator.num_processes
    if processes == 1:
        return Share(list(range(global_size)), 1.0)
    with accelerator.split_between_processes(list(range(global_size))) as positions:
        positions = list(positions)
    if not positions:
        return Share([0], 0.0)
    return Share(positions, len(positions) * processes / global_size)


def check_process_count(accelerator: Any, requested: int) -> None:
    """The launcher's process count must be the configured one: it is part of the run."""
    if accelerator.num_processes != requested:
        raise ConfigError(
            f"train.processes: {requested}, but this run was launched with "
            f"{accelerator.num_processes} process(es); set train.processes="
            f"{accelerator.num_processes} or launch {requested}"
        )


def gather_rng(accelerator: Any, state: dict[str, Any]) -> list[dict[str, Any]]:
    """Every process's global RNG state (peft's dropout draws differ per process), rank order."""
    if accelerator.num_processes == 1:
        return [state]
    from accelerate.utils import gather_object

    return list(gather_object([state]))


def log_samples(step: int, rank: int, paths: list[str]) -> None:
    """Append the samples this process trained on at `step` (test hook, see the docstring)."""
    folder = os.environ.get(SAMPLE_LOG_ENV)
    if not folder:
        return
    log_file = Path(folder) / f"rank-{rank}.jsonl"
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with log_file.open("a", encoding="utf-8") as handle:
        handle.write(json.dumps({"step": step, "rank": rank, "samples": paths}) + "\n")


_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_launcher() -> None:
    """In a worker of a distributed launch, get SIGKILLed when the launcher dies.

    torchrun starts each worker in its own session, so a launcher killed with SIGKILL (a
    scheduler ending the job, a user's kill -9) would leave its workers running, writing
    checkpoints beside the resumed run. Linux only; a no-op elsewhere and without a launcher.
    """
    if "WORLD_SIZE" not in os.environ or not sys.platform.startswith("linux"):
        return
    launcher = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != launcher:  # it died before the call
        os.kill(os.getpid(), signal.SIGKILL)


def reset_accelerate_precision(mixed_precision: str) -> None:
    """accelerate keeps one process-wide state and refuses a second Accelerator with another
    precision; one process (tests, a notebook) may train several configurations in turn."""
    from accelerate.state import AcceleratorState

    state = AcceleratorState._shared_state
    if state and str(state.get("_mixed_precision", mixed_precision)) != mixed_precision:
        AcceleratorState._reset_state()


def unprepare(model: torch.nn.Module) -> None:
    # accelerate's `prepare` marks the module as prepared (a second `prepare` skips it) and,
    # under mixed precision, wraps its `forward` in autocast on the instance. The base is reused
    # by the next candidate, whose own Accelerator must prepare it afresh, exactly as a newly
    # loaded one: the validation loss and samples run through that autocast wrapper too.
    model.__dict__.pop("_is_accelerate_prepared", None)
    if model.__dict__.pop("_original_forward", None) is not None:
        model.__dict__.pop("forward", None)
