"""Sweep axes: a suite rendered with several methods (paired prompts and seeds, the index's
`method` column) and poses through several control types (maps made from the person's photo,
the `control_type` column), and the report's side-by-side table of each axis."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from engine_fixtures import one_thread  # noqa: F401  (a fixture: pytest finds it by name)
from PIL import Image, ImageDraw
from pydantic import ValidationError
from skimage import data as skimage_data

from charaforge.config import EvalConfig, ModelConfig, SuiteConfig
from charaforge.core.files import write_json
from charaforge.errors import ConfigError
from charaforge.evaluate.groups import suite_groups
from charaforge.generate.engine import GenerationEngine
from charaforge.generate.records import read_sidecar
from charaforge.generate.sweep import run_sweep
from charaforge.models.base import write_base
from charaforge.selection.axes import axis_tables

SUITE = """white room#{trigger}, 1girl#standing
white room#{trigger}, 1girl#waving
white room#{trigger}, 1girl#sitting
"""
PERSON = "p1"

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A stand-in base, no candidates (the base row), a suite, one person of a pose stage with
    its skeleton and its ingested photo (scikit-image's astronaut)."""
    root = tmp_path_factory.mktemp("sweep_axes")
    write_base(ModelConfig(family="sd15", source="stand_in", resolution=64), root / "base")
    write_json(root / "train" / "summary.json", {"candidates": []})
    (root / "suite.txt").write_text(SUITE)
    (root / "pose" / "skeletons").mkdir(parents=True)
    pd.DataFrame([{"image_id": PERSON, "has_person": True}]).to_parquet(
        root / "pose" / "keypoints.parquet"
    )
    skeleton = Image.new("RGB", (64, 64))
    ImageDraw.Draw(skeleton).line((32, 8, 24, 56), fill=(0, 255, 0), width=3)
    skeleton.save(root / "pose" / "skeletons" / f"{PERSON}.png")
    (root / "ingest" / "images").mkdir(parents=True)
    photo = Image.fromarray(skimage_data.astronaut()).resize((64, 64), Image.Resampling.LANCZOS)
    photo.save(root / "ingest" / "images" / f"{PERSON}.png")
    return root


def _eval(workspace: Path) -> EvalConfig:
    return EvalConfig(
        prompts=["{trigger}, portrait"],
        seeds=[0],
        lora_scales=[0.0],
        steps=2,
        guidance_scale=4.0,
        scheduler="euler",
        suites={
            "fixed": {
                "file": str(workspace / "suite.txt"),
                "seeds": [0],
                "method": ["independent", "shared_attention"],
                "share_background": True,  # the stand-in's maps are arbitrary: share everything
            }
        },
        pose={"enabled": True, "control_types": ["openpose", "canny"]},
    )


@pytest.fixture(scope="module")
def swept(workspace: Path) -> tuple[pd.DataFrame, Path, GenerationEngine]:
    engine = GenerationEngine(workspace / "base", device="cpu")
    out = workspace / "generate"
    result = run_sweep(
        engine,
        workspace / "train",
        _eval(workspace),
        "t",
        64,
        0,
        out,
        pose_dir=workspace / "pose",
        ingest_dir=workspace / "ingest",
    )
    assert result.rendered == len(result.index) == 1 + 3 * 2 + 2
    return result.index, out, engine


def _pixels(path: str) -> bytes:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB")).tobytes()


def test_a_method_axis_renders_the_suite_once_per_method_paired(
    swept: tuple[pd.DataFrame, Path, GenerationEngine],
) -> None:
    index, _, _ = swept
    suite = index[index["suite"] == "fixed"]
    by_method = {m: rows.sort_values("prompt_index") for m, rows in suite.groupby("method")}
    assert set(by_method) == {"independent", "shared_attention"}
    plain, shared = by_method["independent"], by_method["shared_attention"]
    # Paired: the same prompts and generator seeds; different files.
    assert list(plain["prompt_index"]) == list(shared["prompt_index"])
    assert list(plain["seed"]) == list(shared["seed"])
    assert not set(plain["image_path"]) & set(shared["image_path"])
    assert all("_m-shared_attention" in path for path in shared["image_path"])
    paths = list(
        zip(plain["image_path"], shared["image_path"], plain["identity_shot"], strict=True)
    )
    for plain_path, shared_path, identity in paths:
        # The identity shot renders alone either way; the frames attended to it when sharing.
        assert (_pixels(plain_path) == _pixels(shared_path)) == bool(identity)
        assert "consistency" not in read_sidecar(Path(plain_path))
        record = read_sidecar(Path(shared_path))["consistency"]
        assert ("identity" in record) == (not identity)  # a frame names its identity shot
    assert set(index.loc[index["suite"].isna(), "method"]) == {"independent"}
    # The consistency score groups each method apart.
    keys, _ = suite_groups(index)
    suite_keys = {key for key in keys if key is not None}
    assert len(suite_keys) == 2 and all(
        k.endswith(("|independent", "|shared_attention")) for k in suite_keys
    )


def test_a_control_type_axis_conditions_each_person_through_each_type(
    swept: tuple[pd.DataFrame, Path, GenerationEngine], workspace: Path
) -> None:
    import cv2

    index, out, _ = swept
    posed = index[index["pose_image_id"].notna()].set_index("control_type")
    assert sorted(posed.index) == ["canny", "openpose"]
    assert posed.loc["canny", "seed"] == posed.loc["openpose", "seed"]  # paired
    assert _pixels(posed.loc["canny", "image_path"]) != _pixels(posed.loc["openpose", "image_path"])
    assert index.loc[index["pose_image_id"].isna(), "control_type"].isna().all()
    # The map that conditioned the canny image: OpenCV's Canny of the photo, saved for the user.
    with Image.open(workspace / "ingest" / "images" / f"{PERSON}.png") as photo:
        gray = np.asarray(photo.convert("L"))
    expected = cv2.Canny(gray, 100, 200)
    with Image.open(out / "controls" / f"{PERSON}-canny.png") as saved:
        assert np.array_equal(np.asarray(saved)[..., 0], expected)
    assert not (out / "controls" / f"{PERSON}-openpose.png").exists()  # the pose stage's
    record = read_sidecar(Path(posed.loc["canny", "image_path"]))
    assert record["conditioning"]["control_type"] == "canny"


def test_the_sweep_resumes_with_both_axes(
    swept: tuple[pd.DataFrame, Path, GenerationEngine], workspace: Path
) -> None:
    _, out, engine = swept
    again = run_sweep(
        engine,
        workspace / "train",
        _eval(workspace),
        "t",
        64,
        0,
        out,
        pose_dir=workspace / "pose",
        ingest_dir=workspace / "ingest",
    )
    assert again.rendered == 0 and again.skipped == len(again.index)


def test_the_report_table_compares_the_levels_pair_by_pair(
    swept: tuple[pd.DataFrame, Path, GenerationEngine],
) -> None:
    index, _, _ = swept
    scores = index.copy()
    rng = np.random.default_rng(0)
    scores["consistency_clip"] = rng.uniform(0.2, 0.9, len(scores))
    scores["pose_oks"] = rng.uniform(0.0, 1.0, len(scores))
    scores.loc[scores["pose_image_id"].isna(), "pose_oks"] = np.nan
    tables = {
        t.column: t for t in axis_tables(scores, ["consistency_clip", "pose_oks"], 200, 0.95, 0)
    }
    assert set(tables) == {"method", "control_type"}
    frames = scores[(scores["suite"] == "fixed") & ~scores["identity_shot"]]
    plain = frames[frames["method"] == "independent"].sort_values("prompt_index")
    shared = frames[frames["method"] == "shared_attention"].sort_values("prompt_index")
    difference = (
        shared["consistency_clip"].to_numpy() - plain["consistency_clip"].to_numpy()
    ).mean()
    rows = {row[0]: row for row in tables["method"].rows}
    assert rows["independent"][-2] == "reference"
    assert rows["shared_attention"][-2].startswith(f"{difference:+.4f} [")
    assert rows["shared_attention"][-1] == "2"  # two frames paired, identity shots left out
    assert rows["shared_attention"][2] == f"{shared['consistency_clip'].mean():.4f}"
    posed = scores[scores["pose_image_id"].notna()].set_index("control_type")
    control = {row[0]: row for row in tables["control_type"].rows}
    oks = posed.loc["canny", "pose_oks"] - posed.loc["openpose", "pose_oks"]
    assert control["canny"][-2].startswith(f"{oks:+.4f} [")
    # One level only: no table for that axis.
    single = axis_tables(
        scores[scores["method"] == "independent"], ["consistency_clip"], 10, 0.95, 0
    )
    assert all(table.column != "method" for table in single)


def test_axis_options_are_checked(workspace: Path, tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="each method once"):
        SuiteConfig(file="s.txt", method=["independent", "independent"])
    with pytest.raises(ValidationError, match="window"):
        SuiteConfig(file="s.txt", window=[0.5, 0.5])
    with pytest.raises(ValidationError, match="control_types"):
        EvalConfig(
            prompts=["x"], seeds=[0], lora_scales=[0.0], steps=1, guidance_scale=1,
            scheduler="euler", pose={"control_types": ["canny", "canny"]},
        )  # fmt: skip
    with pytest.raises(ConfigError, match="no ingest folder"):
        run_sweep(
            GenerationEngine(workspace / "base", device="cpu"),
            workspace / "train",
            _eval(workspace),
            "t",
            64,
            0,
            tmp_path / "o",
            pose_dir=workspace / "pose",
        )
