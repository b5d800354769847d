"""The world tagger: a small CNN over the world's caption tags, exported in WD14 format.

The ONNX graph has the released WD14 taggers' signature (`charaforge.tagging.wd14` reads it):
input (N, 448, 448, 3) float32, BGR, 0..255, the image padded to a white square; one sigmoid
output per row of `selected_tags.csv` (rating rows first, category 9, then the general tags,
category 0). Inside the graph the input is box-averaged back to 32 px first, so the network runs
at the renders' size. The WD14 preprocessing upsamples a 32 px render to 448 px with PIL's
bicubic filter; the network is trained on renders passed through that same round trip (a linear
map per axis, measured once on PIL itself) so it sees at training what it sees at tagging time.
"""

from __future__ import annotations

import csv
import io
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from tqdm import tqdm

from charaforge.config.world import WorldTaggerConfig
from charaforge.core.files import atomic_path, derive_seed, write_json
from charaforge.models.world_common import (
    WORLD_TAGS,
    RenderPool,
    batch_indices,
    render_pool,
    seeded_deterministic,
    warmup_cosine,
)

WD14_SIDE = 448
NET_SIDE = 32
# The released taggers' rating rows. The world has only harmless pictures, so the graph
# answers them with constants: "general" certain, the others never.
RATING_TAGS = ("general", "sensitive", "questionable", "explicit")
RATING_CATEGORY, GENERAL_CATEGORY = 9, 0
ONNX_OPSET = 17


class TagNet(nn.Module):
    """Three conv blocks (max-pooled) and a linear layer: logits over WORLD_TAGS at 32 px."""

    def __init__(self, tags: int) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 24, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(24, 48, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(48, 96, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )  # fmt: skip
        self.head = nn.Linear(96 * 4 * 4, tags)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels NCHW RGB in 0..1 at 32 px -> logits."""
        return self.head(self.features(pixels * 2.0 - 1.0).flatten(1))


class Wd14Graph(nn.Module):
    """What model.onnx computes: WD14 input in, rating constants and tag probabilities out."""

    def __init__(self, net: TagNet) -> None:
        super().__init__()
        self.net = net
        self.register_buffer("ratings", torch.tensor([[1.0, 0.0, 0.0, 0.0]]))

    def forward(self, bgr: torch.Tensor) -> torch.Tensor:
        rgb = bgr.flip(-1).permute(0, 3, 1, 2) / 255.0
        small = F.avg_pool2d(rgb, WD14_SIDE // NET_SIDE)
        tags = torch.sigmoid(self.net(small))
        return torch.cat([self.ratings.expand(tags.shape[0], -1), tags], dim=1)


def wd14_round_trip_matrix(side: int = NET_SIDE) -> torch.Tensor:
    """(side, side): one axis of PIL bicubic up to 448 px followed by the graph's box average.

    PIL resamples each axis separately and linearly (in float mode), so the matrix is read off
    by resizing images that are one-hot along one axis and constant along the other.
    """
    matrix = np.zeros((side, side), dtype=np.float64)
    pool = WD14_SIDE // side
    for column in range(side):
        basis = np.zeros((side, side), dtype=np.float32)
        basis[:, column] = 1.0
        upsampled = np.asarray(
            Image.fromarray(basis, mode="F").resize((WD14_SIDE, WD14_SIDE), Image.BICUBIC)
        )[0]
        matrix[:, column] = upsampled.reshape(side, pool).mean(axis=1)
    return torch.from_numpy(matrix).float()


def as_tagged(pixels: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """32 px NCHW images as the graph sees them after the WD14 round trip (clipped to 0..1)."""
    return (matrix @ pixels @ matrix.T).clamp(0.0, 1.0)


def train_world_tagger(
    config: WorldTaggerConfig, seed: int, image_size: int
) -> tuple[TagNet, dict[str, float], RenderPool]:
    """Train the tagger; returns the network, training metrics and its training pool."""
    with seeded_deterministic(derive_seed(seed, "world-tagger", "weights")):
        net = TagNet(len(WORLD_TAGS))
        pool = render_pool(seed, "world-tagger", config.train_images, image_size, True)
        pixels = _at_net_side(pool.as_float())
        inputs = as_tagged(pixels, wd14_round_trip_matrix())
        targets = pool.tag_targets()
        batches = torch.Generator().manual_seed(derive_seed(seed, "world-tagger", "batches"))
        optimizer = torch.optim.AdamW(net.parameters(), lr=config.learning_rate)
        warmup = max(1, config.steps // 20)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: warmup_cosine(step, config.steps, warmup)
        )
        losses = []
        for _ in tqdm(range(config.steps), desc="world tagger", unit="step", disable=None):
            chosen = batch_indices(batches, len(pool), config.batch_size)
            loss = F.binary_cross_entropy_with_logits(net(inputs[chosen]), targets[chosen])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            losses.append(float(loss.detach()))
        net.eval()
    metrics = {
        "tagger_loss_first": round(losses[0], 4),
        "tagger_loss_last": round(float(np.mean(losses[-10:])), 4),
    }
    return net, metrics, pool


def _at_net_side(pixels: torch.Tensor) -> torch.Tensor:
    if pixels.shape[-1] == NET_SIDE:
        return pixels
    return F.interpolate(pixels, size=(NET_SIDE, NET_SIDE), mode="area")


def export_onnx(net: TagNet) -> bytes:
    """model.onnx bytes (TorchScript exporter: the same weights give the same bytes)."""
    graph = Wd14Graph(net).eval()
    example = torch.zeros(1, WD14_SIDE, WD14_SIDE, 3)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's deprecation notices
        torch.onnx.export(
            graph,
            (example,),
            buffer,
            input_names=["input"],
            output_names=["output"],
            dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
            opset_version=ONNX_OPSET,
            dynamo=False,
        )
    return buffer.getvalue()


def tag_rows(pool: RenderPool) -> list[dict[str, object]]:
    """selected_tags.csv rows: ratings (category 9), then WORLD_TAGS (category 0), with counts."""
    counts = pool.tag_targets().sum(dim=0).long().tolist()
    rows: list[dict[str, object]] = [
        {"tag_id": index, "name": name, "category": RATING_CATEGORY, "count": 0}
        for index, name in enumerate(RATING_TAGS)
    ]
    for offset, (tag, count) in enumerate(zip(WORLD_TAGS, counts, strict=True)):
        rows.append(
            {
                "tag_id": len(RATING_TAGS) + offset,
                "name": tag.replace(" ", "_"),  # WD14 spells tags with underscores
                "category": GENERAL_CATEGORY,
                "count": int(count),
            }
        )
    return rows


def save_world_tagger(net: TagNet, pool: RenderPool, folder: Path) -> Path:
    """`folder/model.onnx`, `folder/selected_tags.csv` and `folder/config.json`."""
    with atomic_path(folder) as staging:
        staging.mkdir(parents=True)
        (staging / "model.onnx").write_bytes(export_onnx(net))
        with open(staging / "selected_tags.csv", "w", encoding="utf-8", newline="") as handle:
            writer = csv.DictWriter(
                handle, fieldnames=["tag_id", "name", "category", "count"], lineterminator="\n"
            )
            writer.writeheader()
            writer.writerows(tag_rows(pool))
        write_json(
            staging / "config.json",
            {
                "format": "wd14",
                "input": f"(N, {WD14_SIDE}, {WD14_SIDE}, 3) float32 BGR 0..255, white padding",
                "network_side": NET_SIDE,
                "ratings": "constant: general 1, others 0",
            },
        )
    return folder / "model.onnx"


def wd14_input(image: Image.Image) -> np.ndarray:
    """The WD14 reference preprocessing of a square RGB image (as charaforge.tagging.wd14 does:
    bicubic to 448 px, BGR, float 0..255); the tests check the two agree."""
    square = image.convert("RGB")
    if square.size != (WD14_SIDE, WD14_SIDE):
        square = square.resize((WD14_SIDE, WD14_SIDE), Image.BICUBIC)
    return np.ascontiguousarray(np.asarray(square, dtype=np.float32)[:, :, ::-1])


def onnx_tag_accuracy(model_path: Path, pool: RenderPool, threshold: float) -> dict[str, float]:
    """Per-tag accuracy of model.onnx in onnxruntime on held-out renders, thresholded like WD14."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(
        str(model_path), sess_options=options, providers=["CPUExecutionProvider"]
    )
    outputs = []
    for start in range(0, len(pool), 32):
        batch = np.stack([wd14_input(Image.fromarray(p)) for p in pool.pixels[start : start + 32]])
        outputs.append(session.run(["output"], {"input": batch})[0][:, len(RATING_TAGS) :])
    said = np.concatenate(outputs) >= np.float32(threshold)
    correct = said == pool.tag_targets().numpy().astype(bool)
    per_tag = correct.mean(axis=0)
    metrics = {
        "tagger_accuracy": round(float(correct.mean()), 4),
        "tagger_worst_tag_accuracy": round(float(per_tag.min()), 4),
        "tagger_all_tags_right": round(float(correct.all(axis=1).mean()), 4),
    }
    for tag, accuracy in zip(WORLD_TAGS, per_tag, strict=True):
        metrics[f"tagger_accuracy_{tag.replace(' ', '_')}"] = round(float(accuracy), 4)
    return metrics
