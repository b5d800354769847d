"""Merging a LoRA into the base, and the engine rendering LoHa/LoKr adapters.

The adapters are attached to the stand-in by the project's `attach_lora` (UNet `all` preset and
the text encoder), given seeded random weights, and exported by the project's exporter. The
merged single file is read back by diffusers' own single-file converter (`from_single_file`,
not our mapping), the diffusers folder by `from_pretrained`; each renders, through the same
engine, what the engine renders with the LoRA loaded at that scale. LoHa/LoKr as loaded by the
engine render what peft's own model (attached by the training code, scaled by peft) renders.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import get_peft_model_state_dict
from safetensors import safe_open
from typer.testing import CliRunner

from charaforge.cli import app
from charaforge.config import ModelConfig, TrainConfig
from charaforge.generate.engine import GenerationEngine
from charaforge.generate.merge import merge_lora
from charaforge.models.base import load_base_pipeline, pipeline_location, write_base
from charaforge.models.lora_files import LoraExport, kohya_file_name, write_lora_files
from charaforge.models.sgm_names import UnetLayout
from charaforge.train.adapters import attach_lora, load_adapter_state

PROMPT, SEED, STEPS = "aoi_cf, 1girl, red hair", 3, 2
COMPONENTS = ("unet", "vae", "text_encoder")


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.set_num_threads(1)
    folder = tmp_path_factory.mktemp("merge") / "base"
    write_base(ModelConfig(family="sd15", source="stand_in", resolution=64), folder)
    return folder


def _train_config(adapter: str) -> TrainConfig:
    return TrainConfig(
        batch_size=1, max_steps=1, checkpoint_every=1, target_modules="all",
        text_encoder_lora=True, adapter=adapter, cache={"text_encoder_outputs": False},
        candidates=[{"name": "c", "rank": 4, "alpha": 2, "learning_rate": 1e-4}],
    )  # fmt: skip


def _export(base: Path, folder: Path, adapter: str) -> tuple[Path, TrainConfig, dict]:
    """A checkpoint folder (both files) of an adapter with seeded random weights."""
    train = _train_config(adapter)
    pipeline = load_base_pipeline(base)
    configs = attach_lora(pipeline, train.candidates[0], train, seed=0)
    generator = torch.Generator().manual_seed(1)
    states = {
        name: {
            key: 0.3 * torch.randn(value.shape, generator=generator)
            for key, value in get_peft_model_state_dict(getattr(pipeline, name)).items()
        }
        for name in configs
    }
    export = LoraExport(
        family="sd15", name="c", step=1, rank=4, alpha=2.0,
        configs={name: config.to_dict() for name, config in configs.items()},
        unet_layout=UnetLayout.from_config(pipeline.unet.config),
    )  # fmt: skip
    folder.mkdir(parents=True)
    write_lora_files(folder, export, states, resolution=64)
    flat = {
        f"{name}.{key}": value for name, state in states.items() for key, value in state.items()
    }
    return folder, train, flat


def _pixels(engine: GenerationEngine, **options: object) -> np.ndarray:
    return np.asarray(engine.render(PROMPT, SEED, steps=STEPS, **options), dtype=float)


def _rendered_by(base: Path, pipeline: object) -> np.ndarray:
    """What a fresh engine renders with another pipeline's models (no LoRA loaded)."""
    engine = GenerationEngine(base, device="cpu")
    for name in COMPONENTS:
        setattr(engine.pipeline, name, getattr(pipeline, name))
    return _pixels(engine)


@pytest.mark.slow
@pytest.mark.parametrize("adapter", ["lora", "loha"])
def test_merged_model_renders_base_plus_lora_at_the_scale(
    tmp_path: Path, base: Path, adapter: str
) -> None:
    folder, _, _ = _export(base, tmp_path / "checkpoint-1", adapter)
    scale = 0.7
    engine = GenerationEngine(base, device="cpu")
    plain = _pixels(engine)
    engine.load_lora("c", folder)
    expected = _pixels(engine, loras={"c": scale})
    at_one = _pixels(engine, loras={"c": 1.0})
    engine.unload_lora("c")
    assert np.abs(expected - plain).max() > 20  # the LoRA changes the image a lot

    result = merge_lora(base, folder, tmp_path / "merged", scale=scale)
    assert result.checkpoint.name == kohya_file_name("c", 1).replace(".", "-merged.", 1)
    assert result.changed_modules > 50  # UNet and text-encoder weights took the delta
    single = StableDiffusionPipeline.from_single_file(
        str(result.checkpoint), config=str(pipeline_location(base)),
        safety_checker=None, requires_safety_checker=False,
    )  # fmt: skip
    folder_pipeline = StableDiffusionPipeline.from_pretrained(result.diffusers_dir)
    for merged in (single, folder_pipeline):
        got = _rendered_by(base, merged)
        # Float rounding of W + s * dW against W x + s * dW x: at most one grey level here.
        assert np.abs(got - expected).max() <= 2, np.abs(got - expected).max()
        assert np.abs(got - at_one).max() > 5  # the scale was merged, not 1
    with safe_open(str(result.checkpoint), "pt") as handle:
        keys = set(handle.keys())
        metadata = handle.metadata()
    assert metadata["charaforge.merged_lora_scale"] == "0.7"
    assert metadata["charaforge.merged_lora"] == "c-000001"
    # Every weight of the three models is in the file, under the original layout's prefixes.
    sizes = sum(len(getattr(single, name).state_dict()) for name in COMPONENTS)
    assert len(keys) == sizes == result.tensors
    assert {key.split(".")[0] for key in keys} == {"model", "first_stage_model", "cond_stage_model"}
    assert "model.diffusion_model.input_blocks.1.1.proj_in.weight" in keys
    assert "cond_stage_model.transformer.text_model.final_layer_norm.weight" in keys
    assert "first_stage_model.decoder.up.0.block.0.conv1.weight" in keys


@pytest.mark.slow
@pytest.mark.parametrize("adapter", ["loha", "lokr"])
def test_engine_renders_loha_and_lokr_as_peft_does(
    tmp_path: Path, base: Path, adapter: str
) -> None:
    folder, train, weights = _export(base, tmp_path / "checkpoint-1", adapter)
    engine = GenerationEngine(base, device="cpu")
    plain = _pixels(engine)
    engine.load_lora("c", folder)
    # peft's own model: the training code's adapters, the file's weights, peft's scaling.
    reference = GenerationEngine(base, device="cpu")
    attach_lora(reference.pipeline, train.candidates[0], train, seed=0)
    load_adapter_state(reference.pipeline, weights)
    for scale in (1.0, 0.5):
        for name in ("unet", "text_encoder"):
            for module in getattr(reference.pipeline, name).modules():
                if isinstance(module, BaseTunerLayer):
                    module.set_scale("default", scale)
        got = _pixels(engine, loras={"c": scale})
        assert np.abs(got - plain).max() > 20  # the adapter is applied
        assert np.abs(got - _pixels(reference)).max() <= 1
    # Switched off for a request without it, and unloaded to the exact base.
    assert np.array_equal(_pixels(engine), plain)
    engine.unload_lora("c")
    assert np.array_equal(_pixels(engine), plain)


def test_lycoris_kohya_file_is_refused_with_one_line(tmp_path: Path, base: Path) -> None:
    folder, _, _ = _export(base, tmp_path / "checkpoint-1", "loha")
    engine = GenerationEngine(base, device="cpu")
    with pytest.raises(ValueError, match="LyCORIS"):
        engine.load_lora("c", folder / kohya_file_name("c", 1))


def test_lora_merge_command(tmp_path: Path, base: Path) -> None:
    folder, _, _ = _export(base, tmp_path / "checkpoint-1", "lora")
    runner = CliRunner()
    args = ["lora-merge", str(folder), str(tmp_path / "out"), "--base", str(base)]
    result = runner.invoke(app, [*args, "--scale", "0.5"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out" / "c-000001-merged.safetensors").is_file()
    assert (tmp_path / "out" / "diffusers" / "model_index.json").is_file()
    missing = runner.invoke(app, ["lora-merge", str(tmp_path / "nope"), str(tmp_path / "o2"),
                                  "--base", str(base)])  # fmt: skip
    assert missing.exit_code == 2 and "Traceback" not in missing.output
    assert not (tmp_path / "o2" / "diffusers").exists()
