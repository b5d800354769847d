"""Starting the train stage in `train.processes` processes: `accelerate launch` of the same stage
module, on the configured GPUs (or CPU processes over gloo on a machine without one).

The stage calls `relaunch_if_needed` first: with `train.processes > 1` and no launcher around it,
it runs `accelerate launch --multi_gpu --num_processes N -m stages.train` and exits with its status,
so `dvc repro` and `dvc exp run` need no other command. Under a launcher (torchrun, accelerate,
srun with the accelerate env) it does nothing; the trainer then checks that the launched process
count is the configured one.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys

from charaforge.config import TrainConfig
from charaforge.errors import ConfigError

log = logging.getLogger(__name__)

# Set by every launcher we support (torchrun, accelerate launch, torch.distributed.run).
LAUNCHED_ENV = "WORLD_SIZE"
RELAUNCHED_ENV = "CHARAFORGE_RELAUNCHED"


def is_launched() -> bool:
    """True inside a process started by a distributed launcher."""
    return LAUNCHED_ENV in os.environ


def is_main_process() -> bool:
    """Rank 0, or no launcher at all: the process that writes outputs and logs to MLflow."""
    return os.environ.get("RANK", "0") == "0"


def gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def check_devices(train: TrainConfig, available: int | None = None) -> list[int] | None:
    """The GPU ids the processes run on, or None for CPU processes.

    Asking for more GPUs than the machine has is a configuration error, named by key.
    """
    available = gpu_count() if available is None else available
    if train.devices is not None:
        missing = [device for device in train.devices if device >= available]
        if missing:
            raise ConfigError(
                f"train.devices: GPU(s) {missing} asked for, but this machine has "
                f"{available} GPU(s)"
            )
        return train.devices[: train.processes]
    if available == 0:
        return None  # CPU processes (gloo)
    if train.processes > available:
        raise ConfigError(
            f"train.processes: {train.processes} processes asked for, but this machine has "
            f"{available} GPU(s) (set train.processes <= {available})"
        )
    return list(range(train.processes))


def free_local_port() -> int:
    """A TCP port free on 127.0.0.1 now (the kernel's choice)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def launch_command(train: TrainConfig, module: str, devices: list[int] | None) -> list[str]:
    """The `accelerate launch` command line for `python -m <module>` in N processes."""
    command = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--num_processes", str(train.processes), "--num_machines", "1",
        "--mixed_precision", train.mixed_precision, "--dynamo_backend", "no",
        # One machine: its own rendezvous port, not torchrun's fixed 29500, so two trainings
        # (or a training and a test) on the same machine do not take each other's port.
        "--main_process_port", str(free_local_port()),
    ]  # fmt: skip
    # `--multi_gpu` is accelerate's torchrun launcher, also for CPU processes (gloo) on a
    # machine without a GPU; its `--cpu` starts a single process whatever --num_processes says.
    command.append("--multi_gpu")
    if devices is not None:
        command += ["--gpu_ids", ",".join(str(d) for d in devices)]
    return [*command, "-m", module]


def relaunch_if_needed(train: TrainConfig, module: str) -> None:
    """Re-run this stage under `accelerate launch` when it asks for several processes; exits
    with the launcher's status. Returns (does nothing) with one process or under a launcher."""
    if train.processes == 1 or is_launched():
        return
    if os.environ.get(RELAUNCHED_ENV):
        # Never launch again from a launched process: a launcher that started one plain
        # process would otherwise recurse.
        raise ConfigError(
            f"train.processes: {train.processes}, but the launcher started a single process"
        )
    devices = check_devices(train)
    command = launch_command(train, module, devices)
    where = f"GPUs {devices}" if devices else "CPU (gloo)"
    log.info("train: %d processes on %s: %s", train.processes, where, " ".join(command))
    raise SystemExit(subprocess.call(command, env={**os.environ, RELAUNCHED_ENV: "1"}))
