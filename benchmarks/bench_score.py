"""Scoring benchmark: batched scorers against their one-image-at-a-time baseline.

Every number is measured in this run, against a baseline measured in the same run, so the ratios
hold on a busy machine even where the absolute times do not:

1. ArcFace recognition: `FaceScorer.embed_aligned` in batches of 32 against one face per call
   (the same aligned faces, the same ONNX session); the embeddings must agree.
2. CLIP image embeddings (CLIP-I, CLIP-T, diversity, memorisation share them): batches of 16
   against batch 1.
3. Bootstrap of the composite: the vectorised resampling `statistics.bootstrap_composite_ci`
   against a Python loop over the resamples; the intervals must agree.
4. Memorisation search: vectorised pHash Hamming nearest neighbour against a per-pair loop.

Run: .venv/bin/python benchmarks/bench_score.py [--quick]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from charaforge.config import ClipConfig, FaceConfig  # noqa: E402
from charaforge.evaluate import memorisation  # noqa: E402
from charaforge.models import (
    clip,  # noqa: E402
    face,  # noqa: E402
)
from charaforge.selection import statistics  # noqa: E402


def _timed(function, repeats: int = 3) -> tuple[float, object]:  # noqa: ANN001
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = function()
        best = min(best, time.perf_counter() - start)
    return best, result


def _line(name: str, baseline: float, batched: float, unit: str, count: int) -> None:
    print(
        f"{name:<34} baseline {count / baseline:9.1f} {unit}/s   "
        f"batched {count / batched:9.1f} {unit}/s   speed-up x{baseline / batched:5.2f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer images")
    quick = parser.parse_args().quick
    rng = np.random.default_rng(0)
    n_faces = 64 if quick else 256
    n_images = 32 if quick else 96

    with face.load_face_scorer(FaceConfig()) as scorer:
        crops = [rng.integers(0, 256, (112, 112, 3), dtype=np.uint8) for _ in range(n_faces)]
        one, single = _timed(lambda: np.vstack([scorer.embed_aligned([c]) for c in crops]))
        many, batched = _timed(lambda: scorer.embed_aligned(crops, batch_size=32))
        assert np.allclose(single, batched, atol=1e-5)
        _line("ArcFace recognition (stand-in)", one, many, "faces", n_faces)

    embedder = clip.load_clip(ClipConfig(source="stand_in", model_name="ViT-B-32"))
    images = [
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)) for _ in range(n_images)
    ]
    one, single = _timed(lambda: embedder.embed_images(images, batch_size=1), repeats=1)
    many, batched = _timed(lambda: embedder.embed_images(images, batch_size=16), repeats=1)
    assert np.allclose(single, batched, atol=1e-5)
    _line("CLIP image embedding (stand-in)", one, many, "images", n_images)

    values = rng.normal(0.3, 0.05, (48, 4))
    values[rng.random(values.shape) < 0.2] = np.nan
    weights = np.array([0.4, 0.3, 0.2, 0.1])
    draws = 1000

    def loop() -> tuple[float, float]:
        picker = np.random.default_rng(7)
        picks = picker.integers(0, len(values), size=(draws, len(values)))
        composites = [statistics.composite_of(values[row], weights) for row in picks]
        low, high = np.quantile(composites, [0.025, 0.975])
        return float(low), float(high)

    one, looped = _timed(loop)
    many, vectorised = _timed(
        lambda: statistics.bootstrap_composite_ci(values, weights, draws, 0.95, seed=7)
    )
    assert np.allclose(looped, vectorised)
    _line("bootstrap CI (1000 resamples)", one, many, "rows", 1)

    generated = rng.random((n_images * 4, 64)) < 0.5
    training = rng.random((200, 64)) < 0.5

    def pairs() -> np.ndarray:
        return np.array(
            [min(int((g != t).sum()) for t in training) for g in generated], dtype=np.int64
        )

    one, looped = _timed(pairs, repeats=1)
    many, vectorised = _timed(lambda: memorisation.nearest_hamming(generated, training))
    assert np.array_equal(looped, vectorised)
    _line("pHash nearest training image", one, many, "images", len(generated))


if __name__ == "__main__":
    main()
