"""The built-in demo set: a drawn character with known tags, planted near-duplicates, broken files
and real photos of people.

Every image is drawn with PIL from a seeded RNG, so the same seed gives the same bytes, and every
tag in a sidecar `.txt` names something that was actually drawn: the set is ground truth for the
ingest, dedupe, tag and pose stages. `ground_truth.json` lists the planted duplicates (duplicate ->
original), the broken files (file -> what is wrong with it) and the tags of every file.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass, field
from pathlib import Path

import imagehash
import numpy as np
from PIL import Image, ImageDraw, ImageEnhance

from charaforge.config import DemoConfig
from charaforge.core.files import (
    atomic_path,
    derive_seed,
    write_bytes,
    write_json,
    write_png,
    write_text,
)
from charaforge.prepare import world

log = logging.getLogger(__name__)

# What the character always looks like (these colours are what the tags promise).
HAIR = (200, 30, 40)
EYES = (30, 80, 220)
DRESS = (40, 70, 200)
SKIN = (250, 215, 190)
SHOES = (60, 40, 30)
CHARACTER_TAGS = ("1girl", "solo", "red hair", "long hair", "blue eyes", "blue dress")

POSES = ("arms up", "arms at sides", "sitting")
FRAMINGS = ("full body", "upper body")
BACKGROUNDS = (
    "white background",
    "gradient background",
    "grey background",
    "two-tone background",
    "striped background",
)
# Originals are redrawn (with the next seeded draw) until their 8x8 pHash is at least this far
# (Hamming) from every earlier one, and planted duplicates until they are at most DUPLICATE_MAX
# from their original: the default dedupe settings (threshold 10) then separate the set exactly.
MIN_SEPARATION = 20
DUPLICATE_MAX = 6
MAX_ATTEMPTS = 50

# Real photos of people that ship with scikit-image, with tags a person would give them.
PHOTOS: dict[str, tuple[str, tuple[str, ...]]] = {
    "astronaut": (
        "astronaut",
        ("photo", "1girl", "solo", "short hair", "smile", "spacesuit", "upper body", "flag"),
    ),
    "camera": (
        "camera",
        ("photo", "1boy", "solo", "monochrome", "coat", "camera", "tripod", "outdoors"),
    ),
}

BROKEN_KINDS = ("empty", "truncated", "text")


@dataclass
class DemoSummary:
    images: int = 0
    duplicates: int = 0
    broken: int = 0
    photos: int = 0
    ground_truth: dict = field(default_factory=dict)


def _background(kind: str, size: int, rng: np.random.Generator) -> Image.Image:
    """A background with low-frequency structure (what perceptual hashes see), varied by seed."""
    if kind == "white background":
        return Image.new("RGB", (size, size), (255, 255, 255))
    if kind == "grey background":
        return Image.new("RGB", (size, size), (128, 128, 128))
    low, high = rng.integers(30, 226, size=(2, 3))
    ramp = np.linspace(0.0, 1.0, size)
    if kind == "gradient background":
        direction = int(rng.integers(0, 3))  # vertical, horizontal or diagonal
        weight = [ramp[:, None], ramp[None, :], (ramp[:, None] + ramp[None, :]) / 2][direction]
    elif kind == "two-tone background":
        split = rng.uniform(0.3, 0.7)
        weight = (ramp[:, None] > split) if rng.random() < 0.5 else (ramp[None, :] > split)
    else:  # striped: a few wide bands, so the stripes survive down-sampling
        period = rng.uniform(0.25, 0.5)
        weight = (np.floor(ramp / (period / 2)) % 2)[:, None]
    weight = np.broadcast_to(np.asarray(weight, dtype=np.float64), (size, size))[:, :, None]
    pixels = low[None, None, :] * (1 - weight) + high[None, None, :] * weight
    return Image.fromarray(np.rint(pixels).astype(np.uint8), "RGB")


def _draw_character(
    image: Image.Image, pose: str, framing: str, rng: np.random.Generator
) -> Image.Image:
    """Draw the character as a simple figure; coordinates are in figure heights, then mapped."""
    size = image.width
    if framing == "full body":
        height = size * rng.uniform(0.78, 0.9)
        top = size * 0.06
    else:  # upper body: the figure is magnified so only head and torso fit in the frame
        height = size * rng.uniform(1.7, 1.9)
        top = size * 0.08
    centre_x = size * rng.uniform(0.3, 0.7)
    sitting = pose == "sitting"
    if sitting:
        top += height * 0.12

    def point(x: float, y: float) -> tuple[float, float]:
        return (centre_x + x * height, top + y * height)

    def box(x0: float, y0: float, x1: float, y1: float) -> list[float]:
        return [*point(x0, y0), *point(x1, y1)]

    draw = ImageDraw.Draw(image)
    limb = max(int(height * 0.035), 2)
    # Long hair behind the head and shoulders.
    draw.rounded_rectangle(box(-0.11, 0.0, 0.11, 0.3), radius=int(height * 0.08), fill=HAIR)
    # Legs first so the dress covers the hips.
    if sitting:
        for side in (-1, 1):
            hip, knee, foot = (
                (side * 0.04, 0.52),
                (side * 0.09 + 0.18, 0.56),
                (side * 0.09 + 0.2, 0.8),
            )
            draw.line(
                [point(*hip), point(*knee), point(*foot)], fill=SKIN, width=limb, joint="curve"
            )
            draw.ellipse(
                box(foot[0] - 0.03, foot[1] - 0.01, foot[0] + 0.04, foot[1] + 0.03), fill=SHOES
            )
    else:
        for side in (-1, 1):
            hip, foot = (side * 0.05, 0.55), (side * 0.07, 0.94)
            draw.line([point(*hip), point(*foot)], fill=SKIN, width=limb)
            draw.ellipse(
                box(foot[0] - 0.035, foot[1] - 0.01, foot[0] + 0.035, foot[1] + 0.03), fill=SHOES
            )
    hem = 0.56 if sitting else 0.66
    draw.polygon(
        [point(-0.07, 0.2), point(0.07, 0.2), point(0.17, hem), point(-0.17, hem)], fill=DRESS
    )
    # Arms.
    for side in (-1, 1):
        shoulder = (side * 0.07, 0.22)
        if pose == "arms up":
            elbow, hand = (side * 0.15, 0.1), (side * 0.17, -0.04)
        else:
            elbow, hand = (side * 0.12, 0.36), (side * 0.14, 0.5)
        draw.line(
            [point(*shoulder), point(*elbow), point(*hand)], fill=SKIN, width=limb, joint="curve"
        )
        draw.ellipse(box(hand[0] - 0.02, hand[1] - 0.02, hand[0] + 0.02, hand[1] + 0.02), fill=SKIN)
    # Head, fringe and eyes.
    draw.ellipse(box(-0.08, 0.02, 0.08, 0.19), fill=SKIN)
    draw.chord(box(-0.09, 0.0, 0.09, 0.14), start=180, end=360, fill=HAIR)
    for side in (-1, 1):
        draw.ellipse(box(side * 0.035 - 0.018, 0.1, side * 0.035 + 0.018, 0.135), fill=EYES)
    draw.arc(
        box(-0.025, 0.14, 0.025, 0.165),
        start=20,
        end=160,
        fill=(170, 60, 60),
        width=max(limb // 3, 1),
    )
    return image


def _character_image(
    index: int, size: int, rng: np.random.Generator
) -> tuple[Image.Image, list[str]]:
    pose = POSES[index % len(POSES)]
    # Sitting needs the legs in frame, so it is always drawn full body.
    framing = "full body" if pose == "sitting" else FRAMINGS[(index // len(POSES)) % len(FRAMINGS)]
    background = BACKGROUNDS[index % len(BACKGROUNDS)]
    image = _draw_character(_background(background, size, rng), pose, framing, rng)
    posture = ["sitting"] if pose == "sitting" else ["standing", pose]
    return image, [*CHARACTER_TAGS, *posture, framing, background]


def _world_character_image(index: int, size: int, seed: int) -> tuple[Image.Image, list[str]]:
    """The world's held-out character on the next background (cycling), jittered by `seed`."""
    backgrounds = world.ATTRIBUTES["background"]
    scene = world.make_scene(
        **world.DEMO_CHARACTER, background=backgrounds[index % len(backgrounds)]
    )
    return world.render(scene, seed, size), [world.SUBJECT_TAG, *world.attribute_tags(scene)]


def _phash(image: Image.Image) -> imagehash.ImageHash:
    return imagehash.phash(image, hash_size=8)


def _separated_character_image(
    index: int,
    config: DemoConfig,
    seed: int,
    character: str,
    taken: list[imagehash.ImageHash],
) -> tuple[Image.Image, list[str]]:
    """Draw image `index`, redrawing until it is MIN_SEPARATION from every earlier one."""
    best = None
    for attempt in range(MAX_ATTEMPTS):
        draw_seed = derive_seed(seed, "demo", character, index, attempt)
        if config.character_kind == "world":
            image, tags = _world_character_image(index, config.image_size, draw_seed)
        else:
            rng = np.random.default_rng(draw_seed)
            image, tags = _character_image(index, config.image_size, rng)
        code = _phash(image)
        gap = min((code - other for other in taken), default=64)
        if best is None or gap > best[0]:
            best = (gap, image, tags, code)
        if gap >= MIN_SEPARATION:
            break
    gap, image, tags, code = best
    if gap < MIN_SEPARATION:
        log.warning("demo image %d is only %d bits from another one", index, gap)
    taken.append(code)
    return image, tags


def _near_duplicate_once(original: Image.Image, rng: np.random.Generator) -> bytes:
    """A resized, slightly cropped, brightness-shifted, low-quality JPEG copy of an image."""
    width, height = original.size
    crop = rng.uniform(0.02, 0.04, size=4)
    cropped = original.crop(
        (
            round(width * crop[0]),
            round(height * crop[1]),
            width - round(width * crop[2]),
            height - round(height * crop[3]),
        )
    )
    scale = rng.uniform(0.7, 0.85)
    resized = cropped.resize(
        (round(cropped.width * scale), round(cropped.height * scale)), Image.BILINEAR
    )
    factor = rng.choice([rng.uniform(0.88, 0.94), rng.uniform(1.06, 1.12)])
    shifted = ImageEnhance.Brightness(resized).enhance(float(factor))
    buffer = io.BytesIO()
    shifted.save(buffer, format="JPEG", quality=int(rng.integers(30, 46)))
    return buffer.getvalue()


def _near_duplicate(original: Image.Image, seed: int, name: str, k: int) -> bytes:
    """A near-duplicate that stays within DUPLICATE_MAX pHash bits of its original."""
    code = _phash(original)
    best = None
    for attempt in range(MAX_ATTEMPTS):
        rng = np.random.default_rng(derive_seed(seed, "demo", "duplicate", name, k, attempt))
        data = _near_duplicate_once(original, rng)
        with Image.open(io.BytesIO(data)) as copy:
            distance = _phash(copy.convert("RGB")) - code
        if best is None or distance < best[0]:
            best = (distance, data)
        if distance <= DUPLICATE_MAX:
            break
    return best[1]


def _broken_file(kind: str, sample_png: bytes) -> tuple[str, bytes, str]:
    if kind == "empty":
        return ".png", b"", "zero-byte file"
    if kind == "truncated":
        return ".png", sample_png[: len(sample_png) // 2], "truncated PNG (second half missing)"
    return ".jpg", b"This is a text file, not a JPEG.\n", "text file with a .jpg name"


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=False, compress_level=6)
    return buffer.getvalue()


def make_demo_set(
    out_dir: str | Path, config: DemoConfig, character: str, seed: int
) -> DemoSummary:
    """Write the demo set under `out_dir` (replaced atomically) and return what was planted."""
    summary = DemoSummary()
    truth: dict = {"character": character, "duplicates": {}, "broken": {}, "tags": {}, "photos": []}
    with atomic_path(out_dir) as root:
        folder = root / character
        originals: list[tuple[str, Image.Image, list[str]]] = []
        taken: list[imagehash.ImageHash] = []
        for index in range(config.images_per_character):
            image, tags = _separated_character_image(index, config, seed, character, taken)
            name = f"{character}/{character}_{index:03d}.png"
            write_png(root / name, image)
            write_text((root / name).with_suffix(".txt"), ", ".join(tags) + "\n")
            truth["tags"][name] = tags
            originals.append((name, image, tags))
        summary.images = len(originals)

        rng = np.random.default_rng(derive_seed(seed, "demo", character, "duplicates"))
        order = rng.permutation(len(originals))
        for k in range(config.near_duplicates):
            name, image, tags = originals[int(order[k % len(order)])]
            dup_name = name.removesuffix(".png") + f"_dup{k}.jpg"
            write_bytes(root / dup_name, _near_duplicate(image, seed, name, k))
            write_text((root / dup_name).with_suffix(".txt"), ", ".join(tags) + "\n")
            truth["duplicates"][dup_name] = name
            truth["tags"][dup_name] = tags
        summary.duplicates = config.near_duplicates

        sample_png = _png_bytes(originals[0][1])
        for k in range(config.broken_files):
            kind = BROKEN_KINDS[k % len(BROKEN_KINDS)]
            suffix, payload, reason = _broken_file(kind, sample_png)
            name = f"{character}/broken_{k}_{kind}{suffix}"
            write_bytes(folder.parent / name, payload)
            truth["broken"][name] = reason
        summary.broken = config.broken_files

        if config.include_photos:
            import skimage.data

            for stem, (loader, tags) in PHOTOS.items():
                pixels = getattr(skimage.data, loader)()
                image = Image.fromarray(pixels).convert("RGB")
                name = f"photos/{stem}.png"
                write_png(root / name, image)
                write_text((root / name).with_suffix(".txt"), ", ".join(tags) + "\n")
                truth["tags"][name] = list(tags)
                truth["photos"].append(name)
            summary.photos = len(PHOTOS)
        write_json(root / "ground_truth.json", truth)
    summary.ground_truth = truth
    log.info(
        "demo set: %d images, %d near-duplicates, %d broken files, %d photos",
        summary.images,
        summary.duplicates,
        summary.broken,
        summary.photos,
    )
    return summary
