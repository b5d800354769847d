"""Resize a kohya LoRA file to a lower rank by SVD, as kohya's resize tool does.

Each module's weight change (alpha / rank * up @ down, convolutions flattened) is replaced by its
best rank-k approximation (Eckart-Young: the k largest singular values), split evenly between the
new up and down factors, with alpha = k so the tools apply it at scale 1. What each module keeps
is reported as the retained energy: the share of the squared singular values (Frobenius norm).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from charaforge.core.files import atomic_path
from charaforge.models.lora_files import save_safetensors


@dataclass(frozen=True)
class ResizeReport:
    rank: int
    modules: int
    # Retained energy over all modules (sum of kept / all squared singular values), and the
    # smallest of any one module.
    retained_energy: float
    min_retained_energy: float


def resize_state(
    tensors: dict[str, torch.Tensor], rank: int
) -> tuple[dict[str, torch.Tensor], ResizeReport]:
    """The kohya state dict at rank `rank` (modules already at or below it are re-factored too)."""
    modules = sorted(
        key.removesuffix(".lora_down.weight")
        for key in tensors
        if key.endswith(".lora_down.weight")
    )
    if not modules:
        raise ValueError("no LoRA modules (lora_down/lora_up) to resize; LoHa/LoKr are not resized")
    resized = {
        key: value
        for key, value in tensors.items()
        if not key.startswith(tuple(f"{m}." for m in modules))
    }
    kept_total = energy_total = 0.0
    smallest = 1.0
    for module in modules:
        down = tensors[f"{module}.lora_down.weight"].double()
        up = tensors[f"{module}.lora_up.weight"].double()
        old_rank = down.shape[0]
        alpha = tensors.get(f"{module}.alpha")
        scale = (float(alpha) if alpha is not None else old_rank) / old_rank
        delta = up.flatten(1) @ down.flatten(1) * scale
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        k = min(rank, s.numel())
        root = s[:k].sqrt()
        new_up = (u[:, :k] * root).reshape(up.shape[0], k, *up.shape[2:])
        new_down = (root[:, None] * vh[:k]).reshape(k, *down.shape[1:])
        dtype = tensors[f"{module}.lora_down.weight"].dtype
        resized[f"{module}.lora_up.weight"] = new_up.to(dtype).contiguous()
        resized[f"{module}.lora_down.weight"] = new_down.to(dtype).contiguous()
        resized[f"{module}.alpha"] = torch.tensor(float(k), dtype=torch.float32)
        energy = float((s**2).sum())
        kept = float((s[:k] ** 2).sum())
        kept_total, energy_total = kept_total + kept, energy_total + energy
        smallest = min(smallest, kept / energy if energy > 0 else 1.0)
    report = ResizeReport(
        rank=rank,
        modules=len(modules),
        retained_energy=kept_total / energy_total if energy_total > 0 else 1.0,
        min_retained_energy=smallest,
    )
    return {key: resized[key] for key in sorted(resized)}, report


def resize_file(source: str | Path, destination: str | Path, rank: int) -> ResizeReport:
    """Write `source` resized to `rank` as `destination` (metadata kept, dim/alpha updated)."""
    from safetensors.torch import load_file, safe_open

    if rank < 1:
        raise ValueError(f"rank must be at least 1, got {rank}")
    with safe_open(str(source), "pt") as handle:
        metadata = dict(handle.metadata() or {})
    tensors, report = resize_state(load_file(str(source)), rank)
    metadata.update(ss_network_dim=str(rank), ss_network_alpha=str(rank))
    for stale in ("sshs_model_hash", "sshs_legacy_hash"):  # they describe the old tensors
        metadata.pop(stale, None)
    metadata["ss_output_name"] = Path(destination).stem
    with atomic_path(Path(destination)) as temp:
        save_safetensors(temp, tensors, metadata)
    return report
