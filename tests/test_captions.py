"""Captions you can trust: images that come without a caption are tagged by a model tagger when
one is configured, and when none is the dataset stage stops with one message (unless
`data.allow_trigger_only_captions`), and the dataset card says what happened."""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import REPO_ROOT, stand_in_params_dict
from PIL import Image

from charaforge.config import Params, validate_params
from charaforge.errors import ConfigError
from charaforge.prepare import dataset, dedupe, ingest, pose
from charaforge.tagging import run

CLIP_TAGGER = yaml.safe_load((REPO_ROOT / "conf/tagger/clip.yaml").read_text(encoding="utf-8"))


def _folder(root: Path, sidecars: dict[int, str]) -> Path:
    """Four images that hash far apart; `sidecars` gives some of them a .txt caption."""
    source = root / "bob"
    source.mkdir(parents=True)
    for index in range(4):
        blocks = np.random.default_rng(index).integers(0, 255, (8, 8, 3), dtype=np.uint8)
        Image.fromarray(blocks).resize((96, 96), Image.NEAREST).save(source / f"bob_{index}.png")
        if index in sidecars:
            (source / f"bob_{index}.txt").write_text(sidecars[index], encoding="utf-8")
    return source


def _params(tagger: dict | None = None, allow: bool = False) -> Params:
    raw = stand_in_params_dict()
    if tagger is not None:
        raw["tagger"] = tagger
    raw["data"]["allow_trigger_only_captions"] = allow
    return validate_params(raw)


def _prepare(root: Path, source: Path, params: Params) -> None:
    with contextlib.chdir(root):
        ingest.ingest_folder(str(source), "data/ingest", params.data.ingest)
        dedupe.dedupe_folder("data/ingest", "data/dedupe", params.data.dedupe)
        run.tag_folder("data/ingest", "data/dedupe", "data/tag", params.tagger)
        pose.pose_folder("data/ingest", "data/dedupe", "data/pose", params.pose)


def _build(root: Path, params: Params) -> dataset.DatasetSummary:
    with contextlib.chdir(root):
        return dataset.build_dataset(
            "data/ingest",
            "data/dedupe",
            "data/tag",
            "data/pose",
            "data/dataset",
            params.data.dataset,
            character="bob",
            trigger="bob_cf",
            seed=params.seed,
            allow_trigger_only_captions=params.data.allow_trigger_only_captions,
        )


def test_uncaptioned_images_stop_the_dataset_stage_with_the_fix(tmp_path: Path) -> None:
    params = _params()  # tagger=sidecar, no model tagger
    _prepare(tmp_path, _folder(tmp_path, {0: "red scarf, smile"}), params)
    with pytest.raises(ConfigError) as stop:
        _build(tmp_path, params)
    message = str(stop.value)
    assert "\n" not in message
    assert message.startswith("3 of 4 images have no caption")
    for fix in ("tagger=clip", "tagger.fill_missing", "data.allow_trigger_only_captions=true"):
        assert fix in message
    assert not (tmp_path / "data/dataset").exists(), "nothing is written before the stop"

    # Explicitly allowed: the run goes on and the card lists the three images.
    allowed = _params(allow=True)
    summary = _build(tmp_path, allowed)
    assert summary.trigger_only_captions == 3
    table = pd.read_parquet(tmp_path / "data/dataset/metadata.parquet")
    assert sorted(table["caption"]) == ["bob_cf"] * 3 + ["bob_cf, red scarf, smile"]
    card = (tmp_path / "data/dataset/README.md").read_text(encoding="utf-8")
    assert "**3 images are captioned with the trigger word alone**" in card
    bare = table[table["caption"] == "bob_cf"]["image_id"]
    assert all(f"- `{image_id}`" in card for image_id in bare)


def test_a_model_tagger_fills_in_the_missing_captions(tmp_path: Path) -> None:
    tagger = {**CLIP_TAGGER, "backend": "sidecar", "fill_missing": "clip"}
    tagger["clip"] = {**tagger["clip"], "threshold": 0.0}  # the stand-in CLIP: keep every tag
    params = _params(tagger)
    _prepare(tmp_path, _folder(tmp_path, {0: "red scarf, smile"}), params)
    tags = pd.read_parquet(tmp_path / "data/tag/tags.parquet")
    by_source = dict(zip(tags["image_id"], tags["tagger"], strict=True))
    assert sorted(by_source.values()).count("sidecar") == 1
    models = [name for name in by_source.values() if name != "sidecar"]
    assert len(models) == 3 and all(name.startswith("clip-zero-shot") for name in models)
    assert (tags["tags"].map(len) > 0).all()

    summary = _build(tmp_path, params)  # no stop: every image has tags
    assert summary.trigger_only_captions == 0 and summary.without_tags == 0
    table = pd.read_parquet(tmp_path / "data/dataset/metadata.parquet")
    assert all(caption.startswith("bob_cf, ") for caption in table["caption"])
    card = (tmp_path / "data/dataset/README.md").read_text(encoding="utf-8")
    assert "| `sidecar` | 1 |" in card
    assert "No image is captioned with the trigger word alone" in card
    header = yaml.safe_load(card.split("---\n")[1])
    assert header["task_categories"] == ["text-to-image"]
    train_files = header["configs"][0]["data_files"][0]
    assert train_files == {"split": "train", "path": "imagefolder/train/*"}


def test_fill_missing_needs_the_sidecar_backend_and_its_model_settings() -> None:
    with pytest.raises(ConfigError, match="tagger.clip.vocabulary"):
        _params({**CLIP_TAGGER, "backend": "sidecar", "fill_missing": "clip", "clip": {}})
    with pytest.raises(ConfigError, match="fill_missing applies to backend 'sidecar'"):
        _params({**CLIP_TAGGER, "fill_missing": "clip"})
