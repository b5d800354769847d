"""Train the world's scorer models and its oracle: one entry point for the world stage.

`train_world_scorers` trains, in order, the open_clip CLIP the scorers use (`clip/`), the
WD14-format tagger (`tagger/`) and the attribute oracle (`oracle/`), each from its own derived
seed and its own renders, measures each on held-out renders and writes a `metrics.json` beside
each model. Same config and seed (and the same torch thread count) give the same bytes in every
file. Timings are only in the returned metrics, never in a file.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Protocol

import numpy as np

from charaforge.config.world import WorldClipConfig, WorldOracleConfig, WorldTaggerConfig
from charaforge.core.files import derive_seed, write_json
from charaforge.core.logs import brief_metrics
from charaforge.models.world_clip import save_world_clip, train_world_clip, zero_shot_metrics
from charaforge.models.world_common import RenderPool, Stopwatch, render_pool
from charaforge.models.world_oracle import oracle_accuracy, save_world_oracle, train_world_oracle
from charaforge.models.world_tagger import onnx_tag_accuracy, save_world_tagger, train_world_tagger
from charaforge.prepare.world import ATTRIBUTES, DEMO_CHARACTER, make_scene, render

log = logging.getLogger(__name__)

# The WD14 general threshold (conf/tagger): the tagger's accuracy is measured at what it runs at.
TAGGER_THRESHOLD = 0.35
DEMO_RENDERS_PER_BACKGROUND = 10


class WorldScorersSection(Protocol):
    """What `train_world_scorers` reads of the world config (WorldConfig has it)."""

    image_size: int
    clip: WorldClipConfig
    tagger: WorldTaggerConfig
    oracle: WorldOracleConfig


def demo_character_pool(seed: int, size: int) -> RenderPool:
    """The demo character on every background, a few render seeds each (held out of training)."""
    scenes = [
        make_scene(**DEMO_CHARACTER, background=background)
        for background in ATTRIBUTES["background"]
        for _ in range(DEMO_RENDERS_PER_BACKGROUND)
    ]
    pixels = np.stack(
        [
            np.asarray(render(scene, derive_seed(seed, "world-demo-eval", index), size))
            for index, scene in enumerate(scenes)
        ]
    )
    return RenderPool(scenes, pixels)


def train_world_scorers(config: WorldScorersSection, out_dir: Path, seed: int) -> dict[str, float]:
    """Write `out_dir/clip/`, `out_dir/tagger/`, `out_dir/oracle/`; return their metrics.

    Metrics: losses, held-out accuracies (CLIP zero-shot per attribute, tagger per tag through
    onnxruntime, oracle per attribute and on the demo character), all deterministic, and the
    timings `<model>_cpu_seconds` / `<model>_seconds` (wall) for each model and `scorers_...` in
    all: every key ending in `_seconds` is a timing (leave those out of deterministic files).
    """
    out_dir = Path(out_dir)
    size = config.image_size
    metrics: dict[str, float] = {}
    total = Stopwatch()

    watch = Stopwatch()
    model, preprocess, tokenizer, clip_metrics = train_world_clip(config.clip, seed, size)
    held_out = render_pool(seed, "world-clip-eval", config.clip.eval_images, size, False)
    clip_metrics.update(zero_shot_metrics(model, preprocess, tokenizer, held_out))
    save_world_clip(model, out_dir / "clip")
    write_json(out_dir / "clip" / "metrics.json", clip_metrics)
    metrics.update(clip_metrics)
    metrics["clip_cpu_seconds"], metrics["clip_seconds"] = watch.lap()
    log.info("world CLIP: %s", brief_metrics(clip_metrics, "clip_"))

    watch = Stopwatch()
    net, tagger_metrics, pool = train_world_tagger(config.tagger, seed, size)
    model_path = save_world_tagger(net, pool, out_dir / "tagger")
    held_out = render_pool(seed, "world-tagger-eval", config.tagger.eval_images, size, False)
    tagger_metrics.update(onnx_tag_accuracy(model_path, held_out, TAGGER_THRESHOLD))
    write_json(out_dir / "tagger" / "metrics.json", tagger_metrics)
    metrics.update(tagger_metrics)
    metrics["tagger_cpu_seconds"], metrics["tagger_seconds"] = watch.lap()
    log.info("world tagger: accuracy %s", tagger_metrics["tagger_accuracy"])

    watch = Stopwatch()
    oracle, oracle_metrics = train_world_oracle(config.oracle, seed, size)
    save_world_oracle(oracle, out_dir / "oracle")
    held_out = render_pool(seed, "world-oracle-eval", config.oracle.eval_images, size, False)
    oracle_metrics.update(oracle_accuracy(oracle, held_out))
    demo = oracle_accuracy(oracle, demo_character_pool(seed, size))
    oracle_metrics["oracle_demo_character_all_right"] = demo["oracle_demo_character_all_right"]
    write_json(out_dir / "oracle" / "metrics.json", oracle_metrics)
    metrics.update(oracle_metrics)
    metrics["oracle_cpu_seconds"], metrics["oracle_seconds"] = watch.lap()
    log.info("world oracle: %s", brief_metrics(oracle_metrics, "oracle_"))

    metrics["scorers_cpu_seconds"], metrics["scorers_seconds"] = total.lap()
    return metrics
