"""Hashing at the decode limit keeps the recall of full decodes on planted near-duplicates.

Large JPEGs (decoded by DCT scaling, up to 8x smaller) and WebPs with planted copies (resized,
recompressed, cropped, brightness shifted): the pairs found from `hash_files` hashes must include
at least as many true pairs as plain `imagehash.phash(Image.open(path))` hashes of full decodes
find, with no more false pairs; the pool gives the bytes of one process.
"""

from __future__ import annotations

import io
from pathlib import Path

import imagehash
import numpy as np
import pytest
from PIL import Image, ImageEnhance
from scipy import ndimage

from charaforge.config import DedupeConfig
from charaforge.prepare import dedupe, hamming

CONFIG = DedupeConfig(hash="phash", hash_size=8, threshold=10)
KINDS = ("resized", "recompressed", "cropped", "brighter", "darker")


def photo_like(rng: np.random.Generator, width: int = 1024, height: int = 768) -> Image.Image:
    coarse = rng.normal(size=(height // 32, width // 32, 3))
    field = ndimage.gaussian_filter(coarse, sigma=(rng.uniform(1, 3), rng.uniform(1, 3), 0))
    field = np.uint8(255 * (field - field.min()) / (np.ptp(field) + 1e-9))
    image = Image.fromarray(field).resize((width, height), Image.BICUBIC)
    grain = rng.integers(-10, 11, (height, width, 3))
    return Image.fromarray(np.clip(np.asarray(image, np.int16) + grain, 0, 255).astype(np.uint8))


def planted(image: Image.Image, kind: str) -> Image.Image:
    width, height = image.size
    if kind == "resized":
        return image.resize((width * 2 // 5, height * 2 // 5), Image.BILINEAR)
    if kind == "recompressed":
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=20)
        return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")
    if kind == "cropped":
        return image.crop((width // 30, height // 30, width - width // 40, height - height // 40))
    return ImageEnhance.Brightness(image).enhance(1.15 if kind == "brighter" else 0.87)


@pytest.fixture(scope="module")
def planted_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Path], list[int]]:
    folder = tmp_path_factory.mktemp("decode")
    rng = np.random.default_rng(21)
    paths, groups = [], []
    for index in range(10):
        original = photo_like(rng)
        suffix = "webp" if index % 3 == 0 else "jpg"
        for kind in ("original", *KINDS):
            image = original if kind == "original" else planted(original, kind)
            path = folder / f"{index:02d}_{kind}.{suffix}"
            image.save(path, quality=90)
            paths.append(path)
            groups.append(index)
    return paths, groups


def pair_counts(packed: np.ndarray, groups: list[int]) -> tuple[int, int]:
    """(true pairs found, false pairs found), by brute force: the reference search."""
    true = false = 0
    for i, j, _ in hamming.near_pairs(packed, CONFIG.threshold):
        if groups[i] == groups[j]:
            true += 1
        else:
            false += 1
    return true, false


def test_partial_decodes_recall_at_least_what_full_decodes_do(
    planted_files: tuple[list[Path], list[int]],
) -> None:
    paths, groups = planted_files
    full_hashes = []
    for path in paths:
        with Image.open(path) as image:
            full_hashes.append(imagehash.phash(image))
    full_true, full_false = pair_counts(dedupe.pack_hashes(full_hashes), groups)
    partial = dedupe.hash_files(paths, CONFIG, workers=1)
    partial_true, partial_false = pair_counts(partial, groups)
    assert full_true > 0
    assert partial_true >= full_true, (partial_true, full_true)
    assert partial_false <= full_false, (partial_false, full_false)
    # The JPEGs really were decoded small (DCT scaling), not full-size and then reduced.
    jpeg = next(path for path in paths if path.suffix == ".jpg")
    with Image.open(jpeg) as image:
        image.draft("L", (64, 64))
        assert image.size[0] <= 1024 // 8 * 2
    assert max(dedupe.load_for_hash(jpeg, "phash", 8).size) <= 1024 // 4


def test_the_pool_gives_the_hashes_of_one_process(
    planted_files: tuple[list[Path], list[int]],
) -> None:
    paths, _ = planted_files
    assert len(paths) >= dedupe.PARALLEL_MIN  # so that the pool really runs
    np.testing.assert_array_equal(
        dedupe.hash_files(paths, CONFIG, workers=1), dedupe.hash_files(paths, CONFIG, workers=2)
    )


def test_jpegs_decode_small_through_libjpeg_turbo_with_exif_orientation(tmp_path: Path) -> None:
    """simplejpeg's DCT-scaled luma is what hashes a JPEG, EXIF orientation applied; a JPEG it
    cannot decode (CMYK) still hashes, through Pillow."""
    rng = np.random.default_rng(3)
    coarse = Image.fromarray(rng.integers(0, 256, (6, 8), dtype=np.uint8))
    picture = coarse.resize((1024, 768), Image.BICUBIC).convert("RGB")
    upright = tmp_path / "upright.jpg"
    picture.save(upright, quality=92)
    # The same picture stored on its side, with EXIF orientation 6 ("rotate 90 clockwise").
    sideways = tmp_path / "sideways.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6
    picture.transpose(Image.Transpose.ROTATE_90).save(sideways, quality=92, exif=exif)
    luma = dedupe._jpeg_luma(upright, 64)
    assert luma is not None and luma.size == (128, 96) and luma.mode == "L"
    assert dedupe._jpeg_luma(sideways, 64).size == (128, 96)
    hashes = [dedupe.hash_file(path, "phash", 8).hex() for path in (upright, sideways)]
    assert dedupe.hex_distance(*hashes) <= 4
    with Image.open(sideways) as image:  # without the orientation the hash is far away
        unturned = imagehash.phash(image)
    assert dedupe.hex_distance(hashes[0], str(unturned)) > 10
    cmyk = tmp_path / "cmyk.jpg"
    picture.convert("CMYK").save(cmyk, quality=92)
    assert dedupe._jpeg_luma(cmyk, 64) is None
    assert dedupe.hex_distance(dedupe.hash_file(cmyk, "phash", 8).hex(), hashes[0]) <= 4
