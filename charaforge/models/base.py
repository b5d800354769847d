"""The base model: a tiny SD-shaped stand-in built from a seed, or a reference to real weights.

The stand-ins use the very classes of Stable Diffusion 1.5 and SDXL (UNet2DConditionModel,
AutoencoderKL, CLIPTextModel, SDXL's CLIPTextModelWithProjection, a real CLIP BPE tokenizer,
SD's noise schedule) with random weights, so every code path (training, LoRA files, sampling)
is the real one on a machine with no weights and no GPU. Real weights are only ever found
locally: a diffusers folder, a name under $AI_CACHE_ROOT, or a hub id already in the local
Hugging Face cache. Nothing is downloaded.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from charaforge.config import ModelConfig
from charaforge.core import layout
from charaforge.core.files import atomic_path, derive_seed, write_json
from charaforge.core.layout import WORLD_DIR
from charaforge.errors import ConfigError
from charaforge.models.loading import WEIGHTS_LOADING_LOCK

log = logging.getLogger(__name__)

MODEL_JSON = "model.json"
PIPELINE_DIR = "pipeline"
# Where the `world` stage saves the world's pipeline (model.path's default with model=world).
WORLD_PIPELINE = f"{WORLD_DIR}/pipeline"

# SD1.5's noise schedule (its scheduler_config.json); the stand-in trains and samples on it.
SD15_SCHEDULE: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "steps_offset": 1,
    "timestep_spacing": "leading",
}
# CLIP's vocabulary: 256 byte symbols, the same with </w>, 48894 merges, 2 special tokens.
CLIP_VOCAB_SIZE = 49408
CLIP_MERGES = CLIP_VOCAB_SIZE - 256 * 2 - 2
CLIP_MAX_LENGTH = 77


@dataclass(frozen=True)
class BaseInfo:
    """What data/base/model.json says about the base model."""

    family: str
    source: str
    stand_in: bool
    path: str | None
    resolution: int
    # model.prediction_type / model.rescale_betas_zero_snr (None / False: the base's schedule).
    prediction_type: str | None = None
    rescale_betas_zero_snr: bool = False

    @property
    def schedule_settings(self) -> dict[str, Any]:
        """The model.* schedule options that are set (what model.json records)."""
        settings: dict[str, Any] = {}
        if self.prediction_type is not None:
            settings["prediction_type"] = self.prediction_type
        if self.rescale_betas_zero_snr:
            settings["rescale_betas_zero_snr"] = True
        return settings

    @property
    def scheduler_overrides(self) -> dict[str, Any]:
        """What changes in the base's scheduler config (applied by `load_base_pipeline`, so
        the trainer's samples and every engine sampler get it)."""
        overrides = self.schedule_settings
        if self.rescale_betas_zero_snr:
            # Zero terminal SNR makes t = T-1 pure noise, the only start that matches the
            # sampler's input; "leading" spacing (SD1.5's) would start at T - T/steps and never
            # sample it. Lin et al. 2024 (sec. 3.3) and diffusers pair the rescale with trailing.
            overrides["timestep_spacing"] = "trailing"
        return overrides

    @property
    def world(self) -> bool:
        """Pretrained by the `world` stage on world renders: learnt weights, not real ones."""
        return self.source == "world"

    @property
    def display_name(self) -> str:
        """A short model name for image metadata (no machine paths)."""
        if self.stand_in:
            return f"charaforge-stand-in-{self.family}"
        if self.world:
            return f"charaforge-world-{self.family}"
        return Path(self.path or self.family).name


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def set_determinism() -> None:
    """Deterministic kernels where torch has them (CPU results are then bit-reproducible)."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False


def set_cpu_threads(threads: int | None) -> None:
    """Fix torch's CPU thread count for this process (None: leave torch's default).

    The tiny stand-ins run far faster on one thread when the cores are shared (OpenMP threads
    spin-wait for each other: 10-20x slower measured on 2 busy cores), and a fixed count keeps
    CPU bytes independent of the machine's core count.
    """
    if threads is not None:
        torch.set_num_threads(threads)


# --- the stand-in -------------------------------------------------------------------------------


def clip_vocabulary() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP's BPE vocabulary and merges, derived from the file open_clip ships (offline).

    This is how CLIP builds its 49408-token vocabulary: the byte-level symbols, the same with the
    end-of-word marker, one token per merge, then the two special tokens.
    """
    from open_clip.tokenizer import bytes_to_unicode, default_bpe

    with gzip.open(default_bpe(), "rt", encoding="utf-8") as handle:
        lines = handle.read().split("\n")
    merges = [tuple(line.split()) for line in lines[1 : CLIP_MERGES + 1]]
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [symbol + "</w>" for symbol in symbols]
    tokens += ["".join(merge) for merge in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    if len(tokens) != CLIP_VOCAB_SIZE:
        raise RuntimeError(f"derived {len(tokens)} CLIP tokens, expected {CLIP_VOCAB_SIZE}")
    return {token: index for index, token in enumerate(tokens)}, merges  # type: ignore[return-value]


def build_clip_tokenizer(
    pad_token: str = "<|endoftext|>", max_length: int = CLIP_MAX_LENGTH
) -> Any:
    from transformers import CLIPTokenizer

    vocab, merges = clip_vocabulary()
    return CLIPTokenizer(
        vocab=vocab, merges=merges, model_max_length=max_length, pad_token=pad_token
    )


def _seeded(seed: int, build: Any) -> Any:
    """Build a module from a private RNG state so the global one is left untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def _clip_text_config(hidden_size: int, max_length: int = CLIP_MAX_LENGTH) -> Any:
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=CLIP_VOCAB_SIZE,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=max_length,
        hidden_act="quick_gelu",
        projection_dim=hidden_size,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )


def _stand_in_vae(seed: int, family: str, resolution: int) -> Any:
    from diffusers import AutoencoderKL

    # Four VAE blocks: 8x down-sampling as in SD, so the UNet works on resolution/8 latents.
    return _seeded(
        derive_seed(seed, "stand_in", family, "vae"),
        lambda: AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(8, 16, 16, 16),
            layers_per_block=1,
            norm_num_groups=8,
            latent_channels=4,
            sample_size=resolution,
            scaling_factor=0.18215 if family == "sd15" else 0.13025,
        ),
    )


def build_stand_in_pipeline(family: str, seed: int, resolution: int) -> Any:
    """A tiny SD-shaped pipeline with random weights; the same seed gives the same bytes."""
    if family == "sdxl":
        return build_stand_in_sdxl(seed, resolution)
    if family != "sd15":
        raise ConfigError(f"model.family: unknown family {family!r}")
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    vae = _stand_in_vae(seed, family, resolution)
    unet = _seeded(
        derive_seed(seed, "stand_in", family, "unet"),
        lambda: UNet2DConditionModel(
            sample_size=resolution // 8,
            in_channels=4,
            out_channels=4,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            block_out_channels=(32, 64),
            layers_per_block=1,
            cross_attention_dim=32,
            attention_head_dim=8,
            norm_num_groups=32,
        ),
    )
    text_encoder = _seeded(
        derive_seed(seed, "stand_in", family, "text_encoder"),
        lambda: CLIPTextModel(_clip_text_config(32)),
    )
    return assemble_sd15_pipeline(vae, unet, text_encoder, build_clip_tokenizer())


# SDXL's micro-conditioning: six time ids (original size, crop corner, target size), each
# embedded with this many channels, then concatenated with text_encoder_2's pooled projection.
SDXL_TIME_EMBED_DIM = 8


def build_stand_in_sdxl(seed: int, resolution: int) -> Any:
    """A tiny SDXL-shaped pipeline: the SDXL classes and wiring, random weights.

    As in SDXL: two text encoders (CLIPTextModel and CLIPTextModelWithProjection) whose
    penultimate hidden states are concatenated for cross-attention, a pooled projection plus six
    micro-conditioning time ids fed through the UNet's `text_time` additional embedding, linear
    attention projections, the first down block without attention, and two transformer layers in
    the deeper block.
    """
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    width_1, width_2 = 32, 32
    vae = _stand_in_vae(seed, "sdxl", resolution)
    unet = _seeded(
        derive_seed(seed, "stand_in", "sdxl", "unet"),
        lambda: UNet2DConditionModel(
            sample_size=resolution // 8,
            in_channels=4,
            out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            block_out_channels=(32, 64),
            layers_per_block=1,
            transformer_layers_per_block=(1, 2),
            attention_head_dim=(2, 4),
            use_linear_projection=True,
            cross_attention_dim=width_1 + width_2,
            addition_embed_type="text_time",
            addition_time_embed_dim=SDXL_TIME_EMBED_DIM,
            projection_class_embeddings_input_dim=6 * SDXL_TIME_EMBED_DIM + width_2,
            norm_num_groups=32,
        ),
    )
    text_encoder = _seeded(
        derive_seed(seed, "stand_in", "sdxl", "text_encoder"),
        lambda: CLIPTextModel(_clip_text_config(width_1)),
    )
    text_encoder_2 = _seeded(
        derive_seed(seed, "stand_in", "sdxl", "text_encoder_2"),
        lambda: CLIPTextModelWithProjection(_clip_text_config(width_2)),
    )
    # SDXL's second tokenizer pads with "!" (open_clip's convention), the first with <|endoftext|>.
    tokenizer_2 = build_clip_tokenizer(pad_token="!")
    pipeline = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=build_clip_tokenizer(),
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=EulerDiscreteScheduler(**SD15_SCHEDULE),
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def save_stand_in(pipeline: Any, out_dir: str | Path) -> None:
    """Save in the diffusers layout, plus vocab.json/merges.txt as SD1.5 repositories carry them."""
    from transformers.utils import logging as transformers_logging

    out_dir = Path(out_dir)
    # transformers 5 shows a "Writing model shards" bar for a one-shard text encoder: noise.
    transformers_logging.disable_progress_bar()
    pipeline.save_pretrained(out_dir, safe_serialization=True)
    vocab, merges = clip_vocabulary()
    lines = ["#version: 0.2", *(" ".join(merge) for merge in merges)]
    for tokenizer_dir in (out_dir / "tokenizer", out_dir / "tokenizer_2"):
        if not tokenizer_dir.is_dir():
            continue  # SD1.5 has one tokenizer, SDXL two
        (tokenizer_dir / "vocab.json").write_text(
            json.dumps(vocab, ensure_ascii=False) + "\n", encoding="utf-8"
        )
        (tokenizer_dir / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")


# --- real weights -------------------------------------------------------------------------------


def resolve_pretrained(path: str) -> Path:
    """Find real weights locally: a folder, a name under $AI_CACHE_ROOT, or the local HF cache."""
    tried = []
    candidate = Path(path).expanduser()
    if candidate.is_dir():
        return candidate
    tried.append(f"local folder {candidate}")
    cache_root = os.environ.get("AI_CACHE_ROOT")
    if cache_root and not candidate.is_absolute():
        under_cache = Path(cache_root) / path
        if under_cache.is_dir():
            return under_cache
        tried.append(f"$AI_CACHE_ROOT/{path}")
    else:
        tried.append(
            "$AI_CACHE_ROOT (not set)" if not cache_root else "$AI_CACHE_ROOT (path is absolute)"
        )
    if path.count("/") == 1 and not candidate.is_absolute():
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError

        try:
            return Path(snapshot_download(path, local_files_only=True))
        except (LocalEntryNotFoundError, OSError, ValueError):
            tried.append(f"hub id {path} in the local Hugging Face cache")
    raise ConfigError(
        f"model.path: base model {path!r} not found locally (tried: {'; '.join(tried)}). "
        "Nothing is downloaded: put a diffusers folder there, or use model=tiny_sd15."
    )


# --- data/base ----------------------------------------------------------------------------------


def write_base(model: ModelConfig, out_dir: str | Path = layout.BASE_DIR) -> BaseInfo:
    """Write data/base: model.json, plus the stand-in pipeline in diffusers layout.

    A world model is referenced, not copied: model.json points at the pipeline the `world` stage
    saved (data/world/pipeline unless model.path says otherwise).
    """
    stand_in = model.source == "stand_in"
    path = None if stand_in else model.path
    if model.source == "world":
        path = model.path or WORLD_PIPELINE
        if not (Path(path) / "model_index.json").is_file():
            raise ConfigError(
                f"model.path: no world pipeline at {path} (run the `world` stage with model=world)"
            )
    info = BaseInfo(
        family=model.family,
        source=model.source,
        stand_in=stand_in,
        path=path,
        resolution=model.resolution,
        prediction_type=model.prediction_type,
        rescale_betas_zero_snr=model.rescale_betas_zero_snr,
    )
    if model.source == "pretrained":
        resolved = resolve_pretrained(str(model.path))
        log.info("base model %s found at %s", model.path, resolved)
    with atomic_path(out_dir) as temp:
        temp.mkdir(parents=True)
        if stand_in:
            set_determinism()
            pipeline = build_stand_in_pipeline(model.family, model.stand_in_seed, model.resolution)
            save_stand_in(pipeline, temp / PIPELINE_DIR)
        payload = {
            "family": info.family,
            "source": info.source,
            "stand_in": info.stand_in,
            "path": info.path,
            "resolution": info.resolution,
            # Only when set: a base on its own schedule keeps the model.json it always had.
            **info.schedule_settings,
        }
        write_json(temp / MODEL_JSON, payload)
    log.info("base model written to %s (source=%s)", out_dir, model.source)
    return info


def read_base_info(base_dir: str | Path = layout.BASE_DIR) -> BaseInfo:
    path = Path(base_dir) / MODEL_JSON
    if not path.is_file():
        raise ConfigError(f"{path}: not found (run the `base` stage first)")
    raw = json.loads(path.read_text(encoding="utf-8"))
    return BaseInfo(
        family=raw["family"],
        source=raw["source"],
        stand_in=bool(raw["stand_in"]),
        path=raw.get("path"),
        resolution=int(raw["resolution"]),
        prediction_type=raw.get("prediction_type"),
        rescale_betas_zero_snr=bool(raw.get("rescale_betas_zero_snr", False)),
    )


def pipeline_location(base_dir: str | Path = layout.BASE_DIR) -> Path:
    """The diffusers folder of the base model: the stand-in's copy, the world stage's pipeline,
    or the real weights found locally (resolved at run time, so no machine path is stored)."""
    info = read_base_info(base_dir)
    if info.stand_in:
        return Path(base_dir) / PIPELINE_DIR
    if info.world:
        return Path(str(info.path))
    return resolve_pretrained(str(info.path))


def pipeline_class(family: str) -> Any:
    """The diffusers pipeline class of a model family."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    classes = {"sd15": StableDiffusionPipeline, "sdxl": StableDiffusionXLPipeline}
    if family not in classes:
        raise ConfigError(f"model.family: unknown family {family!r}; one of {sorted(classes)}")
    return classes[family]


def _load_kwargs(family: str) -> dict[str, Any]:
    if family == "sd15":
        return {"dtype": torch.float32, "safety_checker": None, "requires_safety_checker": False}
    # The invisible watermark would need a package we do not ship and alters pixels.
    return {"dtype": torch.float32, "add_watermarker": False}


def load_base_pipeline(
    base_dir: str | Path = layout.BASE_DIR,
    device: torch.device | None = None,
    device_map: str | None = None,
) -> Any:
    """The base pipeline in float32, progress bars off: StableDiffusionPipeline (safety checker
    off) for sd15, StableDiffusionXLPipeline for sdxl. `device_map` ("balanced") lets accelerate
    place the models over the GPUs instead of `device`."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    set_determinism()
    # Loading a five-component pipeline is instant here; its progress bars are only noise.
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    info = read_base_info(base_dir)
    location = pipeline_location(base_dir)
    kwargs = _load_kwargs(info.family)
    if device_map is not None:
        kwargs["device_map"] = device_map
    with WEIGHTS_LOADING_LOCK:
        pipeline = pipeline_class(info.family).from_pretrained(location, **kwargs)
    pipeline.set_progress_bar_config(disable=True)
    if info.scheduler_overrides:
        # The trainer's DDPM and the engine's samplers are all built from this config.
        config = pipeline.scheduler.config
        pipeline.scheduler = type(pipeline.scheduler).from_config(
            config, **info.scheduler_overrides
        )
        if info.rescale_betas_zero_snr and pipeline.scheduler.config.prediction_type == "epsilon":
            raise ConfigError(
                "model.rescale_betas_zero_snr: this base predicts epsilon; set "
                "model.prediction_type: v_prediction (zero terminal SNR needs it)"
            )
    return pipeline if device_map is not None else pipeline.to(device or default_device())


def assemble_sd15_pipeline(vae: Any, unet: Any, text_encoder: Any, tokenizer: Any) -> Any:
    """An SD1.5 pipeline from its parts (stand-in or world): Euler, no safety checker."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    pipeline = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=EulerDiscreteScheduler(**SD15_SCHEDULE),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline
