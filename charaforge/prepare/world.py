"""The world: a deterministic renderer of characters whose attributes are known.

Every image of the world pipeline comes from here: the pretraining corpus of the world models,
the demo character's training images (a combination held out of pretraining, so the base model
can only learn it through the LoRA) and the ground truth the attribute oracle is judged on.

A scene is one value per attribute. `render` draws it at 4x the output size with PIL and
down-samples with LANCZOS (smooth edges the diffusion models can learn at 32 px); the character's
position and size jitter with the render seed. The same (scene, seed, size) gives the same bytes.
Captions are booru-style tags, as the WD14 tagger and the LoRA trainer expect.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

# Attribute -> its values, in caption order. Colours are chosen far apart at 32 px.
ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "hair_colour": ("black", "blonde", "brown", "red", "blue", "pink"),
    "hair_length": ("short", "long"),
    "outfit_colour": ("red", "orange", "yellow", "green", "blue", "purple"),
    "outfit": ("dress", "shirt"),
    "accessory": ("none", "hat", "sunglasses"),
    "background": ("beach", "forest", "city", "snow", "room"),
}
# The character's identity: everything but the scene around it.
CHARACTER_ATTRIBUTES: tuple[str, ...] = tuple(name for name in ATTRIBUTES if name != "background")

# The demo character: never drawn by sample_scenes(exclude_demo=True), so a model pretrained on
# the world has never seen it and can only learn it (bound to a trigger word) through a LoRA.
DEMO_CHARACTER: dict[str, str] = {
    "hair_colour": "pink",
    "hair_length": "long",
    "outfit_colour": "yellow",
    "outfit": "dress",
    "accessory": "hat",
}

SUBJECT_TAG = "1girl"

HAIR_RGB = {
    "black": (28, 26, 30),
    "blonde": (246, 214, 96),
    "brown": (124, 72, 36),
    "red": (206, 30, 36),
    "blue": (44, 86, 226),
    "pink": (255, 122, 196),
}
OUTFIT_RGB = {
    "red": (214, 38, 44),
    "orange": (248, 136, 28),
    "yellow": (252, 226, 36),
    "green": (44, 168, 64),
    "blue": (40, 72, 208),
    "purple": (136, 52, 178),
}
SKIN_RGB = (250, 214, 182)
OUTLINE_RGB = (20, 20, 24)
TROUSERS_RGB = (74, 74, 80)
HAT_RGB = (58, 48, 72)
HAT_BAND_RGB = (240, 240, 240)
SUNGLASSES_RGB = (8, 8, 10)


@dataclass(frozen=True)
class Scene:
    """One value per attribute, in ATTRIBUTES order (hashable, comparable, stable to print)."""

    values: tuple[tuple[str, str], ...]

    def get(self, attribute: str) -> str:
        for name, value in self.values:
            if name == attribute:
                return value
        raise KeyError(f"unknown attribute {attribute!r}; known: {', '.join(ATTRIBUTES)}")

    def as_dict(self) -> dict[str, str]:
        return dict(self.values)

    def character(self) -> dict[str, str]:
        """The identity part of the scene (every attribute but the background)."""
        return {name: value for name, value in self.values if name in CHARACTER_ATTRIBUTES}

    def replace(self, **values: str) -> Scene:
        return make_scene(**{**self.as_dict(), **values})


def make_scene(**values: str) -> Scene:
    """A scene from one value per attribute; unknown attributes or values raise ValueError."""
    unknown = sorted(set(values) - set(ATTRIBUTES))
    missing = [name for name in ATTRIBUTES if name not in values]
    if unknown or missing:
        raise ValueError(f"scene attributes: unknown {unknown}, missing {missing}")
    for name, value in values.items():
        if value not in ATTRIBUTES[name]:
            raise ValueError(f"{name}={value!r}: choose one of {', '.join(ATTRIBUTES[name])}")
    return Scene(tuple((name, values[name]) for name in ATTRIBUTES))


def held_out(scene: Scene) -> bool:
    """True when the scene's character is the demo character (whatever its background)."""
    return scene.character() == DEMO_CHARACTER


def sample_scenes(seed: int, count: int, exclude_demo: bool = True) -> list[Scene]:
    """`count` scenes with every attribute drawn uniformly; the same seed gives the same list."""
    rng = random.Random(seed)
    scenes: list[Scene] = []
    while len(scenes) < count:
        scene = make_scene(**{name: rng.choice(options) for name, options in ATTRIBUTES.items()})
        if exclude_demo and held_out(scene):
            continue
        scenes.append(scene)
    return scenes


# --- captions ---------------------------------------------------------------------------------


def attribute_tags(scene: Scene) -> list[str]:
    """The tags that name the scene's attributes, in caption order (no subject tag)."""
    values = scene.as_dict()
    tags = [
        f"{values['hair_colour']} hair",
        f"{values['hair_length']} hair",
        f"{values['outfit_colour']} {values['outfit']}",
    ]
    if values["accessory"] != "none":
        tags.append(values["accessory"])
    tags.append(f"{values['background']} background")
    return tags


def caption(scene: Scene, trigger: str | None = None) -> str:
    """Booru-style tags, e.g. "1girl, pink hair, long hair, yellow dress, hat, beach background"."""
    tags = ([trigger] if trigger else []) + [SUBJECT_TAG, *attribute_tags(scene)]
    return ", ".join(tags)


def _tag_table() -> dict[str, dict[str, str]]:
    table: dict[str, dict[str, str]] = {}
    for colour in ATTRIBUTES["hair_colour"]:
        table[f"{colour} hair"] = {"hair_colour": colour}
    for length in ATTRIBUTES["hair_length"]:
        table[f"{length} hair"] = {"hair_length": length}
    for colour in ATTRIBUTES["outfit_colour"]:
        for outfit in ATTRIBUTES["outfit"]:
            table[f"{colour} {outfit}"] = {"outfit_colour": colour, "outfit": outfit}
    for accessory in ATTRIBUTES["accessory"]:
        if accessory != "none":
            table[accessory] = {"accessory": accessory}
    for background in ATTRIBUTES["background"]:
        table[f"{background} background"] = {"background": background}
    return table


TAG_TABLE: dict[str, dict[str, str]] = _tag_table()


def parse_caption(text: str) -> dict[str, str]:
    """The attribute values a prompt names (the inverse of `caption`; unknown tags are ignored).

    Only what the prompt says: an absent accessory tag leaves "accessory" out rather than
    claiming "none", since a prompt that does not mention one does not ask for its absence.
    """
    named: dict[str, str] = {}
    for tag in text.split(","):
        named.update(TAG_TABLE.get(" ".join(tag.lower().split()), {}))
    return named


# --- drawing ----------------------------------------------------------------------------------


def _draw_background(draw: ImageDraw.ImageDraw, name: str, side: int) -> None:
    s = side
    if name == "beach":
        draw.rectangle((0, 0, s, 0.45 * s), fill=(120, 196, 246))
        draw.rectangle((0, 0.45 * s, s, 0.62 * s), fill=(20, 104, 188))
        draw.rectangle((0, 0.62 * s, s, s), fill=(234, 206, 142))
        draw.ellipse((0.74 * s, 0.06 * s, 0.92 * s, 0.24 * s), fill=(255, 244, 150))
    elif name == "forest":
        draw.rectangle((0, 0, s, s), fill=(22, 82, 40))
        draw.rectangle((0, 0.8 * s, s, s), fill=(84, 58, 30))
        for left in (0.02, 0.24, 0.62, 0.84):
            x = left * s
            draw.rectangle((x + 0.05 * s, 0.5 * s, x + 0.09 * s, 0.82 * s), fill=(92, 56, 26))
            draw.polygon(
                [(x, 0.58 * s), (x + 0.07 * s, 0.08 * s), (x + 0.14 * s, 0.58 * s)],
                fill=(70, 150, 60),
            )
    elif name == "city":
        draw.rectangle((0, 0, s, s), fill=(150, 156, 170))
        for left, top in ((0.0, 0.2), (0.17, 0.4), (0.36, 0.1), (0.62, 0.3), (0.8, 0.15)):
            box = (left * s, top * s, (left + 0.18) * s, s)
            draw.rectangle(box, fill=(72, 76, 90))
            for row in range(int((1 - top) / 0.12)):
                y = (top + 0.05 + 0.12 * row) * s
                draw.rectangle(
                    (box[0] + 0.04 * s, y, box[2] - 0.04 * s, y + 0.04 * s), fill=(250, 220, 90)
                )
        draw.rectangle((0, 0.86 * s, s, s), fill=(48, 48, 52))
    elif name == "snow":
        draw.rectangle((0, 0, s, s), fill=(196, 222, 244))
        draw.polygon([(0, 0.6 * s), (0.3 * s, 0.18 * s), (0.62 * s, 0.6 * s)], fill=(150, 160, 180))
        draw.polygon(
            [(0.4 * s, 0.6 * s), (0.75 * s, 0.1 * s), (s, 0.5 * s), (s, 0.6 * s)],
            fill=(130, 140, 164),
        )
        draw.polygon([(0.22 * s, 0.3 * s), (0.3 * s, 0.18 * s), (0.38 * s, 0.3 * s)], fill="white")
        draw.rectangle((0, 0.6 * s, s, s), fill=(250, 252, 255))
    elif name == "room":
        draw.rectangle((0, 0, s, s), fill=(226, 196, 150))
        draw.rectangle(
            (0.08 * s, 0.12 * s, 0.34 * s, 0.44 * s),
            fill=(140, 200, 240),
            outline=(250, 250, 250),
            width=max(1, s // 40),
        )
        draw.rectangle((0, 0.74 * s, s, s), fill=(130, 80, 44))
        draw.line((0, 0.74 * s, s, 0.74 * s), fill=(90, 50, 24), width=max(1, s // 64))
    else:  # pragma: no cover - make_scene validates the value
        raise ValueError(f"unknown background {name!r}")


def _draw_character(
    draw: ImageDraw.ImageDraw, values: dict[str, str], side: int, rng: random.Random
) -> None:
    scale = rng.uniform(0.88, 1.08)
    cx = side * (0.5 + rng.uniform(-0.1, 0.1))
    top = side * rng.uniform(0.02, 0.08)
    r = 0.13 * side * scale  # the head's radius: every other length is a multiple of it
    line = max(1, side // 64)
    head_y = top + 1.25 * r
    neck_y = head_y + 0.95 * r
    hem_y = min(side * 0.97, neck_y + 4.2 * r)
    hair = HAIR_RGB[values["hair_colour"]]
    outfit = OUTFIT_RGB[values["outfit_colour"]]

    if values["hair_length"] == "long":  # long hair falls behind the shoulders to mid-body
        draw.rounded_rectangle(
            (cx - 1.45 * r, head_y - 1.15 * r, cx + 1.45 * r, neck_y + 2.3 * r),
            radius=r,
            fill=hair,
            outline=OUTLINE_RGB,
            width=line,
        )
    # Legs (and trousers with a shirt), then the outfit over them.
    if values["outfit"] == "shirt":
        waist_y = neck_y + 2.2 * r
        for sign in (-1, 1):
            x0, x1 = sorted((cx + sign * 0.08 * r, cx + sign * 0.95 * r))
            draw.rectangle(
                (x0, waist_y, x1, hem_y), fill=TROUSERS_RGB, outline=OUTLINE_RGB, width=line
            )
        draw.rounded_rectangle(
            (cx - 1.15 * r, neck_y, cx + 1.15 * r, waist_y + 0.2 * r),
            radius=0.3 * r,
            fill=outfit,
            outline=OUTLINE_RGB,
            width=line,
        )
    else:
        skirt_y = hem_y - 0.7 * r
        for sign in (-1, 1):
            x0, x1 = sorted((cx + sign * 0.25 * r, cx + sign * 0.7 * r))
            draw.rectangle((x0, skirt_y, x1, hem_y), fill=SKIN_RGB, outline=OUTLINE_RGB, width=line)
        draw.polygon(
            [
                (cx - 0.9 * r, neck_y),
                (cx + 0.9 * r, neck_y),
                (cx + 2.0 * r, skirt_y),
                (cx - 2.0 * r, skirt_y),
            ],
            fill=outfit,
            outline=OUTLINE_RGB,
            width=line,
        )
    for sign in (-1, 1):  # arms, from the shoulders down and out
        draw.line(
            (cx + sign * 1.0 * r, neck_y + 0.3 * r, cx + sign * 1.7 * r, neck_y + 2.2 * r),
            fill=SKIN_RGB,
            width=max(2, int(0.35 * r)),
        )
    draw.ellipse(
        (cx - r, head_y - r, cx + r, head_y + r), fill=SKIN_RGB, outline=OUTLINE_RGB, width=line
    )
    # The hair's top: a cap over the upper half of the head (both lengths).
    draw.chord(
        (cx - 1.12 * r, head_y - 1.15 * r, cx + 1.12 * r, head_y + 0.7 * r),
        180,
        360,
        fill=hair,
        outline=OUTLINE_RGB,
        width=line,
    )
    eye_y = head_y + 0.15 * r
    if values["accessory"] == "sunglasses":
        draw.rectangle(
            (cx - 0.95 * r, eye_y - 0.28 * r, cx + 0.95 * r, eye_y + 0.3 * r), fill=SUNGLASSES_RGB
        )
    else:
        for sign in (-1, 1):
            ex = cx + sign * 0.4 * r
            draw.ellipse(
                (ex - 0.1 * r, eye_y - 0.1 * r, ex + 0.1 * r, eye_y + 0.1 * r), fill=OUTLINE_RGB
            )
    if values["accessory"] == "hat":  # a wide brim and a tall crown above the hair
        # Side locks down the cheeks and a fringe under the raised brim: the hair colour stays
        # visible under a hat even with short hair (whose cap the brim would otherwise hide).
        for sign in (-1, 1):
            x0, x1 = sorted((cx + sign * 0.62 * r, cx + sign * 1.12 * r))
            draw.rounded_rectangle(
                (x0, head_y - 0.6 * r, x1, head_y + 0.55 * r),
                radius=0.2 * r,
                fill=hair,
                outline=OUTLINE_RGB,
                width=line,
            )
        brim_y = head_y - 0.85 * r
        draw.ellipse(
            (cx - 1.75 * r, brim_y - 0.28 * r, cx + 1.75 * r, brim_y + 0.28 * r),
            fill=HAT_RGB,
            outline=OUTLINE_RGB,
            width=line,
        )
        draw.rectangle(
            (cx - 0.9 * r, brim_y - 1.2 * r, cx + 0.9 * r, brim_y),
            fill=HAT_RGB,
            outline=OUTLINE_RGB,
            width=line,
        )
        draw.rectangle(
            (cx - 0.9 * r, brim_y - 0.42 * r, cx + 0.9 * r, brim_y - 0.15 * r), fill=HAT_BAND_RGB
        )


def render(scene: Scene, seed: int, size: int = 32) -> Image.Image:
    """The scene as an RGB image of `size` px; `seed` jitters the character's place and size."""
    side = 4 * size
    canvas = Image.new("RGB", (side, side))
    draw = ImageDraw.Draw(canvas)
    values = scene.as_dict()
    _draw_background(draw, values["background"], side)
    _draw_character(draw, values, side, random.Random(seed))
    return canvas.resize((size, size), Image.Resampling.LANCZOS)
