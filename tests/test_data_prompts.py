"""Evaluation prompts built from the character's own dataset (eval.from_data)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from conftest import stand_in_params_dict

from charaforge.config import DataPromptsConfig, validate_params
from charaforge.errors import ConfigError
from charaforge.generate import data_prompts
from charaforge.generate.sweep import sweep_prompts

CONFIG = DataPromptsConfig(
    enabled=True,
    defining_fraction=0.6,
    max_tags=3,
    framings=["full body", "upper body"],
    actions=["standing", "sitting", "waving"],
    backgrounds=["beach"],
)
TAGS = {
    "a": ["1boy", "green hair", "scarf", "standing", "white background"],
    "b": ["1boy", "green hair", "scarf", "sitting", "white background"],
    "c": ["1boy", "green hair", "glasses", "standing", "grey background"],
    "d": ["1boy", "green hair", "scarf", "standing", "white background"],
    "p": ["photo", "1girl", "camera"],  # a photo among drawings does not count
}


def _dataset(folder: Path) -> Path:
    folder.mkdir()
    styles = ["photo" if tags[0] == "photo" else "illustration" for tags in TAGS.values()]
    pd.DataFrame({"tags": list(TAGS.values()), "style": styles}).to_parquet(
        folder / "metadata.parquet"
    )
    return folder


def test_defining_tags_leave_out_contexts_and_photos(tmp_path: Path) -> None:
    tag_lists = data_prompts.dataset_tag_lists(_dataset(tmp_path / "dataset"))
    assert len(tag_lists) == 4
    # Counted by hand over the four drawings: 1boy 4, green hair 4, scarf 3, standing 3 (a
    # context), white background 3 (a background), glasses 1. 0.6 x 4 = 2.4 images needed.
    assert data_prompts.character_tags(tag_lists, CONFIG) == ["1boy", "green hair", "scarf"]
    fewer = CONFIG.model_copy(update={"max_tags": 2})
    assert data_prompts.character_tags(tag_lists, fewer) == ["1boy", "green hair"]


def test_one_prompt_per_context_cycling_the_lists() -> None:
    prompts = data_prompts.prompts_from_tags(["1boy", "green hair"], CONFIG)
    assert prompts == [
        "{trigger}, 1boy, green hair, full body, standing, beach",
        "{trigger}, 1boy, green hair, upper body, sitting, beach",
        "{trigger}, 1boy, green hair, full body, waving, beach",
    ]


def test_the_sweep_renders_hand_written_then_dataset_prompts(tmp_path: Path) -> None:
    raw = stand_in_params_dict()
    raw["eval"]["prompts"] = ["{trigger}, portrait"]
    raw["eval"]["from_data"] = CONFIG.model_dump()
    raw["eval"]["suites"] = {}
    params = validate_params(raw)
    resolved = data_prompts.resolve_prompts(params.eval, _dataset(tmp_path / "dataset"))
    texts = [prompt.text for prompt in sweep_prompts(resolved, "bob_cf", tmp_path)]
    assert texts == [
        "bob_cf, portrait",
        "bob_cf, 1boy, green hair, scarf, full body, standing, beach",
        "bob_cf, 1boy, green hair, scarf, upper body, sitting, beach",
        "bob_cf, 1boy, green hair, scarf, full body, waving, beach",
    ]
    # Switched off, only the hand-written prompt is left.
    raw["eval"]["from_data"]["enabled"] = False
    plain = validate_params(raw).eval
    assert data_prompts.resolve_prompts(plain, tmp_path / "missing") == plain


def test_no_prompt_at_all_is_a_config_error() -> None:
    raw = stand_in_params_dict()
    raw["eval"].update(prompts=[], suites={})
    raw["eval"]["from_data"]["enabled"] = False
    with pytest.raises(ConfigError, match="no prompts"):
        validate_params(raw)
    raw["eval"]["from_data"].update(enabled=True, template="{trigger}, {hair}")
    with pytest.raises(ConfigError, match="eval.from_data.template"):
        validate_params(raw)
