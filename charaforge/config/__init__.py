"""Typed schema of params.yaml, validated by every stage before it does any work.

params.yaml is the composition of conf/ (DVC's Hydra integration writes it). Stages never use
@hydra.main, which would ignore `dvc exp run -S` overrides; they load params.yaml and validate it
here. Unknown keys and wrong types fail with one message that names the key.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from charaforge.config.base import Strict
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


class SuiteConfig(Strict):
    """A CharaConsist prompt suite (`background#character#action` lines, blank-line groups)."""

    file: str = Field(min_length=1)
    seeds: list[int] = Field(default=[0], min_length=1)
    # Render only the first `max_groups` groups (None: all): keeps the demo sweep small.
    max_groups: int | None = Field(default=None, ge=1)
    # How a group's frames keep the character (generate.sweep_methods): `independent` (every
    # image alone), `shared_attention` (each group in one batch, the frames attending to the
    # identity shot's character tokens) or `ip_adapter` (the identity shot's image as the frames'
    # IP-Adapter reference, at `ip_adapter_scale`).
    method: Literal["independent", "shared_attention", "ip_adapter"] = "independent"
    ip_adapter_scale: float = Field(default=0.6, ge=0.0, le=2.0)
    # Fixed-background mode: the frames share the identity shot's background tokens too.
    share_background: bool = False
    # The character mask: normalised cross-attention of the character span above this.
    mask_threshold: float = Field(default=0.5, ge=0.0, le=1.0)
    # Write each image's character mask as an overlay under the sweep's masks/ folder.
    save_masks: bool = False


class PoseEvalConfig(Strict):
    """Pose conditions: OpenPose skeletons of the pose stage through a ControlNet."""

    enabled: bool = False
    # How many skeletons (people found by the pose stage, in image_id order) condition images.
    skeletons: int = Field(default=1, ge=1)
    # Which eval.prompts (by position) and eval.seeds entries are rendered with each skeleton.
    prompt_indices: list[int] = Field(default=[0], min_length=1)
    seeds: list[int] = Field(default=[0], min_length=1)
    conditioning_scale: float = Field(default=1.0, ge=0.0, le=2.0)


# Every ControlNet type the engine conditions on (generate.controls makes each map from a photo).
CONTROL_TYPES = (
    "openpose",
    "canny",
    "lineart",
    "softedge",
    "scribble",
    "depth",
    "normal",
    "segmentation",
)
ControlType = Literal[CONTROL_TYPES]  # type: ignore[valid-type]

# `{name}` in an eval prompt; the sweep fills in these names.
PLACEHOLDER = re.compile(r"\{([^{}]*)\}")
PROMPT_PLACEHOLDERS = frozenset({"trigger"})


class DataPromptsConfig(Strict):
    """Evaluation prompts built from the dataset: the character's defining tags (the tags most of
    its images carry) in each context (charaforge.generate.data_prompts)."""

    enabled: bool = False
    # A tag defines the character when at least this share of its (non-photo) images carry it.
    defining_fraction: float = Field(default=0.5, gt=0.0, le=1.0)
    max_tags: int = Field(default=6, ge=1)  # the most frequent defining tags, at most this many
    # Fields {trigger}, {tags}, {framing}, {action}, {background}; prompt i takes entry i of each
    # list (cycling), as many prompts as the longest list has entries.
    template: str = "{trigger}, {tags}, {framing}, {action}, {background}"
    framings: list[str] = Field(default=["full body"], min_length=1)
    actions: list[str] = Field(default=["standing"], min_length=1)
    backgrounds: list[str] = Field(default=["white background"], min_length=1)

    @property
    def count(self) -> int:
        return max(len(self.framings), len(self.actions), len(self.backgrounds))

    @field_validator("template")
    @classmethod
    def _template_fields(cls, value: str) -> str:
        import string

        allowed = {"trigger", "tags", "framing", "action", "background"}
        fields = {name for _, name, _, _ in string.Formatter().parse(value) if name is not None}
        if fields - allowed or "tags" not in fields:
            raise ValueError(f"use the fields {sorted(allowed)}, {{tags}} among them")
        return value


class EvalConfig(Strict):
    # Hand-written prompts ({trigger}: data.trigger); with from_data enabled the prompts built
    # from the dataset follow them, numbered after them.
    prompts: list[str] = []
    from_data: DataPromptsConfig = DataPromptsConfig()
    negative_prompt: str = ""
    seeds: list[int] = Field(min_length=1)
    # 0.0 renders the base model's row (no LoRA), the baseline every candidate is compared with.
    lora_scales: list[Annotated[float, Field(ge=0.0)]] = Field(min_length=1)
    steps: int = Field(ge=1)
    guidance_scale: float = Field(ge=0)
    scheduler: Literal["euler", "euler_a", "ddim", "dpmpp_2m", "dpmpp_2m_karras", "unipc"]
    # A1111 counting: 1 = the text encoder's last layer, 2 = the one before it.
    clip_skip: int = Field(default=1, ge=1)
    # Images per sampling loop; each image is byte-identical to its single render anyway.
    batch_size: int = Field(default=4, ge=1, le=64)
    suites: dict[str, SuiteConfig] = {}
    pose: PoseEvalConfig = PoseEvalConfig()
    # Contact-sheet columns: checkpoints (at the largest scale) or scales (at the last step).
    grid_columns: Literal["step", "scale"] = "step"
    # Local ControlNet folders per conditioning type (needed with a real base model only).
    controlnets: dict[ControlType, str] = {}
    # A local IP-Adapter weight file (image_encoder/ beside it) for suites with method ip_adapter
    # on real weights; null: a stand-in adapter with the stand-in base.
    ip_adapter: str | None = None
    # torch CPU threads for the sweep (null: torch's default, one per core). A fixed count keeps
    # CPU output bytes independent of the machine; 1 avoids spin-waiting on shared cores.
    cpu_threads: int | None = Field(default=None, ge=1)
    # Who renders the sweep's work items: in this process (the default), Ray actors (one per
    # worker, `ray` section), or the processes of an `accelerate launch`. Same bytes either way.
    executor: Literal["local", "ray", "accelerate"] = "local"
    # Engine workers (Ray actors) rendering in parallel (Ray gives each ray.gpus_per_task GPUs).
    workers: int = Field(default=1, ge=1)
    # executor local: CUDA device ids, one engine per device rendering its share of the sweep
    # in this process (None: one engine on the default device).
    devices: list[int] | None = Field(default=None, min_length=1)

    @field_validator("suites")
    @classmethod
    def _suite_names(cls, value: dict[str, SuiteConfig]) -> dict[str, SuiteConfig]:
        for name in value:
            if not re.match(r"^[A-Za-z0-9_-]+$", name):
                raise ValueError(f"suite name {name!r}: use letters, digits, '_' or '-'")
        return value

    @field_validator("prompts", "negative_prompt")
    @classmethod
    def _known_placeholders(cls, value: list[str] | str) -> list[str] | str:
        # The sweep replaces `{trigger}` only: any other `{name}` (a typo such as `{trigerr}`)
        # would be rendered literally into every image of the sweep.
        for index, text in enumerate([value] if isinstance(value, str) else value):
            unknown = sorted(set(PLACEHOLDER.findall(text)) - PROMPT_PLACEHOLDERS)
            if unknown:
                where = "" if isinstance(value, str) else f"[{index}]"
                names = ", ".join("{" + name + "}" for name in unknown)
                raise ValueError(
                    f"{where} unknown placeholder {names}; the known one is {{trigger}}"
                )
        return value

    @property
    def prompt_count(self) -> int:
        """Hand-written prompts plus those the dataset gives (before the suites)."""
        return len(self.prompts) + (self.from_data.count if self.from_data.enabled else 0)

    @model_validator(mode="after")
    def _pose_prompts_exist(self) -> EvalConfig:
        if not self.prompt_count and not self.suites:
            raise ValueError("no prompts: give eval.prompts, eval.suites or eval.from_data")
        count = self.prompt_count
        bad = [index for index in self.pose.prompt_indices if not 0 <= index < count]
        if bad and self.pose.enabled:
            raise ValueError(f"pose.prompt_indices {bad}: eval has {count} prompts")
        if self.devices is not None:
            if len(set(self.devices)) != len(self.devices) or min(self.devices) < 0:
                raise ValueError(f"devices: {self.devices}: give distinct GPU ids >= 0")
            if self.executor != "local":
                raise ValueError(
                    f"devices: for executor local; with executor {self.executor} the devices "
                    "come from " + ("ray.gpus_per_task" if self.executor == "ray" else
                                    "accelerate launch --gpu_ids")
                )  # fmt: skip
        return self


class ClipConfig(Strict):
    source: Literal["stand_in", "pretrained"]
    model_name: str = Field(min_length=1)
    path: str | None = None
    stand_in_seed: int = 0

    @model_validator(mode="after")
    def _path_for_pretrained(self) -> ClipConfig:
        if self.source == "pretrained" and not self.path:
            raise ValueError("a local weights file `path` is required when source is 'pretrained'")
        return self


# Every per-image metric the score stage can write (evaluate.columns.METRICS is this tuple).
SCORE_METRICS = (
    "clip_i",
    "clip_t",
    "arcface",
    "face_detected",
    "pose_oks",
    "pose_pck_01",
    "pose_pck_02",
    "pose_detected",
    "tag_precision",
    "tag_recall",
    "diversity",
    "consistency_clip",
    "consistency_arcface",
    "nn_similarity",
    "nn_phash_distance",
    "memorised",
    "context_alignment",
)


class FaceConfig(Strict):
    """ArcFace identity: detector, recognition model and the batch consistency threshold."""

    detector_path: str | None = None  # a local insightface detector ONNX; None: MediaPipe
    recognition: Literal["stand_in", "pretrained"] = "stand_in"
    recognition_path: str | None = None
    stand_in_seed: int = 0
    min_confidence: float = Field(default=0.5, ge=0.0, le=1.0)
    max_faces: int = Field(default=4, ge=1)
    identity_threshold: float = Field(default=0.3, ge=-1.0, le=1.0)

    @model_validator(mode="after")
    def _path_for_pretrained(self) -> FaceConfig:
        if self.recognition == "pretrained" and not self.recognition_path:
            raise ValueError("recognition_path is required when recognition is 'pretrained'")
        return self


class TagScoreConfig(Strict):
    """Tag consistency: which tags define the character, and the tagger that judges images."""

    defining_fraction: float = Field(default=0.8, gt=0.0, le=1.0)
    # "clip": CLIP zero-shot over the dataset's tag vocabulary on score.clip; "pipeline": the
    # `tagger` section (not applicable when that is the sidecar reader).
    tagger: Literal["clip", "pipeline"] = "clip"
    threshold: float = Field(default=0.5, ge=0.0, le=1.0)


class MemorisationConfig(Strict):
    """When a generated image counts as a copy of its nearest training image."""

    # CLIP cosine at or above this (used only with real CLIP weights: a stand-in's cosines are
    # all high and would flag everything).
    copy_threshold: float = Field(default=0.95, gt=0.0, le=1.0)
    # 64-bit pHash Hamming distance at or below this (model-free, so it works with stand-ins).
    phash_distance: int = Field(default=6, ge=0, le=64)


class ConsistencyFilterConfig(Strict):
    """The score stage's consistency filter: sweep images sorted into accepted/ and rejected/
    under data/score/filter by the CLIP-I and ArcFace scores it computed (None: bar unused)."""

    enabled: bool = False
    clip_threshold: float | None = Field(default=None, ge=-1.0, le=1.0)
    identity_threshold: float | None = Field(default=None, ge=-1.0, le=1.0)

    @model_validator(mode="after")
    def _a_threshold_when_enabled(self) -> ConsistencyFilterConfig:
        if self.enabled and self.clip_threshold is None and self.identity_threshold is None:
            raise ValueError("enabled: give clip_threshold or identity_threshold (or both)")
        return self


class ScoreConfig(Strict):
    clip: ClipConfig
    # The world's attribute oracle (data/world/oracle with score=world): ground truth about every
    # sweep image, written to oracle.parquet and shown apart in the report; never a scorer.
    oracle: str | None = None
    face: FaceConfig = FaceConfig()
    tags: TagScoreConfig = TagScoreConfig()
    memorisation: MemorisationConfig = MemorisationConfig()
    filter: ConsistencyFilterConfig = ConsistencyFilterConfig()
    batch_size: int = Field(ge=1)
    # torch CPU threads while scoring (as eval.cpu_threads): fixed, so the bytes of
    # scores.parquet do not depend on the machine's core count.
    cpu_threads: int = Field(default=1, ge=1)


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
