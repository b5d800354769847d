"""The full training state, saved every N steps so that a killed run resumes exactly.

A state folder `<state_dir>/<candidate>/step-<step:06d>/` holds the adapter weights (peft keys,
per component), the optimizer and learning-rate scheduler states, every random number
generator (python, numpy, torch CPU and CUDA, and the trainer's own generators: data order,
noise, captions), the data-order position, the cumulative step, the loss history so far and
the validation samples. It is written under a temporary name and renamed into place, so a
process killed at any instant leaves either a complete state or none. A state records the
fingerprint of the configuration, data and model it belongs to; resuming ignores states of a
different run.
"""

from __future__ import annotations

import io
import json
import logging
import os
import random
import re
import shutil
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from charaforge.core.files import atomic_path

log = logging.getLogger(__name__)

ADAPTER_FILE = "adapter.safetensors"
PROGRESS_FILE = "progress.json"
SAMPLES_DIR = "samples"
_STATE_NAME = re.compile(r"^step-(\d{6,})$")

# Test hook: `CHARAFORGE_KILL_AT=<point>:<step>` makes the process SIGKILL itself at that point
# (`step`: right after optimizer step <step>; `save`: halfway through writing the state of
# <step>). The kill-and-resume tests use it to stop a real process at exact places. With
# `CHARAFORGE_KILL_GROUP=1` it goes to the launcher's process group instead (a worker of a
# distributed launch: its parent's group; else its own): the launcher dies at that instant, and
# its workers with it (they die with their launcher, see train.processes).
KILL_ENV = "CHARAFORGE_KILL_AT"
KILL_GROUP_ENV = "CHARAFORGE_KILL_GROUP"


def kill_point(point: str, step: int) -> None:
    """SIGKILL this process (or its group) if the test hook names this point (no-op otherwise)."""
    if os.environ.get(KILL_ENV) == f"{point}:{step}":
        log.warning("%s=%s: killing this process now", KILL_ENV, os.environ[KILL_ENV])
        if os.environ.get(KILL_GROUP_ENV) == "1":
            launched = "WORLD_SIZE" in os.environ
            os.killpg(os.getpgid(os.getppid() if launched else 0), signal.SIGKILL)
        os.kill(os.getpid(), signal.SIGKILL)


@dataclass
class SavedState:
    step: int
    folder: Path
    progress: dict[str, Any]


def capture_rng(generators: dict[str, torch.Generator]) -> dict[str, Any]:
    """Every RNG the step can touch: the global ones (peft dropout draws from torch's) and ours."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "generators": {name: generator.get_state() for name, generator in generators.items()},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any], generators: dict[str, torch.Generator]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    for name, generator in generators.items():
        generator.set_state(state["generators"][name])


def _torch_bytes(payload: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    return buffer.getvalue()


def save_state(
    state_dir: Path,
    step: int,
    adapter: dict[str, torch.Tensor],
    training: dict[str, Any],
    progress: dict[str, Any],
    samples: Path | None = None,
) -> Path:
    """Write one complete state folder atomically; return its path.

    `training` holds the torch-serialised parts (optimizer, scheduler, rng, data order);
    `progress` the JSON parts (step, fingerprint, history).
    """
    from safetensors.torch import save_file

    folder = state_dir / f"step-{step:06d}"
    with atomic_path(folder) as temp:
        temp.mkdir(parents=True)
        save_file(
            {k: v.detach().contiguous() for k, v in adapter.items()}, str(temp / ADAPTER_FILE)
        )
        (temp / "training.pt").write_bytes(_torch_bytes(training))
        kill_point("save", step)
        if samples is not None and samples.is_dir():
            shutil.copytree(samples, temp / SAMPLES_DIR)
        (temp / PROGRESS_FILE).write_text(
            json.dumps({**progress, "step": step}, indent=2, sort_keys=True) + "\n",
            encoding="utf-8",
        )
    return folder


def saved_states(state_dir: Path) -> list[SavedState]:
    """Complete states, oldest first (temporary folders of a killed write are not listed)."""
    states = []
    if not state_dir.is_dir():
        return states
    for folder in state_dir.iterdir():
        match = _STATE_NAME.match(folder.name)
        if match and (folder / PROGRESS_FILE).is_file():
            progress = json.loads((folder / PROGRESS_FILE).read_text(encoding="utf-8"))
            states.append(SavedState(int(match.group(1)), folder, progress))
    return sorted(states, key=lambda state: state.step)


def latest_state_discarding_foreign(state_dir: Path, fingerprint: str) -> SavedState | None:
    """The newest complete state of this very run (same fingerprint), if any.

    Deletes `state_dir` when it holds a state of another run (another configuration, data or
    model): those states can never be resumed, and mixing them with new ones would be wrong.
    """
    states = saved_states(state_dir)
    foreign = [state for state in states if state.progress.get("fingerprint") != fingerprint]
    if foreign:
        log.warning(
            "%s: %d saved state(s) of a different configuration or data; starting afresh",
            state_dir,
            len(foreign),
        )
        shutil.rmtree(state_dir)
        return None
    return states[-1] if states else None


def latest_state(state_dir: Path) -> SavedState | None:
    """The newest complete state in `state_dir`, if any (after the foreign ones are gone)."""
    states = saved_states(state_dir)
    return states[-1] if states else None


def load_training(folder: Path) -> dict[str, Any]:
    # weights_only=False: the state holds python's and numpy's RNG tuples; it is our own file.
    return torch.load(folder / "training.pt", map_location="cpu", weights_only=False)


def load_adapter(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / ADAPTER_FILE))


def clean_stale_temporaries(state_dir: Path) -> None:
    """Remove temporary folders a killed write left behind (atomic_path's `.<name>.*`)."""
    if state_dir.is_dir():
        for folder in state_dir.glob(".step-*"):
            shutil.rmtree(folder, ignore_errors=True)
