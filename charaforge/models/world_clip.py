"""The world CLIP: an open_clip CLIP (ViT image tower, CLIP BPE text tower) trained on renders.

Captions are the world's tags. Each step pairs every render with one caption variant drawn
afresh: the full caption, a subset of its tags, a single tag ("pink hair", "beach background"),
or the bare "a picture", half of them prefixed "a picture of ". Single tags and the baseline are
what the score stage's CLIP zero-shot tagger asks ("a picture of {tag}" against "a picture").

A batch has many true pairs besides the diagonal ("pink hair" is true of every pink-haired
render), so the contrastive loss is multi-positive: the target of each image is spread evenly
over every caption in the batch whose tags it all carries, and the same for each caption.

That loss alone learns the big areas (background, outfit colour) but leaves hair and accessories
at chance within the budget: a batch holds few captions that tell two hair colours apart. So a
second contrastive term asks each image the zero-shot questions themselves, every step: per
attribute, a softmax over "a picture of <value>" for all its values (InfoNCE whose negatives are
the attribute's other values), and per tag, whether "a picture of <tag>" beats "a picture" (the
CLIP zero-shot tagger's decision). The prompts are a few dozen short texts, cheap to encode.

Even that term alone left hair at chance while the text tower trained at the image tower's rate:
it pulled the six hair prompts onto one feature faster than the image tower could learn a few
pixels of hair, and once the prompts agree nothing teaches the image tower hair. Frozen random
text towers keep them apart (hair 97% on the hair question alone), so the text tower trains 30x
slower than the image tower (`text_learning_rate`).
Preprocessing is open_clip's own inference transform at 32 px, for training as for scoring.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from charaforge.config.world import WorldClipConfig
from charaforge.core.files import atomic_path, derive_seed, write_json
from charaforge.models.clip import WORLD_CLIP_ARCHITECTURE, WORLD_CLIP_NAME, register_architectures
from charaforge.models.world_common import (
    WORLD_TAGS,
    RenderPool,
    batch_indices,
    multi_hot,
    render_pool,
    scene_tags,
    seeded_deterministic,
    warmup_cosine,
)
from charaforge.prepare.world import ATTRIBUTES, Scene, attribute_tags

log = logging.getLogger(__name__)

CHECKPOINT_NAME = "open_clip_model.safetensors"
PREFIX = "a picture of "
BASELINE = "a picture"


def caption_variant(scene: Scene, rng: random.Random) -> tuple[str, list[str]]:
    """One training caption for `scene` and the tags it names."""
    tags = scene_tags(scene)
    draw = rng.random()
    if draw < 0.04:
        return BASELINE, []
    if draw < 0.4:
        chosen = tags
    elif draw < 0.7:
        keep = rng.randint(1, len(tags) - 1)
        chosen = [tags[i] for i in sorted(rng.sample(range(len(tags)), keep))]
    else:
        chosen = [rng.choice(attribute_tags(scene))]
    text = ", ".join(chosen)
    return (PREFIX + text if rng.random() < 0.5 else text), chosen


def zero_shot_questions() -> list[tuple[tuple[str, ...], list[str], list[tuple[str, ...]]]]:
    """(attributes, prompts, values) per zero-shot question, as the score stage asks them.

    The colour and kind of outfit are one question (one tag, e.g. "yellow dress"); no accessory
    is the baseline "a picture".
    """
    questions: list[tuple[tuple[str, ...], list[str], list[tuple[str, ...]]]] = []
    for name, values in ATTRIBUTES.items():
        if name in ("outfit_colour", "outfit"):
            continue
        if name == "accessory":
            prompts = [BASELINE if v == "none" else PREFIX + v for v in values]
        else:
            suffix = " hair" if name.startswith("hair") else f" {name}"
            prompts = [PREFIX + value + suffix for value in values]
        questions.append(((name,), prompts, [(value,) for value in values]))
    pairs = [(c, k) for c in ATTRIBUTES["outfit_colour"] for k in ATTRIBUTES["outfit"]]
    questions.append((("outfit_colour", "outfit"), [PREFIX + f"{c} {k}" for c, k in pairs], pairs))
    return questions


def question_targets(scenes: list[Scene]) -> list[torch.Tensor]:
    """Per zero-shot question, the index of each scene's answer (int64)."""
    return [
        torch.tensor([values.index(tuple(scene.get(n) for n in names)) for scene in scenes])
        for names, _prompts, values in zero_shot_questions()
    ]


def zero_shot_loss(
    image_features: torch.Tensor,
    question_features: list[torch.Tensor],
    targets: list[torch.Tensor],
    tag_features: torch.Tensor,
    baseline_feature: torch.Tensor,
    tag_targets: torch.Tensor,
    logit_scale: torch.Tensor,
) -> torch.Tensor:
    """Cross-entropy of every question's softmax plus the tags' tag-vs-baseline decisions."""
    answers = [
        F.cross_entropy(logit_scale * image_features @ prompts.T, target)
        for prompts, target in zip(question_features, targets, strict=True)
    ]
    margins = logit_scale * (
        image_features @ tag_features.T - (image_features @ baseline_feature)[:, None]
    )
    decisions = F.binary_cross_entropy_with_logits(margins, tag_targets)
    return torch.stack(answers).mean() + decisions


def multi_positive_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    positives: torch.Tensor,
) -> torch.Tensor:
    """Symmetric InfoNCE with targets spread over every true (image, caption) pair."""
    logits = logit_scale * image_features @ text_features.T
    image_targets = positives / positives.sum(dim=1, keepdim=True)
    text_targets = positives.T / positives.T.sum(dim=1, keepdim=True)
    image_loss = -(image_targets * F.log_softmax(logits, dim=1)).sum(dim=1).mean()
    text_loss = -(text_targets * F.log_softmax(logits.T, dim=1)).sum(dim=1).mean()
    return (image_loss + text_loss) / 2


def parameter_groups(model: torch.nn.Module, config: WorldClipConfig) -> list[dict[str, Any]]:
    """The image tower and logit scale at `learning_rate`, the text tower at its own rate.

    The text tower maps a handful of prompts; at the image tower's rate it moves them faster
    than the image tower learns the small features (hair, accessories) that would tell them
    apart, and the prompts of those attributes collapse onto one feature for good.
    """
    image, text = [], []
    for name, parameter in model.named_parameters():
        (image if name.startswith("visual.") or name == "logit_scale" else text).append(parameter)
    return [
        {"params": image, "lr": config.learning_rate},
        {"params": text, "lr": config.text_learning_rate},
    ]


def _preprocessed(pool: RenderPool, preprocess: Any) -> torch.Tensor:
    return torch.stack([preprocess(Image.fromarray(pixels)) for pixels in pool.pixels])


def train_world_clip(
    config: WorldClipConfig, seed: int, image_size: int
) -> tuple[torch.nn.Module, Any, Any, dict[str, float]]:
    """Train the world CLIP; returns (model, preprocess, tokenizer, metrics)."""
    import open_clip

    register_architectures()
    with seeded_deterministic(derive_seed(seed, "world-clip", "weights")):
        # open_clip warns on the root logger that no pretrained weights were loaded: expected here.
        previous = logging.root.manager.disable
        logging.disable(logging.WARNING)
        try:
            model, _, preprocess = open_clip.create_model_and_transforms(WORLD_CLIP_NAME)
        finally:
            logging.disable(previous)
        tokenizer = open_clip.get_tokenizer(WORLD_CLIP_NAME)
        pool = render_pool(seed, "world-clip", config.train_images, image_size, exclude_demo=True)
        pixels = _preprocessed(pool, preprocess)
        image_tags = torch.from_numpy(multi_hot([scene_tags(scene) for scene in pool.scenes]))
        answers = question_targets(pool.scenes)
        questions = zero_shot_questions()
        question_tokens = [tokenizer(prompts) for _names, prompts, _values in questions]
        tag_tokens = tokenizer([PREFIX + tag for tag in WORLD_TAGS] + [BASELINE])
        texts = random.Random(derive_seed(seed, "world-clip", "captions"))
        batches = torch.Generator().manual_seed(derive_seed(seed, "world-clip", "batches"))
        optimizer = torch.optim.AdamW(
            parameter_groups(model, config), weight_decay=config.weight_decay
        )
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: warmup_cosine(step, config.steps, config.warmup_steps)
        )
        token_cache: dict[str, torch.Tensor] = {}
        model.train()
        losses = []
        for _ in tqdm(range(config.steps), desc="world CLIP", unit="step", disable=None):
            chosen = batch_indices(batches, len(pool), config.batch_size)
            variants = [caption_variant(pool.scenes[int(i)], texts) for i in chosen]
            for text, _tags in variants:
                if text not in token_cache:
                    token_cache[text] = tokenizer([text])[0]
            tokens = torch.stack([token_cache[text] for text, _tags in variants])
            text_tags = torch.from_numpy(multi_hot([tags for _text, tags in variants]))
            # A caption is true of an image when the image carries every tag the caption names.
            positives = ((text_tags @ (1.0 - image_tags[chosen]).T) == 0).T.float()
            image_features = F.normalize(model.encode_image(pixels[chosen]), dim=-1)
            text_features = F.normalize(model.encode_text(tokens), dim=-1)
            scale = model.logit_scale.exp()
            loss = multi_positive_loss(image_features, text_features, scale, positives)
            if config.zero_shot_weight > 0:
                prompt_features = [
                    F.normalize(model.encode_text(t), dim=-1) for t in question_tokens
                ]
                tag_features = F.normalize(model.encode_text(tag_tokens), dim=-1)
                loss = loss + config.zero_shot_weight * zero_shot_loss(
                    image_features,
                    prompt_features,
                    [target[chosen] for target in answers],
                    tag_features[:-1],
                    tag_features[-1],
                    image_tags[chosen],
                    scale,
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            with torch.no_grad():  # CLIP's clamp: a temperature below 1/100 only destabilises
                model.logit_scale.clamp_(0, float(np.log(100)))
            losses.append(float(loss.detach()))
        model.eval()
    metrics = {
        "clip_loss_first": round(losses[0], 4),
        "clip_loss_last": round(float(np.mean(losses[-10:])), 4),
        "clip_logit_scale": round(float(model.logit_scale.detach().exp()), 3),
    }
    return model, preprocess, tokenizer, metrics


@torch.inference_mode()
def zero_shot_metrics(
    model: torch.nn.Module, preprocess: Any, tokenizer: Any, pool: RenderPool
) -> dict[str, float]:
    """Zero-shot attribute accuracies on held-out renders, as the score stage would ask them.

    Per attribute: argmax over "a picture of <value tag>" (the colour and kind of outfit come
    from one tag, e.g. "yellow dress"; no accessory is the baseline "a picture"). Tag accuracy:
    the CLIP zero-shot tagger's decision (tag prompt closer than the baseline) against the truth.
    """
    images = F.normalize(model.encode_image(_preprocessed(pool, preprocess)), dim=-1)

    def embed(texts: list[str]) -> torch.Tensor:
        return F.normalize(model.encode_text(tokenizer(texts)), dim=-1)

    metrics: dict[str, float] = {}
    truth = pool.attribute_targets()
    for names, prompts, values in zero_shot_questions():
        chosen = (images @ embed(prompts).T).argmax(dim=1).tolist()
        for position, name in enumerate(names):
            options = ATTRIBUTES[name]
            predicted = torch.tensor([options.index(values[index][position]) for index in chosen])
            metrics[f"clip_zero_shot_{name}"] = round(
                float((predicted == truth[name]).float().mean()), 4
            )
    tag_texts = embed([PREFIX + tag for tag in WORLD_TAGS])
    baseline = embed([BASELINE])[0]
    said = (images @ tag_texts.T) > (images @ baseline)[:, None]
    correct = (said == pool.tag_targets().bool()).float()
    metrics["clip_tagger_accuracy"] = round(float(correct.mean()), 4)
    metrics["clip_tagger_worst_tag_accuracy"] = round(float(correct.mean(dim=0).min()), 4)
    return metrics


def save_world_clip(model: torch.nn.Module, folder: Path) -> Path:
    """`folder/open_clip_model.safetensors` (what load_clip reads) and `folder/config.json`."""
    from safetensors.torch import save_file

    with atomic_path(folder) as staging:
        staging.mkdir(parents=True)
        state = {key: value.detach().contiguous() for key, value in model.state_dict().items()}
        save_file(state, staging / CHECKPOINT_NAME)
        write_json(
            staging / "config.json",
            {
                "model_name": WORLD_CLIP_NAME,
                "architecture": WORLD_CLIP_ARCHITECTURE,
                "checkpoint": CHECKPOINT_NAME,
            },
        )
    return folder / CHECKPOINT_NAME
