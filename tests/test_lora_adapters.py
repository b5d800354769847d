"""Adapter types (train.adapter): DoRA, LoHa and LoKr train through the project's trainer on the
stand-in, and their kohya/LyCORIS files hold the weight change that was trained, computed here
with the tools' own formulas from the file's tensors (not through the export code)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from test_models_train import make_dataset, tiny_train

from charaforge.config import ModelConfig
from charaforge.core.layout import checkpoint_path
from charaforge.generate.engine import GenerationEngine
from charaforge.models.base import load_base_pipeline, write_base
from charaforge.models.lora_files import kohya_file_name
from charaforge.train import train_candidate
from charaforge.train.adapters import attach_lora, load_adapter_state


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="module")
def base_and_data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("adapters")
    write_base(ModelConfig(family="sd15", source="stand_in", resolution=64), root / "base")
    return root / "base", make_dataset(root / "dataset", train_images=2)


def _train(root: Path, base: Path, dataset: Path, adapter: str):
    train = tiny_train(
        max_steps=2, checkpoint_every=2, target_modules="all", adapter=adapter,
        candidates=[{"name": "c", "rank": 4, "alpha": 2, "learning_rate": 5e-2}],
        cache={"latents": True, "text_encoder_outputs": True, "dir": str(root / "cache")},
    )  # fmt: skip
    train_candidate(
        base, dataset, train.candidates[0], train, 64, 3, root / "out", state_dir=root / "state"
    )
    return train, checkpoint_path(root / "out", 2).parent


def _kohya_delta(tensors: dict[str, torch.Tensor], module: str, shape: torch.Size) -> torch.Tensor:
    """A module's weight change as A1111/ComfyUI compute it from LyCORIS keys."""

    def get(name: str) -> torch.Tensor | None:
        return tensors.get(f"{module}.{name}")

    alpha = get("alpha")
    if get("hada_w1_a") is not None:
        rank = get("hada_w1_b").shape[0]
        w1 = get("hada_w1_a") @ get("hada_w1_b")
        w2 = get("hada_w2_a") @ get("hada_w2_b")
        return (w1 * w2 * (float(alpha) / rank)).reshape(shape)
    w1 = get("lokr_w1") if get("lokr_w1") is not None else get("lokr_w1_a") @ get("lokr_w1_b")
    w2 = get("lokr_w2") if get("lokr_w2") is not None else get("lokr_w2_a") @ get("lokr_w2_b")
    # Without .alpha the tools scale by 1; a 4-d w2 (a conv's kernel) gets w1 broadcast over it.
    assert alpha is None
    if w2.ndim == 4:
        w1 = w1[:, :, None, None]
    return torch.kron(w1, w2).reshape(shape)


@pytest.mark.slow
@pytest.mark.parametrize("adapter", ["loha", "lokr"])
def test_lycoris_file_holds_the_trained_weight_change(
    tmp_path: Path, base_and_data: tuple[Path, Path], adapter: str
) -> None:
    base, dataset = base_and_data
    train, folder = _train(tmp_path, base, dataset, adapter)
    tensors = load_file(str(folder / kohya_file_name("c", 2)))
    # The trained adapter, loaded back into peft from the diffusers-layout file.
    pipeline = load_base_pipeline(base)
    attach_lora(pipeline, train.candidates[0], train, seed=3)
    load_adapter_state(pipeline, load_file(str(folder / "pytorch_lora_weights.safetensors")))
    compared = 0
    for name, module in pipeline.unet.named_modules():
        if not hasattr(module, "get_delta_weight"):
            continue
        kohya_name = "lora_unet_" + name.replace(".", "_")
        expected = module.get_delta_weight("default")
        got = _kohya_delta(tensors, kohya_name, expected.shape)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)
        compared += 1
    assert compared > 0 and compared == len({key.partition(".")[0] for key in tensors})
    assert any(t.abs().max() > 0 for k, t in tensors.items() if k.endswith(("w1_a", "lokr_w1")))
    _assert_lycoris_metadata(folder, adapter)


def _assert_lycoris_metadata(folder: Path, algo: str, **extra: str) -> None:
    with safe_open(str(folder / kohya_file_name("c", 2)), "pt") as handle:
        metadata = handle.metadata()
    assert metadata["ss_network_module"] == "lycoris.kohya"
    args = json.loads(metadata["ss_network_args"])
    assert args["algo"] == algo and all(args[key] == value for key, value in extra.items())


@pytest.mark.slow
def test_dora_file_holds_the_trained_weights_on_the_output_axis(
    tmp_path: Path, base_and_data: tuple[Path, Path]
) -> None:
    """DoRA's merged weight, as ComfyUI computes it from an output-axis `dora_scale`:
    dora_scale * (W + alpha / rank * up @ down) / (row norms of the same), equals peft's merge
    of the trained adapter. (diffusers drops `dora_scale` from non-diffusers files, so the
    diffusers-layout file is the one it loads.)"""
    base, dataset = base_and_data
    train, folder = _train(tmp_path, base, dataset, "dora")
    tensors = load_file(str(folder / kohya_file_name("c", 2)))
    _assert_lycoris_metadata(folder, "lora", dora_wd="True")
    pipeline = load_base_pipeline(base)
    attach_lora(pipeline, train.candidates[0], train, seed=3)
    load_adapter_state(pipeline, load_file(str(folder / "pytorch_lora_weights.safetensors")))
    compared = 0
    for name, module in pipeline.unet.named_modules():
        if not hasattr(module, "lora_magnitude_vector"):
            continue
        kohya_name = "lora_unet_" + name.replace(".", "_")
        scale = tensors[f"{kohya_name}.dora_scale"]
        weight = module.base_layer.weight.detach().clone()
        up, down = (
            tensors[f"{kohya_name}.lora_up.weight"],
            tensors[f"{kohya_name}.lora_down.weight"],
        )
        alpha = float(tensors[f"{kohya_name}.alpha"])
        delta = (up.flatten(1) @ down.flatten(1)).reshape(weight.shape) * alpha / down.shape[0]
        combined = weight + delta
        norms = combined.flatten(1).norm(dim=1).reshape(-1, *[1] * (weight.ndim - 1))
        assert scale.shape == norms.shape  # one magnitude per output channel
        expected = scale * combined / norms
        module.merge(adapter_names=["default"])
        torch.testing.assert_close(
            module.base_layer.weight.detach(), expected, rtol=1e-4, atol=1e-6
        )
        compared += 1
    assert compared == len({key.partition(".")[0] for key in tensors}) > 0
    # The engine renders the checkpoint (diffusers' loader reads the DoRA magnitudes).
    engine = GenerationEngine(base)
    engine.load_lora("c-2", folder)
    plain = np.asarray(engine.render("aoi_cf, 1girl", 3, steps=2), dtype=float)
    with_dora = np.asarray(engine.render("aoi_cf, 1girl", 3, loras={"c-2": 1.0}, steps=2))
    assert np.abs(with_dora - plain).max() > 0  # the adapter changes the image
