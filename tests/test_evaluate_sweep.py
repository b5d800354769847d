"""The score stage's contracts: the columns of scores.parquet in their declared order, and the
error contract (a missing or malformed input is a `MissingInputError` that names the stage to
run; the stage exits 2 with one line, never a traceback)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml
from PIL import Image

from charaforge.config import ClipConfig, ScoreConfig
from charaforge.core.files import write_parquet
from charaforge.errors import MissingInputError
from charaforge.evaluate.columns import INDEX_COLUMNS, METRIC_COLUMNS, METRICS
from charaforge.evaluate.sweep import score_sweep

WRITTEN_ORDER = (
    "clip_i",
    "clip_t",
    "diversity",
    "consistency_clip",
    "nn_similarity",
    "nn_phash_distance",
    "memorised",
    "face_detected",
    "arcface",
    "consistency_arcface",
    "pose_oks",
    "pose_pck_01",
    "pose_pck_02",
    "pose_detected",
    "tag_precision",
    "tag_recall",
    "context_alignment",
)
CONFIG = ScoreConfig(clip=ClipConfig(source="stand_in", model_name="ViT-B-32"), batch_size=4)


def test_score_stage_in_an_empty_repo_exits_2_with_one_line(
    repo_root: Path, tmp_path: Path, params_dict: dict
) -> None:
    params_dict["tracking"]["enabled"] = False  # no MLflow store needed to reach the check
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params_dict), encoding="utf-8")
    result = subprocess.run(
        [sys.executable, "-m", "stages.score"],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(repo_root)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1, result.stderr
    assert "data/generate/index.parquet" in errors[0] and "`generate` stage" in errors[0]
    assert not (tmp_path / "data/score").exists(), "nothing may be written on a missing input"


def _index(root: Path, rows: int = 2) -> pd.DataFrame:
    records = []
    for number in range(rows):
        relative = f"data/generate/images/{number}.png"
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (32, 32), (40 * number, 90, 160)).save(root / relative)
        records.append(
            {
                "image_id": f"img{number}",
                "image_path": relative,
                "candidate": "base",
                "step": 0,
                "lora_scale": 0.0,
                "prompt_index": 0,
                "prompt": "aoi_cf, 1girl",
                "seed": number,
            }
        )
    index = pd.DataFrame(records)[list(INDEX_COLUMNS)]
    write_parquet(root / "data/generate/index.parquet", index)
    return index


def _metadata(root: Path, split: str = "train", image_exists: bool = True) -> None:
    relative = "data/dataset/images/ref.png"
    if image_exists:
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (32, 32), (200, 30, 30)).save(root / relative)
    row = {"image_id": "ref", "image_path": relative, "split": split, "tags": ["1girl"]}
    write_parquet(root / "data/dataset/metadata.parquet", pd.DataFrame([row]))


def _score(root: Path) -> pd.DataFrame:
    return score_sweep(
        root / "data/generate", root / "data/dataset", CONFIG, "aoi_cf", root / "out", root=root
    )


def _broken_index_columns(root: Path) -> None:
    write_parquet(root / "data/generate/index.parquet", _index(root).drop(columns=["prompt"]))


def _unreadable_index(root: Path) -> None:
    _index(root)
    (root / "data/generate/index.parquet").write_bytes(b"not a parquet file")


def _missing_sweep_image(root: Path) -> None:
    _index(root)
    (root / "data/generate/images/1.png").unlink()


@pytest.mark.parametrize(
    ("prepare", "expected"),
    [
        (lambda root: _metadata(root), r"generate/index\.parquet: not found.*`generate`"),
        (lambda root: _index(root), r"dataset/metadata\.parquet: not found.*`dataset`"),
        (lambda root: (_broken_index_columns(root), _metadata(root)), r"lacks columns \['prompt'"),
        (lambda root: (_unreadable_index(root), _metadata(root)), r"unreadable.*`generate`"),
        (lambda root: (_missing_sweep_image(root), _metadata(root)), r"1 listed image.*1\.png"),
        (lambda root: (_index(root), _metadata(root, split="val")), r"no train-split.*`dataset`"),
        (
            lambda root: (_index(root), _metadata(root, image_exists=False)),
            r"metadata\.parquet: 1 listed image.*ref\.png.*`dataset`",
        ),
    ],
    ids=[
        "no-index",
        "no-dataset",
        "index-columns",
        "unreadable-index",
        "missing-sweep-image",
        "no-train-split",
        "missing-reference-image",
    ],
)
def test_missing_or_malformed_inputs_name_the_stage(
    tmp_path: Path, prepare: object, expected: str
) -> None:
    prepare(tmp_path)  # type: ignore[operator]
    with pytest.raises(MissingInputError, match=expected):
        _score(tmp_path)
    assert not (tmp_path / "out").exists()


def test_scores_table_follows_the_column_contract(tmp_path: Path) -> None:
    index = _index(tmp_path, rows=3)
    index["pose_image_id"] = None  # an optional engine column: carried after the index columns
    write_parquet(tmp_path / "data/generate/index.parquet", index)
    _metadata(tmp_path)
    scores = _score(tmp_path)
    table = pd.read_parquet(tmp_path / "out/scores.parquet")
    assert list(table.columns) == [*INDEX_COLUMNS, "pose_image_id", *METRIC_COLUMNS]
    # The order is part of the file's bytes (DVC hashes): pinned here, not derived.
    assert METRIC_COLUMNS == WRITTEN_ORDER and sorted(METRIC_COLUMNS) == sorted(METRICS)
    pd.testing.assert_frame_equal(table, scores)
    scorers = json.loads((tmp_path / "out/scorers.json").read_text(encoding="utf-8"))
    assert sorted(scorers) == sorted(METRIC_COLUMNS)
    assert all({"model", "scale", "stand_in", "applicable"} <= set(scorers[m]) for m in scorers)
