"""Where things live: every stage folder and the names of the files stages hand to each other.

`dvc.yaml` names the same folders as deps and outs; tests/test_layout.py checks that the two
agree, so a path is decided here once.
"""

from __future__ import annotations

from pathlib import Path

# Stage output folders (relative to the repository root, as in dvc.yaml).
DEMO_DIR = "data/demo"
WORLD_DIR = "data/world"
SCAN_DIR = "data/scan"
INGEST_DIR = "data/ingest"
# The scan stage's table of every entry of data.source (charaforge.prepare.scan).
SCAN_TABLE = "data/scan/entries.parquet"
DEDUPE_DIR = "data/dedupe"
TAG_DIR = "data/tag"
POSE_DIR = "data/pose"
DATASET_DIR = "data/dataset"
BASE_DIR = "data/base"
TRAIN_DIR = "data/train"
GENERATE_DIR = "data/generate"
# Images of an unfinished sweep, outside data/generate (DVC deletes that before re-running the
# stage), so that an interrupted sweep resumes inside `dvc repro` (like train.state_dir).
GENERATE_WORK_DIR = "data/generate_work"
SCORE_DIR = "data/score"
REPORTS_DIR = "reports"
TRAIN_LOSS_PLOTS_DIR = "reports/plots/train_loss"
# The LoRA folder `charaforge serve` reads by default (registry.yaml + .safetensors files).
LORAS_DIR = "data/loras"

# The sweep's and the report's row of the base model (no LoRA); no candidate may take the name.
BASE_CANDIDATE = "base"

# The diffusers LoRA file of a checkpoint (the name `load_lora_weights` looks for).
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"

CHECKPOINT_PREFIX = "checkpoint-"


def kohya_file_name(candidate: str, step: int) -> str:
    """The kohya/A1111-format copy of a checkpoint, beside LORA_WEIGHTS (a `<lora:name:w>` name)."""
    return f"{candidate}-{step:06d}.safetensors"


def checkpoint_dir(candidate_dir: str | Path, step: int) -> Path:
    """The folder of one exported checkpoint: `<candidate>/checkpoint-<step>/`."""
    return Path(candidate_dir) / f"{CHECKPOINT_PREFIX}{step}"


def checkpoint_path(candidate_dir: str | Path, step: int) -> Path:
    """The diffusers LoRA file of one checkpoint (what the generation engine loads)."""
    return checkpoint_dir(candidate_dir, step) / LORA_WEIGHTS


def checkpoint_step(folder: str | Path) -> int | None:
    """The step of a `checkpoint-<step>` folder, or None for any other name."""
    name = Path(folder).name
    if not name.startswith(CHECKPOINT_PREFIX):
        return None
    digits = name[len(CHECKPOINT_PREFIX) :]
    return int(digits) if digits.isdigit() else None


def candidate_steps(candidate_dir: str | Path) -> list[int]:
    """The steps of every exported checkpoint of a candidate, ascending."""
    folder = Path(candidate_dir)
    if not folder.is_dir():
        return []
    steps = (checkpoint_step(child) for child in folder.iterdir() if child.is_dir())
    return sorted(step for step in steps if step is not None)
