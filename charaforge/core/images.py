"""Opening images the same way everywhere: fully loaded, file handle closed."""

from __future__ import annotations

from pathlib import Path

from PIL import Image


def open_image(item: Image.Image | str | Path) -> Image.Image:
    """The image as stored (mode kept), loaded into memory; an Image passes through."""
    if isinstance(item, Image.Image):
        return item
    with Image.open(item) as image:
        image.load()
        return image.copy()


def open_rgb(item: Image.Image | str | Path) -> Image.Image:
    """The image converted to RGB (a new image; the file is closed)."""
    if isinstance(item, Image.Image):
        return item.convert("RGB")
    with Image.open(item) as image:
        return image.convert("RGB")
