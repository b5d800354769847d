"""The attribute oracle: the world's ground truth about an image, never one of the scorers.

A residual CNN with strided convolutions and group norm (unlike the tagger's max-pooled plain
CNN and the CLIP's ViT), trained from its own seed on its own renders with their true
attributes, one softmax head per attribute. It sees every combination, the demo character's
too: it judges whether a LoRA drew that character, so it must know it as well as any other.
Light pixel noise in training keeps it steady on the diffusion models' imperfect images.
Saved as `oracle.safetensors` + `oracle.json` (attributes, values, architecture).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from tqdm import tqdm

from charaforge.config.world import WorldOracleConfig
from charaforge.core.files import atomic_path, derive_seed, write_json
from charaforge.models.world_common import (
    RenderPool,
    batch_indices,
    render_pool,
    seeded_deterministic,
    warmup_cosine,
)
from charaforge.prepare.world import ATTRIBUTES, held_out

ORACLE_SIDE = 32
WIDTHS = (16, 32, 64)
TRAINING_NOISE = 0.03  # std of the Gaussian pixel noise added in training (pixels in 0..1)
WEIGHTS_NAME, CONFIG_NAME = "oracle.safetensors", "oracle.json"


class _Block(nn.Module):
    def __init__(self, channels_in: int, channels_out: int) -> None:
        super().__init__()
        self.down = nn.Conv2d(channels_in, channels_out, 4, stride=2, padding=1)
        self.norm1 = nn.GroupNorm(8, channels_out)
        self.conv = nn.Conv2d(channels_out, channels_out, 3, padding=1)
        self.norm2 = nn.GroupNorm(8, channels_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.silu(self.norm1(self.down(x)))
        return x + F.silu(self.norm2(self.conv(x)))


class OracleNet(nn.Module):
    """32 px RGB in 0..1 -> one logit vector per attribute."""

    def __init__(self, attributes: dict[str, tuple[str, ...]]) -> None:
        super().__init__()
        self.attributes = {name: tuple(values) for name, values in attributes.items()}
        self.stem = nn.Conv2d(3, WIDTHS[0], 3, padding=1)
        self.blocks = nn.Sequential(
            _Block(WIDTHS[0], WIDTHS[1]), _Block(WIDTHS[1], WIDTHS[2]), _Block(WIDTHS[2], WIDTHS[2])
        )
        features = WIDTHS[2] * (ORACLE_SIDE // 8) ** 2
        self.heads = nn.ModuleDict(
            {name: nn.Linear(features, len(values)) for name, values in self.attributes.items()}
        )

    def forward(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.blocks(F.silu(self.stem(pixels * 2.0 - 1.0))).flatten(1)
        return {name: head(features) for name, head in self.heads.items()}


def oracle_pixels(images: list[Image.Image]) -> torch.Tensor:
    """Images as the oracle's input: RGB, 32 px (box-filtered when larger), NCHW 0..1."""
    rows = []
    for image in images:
        image = image.convert("RGB")
        if image.size != (ORACLE_SIDE, ORACLE_SIDE):
            image = image.resize((ORACLE_SIDE, ORACLE_SIDE), Image.BOX)
        rows.append(np.asarray(image))
    array = np.stack(rows) if rows else np.zeros((0, ORACLE_SIDE, ORACLE_SIDE, 3), np.uint8)
    return torch.from_numpy(array).permute(0, 3, 1, 2).float().div(255.0).contiguous()


def train_world_oracle(
    config: WorldOracleConfig, seed: int, image_size: int
) -> tuple[OracleNet, dict[str, float]]:
    with seeded_deterministic(derive_seed(seed, "world-oracle", "weights")):
        net = OracleNet(ATTRIBUTES)
        pool = render_pool(seed, "world-oracle", config.train_images, image_size, False)
        pixels = oracle_pixels([Image.fromarray(p) for p in pool.pixels])
        targets = pool.attribute_targets()
        batches = torch.Generator().manual_seed(derive_seed(seed, "world-oracle", "batches"))
        noise = torch.Generator().manual_seed(derive_seed(seed, "world-oracle", "noise"))
        optimizer = torch.optim.AdamW(net.parameters(), lr=config.learning_rate)
        warmup = max(1, config.steps // 20)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: warmup_cosine(step, config.steps, warmup)
        )
        losses = []
        net.train()
        for _ in tqdm(range(config.steps), desc="world oracle", unit="step", disable=None):
            chosen = batch_indices(batches, len(pool), config.batch_size)
            batch = pixels[chosen]
            batch = batch + TRAINING_NOISE * torch.randn(batch.shape, generator=noise)
            logits = net(batch)
            loss = sum(F.cross_entropy(logits[name], targets[name][chosen]) for name in logits)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            losses.append(float(loss.detach()))
        net.eval()
    return net, {
        "oracle_loss_first": round(losses[0], 4),
        "oracle_loss_last": round(float(np.mean(losses[-10:])), 4),
    }


@torch.inference_mode()
def predict_indices(
    net: OracleNet, pixels: torch.Tensor, batch_size: int = 256
) -> dict[str, np.ndarray]:
    """Per attribute, the index of the most probable value for each image."""
    chosen: dict[str, list[np.ndarray]] = {name: [] for name in net.attributes}
    for start in range(0, len(pixels), batch_size):
        for name, logits in net(pixels[start : start + batch_size]).items():
            chosen[name].append(logits.argmax(dim=1).numpy())
    return {
        name: np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
        for name, parts in chosen.items()
    }


def oracle_accuracy(net: OracleNet, pool: RenderPool) -> dict[str, float]:
    """Accuracy per attribute on held-out renders, all-right rate, and on the demo character."""
    predicted = predict_indices(net, oracle_pixels([Image.fromarray(p) for p in pool.pixels]))
    truth = {name: values.numpy() for name, values in pool.attribute_targets().items()}
    right = np.stack([predicted[name] == truth[name] for name in ATTRIBUTES], axis=1)
    metrics = {
        f"oracle_accuracy_{name}": round(float(right[:, i].mean()), 4)
        for i, name in enumerate(ATTRIBUTES)
    }
    metrics["oracle_all_right"] = round(float(right.all(axis=1).mean()), 4)
    demo = np.array([held_out(scene) for scene in pool.scenes])
    if demo.any():
        metrics["oracle_demo_character_all_right"] = round(float(right[demo].all(axis=1).mean()), 4)
    return metrics


def save_world_oracle(net: OracleNet, folder: Path) -> Path:
    from safetensors.torch import save_file

    with atomic_path(folder) as staging:
        staging.mkdir(parents=True)
        state = {key: value.detach().contiguous() for key, value in net.state_dict().items()}
        save_file(state, staging / WEIGHTS_NAME)
        write_json(
            staging / CONFIG_NAME,
            {
                "attributes": {name: list(values) for name, values in net.attributes.items()},
                "architecture": {"side": ORACLE_SIDE, "widths": list(WIDTHS)},
                "weights": WEIGHTS_NAME,
            },
        )
    return folder


def load_world_oracle(folder: str | Path) -> OracleNet:
    """The oracle saved by `save_world_oracle` (eval mode)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    description = json.loads((folder / CONFIG_NAME).read_text(encoding="utf-8"))
    net = OracleNet({name: tuple(values) for name, values in description["attributes"].items()})
    net.load_state_dict(load_file(folder / WEIGHTS_NAME))
    return net.eval()
