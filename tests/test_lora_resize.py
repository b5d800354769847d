"""Resizing a LoRA by SVD: the resized weight change is the best rank-k approximation (its error
equals the tail of numpy's singular values), the error falls as the rank grows, the reported
energy is numpy's, and the CLI writes the file or fails with a one-line error."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from charaforge.cli import app
from charaforge.models.lora_resize import resize_file

RANK, ALPHA = 8, 4.0


def _write_lora(path: Path) -> dict[str, np.ndarray]:
    """A kohya file with a Linear and a Conv2d module; their weight changes, computed here."""
    generator = torch.Generator().manual_seed(0)
    shapes = {
        "lora_unet_a_to_q": ((40, RANK), (RANK, 24)),
        "lora_unet_b_conv1": ((16, RANK, 1, 1), (RANK, 8, 3, 3)),
    }
    tensors, deltas = {}, {}
    for module, (up_shape, down_shape) in shapes.items():
        up = torch.randn(up_shape, generator=generator)
        down = torch.randn(down_shape, generator=generator)
        tensors |= {f"{module}.lora_up.weight": up, f"{module}.lora_down.weight": down}
        tensors[f"{module}.alpha"] = torch.tensor(ALPHA)
        deltas[module] = (
            up.reshape(up.shape[0], -1).numpy() @ down.reshape(RANK, -1).numpy() * ALPHA / RANK
        )
    save_file(tensors, str(path), metadata={"ss_network_dim": str(RANK), "ss_output_name": "x"})
    return deltas


def _delta(tensors: dict[str, torch.Tensor], module: str) -> np.ndarray:
    up = tensors[f"{module}.lora_up.weight"]
    down = tensors[f"{module}.lora_down.weight"]
    rank = down.shape[0]
    scale = float(tensors[f"{module}.alpha"]) / rank
    return (
        up.reshape(up.shape[0], -1).double().numpy()
        @ down.reshape(rank, -1).double().numpy()
        * scale
    )


def test_resize_is_the_best_low_rank_approximation(tmp_path: Path) -> None:
    deltas = _write_lora(tmp_path / "x.safetensors")
    errors = []
    for rank in (1, 2, 4, 8):
        report = resize_file(tmp_path / "x.safetensors", tmp_path / f"x-r{rank}.safetensors", rank)
        resized = load_file(str(tmp_path / f"x-r{rank}.safetensors"))
        kept = total = 0.0
        error = 0.0
        for module, delta in deltas.items():
            singular = np.linalg.svd(delta, compute_uv=False)
            got = _delta(resized, module)
            assert resized[f"{module}.lora_down.weight"].shape[0] == rank
            # Eckart-Young: the best rank-k error is the norm of the dropped singular values.
            np.testing.assert_allclose(
                np.linalg.norm(got - delta), np.sqrt((singular[rank:] ** 2).sum()), atol=1e-4
            )
            kept, total = kept + (singular[:rank] ** 2).sum(), total + (singular**2).sum()
            error += np.linalg.norm(got - delta) ** 2
        assert report.retained_energy == pytest.approx(kept / total, rel=1e-6)
        errors.append(np.sqrt(error))
        with safe_open(str(tmp_path / f"x-r{rank}.safetensors"), "pt") as handle:
            metadata = handle.metadata()
        assert metadata["ss_network_dim"] == str(rank)
        assert metadata["ss_output_name"] == f"x-r{rank}"
    assert errors == sorted(errors, reverse=True) and errors[0] > errors[-1]
    assert errors[-1] < 1e-4  # rank 8 of a rank-8 LoRA is exact


def test_cli_resizes_and_fails_with_a_clear_error(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    _write_lora(tmp_path / "x.safetensors")
    args = ["lora-resize", str(tmp_path / "x.safetensors"), str(tmp_path / "y.safetensors")]
    result = CliRunner().invoke(app, [*args, "--rank", "2"])
    assert result.exit_code == 0, result.output
    assert "energy retained" in caplog.text
    resized = load_file(str(tmp_path / "y.safetensors"))
    assert resized["lora_unet_a_to_q.lora_down.weight"].shape[0] == 2
    args[1] = str(tmp_path / "none.safetensors")
    missing = CliRunner().invoke(app, [*args, "--rank", "2"])
    assert (
        missing.exit_code == 2
        and missing.exception is None
        or isinstance(missing.exception, SystemExit)
    )
