"""A stand-in base model and a LoRA trained on it, shared by the engine, sweep and server tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest
import torch
from PIL import Image, ImageDraw

from charaforge.config import ModelConfig, TrainConfig
from charaforge.models.base import write_base
from charaforge.train import train_all

RENDER = {"steps": 4, "guidance_scale": 5.0, "negative_prompt": "lowres"}
PROMPT = "aoi_cf, 1girl, red hair"


@pytest.fixture(scope="module", autouse=False)
def one_thread() -> Iterator[None]:
    """One torch thread for a module's tests, restored afterwards: the 64 px stand-ins run
    10-20x faster so on shared cores (no spin-waiting OpenMP threads)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def write_drawn_dataset(dataset_dir: Path, caption: str) -> None:
    """Four drawn 64 px training images and their metadata, as the `dataset` stage writes it."""
    images = dataset_dir / "images"
    images.mkdir(parents=True)
    rows = []
    for index in range(4):
        image = Image.new("RGB", (64, 64), (200, 40 * index, 90))
        ImageDraw.Draw(image).ellipse((16, 8 + index, 48, 40 + index), fill=(20, 20, 220))
        image.save(images / f"{index}.png")
        rows.append(
            {"image_path": str(images / f"{index}.png"), "caption": caption, "split": "train"}
        )
    pd.DataFrame(rows).to_parquet(dataset_dir / "metadata.parquet")


def make_workspace(root: Path, max_steps: int = 4) -> Path:
    """root/base (stand-in SD1.5, 64 px) and root/train (candidate r4: alpha 8 != rank 4,
    checkpoints every 2 steps), trained on four drawn images."""
    write_base(ModelConfig(family="sd15", source="stand_in", resolution=64), root / "base")
    write_drawn_dataset(root / "dataset", PROMPT)
    train = TrainConfig(
        batch_size=2,
        max_steps=max_steps,
        checkpoint_every=2,
        target_modules=["to_q", "to_k", "to_v", "to_out.0"],
        candidates=[{"name": "r4", "rank": 4, "alpha": 8, "learning_rate": 0.05}],
        cache={"dir": str(root / "cache")},
    )
    train_all(
        root / "base",
        root / "dataset",
        train,
        64,
        1,
        root / "train",
        root / "plots",
        trigger="aoi_cf",
        # Resume state beside the workspace, not in the current directory's data/.
        state_dir=root / "train_state",
    )
    return root
