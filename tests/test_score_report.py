"""Scoring (CLIP-I / CLIP-T on the open_clip stand-in) and the model selection report.

Inputs are synthesised in tmp_path exactly as docs/data-contracts.md describes them: real PNG
files drawn with PIL, the index / metadata parquet tables, the train summary and base model.json.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from PIL import Image, ImageDraw

from charaforge.config import (
    ClipConfig,
    PoseConfig,
    ReportConfig,
    ScoreConfig,
    TaggerConfig,
    TagScoreConfig,
)
from charaforge.core.files import sha256_bytes, write_json, write_parquet
from charaforge.errors import ConfigError
from charaforge.evaluate import (
    clip as clip_metrics,
    columns as score_columns,
    groups as sweep_groups,
    memorisation,
    tags as tag_metrics,
)
from charaforge.evaluate.sweep import score_sweep
from charaforge.models import clip
from charaforge.pipeline.stage import run_stage
from charaforge.selection import ranking, report, statistics
from charaforge.selection.champion import Selection, choose_champion

TRIGGER = "aoi_cf"
PROMPTS = [f"{TRIGGER}, 1girl, red hair, standing", f"{TRIGGER}, 1girl, red hair, sitting"]
CANDIDATES = {"r4_lr1e-3": [4, 8], "r8_lr3e-4": [4, 8]}
SCALES = [0.5, 1.0]
SEEDS = [0, 1]
SCORED = ["clip_i", "clip_t", "diversity", "nn_similarity"]


def _drawing(seed: int, size: int = 64) -> Image.Image:
    """A small character-like drawing whose colours and layout depend on `seed`."""
    rng = np.random.default_rng(seed)
    background = tuple(int(v) for v in rng.integers(150, 256, 3))
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    x, y = (int(v) for v in rng.integers(8, 24, 2))
    draw.ellipse([x, y, x + 24, y + 24], fill=(230, 190, 160))  # face
    draw.rectangle([x - 4, y - 6, x + 28, y + 4], fill=(200, 30, 30))  # red hair
    draw.rectangle(
        [x + 4, y + 24, x + 20, size - 2], fill=tuple(int(v) for v in rng.integers(0, 256, 3))
    )
    return image


def _save_png(root: Path, relative: str, image: Image.Image) -> tuple[str, str]:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG")
    return relative, sha256_bytes(path.read_bytes())[:16]


def _make_dataset(root: Path, n_train: int = 4, n_val: int = 2) -> None:
    rows = []
    for number in range(n_train + n_val):
        image = _drawing(1000 + number)
        relative, image_id = _save_png(root, f"data/dataset/images/tmp{number}.png", image)
        final = f"data/dataset/images/{image_id}.png"
        (root / relative).rename(root / final)
        rows.append(
            {
                "image_id": image_id,
                "image_path": final,
                "character": "aoi",
                "outfit": "school uniform",
                "pose_tag": "standing",
                "style": "anime",
                "tags": ["1girl", "red hair"],
                "source": "demo",
                "split": "train" if number < n_train else "val",
                "notes": "",
                "caption": f"{TRIGGER}, 1girl, red hair",
            }
        )
    write_parquet(root / "data/dataset/metadata.parquet", pd.DataFrame(rows))


def _sweep_rows() -> list[dict]:
    """candidate x step x scale x prompt x seed, with scale 0 rendered once as `base`, step 0."""
    combos = [("base", 0, 0.0)] + [
        (name, step, scale)
        for name, steps in CANDIDATES.items()
        for step in steps
        for scale in SCALES
    ]
    rows = []
    for candidate, step, scale in combos:
        for prompt_index, prompt in enumerate(PROMPTS):
            for seed in SEEDS:
                rows.append(
                    {
                        "candidate": candidate,
                        "step": step,
                        "lora_scale": scale,
                        "prompt_index": prompt_index,
                        "prompt": prompt,
                        "seed": seed,
                    }
                )
    return rows


def _make_generate(root: Path) -> pd.DataFrame:
    rows = []
    for number, row in enumerate(_sweep_rows()):
        name = "_".join(
            str(row[k]) for k in ("candidate", "step", "lora_scale", "prompt_index", "seed")
        )
        relative, image_id = _save_png(root, f"data/generate/images/{name}.png", _drawing(number))
        rows.append({"image_id": image_id, "image_path": relative, **row})
    index = pd.DataFrame(rows)[list(score_columns.INDEX_COLUMNS)]
    write_parquet(root / "data/generate/index.parquet", index)
    return index


def _make_train_and_base(root: Path, stand_in: bool = True) -> None:
    candidates = [
        {
            "name": name,
            "rank": 4,
            "alpha": 4,
            "learning_rate": 1e-3,
            "checkpoints": steps,
            "final_loss": 0.1,
        }
        for name, steps in CANDIDATES.items()
    ]
    write_json(root / "data/train/summary.json", {"candidates": candidates, "stand_in": stand_in})
    write_json(
        root / "data/base/model.json",
        {
            "family": "sd15",
            "source": "stand_in" if stand_in else "pretrained",
            "stand_in": stand_in,
            "path": None,
            "resolution": 64,
        },
    )


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("repo")
    _make_dataset(root)
    _make_generate(root)
    _make_train_and_base(root)
    return root


@pytest.fixture(scope="module")
def embedder() -> clip.ClipEmbedder:
    return clip.load_clip(ClipConfig(source="stand_in", model_name="ViT-B-32"))


def _score_config(batch_size: int = 16, tags: TagScoreConfig | None = None) -> ScoreConfig:
    return ScoreConfig(
        clip=ClipConfig(source="stand_in", model_name="ViT-B-32"),
        batch_size=batch_size,
        tags=tags or TagScoreConfig(),
    )


POSE = PoseConfig(backend="mediapipe", model_complexity=1, min_detection_confidence=0.5)


def _score(
    repo: Path,
    out: Path,
    batch_size: int = 16,
    generate: Path | None = None,
    tagger: TaggerConfig | None = None,
    config: ScoreConfig | None = None,
) -> pd.DataFrame:
    return score_sweep(
        generate or repo / "data/generate",
        repo / "data/dataset",
        config or _score_config(batch_size),
        TRIGGER,
        out,
        root=repo,
        pose_dir=repo / "data/pose",
        pose_config=POSE,
        tagger_config=tagger,
    )


# --- scoring ---------------------------------------------------------------------------------


def test_identical_image_has_clip_i_one(embedder: clip.ClipEmbedder) -> None:
    image = _drawing(7)
    generated = embedder.embed_images([image])
    references = embedder.embed_images([image.copy(), image.copy()])
    assert clip_metrics.clip_i_scores(generated, references)[0] == pytest.approx(1.0, abs=1e-5)
    other = embedder.embed_images([_drawing(8)])
    assert clip_metrics.clip_i_scores(other, references)[0] < 1.0 - 1e-4


def test_stand_in_is_deterministic_and_seeded(embedder: clip.ClipEmbedder) -> None:
    images = [_drawing(seed) for seed in range(3)]
    again = clip.load_clip(ClipConfig(source="stand_in", model_name="ViT-B-32"))
    np.testing.assert_array_equal(embedder.embed_images(images), again.embed_images(images))
    other_seed = clip.load_clip(
        ClipConfig(source="stand_in", model_name="ViT-B-32", stand_in_seed=1)
    )
    assert not np.allclose(embedder.embed_images(images), other_seed.embed_images(images))


def test_permuting_a_batch_permutes_the_embeddings(embedder: clip.ClipEmbedder) -> None:
    images = [_drawing(seed) for seed in range(12)]
    order = np.random.default_rng(0).permutation(len(images))
    plain = embedder.embed_images(images, batch_size=12)
    permuted = embedder.embed_images([images[i] for i in order], batch_size=12)
    np.testing.assert_allclose(permuted, plain[order], atol=1e-6, rtol=0)
    texts = ["1girl, red hair", "a cat", "1girl, sitting"]
    text_plain = embedder.embed_texts(texts)
    np.testing.assert_allclose(
        embedder.embed_texts(texts[::-1]), text_plain[::-1], atol=1e-6, rtol=0
    )


def test_strip_trigger() -> None:
    assert clip_metrics.strip_trigger("aoi_cf, 1girl, red hair", "aoi_cf") == "1girl, red hair"
    assert clip_metrics.strip_trigger("1girl,  aoi_cf ,red hair,", "aoi_cf") == "1girl, red hair"
    assert clip_metrics.strip_trigger("photo of AOI_CF standing", "aoi_cf") == "photo of standing"
    # Only the whole word goes: a tag that merely contains the trigger is kept.
    assert clip_metrics.strip_trigger("aoi_cfx, aoi_cf", "aoi_cf") == "aoi_cfx"
    assert clip_metrics.strip_trigger("a+b, cat", "a+b") == "cat"


def test_score_sweep_outputs(repo: Path, tmp_path: Path) -> None:
    scores = _score(repo, tmp_path / "score")
    index = pd.read_parquet(repo / "data/generate/index.parquet")
    table = pd.read_parquet(tmp_path / "score/scores.parquet")
    columns = list(table.columns)
    assert columns[: len(score_columns.INDEX_COLUMNS)] == list(score_columns.INDEX_COLUMNS)
    assert sorted(columns[len(score_columns.INDEX_COLUMNS) :]) == sorted(score_columns.METRICS)
    pd.testing.assert_frame_equal(table[list(score_columns.INDEX_COLUMNS)], index)
    pd.testing.assert_frame_equal(table, scores)
    assert table[["clip_i", "clip_t"]].abs().le(1.0).all().all()
    scorers = json.loads((tmp_path / "score/scorers.json").read_text())
    assert sorted(scorers) == sorted(score_columns.METRICS)
    for metric in ("clip_i", "clip_t", "diversity", "nn_similarity"):
        info = scorers[metric]
        assert info["stand_in"] is True and info["applicable"] is True
        assert info["model"] == clip.STAND_IN_NAME
        assert {"resize", "crop", "mean", "std"} <= set(info["preprocessing"])
    assert scorers["clip_i"]["scale"] == "raw cosine, -1..1"
    assert "4 images" in scorers["clip_i"]["references"]  # the train split only
    # Drawings have no detectable face; the sweep has no pose column: those metrics are NaN and
    # marked not applicable, nothing crashes.
    assert scorers["arcface"]["applicable"] is False
    assert scorers["arcface"]["images_without_face"] == len(index)
    assert scorers["arcface"]["stand_in"] is True
    assert table["face_detected"].eq(0.0).all() and table["arcface"].isna().all()
    for metric in ("pose_oks", "pose_pck_01", "pose_pck_02", "pose_detected"):
        assert scorers[metric]["applicable"] is False
        assert "pose_image_id" in scorers[metric]["reason"]
        assert table[metric].isna().all()
    # Tags: CLIP zero-shot over the dataset's vocabulary, on the (stand-in) scoring CLIP.
    assert scorers["tag_recall"]["applicable"] is True
    assert scorers["tag_recall"]["defining_tags"] == ["1girl", "red hair"]
    assert (
        scorers["tag_recall"]["stand_in"] is True and "(stand-in)" in scorers["tag_recall"]["model"]
    )
    assert table[["tag_precision", "tag_recall"]].stack().between(0.0, 1.0).all()
    assert str(tmp_path) not in (tmp_path / "score/scorers.json").read_text()


def test_tag_consistency_known_answers_through_the_scorer(repo: Path, tmp_path: Path) -> None:
    # Threshold 0: every vocabulary tag is predicted, so recall and precision are 1 (the whole
    # vocabulary, "1girl" and "red hair", is defining). Threshold 1: nothing is predicted.
    few = tmp_path / "few_generate"  # four sweep images are enough here
    write_parquet(few / "index.parquet", pd.read_parquet(repo / "data/generate/index.parquet")[:4])
    everything = TagScoreConfig(threshold=0.0)
    scores = _score(repo, tmp_path / "all", config=_score_config(tags=everything), generate=few)
    assert scores["tag_recall"].eq(1.0).all() and scores["tag_precision"].eq(1.0).all()
    nothing = TagScoreConfig(threshold=1.0)
    scores = _score(repo, tmp_path / "none", config=_score_config(tags=nothing), generate=few)
    assert scores["tag_recall"].eq(0.0).all() and scores["tag_precision"].isna().all()
    # The pipeline's sidecar tagger cannot see pixels: not applicable, not an error.
    sidecar = TaggerConfig(backend="sidecar", general_threshold=0.35, character_threshold=0.85)
    config = _score_config(tags=TagScoreConfig(tagger="pipeline"))
    scores = _score(repo, tmp_path / "sidecar", config=config, tagger=sidecar, generate=few)
    scorers = json.loads((tmp_path / "sidecar/scorers.json").read_text())
    assert (
        scorers["tag_recall"]["applicable"] is False
        and "sidecar" in scorers["tag_recall"]["reason"]
    )
    assert scores[["tag_precision", "tag_recall"]].isna().all().all()


def test_clip_t_uses_the_prompt_without_trigger(
    repo: Path, tmp_path: Path, embedder: clip.ClipEmbedder
) -> None:
    scores = _score(repo, tmp_path / "score")
    first = scores.iloc[0]
    image = embedder.embed_images([repo / first["image_path"]])
    stripped = embedder.embed_texts([clip_metrics.strip_trigger(first["prompt"], TRIGGER)])
    with_trigger = embedder.embed_texts([first["prompt"]])
    assert first["clip_t"] == pytest.approx(float(image[0] @ stripped[0]), abs=1e-6)
    assert first["clip_t"] != pytest.approx(float(image[0] @ with_trigger[0]), abs=1e-6)


def test_batch_size_and_row_order_do_not_change_scores(repo: Path, tmp_path: Path) -> None:
    reference = _score(repo, tmp_path / "b16", batch_size=16)
    for batch_size in (7,):
        other = _score(repo, tmp_path / f"b{batch_size}", batch_size=batch_size)
        np.testing.assert_allclose(other[SCORED], reference[SCORED], atol=1e-6, rtol=0)
    # Same sweep, rows shuffled: the scores move with their rows and nothing else changes.
    shuffled_dir = tmp_path / "shuffled_generate"
    index = pd.read_parquet(repo / "data/generate/index.parquet")
    order = np.random.default_rng(1).permutation(len(index))
    write_parquet(shuffled_dir / "index.parquet", index.iloc[order])
    shuffled = _score(repo, tmp_path / "shuffled", generate=shuffled_dir)
    expected = reference.iloc[order].reset_index(drop=True)
    pd.testing.assert_frame_equal(
        shuffled.drop(columns=list(score_columns.METRICS)),
        expected.drop(columns=list(score_columns.METRICS)),
    )
    np.testing.assert_allclose(shuffled[SCORED], expected[SCORED], atol=1e-6, rtol=0)


def test_score_sweep_is_byte_deterministic(repo: Path, tmp_path: Path) -> None:
    _score(repo, tmp_path / "a")
    _score(repo, tmp_path / "b")
    for name in ("scores.parquet", "scorers.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_pretrained_weights_missing_fail_clearly(tmp_path: Path) -> None:
    config = ClipConfig(
        source="pretrained", model_name="ViT-B-32", path=str(tmp_path / "nope.safetensors")
    )
    with pytest.raises(ConfigError, match="score.clip.path.*not found"):
        clip.load_clip(config)
    with pytest.raises(ValueError, match="path"):
        ClipConfig(source="pretrained", model_name="ViT-B-32")


def test_pretrained_weights_load_from_a_local_file(
    embedder: clip.ClipEmbedder, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The pretrained path, on a checkpoint of the stand-in architecture found via AI_CACHE_ROOT."""
    torch.save(embedder.model.state_dict(), tmp_path / "tiny_clip.pt")
    monkeypatch.setenv("AI_CACHE_ROOT", str(tmp_path))
    monkeypatch.chdir(tmp_path.parent)
    config = ClipConfig(source="pretrained", model_name=clip.STAND_IN_NAME, path="tiny_clip.pt")
    loaded = clip.load_clip(config)
    assert loaded.stand_in is False
    assert loaded.description["weights"] == "tiny_clip.pt"
    assert len(loaded.description["weights_sha256"]) == 64
    images = [_drawing(seed) for seed in range(3)]
    np.testing.assert_array_equal(loaded.embed_images(images), embedder.embed_images(images))
    np.testing.assert_array_equal(loaded.embed_texts(["1girl"]), embedder.embed_texts(["1girl"]))


# --- report ----------------------------------------------------------------------------------


def _synthetic_scores(root: Path, best: tuple[str, int, float], noise: float = 0.002) -> None:
    """A scores table where `best` is clearly ahead (others 0.30, best 0.60, small noise)."""
    index = pd.read_parquet(root / "data/generate/index.parquet")
    rng = np.random.default_rng(0)
    is_best = (
        (index["candidate"] == best[0])
        & (index["step"] == best[1])
        & (index["lora_scale"] == best[2])
    ).to_numpy()
    level = np.where(is_best, 0.60, 0.30)
    scores = index.assign(
        clip_i=level + rng.normal(0, noise, len(index)),
        clip_t=level + rng.normal(0, noise, len(index)),
    )
    _write_scores(root, scores)


def _write_scores(root: Path, scores: pd.DataFrame, stand_in: bool = True) -> None:
    write_parquet(root / "data/score/scores.parquet", scores)
    info = {"model": "charaforge-tiny-clip", "scale": "raw cosine, -1..1", "stand_in": stand_in}
    write_json(root / "data/score/scorers.json", {"clip_i": info, "clip_t": info})


def _report(root: Path, out: Path, seed: int = 1234, **overrides) -> Selection:  # noqa: ANN003
    config = ReportConfig(**{"weights": {"clip_i": 0.5, "clip_t": 0.5}, "title": "T", **overrides})
    return report.report_selection(
        root / "data/score",
        root / "data/generate",
        root / "data/train",
        config,
        out,
        root / "data/base",
        seed=seed,
        root=root,
    )


@pytest.fixture
def report_repo(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    _make_generate(root)
    _make_train_and_base(root)
    return root


def test_report_names_the_known_best_row(report_repo: Path, tmp_path: Path) -> None:
    _synthetic_scores(report_repo, ("r8_lr3e-4", 4, 1.0))
    selection = _report(report_repo, tmp_path / "reports")
    assert (
        selection.champion["candidate"],
        selection.champion["step"],
        selection.champion["lora_scale"],
    ) == ("r8_lr3e-4", 4, 1.0)
    assert not selection.statistical_tie
    metrics = json.loads((tmp_path / "reports/metrics.json").read_text())
    champion = metrics["champion"]
    assert set(champion) == {
        "candidate",
        "step",
        "lora_scale",
        "clip_i",
        "clip_t",
        "composite",
        "ci_low",
        "ci_high",
        "n_images",
        "copy_fraction",
    }
    assert champion["candidate"] == "r8_lr3e-4" and champion["n_images"] == len(PROMPTS) * len(
        SEEDS
    )
    assert champion["ci_low"] <= champion["composite"] <= champion["ci_high"]
    assert champion["composite"] == pytest.approx(0.60, abs=0.01)
    assert metrics["baseline_composite"] == pytest.approx(0.30, abs=0.01)
    assert metrics["stand_in"] is True and metrics["statistical_tie"] is False
    table = selection.table
    assert table["rank"].tolist() == list(range(1, len(table) + 1))
    assert table.iloc[0]["candidate"] == "r8_lr3e-4"
    assert "base" in table["candidate"].tolist()  # the baseline row is shown
    curve = pd.read_csv(tmp_path / "reports/plots/score_by_step/r8_lr3e-4.csv")
    assert curve.columns[:5].tolist() == ["step", "lora_scale", "composite", "clip_i", "clip_t"]
    assert curve["step"].tolist() == [4, 8] and curve.loc[0, "lora_scale"] == 1.0
    assert sorted(p.name for p in (tmp_path / "reports/plots/score_by_step").iterdir()) == [
        "r4_lr1e-3.csv",
        "r8_lr3e-4.csv",
    ]
    pareto = pd.read_csv(tmp_path / "reports/plots/pareto.csv")
    assert pareto.columns[:5].tolist() == [
        "candidate",
        "step",
        "lora_scale",
        "identity",
        "alignment",
    ]
    assert set(pareto["identity_metric"]) == {"clip_i"}  # arcface absent: the next identity metric
    front = pareto[pareto["pareto"]]
    assert front[["candidate", "step", "lora_scale"]].values.tolist() == [["r8_lr3e-4", 4, 1.0]]


def test_base_row_is_baseline_never_champion(report_repo: Path, tmp_path: Path) -> None:
    _synthetic_scores(report_repo, ("base", 0, 0.0))
    selection = _report(report_repo, tmp_path / "reports")
    assert selection.table.iloc[0]["candidate"] == "base"
    assert selection.champion["lora_scale"] > 0


def test_tie_prefers_smaller_scale_then_earlier_step(report_repo: Path, tmp_path: Path) -> None:
    index = pd.read_parquet(report_repo / "data/generate/index.parquet")
    key = list(zip(index["candidate"], index["step"], index["lora_scale"], strict=True))
    # Top mean: r4 step 8 scale 1.0 (0.52); r4 step 8 scale 0.5 and r8 step 4 scale 0.5 are within
    # noise of it (0.51); everything else is far below. Rule: smallest scale, then earliest step.
    levels = {("r4_lr1e-3", 8, 1.0): 0.52, ("r4_lr1e-3", 8, 0.5): 0.51, ("r8_lr3e-4", 4, 0.5): 0.51}
    # Image-level noise with mean 0 in every row, but a different pattern per tied row, so the
    # paired differences are noisy too (a constant difference would be a real one).
    patterns = {
        ("r4_lr1e-3", 8, 1.0): [0.03, -0.03, 0.02, -0.02],
        ("r4_lr1e-3", 8, 0.5): [-0.03, 0.03, -0.02, 0.02],
        ("r8_lr3e-4", 4, 0.5): [0.02, -0.02, -0.03, 0.03],
    }
    position = index.groupby(["candidate", "step", "lora_scale"]).cumcount().to_numpy()
    wiggle = np.array(
        [patterns.get(k, [0.03, -0.03, 0.03, -0.03])[p] for k, p in zip(key, position, strict=True)]
    )
    level = np.array([levels.get(k, 0.2) for k in key]) + wiggle
    _write_scores(report_repo, index.assign(clip_i=level, clip_t=level))
    selection = _report(report_repo, tmp_path / "reports")
    assert (
        selection.provisional["candidate"],
        selection.provisional["step"],
        selection.provisional["lora_scale"],
    ) == ("r4_lr1e-3", 8, 1.0)
    assert selection.statistical_tie and len(selection.tied) == 3
    assert (
        selection.champion["candidate"],
        selection.champion["step"],
        selection.champion["lora_scale"],
    ) == ("r8_lr3e-4", 4, 0.5)
    markdown = (tmp_path / "reports/selection.md").read_text()
    assert "Statistical tie" in markdown
    assert "smallest LoRA scale, then the earliest step" in markdown
    assert json.loads((tmp_path / "reports/metrics.json").read_text())["statistical_tie"] is True


def test_a_consistent_paired_advantage_is_not_a_tie(report_repo: Path, tmp_path: Path) -> None:
    """Scale 1.0 beats scale 0.5 by 0.01 on every (prompt, seed) pair, under a prompt-to-prompt
    spread of +-0.1: the rows' own CIs overlap, the paired difference does not include 0."""
    index = pd.read_parquet(report_repo / "data/generate/index.parquet")
    key = list(zip(index["candidate"], index["step"], index["lora_scale"], strict=True))
    levels = {("r4_lr1e-3", 8, 1.0): 0.52, ("r4_lr1e-3", 8, 0.5): 0.51}
    spread = np.array([0.1, -0.1, 0.05, -0.05])[
        index.groupby(["candidate", "step", "lora_scale"]).cumcount().to_numpy()
    ]
    level = np.array([levels.get(k, 0.2) for k in key]) + spread
    _write_scores(report_repo, index.assign(clip_i=level, clip_t=level))
    selection = _report(report_repo, tmp_path / "reports")
    assert (selection.champion["step"], selection.champion["lora_scale"]) == (8, 1.0)
    assert not selection.statistical_tie
    # The overlap test alone would have called it a tie and picked the smaller scale.
    overlap_only = choose_champion(selection.table)
    assert overlap_only.statistical_tie and overlap_only.champion["lora_scale"] == 0.5


def test_bootstrap_ci_is_deterministic_and_seeded() -> None:
    values = np.random.default_rng(3).normal(0.3, 0.05, 6)
    first = statistics.bootstrap_mean_ci(values, 1000, 0.95, seed=11)
    assert first == statistics.bootstrap_mean_ci(values, 1000, 0.95, seed=11)
    assert first != statistics.bootstrap_mean_ci(values, 1000, 0.95, seed=12)
    assert first[0] < values.mean() < first[1]
    narrower = statistics.bootstrap_mean_ci(values, 1000, 0.5, seed=11)
    assert first[0] < narrower[0] < narrower[1] < first[1]


def test_unknown_metric_names_fail_at_validation(params_dict: dict) -> None:
    from charaforge.config import validate_params

    params_dict["report"]["weights"] = {"clip_i": 1.0, "dino": 1.0}
    params_dict["report"]["pareto_identity"] = ["arcfce"]
    with pytest.raises(ConfigError) as error:
        validate_params(params_dict)
    assert "report.weights: Value error, unknown metric(s) ['dino']" in str(error.value)
    assert "report.pareto_identity: Value error, unknown metric(s) ['arcfce']" in str(error.value)


def test_unknown_weight_is_a_config_error(report_repo: Path, tmp_path: Path) -> None:
    """A known metric the score stage did not produce (scorers.json lacks it) stops the report."""
    _synthetic_scores(report_repo, ("r8_lr3e-4", 4, 1.0))
    with pytest.raises(ConfigError, match=r"report.weights: unknown metric\(s\) \['arcface'\]"):
        _report(report_repo, tmp_path / "reports", weights={"clip_i": 1.0, "arcface": 1.0})
    assert not (tmp_path / "reports").exists()  # failed before writing anything


def test_html_is_self_contained(report_repo: Path, tmp_path: Path) -> None:
    _synthetic_scores(report_repo, ("r8_lr3e-4", 4, 1.0))
    _report(report_repo, tmp_path / "reports")
    page = (tmp_path / "reports/selection.html").read_text()
    assert not re.search(r"""src\s*=\s*["']?\s*(https?:)?//""", page, flags=re.IGNORECASE)
    # The one web address is a link (never fetched) to the local MLflow UI's model page.
    addresses = re.findall(r"https?://[^\s\"'<>)]+", page)
    assert addresses and all(a.startswith("http://127.0.0.1:5000/#/models/") for a in addresses)
    sources = re.findall(r"<img\b[^>]*\bsrc=\"([^\"]*)\"", page)
    assert len(re.findall(r"<img\b", page)) == len(sources)
    assert all(src.startswith("data:image/png;base64,") for src in sources)
    # Two plots (score vs step, Pareto) + each candidate's sheet: its images and the base column.
    per_candidate = len(PROMPTS) * len(SEEDS) * (4 + 1)
    assert len(sources) == 2 + len(CANDIDATES) * per_candidate
    assert "<link" not in page and "<script" not in page
    assert "Computed with stand-in models" in page
    assert str(tmp_path) not in page


def test_stand_in_banner_only_when_something_is_a_stand_in(
    report_repo: Path, tmp_path: Path
) -> None:
    _make_train_and_base(report_repo, stand_in=False)
    index = pd.read_parquet(report_repo / "data/generate/index.parquet")
    _write_scores(report_repo, index.assign(clip_i=0.3, clip_t=0.3), stand_in=False)
    _report(report_repo, tmp_path / "real")
    assert "stand-in" not in (tmp_path / "real/selection.md").read_text()
    assert json.loads((tmp_path / "real/metrics.json").read_text())["stand_in"] is False
    _make_train_and_base(report_repo, stand_in=True)  # base model is a stand-in, scorers are not
    _report(report_repo, tmp_path / "base_stand_in")
    assert (
        "Computed with stand-in models (base model)"
        in (tmp_path / "base_stand_in/selection.md").read_text()
    )


def test_report_files_are_byte_identical_across_runs(report_repo: Path, tmp_path: Path) -> None:
    _synthetic_scores(report_repo, ("r4_lr1e-3", 8, 0.5), noise=0.05)
    _report(report_repo, tmp_path / "a")
    _report(report_repo, tmp_path / "b")
    files = sorted(
        p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file()
    )
    assert {str(p) for p in files} >= {"metrics.json", "selection.md", "selection.html"}
    for relative in files:
        assert (tmp_path / "a" / relative).read_bytes() == (
            tmp_path / "b" / relative
        ).read_bytes(), relative
    # A different global seed changes the bootstrap draws (and so the CIs), not the means.
    first = _report(report_repo, tmp_path / "c").table
    other = _report(report_repo, tmp_path / "d", seed=99).table
    pd.testing.assert_series_equal(first["composite"], other["composite"])
    assert not np.array_equal(first[["ci_low", "ci_high"]], other[["ci_low", "ci_high"]])


def test_score_then_report_end_to_end(repo: Path, tmp_path: Path) -> None:
    """The real stand-in scores feed the report (what `score` then `report` do in the pipeline)."""
    _score(repo, repo / "data/score")
    selection = _report(repo, tmp_path / "reports")
    assert selection.champion["lora_scale"] > 0
    scorers = json.loads((repo / "data/score/scorers.json").read_text())
    assert scorers["clip_i"]["stand_in"] is True
    assert "Computed with stand-in models" in (tmp_path / "reports/selection.md").read_text()


# --- the DVC stages ----------------------------------------------------------------------------


def _stage_repo(tmp_path: Path, params_dict: dict, repo_root: Path, tracking: bool) -> Path:
    """A working copy with synthetic inputs and a params.yaml that uses our conf/ groups."""
    from safetensors.torch import save_file

    root = tmp_path / "work"
    _make_dataset(root)
    _make_generate(root)
    _make_train_and_base(root)
    for name, steps in CANDIDATES.items():
        for step in steps:
            folder = root / "data/train" / name / f"checkpoint-{step}"
            folder.mkdir(parents=True)
            weights = {"lora_A.weight": torch.full((4, 8), float(step))}
            save_file(weights, str(folder / "pytorch_lora_weights.safetensors"))
    params = dict(params_dict)
    params["score"] = yaml.safe_load((repo_root / "conf/score/stand_in.yaml").read_text())
    params["report"] = yaml.safe_load((repo_root / "conf/report/default.yaml").read_text())
    # conf/ names the registered model after the character (resolved when conf/ is composed).
    params["report"]["registered_model"] = f"charaforge-{params['data']['character']}"
    params["data"] = {**params["data"], "trigger": TRIGGER}
    params["tracking"] = {
        "enabled": tracking,
        "uri": f"sqlite:///{root / 'mlflow.db'}",
        "experiment": "test",
    }
    (root / "params.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")
    (root / ".git").mkdir()  # marks the repository root for tracking.repository_root()
    return root


def test_stages_run_on_the_conf_defaults(
    tmp_path: Path, params_dict: dict, repo_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from stages import report as report_stage, score as score_stage

    root = _stage_repo(tmp_path, params_dict, repo_root, tracking=False)
    monkeypatch.chdir(root)
    run_stage("score", score_stage.body, sections=("score", "data"))
    run_stage("report", report_stage.body, sections=("report",))
    assert len(pd.read_parquet("data/score/scores.parquet")) == len(_sweep_rows())
    for name in ("metrics.json", "selection.md", "selection.html"):
        assert (root / "reports" / name).is_file()
    assert sorted(p.name for p in (root / "reports/plots/score_by_step").iterdir()) == [
        f"{name}.csv" for name in sorted(CANDIDATES)
    ]


@pytest.mark.slow
def test_report_stage_promotes_the_champion_in_mlflow(
    tmp_path: Path, params_dict: dict, repo_root: Path
) -> None:
    import subprocess
    import sys

    root = _stage_repo(tmp_path, params_dict, repo_root, tracking=True)
    env = {"PYTHONPATH": str(repo_root), "PATH": str(Path(sys.executable).parent)}
    for stage in ("score", "report"):
        done = subprocess.run(
            [sys.executable, "-m", f"stages.{stage}"],
            cwd=root,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    version = client.get_model_version_by_alias("charaforge-aoi", "champion")
    champion = json.loads((root / "reports/metrics.json").read_text())["champion"]
    assert version.tags["candidate"] == champion["candidate"]
    assert version.tags["step"] == str(champion["step"])
    assert version.tags["stand_in"] == "True"
    run = client.get_run(version.run_id)
    assert run.data.tags["charaforge.pipeline.stage"] == "report"
    assert run.data.metrics["champion_composite"] == pytest.approx(champion["composite"], abs=1e-6)
    artifacts = {item.path for item in client.list_artifacts(version.run_id, "champion")}
    assert artifacts == {"champion/pytorch_lora_weights.safetensors"}


# --- diversity, memorisation, tags: known answers -------------------------------------------


def test_group_diversity_known_answers() -> None:
    e = np.eye(4)
    same = np.array([[1.0, 0, 0, 0]] * 2)
    embeddings = np.vstack([same, e[:3], e[3:]])  # groups: a a b b b c
    groups = ["a", "a", "b", "b", "b", "c"]
    diversity = sweep_groups.group_diversity(embeddings, groups)
    np.testing.assert_allclose(diversity[:5], [0.0, 0.0, 1.0, 1.0, 1.0])  # identical; orthogonal
    assert np.isnan(diversity[5])  # alone in its group
    # Order of the rows does not matter: a permutation permutes the result.
    order = [5, 2, 0, 4, 1, 3]
    permuted = sweep_groups.group_diversity(embeddings[order], [groups[i] for i in order])
    np.testing.assert_allclose(permuted, diversity[order])


def test_group_consistency_against_the_identity_shot() -> None:
    e = np.eye(3)
    embeddings = np.vstack([e[0], e[0], [0.6, 0.8, 0.0], e[1], e[2], [np.nan] * 3, e[2]])
    groups = ["g1", "g1", "g1", "g2", "g2", "g2", None]
    anchors = [True, False, False, True, False, False, True]
    consistency = sweep_groups.group_consistency(embeddings, groups, anchors)
    assert np.isnan(consistency[[0, 3, 5, 6]]).all()  # identity shots, no embedding, no group
    np.testing.assert_allclose(consistency[[1, 2, 4]], [1.0, 0.6, 0.0])
    index = pd.DataFrame(
        {
            "candidate": ["r4", "r4", "base"],
            "step": [4, 4, 0],
            "lora_scale": [1.0, 1.0, 0.0],
            "suite": ["fixed", "fixed", None],
            "prompt_group": pd.array([0, 0, None], dtype="Int64"),
            "identity_shot": [True, False, False],
        }
    )
    keys, shots = sweep_groups.suite_groups(index)
    assert keys == ["r4|4|1|fixed|0", "r4|4|1|fixed|0", None] and shots == [True, False, False]
    no_shots = index.drop(columns=["identity_shot"])
    assert sweep_groups.suite_groups(no_shots) == ([None] * 3, [False] * 3)


def test_nearest_neighbour_similarity_finds_a_copy() -> None:
    training = np.eye(3)
    generated = np.array([[0.0, 1.0, 0.0], [0.6, 0.8, 0.0]])
    np.testing.assert_allclose(
        memorisation.nearest_neighbour_similarity(generated, training), [1.0, 0.8]
    )


def test_defining_tags_and_tag_consistency_known_answers() -> None:
    lists = [["1girl", "red hair", "sitting"], ["1girl", "red hair"], ["1girl", "smile"]]
    assert tag_metrics.defining_tags(lists, 0.6) == ["1girl", "red hair"]
    assert tag_metrics.defining_tags(lists, 1.0) == ["1girl"]
    defining = {"1girl", "red hair"}
    vocabulary = {"1girl", "red hair", "blonde hair", "sitting", "smile"}
    # Found both defining tags and a wrong hair colour; "sitting" was asked for by the prompt.
    precision, recall = tag_metrics.tag_consistency(
        ["1girl", "red hair", "blonde hair", "sitting", "cat"], defining, vocabulary, {"sitting"}
    )
    assert (precision, recall) == (pytest.approx(2 / 3), 1.0)
    precision, recall = tag_metrics.tag_consistency(["blonde hair"], defining, vocabulary, set())
    assert (precision, recall) == (0.0, 0.0)
    precision, recall = tag_metrics.tag_consistency([], defining, vocabulary, set())
    assert np.isnan(precision) and recall == 0.0


# --- every scorer on one sweep with a real face, a conditioning pose and a model tagger ------


@pytest.fixture(scope="module")
def photo_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Dataset: drawings + the astronaut photo (train); sweep: the photo, its mirror, drawings,
    with the photo's pose as conditioning for some rows (the engine's pose_image_id contract)."""
    import skimage.data

    from charaforge.prepare.pose import PoseDetector

    root = tmp_path_factory.mktemp("photo_repo")
    _make_dataset(root, n_train=3, n_val=1)
    metadata = pd.read_parquet(root / "data/dataset/metadata.parquet")
    photo = Image.fromarray(skimage.data.astronaut()).resize((192, 192))
    relative, photo_id = _save_png(root, "data/dataset/images/photo.png", photo)
    row = metadata.iloc[0].to_dict() | {
        "image_id": photo_id,
        "image_path": relative,
        "style": "photo",
        "tags": ["photo", "1girl", "short hair"],
        "split": "train",
    }
    write_parquet(
        root / "data/dataset/metadata.parquet", pd.concat([metadata, pd.DataFrame([row])])
    )
    with PoseDetector(POSE) as detector:
        pose = detector.detect(photo)
    keypoints = {
        "image_id": photo_id,
        "has_person": pose.has_person,
        "landmarks": pose.landmarks,
        "coco17": pose.coco17,
        "width": pose.width,
        "height": pose.height,
    }
    write_parquet(root / "data/pose/keypoints.parquet", pd.DataFrame([keypoints]))
    images = {
        "photo": photo,
        "mirror": photo.transpose(Image.Transpose.FLIP_LEFT_RIGHT),
        "drawing": _drawing(5, 192),
    }
    rows = []
    for seed, (name, image) in enumerate(images.items()):
        for candidate, step, scale in (("base", 0, 0.0), ("r4", 4, 1.0)):
            path, image_id = _save_png(root, f"data/generate/images/{candidate}_{name}.png", image)
            rows.append(
                {
                    "image_id": image_id,
                    "image_path": path,
                    "candidate": candidate,
                    "step": step,
                    "lora_scale": scale,
                    "prompt_index": 0,
                    "prompt": PROMPTS[0],
                    "seed": seed,
                    "pose_image_id": photo_id if name != "drawing" else None,
                }
            )
    write_parquet(root / "data/generate/index.parquet", pd.DataFrame(rows))
    return root


def test_every_scorer_on_a_real_face_and_pose(photo_repo: Path, tmp_path: Path) -> None:
    from charaforge.config import ClipTaggerConfig

    vocabulary = ["1girl", "red hair", "long hair", "blue eyes", "standing", "short hair", "cat"]
    tagger = TaggerConfig(
        backend="clip",
        general_threshold=0.35,
        character_threshold=0.85,
        clip=ClipTaggerConfig(vocabulary=vocabulary, threshold=0.0),  # every tag predicted
    )
    config = _score_config(tags=TagScoreConfig(tagger="pipeline"))
    scores = _score(photo_repo, tmp_path / "score", tagger=tagger, config=config)
    scores = scores.set_index("image_path")
    scorers = json.loads((tmp_path / "score/scorers.json").read_text())
    photo = scores.loc["data/generate/images/r4_photo.png"]
    mirror = scores.loc["data/generate/images/r4_mirror.png"]
    drawing = scores.loc["data/generate/images/r4_drawing.png"]
    # ArcFace: the reference is the one face in the dataset (the photo's).
    assert scorers["arcface"]["applicable"] is True
    assert "faces in 1 of 4 images" in scorers["arcface"]["references"]
    assert photo["arcface"] == pytest.approx(1.0, abs=1e-6)
    assert mirror["arcface"] < photo["arcface"]
    assert np.isnan(drawing["arcface"]) and drawing["face_detected"] == 0.0
    assert scorers["arcface"]["images_without_face"] == 2
    # Pose: the photo reproduces its own pose; the drawing was not conditioned.
    assert scorers["pose_oks"]["applicable"] is True
    assert scorers["pose_oks"]["conditioned_images"] == 4
    assert photo["pose_oks"] == pytest.approx(scorers["pose_oks"]["ceiling"]["pose_oks"], abs=1e-6)
    assert photo["pose_detected"] == 1.0 and np.isnan(drawing["pose_oks"])
    # Tags: defining tags come from the drawings (the photo is not the character); with every
    # vocabulary tag predicted, recall is 1 and precision is |defining| / |judged tags|.
    defining = scorers["tag_recall"]["defining_tags"]
    assert defining == ["1girl", "red hair"]
    assert scores["tag_recall"].eq(1.0).all()
    # judged: vocabulary tags the dataset knows ({1girl, red hair, short hair}) minus those the
    # prompt asked for that are not defining (none of them): 2 defining of 3.
    assert scores["tag_precision"].to_numpy() == pytest.approx(2 / 3)
    assert "(stand-in)" in scorers["tag_recall"]["model"] and scorers["tag_recall"]["stand_in"]
    assert list(scores["pose_image_id"].isna()) == [False, False, False, False, True, True]


def test_a_lora_that_copies_its_training_set_does_not_win(tmp_path: Path) -> None:
    """Candidate `copycat` renders the training images themselves: it tops CLIP-I (identity) but
    the memorisation guard makes it ineligible and the honest candidate is champion."""
    root = tmp_path / "repo"
    _make_dataset(root, n_train=4, n_val=0)
    training = pd.read_parquet(root / "data/dataset/metadata.parquet")["image_path"].tolist()
    rows = []
    for candidate, step, scale in (("base", 0, 0.0), ("copycat", 4, 1.0), ("honest", 4, 1.0)):
        for number in range(4):
            prompt_index, seed = divmod(number, 2)
            if candidate == "copycat":
                with Image.open(root / training[number]) as image:
                    picture = image.copy()
            else:
                # Honest (and base): the same kind of drawing, never a training image's pixels.
                picture = _drawing(2000 + number if candidate == "honest" else 50 + number)
            path, image_id = _save_png(root, f"data/generate/{candidate}/{number}.png", picture)
            rows.append(
                {
                    "image_id": image_id,
                    "image_path": path,
                    "candidate": candidate,
                    "step": step,
                    "lora_scale": scale,
                    "prompt_index": prompt_index,
                    "prompt": PROMPTS[prompt_index],
                    "seed": seed,
                }
            )
    write_parquet(root / "data/generate/index.parquet", pd.DataFrame(rows))
    _make_train_and_base(root)
    _score(root, root / "data/score")
    selection = _report(root, tmp_path / "reports", weights={"clip_i": 1.0})
    table = selection.table.set_index("candidate")
    assert table.loc["copycat", "nn_similarity"] == pytest.approx(1.0, abs=1e-6)
    assert table.loc["copycat", "nn_phash_distance"] == 0.0
    assert table.loc["honest", "nn_phash_distance"] > 6
    assert table.loc["copycat", "clip_i"] > table.loc["honest", "clip_i"]
    assert selection.table.iloc[0]["candidate"] == "copycat"  # the best composite...
    assert bool(table.loc["copycat", "memorising"]) and not bool(table.loc["honest", "memorising"])
    assert selection.champion["candidate"] == "honest"  # ...but not the champion
    markdown = (tmp_path / "reports/selection.md").read_text()
    assert "Ineligible for memorising: copycat step 4 scale 1" in markdown


# --- report: composite, baseline, Pareto ------------------------------------------------------


def test_composite_of_skips_missing_values_and_fills_empty_metrics() -> None:
    values = np.array([[0.5, np.nan], [0.7, np.nan], [np.nan, np.nan]])
    # metric 0 averages its two values (0.6); metric 1 has none and scores 0.
    assert statistics.composite_of(values, np.array([0.5, 0.5])) == pytest.approx(0.3)
    values[0, 1] = 0.4
    assert statistics.composite_of(values, np.array([0.5, 0.5])) == pytest.approx(0.5)
    batch = np.stack([values, values])  # resamples broadcast along the leading axis
    np.testing.assert_allclose(statistics.composite_of(batch, np.array([0.5, 0.5])), [0.5, 0.5])


def test_composite_metrics_drop_not_applicable_and_normalise() -> None:
    weights = {"clip_i": 0.2, "clip_t": 0.2, "arcface": 0.6}
    metrics = ["arcface", "clip_i", "clip_t"]
    used = ranking.composite_metrics(weights, metrics, {"arcface": False})
    assert used == {"clip_i": 0.5, "clip_t": 0.5}
    with pytest.raises(ConfigError, match="none of the weighted metrics is applicable"):
        ranking.composite_metrics({"arcface": 1.0}, metrics, {"arcface": False})


def test_pareto_front_known_answer() -> None:
    table = pd.DataFrame(
        {"x": [0.1, 0.5, 0.3, 0.5, 0.2, np.nan], "y": [0.9, 0.2, 0.3, 0.1, 0.8, 1.0]}
    )
    # (0.5, 0.1) is dominated by (0.5, 0.2): equal on x, worse on y. No other point has both
    # more x and more y than any of the rest; the NaN row is never on the front.
    assert ranking.pareto_front(table, "x", "y").tolist() == [True, True, True, False, True, False]


def test_not_applicable_weights_and_baseline_verdicts(report_repo: Path, tmp_path: Path) -> None:
    _synthetic_scores(report_repo, ("r8_lr3e-4", 4, 1.0))
    scores = pd.read_parquet(report_repo / "data/score/scores.parquet").assign(arcface=np.nan)
    write_parquet(report_repo / "data/score/scores.parquet", scores)
    info = {"model": "tiny", "scale": "raw cosine, -1..1", "stand_in": True, "applicable": True}
    scorers = {
        "clip_i": info,
        "clip_t": info,
        "arcface": {**info, "applicable": False, "reason": "no face found in any reference image"},
    }
    write_json(report_repo / "data/score/scorers.json", scorers)
    selection = _report(
        report_repo, tmp_path / "beats", weights={"clip_i": 0.25, "clip_t": 0.25, "arcface": 0.5}
    )
    assert selection.baseline is not None and selection.baseline.verdict == "beats"
    assert selection.baseline.difference == pytest.approx(0.30, abs=0.01)
    markdown = (tmp_path / "beats/selection.md").read_text()
    assert "Weighted but not applicable, so left out: arcface" in markdown
    assert "arcface: not applicable (no face found in any reference image)" in markdown
    assert "beats the base model beyond its confidence interval" in markdown
    assert "## Composite per prompt" in markdown
    metrics = json.loads((tmp_path / "beats/metrics.json").read_text())
    assert metrics["not_applicable"] == ["arcface"]
    assert metrics["champion_minus_baseline"]["verdict"] == "beats"
    # Everything level with the base model: said plainly.
    flat = scores.assign(clip_i=0.3 + np.tile([0.02, -0.02], len(scores) // 2), clip_t=0.3)
    write_parquet(report_repo / "data/score/scores.parquet", flat)
    selection = _report(report_repo, tmp_path / "flat")
    assert selection.baseline.verdict == "tie"
    assert "does NOT beat the base model" in (tmp_path / "flat/selection.md").read_text()
