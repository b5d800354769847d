"""The training data: the split table, each image's bucket and crop, the batch order, and the
caption augmentations (kohya's shuffle and dropout)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from PIL import Image

from charaforge.config import TrainConfig, config_hash
from charaforge.core.files import sha256_file
from charaforge.errors import ConfigError


def read_split(dataset_dir: str | Path, split: str = "train") -> pd.DataFrame:
    """One split of data/dataset/metadata.parquet; image paths are relative to the cwd.

    An empty train split is a configuration that cannot train; an empty val split only means
    no validation loss.
    """
    table = Path(dataset_dir) / "metadata.parquet"
    if not table.is_file():
        raise ConfigError(f"{table}: not found (run the `dataset` stage first)")
    rows = pd.read_parquet(table)
    missing = {"image_path", "caption", "split"} - set(rows.columns)
    if missing:
        raise ConfigError(f"{table}: missing columns {sorted(missing)}")
    rows = rows[rows["split"] == split].sort_values("image_path").reset_index(drop=True)
    if rows.empty and split == "train":
        raise ConfigError(f"{table}: no rows with split == 'train': nothing to train on")
    absent = [path for path in rows["image_path"] if not Path(path).is_file()]
    if absent:
        raise ConfigError(f"{table}: {len(absent)} {split} image(s) missing, e.g. {absent[0]}")
    return rows


@dataclass(frozen=True)
class Item:
    """One training image as it is encoded: the crop box and the size it is resized to."""

    path: str
    sha256: str
    caption: str
    size: tuple[int, int]  # (width, height) after resize and crop
    original: tuple[int, int]  # (height, width) of the source image, SDXL's micro-conditioning
    crop: tuple[int, int]  # (top, left) in the resized image, SDXL's micro-conditioning


def bucket_sizes(resolution: int, multiple: int, max_aspect: float) -> list[tuple[int, int]]:
    """kohya-style buckets: about resolution**2 pixels, sides multiples of `multiple`."""
    area = resolution * resolution
    sizes = set()
    width = multiple
    while width <= resolution * max_aspect:
        height = max(multiple, (area // width) // multiple * multiple)
        if max(width, height) / min(width, height) <= max_aspect:
            sizes.add((width, height))
        width += multiple
    sizes.add((resolution, resolution))
    return sorted(sizes)


def plan_items(
    rows: pd.DataFrame, resolution: int, train: TrainConfig, multiple: int
) -> list[Item]:
    """Assign each image its size (its bucket, or the square) and its centre crop."""
    buckets = (
        bucket_sizes(resolution, multiple, train.buckets.max_aspect)
        if train.buckets.enabled
        else [(resolution, resolution)]
    )
    items = []
    for path, caption in zip(rows["image_path"], rows["caption"], strict=True):
        with Image.open(path) as image:
            width, height = image.size
        aspect = width / height
        size = min(buckets, key=lambda b: (abs(np.log(b[0] / b[1]) - np.log(aspect)), b))
        scale = max(size[0] / width, size[1] / height)
        resized = (round(width * scale), round(height * scale))
        crop = ((resized[1] - size[1]) // 2, (resized[0] - size[0]) // 2)
        items.append(Item(str(path), sha256_file(path), str(caption), size, (height, width), crop))
    return items


def load_pixels(item: Item) -> torch.Tensor:
    """The image resized to cover its size, centre-cropped, as a (3, h, w) tensor in [-1, 1]."""
    with Image.open(item.path) as image:
        image = image.convert("RGB")
        width, height = image.size
        scale = max(item.size[0] / width, item.size[1] / height)
        resized = image.resize(
            (round(width * scale), round(height * scale)), Image.Resampling.BILINEAR
        )
        top, left = item.crop
        cropped = resized.crop((left, top, left + item.size[0], top + item.size[1]))
    array = np.asarray(cropped, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


class DataOrder:
    """Endless batches of item indices, every batch from one bucket.

    Each epoch shuffles the images with the order generator, groups them by bucket into batches
    and shuffles the batches. Its state (generator, epoch plan, position) is saved with every
    checkpoint, so a resumed run draws exactly the batches the uninterrupted one would have.
    """

    def __init__(self, items: list[Item], batch_size: int, generator: torch.Generator) -> None:
        self.buckets = [item.size for item in items]
        self.batch_size = batch_size
        self.generator = generator
        self.epoch = 0
        self.plan: list[list[int]] = []
        self.position = 0

    def _plan_epoch(self) -> list[list[int]]:
        order = torch.randperm(len(self.buckets), generator=self.generator).tolist()
        groups: dict[tuple[int, int], list[int]] = {}
        for index in order:
            groups.setdefault(self.buckets[index], []).append(index)
        batches = [
            group[start : start + self.batch_size]
            for _, group in sorted(groups.items())
            for start in range(0, len(group), self.batch_size)
        ]
        shuffle = torch.randperm(len(batches), generator=self.generator).tolist()
        return [batches[index] for index in shuffle]

    def next(self) -> list[int]:
        if self.position >= len(self.plan):
            self.plan = self._plan_epoch()
            self.position = 0
            self.epoch += 1
        batch = self.plan[self.position]
        self.position += 1
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "plan": self.plan, "position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.plan, self.position = state["epoch"], state["plan"], state["position"]


def augment_caption(caption: str, train: TrainConfig, generator: torch.Generator) -> str:
    """kohya's caption shuffle (the first `keep_tokens` tags stay put) and caption dropout."""
    if (
        train.caption.dropout > 0
        and float(torch.rand((), generator=generator)) < train.caption.dropout
    ):
        return ""
    if train.caption.shuffle:
        tags = [tag.strip() for tag in caption.split(",") if tag.strip()]
        kept, rest = tags[: train.caption.keep_tokens], tags[train.caption.keep_tokens :]
        order = torch.randperm(len(rest), generator=generator).tolist()
        caption = ", ".join(kept + [rest[index] for index in order])
    return caption


def data_fingerprint(items: list[Item], val_items: list[Item]) -> str:
    """What the data contributes to a run's identity: each image's content, caption and size."""
    payload = [[item.sha256, item.caption, list(item.size)] for item in items]
    payload += [["val", item.sha256, item.caption, list(item.size)] for item in val_items]
    return config_hash({"items": payload})


def tag_frequency(items: list[Item]) -> dict[str, dict[str, int]]:
    """kohya's `ss_tag_frequency`: how many training captions hold each tag."""
    counts = Counter(
        tag for item in items for tag in (tag.strip() for tag in item.caption.split(",")) if tag
    )
    return {"train": dict(sorted(counts.items()))}
