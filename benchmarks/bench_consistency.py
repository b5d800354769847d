"""Consistent characters: shared attention against independent renders, same seeds and prompts.

For each of `--groups` characters (a random world character per group) a group of one identity
shot and `--frames` frames on other backgrounds is rendered several ways (VARIANTS):
independently (every image alone), with shared attention on the character (frames attend to the
identity shot's character tokens), with the background shared too, and with the shared-attention
options (StoryDiffusion's sampled group tokens, the blocks that share, a strength on the shared
tokens, a window over the steps; `--variants` picks).

`--omit` leaves attributes out of the character text (`all`: the character is only "1girl"), so
that independent renders of a group differ in them and sharing has something to make alike; with
nothing omitted (the default) the prompt pins the whole character and independent renders agree
already. Two judges, per frame against its group's identity shot:
- the project's consistency score (evaluate.groups.group_consistency: CLIP cosine with the
  identity shot; the world CLIP with `--clip`);
- the world oracle's agreement (`--oracle`): the share of the omitted attributes (all character
  attributes when none is omitted) on which the oracle's reading of the frame equals its reading
  of the identity shot. The oracle is trained apart from the CLIP: an independent judge.
The `limit_` variants are diagnostics, not settings (LIMITS): every frame attends to the
identity shot only, or takes its self-attention output outright, the upper bounds of any sharing.
`--seed-offset` shifts every render seed, so `--seed 1 --seed-offset 500000` is an independent
sample of groups.
Each variant's mean, its paired difference to the independent renders and a 95% bootstrap
interval over groups (frames of one group are not independent, so groups are resampled).

Meaningful only with learnt weights: the world models (`--base` a folder whose model.json points
at a world pipeline). On the random stand-ins the images are noise and the difference is ~0.

    .venv/bin/python benchmarks/bench_consistency.py --base data/base --omit all \
        --clip data/world/clip/open_clip_model.safetensors --oracle data/world/oracle
"""

from __future__ import annotations

import argparse
import contextlib
import random
import sys
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

import charaforge.generate.consistent as consistent_module
from charaforge.config import ClipConfig
from charaforge.evaluate.groups import group_consistency
from charaforge.evaluate.oracle import load_oracle
from charaforge.generate.engine import GenerationEngine
from charaforge.generate.request import Consistency, RenderRequest
from charaforge.models.clip import load_clip
from charaforge.prepare.world import ATTRIBUTES, CHARACTER_ATTRIBUTES, SUBJECT_TAG

WORLD_CLIP = "charaforge-world-clip"
# What `--omit` can leave out; `outfit` is the outfit tag ("red dress": colour and kind together).
OMITTABLE = ("hair_colour", "hair_length", "outfit", "accessory")

# Variant name -> the Consistency options of its frames (None: independent renders).
VARIANTS: dict[str, dict | None] = {
    "independent": None,
    "shared_character": {},
    "shared_background": {"share_background": True},
    "group_tokens": {"group_tokens": 0.5},
    "down_blocks": {"blocks": "down"},
    "mid_block": {"blocks": "mid"},
    "up_blocks": {"blocks": "up"},
    "strength_3": {"strength": 3.0},
    "strength_10": {"strength": 10.0},
    "strength_0.3": {"strength": 0.3},
    "early_half": {"window": (0.0, 0.5)},
    "late_half": {"window": (0.5, 1.0)},
    "background_strength_3": {"share_background": True, "strength": 3.0},
    "background_strength_10": {"share_background": True, "strength": 10.0},
    "background_group": {"share_background": True, "group_tokens": 0.5},
    "mid_background": {"blocks": "mid", "share_background": True},
    "mid_background_strength_10": {"blocks": "mid", "share_background": True, "strength": 10.0},
    "down_mid_strength_10": {"blocks": "down+mid", "strength": 10.0},
    "down_mid_background_strength_10": {
        "blocks": "down+mid",
        "share_background": True,
        "strength": 10.0,
    },
    "up_background": {"blocks": "up", "share_background": True},
    "up_background_strength_10": {"blocks": "up", "share_background": True, "strength": 10.0},
    "background_strength_10_early": {
        "share_background": True,
        "strength": 10.0,
        "window": (0.0, 0.5),
    },
    # Diagnostic limits (see LIMITS), every identity token shared at every layer and step.
    "limit_identity_only": {"share_background": True},
    "limit_identity_output": {"share_background": True},
}


def _attend_identity_only(
    attn: Any,
    hidden_states: torch.Tensor,
    extra: torch.Tensor,
    allowed: torch.Tensor | None,
    strength: float = 1.0,
) -> torch.Tensor:
    """The frame's queries attend to the identity shot's keys and values only (not its own)."""
    rows = hidden_states.shape[0]
    query, key, value = attn.to_q(hidden_states), attn.to_k(extra), attn.to_v(extra)
    head_dim = key.shape[-1] // attn.heads
    query, key, value = (
        tensor.view(rows, -1, attn.heads, head_dim).transpose(1, 2)
        for tensor in (query, key, value)
    )
    output = F.scaled_dot_product_attention(query, key, value)
    output = output.transpose(1, 2).reshape(rows, -1, attn.heads * head_dim)
    output = attn.to_out[1](attn.to_out[0](output))
    if attn.residual_connection:
        output = output + hidden_states
    return output / attn.rescale_output_factor


def _attend_as_identity(
    attn: Any,
    hidden_states: torch.Tensor,
    extra: torch.Tensor,
    allowed: torch.Tensor | None,
    strength: float = 1.0,
) -> torch.Tensor:
    """The frame's self-attention output is the identity shot's own (queries theirs too)."""
    return _attend_identity_only(attn, extra, extra, allowed)


# The upper bounds of any self-attention sharing: in place of the shared attention's computation
# (consistent._attend_with, with every identity token shared), a frame attends to the identity
# shot only, or takes the identity shot's self-attention output outright. If even these hardly
# raise the score, no setting of the shared attention can: the UNet's self-attention does not
# carry the character (the world UNet's case, README).
LIMITS = {
    "limit_identity_only": _attend_identity_only,
    "limit_identity_output": _attend_as_identity,
}


@contextlib.contextmanager
def attention_limit(method: str) -> Iterator[None]:
    """Swap the shared attention's computation for a LIMITS one while `method` renders."""
    if method not in LIMITS:
        yield
        return
    original = consistent_module._attend_with
    consistent_module._attend_with = LIMITS[method]
    try:
        yield
    finally:
        consistent_module._attend_with = original


def character_text(rng: random.Random, omit: set[str]) -> tuple[str, set[str]]:
    """A random world character's tags without the `omit` ones, and the character attributes
    the text leaves open (an absent accessory tag means "none" to the world: never open)."""
    hair, length = rng.choice(ATTRIBUTES["hair_colour"]), rng.choice(ATTRIBUTES["hair_length"])
    colour, outfit = rng.choice(ATTRIBUTES["outfit_colour"]), rng.choice(ATTRIBUTES["outfit"])
    accessory = rng.choice(ATTRIBUTES["accessory"])
    tags = {
        "hair_colour": f"{hair} hair",
        "hair_length": f"{length} hair",
        "outfit": f"{colour} {outfit}",
        "accessory": "" if accessory == "none" else accessory,
    }
    kept = [tag for name, tag in tags.items() if name not in omit and tag]
    open_ = {name for name in omit if name != "accessory"}
    if "outfit" in open_:
        open_ = (open_ - {"outfit"}) | {"outfit_colour", "outfit"}
    return ", ".join([SUBJECT_TAG, *kept]), open_


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


def agreement(predicted: list[dict[str, str]], judged: list[str]) -> list[float]:
    """Per frame, the share of `judged` attributes the oracle reads as in the identity shot."""
    identity = predicted[0]
    return [
        sum(frame[name] == identity[name] for name in judged) / len(judged)
        for frame in predicted[1:]
    ]


def group_bootstrap(differences: np.ndarray, draws: int = 4000) -> tuple[float, float]:
    """95% interval of the mean of a (groups, frames) array, resampling whole groups."""
    rng = np.random.default_rng(0)
    per_group = differences.mean(axis=1)
    picks = rng.integers(0, len(per_group), (draws, len(per_group)))
    means = per_group[picks].mean(axis=1)
    return float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))


def print_table(title: str, scores: dict[str, list[list[float]]]) -> None:
    baseline = np.asarray(scores["independent"])
    print(f"\n{title} (n = {baseline.size} frames in {len(baseline)} groups)")
    print(f"{'variant':<34}{'mean':>9}{'diff':>10}{'95% CI (groups)':>22}")
    for method, values in scores.items():
        values_array = np.asarray(values)
        difference = values_array - baseline
        low, high = group_bootstrap(difference)
        mark = " *" if low > 0 else ""
        print(
            f"{method:<34}{values_array.mean():>9.4f}{difference.mean():>+10.4f}"
            f"{f'[{low:+.4f}, {high:+.4f}]':>22}{mark}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", default="data/base", help="a base folder (model.json)")
    parser.add_argument("--clip", default=None, help="world CLIP checkpoint (else a stand-in)")
    parser.add_argument("--oracle", default=None, help="world oracle folder (data/world/oracle)")
    parser.add_argument("--groups", type=int, default=8)
    parser.add_argument("--frames", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument("--scheduler", default="dpmpp_2m")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0, help="draws the characters")
    parser.add_argument(
        "--seed-offset", type=int, default=0, help="added to every render seed (a new sample)"
    )
    parser.add_argument(
        "--omit", default="", help=f"comma-separated of {', '.join(OMITTABLE)}, or all"
    )
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated")
    parser.add_argument(
        "--fixed-background",
        action="store_true",
        help="every image of a group on one background (CharaConsist's fixed-background mode)",
    )
    args = parser.parse_args()
    omit = set(OMITTABLE) if args.omit == "all" else {v for v in args.omit.split(",") if v}
    if omit - set(OMITTABLE):
        parser.error(f"--omit: unknown {sorted(omit - set(OMITTABLE))}; know {OMITTABLE}")
    torch.set_num_threads(args.threads)
    engine = GenerationEngine(args.base, scheduler=args.scheduler)
    if args.clip:
        clip = load_clip(ClipConfig(source="pretrained", model_name=WORLD_CLIP, path=args.clip))
    else:
        clip = load_clip(ClipConfig(source="stand_in", model_name="ViT-B-32"))
    oracle = load_oracle(args.oracle) if args.oracle else None
    render = {"steps": args.steps, "guidance_scale": args.guidance}
    methods = ["independent", *(v for v in args.variants.split(",") if v != "independent")]
    rng = random.Random(args.seed)
    clip_scores: dict[str, list[list[float]]] = {method: [] for method in methods}
    oracle_scores: dict[str, list[list[float]]] = {method: [] for method in methods}
    for group in range(args.groups):
        character, open_attributes = character_text(rng, omit)
        judged = sorted(open_attributes) or list(CHARACTER_ATTRIBUTES)
        backgrounds = rng.sample(list(ATTRIBUTES["background"]), args.frames + 1)
        if args.fixed_background:
            backgrounds = backgrounds[:1] * (args.frames + 1)
        seeds = [args.seed_offset + 1000 * group + k for k in range(args.frames + 1)]
        for method in methods:
            with attention_limit(method):
                images = engine.render_batch(
                    group_requests(character, backgrounds, seeds, VARIANTS[method], render)
                )
            embeddings = clip.embed_images(images)
            anchors = [True] + [False] * args.frames
            consistency = group_consistency(embeddings, ["g"] * len(images), anchors)
            clip_scores[method].append([float(value) for value in consistency[1:]])
            if oracle is not None:
                oracle_scores[method].append(agreement(oracle.predict(images), judged))
        running = ", ".join(f"{m} {np.mean(v):.4f}" for m, v in clip_scores.items())
        print(f"after group {group + 1}: {running}", file=sys.stderr, flush=True)
    print(f"model: {engine.model_name}; CLIP: {'world' if args.clip else 'stand-in'}")
    print(
        f"{args.groups} groups x {args.frames} frames, {args.steps} steps, guidance "
        f"{args.guidance}, omitted: {sorted(omit) or 'nothing'}, background: "
        f"{'fixed' if args.fixed_background else 'changing'}"
    )
    print_table("consistency_clip (CLIP cosine with the identity shot)", clip_scores)
    if oracle is not None:
        print_table("oracle agreement with the identity shot (open attributes)", oracle_scores)


if __name__ == "__main__":
    sys.exit(main())
