"""What the world scorers (CLIP, tagger, oracle) share: render pools, seeding, timing, tags.

Each model renders its own pool of scenes under its own derived seed, so the three never see the
same images (the oracle must stay independent of the scorers it judges).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from charaforge.core.files import derive_seed
from charaforge.prepare.world import (
    ATTRIBUTES,
    SUBJECT_TAG,
    TAG_TABLE,
    Scene,
    attribute_tags,
    render,
    sample_scenes,
)

# Every tag a world caption can carry, in a fixed order: the subject, then the attribute tags.
WORLD_TAGS: tuple[str, ...] = (SUBJECT_TAG, *TAG_TABLE)


@dataclass(frozen=True)
class RenderPool:
    """Scenes and their renders as one uint8 array (n, size, size, 3), RGB."""

    scenes: list[Scene]
    pixels: np.ndarray

    def __len__(self) -> int:
        return len(self.scenes)

    def as_float(self) -> torch.Tensor:
        """NCHW float32 in 0..1."""
        return torch.from_numpy(self.pixels).permute(0, 3, 1, 2).float().div(255.0).contiguous()

    def tag_targets(self) -> torch.Tensor:
        """(n, len(WORLD_TAGS)) multi-hot float32: which tags each scene's caption carries."""
        return torch.from_numpy(multi_hot([scene_tags(scene) for scene in self.scenes]))

    def attribute_targets(self) -> dict[str, torch.Tensor]:
        """Per attribute, the index of each scene's value in ATTRIBUTES (int64)."""
        return {
            name: torch.tensor([values.index(scene.get(name)) for scene in self.scenes])
            for name, values in ATTRIBUTES.items()
        }


def scene_tags(scene: Scene) -> list[str]:
    return [SUBJECT_TAG, *attribute_tags(scene)]


def multi_hot(tag_lists: list[list[str]]) -> np.ndarray:
    column = {tag: index for index, tag in enumerate(WORLD_TAGS)}
    rows = np.zeros((len(tag_lists), len(WORLD_TAGS)), dtype=np.float32)
    for row, tags in enumerate(tag_lists):
        for tag in tags:
            rows[row, column[tag]] = 1.0
    return rows


def render_pool(seed: int, purpose: str, count: int, size: int, exclude_demo: bool) -> RenderPool:
    """`count` scenes drawn and rendered under seeds derived from (seed, purpose)."""
    scenes = sample_scenes(derive_seed(seed, purpose, "scenes"), count, exclude_demo=exclude_demo)
    pixels = np.stack(
        [
            np.asarray(render(scene, derive_seed(seed, purpose, "render", index), size))
            for index, scene in enumerate(scenes)
        ]
    )
    return RenderPool(scenes, pixels)


@contextlib.contextmanager
def seeded_deterministic(seed: int) -> Iterator[None]:
    """Deterministic kernels and a seeded torch stream, both restored afterwards."""
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            yield
    finally:
        torch.use_deterministic_algorithms(previous)


def warmup_cosine(step: int, steps: int, warmup: int) -> float:
    """Learning-rate factor: linear warm-up, then cosine decay to 0 at `steps`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def batch_indices(generator: torch.Generator, count: int, batch_size: int) -> torch.Tensor:
    """One batch of distinct indices into a pool of `count` (with repeats only if it is smaller)."""
    if batch_size <= count:
        return torch.randperm(count, generator=generator)[:batch_size]
    return torch.randint(count, (batch_size,), generator=generator)


class Stopwatch:
    """CPU seconds of this process and wall seconds since construction."""

    def __init__(self) -> None:
        self.cpu = time.process_time()
        self.wall = time.perf_counter()

    def lap(self) -> tuple[float, float]:
        return round(time.process_time() - self.cpu, 2), round(time.perf_counter() - self.wall, 2)
