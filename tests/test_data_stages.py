"""The data stages (demo, ingest, dedupe, tag, pose, dataset) on real images, with the real config.

The demo set is ground truth: it records which files are planted near-duplicates, which are
broken and what every image shows, so dedupe, tagging and ingest are checked against it.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import stand_in_params_dict
from PIL import Image

from charaforge.config import DatasetConfig, DedupeConfig, Params, validate_params
from charaforge.core.contracts import kept_rows
from charaforge.prepare import dataset, dedupe, demo, hamming, ingest, pose
from charaforge.tagging import run, sidecar

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def params() -> Params:
    return validate_params(stand_in_params_dict())


def run_data_pipeline(root: Path, params: Params) -> None:
    """demo -> ingest -> dedupe -> tag -> pose -> dataset, from `root` as the repository root."""
    data = params.data
    with contextlib.chdir(root):
        demo.make_demo_set("data/demo", data.demo, data.character, params.seed)
        ingest.ingest_folder("data/demo", "data/ingest", data.ingest)
        dedupe.dedupe_folder("data/ingest", "data/dedupe", data.dedupe)
        run.tag_folder("data/ingest", "data/dedupe", "data/tag", params.tagger)
        pose.pose_folder("data/ingest", "data/dedupe", "data/pose", params.pose)
        dataset.build_dataset(
            "data/ingest",
            "data/dedupe",
            "data/tag",
            "data/pose",
            "data/dataset",
            data.dataset,
            character=data.character,
            trigger=data.trigger,
            seed=params.seed,
        )


@pytest.fixture(scope="session")
def pipeline_root(tmp_path_factory: pytest.TempPathFactory, params: Params) -> Path:
    """The demo set built once and run through every data stage."""
    root = tmp_path_factory.mktemp("repo")
    run_data_pipeline(root, params)
    return root


@pytest.fixture(scope="session")
def truth(pipeline_root: Path) -> dict:
    return json.loads((pipeline_root / "data/demo/ground_truth.json").read_text(encoding="utf-8"))


def _tree_digest(root: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file (symlinks by their target text) under root."""
    digest = {}
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root).as_posix()
        if path.is_symlink():
            digest[relative] = "link:" + os.readlink(path)
        elif path.is_file():
            digest[relative] = hashlib.sha256(path.read_bytes()).hexdigest()
    return digest


# --- demo --------------------------------------------------------------------------------------


def test_demo_set_is_deterministic(tmp_path: Path, params: Params, pipeline_root: Path) -> None:
    demo.make_demo_set(tmp_path / "demo", params.data.demo, params.data.character, params.seed)
    assert _tree_digest(tmp_path / "demo") == _tree_digest(pipeline_root / "data/demo")


def test_demo_set_plants_what_the_config_asks(truth: dict, params: Params) -> None:
    config = params.data.demo
    originals = [name for name in truth["tags"] if name.startswith("aoi/") and "_dup" not in name]
    assert len(originals) == config.images_per_character
    assert len(truth["duplicates"]) == config.near_duplicates
    assert len(truth["broken"]) == config.broken_files
    assert len(truth["photos"]) == (2 if config.include_photos else 0)
    poses = {next(t for t in truth["tags"][n] if t in demo.POSES) for n in originals}
    assert poses == set(demo.POSES)


# --- ingest ------------------------------------------------------------------------------------


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _png_with_header_size(width: int, height: int) -> bytes:
    """A valid small PNG whose IHDR claims width x height (what a decompression bomb looks like)."""
    data = bytearray(_png(Image.new("RGB", (64, 64), (10, 20, 30))))
    data[16:24] = width.to_bytes(4, "big") + height.to_bytes(4, "big")
    data[29:33] = zlib.crc32(bytes(data[12:29])).to_bytes(4, "big")
    return bytes(data)


def _texture(width: int, height: int, seed: int) -> Image.Image:
    """Random blocks: unlike flat images (which all hash alike), they hash far apart."""
    blocks = np.random.default_rng(seed).integers(0, 255, (8, 8, 3), dtype=np.uint8)
    return Image.fromarray(blocks).resize((width, height), Image.NEAREST)


@pytest.fixture
def messy_folder(tmp_path: Path) -> Path:
    """Good images in odd formats next to several kinds of bad input."""
    source = tmp_path / "inbox"
    (source / "set").mkdir(parents=True)
    good = _texture(120, 80, 0)
    (source / "set/good.png").write_bytes(_png(good))
    (source / "set/good.txt").write_text("Red Hair, smile\n", encoding="utf-8")
    (source / "set/copy.png").write_bytes(_png(good))
    transparent = _texture(64, 64, 1).convert("RGBA")
    alpha = np.zeros((64, 64), np.uint8)
    alpha[:, 32:] = 255  # left half fully transparent
    transparent.putalpha(Image.fromarray(alpha))
    (source / "set/transparent.png").write_bytes(_png(transparent))
    deep = (np.asarray(_texture(48, 48, 2).convert("L"), np.uint16) * 257).astype(np.uint16)
    deep[:8, :8] = 65535
    (source / "set/deep.png").write_bytes(_png(Image.fromarray(deep)))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees to display
    buffer = io.BytesIO()
    _texture(120, 60, 3).save(buffer, format="JPEG", exif=exif)
    (source / "set/rotated.jpg").write_bytes(buffer.getvalue())
    frames = [_texture(50, 50, seed).convert("P") for seed in (4, 5)]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:])
    (source / "set/animated.gif").write_bytes(buffer.getvalue())
    (source / "big.png").write_bytes(_png(_texture(2048, 1024, 6)))
    # The bad ones.
    (source / "set/empty.png").write_bytes(b"")
    (source / "set/truncated.png").write_bytes(_png(good)[:300])
    (source / "set/notes.jpg").write_text("not an image\n", encoding="utf-8")
    (source / "set/tiny.png").write_bytes(_png(Image.new("RGB", (8, 8))))
    (source / "set/bomb.png").write_bytes(_png_with_header_size(8000, 8000))
    (source / "set/huge_bomb.png").write_bytes(_png_with_header_size(30000, 30000))
    os.symlink("missing.png", source / "set/dangling.png")
    os.symlink("..", source / "set/loop")
    return source


EXPECTED_REASONS = {
    "empty.png": "empty file",
    "truncated.png": "truncated",
    "notes.jpg": "not a readable image",
    "tiny.png": "too small",
    "bomb.png": "decompression bomb",
    "huge_bomb.png": "decompression bomb",
    "dangling.png": "broken symlink",
    "loop": "symlink loop",  # the folder link set/loop -> .. leads back to a folder already read
}


def test_ingest_quarantines_bad_files_and_leaves_inputs_alone(
    messy_folder: Path, params: Params, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(messy_folder.parent)
    before = _tree_digest(messy_folder)
    summary = ingest.ingest_folder("inbox", "out", params.data.ingest)
    assert _tree_digest(messy_folder) == before

    quarantine = pd.read_parquet("out/quarantine.parquet")
    reasons = {
        Path(p).name: r for p, r in zip(quarantine.source_path, quarantine.reason, strict=True)
    }
    assert set(reasons) == set(EXPECTED_REASONS)
    for name, expected in EXPECTED_REASONS.items():
        assert expected in reasons[name], (name, reasons[name])
    assert summary.quarantined == len(EXPECTED_REASONS)

    manifest = pd.read_parquet("out/manifest.parquet").set_index("source_path")
    assert list(manifest.index) == sorted(manifest.index)  # walk order: sorted, folder by folder
    assert set(manifest.index) == {
        "inbox/big.png",
        "inbox/set/good.png",
        "inbox/set/copy.png",
        "inbox/set/transparent.png",
        "inbox/set/deep.png",
        "inbox/set/rotated.jpg",
        "inbox/set/animated.gif",
    }
    assert manifest.loc["inbox/big.png", ["width", "height"]].tolist() == [1024, 512]
    assert manifest.loc["inbox/set/rotated.jpg", ["width", "height"]].tolist() == [60, 120]
    assert manifest.loc["inbox/set/good.png", "sidecar_text"] == "Red Hair, smile"
    assert pd.isna(manifest.loc["inbox/set/copy.png", "sidecar_text"])
    assert manifest.loc["inbox/set/good.png", "source_group"] == "set"
    assert manifest.loc["inbox/big.png", "source_group"] == ""
    # Identical pixels, one image_id and one PNG; one manifest row per source file.
    assert (
        manifest.loc["inbox/set/good.png", "image_id"]
        == manifest.loc["inbox/set/copy.png", "image_id"]
    )
    assert summary.images == 7 and summary.unique_images == 6
    for row in manifest.itertuples():
        written = Path(row.image_path)
        assert written.name == f"{row.image_id}.png"
        assert hashlib.sha256(written.read_bytes()).hexdigest()[:16] == row.image_id
        with Image.open(written) as image:
            assert image.mode == "RGB"
    with Image.open(manifest.loc["inbox/set/transparent.png", "image_path"]) as image:
        assert image.getpixel((5, 5)) == tuple(params.data.ingest.background)
    with Image.open(manifest.loc["inbox/set/deep.png", "image_path"]) as image:
        assert image.getpixel((5, 5)) == (255, 255, 255)  # 16-bit white stays white
        assert len(np.unique(np.asarray(image))) > 2  # the rest is rescaled, not clipped

    # Exact copies: one cluster, exactly one row kept.
    table = dedupe.dedupe(pd.read_parquet("out/manifest.parquet"), params.data.dedupe)
    copies = table[table.source_path.isin(["inbox/set/good.png", "inbox/set/copy.png"])]
    assert copies.cluster_id.nunique() == 1
    # Same pixels and sharpness: the copy with a sidecar caption wins over the earlier name.
    assert copies.keep.tolist() == [False, True]
    assert table.keep.sum() == 6


# --- dedupe ------------------------------------------------------------------------------------


def test_dedupe_finds_exactly_the_planted_duplicates(pipeline_root: Path, truth: dict) -> None:
    table = pd.read_parquet(pipeline_root / "data/dedupe/dedupe.parquet")
    name = table.source_path.str.removeprefix("data/demo/")
    id_of = dict(zip(name, table.image_id, strict=True))
    dropped = set(name[~table.keep])
    planted = set(truth["duplicates"])
    true_positives = len(dropped & planted)
    precision = true_positives / len(dropped) if dropped else 1.0
    recall = true_positives / len(planted) if planted else 1.0
    assert (precision, recall) == (1.0, 1.0), sorted(dropped ^ planted)
    for dup, original in truth["duplicates"].items():
        row = table[name == dup].iloc[0]
        assert row.duplicate_of == id_of[original]
    assert (pipeline_root / "data/dedupe/contact_sheet.png").is_file()
    quarantine = pd.read_parquet(pipeline_root / "data/ingest/quarantine.parquet")
    assert set(quarantine.source_path.str.removeprefix("data/demo/")) == set(truth["broken"])


def test_vectorised_hamming_matches_imagehash(pipeline_root: Path) -> None:
    manifest = pd.read_parquet(pipeline_root / "data/ingest/manifest.parquet")
    config = DedupeConfig(hash="phash", hash_size=8, threshold=30)
    hashes = []
    for path in manifest.image_path:
        with Image.open(pipeline_root / path) as image:
            hashes.append(dedupe.image_hash(image.convert("RGB"), config))
    pairs = hamming.near_pairs(dedupe.pack_hashes(hashes), config.threshold, block=5)
    found = {(int(i), int(j)): int(d) for i, j, d in pairs}
    expected = {
        (i, j): hashes[i] - hashes[j]
        for i in range(len(hashes))
        for j in range(i + 1, len(hashes))
        if hashes[i] - hashes[j] <= config.threshold
    }
    assert found == expected and expected


# --- tag ---------------------------------------------------------------------------------------


def test_parse_sidecar() -> None:
    assert sidecar.parse_sidecar(" Red Hair,blue eyes,, red hair\nSmile ,") == [
        "red hair",
        "blue eyes",
        "smile",
    ]
    assert sidecar.parse_sidecar(None) == []


def test_tags_equal_the_sidecar_ground_truth(pipeline_root: Path, truth: dict) -> None:
    tags = pd.read_parquet(pipeline_root / "data/tag/tags.parquet")
    manifest = pd.read_parquet(pipeline_root / "data/ingest/manifest.parquet")
    kept = kept_rows(manifest, pd.read_parquet(pipeline_root / "data/dedupe/dedupe.parquet"))
    assert sorted(tags.image_id) == sorted(kept.image_id)
    name_of = dict(zip(kept.image_id, kept.source_path.str.removeprefix("data/demo/"), strict=True))
    for row in tags.itertuples():
        assert list(row.tags) == truth["tags"][name_of[row.image_id]]
        assert list(row.scores) == [1.0] * len(row.tags)
        assert row.tagger == "sidecar"


# --- pose --------------------------------------------------------------------------------------


def test_pose_finds_the_astronaut_and_nobody_on_a_flat_image(params: Params) -> None:
    import skimage.data

    astronaut = Image.fromarray(skimage.data.astronaut())
    flat = Image.new("RGB", (256, 256), (90, 140, 200))
    with pose.PoseDetector(params.pose) as detector:
        person = detector.detect(astronaut)
        nobody = detector.detect(flat)
    assert person.has_person and len(person.landmarks) == 33 * 4 and len(person.coco17) == 17 * 3
    coco = np.asarray(person.coco17).reshape(17, 3)
    nose, left_shoulder, right_shoulder = coco[0], coco[5], coco[6]
    # The face is in the upper half, between the shoulders (image left = person's right).
    assert 0 < nose[1] < 256 and right_shoulder[0] < nose[0] < left_shoulder[0]
    assert nose[2] > 0.9
    assert not nobody.has_person and nobody.landmarks == [] and nobody.coco17 == []
    skeleton = np.asarray(pose.draw_skeleton(person, params.pose.min_visibility))
    assert skeleton.shape == (512, 512, 3) and skeleton.any()
    assert not np.asarray(pose.draw_skeleton(nobody, 0.5)).any()


def test_pose_stage_outputs(pipeline_root: Path, truth: dict) -> None:
    keypoints = pd.read_parquet(pipeline_root / "data/pose/keypoints.parquet")
    assert list(keypoints.columns) == pose.POSE_COLUMNS
    manifest = pd.read_parquet(pipeline_root / "data/ingest/manifest.parquet")
    photo_ids = set(manifest.image_id[manifest.source_group == "photos"])
    assert keypoints.set_index("image_id").loc[sorted(photo_ids), "has_person"].all()
    skeletons = {p.stem for p in (pipeline_root / "data/pose/skeletons").glob("*.png")}
    assert skeletons == set(keypoints.image_id[keypoints.has_person])
    documents = {p.stem for p in (pipeline_root / "data/pose/openpose").glob("*.json")}
    assert documents == skeletons
    people = keypoints[keypoints.has_person]
    assert people.openpose18.map(len).eq(18 * 3).all()
    assert keypoints[~keypoints.has_person].openpose18.map(len).eq(0).all()


# --- dataset -----------------------------------------------------------------------------------


def test_dataset_schema_split_and_exports(pipeline_root: Path, params: Params) -> None:
    root = pipeline_root / "data/dataset"
    table = pd.read_parquet(root / "metadata.parquet")
    assert list(table.columns) == dataset.METADATA_COLUMNS
    assert set(table.split) == {"train", "val"}
    again = dataset.split_of(table.image_id.tolist(), params.seed, params.data.dataset.val_fraction)
    assert again == table.split.tolist()
    by_source = table.set_index(table.source.str.removeprefix("data/demo/"))
    astronaut = by_source.loc["photos/astronaut.png"]
    assert astronaut["style"] == "photo" and astronaut["outfit"] == "spacesuit"
    first = by_source.loc["aoi/aoi_000.png"]
    assert first["style"] == "illustration" and first["outfit"] == "blue dress"
    assert first["pose_tag"] == "standing, arms up"
    assert first["caption"].startswith(params.data.trigger + ", 1girl, solo, red hair")
    assert all((pipeline_root / path).is_file() for path in table.image_path)
    card = (root / "README.md").read_text(encoding="utf-8")
    assert f"| images | {len(table)} |" in card and "![tag frequencies](tag_frequency.png)" in card
    assert "| quarantined by ingest | 3 |" in card
    assert (root / "tag_frequency.png").is_file() and (root / "tag_frequency.csv").is_file()
    ingest_summary = json.loads((pipeline_root / "data/ingest/summary.json").read_text())
    assert sum(ingest_summary["quarantined_by_kind"].values()) == ingest_summary["quarantined"]
    frequency = pd.read_csv(pipeline_root / "data/tag/tag_frequency.csv")
    assert frequency.loc[0, "tag"] == "solo"  # every image is tagged solo

    trigger, repeats = params.data.trigger, params.data.dataset.kohya_repeats
    concept = root / "kohya" / f"{repeats}_{trigger}"
    train = table[table.split == "train"]
    assert sorted(p.stem for p in concept.glob("*.png")) == sorted(train.image_id)
    for row in train.itertuples():
        for extension in (".txt", ".caption"):  # sd-scripts' default is .caption
            caption = (concept / f"{row.image_id}{extension}").read_text(encoding="utf-8")
            assert caption == row.caption + "\n"
    for split in ("train", "val"):
        lines = (root / "imagefolder" / split / "metadata.jsonl").read_text(encoding="utf-8")
        records = [json.loads(line) for line in lines.splitlines()]
        expected = table[table.split == split]
        assert [r["file_name"] for r in records] == [f"{i}.png" for i in expected.image_id]
        assert [r["text"] for r in records] == expected.caption.tolist()


def test_split_keeps_both_sides_nonempty() -> None:
    for count in range(2, 8):
        ids = [f"{i:016x}" for i in range(count)]
        for fraction in (0.01, 0.5, 0.99):
            assert set(dataset.split_of(ids, 7, fraction)) == {"train", "val"}


def test_caption_template_is_checked_and_tidied() -> None:
    with pytest.raises(ValueError, match="unknown fields"):
        DatasetConfig(val_fraction=0.2, caption_template="{trigger}, {hair}", kohya_repeats=1)
    assert dataset.caption_of("{trigger}, {tags}", "aoi_cf", "aoi", []) == "aoi_cf"
    assert dataset.caption_of("{character} ({trigger}), {tags}", "t", "aoi", ["a", "b"]) == (
        "aoi (t), a, b"
    )


def test_two_runs_give_byte_identical_outputs(
    tmp_path: Path, params: Params, pipeline_root: Path
) -> None:
    run_data_pipeline(tmp_path, params)
    first, second = _tree_digest(pipeline_root / "data"), _tree_digest(tmp_path / "data")
    assert first == second
    assert any(name.startswith("dataset/kohya/") for name in first)
