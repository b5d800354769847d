"""Consistent characters: shared attention against independent renders, same seeds and prompts.

For each of `--groups` characters (a random world character per group: hair, outfit,
accessory) a group of one identity shot and `--frames` frames on other backgrounds is rendered
several ways (VARIANTS): independently (every image alone), with shared attention on the
character (frames attend to the identity shot's character tokens), with the background shared
too, and with the shared-attention options (StoryDiffusion's sampled group tokens, up blocks
only, a strength on the shared tokens, a window over the steps; `--variants` picks). The score
is the project's consistency score (evaluate.groups.group_consistency: CLIP cosine of each frame
with its group's identity shot), averaged over frames, with the paired difference to the
independent renders and its 95% bootstrap interval.

Meaningful only with learnt weights: the world models (`--base` a folder whose model.json points
at a world pipeline, `--clip` the world CLIP checkpoint). On the random stand-ins the images are
noise and the difference is ~0 (the self-attention of a random UNet hardly moves its output).

    .venv/bin/python benchmarks/bench_consistency.py --base data/base \
        --clip data/world/clip/open_clip_model.safetensors --groups 8 --steps 20
"""

from __future__ import annotations

import argparse
import random
import sys

import numpy as np
import torch

from charaforge.config import ClipConfig
from charaforge.evaluate.groups import group_consistency
from charaforge.generate.engine import GenerationEngine
from charaforge.generate.request import Consistency, RenderRequest
from charaforge.models.clip import load_clip
from charaforge.prepare.world import ATTRIBUTES

WORLD_CLIP = "charaforge-world-clip"


def character_text(rng: random.Random) -> str:
    hair, length = rng.choice(ATTRIBUTES["hair_colour"]), rng.choice(ATTRIBUTES["hair_length"])
    colour, outfit = rng.choice(ATTRIBUTES["outfit_colour"]), rng.choice(ATTRIBUTES["outfit"])
    accessory = rng.choice(ATTRIBUTES["accessory"])
    tags = ["1girl", f"{hair} hair", f"{length} hair", f"{colour} {outfit}"]
    return ", ".join(tags + ([accessory] if accessory != "none" else []))


# Variant name -> the Consistency options of its frames (None: independent renders).
VARIANTS: dict[str, dict | None] = {
    "independent": None,
    "shared_character": {},
    "shared_background": {"share_background": True},
    "group_tokens": {"group_tokens": 0.5},
    "up_blocks": {"blocks": "up"},
    "strength_3": {"strength": 3.0},
    "background_strength_3": {"share_background": True, "strength": 3.0},
    "early_half": {"window": (0.0, 0.5)},
    "background_group": {"share_background": True, "group_tokens": 0.5},
    "up_strength_3": {"blocks": "up", "strength": 3.0},
    "up_background": {"blocks": "up", "share_background": True},
    "late_half": {"window": (0.5, 1.0)},
    "strength_0.3": {"strength": 0.3},
}


def group_requests(
    character: str, backgrounds: list[str], seeds: list[int], options: dict | None, render: dict
) -> list[RenderRequest]:
    prompts = [f"{character}, {background} background" for background in backgrounds]
    requests = []
    for position, (prompt, seed) in enumerate(zip(prompts, seeds, strict=True)):
        consistency = None
        if options is not None:
            consistency = Consistency(
                character,
                identity_prompt=None if position == 0 else prompts[0],
                identity_seed=None if position == 0 else seeds[0],
                **options,
            )
        requests.append(RenderRequest(prompt=prompt, seed=seed, consistency=consistency, **render))
    return requests


def bootstrap_interval(values: np.ndarray, draws: int = 2000) -> tuple[float, float]:
    rng = np.random.default_rng(0)
    means = rng.choice(values, size=(draws, len(values))).mean(axis=1)
    return float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", default="data/base", help="a base folder (model.json)")
    parser.add_argument("--clip", default=None, help="world CLIP checkpoint (else a stand-in)")
    parser.add_argument("--groups", type=int, default=8)
    parser.add_argument("--frames", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument("--scheduler", default="dpmpp_2m")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    engine = GenerationEngine(args.base, scheduler=args.scheduler)
    if args.clip:
        clip = load_clip(ClipConfig(source="pretrained", model_name=WORLD_CLIP, path=args.clip))
    else:
        clip = load_clip(ClipConfig(source="stand_in", model_name="ViT-B-32"))
    render = {"steps": args.steps, "guidance_scale": args.guidance}
    methods = ["independent", *(v for v in args.variants.split(",") if v != "independent")]
    rng = random.Random(0)
    scores: dict[str, list[float]] = {method: [] for method in methods}
    for group in range(args.groups):
        character = character_text(rng)
        backgrounds = rng.sample(list(ATTRIBUTES["background"]), args.frames + 1)
        seeds = [1000 * group + k for k in range(args.frames + 1)]
        for method in methods:
            images = engine.render_batch(
                group_requests(character, backgrounds, seeds, VARIANTS[method], render)
            )
            embeddings = clip.embed_images(images)
            anchors = [True] + [False] * args.frames
            consistency = group_consistency(embeddings, ["g"] * len(images), anchors)
            scores[method] += [float(value) for value in consistency[1:]]
        running = ", ".join(f"{m} {np.mean(v):.4f}" for m, v in scores.items())
        print(f"after group {group + 1}: {running}", file=sys.stderr, flush=True)
    print(f"model: {engine.model_name}; CLIP: {'world' if args.clip else 'stand-in'}")
    print(f"{args.groups} groups x {args.frames} frames, {args.steps} steps")
    print(f"{'method':<20}{'consistency':>12}{'diff':>10}{'95% CI':>22}")
    baseline = np.asarray(scores["independent"])
    for method in methods:
        values = np.asarray(scores[method])
        difference = values - baseline
        low, high = bootstrap_interval(difference)
        print(
            f"{method:<20}{values.mean():>12.4f}{difference.mean():>+10.4f}"
            f"{f'[{low:+.4f}, {high:+.4f}]':>22}"
        )


if __name__ == "__main__":
    sys.exit(main())
