"""Ingest on a corpus built here: every image mode and format it must normalise, and more than
fifteen kinds of bad input it must quarantine with one reason each, without touching the inputs.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageCms

from charaforge.config import IngestConfig
from charaforge.prepare import ingest

BACKGROUND = (0, 128, 255)
CONFIG = IngestConfig(min_side=16, max_pixels=4_000_000, max_side=512, background=BACKGROUND)


def _save(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def _texture(width: int, height: int, seed: int, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 255, (6, 6, 3), dtype=np.uint8)
    return Image.fromarray(blocks).resize((width, height), Image.NEAREST).convert(mode)


def _chunk(kind: bytes, payload: bytes) -> bytes:
    return (
        struct.pack(">I", len(payload))
        + kind
        + payload
        + struct.pack(">I", zlib.crc32(kind + payload))
    )


def _png_rgb16(pixels: np.ndarray) -> bytes:
    """A 48-bit RGB PNG written by hand (PIL cannot write one): 16 bits per channel."""
    height, width, _ = pixels.shape
    rows = b"".join(b"\x00" + pixels[y].astype(">u2").tobytes() for y in range(height))
    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", zlib.compress(rows))
        + _chunk(b"IEND", b"")
    )


def _with_ihdr_size(png: bytes, width: int, height: int) -> bytes:
    data = bytearray(png)
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def _corrupt_idat(png: bytes) -> bytes:
    """Scramble the compressed pixel data inside IDAT (CRC recomputed so only zlib notices)."""
    data = bytearray(png)
    start = data.index(b"IDAT") + 4
    length = struct.unpack(">I", data[start - 8 : start - 4])[0]
    for k in range(2, length, 3):
        data[start + k] ^= 0x5A
    data[start + length : start + length + 4] = struct.pack(
        ">I", zlib.crc32(bytes(data[start - 4 : start + length]))
    )
    return bytes(data)


def _exif_jpeg(image: Image.Image, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return _save(image, "JPEG", exif=exif, quality=95)


def build_corpus(root: Path) -> tuple[dict[str, str], dict[str, str]]:
    """Write the corpus; return good file -> what it checks, bad file -> expected kind."""
    good: dict[str, str] = {}
    bad: dict[str, str] = {}

    def put(name: str, payload: bytes) -> Path:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(payload)
        return path

    # --- good: every mode and format --------------------------------------------------------
    put("modes/rgb.jpg", _save(_texture(80, 60, 1), "JPEG", quality=95))
    rgba = _texture(64, 64, 2).convert("RGBA")
    alpha = np.full((64, 64), 255, np.uint8)
    alpha[:, :32] = 0
    rgba.putalpha(Image.fromarray(alpha))
    put("modes/rgba.png", _save(rgba, "PNG"))
    put("modes/la.png", _save(_texture(40, 40, 3, "L").convert("LA"), "PNG"))
    put("modes/grey.png", _save(_texture(40, 40, 4, "L"), "PNG"))
    put("modes/bilevel.png", _save(_texture(40, 40, 5, "1"), "PNG"))
    palette = _texture(48, 48, 6).convert("P", palette=Image.ADAPTIVE, colors=8)
    put("modes/palette.png", _save(palette, "PNG"))
    transparent_palette = palette.copy()
    index = transparent_palette.getpixel((0, 0))
    put("modes/palette_trns.png", _save(transparent_palette, "PNG", transparency=index))
    grey16 = np.full((32, 32), 32896, np.uint16)  # 128 * 257
    grey16[:4, :4] = 65535
    put("modes/grey16.png", _save(Image.fromarray(grey16), "PNG"))
    rgb16 = np.zeros((20, 24, 3), np.uint16)
    rgb16[..., 0] = 65535
    rgb16[..., 2] = 257 * 100
    put("modes/rgb16.png", _png_rgb16(rgb16))
    put("modes/cmyk.jpg", _save(Image.new("CMYK", (40, 30), (255, 0, 0, 0)), "JPEG", quality=100))
    put("modes/lab.tif", _save(Image.new("LAB", (30, 30), (255, 128, 128)), "TIFF"))
    float_pixels = np.linspace(0.0, 1.0, 40 * 40, dtype=np.float32).reshape(40, 40)
    put("modes/float.tif", _save(Image.fromarray(float_pixels, "F"), "TIFF"))
    put("modes/int32.tif", _save(Image.fromarray(grey16.astype(np.int32), "I"), "TIFF"))
    put("modes/ycbcr.jpg", _save(_texture(50, 50, 7).convert("YCbCr"), "JPEG", quality=95))
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    put("modes/icc.jpg", _save(_texture(40, 40, 8), "JPEG", quality=95, icc_profile=srgb))
    put("formats/image.webp", _save(rgba, "WEBP", lossless=True))
    put("formats/image.bmp", _save(_texture(33, 21, 9), "BMP"))
    put("formats/image.tiff", _save(_texture(30, 40, 10), "TIFF", compression="tiff_lzw"))
    frames = [Image.new("RGB", (40, 40), colour).convert("P") for colour in ("red", "blue")]
    put("formats/animated.gif", _save(frames[0], "GIF", save_all=True, append_images=frames[1:]))
    put("formats/rotated.jpg", _exif_jpeg(_texture(60, 30, 11), 6))
    put("formats/upside_down.jpg", _exif_jpeg(_texture(60, 30, 12), 3))
    put("formats/bad_exif.jpg", _exif_jpeg(_texture(30, 30, 13), 99))
    put("formats/PNG_NAMED.JPG", _save(_texture(30, 30, 14), "PNG"))
    put("unicode/キャラ_é ñ.png", _save(_texture(30, 30, 15), "PNG"))
    (root / "unicode/キャラ_é ñ.txt").write_text("赤い髪, smile\n", encoding="utf-8")
    good.update(
        {
            "modes/rgb.jpg": "rgb",
            "modes/rgba.png": "alpha composited",
            "modes/la.png": "grey + alpha",
            "modes/grey.png": "grey",
            "modes/bilevel.png": "1-bit",
            "modes/palette.png": "palette",
            "modes/palette_trns.png": "palette with tRNS",
            "modes/grey16.png": "16-bit grey",
            "modes/rgb16.png": "16-bit RGB",
            "modes/cmyk.jpg": "CMYK",
            "modes/lab.tif": "LAB",
            "modes/float.tif": "float",
            "modes/int32.tif": "32-bit int",
            "modes/ycbcr.jpg": "YCbCr",
            "modes/icc.jpg": "ICC profile",
            "formats/image.webp": "webp",
            "formats/image.bmp": "bmp",
            "formats/image.tiff": "tiff",
            "formats/animated.gif": "gif first frame",
            "formats/rotated.jpg": "exif 6",
            "formats/upside_down.jpg": "exif 3",
            "formats/bad_exif.jpg": "invalid exif orientation",
            "formats/PNG_NAMED.JPG": "png content, JPG name, upper case",
            "unicode/キャラ_é ñ.png": "unicode name",
        }
    )

    # --- bad: one file per kind of trouble ---------------------------------------------------
    sample_png = _save(_texture(64, 64, 20), "PNG")
    sample_jpg = _save(_texture(64, 64, 21), "JPEG", quality=90)
    put("bad/empty.png", b"")
    put("bad/truncated.png", sample_png[: len(sample_png) // 2])
    put("bad/truncated.jpg", sample_jpg[: len(sample_jpg) * 3 // 5])
    gif = _save(_texture(64, 64, 22).convert("P"), "GIF")
    put("bad/truncated.gif", gif[: len(gif) // 2])
    put("bad/corrupt_idat.png", _corrupt_idat(sample_png))
    put("bad/header_only.jpg", sample_jpg[:2] + b"\x00" * 64)
    put("bad/text.jpg", b"This is a text file, not a JPEG.\n")
    put("bad/page.png", b"<!DOCTYPE html><html><body>404 Not Found</body></html>\n")
    put("bad/drawing.png", b'<svg xmlns="http://www.w3.org/2000/svg" width="9" height="9"/>')
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as handle:
        handle.writestr("inside.png", sample_png)
    put("bad/archive.jpg", archive.getvalue())
    put("bad/tiny.png", _save(Image.new("RGB", (8, 8)), "PNG"))
    put("bad/sliver.png", _save(Image.new("RGB", (600, 4)), "PNG"))
    put("bad/zero_width.png", _with_ihdr_size(sample_png, 0, 64))
    put("bad/bomb.png", _with_ihdr_size(sample_png, 4000, 4000))
    bmp = bytearray(_save(_texture(16, 16, 23), "BMP"))
    bmp[18:26] = struct.pack("<ii", 60000, 60000)  # header claims 3.6 gigapixels
    put("bad/bomb.bmp", bytes(bmp))
    put(
        "bad/garbage.tiff",
        b"II*\x00" + struct.pack("<I", 10_000_000) + os.urandom(0) + b"\x00" * 32,
    )
    os.symlink("nowhere.png", root / "bad/dangling.png")
    os.symlink("self.png", root / "bad/self.png")
    os.symlink("ping.jpg", root / "bad/pong.jpg")
    os.symlink("pong.jpg", root / "bad/ping.jpg")
    os.symlink("..", root / "bad/folder_loop")
    os.mkfifo(root / "bad/pipe.png")
    bad.update(
        {
            "bad/empty.png": "empty",
            "bad/truncated.png": "truncated",
            "bad/truncated.jpg": "truncated",
            "bad/truncated.gif": "truncated",
            "bad/corrupt_idat.png": "truncated",
            "bad/header_only.jpg": "truncated",
            "bad/text.jpg": "not_image",
            "bad/page.png": "not_image",
            "bad/drawing.png": "not_image",
            "bad/archive.jpg": "not_image",
            "bad/tiny.png": "too_small",
            "bad/sliver.png": "too_small",
            "bad/zero_width.png": "truncated",
            "bad/bomb.png": "decompression_bomb",
            "bad/bomb.bmp": "decompression_bomb",
            "bad/garbage.tiff": "truncated",
            "bad/dangling.png": "broken_symlink",
            "bad/self.png": "symlink_loop",
            "bad/ping.jpg": "symlink_loop",
            "bad/pong.jpg": "symlink_loop",
            "bad/folder_loop": "symlink_loop",
            "bad/pipe.png": "not_regular_file",
        }
    )
    if os.geteuid() != 0:  # root reads anything: permissions cannot make a file unreadable
        locked = put("bad/locked.png", sample_png)
        locked.chmod(0)
        bad["bad/locked.png"] = "unreadable"
    (root / "notes.md").write_text("not an image: ignored, neither kept nor quarantined\n")
    return good, bad


def _snapshot(root: Path) -> dict[str, str]:
    state = {}
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root).as_posix()
        if path.is_symlink():
            state[relative] = "link:" + os.readlink(path)
        elif path.is_fifo():
            state[relative] = "fifo"
        elif path.is_file():
            state[relative] = hashlib.sha256(path.read_bytes()).hexdigest()
    return state


@pytest.fixture(scope="module")
def ingested(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("corpus")
    source = root / "inbox"
    source.mkdir()
    good, bad = build_corpus(source)
    before = _snapshot(source)
    cwd = os.getcwd()
    os.chdir(root)
    try:
        summary = ingest.ingest_folder("inbox", "out", CONFIG)
    finally:
        os.chdir(cwd)
    return {
        "root": root,
        "good": good,
        "bad": bad,
        "before": before,
        "after": _snapshot(source),
        "summary": summary,
        "manifest": pd.read_parquet(root / "out/manifest.parquet"),
        "quarantine": pd.read_parquet(root / "out/quarantine.parquet"),
        "report": json.loads((root / "out/summary.json").read_text(encoding="utf-8")),
    }


def test_corpus_has_at_least_fifteen_kinds_of_bad_input(ingested: dict) -> None:
    # Distinct troubles, not just distinct kinds: each file breaks in its own way.
    assert len(ingested["bad"]) >= 15
    assert len(set(ingested["bad"].values())) >= 7


def test_every_bad_file_is_quarantined_once_with_its_kind(ingested: dict) -> None:
    quarantine = ingested["quarantine"]
    assert list(quarantine.columns) == ingest.QUARANTINE_COLUMNS
    got = dict(zip(quarantine.source_path.str.removeprefix("inbox/"), quarantine.kind, strict=True))
    assert got == ingested["bad"], {k: (got.get(k), v) for k, v in ingested["bad"].items()}
    assert quarantine.source_path.is_unique and quarantine.reason.str.len().min() > 10
    assert set(quarantine.kind) <= set(ingest.QUARANTINE_KINDS)


def test_summary_counts_and_inputs_untouched(ingested: dict) -> None:
    assert ingested["before"] == ingested["after"]
    report, summary = ingested["report"], ingested["summary"]
    assert report["quarantined"] == len(ingested["bad"]) == summary.quarantined
    expected = pd.Series(list(ingested["bad"].values())).value_counts().to_dict()
    assert report["quarantined_by_kind"] == expected
    assert report["images"] == len(ingested["good"]) and report["ignored_non_image_files"] == 2


def test_every_good_file_is_normalised_to_rgb(ingested: dict) -> None:
    manifest = ingested["manifest"].set_index(
        ingested["manifest"].source_path.str.removeprefix("inbox/")
    )
    assert set(manifest.index) == set(ingested["good"])
    root = ingested["root"]

    def pixels(name: str) -> np.ndarray:
        with Image.open(root / manifest.loc[name, "image_path"]) as image:
            assert image.mode == "RGB"
            return np.asarray(image)

    for name in ingested["good"]:
        pixels(name)
    assert tuple(pixels("modes/rgba.png")[5, 5]) == BACKGROUND  # transparent half
    assert tuple(pixels("modes/la.png")[5, 5]) == tuple(pixels("modes/la.png")[5, 5][[0, 0, 0]])
    palette = pixels("modes/palette_trns.png")
    assert tuple(palette[0, 0]) == BACKGROUND  # the tRNS index
    grey16 = pixels("modes/grey16.png")
    assert tuple(grey16[0, 0]) == (255, 255, 255) and tuple(grey16[10, 10]) == (128, 128, 128)
    assert tuple(pixels("modes/rgb16.png")[3, 3]) == (255, 0, 100)
    cyan = pixels("modes/cmyk.jpg")[10, 10].astype(int)
    assert cyan[0] < 10 and cyan[1] > 245 and cyan[2] > 245
    assert pixels("modes/lab.tif").min() >= 250  # LAB white is sRGB white
    ramp = pixels("modes/float.tif")[:, :, 0]
    assert ramp[0, 0] == 0 and ramp[-1, -1] == 255 and len(np.unique(ramp)) > 200
    assert tuple(pixels("formats/animated.gif")[5, 5]) == (255, 0, 0)  # the first frame
    assert pixels("formats/rotated.jpg").shape == (60, 30, 3)  # EXIF 6: rotated upright
    upside = pixels("formats/upside_down.jpg")
    with Image.open(root / "inbox/formats/upside_down.jpg") as original:
        flipped = np.asarray(original.convert("RGB").rotate(180))
    assert np.abs(upside.astype(int) - flipped).mean() < 1.0
    unicode = manifest.loc["unicode/キャラ_é ñ.png"]
    assert unicode.sidecar_text == "赤い髪, smile" and unicode.source_group == "unicode"
    assert tuple(manifest.loc["formats/animated.gif", ["width", "height"]]) == (40, 40)
