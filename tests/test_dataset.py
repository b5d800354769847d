"""Dataset captions from a template and the dataset card (counts, tag frequencies, a plot)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from charaforge.config import DatasetConfig
from charaforge.prepare import dataset, dataset_card

TAGS = ["1girl", "solo", "red hair", "blue dress", "standing", "arms up", "white background"]


def test_caption_template_fields_place_each_tag_once() -> None:
    template = "{trigger}, {character}, {outfit}, {pose}, {tags}"
    caption = dataset.caption_of(template, "aoi_cf", "aoi", TAGS)
    assert caption == (
        "aoi_cf, aoi, blue dress, standing, arms up, 1girl, solo, red hair, white background"
    )
    # Without {outfit} in the template the outfit stays among the tags.
    assert dataset.caption_of("{trigger}, {tags}", "t", "aoi", TAGS) == "t, " + ", ".join(TAGS)
    # Empty fields leave no stray separators.
    assert dataset.caption_of(template, "t", "aoi", ["solo"]) == "t, aoi, solo"
    photo = dataset.caption_of("{style} of {character}, {tags}", "t", "kim", ["photo", "smile"])
    assert photo == "photo of kim, smile"


def test_pruning_leaves_the_characters_defining_tags_to_the_trigger() -> None:
    """prune_defining_fraction: tags on >= that share of the character's images leave {tags}
    (the trigger absorbs them); tags that vary stay; a photo's tags do not count."""
    image_tags = {
        "a": ["1girl", "pink hair", "hat", "beach background"],
        "b": ["1girl", "pink hair", "hat", "snow background"],
        "c": ["1girl", "pink hair", "city background"],
        "d": ["1girl", "pink hair", "hat", "room background"],
        "p": ["photo", "1boy", "smile"],  # a photo in the set: not the character
    }
    rows = pd.DataFrame(
        {"image_id": list(image_tags), "source_path": [f"{k}.png" for k in image_tags]}
    )
    tags = pd.DataFrame({"image_id": list(image_tags), "tags": list(image_tags.values())})
    poses = pd.DataFrame({"image_id": list(image_tags), "has_person": True})

    def captions(fraction: float | None) -> dict[str, str]:
        config = DatasetConfig(
            val_fraction=0.0,
            caption_template="{trigger}, {tags}",
            kohya_repeats=1,
            prune_defining_fraction=fraction,
        )
        table = dataset.build_metadata(rows, tags, poses, config, "momo", "momo_cf", 0, "x")
        return dict(zip(table["image_id"], table["caption"], strict=True))

    # 1girl and pink hair are on 4/4 character images, hat on 3/4: 0.75 prunes all three.
    assert captions(0.75) == {
        "a": "momo_cf, beach background",
        "b": "momo_cf, snow background",
        "c": "momo_cf, city background",
        "d": "momo_cf, room background",
        "p": "momo_cf, photo, 1boy, smile",
    }
    assert captions(1.0)["a"] == "momo_cf, hat, beach background"
    assert captions(None)["a"] == "momo_cf, 1girl, pink hair, hat, beach background"


def test_caption_template_rejects_unknown_fields() -> None:
    with pytest.raises(ValueError, match="unknown fields"):
        DatasetConfig(val_fraction=0.2, caption_template="{trigger}, {hair}", kohya_repeats=1)
    config = DatasetConfig(
        val_fraction=0.2, caption_template="{trigger}, {outfit}, {pose}, {style}", kohya_repeats=1
    )
    assert config.card_top_tags == 20


def _table(count: int) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    rows = []
    for k in range(count):
        tags = [tag for tag in TAGS if rng.random() < 0.6] + (["photo"] if k % 4 == 0 else [])
        rows.append(
            {
                "image_id": f"{k:016x}",
                "tags": tags,
                "style": dataset.style_of(tags),
                "split": "val" if k % 5 == 0 else "train",
                "notes": "no person detected" if k % 3 == 0 else "",
                "caption": dataset.caption_of("{trigger}, {tags}", "aoi_cf", "aoi", tags),
            }
        )
    return pd.DataFrame(rows)


def test_dataset_card_counts_frequencies_and_plot(tmp_path: Path) -> None:
    table = _table(20)
    config = DatasetConfig(
        val_fraction=0.2, caption_template="{trigger}, {tags}", kohya_repeats=5, card_top_tags=4
    )
    counts = {"quarantined by ingest": 3}
    dataset_card.write_card(tmp_path, table, config, "aoi", "aoi_cf", ["sidecar"], counts)
    card = (tmp_path / "README.md").read_text(encoding="utf-8")
    assert "| images | 20 |" in card and "| train / val | 16 / 4 |" in card
    assert "| quarantined by ingest | 3 |" in card and "| no person detected | 7 |" in card
    assert "kohya/5_aoi_cf/" in card and "Stand-in" not in card
    frequency = pd.read_csv(tmp_path / "tag_frequency.csv")
    expected = pd.Series([t for tags in table.tags for t in tags]).value_counts()
    assert dict(zip(frequency.tag, frequency["count"], strict=True)) == expected.to_dict()
    for tag, count in zip(frequency.tag[:4], frequency["count"][:4], strict=True):
        assert f"| {tag} | {count} | {count / 20:g}" in card
    with Image.open(tmp_path / "tag_frequency.png") as plot:
        assert plot.format == "PNG" and plot.width > 300 and "Software" not in plot.info
        assert len(np.unique(np.asarray(plot.convert("L")))) > 10  # something is drawn
    first = (tmp_path / "tag_frequency.png").read_bytes()
    dataset_card.write_card(tmp_path, table, config, "aoi", "aoi_cf", ["clip (stand-in)"], counts)
    assert "Stand-in tagger" in (tmp_path / "README.md").read_text(encoding="utf-8")
    dataset_card.write_card(tmp_path, table, config, "aoi", "aoi_cf", ["sidecar"], counts)
    assert (tmp_path / "tag_frequency.png").read_bytes() == first  # same data, same bytes
