"""Ground truth for world images: the attribute oracle's verdict on each sweep image.

Not a scorer: the oracle (`charaforge.models.world_oracle`) was trained apart from the CLIP and
the tagger, and its numbers are shown apart ("ground truth, world only") and used by the tests
to judge the scorers and the selection.

Per image it names the most probable value of every attribute. Against a target:

- identity: the share of the character's attributes (`CHARACTER_ATTRIBUTES`, values from the
  demo character or any other) the image has right;
- prompt following: the share of the attributes the prompt names that are not the character's
  (e.g. the background) the image has right; NaN when the prompt names none;
- prompt accuracy: the share of every attribute the prompt names that the image has right, and
  whether it has all of them (the base model's test: a prompt naming all six attributes).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from PIL import Image

from charaforge.core.images import open_rgb
from charaforge.evaluate.columns import resolve_image_path
from charaforge.models.world_oracle import (
    OracleNet,
    load_world_oracle,
    oracle_pixels,
    predict_indices,
)
from charaforge.prepare.world import CHARACTER_ATTRIBUTES, DEMO_CHARACTER, parse_caption

ORACLE_METRICS = ("oracle_identity", "oracle_prompt_following", "oracle_prompt_accuracy")


@dataclass
class AttributeOracle:
    net: OracleNet
    batch_size: int = 64

    @property
    def attributes(self) -> dict[str, tuple[str, ...]]:
        return self.net.attributes

    def predict(self, images: Sequence[Image.Image | str | Path]) -> list[dict[str, str]]:
        """Per image, the most probable value of every attribute (input order kept)."""
        predicted: list[dict[str, str]] = []
        for start in range(0, len(images), self.batch_size):
            batch = [open_rgb(item) for item in images[start : start + self.batch_size]]
            indices = predict_indices(self.net, oracle_pixels(batch), self.batch_size)
            for row in range(len(batch)):
                predicted.append(
                    {
                        name: values[int(indices[name][row])]
                        for name, values in self.attributes.items()
                    }
                )
        return predicted


def load_oracle(folder: str | Path, batch_size: int = 64) -> AttributeOracle:
    """The oracle the world stage wrote to `folder` (data/world/oracle)."""
    return AttributeOracle(load_world_oracle(folder), batch_size)


def _share_right(predicted: Mapping[str, str], target: Mapping[str, str]) -> float:
    if not target:
        return math.nan
    return sum(predicted.get(name) == value for name, value in target.items()) / len(target)


def identity_score(predicted: Mapping[str, str], character: Mapping[str, str]) -> float:
    """Share of the character's attributes the image has right."""
    wanted = {name: value for name, value in character.items() if name in CHARACTER_ATTRIBUTES}
    return _share_right(predicted, wanted)


def prompt_following_score(predicted: Mapping[str, str], prompted: Mapping[str, str]) -> float:
    """Share of the prompted non-character attributes (e.g. background) right; NaN if none."""
    return _share_right(
        predicted,
        {name: value for name, value in prompted.items() if name not in CHARACTER_ATTRIBUTES},
    )


def judge_predictions(
    predictions: Sequence[Mapping[str, str]],
    prompts: Sequence[str],
    character: Mapping[str, str] | None = None,
) -> pd.DataFrame:
    """One row per image: the predicted attributes and the three scores against the targets.

    `character`: the identity the images should show (default: the demo character); `prompts`:
    each image's prompt, read with `parse_caption` (the trigger word and unknown tags are ignored).
    """
    if len(predictions) != len(prompts):
        raise ValueError(f"{len(predictions)} predictions but {len(prompts)} prompts")
    character = dict(DEMO_CHARACTER if character is None else character)
    rows = []
    for predicted, prompt in zip(predictions, prompts, strict=True):
        prompted = parse_caption(prompt)
        accuracy = _share_right(predicted, prompted)
        rows.append(
            {
                **{f"oracle_{name}": value for name, value in predicted.items()},
                "oracle_identity": identity_score(predicted, character),
                "oracle_prompt_following": prompt_following_score(predicted, prompted),
                "oracle_prompt_accuracy": accuracy,
                "oracle_prompt_all_right": (accuracy == 1.0) if prompted else None,
            }
        )
    return pd.DataFrame(rows)


def judge_images(
    oracle: AttributeOracle,
    images: Sequence[Image.Image | str | Path],
    prompts: Sequence[str],
    character: Mapping[str, str] | None = None,
) -> pd.DataFrame:
    """`judge_predictions` on the oracle's predictions for `images` (batched, deterministic)."""
    return judge_predictions(oracle.predict(images), prompts, character)


def judge_sweep(
    index: pd.DataFrame, folder: str | Path, root: str | Path, batch_size: int = 64
) -> pd.DataFrame:
    """oracle.parquet: the sweep's index columns, then the oracle's verdict on every image."""
    images = [resolve_image_path(Path(root), str(path)) for path in index["image_path"]]
    judged = judge_images(load_oracle(folder, batch_size), images, list(index["prompt"]))
    return pd.concat([index.reset_index(drop=True), judged], axis=1)
