"""Tagger backends on real components: a real onnxruntime session over a WD14-shaped ONNX model
built here with the onnx helper API, open_clip's real code paths for the CLIP zero-shot tagger,
and the post-processing (replacements, allow / deny lists, frequency table) every backend shares.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import onnx
import pandas as pd
import pytest
import torch
from onnx import TensorProto, helper
from PIL import Image

from charaforge.config import ClipConfig, TaggerConfig
from charaforge.core.contracts import tag_frequency
from charaforge.errors import ConfigError
from charaforge.tagging import base, clip, run, wd14

# selected_tags.csv rows: (name, category). Ratings first, as in the released files.
LABELS = [
    ("general", 9),
    ("sensitive", 9),
    ("questionable", 9),
    ("explicit", 9),
    ("red_background", 0),
    ("blue_background", 0),
    ("green_background", 0),
    ("^_^", 0),
    ("aoi_(charaforge)", 4),
]
SIZE = 448


def _weights() -> tuple[np.ndarray, np.ndarray]:
    """Logits from the mean B, G, R of the input (BGR order: what the model sees)."""
    weight = np.zeros((3, len(LABELS)), np.float32)
    bias = np.zeros(len(LABELS), np.float32)
    weight[:, 0], bias[0] = 0.0, 2.0  # rating "general": always likely
    bias[1:4] = -3.0
    weight[2, 4], bias[4] = 0.05, -8.0  # red_background from the R channel (index 2 in BGR)
    weight[0, 5], bias[5] = 0.05, -8.0  # blue_background from B (index 0)
    weight[1, 6], bias[6] = 0.05, -8.0  # green_background from G (index 1)
    bias[7] = -6.0  # kaomoji: never
    weight[2, 8], bias[8] = 0.06, -12.0  # the character: only very red images
    return weight, bias


def build_wd14_model(folder: Path) -> Path:
    """A tiny model with the released taggers' signature: NHWC float input, sigmoid per tag."""
    weight, bias = _weights()
    graph = helper.make_graph(
        [
            # Two stages of 448 values each: float32 stays exact to ~1e-6 (one stage of 200k
            # values would drift by ~0.1 grey levels and blur the comparison below).
            helper.make_node("ReduceMean", ["input_1:0"], ["row_mean"], axes=[2], keepdims=0),
            helper.make_node("ReduceMean", ["row_mean"], ["mean"], axes=[1], keepdims=0),
            helper.make_node("MatMul", ["mean", "W"], ["logits_raw"]),
            helper.make_node("Add", ["logits_raw", "b"], ["logits"]),
            helper.make_node("Sigmoid", ["logits"], ["predictions_sigmoid"]),
        ],
        "wd14_tiny",
        [helper.make_tensor_value_info("input_1:0", TensorProto.FLOAT, ["batch", SIZE, SIZE, 3])],
        [helper.make_tensor_value_info("predictions_sigmoid", TensorProto.FLOAT, ["batch", 9])],
        [
            helper.make_tensor("W", TensorProto.FLOAT, weight.shape, weight.ravel()),
            helper.make_tensor("b", TensorProto.FLOAT, bias.shape, bias),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    folder.mkdir(parents=True, exist_ok=True)
    onnx.save(model, folder / "model.onnx")
    with open(folder / "selected_tags.csv", "w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["tag_id", "name", "category", "count"])
        for index, (name, category) in enumerate(LABELS):
            writer.writerow([index, name, category, 100 - index])
    return folder / "model.onnx"


@pytest.fixture(scope="module")
def wd14_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_wd14_model(tmp_path_factory.mktemp("wd14"))


def _config(**overrides: object) -> TaggerConfig:
    base = {"backend": "sidecar", "general_threshold": 0.35, "character_threshold": 0.85}
    return TaggerConfig(**{**base, **overrides})


# --- WD14 preprocessing against an independent computation --------------------------------------


def test_wd14_preprocessing_pads_white_centred_and_reverses_channels() -> None:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (20, 40, 3), dtype=np.uint8)  # 40 wide, 20 high
    row = wd14.preprocess(Image.fromarray(pixels), 40)  # already the model side: no resize
    expected = np.full((40, 40, 3), 255, np.float32)
    expected[10:30] = pixels[:, :, ::-1]  # (40 - 20) // 2 = 10 rows of white above
    assert row.dtype == np.float32 and row.shape == (40, 40, 3)
    np.testing.assert_array_equal(row, expected)
    # Odd padding (20 - 17 = 3 columns): the smaller half (1) left, the larger (2) right.
    tall = wd14.preprocess(Image.fromarray(pixels[:, :17]), 20)
    np.testing.assert_array_equal(tall[:, 1:18], pixels[:, :17, ::-1].astype(np.float32))
    assert (tall[:, [0, 18, 19]] == 255).all()


def test_wd14_preprocessing_composites_alpha_on_white() -> None:
    rgba = np.zeros((32, 32, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:, 16:, 3] = 255  # left half transparent
    row = wd14.preprocess(Image.fromarray(rgba, "RGBA"), 32)
    np.testing.assert_array_equal(row[:, :16], np.full((32, 16, 3), 255, np.float32))
    np.testing.assert_array_equal(row[:, 16:], np.broadcast_to([0, 0, 200], (32, 16, 3)))


def test_wd14_preprocessing_resize_matches_antialiased_bicubic() -> None:
    """PIL's bicubic against torch's antialiased bicubic (a = -0.5, PIL's kernel), independently."""
    rng = np.random.default_rng(1)
    smooth = rng.integers(0, 256, (12, 9, 3)).astype(np.uint8)
    image = Image.fromarray(smooth).resize((300, 400), Image.BILINEAR)  # 300 wide, 400 high
    row = wd14.preprocess(image, SIZE)
    padded = np.full((400, 400, 3), 255, np.float64)
    padded[:, 50:350] = np.asarray(image, np.float64)
    tensor = torch.from_numpy(padded).permute(2, 0, 1)[None]
    resized = torch.nn.functional.interpolate(
        tensor, size=(SIZE, SIZE), mode="bicubic", antialias=True, align_corners=False
    )
    expected = resized[0].permute(1, 2, 0).clamp(0, 255).numpy()[:, :, ::-1]
    difference = np.abs(row.astype(np.float64) - expected)
    # PIL rounds to 8 bits between its two passes: differences of a grey level or two remain.
    assert difference.mean() < 0.5 and difference.max() <= 3.0


# --- WD14 in a real onnxruntime session --------------------------------------------------------


def test_wd14_tagger_outputs_equal_the_model_computed_independently(wd14_model: Path) -> None:
    tagger = wd14.Wd14Tagger(wd14_model, wd14_model.parent / "selected_tags.csv")
    assert tagger.size == SIZE and tagger.input_name == "input_1:0"
    rng = np.random.default_rng(2)
    image = Image.fromarray(rng.integers(0, 256, (64, 96, 3), dtype=np.uint8))
    got = tagger.probabilities([image])[0]
    weight, bias = _weights()
    mean_bgr = wd14.preprocess(image, SIZE).reshape(-1, 3).astype(np.float64).mean(axis=0)
    expected = 1 / (1 + np.exp(-(mean_bgr @ weight + bias)))
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_wd14_thresholds_categories_and_names(wd14_model: Path) -> None:
    tagger = wd14.Wd14Tagger(
        wd14_model, wd14_model.parent / "selected_tags.csv", include_rating=True
    )
    red = Image.new("RGB", (448, 448), (255, 0, 0))
    blue = Image.new("RGB", (200, 100), (0, 0, 255))  # padded with white: a weaker blue
    results = tagger.tag_many(
        [base.TagRequest("r", red, None), base.TagRequest("b", blue, None)]  # type: ignore[arg-type]
    )
    # Red: the character (underscores to spaces, parentheses kept) first, then the general tag.
    assert results[0].tags == [
        "aoi (charaforge)",
        "red_background".replace("_", " "),
        "rating:general",
    ]
    assert results[1].tags[0] == "blue background" and "aoi (charaforge)" not in results[1].tags
    probabilities = np.array([0.9, 0.1, 0.0, 0.0, 0.35, 0.3499, 0.0, 0.5, 0.8499], np.float32)
    prediction = tagger.predict(probabilities)
    assert list(prediction.general) == ["^_^", "red background"]  # kaomoji keeps its underscore
    assert prediction.character == {}  # 0.8499 is below the 0.85 character threshold
    assert prediction.best_rating == "general"
    assert wd14.tag_name("long_hair") == "long hair" and wd14.tag_name("^_^") == "^_^"


def test_wd14_backend_through_the_config_and_tag_folder(
    wd14_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "images").mkdir()
    rows = []
    for name, colour in (("red", (250, 0, 0)), ("green", (0, 250, 0))):
        Image.new("RGB", (100, 100), colour).save(tmp_path / "images" / f"{name}.png")
        rows.append({"image_id": name, "image_path": f"images/{name}.png", "sidecar_text": None})
    config = _config(
        backend="wd14",
        wd14={"model_path": str(wd14_model)},
        replace={"green background": "greenery"},
        deny=["aoi (charaforge)"],
    )
    tagger = run.build_tagger(config)
    table = run.tag_images(pd.DataFrame(rows), tagger, config)
    assert table.tags.map(list).tolist() == [["red background"], ["greenery"]]
    assert table.tagger.unique().tolist() == ["wd14:" + wd14_model.parent.name]


def test_wd14_missing_files_and_bad_config_fail_naming_the_key(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="tagger.wd14.model_path"):
        _config(backend="wd14")
    with pytest.raises(ConfigError, match="tagger.wd14.model_path"):
        run.build_tagger(_config(backend="wd14", wd14={"model_path": str(tmp_path / "x")}))


def test_wd14_label_count_must_match_the_model(wd14_model: Path, tmp_path: Path) -> None:
    (tmp_path / "tags.csv").write_text("tag_id,name,category,count\n0,a,0,1\n", encoding="utf-8")
    with pytest.raises(ValueError, match="outputs"):
        wd14.Wd14Tagger(wd14_model, tmp_path / "tags.csv")


# --- CLIP zero-shot ----------------------------------------------------------------------------


VOCABULARY = ["red hair", "blue eyes", "photo", "spacesuit", "1girl"]


@pytest.fixture(scope="module")
def clip_tagger() -> clip.ClipZeroShotTagger:
    config = _config(backend="clip", clip={"vocabulary": VOCABULARY, "threshold": 0.5})
    tagger = run.build_tagger(config)
    assert isinstance(tagger, clip.ClipZeroShotTagger)
    return tagger


def _photos() -> list[Image.Image]:
    import skimage.data

    return [Image.fromarray(skimage.data.astronaut()), Image.fromarray(skimage.data.chelsea())]


def test_clip_scores_equal_a_two_way_softmax_computed_independently(
    clip_tagger: clip.ClipZeroShotTagger,
) -> None:
    images = _photos()
    got = clip_tagger.score_images(images)
    model, preprocess = clip_tagger.embedder.model, clip_tagger.embedder.preprocess
    tokenizer = clip_tagger.embedder.tokenizer
    with torch.no_grad():
        image_features = model.encode_image(torch.stack([preprocess(i) for i in images]))
        prompts = [f"a picture of {tag}" for tag in VOCABULARY] + ["a picture"]
        text_features = model.encode_text(tokenizer(prompts))
        image_features = image_features / image_features.norm(dim=-1, keepdim=True)
        text_features = text_features / text_features.norm(dim=-1, keepdim=True)
        logits = model.logit_scale.exp() * image_features @ text_features.T
        for k in range(len(VOCABULARY)):
            pair = torch.stack([logits[:, k], logits[:, -1]], dim=1).softmax(dim=1)[:, 0]
            np.testing.assert_allclose(got[:, k], pair.numpy(), rtol=1e-4, atol=1e-5)
    assert got.shape == (2, len(VOCABULARY))


def test_clip_threshold_order_and_stand_in_label(clip_tagger: clip.ClipZeroShotTagger) -> None:
    assert clip_tagger.name.endswith("(stand-in)") and clip_tagger.stand_in
    result = clip_tagger.select(np.array([0.2, 0.9, 0.5, 0.7, 0.49999]))
    assert result.tags == ["blue eyes", "spacesuit", "photo"]
    assert result.scores == [0.9, 0.7, 0.5]
    clip_tagger.max_tags = 1
    try:
        assert clip_tagger.select(np.array([0.2, 0.9, 0.5, 0.7, 0.4])).tags == ["blue eyes"]
    finally:
        clip_tagger.max_tags = 0
    # Batched and single-image paths agree, and tagging is deterministic.
    image = _photos()[0]
    single = clip_tagger.tag_image(image)
    assert single == clip_tagger.tag_image(image)
    np.testing.assert_allclose(
        clip_tagger.score_images([image])[0], clip_tagger.score_images(_photos())[0], atol=1e-6
    )


def test_clip_tagger_loads_a_local_checkpoint(
    tmp_path: Path, clip_tagger: clip.ClipZeroShotTagger
) -> None:
    """source=pretrained with a local file: the stand-in's weights saved, then loaded as weights."""
    weights = tmp_path / "clip.pt"
    torch.save(clip_tagger.embedder.model.state_dict(), weights)
    model = ClipConfig(source="pretrained", model_name="charaforge-tiny-clip", path=str(weights))
    config = _config(backend="clip", clip={"vocabulary": VOCABULARY, "model": model})
    loaded = run.build_tagger(config)
    assert not loaded.name.endswith("(stand-in)")
    images = _photos()
    np.testing.assert_allclose(
        loaded.score_images(images), clip_tagger.score_images(images), atol=1e-6
    )


def test_clip_backend_needs_a_vocabulary() -> None:
    with pytest.raises(ValueError, match="tagger.clip.vocabulary"):
        _config(backend="clip")
    with pytest.raises(ValueError, match=r"\{tag\}"):
        _config(backend="clip", clip={"vocabulary": ["a"], "prompt_template": "a picture"})


# --- post-processing shared by every backend ---------------------------------------------------


def test_replace_deny_allow_in_that_order() -> None:
    result = base.TagResult(["red hair", "solo", "1girl", "smile", "crimson hair"], [1.0] * 5)
    config = _config(replace={"crimson hair": "red hair", "Smile": ""}, deny=["solo"], allow=[])
    processed = base.postprocess(result, config)
    assert processed.tags == ["red hair", "1girl"]  # duplicate after replacement dropped
    allow = base.postprocess(result, _config(allow=["1girl", "smile"]))
    assert allow.tags == ["1girl", "smile"]


def test_tag_frequency_table() -> None:
    frame = tag_frequency([["a", "b"], ["b"], ["b", "c", "b"], []])
    assert frame.to_dict("list") == {
        "tag": ["b", "a", "c"],
        "count": [3, 1, 1],
        "fraction": [0.75, 0.25, 0.25],
    }


def test_clip_backend_tags_a_manifest_in_one_batch(
    clip_tagger: clip.ClipZeroShotTagger, tmp_path: Path
) -> None:
    rows = []
    for index, image in enumerate(_photos()):
        path = tmp_path / f"{index}.png"
        image.save(path)
        rows.append({"image_id": f"id{index}", "image_path": str(path), "sidecar_text": "x, y"})
    config = _config(
        backend="clip", clip={"vocabulary": VOCABULARY, "threshold": 0.0}, deny=["photo"]
    )
    table = run.tag_images(pd.DataFrame(rows), clip_tagger, config)
    assert table.tagger.tolist() == [clip_tagger.name] * 2
    for row, image in zip(table.itertuples(), _photos(), strict=True):
        # Threshold 0: every vocabulary tag but the denied one, best first; sidecar ignored.
        assert sorted(row.tags) == sorted(set(VOCABULARY) - {"photo"})
        assert list(row.scores) == sorted(row.scores, reverse=True)
        single = clip_tagger.tag_image(image)
        assert [t for t in single.tags if t != "photo"] == list(row.tags)
