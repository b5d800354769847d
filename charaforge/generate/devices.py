"""Where the engine's models live: CharaConsist's four memory modes and their checks."""

from __future__ import annotations

from typing import Any, Literal

import torch

from charaforge.errors import ConfigError

# CharaConsist's four modes: all on one device; whole models moved to the accelerator in turn
# (model offload); layer by layer (sequential offload); the pipeline split over the GPUs.
MEMORY_MODES = ("device", "model_cpu_offload", "sequential_cpu_offload", "balanced")
MemoryMode = Literal["device", "model_cpu_offload", "sequential_cpu_offload", "balanced"]


def check_memory_mode(memory: str, device: torch.device) -> None:
    """Fail before loading anything when a memory mode cannot run on `device` (one line).

    Model offload runs on the CPU too (accelerate's hooks then move nothing, and the bytes are
    those of `device`); sequential offload streams weights to an accelerator and `balanced`
    splits the pipeline over GPUs, so both need CUDA.
    """
    if memory not in MEMORY_MODES:
        raise ConfigError(f"memory: {memory!r} is not one of {MEMORY_MODES}")
    if memory == "sequential_cpu_offload" and device.type == "cpu":
        raise ConfigError(
            "memory: sequential_cpu_offload streams each layer to an accelerator and needs a GPU; "
            "this engine runs on the CPU (use memory=device or model_cpu_offload)"
        )
    if memory == "balanced" and device.type != "cuda":
        raise ConfigError(
            f"memory: balanced splits the pipeline over CUDA GPUs; this engine runs on "
            f"{device.type} (use memory=device or model_cpu_offload)"
        )


def resolve_device(name: str = "auto") -> torch.device:
    """`auto` (CUDA, then MPS, then CPU), or an explicit torch device such as `cuda:1`."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise ConfigError(f"device: {error}") from None
    if device.type == "cuda" and (
        not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()
    ):
        raise ConfigError(f"device: {name} is not available on this machine")
    return device


def apply_memory(pipeline: Any, memory: str, device: torch.device) -> None:
    """accelerate's offload hooks for the offload modes (again after a module is added)."""
    if memory == "model_cpu_offload":
        pipeline.enable_model_cpu_offload(device=device)
    elif memory == "sequential_cpu_offload":
        pipeline.enable_sequential_cpu_offload(device=device)
