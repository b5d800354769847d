"""Typed schema of params.yaml, validated by every stage before it does any work.

params.yaml is the composition of conf/ (DVC's Hydra integration writes it). Stages never use
@hydra.main, which would ignore `dvc exp run -S` overrides; they load params.yaml and validate it
here. Unknown keys and wrong types fail with one message that names the key.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(ValueError):
    """A configuration that cannot run: the message names the offending key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelConfig(_Strict):
    family: Literal["sd15", "sdxl"]
    source: Literal["stand_in", "pretrained"]
    path: str | None = None
    resolution: int = Field(gt=0)
    stand_in_seed: int = 0

    @field_validator("resolution")
    @classmethod
    def _multiple_of_8(cls, value: int) -> int:
        if value % 8:
            raise ValueError(f"must be a multiple of 8 (the VAE down-samples by 8), got {value}")
        return value

    @model_validator(mode="after")
    def _path_for_pretrained(self) -> ModelConfig:
        if self.source == "pretrained" and not self.path:
            raise ValueError("model.path is required when model.source is 'pretrained'")
        return self


class DemoConfig(_Strict):
    images_per_character: int = Field(ge=2)
    image_size: int = Field(ge=64)
    near_duplicates: int = Field(ge=0)
    broken_files: int = Field(ge=0)
    include_photos: bool = True


class IngestConfig(_Strict):
    min_side: int = Field(ge=1)
    max_pixels: int = Field(ge=1)
    max_side: int = Field(ge=8)
    background: tuple[int, int, int]

    @field_validator("background")
    @classmethod
    def _rgb(cls, value: tuple[int, int, int]) -> tuple[int, int, int]:
        if any(not 0 <= channel <= 255 for channel in value):
            raise ValueError("each channel must be in 0..255")
        return value


class DedupeConfig(_Strict):
    hash: Literal["phash", "dhash", "whash", "average_hash"]
    hash_size: int = Field(ge=4, le=32)
    threshold: int = Field(ge=0)

    @model_validator(mode="after")
    def _whash_power_of_two(self) -> DedupeConfig:
        if self.hash == "whash" and self.hash_size & (self.hash_size - 1):
            raise ValueError(f"whash needs a power-of-two hash_size, got {self.hash_size}")
        return self


class DatasetConfig(_Strict):
    val_fraction: float = Field(ge=0.0, lt=1.0)
    caption_template: str
    kohya_repeats: int = Field(ge=1)

    @field_validator("caption_template")
    @classmethod
    def _known_fields(cls, value: str) -> str:
        import string

        allowed = {"trigger", "character", "tags"}
        try:
            fields = {name for _, name, _, _ in string.Formatter().parse(value) if name is not None}
        except ValueError as error:
            raise ValueError(f"not a valid format string: {error}") from None
        if fields - allowed:
            raise ValueError(f"unknown fields {sorted(fields - allowed)}; use {sorted(allowed)}")
        return value


class DataConfig(_Strict):
    source: str
    character: str = Field(min_length=1)
    trigger: str = Field(min_length=1)
    demo: DemoConfig
    ingest: IngestConfig
    dedupe: DedupeConfig
    dataset: DatasetConfig


class TaggerConfig(_Strict):
    backend: Literal["sidecar"]
    general_threshold: float = Field(ge=0.0, le=1.0)
    character_threshold: float = Field(ge=0.0, le=1.0)


class PoseConfig(_Strict):
    backend: Literal["mediapipe"]
    model_complexity: Literal[0, 1]
    min_detection_confidence: float = Field(ge=0.0, le=1.0)
    # Keypoints below this visibility are left out of the OpenPose-style skeleton images.
    min_visibility: float = Field(default=0.5, ge=0.0, le=1.0)


class CandidateConfig(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.+-]+$")
    rank: int = Field(ge=1)
    alpha: float = Field(gt=0)
    learning_rate: float = Field(ge=0)


class TrainConfig(_Strict):
    batch_size: int = Field(ge=1)
    max_steps: int = Field(ge=1)
    checkpoint_every: int = Field(ge=1)
    target_modules: list[str] = Field(min_length=1)
    candidates: list[CandidateConfig] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique_names(self) -> TrainConfig:
        names = [candidate.name for candidate in self.candidates]
        if len(set(names)) != len(names):
            raise ValueError(f"candidate names must be unique, got {names}")
        return self


class EvalConfig(_Strict):
    prompts: list[str] = Field(min_length=1)
    negative_prompt: str = ""
    seeds: list[int] = Field(min_length=1)
    lora_scales: list[float] = Field(min_length=1)
    steps: int = Field(ge=1)
    guidance_scale: float = Field(ge=0)
    scheduler: Literal["euler", "euler_a", "ddim", "dpmpp_2m", "unipc"]


class ClipConfig(_Strict):
    source: Literal["stand_in", "pretrained"]
    model_name: str = Field(min_length=1)
    path: str | None = None
    stand_in_seed: int = 0

    @model_validator(mode="after")
    def _path_for_pretrained(self) -> ClipConfig:
        if self.source == "pretrained" and not self.path:
            raise ValueError("a local weights file `path` is required when source is 'pretrained'")
        return self


class ScoreConfig(_Strict):
    clip: ClipConfig
    batch_size: int = Field(ge=1)


class ReportConfig(_Strict):
    weights: dict[str, float] = Field(min_length=1)
    title: str
    bootstrap_draws: int = Field(default=1000, ge=100)
    confidence: float = Field(default=0.95, gt=0.0, lt=1.0)
    thumbnail_size: int = Field(default=96, ge=16, le=512)
    registered_model: str = Field(default="charaforge-lora", min_length=1)


class TrackingConfig(_Strict):
    enabled: bool
    uri: str | None = None
    experiment: str = Field(min_length=1)


class Params(_Strict):
    seed: int
    model: ModelConfig
    data: DataConfig
    tagger: TaggerConfig
    pose: PoseConfig
    train: TrainConfig
    eval: EvalConfig
    score: ScoreConfig
    report: ReportConfig
    tracking: TrackingConfig


def _format_errors(error: ValidationError, source: str) -> str:
    lines = []
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"]) or "<root>"
        message = item["msg"]
        if item["type"] == "extra_forbidden":
            message = "unknown key (not in the schema; check for a typo)"
        lines.append(f"{source}: {key}: {message}")
    return "invalid configuration\n  " + "\n  ".join(lines)


def validate_params(raw: dict, source: str = "params.yaml") -> Params:
    """Validate a composed configuration; raise ConfigError naming every bad key."""
    try:
        return Params.model_validate(raw)
    except ValidationError as error:
        raise ConfigError(_format_errors(error, source)) from None


def load_params(path: str | Path = "params.yaml") -> Params:
    """Load and validate params.yaml (the composition of conf/)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: not found (compose it with `make params`)")
    raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return validate_params(raw, source=str(path))


def config_hash(section: BaseModel | dict) -> str:
    """A short, stable hash of a configuration section (for provenance tags)."""
    payload = section.model_dump(mode="json") if isinstance(section, BaseModel) else section
    encoded = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(encoded).hexdigest()[:16]
