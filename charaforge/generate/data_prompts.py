"""Evaluation prompts from the character's own dataset (`eval.from_data`).

A new character is evaluated on its own attributes: its defining tags (the tags carried by at
least `defining_fraction` of its images, most frequent first, at most `max_tags`) put into each
context of the template (a framing, an action, a background), so the sweep asks for the
character in situations its dataset may not show. Tags that describe a context rather than the
character (any tag of the context lists, any "... background") are left out of the defining
tags: the contexts set those. Photos in a set of drawings (other people, references) do not
count, as the dataset's own pruning does.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from charaforge.config import DataPromptsConfig, EvalConfig
from charaforge.errors import require_stage_output

log = logging.getLogger(__name__)

PHOTO_STYLE = "photo"  # metadata.parquet `style` of photos (charaforge.prepare.dataset)


def _context_tags(config: DataPromptsConfig) -> set[str]:
    parts = [*config.framings, *config.actions, *config.backgrounds]
    return {tag.strip().lower() for part in parts for tag in part.split(",") if tag.strip()}


def character_tags(tag_lists: Sequence[Sequence[str]], config: DataPromptsConfig) -> list[str]:
    """The defining tags of the character, most frequent first (ties by name)."""
    if not tag_lists:
        return []
    context = _context_tags(config)
    counts = Counter(tag for tags in tag_lists for tag in dict.fromkeys(str(t) for t in tags))
    needed = config.defining_fraction * len(tag_lists) - 1e-9
    ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    defining = [
        tag
        for tag, count in ranked
        if count >= needed and tag not in context and not tag.endswith("background")
    ]
    return defining[: config.max_tags]


def prompts_from_tags(tags: Sequence[str], config: DataPromptsConfig) -> list[str]:
    """One prompt per context; `{trigger}` stays for the sweep to fill in."""
    prompts = []
    for index in range(config.count):
        text = config.template.format(
            trigger="{trigger}",
            tags=", ".join(tags),
            framing=config.framings[index % len(config.framings)],
            action=config.actions[index % len(config.actions)],
            background=config.backgrounds[index % len(config.backgrounds)],
        )
        prompts.append(", ".join(part.strip() for part in text.split(",") if part.strip()))
    return prompts


def dataset_tag_lists(dataset_dir: str | Path) -> list[list[str]]:
    """The tags of the dataset's images (photos left out unless every image is a photo)."""
    path = Path(dataset_dir) / "metadata.parquet"
    require_stage_output(path, "dataset")
    table = pd.read_parquet(path, columns=["tags", "style"])
    drawings = table[table["style"] != PHOTO_STYLE]
    chosen = drawings if len(drawings) else table
    return [[str(tag) for tag in tags] for tags in chosen["tags"]]


def resolve_prompts(eval: EvalConfig, dataset_dir: str | Path) -> EvalConfig:
    """`eval` with the dataset's prompts appended to the hand-written ones (when enabled)."""
    if not eval.from_data.enabled:
        return eval
    tags = character_tags(dataset_tag_lists(dataset_dir), eval.from_data)
    if not tags:
        log.warning(
            "eval.from_data: no tag is on %.0f%% of the images; the prompts carry only the trigger "
            "and the contexts",
            100 * eval.from_data.defining_fraction,
        )
    prompts = prompts_from_tags(tags, eval.from_data)
    log.info("eval.from_data: defining tags %s; %d prompts", ", ".join(tags), len(prompts))
    # Resolved: the prompts are now in `prompts`, so from_data is off in the copy.
    resolved = eval.from_data.model_copy(update={"enabled": False})
    return eval.model_copy(update={"prompts": [*eval.prompts, *prompts], "from_data": resolved})
