"""The `eval` and `score` sections: the evaluation sweep (prompts, suites, poses and control
types, executors) and the scorers run on it."""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from charaforge.config.base import Strict

SuiteMethod = Literal["independent", "shared_attention", "ip_adapter"]
# The UNet parts whose self-attention shares (generate.consistent): every transformer block, or
# the down (encoder), mid (lowest resolution) and up (decoder) blocks alone or two together.
SharingBlocks = Literal["all", "down", "mid", "up", "down+mid", "mid+up", "down+up"]


class SuiteConfig(Strict):
    """A CharaConsist prompt suite (`background#character#action` lines, blank-line groups)."""

    file: str = Field(min_length=1)
    seeds: list[int] = Field(default=[0], min_length=1)
    # Render only the first `max_groups` groups (None: all): keeps the demo sweep small.
    max_groups: int | None = Field(default=None, ge=1)
    # How a group's frames keep the character (generate.sweep_methods): `independent` (every
    # image alone), `shared_attention` (each group in one batch, the frames attending to the
    # identity shot's character tokens) or `ip_adapter` (the identity shot's image as the frames'
    # IP-Adapter reference, at `ip_adapter_scale`). A list is a sweep axis: the suite is rendered
    # once per method with the same prompts and seeds (paired), the index's `method` column
    # telling them apart and the report comparing them.
    method: SuiteMethod | list[SuiteMethod] = "independent"
    ip_adapter_scale: float = Field(default=0.6, ge=0.0, le=2.0)
    # Fixed-background mode: the frames share the identity shot's background tokens too.
    share_background: bool = False
    # The character mask: normalised cross-attention of the character span above this.
    mask_threshold: float = Field(default=0.5, ge=0.0, le=1.0)
    # Shared-attention options (generate.request.Consistency): StoryDiffusion's sampled group
    # tokens (share of each earlier frame's character tokens), the weight of the shared tokens,
    # the blocks that share (SharingBlocks) and the share of the steps that share.
    group_tokens: float = Field(default=0.0, ge=0.0, le=1.0)
    strength: float = Field(default=1.0, gt=0.0, le=10.0)
    blocks: SharingBlocks = "all"
    window: list[float] = Field(default=[0.0, 1.0], min_length=2, max_length=2)
    # Write each image's character mask as an overlay under the sweep's masks/ folder.
    save_masks: bool = False

    @field_validator("method")
    @classmethod
    def _methods_once(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list) and (not value or len(set(value)) != len(value)):
            raise ValueError("a method list names each method once (and at least one)")
        return value

    @field_validator("window")
    @classmethod
    def _window(cls, value: list[float]) -> list[float]:
        if not 0.0 <= value[0] < value[1] <= 1.0:
            raise ValueError(f"window {list(value)}: need 0 <= start < end <= 1")
        return value

    @property
    def methods(self) -> tuple[str, ...]:
        """The methods the suite is rendered with (one, or the axis)."""
        return tuple(self.method) if isinstance(self.method, list) else (self.method,)


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


class PoseEvalConfig(Strict):
    """Pose conditions: OpenPose skeletons of the pose stage through a ControlNet."""

    enabled: bool = False
    # How many skeletons (people found by the pose stage, in image_id order) condition images.
    skeletons: int = Field(default=1, ge=1)
    # Which eval.prompts (by position) and eval.seeds entries are rendered with each skeleton.
    prompt_indices: list[int] = Field(default=[0], min_length=1)
    seeds: list[int] = Field(default=[0], min_length=1)
    conditioning_scale: float = Field(default=1.0, ge=0.0, le=2.0)
    # The control types axis: each skeleton's person also conditions through these ControlNets,
    # their maps made from the person's ingested photo (generate.controls; openpose is the pose
    # stage's skeleton), so the report compares control types with the same scorers.
    control_types: list[ControlType] = Field(default=["openpose"], min_length=1)
    # A local transformers depth-estimation model for the depth and normal maps (null: the
    # stand-in, whose depth means nothing).
    depth_model: str | None = None

    @field_validator("control_types")
    @classmethod
    def _types_once(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError("control_types names each type once")
        return value


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
    # Images per sampling loop. `exact`: the models run image by image inside the loop, so each
    # image is byte-identical to its single render (CLI, HTTP). `fused`: one forward for the whole
    # batch, ~3x fewer CPU-s per image on the world models (0.125 against 0.386, batch 8, a LoRA
    # on every module); the batches are fixed chunks of the plan, so reruns, resumes and shards
    # give the same bytes, but an image equals its single render only up to float rounding.
    batch_size: int = Field(default=4, ge=1, le=64)
    batch_mode: Literal["exact", "fused"] = "exact"
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
