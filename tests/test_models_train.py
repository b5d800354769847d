"""The base model (stand-in and local real weights) and LoRA training, on real components."""

from __future__ import annotations

import json
import math
from pathlib import Path

import open_clip
import pandas as pd
import pytest
import torch
from PIL import Image, ImageDraw
from safetensors import safe_open

from charaforge.config import ModelConfig, TrainConfig
from charaforge.config.train import CandidateConfig
from charaforge.core.layout import checkpoint_path
from charaforge.errors import ConfigError
from charaforge.models.base import (
    build_clip_tokenizer,
    load_base_pipeline,
    read_base_info,
    write_base,
)
from charaforge.train import train_all, train_candidate
from charaforge.train.adapters import attach_lora

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def make_dataset(root: Path, train_images: int = 4, val_images: int = 2) -> Path:
    """A tiny real dataset: drawn figures on coloured backgrounds, metadata as `dataset` writes."""
    images = root / "images"
    images.mkdir(parents=True)
    rows = []
    for index in range(train_images + val_images):
        image = Image.new("RGB", (96, 80), (40 * index % 255, 120, 200 - 20 * index))
        draw = ImageDraw.Draw(image)
        draw.ellipse((30 + index, 8, 60 + index, 38), fill=(230, 60, 40))
        draw.rectangle((36, 38, 56, 76), fill=(250, 250, 250))
        path = images / f"img{index}.png"
        image.save(path)
        rows.append(
            {
                "image_id": f"{index:016x}",
                "image_path": str(path),
                "caption": f"aoi_cf, 1girl, red hair, pose {index}",
                "split": "train" if index < train_images else "val",
            }
        )
    pd.DataFrame(rows).to_parquet(root / "metadata.parquet")
    return root


def tiny_train(**overrides) -> TrainConfig:
    values = {
        "batch_size": 2,
        "max_steps": 4,
        "checkpoint_every": 2,
        "target_modules": TARGETS,
        "candidates": [
            {"name": "r4", "rank": 4, "alpha": 4, "learning_rate": 1e-3},
            {"name": "r8", "rank": 8, "alpha": 2, "learning_rate": 3e-4},
        ],
    }
    values.update(overrides)
    return TrainConfig.model_validate(values)


STAND_IN = ModelConfig(family="sd15", source="stand_in", resolution=64)


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The trainer's default state and cache folders are relative (data/...): keep them here.
    monkeypatch.chdir(tmp_path)


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


# --- the base model -----------------------------------------------------------------------------


def test_stand_in_builds_byte_identically(base_dir: Path, tmp_path: Path) -> None:
    write_base(STAND_IN, tmp_path / "again")
    first, second = _files(base_dir), _files(tmp_path / "again")
    assert "pipeline/unet/diffusion_pytorch_model.safetensors" in first
    assert first == second
    info = json.loads(first["model.json"])
    assert info == {
        "family": "sd15",
        "source": "stand_in",
        "stand_in": True,
        "path": None,
        "resolution": 64,
    }


def test_stand_in_has_sd15_architecture(base_dir: Path) -> None:
    pipeline = load_base_pipeline(base_dir)
    assert type(pipeline).__name__ == "StableDiffusionPipeline"
    assert pipeline.safety_checker is None
    assert pipeline.vae_scale_factor == 8  # four VAE blocks: latents are 8x smaller
    assert pipeline.unet.config.cross_attention_dim == pipeline.text_encoder.config.hidden_size
    assert pipeline.text_encoder.config.vocab_size == 49408
    # The tokenizer is CLIP's: the same ids as open_clip's reference tokenizer.
    text = "aoi_cf, 1girl, red hair, standing"
    ours = pipeline.tokenizer(text).input_ids
    reference = open_clip.tokenize([text])[0].tolist()
    assert ours == reference[: len(ours)]
    assert pipeline.scheduler.config.beta_schedule == "scaled_linear"


def test_tokenizer_vocabulary_is_clip_sized() -> None:
    tokenizer = build_clip_tokenizer()
    assert len(tokenizer) == 49408
    assert tokenizer.convert_tokens_to_ids(["<|startoftext|>", "<|endoftext|>"]) == [49406, 49407]


def test_pretrained_from_local_folder_and_ai_cache_root(
    base_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    weights = str(base_dir / "pipeline")
    config = ModelConfig(family="sd15", source="pretrained", path=weights, resolution=64)
    write_base(config, tmp_path / "local")
    info = read_base_info(tmp_path / "local")
    assert (info.stand_in, info.path) == (False, weights)
    assert not (tmp_path / "local" / "pipeline").exists()  # a reference, not a copy
    assert load_base_pipeline(tmp_path / "local").unet.config.block_out_channels == [32, 64]

    monkeypatch.setenv("AI_CACHE_ROOT", str(base_dir))
    relative = config.model_copy(update={"path": "pipeline"})
    write_base(relative, tmp_path / "cache")
    assert read_base_info(tmp_path / "cache").path == "pipeline"  # no machine path baked in


def test_missing_pretrained_model_fails_with_one_clear_message(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AI_CACHE_ROOT", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config = ModelConfig(
        family="sd15", source="pretrained", path="nobody/no-such-model", resolution=512
    )
    with pytest.raises(ConfigError, match="not found locally.*Nothing is downloaded"):
        write_base(config, tmp_path / "base")
    assert not (tmp_path / "base").exists()


def test_sdxl_stand_in_has_the_sdxl_architecture(tmp_path: Path) -> None:
    config = ModelConfig(family="sdxl", source="stand_in", resolution=64)
    write_base(config, tmp_path / "base")
    assert read_base_info(tmp_path / "base").family == "sdxl"
    pipeline = load_base_pipeline(tmp_path / "base")
    assert type(pipeline).__name__ == "StableDiffusionXLPipeline"
    assert type(pipeline.text_encoder).__name__ == "CLIPTextModel"
    assert type(pipeline.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
    assert pipeline.vae_scale_factor == 8
    unet = pipeline.unet.config
    # Cross-attention over both encoders' hidden states side by side; the pooled projection
    # plus six time ids feed the `text_time` embedding, as in SDXL.
    hidden = pipeline.text_encoder.config.hidden_size + pipeline.text_encoder_2.config.hidden_size
    assert unet.cross_attention_dim == hidden
    assert unet.addition_embed_type == "text_time"
    assert unet.projection_class_embeddings_input_dim == (
        6 * unet.addition_time_embed_dim + pipeline.text_encoder_2.config.projection_dim
    )
    assert pipeline.tokenizer_2.pad_token == "!"
    image = pipeline(
        "aoi_cf", num_inference_steps=2, height=64, width=64,
        generator=torch.Generator("cpu").manual_seed(0),
    ).images[0]  # fmt: skip
    assert image.size == (64, 64)
    # Byte-identical from the same seed, like the SD1.5 stand-in.
    write_base(config, tmp_path / "again")
    assert _files(tmp_path / "base") == _files(tmp_path / "again")


# --- training -----------------------------------------------------------------------------------


def test_training_writes_checkpoints_and_is_byte_identical(
    base_dir: Path, dataset_dir: Path, tmp_path: Path
) -> None:
    train = tiny_train()
    runs = []
    for name in ("a", "b"):
        results = train_all(
            base_dir,
            dataset_dir,
            train,
            64,
            1234,
            tmp_path / name / "train",
            tmp_path / name / "plots",
            state_dir=tmp_path / name / "state",
        )
        runs.append(tmp_path / name)
        for result in results:
            assert result.checkpoints == [2, 4]
            assert all(math.isfinite(loss) for loss in result.history["loss"])
    first, second = _files(runs[0]), _files(runs[1])
    assert first == second
    assert "train/r4/checkpoint-2/pytorch_lora_weights.safetensors" in first
    assert "train/r8/checkpoint-4/pytorch_lora_weights.safetensors" in first

    summary = json.loads(first["train/summary.json"])
    assert summary["stand_in"] is True
    assert [c["name"] for c in summary["candidates"]] == ["r4", "r8"]
    assert summary["candidates"][1]["alpha"] == 2.0
    # round_trip: pandas' default float parser may miss the last bit of what was written.
    history = pd.read_csv(runs[0] / "train" / "r4" / "history.csv", float_precision="round_trip")
    assert list(history.columns) == ["step", "loss", "learning_rate", "grad_norm", "val_loss"]
    assert history["step"].tolist() == [1, 2, 3, 4]
    # Validation loss at each checkpoint, on the val split.
    assert history["val_loss"].notna().tolist() == [False, True, False, True]
    assert summary["candidates"][0]["val_loss"] == history["val_loss"].dropna().tolist()
    assert summary["candidates"][0]["final_loss"] == history["loss"].iloc[-1]
    plot = pd.read_csv(runs[0] / "plots" / "r4.csv")
    assert list(plot.columns) == ["step", "loss"]

    # The weights moved, and the files carry the adapter config (alpha) for loaders.
    with safe_open(checkpoint_path(runs[0] / "train" / "r8", 4), "pt") as handle:
        names = list(handle.keys())  # safe_open handles are not iterable
        ups = [handle.get_tensor(name) for name in names if "lora_B" in name]
        metadata = json.loads(handle.metadata()["lora_adapter_metadata"])
    assert any(bool(up.abs().sum() > 0) for up in ups)
    assert metadata["unet.r"] == 8 and metadata["unet.lora_alpha"] == 2.0


def test_zero_learning_rate_keeps_the_lora_at_init_and_the_loss_at_the_base(
    base_dir: Path, dataset_dir: Path, tmp_path: Path
) -> None:
    train = tiny_train(max_steps=3, checkpoint_every=3)
    results = {}
    for rank in (2, 8):
        # Same name, so the same batches and noise: only the (inactive) LoRA differs.
        candidate = CandidateConfig(name="frozen", rank=rank, alpha=rank, learning_rate=0.0)
        results[rank] = train_candidate(
            base_dir, dataset_dir, candidate, train, 64, 7, tmp_path / f"r{rank}"
        )
    # lora_B starts at zero (gaussian init), so the UNet is the base: the loss cannot depend on
    # the rank, and nothing may move with learning rate 0.
    assert results[2].history["loss"].tolist() == results[8].history["loss"].tolist()
    # The validation problem is fixed (not per candidate): the base model scores the same.
    assert results[2].val_loss == results[8].val_loss and len(results[2].val_loss) == 1
    other = CandidateConfig(name="other", rank=4, alpha=4, learning_rate=0.0)
    assert (
        train_candidate(base_dir, dataset_dir, other, train, 64, 7, tmp_path / "other").val_loss
        == results[2].val_loss
    )

    pipeline = load_base_pipeline(base_dir)
    unet = pipeline.unet
    candidate = CandidateConfig(name="frozen", rank=8, alpha=8, learning_rate=0.0)
    attach_lora(pipeline, candidate, train, seed=7)
    with safe_open(checkpoint_path(tmp_path / "r8", 3), "pt") as handle:
        names = list(handle.keys())
        saved = {name: handle.get_tensor(name) for name in names}
    initial = {name: p.detach() for name, p in unet.named_parameters() if "lora_A" in name}
    assert len(initial) == sum("lora_A" in key for key in saved) > 0
    for name, weight in initial.items():
        key = "unet." + name.replace(".lora_A.default.weight", ".lora_A.weight")
        assert torch.equal(saved[key], weight)
    assert all(not saved[key].any() for key in saved if "lora_B" in key)


def test_config_that_cannot_train_fails_before_any_work(
    base_dir: Path, dataset_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "train"
    too_big = tiny_train(candidates=[{"name": "big", "rank": 64, "alpha": 64, "learning_rate": 1}])
    with pytest.raises(ConfigError, match=r"candidates\[big\]\.rank: 64 is larger"):
        train_all(base_dir, dataset_dir, too_big, 64, 0, out, tmp_path / "plots")
    no_match = tiny_train(target_modules=["to_q", "to_nothing"])
    with pytest.raises(ConfigError, match="'to_nothing' matches no"):
        train_all(base_dir, dataset_dir, no_match, 64, 0, out, tmp_path / "plots")
    only_val = make_dataset(tmp_path / "only_val", train_images=0, val_images=2)
    with pytest.raises(ConfigError, match="no rows with split == 'train'"):
        train_all(base_dir, only_val, tiny_train(), 64, 0, out, tmp_path / "plots")
    assert not out.exists() and not (tmp_path / "plots").exists()
