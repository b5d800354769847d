"""Trainer options on the tiny stand-in: learnability, caches, buckets, captions, optimizers and
precision, and the configurations that must fail before any work."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch
from PIL import Image
from pydantic import ValidationError
from safetensors.torch import load_file
from test_models_train import make_dataset, tiny_train

from charaforge.config import ModelConfig, TrainConfig
from charaforge.config.train import CandidateConfig
from charaforge.core.layout import checkpoint_path
from charaforge.errors import ConfigError
from charaforge.models.base import write_base
from charaforge.train import train_all, train_candidate
from charaforge.train.data import DataOrder, augment_caption, bucket_sizes, plan_items, read_split


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The trainer's default state and cache folders are relative (data/...): keep them here.
    monkeypatch.chdir(tmp_path)


def _one(name: str = "c", rank: int = 8, lr: float = 1e-2) -> list[dict]:
    return [{"name": name, "rank": rank, "alpha": rank, "learning_rate": lr}]


# --- learnability ------------------------------------------------------------------------------


# The margin: after 16 steps the validation loss must be at most 80% of its step-0 value (on
# this data and seed it reaches about 40%); with learning rate 0 it must not move at all.
LEARN_MARGIN = 0.8


def test_lora_learns_the_data_and_not_with_learning_rate_zero(
    base_dir: Path, dataset_dir: Path, tmp_path: Path
) -> None:
    train = tiny_train(max_steps=16, checkpoint_every=16, target_modules="all")
    learned = train_candidate(
        base_dir, dataset_dir, CandidateConfig(**_one()[0]), train, 64, 1, tmp_path / "a"
    )
    assert learned.initial_val_loss is not None
    assert learned.val_loss[-1] < LEARN_MARGIN * learned.initial_val_loss, learned.val_loss
    frozen = train_candidate(
        base_dir, dataset_dir, CandidateConfig(**_one("z", lr=0.0)[0]), train, 64, 1, tmp_path / "z"
    )
    # The validation problem is the same for both (fixed noise and timesteps, shared by all
    # candidates), so the step-0 values agree and LR 0 stays exactly there.
    assert frozen.initial_val_loss == learned.initial_val_loss
    assert frozen.val_loss[-1] == frozen.initial_val_loss


# --- caches -------------------------------------------------------------------------------------


def test_caches_change_nothing_and_are_invalidated_exactly(
    base_dir: Path, dataset_dir: Path, tmp_path: Path
) -> None:
    candidate = CandidateConfig(**_one(lr=1e-3)[0])
    weights = {}
    for latents, text in ((False, False), (True, True), (True, True)):
        cache = {"latents": latents, "text_encoder_outputs": text, "dir": str(tmp_path / "cache")}
        train = tiny_train(max_steps=2, checkpoint_every=2, cache=cache)
        out = tmp_path / f"run{len(weights)}"
        train_candidate(base_dir, dataset_dir, candidate, train, 64, 1, out, state_dir=out / "s")
        weights[len(weights)] = checkpoint_path(out, 2).read_bytes()
    # Uncached, cached from scratch and cached from a warm cache: the same LoRA bytes.
    assert weights[0] == weights[1] == weights[2]
    latent_entries = sorted((tmp_path / "cache" / "latents").rglob("*.safetensors"))
    assert len(latent_entries) == 6  # 4 train + 2 val images, one entry each

    # A changed image misses exactly its own entry; a new resolution misses them all.
    rows = pd.read_parquet(dataset_dir / "metadata.parquet")
    changed = tmp_path / "changed"
    (changed / "images").mkdir(parents=True)
    for path in rows["image_path"]:
        Image.open(path).save(changed / "images" / Path(path).name)
    first = changed / "images" / Path(rows["image_path"][0]).name
    Image.new("RGB", (96, 80), (0, 0, 0)).save(first)
    rows.assign(image_path=[str(changed / "images" / Path(p).name) for p in rows["image_path"]])
    rows.assign(
        image_path=[str(changed / "images" / Path(p).name) for p in rows["image_path"]]
    ).to_parquet(changed / "metadata.parquet")
    cache = {"latents": True, "text_encoder_outputs": True, "dir": str(tmp_path / "cache")}
    train = tiny_train(max_steps=1, checkpoint_every=1, cache=cache)
    train_candidate(base_dir, changed, candidate, train, 64, 1, tmp_path / "c", state_dir="s1")
    assert len(list((tmp_path / "cache" / "latents").rglob("*.safetensors"))) == 7
    train_candidate(base_dir, changed, candidate, train, 128, 1, tmp_path / "d", state_dir="s2")
    assert len(list((tmp_path / "cache" / "latents").rglob("*.safetensors"))) == 13


# --- data: buckets, order, captions ------------------------------------------------------------


def test_aspect_ratio_buckets(tmp_path: Path) -> None:
    sizes = bucket_sizes(64, 16, 2.0)
    assert (64, 64) in sizes and (48, 80) in sizes and (80, 48) in sizes
    assert all(w % 16 == 0 and h % 16 == 0 and max(w, h) / min(w, h) <= 2.0 for w, h in sizes)
    images = tmp_path / "images"
    images.mkdir()
    rows = []
    for index, size in enumerate([(200, 100), (100, 200), (120, 120), (210, 100)]):
        path = images / f"{index}.png"
        Image.new("RGB", size, (index * 40, 90, 90)).save(path)
        rows.append({"image_path": str(path), "caption": "a, b", "split": "train"})
    pd.DataFrame(rows).to_parquet(tmp_path / "metadata.parquet")
    train = tiny_train(buckets={"enabled": True, "max_aspect": 2.0})
    items = plan_items(read_split(tmp_path), 64, train, 16)
    assert [item.size[0] > item.size[1] for item in items] == [True, False, False, True]
    assert items[2].size == (64, 64)
    order = DataOrder(items, 2, torch.Generator().manual_seed(0))
    for _ in range(6):
        batch = order.next()
        assert len({items[index].size for index in batch}) == 1  # one bucket per batch


def test_caption_shuffle_keeps_the_leading_tokens_and_dropout_empties() -> None:
    train = tiny_train(
        caption={"shuffle": True, "keep_tokens": 1, "dropout": 0.0},
        cache={"latents": True, "text_encoder_outputs": False},
    )
    generator = torch.Generator().manual_seed(0)
    caption = "aoi_cf, red hair, smile, standing, outdoors"
    shuffled = {augment_caption(caption, train, generator) for _ in range(20)}
    assert len(shuffled) > 1
    assert all(text.startswith("aoi_cf, ") for text in shuffled)
    assert all(sorted(text.split(", ")) == sorted(caption.split(", ")) for text in shuffled)
    dropping = train.model_copy(
        update={"caption": train.caption.model_copy(update={"dropout": 0.5})}
    )
    results = [augment_caption(caption, dropping, generator) for _ in range(40)]
    assert 5 < results.count("") < 35


def test_optimizers_precision_accumulation_checkpointing_buckets_and_sdxl(
    dataset_dir: Path, tmp_path: Path
) -> None:
    write_base(ModelConfig(family="sdxl", source="stand_in", resolution=64), tmp_path / "xl")
    train = tiny_train(
        max_steps=2,
        checkpoint_every=2,
        optimizer="adamw8bit",
        mixed_precision="bf16",
        gradient_accumulation_steps=2,
        gradient_checkpointing=True,
        lr_scheduler="linear",
        lr_warmup_steps=1,
        min_snr_gamma=5.0,
        noise_offset=0.1,
        buckets={"enabled": True},
        target_modules="attention_ff",
        candidates=_one(rank=4, lr=1e-3),
    )
    result = train_all(tmp_path / "xl", dataset_dir, train, 64, 0, tmp_path / "o", tmp_path / "p")
    history = result[0].history
    assert history["grad_norm"].notna().all() and (history["loss"] > 0).all()
    assert history["learning_rate"].tolist() == [1e-3, 0.0]  # warm-up, then linear decay
    weights = load_file(str(checkpoint_path(tmp_path / "o" / "c", 2)))
    assert any("ff.net.2" in key for key in weights)


# --- configurations that cannot train ------------------------------------------------------------


def test_bad_configurations_fail_before_any_work(
    base_dir: Path, dataset_dir: Path, tmp_path: Path
) -> None:
    out, plots = tmp_path / "out", tmp_path / "plots"

    def fails(train: TrainConfig, match: str, resolution: int = 64, data: Path = dataset_dir):
        with pytest.raises(ConfigError, match=match):
            train_all(base_dir, data, train, resolution, 0, out, plots)

    fails(tiny_train(candidates=_one(rank=64)), r"candidates\[c\]\.rank: 64 is larger")
    fails(tiny_train(target_modules=["to_q", "to_nothing"]), "'to_nothing' matches no")
    empty = make_dataset(tmp_path / "empty", train_images=0, val_images=1)
    fails(tiny_train(), "no rows with split == 'train'", data=empty)
    fails(tiny_train(), r"model\.resolution: 72 is not a multiple of 16", resolution=72)
    fails(tiny_train(mixed_precision="fp16"), "fp16 needs a CUDA GPU") if not (
        torch.cuda.is_available()
    ) else None
    assert not out.exists() and not plots.exists()
    assert not Path("data").exists()  # no state, no cache: nothing was started
    # Schema-level refusals name the key before anything is loaded.
    with pytest.raises(ValidationError, match="lr_warmup_steps"):
        tiny_train(max_steps=2, lr_warmup_steps=5)
    with pytest.raises(ValidationError, match="multiple of 8"):
        ModelConfig(family="sd15", source="stand_in", resolution=60)
    with pytest.raises(ValidationError, match="cannot be used with caption shuffle"):
        tiny_train(caption={"shuffle": True})
    with pytest.raises(ValidationError, match="text_encoder_lora"):
        tiny_train(text_encoder_lora=True)
    with pytest.raises(ValidationError, match="target_modules"):
        tiny_train(target_modules="everything")
