"""The consistency filter: real CLIP and ArcFace embeddings (the stand-in models) of photos
known to be alike (the astronaut, lightly changed) and known to differ (other photos)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from engine_fixtures import one_thread  # noqa: F401  (a fixture: pytest finds it by name)
from PIL import Image
from skimage import data
from typer.testing import CliRunner

from charaforge.cli import app
from charaforge.config import ClipConfig, ConsistencyFilterConfig, FaceConfig, ScoreConfig
from charaforge.evaluate import consistency
from charaforge.evaluate.sweep import FILTER_DIR, score_sweep
from charaforge.models.clip import load_clip
from charaforge.models.face import load_face_scorer

pytestmark = pytest.mark.usefixtures("one_thread")

ALIKE = ("a_noisy", "b_crop")
DIFFERENT = ("c_camera", "d_coffee", "e_chelsea", "f_rocket")


def _photos() -> dict[str, Image.Image]:
    astronaut = Image.fromarray(data.astronaut())
    noise = np.random.default_rng(0).normal(0, 8, (512, 512, 3))
    return {
        "a_noisy": Image.fromarray(np.clip(np.asarray(astronaut) + noise, 0, 255).astype(np.uint8)),
        "b_crop": astronaut.crop((20, 20, 492, 492)),
        "c_camera": Image.fromarray(data.camera()).convert("RGB"),
        "d_coffee": Image.fromarray(data.coffee()),
        "e_chelsea": Image.fromarray(data.chelsea()),
        "f_rocket": Image.fromarray(data.rocket()),
    }


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("filter")
    references, batch = root / "references", root / "batch"
    references.mkdir()
    batch.mkdir()
    astronaut = Image.fromarray(data.astronaut())
    astronaut.save(references / "0.png")
    astronaut.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(references / "1.png")
    for name, photo in _photos().items():
        photo.save(batch / f"{name}.png")
    (batch / "c_camera.json").write_text('{"seed": 1}')
    return references, batch


def test_clip_scores_rank_alike_above_different_and_sort_into_folders(
    folders: tuple[Path, Path], tmp_path: Path
) -> None:
    references, batch = folders
    clip = load_clip(ClipConfig(source="stand_in", model_name="ViT-B-32"))
    refs = consistency.dataset_references(references)
    table = consistency.filter_to_folders(
        batch, refs, tmp_path, consistency.FilterThresholds(clip_i=0.985), clip=clip
    )
    scores = dict(zip(table["file"], table["clip_i"], strict=True))
    # computed independently: mean cosine with each reference, from the embedder directly
    embeddings = clip.embed_images([batch / "b_crop.png"])
    expected = float(np.mean(embeddings @ clip.embed_images(refs).T))
    assert scores["b_crop.png"] == pytest.approx(expected, abs=1e-6)
    assert min(scores[f"{n}.png"] for n in ALIKE) > max(scores[f"{n}.png"] for n in DIFFERENT)
    assert table["accepted"].tolist() == [True, True, False, False, False, False]
    assert sorted(p.name for p in (tmp_path / "accepted").iterdir()) == [
        "a_noisy.png",
        "b_crop.png",
    ]
    rejected = sorted(p.name for p in (tmp_path / "rejected").iterdir())
    assert rejected == [
        "c_camera.json",
        "c_camera.png",
        "d_coffee.png",
        "e_chelsea.png",
        "f_rocket.png",
    ]
    # rejects are kept byte for byte, and the batch itself is untouched
    assert (tmp_path / "rejected" / "c_camera.png").read_bytes() == (
        batch / "c_camera.png"
    ).read_bytes()
    assert len(list(batch.glob("*.png"))) == 6
    written = pd.read_parquet(tmp_path / "scores.parquet")
    assert written["location"].tolist()[:3] == [
        "accepted/a_noisy.png",
        "accepted/b_crop.png",
        "rejected/c_camera.png",
    ]
    assert written["reason"][2].startswith("clip_i ")
    assert (tmp_path / "scores.csv").read_text().splitlines()[0] == ",".join(
        consistency.FILTER_COLUMNS
    )

    # a stricter rerun moves an accepted image over: no file is in both folders
    stricter = consistency.filter_to_folders(
        batch, refs, tmp_path, consistency.FilterThresholds(clip_i=0.9895), clip=clip
    )
    assert stricter["accepted"].tolist() == [True, False, False, False, False, False]
    assert not (tmp_path / "accepted" / "b_crop.png").exists()
    assert (tmp_path / "rejected" / "b_crop.png").is_file()


def test_identity_threshold_uses_arcface_and_rejects_faceless_images(
    folders: tuple[Path, Path], tmp_path: Path
) -> None:
    references, batch = folders
    with load_face_scorer(FaceConfig()) as face:
        table = consistency.filter_to_folders(
            batch,
            consistency.dataset_references(references),
            tmp_path,
            consistency.FilterThresholds(identity=0.9),
            face=face,
        )
    by_file = table.set_index("file")
    assert by_file.loc["a_noisy.png", "accepted"] and by_file.loc["a_noisy.png", "identity"] > 0.9
    assert not by_file.loc["e_chelsea.png", "face_found"]  # a cat
    assert by_file.loc["e_chelsea.png", "reason"] == "no face"
    assert not by_file.loc["e_chelsea.png", "accepted"]
    assert np.isnan(by_file["clip_i"]).all()  # not asked for, not computed


def test_filter_command_and_its_errors(
    folders: tuple[Path, Path],
    tmp_path: Path,
    params_dict: dict,
    caplog: pytest.LogCaptureFixture,
) -> None:
    references, batch = folders
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(params_dict))
    out = tmp_path / "sorted"
    command = ["filter", str(batch), "--references", str(references), "--out", str(out)]
    result = CliRunner().invoke(
        app, [*command, "--clip-threshold", "0.985", "--params", str(params)]
    )
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (out / "accepted").glob("*.png")) == ["a_noisy.png", "b_crop.png"]
    neither = CliRunner().invoke(app, [*command, "--params", str(params)])
    assert neither.exit_code == 2 and neither.exception is not None
    assert "give a CLIP-I or an identity threshold" in caplog.text
    missing = CliRunner().invoke(
        app, [*command[:1], str(tmp_path / "nope"), *command[2:], "--clip-threshold", "0.5"]
    )
    assert missing.exit_code == 2


def test_score_stage_filter_option_sorts_the_sweep(tmp_path: Path) -> None:
    """score.filter on: the sweep's images sorted by the CLIP-I the stage computed; off: nothing."""
    from test_evaluate_sweep import _index, _metadata

    _index(tmp_path, rows=3)
    _metadata(tmp_path)
    # image 2 is the reference's colour: CLIP-I 1 (the others are other colours)
    Image.new("RGB", (32, 32), (200, 30, 30)).save(tmp_path / "data/generate/images/2.png")
    clip = ClipConfig(source="stand_in", model_name="ViT-B-32")
    enabled = ConsistencyFilterConfig(enabled=True, clip_threshold=0.9999)
    arguments = (tmp_path / "data/generate", tmp_path / "data/dataset")
    scores = score_sweep(
        *arguments,
        ScoreConfig(clip=clip, batch_size=4, filter=enabled),
        "aoi_cf",
        tmp_path / "out",
        root=tmp_path,
    )
    table = pd.read_parquet(tmp_path / "out" / FILTER_DIR / "scores.parquet")
    np.testing.assert_allclose(table["clip_i"], scores["clip_i"].round(6))
    assert table["accepted"].tolist() == [False, False, True]
    assert table["file"].tolist() == ["0.png", "1.png", "2.png"]
    assert sorted(p.name for p in (tmp_path / "out/filter/accepted").iterdir()) == ["2.png"]
    assert len(list((tmp_path / "out/filter/rejected").iterdir())) == 2
    score_sweep(
        *arguments, ScoreConfig(clip=clip, batch_size=4), "aoi_cf", tmp_path / "off", root=tmp_path
    )
    assert not (tmp_path / "off" / FILTER_DIR).exists()
    with pytest.raises(ValueError, match="clip_threshold or identity_threshold"):
        ConsistencyFilterConfig(enabled=True)
