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
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from charaforge.config.base import Strict
from charaforge.config.eval import (  # re-exported: one import path for every section
    CONTROL_TYPES as CONTROL_TYPES,
    PLACEHOLDER as PLACEHOLDER,
    PROMPT_PLACEHOLDERS as PROMPT_PLACEHOLDERS,
    SCORE_METRICS as SCORE_METRICS,
    ClipConfig as ClipConfig,
    ConsistencyFilterConfig as ConsistencyFilterConfig,
    ControlType as ControlType,
    DataPromptsConfig as DataPromptsConfig,
    EvalConfig as EvalConfig,
    FaceConfig as FaceConfig,
    MemorisationConfig as MemorisationConfig,
    PoseEvalConfig as PoseEvalConfig,
    ScoreConfig as ScoreConfig,
    SharingBlocks as SharingBlocks,
    SuiteConfig as SuiteConfig,
    SuiteMethod as SuiteMethod,
    TagScoreConfig as TagScoreConfig,
)
from charaforge.config.resources import RayConfig
from charaforge.config.train import TrainConfig
from charaforge.config.world import WorldConfig
from charaforge.errors import ConfigError


class ModelConfig(Strict):
    family: Literal["sd15", "sdxl"]
    # world: the models the `world` stage pretrains on world renders (path: their pipeline).
    source: Literal["stand_in", "pretrained", "world"]
    path: str | None = None
    resolution: int = Field(gt=0)
    stand_in_seed: int = 0
    # The noise schedule's target, for v-prediction bases (None: the base's scheduler config),
    # and zero-terminal-SNR rescaling (Lin et al. 2024, diffusers' scheduler option); both reach
    # the training noise scheduler and every sampler, through the base's model.json.
    prediction_type: Literal["epsilon", "v_prediction"] | None = None
    rescale_betas_zero_snr: bool = False

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
        if self.rescale_betas_zero_snr and self.prediction_type == "epsilon":
            # At zero terminal SNR the last step's input is pure noise: x0 cannot come from a
            # noise prediction there (the paper pairs the rescale with v-prediction).
            raise ValueError(
                "model.rescale_betas_zero_snr needs model.prediction_type v_prediction"
            )
        return self


class DemoConfig(Strict):
    # "drawn": the stand-in demo's figure; "world": the world's held-out character
    # (charaforge.prepare.world.DEMO_CHARACTER), which the world models never saw in pretraining.
    character_kind: Literal["drawn", "world"] = "drawn"
    images_per_character: int = Field(ge=2)
    image_size: int = Field(ge=32)
    near_duplicates: int = Field(ge=0)
    broken_files: int = Field(ge=0)
    include_photos: bool = True


class IngestConfig(Strict):
    min_side: int = Field(ge=1)
    max_pixels: int = Field(ge=1)
    max_side: int = Field(ge=8)
    background: tuple[int, int, int] = Field(strict=False)  # a YAML list
    # Files bigger than this are quarantined by the scan before a byte is read (a sparse
    # multi-GB file would otherwise be read whole into memory).
    max_file_bytes: int = Field(default=256 * 1024 * 1024, ge=1)
    # Longer side over shorter side above this: quarantined (a 20480x100 strip would enter the
    # dataset at 1024x5).
    max_aspect: float = Field(default=8.0, ge=1.0)

    @field_validator("background")
    @classmethod
    def _rgb(cls, value: tuple[int, int, int]) -> tuple[int, int, int]:
        if any(not 0 <= channel <= 255 for channel in value):
            raise ValueError("each channel must be in 0..255")
        return value


class DedupeConfig(Strict):
    # colorhash: hash_size is its `binbits` (14 x binbits bits); the others hash_size^2 bits.
    hash: Literal["phash", "dhash", "whash", "average_hash", "colorhash"]
    hash_size: int = Field(ge=4, le=32)
    threshold: int = Field(ge=0)
    workers: int = Field(default=0, ge=0)  # hashing processes; 0: one per CPU core
    # Near-duplicate search: multi-index hashing, all-pairs brute force, or whichever the cost
    # model expects to be faster for the number of hashes (auto). All three give the same pairs.
    search: Literal["auto", "mih", "brute"] = "auto"

    @model_validator(mode="after")
    def _whash_power_of_two(self) -> DedupeConfig:
        if self.hash == "whash" and self.hash_size & (self.hash_size - 1):
            raise ValueError(f"whash needs a power-of-two hash_size, got {self.hash_size}")
        return self


class DatasetConfig(Strict):
    val_fraction: float = Field(ge=0.0, lt=1.0)
    # Fields: {trigger}, {character}, {outfit}, {pose}, {style}, {tags}; {tags} leaves out the
    # tags another field of the template already placed.
    caption_template: str
    # Leave out of {tags} the tags carried by at least this share of the character's images (its
    # defining tags), so the trigger word alone learns what they describe, as kohya users prune a
    # character's own tags; None keeps every tag.
    prune_defining_fraction: float | None = Field(default=None, gt=0.0, le=1.0)
    kohya_repeats: int = Field(ge=1)
    card_top_tags: int = Field(default=20, ge=1)  # tags in the dataset card's table and plot

    @field_validator("caption_template")
    @classmethod
    def _known_fields(cls, value: str) -> str:
        import string

        allowed = {"trigger", "character", "outfit", "pose", "style", "tags"}
        try:
            fields = {name for _, name, _, _ in string.Formatter().parse(value) if name is not None}
        except ValueError as error:
            raise ValueError(f"not a valid format string: {error}") from None
        if fields - allowed:
            raise ValueError(f"unknown fields {sorted(fields - allowed)}; use {sorted(allowed)}")
        return value


class DataConfig(Strict):
    source: str
    character: str = Field(min_length=1)
    trigger: str = Field(min_length=1)
    demo: DemoConfig
    ingest: IngestConfig
    dedupe: DedupeConfig
    dataset: DatasetConfig
    # Images that come without a caption and that no model tagger tagged would train on the
    # trigger word alone: the dataset stage stops unless this says that is what is wanted.
    allow_trigger_only_captions: bool = False


class ClipTaggerConfig(Strict):
    """CLIP zero-shot tagging: each vocabulary tag is scored against a neutral baseline prompt."""

    model: ClipConfig = Field(
        default_factory=lambda: ClipConfig(source="stand_in", model_name="ViT-B-32")
    )
    vocabulary: list[str] = Field(default_factory=list)
    prompt_template: str = "a picture of {tag}"
    baseline_prompt: str = "a picture"
    threshold: float = Field(default=0.5, ge=0.0, le=1.0)
    max_tags: int = Field(default=0, ge=0)  # 0: no limit
    batch_size: int = Field(default=16, ge=1)
    # torch CPU threads while tagging (as score.cpu_threads): fixed, so tag scores and their bytes
    # do not depend on the machine's core count.
    cpu_threads: int = Field(default=1, ge=1)

    @field_validator("prompt_template")
    @classmethod
    def _has_tag_field(cls, value: str) -> str:
        if "{tag}" not in value:
            raise ValueError("must contain the field {tag}")
        return value


class Wd14Config(Strict):
    """A WD14-style ONNX tagger from local files (never downloaded)."""

    # model.onnx; a relative path is also looked up under $AI_CACHE_ROOT at run time.
    model_path: str | None = None
    tags_path: str | None = None  # selected_tags.csv; default: beside model.onnx
    include_rating: bool = False  # add the best rating tag ("rating:general", ...) to the tags
    character_first: bool = True


class TaggerConfig(Strict):
    backend: Literal["sidecar", "clip", "wd14"]
    general_threshold: float = Field(ge=0.0, le=1.0)
    character_threshold: float = Field(ge=0.0, le=1.0)
    clip: ClipTaggerConfig = Field(default_factory=lambda: ClipTaggerConfig())
    wd14: Wd14Config = Field(default_factory=lambda: Wd14Config())
    # Applied to every backend's tags, in this order: replacements (a tag -> another tag, or ""
    # to drop it), then the deny list, then the allow list (empty: allow everything).
    replace: dict[str, str] = Field(default_factory=dict)
    deny: list[str] = Field(default_factory=list)
    allow: list[str] = Field(default_factory=list)
    # With backend "sidecar": the model backend that tags the images that came without a sidecar
    # caption (its settings: tagger.clip / tagger.wd14); None leaves them without tags.
    fill_missing: Literal["clip", "wd14"] | None = None

    @model_validator(mode="after")
    def _backend_inputs(self) -> TaggerConfig:
        models = {self.backend, self.fill_missing}
        if "clip" in models and not self.clip.vocabulary:
            raise ValueError("tagger.clip.vocabulary must list at least one tag for backend 'clip'")
        if "wd14" in models and not self.wd14.model_path:
            raise ValueError("tagger.wd14.model_path is required for backend 'wd14'")
        if self.fill_missing is not None and self.backend != "sidecar":
            raise ValueError("tagger.fill_missing applies to backend 'sidecar' only")
        return self


class PoseConfig(Strict):
    backend: Literal["mediapipe"]
    # Only the "full" landmark model (complexity 1) ships in the mediapipe 0.10.21 wheel; lite (0)
    # and heavy (2) would be downloaded, which these machines cannot do.
    model_complexity: Literal[1]
    min_detection_confidence: float = Field(ge=0.0, le=1.0)
    # Keypoints below this visibility are left out of the OpenPose-style skeleton images.
    min_visibility: float = Field(default=0.5, ge=0.0, le=1.0)


class ReportConfig(Strict):
    weights: dict[str, float] = Field(min_length=1)
    title: str
    bootstrap_draws: int = Field(default=1000, ge=100)
    confidence: float = Field(default=0.95, gt=0.0, lt=1.0)
    thumbnail_size: int = Field(default=96, ge=16, le=512)
    registered_model: str = Field(default="charaforge-lora", min_length=1)
    # A row whose share of images at or above score.memorisation.copy_threshold exceeds this is
    # memorising its training set and cannot be champion.
    max_copy_fraction: float = Field(default=0.25, ge=0.0, le=1.0)
    # Pareto front axes: the first applicable identity metric, and prompt alignment.
    pareto_identity: list[str] = Field(default=["arcface", "clip_i"], min_length=1)
    pareto_alignment: str = "clip_t"
    # Links to the MLflow runs and the champion's model version in the pages (with tracking on);
    # off, the pages' bytes depend on params and data only (run ids differ run to run).
    mlflow_links: bool = True

    @field_validator("weights", "pareto_identity", "pareto_alignment")
    @classmethod
    def _known_metrics(cls, value: dict | list | str) -> dict | list | str:
        names = [value] if isinstance(value, str) else list(value)
        unknown = sorted(set(names) - set(SCORE_METRICS))
        if unknown:
            raise ValueError(f"unknown metric(s) {unknown}; known: {', '.join(SCORE_METRICS)}")
        return value


class TrackingConfig(Strict):
    enabled: bool
    uri: str | None = None
    experiment: str = Field(min_length=1)
    # The MLflow UI the report links to; None: the server of an http(s) `uri`, else `mlflow ui`'s
    # default http://127.0.0.1:5000.
    ui_url: str | None = None


class Params(Strict):
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
    world: WorldConfig
    ray: RayConfig = RayConfig()

    @model_validator(mode="after")
    def _same_clip_skip(self) -> Params:
        # Refused, not warned: the report ranks candidates by renders at eval.clip_skip, so a
        # LoRA trained on other text states would be judged on conditioning it never saw.
        if self.train.clip_skip != self.eval.clip_skip:
            raise ValueError(
                f"train.clip_skip ({self.train.clip_skip}) differs from eval.clip_skip "
                f"({self.eval.clip_skip}); a LoRA is evaluated at the clip skip it trained at"
            )
        return self


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
