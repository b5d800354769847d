"""The exported LoRA files: both formats load through diffusers' `load_lora_weights` and render
the same image, and the kohya file follows the A1111/ComfyUI conventions (SD1 and SDXL)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from test_models_train import make_dataset, tiny_train

from charaforge.config import ModelConfig
from charaforge.core.layout import checkpoint_path
from charaforge.models.base import load_base_pipeline, write_base
from charaforge.models.lora_files import kohya_file_name
from charaforge.train import RunContext, train_candidate

PREFIXES = {"sd15": ("lora_unet_", "lora_te_"), "sdxl": ("lora_unet_", "lora_te1_", "lora_te2_")}


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("dataset") / "dataset", train_images=2)


@pytest.fixture(scope="module", params=["sd15", "sdxl"])
def trained(request, tmp_path_factory: pytest.TempPathFactory, dataset_dir: Path) -> dict:
    """A LoRA on every layer kind (attention, feed-forward, convs) and the text encoder(s), with
    alpha != rank so a wrong alpha would show."""
    family = request.param
    root = tmp_path_factory.mktemp(family)
    write_base(ModelConfig(family=family, source="stand_in", resolution=64), root / "base")
    train = tiny_train(
        max_steps=2,
        checkpoint_every=2,
        target_modules="all",
        text_encoder_lora=True,
        candidates=[
            {
                "name": "c",
                "rank": 4,
                "alpha": 2,
                "learning_rate": 5e-2,
                "text_encoder_learning_rate": 1e-2,
            }
        ],
        cache={"latents": True, "text_encoder_outputs": False, "dir": str(root / "cache")},
    )
    context = RunContext(trigger="aoi_cf", git_commit="0123abc")
    train_candidate(
        root / "base", dataset_dir, train.candidates[0], train, 64, 3, root / "out",
        state_dir=root / "state", context=context,
    )  # fmt: skip
    folder = checkpoint_path(root / "out", 2).parent
    return {"family": family, "base": root / "base", "folder": folder}


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The trainer's default state and cache folders are relative (data/...): keep them here.
    monkeypatch.chdir(tmp_path)


def _render(pipeline, lora: Path | None) -> np.ndarray:
    if lora is not None:
        pipeline.load_lora_weights(str(lora))
    generator = torch.Generator("cpu").manual_seed(11)
    image = pipeline(
        "aoi_cf, 1girl", num_inference_steps=2, generator=generator, height=64, width=64,
        output_type="np",
    ).images[0]  # fmt: skip
    if lora is not None:
        pipeline.unload_lora_weights()
    return image


def test_both_formats_load_through_diffusers_and_render_identically(trained: dict) -> None:
    pipeline = load_base_pipeline(trained["base"])
    base = _render(pipeline, None)
    diffusers_image = _render(pipeline, trained["folder"] / "pytorch_lora_weights.safetensors")
    kohya_image = _render(pipeline, trained["folder"] / kohya_file_name("c", 2))
    assert np.abs(diffusers_image - base).max() > 1e-3  # the LoRA does something
    np.testing.assert_allclose(kohya_image, diffusers_image, rtol=0, atol=1e-6)
    # And the base comes back once unloaded.
    np.testing.assert_array_equal(_render(pipeline, None), base)


def test_kohya_keys_alpha_and_metadata_follow_the_conventions(trained: dict) -> None:
    family = trained["family"]
    with safe_open(str(trained["folder"] / kohya_file_name("c", 2)), "pt") as handle:
        keys = list(handle.keys())
        tensors = {key: handle.get_tensor(key) for key in keys}
        metadata = handle.metadata()
    modules = {
        key.rsplit(".", 2)[0] if key.endswith(".weight") else key.rsplit(".", 1)[0] for key in keys
    }
    for module in modules:
        assert module.startswith(PREFIXES[family]), module
        assert re.fullmatch(r"lora_(unet|te|te1|te2)_[A-Za-z0-9_]+", module), module
        assert f"{module}.lora_down.weight" in tensors and f"{module}.lora_up.weight" in tensors
        assert float(tensors[f"{module}.alpha"]) == 2.0  # the trained alpha, not the rank
        assert tensors[f"{module}.lora_down.weight"].shape[0] == 4
    for prefix in PREFIXES[family]:
        assert any(module.startswith(prefix) for module in modules), prefix
    # Attention, feed-forward and resnet convs (4-d weights) are all there.
    assert any(module.endswith("attn1_to_q") for module in modules)
    assert any(module.endswith("ff_net_2") for module in modules)
    assert any(tensors[f"{m}.lora_down.weight"].ndim == 4 for m in modules)
    expected_version = {"sd15": "sd_v1", "sdxl": "sdxl_base_v1-0"}[family]
    assert metadata["ss_base_model_version"] == expected_version
    assert metadata["ss_network_dim"] == "4" and metadata["ss_network_alpha"] == "2"
    assert metadata["ss_output_name"] == "c"
    assert metadata["modelspec.architecture"].endswith("/lora")
    assert metadata["modelspec.trigger_phrase"] == "aoi_cf"
    assert metadata["ss_text_encoder_lr"] == "0.01" and metadata["ss_unet_lr"] == "0.05"
    assert metadata["charaforge.git_commit"] == "0123abc"
    assert metadata["charaforge.stand_in"] == "true"
    assert len(metadata["charaforge.data_hash"]) == len(metadata["charaforge.config_hash"]) == 16
    assert json.loads(metadata["ss_tag_frequency"])["train"]["aoi_cf"] == 2


def test_diffusers_file_carries_each_components_adapter_config(trained: dict) -> None:
    with safe_open(str(trained["folder"] / "pytorch_lora_weights.safetensors"), "pt") as handle:
        keys = list(handle.keys())
        config = json.loads(handle.metadata()["lora_adapter_metadata"])
    assert config["unet.r"] == 4 and config["unet.lora_alpha"] == 2
    assert config["text_encoder.lora_alpha"] == 2
    assert any(key.startswith("text_encoder.") for key in keys)
    if trained["family"] == "sdxl":
        assert any(key.startswith("text_encoder_2.") for key in keys)
        assert config["text_encoder_2.r"] == 4
