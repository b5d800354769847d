"""data/world's file names, and the note the world stage writes when the world is unused.

Torch-free, so that the stand-in pipeline's world stage (the note only) does not import torch and
the world's trainers (`charaforge.models.world`) just to say that it trains nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from charaforge.core.files import atomic_path, write_json

WORLD_JSON = "world.json"
PIPELINE_DIR = "pipeline"
LOSSES_CSV = "losses.csv"
CONTACT_SHEET = "samples/contact_sheet.png"


def write_unused(out_dir: str | Path, model_source: str) -> dict[str, Any]:
    """data/world when the pipeline does not use the world: one small file, no training."""
    payload = {
        "used": False,
        "reason": f"model.source is {model_source!r}; the world models are built only with "
        "model=world",
    }
    with atomic_path(out_dir) as temp:
        temp.mkdir(parents=True)
        write_json(temp / WORLD_JSON, payload)
    return payload
