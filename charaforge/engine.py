"""The generation engine: the one code path that renders images, for the sweep, the CLI and HTTP.

It loads the base pipeline once and keeps it (SD1.5 or SDXL, real or stand-in); LoRAs are loaded
as named peft adapters and only those a request names are active for it, so swapping LoRAs never
reloads the base. ControlNet, image-to-image and inpainting pipelines are derived from the base
with `from_pipe`: they share its modules (and its LoRAs) instead of loading a second copy.

Reproducibility: every image has its own torch.Generator("cpu") seeded with its own seed, its
prompt is encoded alone, and in `exact` batch mode the UNet, the ControlNet and the VAE decoder
run image by image inside one sampling loop. CPU kernels pick different blockings for different
batch sizes (a batch of 3 differs from 3 singles by ~1e-6, enough to flip PNG bytes), so this is
what makes an image byte-identical alone and inside a batch. `fused` mode runs one forward for
the whole batch: faster on a GPU, equal to single renders only up to float rounding.

PNGs carry A1111's `parameters` text chunk (so the web UIs read them) and a JSON sidecar with the
full parameters.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import re
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from charaforge.config import ConfigError
from charaforge.io import sha256_bytes, sha256_file, write_json, write_png
from charaforge.models import (
    load_base_pipeline,
    read_base_info,
    resolve_pretrained,
    set_cpu_threads,
)

log = logging.getLogger(__name__)

# Config name -> (diffusers class, extra config, A1111 sampler name).
SCHEDULERS: dict[str, tuple[str, dict[str, Any], str]] = {
    "euler": ("EulerDiscreteScheduler", {}, "Euler"),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}, "Euler a"),
    "ddim": ("DDIMScheduler", {}, "DDIM"),
    "dpmpp_2m": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver++", "solver_order": 2},
        "DPM++ 2M",
    ),
    "dpmpp_2m_karras": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
        "DPM++ 2M Karras",
    ),
    "unipc": ("UniPCMultistepScheduler", {}, "UniPC"),
}
SchedulerName = Literal["euler", "euler_a", "ddim", "dpmpp_2m", "dpmpp_2m_karras", "unipc"]


@dataclass(frozen=True)
class Preset:
    steps: int
    guidance_scale: float


# Quality presets: steps and guidance, the two knobs that trade time for quality.
PRESETS: dict[str, Preset] = {
    "draft": Preset(steps=8, guidance_scale=5.0),
    "standard": Preset(steps=20, guidance_scale=7.0),
    "high": Preset(steps=30, guidance_scale=7.0),
    "ultra": Preset(steps=50, guidance_scale=7.5),
}
PresetName = Literal["draft", "standard", "high", "ultra"]
MEMORY_MODES = ("device", "model_cpu_offload", "sequential_cpu_offload")
MemoryMode = Literal["device", "model_cpu_offload", "sequential_cpu_offload"]
BatchMode = Literal["exact", "fused"]
CONTROL_TYPES = ("openpose", "canny", "depth")

EMBEDDING_CACHE_SIZE = 256
PARAMETERS_KEY = "parameters"
SIDECAR_KEY = "charaforge"
_ADAPTER_NAME = re.compile(r"^[A-Za-z0-9_-]+$")


def adapter_name(text: str) -> str:
    """A peft-safe adapter name (peft keeps adapters in module dicts: no dots)."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", text)


def lora_short_hash(path: str | Path) -> str:
    """A1111's LoRA hash: SHA-256 of the safetensors data after its header, first 12 digits."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        header_length = int.from_bytes(handle.read(8), "little")
        handle.seek(8 + header_length)
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()[:12]


@dataclass(frozen=True)
class LoadedLora:
    name: str
    file: Path
    sha256: str
    short_hash: str
    trigger_words: tuple[str, ...] = ()


def lora_file(path: str | Path) -> Path:
    """A LoRA file given as a .safetensors file or a checkpoint folder holding one."""
    path = Path(path)
    if path.is_dir():
        path = path / "pytorch_lora_weights.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"LoRA weights not found: {path}")
    return path


def resolve_device(name: str = "auto") -> torch.device:
    """`auto` (CUDA, then MPS, then CPU), or an explicit torch device such as `cuda:1`."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise ConfigError(f"device: {error}") from None
    if device.type == "cuda" and (
        not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()
    ):
        raise ConfigError(f"device: {name} is not available on this machine")
    return device


def image_digest(image: Image.Image) -> str:
    """A stable id of an image's pixels (mode, size, bytes), recorded in the parameters."""
    header = f"{image.mode}:{image.size[0]}x{image.size[1]}:".encode()
    return sha256_bytes(header + image.tobytes())[:16]


@dataclass(frozen=True)
class Conditioning:
    """What conditions an image besides the prompt.

    kind `control`: a ControlNet of `control_type` reads `image` (an OpenPose skeleton, a canny
    edge map or a depth map, already in that form: see charaforge.conditioning for making them).
    kind `img2img`: `image` is the starting picture, noised to `strength`.
    kind `inpaint`: as img2img, only where `mask` is white.
    `source` names where the image came from (a dataset image_id...), for the record.
    """

    kind: Literal["control", "img2img", "inpaint"]
    image: Image.Image
    mask: Image.Image | None = None
    control_type: str = "openpose"
    conditioning_scale: float = 1.0
    strength: float = 0.75
    source: str = ""

    def __post_init__(self) -> None:
        if self.kind == "inpaint" and self.mask is None:
            raise ValueError("inpainting needs a mask (white = repaint)")
        if self.kind == "control" and self.control_type not in CONTROL_TYPES:
            raise ValueError(f"control_type {self.control_type!r}: one of {CONTROL_TYPES}")
        if self.kind != "control" and not 0.0 < self.strength <= 1.0:
            raise ValueError(f"strength must be in (0, 1], got {self.strength}")

    def record(self) -> dict[str, Any]:
        record: dict[str, Any] = {"kind": self.kind, "image": image_digest(self.image)}
        if self.source:
            record["source"] = self.source
        if self.kind == "control":
            record.update(
                control_type=self.control_type, conditioning_scale=float(self.conditioning_scale)
            )
        else:
            record["strength"] = float(self.strength)
        if self.mask is not None:
            record["mask"] = image_digest(self.mask)
        return record


@dataclass
class RenderTimer:
    """Seconds spent inside the UNet (and ControlNet) and the VAE, filled by the engine's hooks;
    the rest of a render is text encoding, scheduling, image conversion and Python."""

    unet: float = 0.0
    vae: float = 0.0
    calls: dict[str, int] = field(default_factory=dict)


class GenerationEngine:
    """Renders images from the base pipeline with any set of loaded LoRAs at given scales."""

    def __init__(
        self,
        base_dir: str | Path = "data/base",
        scheduler: str = "euler",
        device: torch.device | str | None = None,
        memory: str = "device",
        batch_mode: str = "exact",
        controlnets: dict[str, str] | None = None,
        cpu_threads: int | None = None,
    ) -> None:
        if memory not in MEMORY_MODES:
            raise ConfigError(f"memory: {memory!r} is not one of {MEMORY_MODES}")
        if batch_mode not in ("exact", "fused"):
            raise ConfigError(f"batch_mode: {batch_mode!r} is not 'exact' or 'fused'")
        if isinstance(device, str) or device is None:
            device = resolve_device(device or "auto")
        if memory != "device" and device.type == "cpu":
            raise ConfigError(
                f"memory: {memory} moves modules between the CPU and an accelerator; "
                "this engine runs on the CPU (use memory=device, or a cuda device)"
            )
        set_cpu_threads(cpu_threads)
        self.device = device
        self.memory = memory
        self.batch_mode = batch_mode
        self.base = read_base_info(base_dir)
        # Offloaded pipelines are loaded on the CPU; accelerate's hooks move each module in turn.
        self.pipeline = load_base_pipeline(
            base_dir, device if memory == "device" else torch.device("cpu")
        )
        self._apply_memory(self.pipeline)
        self.is_sdxl = type(self.pipeline).__name__.startswith("StableDiffusionXL")
        self._scheduler_config = self.pipeline.scheduler.config
        self._controlnet_paths = dict(controlnets or {})
        self._controlnets: dict[str, Any] = {}
        self._derived: dict[tuple[str, str], Any] = {}
        self.loras: dict[str, LoadedLora] = {}
        self._embeddings: dict[tuple, tuple] = {}
        self.timer: RenderTimer | None = None
        self.scheduler = ""
        self.set_scheduler(scheduler)

    @property
    def model_name(self) -> str:
        return self.base.display_name

    @property
    def text_layers(self) -> int:
        return int(self.pipeline.text_encoder.config.num_hidden_layers)

    def _apply_memory(self, pipeline: Any) -> None:
        if self.memory == "model_cpu_offload":
            pipeline.enable_model_cpu_offload(device=self.device)
        elif self.memory == "sequential_cpu_offload":
            pipeline.enable_sequential_cpu_offload(device=self.device)

    def set_scheduler(self, name: str) -> None:
        """The default sampler for requests that name none."""
        self._build_scheduler(name)
        self.scheduler = name

    def _build_scheduler(self, name: str) -> Any:
        """Every scheduler is built from the base model's own noise schedule."""
        import diffusers

        if name not in SCHEDULERS:
            raise ValueError(f"unknown scheduler {name!r}; one of {sorted(SCHEDULERS)}")
        class_name, extra, _ = SCHEDULERS[name]
        return getattr(diffusers, class_name).from_config(self._scheduler_config, **extra)

    # --- LoRAs --------------------------------------------------------------------------------

    def load_lora(
        self, name: str, path: str | Path, trigger_words: Sequence[str] = ()
    ) -> LoadedLora:
        """Load a diffusers or kohya LoRA file as the adapter `name` (inactive until rendered).

        `trigger_words` are added to the prompt of every request that uses this LoRA.
        """
        if not _ADAPTER_NAME.match(name):
            raise ValueError(f"LoRA name {name!r}: use letters, digits, '_' or '-' only")
        file = lora_file(path)
        if name in self.loras:
            self.unload_lora(name)
        with warnings.catch_warnings():
            # peft warns whenever a second adapter joins the first: that is the point here.
            warnings.filterwarnings("ignore", message=".*multiple adapters.*")
            self.pipeline.load_lora_weights(str(file), adapter_name=name)
        loaded = LoadedLora(
            name, file, sha256_file(file), lora_short_hash(file), tuple(trigger_words)
        )
        self.loras[name] = loaded
        log.debug("loaded LoRA %s from %s", name, file)
        return loaded

    def unload_lora(self, name: str) -> None:
        """Remove the adapter; with none left the UNet is restored to its exact base modules."""
        if name not in self.loras:
            raise KeyError(f"LoRA {name!r} is not loaded")
        del self.loras[name]
        if self.loras:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*which is now deleted.*")
                self.pipeline.delete_adapters([name])
        else:
            self.pipeline.unload_lora_weights()

    # --- parameters ---------------------------------------------------------------------------

    def parameters(
        self,
        prompt: str,
        seed: int,
        loras: dict[str, float] | None = None,
        steps: int | None = None,
        guidance_scale: float | None = None,
        negative_prompt: str = "",
        width: int | None = None,
        height: int | None = None,
        scheduler: str | None = None,
        preset: str | None = None,
        clip_skip: int = 1,
        conditioning: Conditioning | None = None,
    ) -> dict[str, Any]:
        """Everything that determines an image (the JSON sidecar), without rendering it.

        `preset` fills steps and guidance that are not given; `clip_skip` counts as A1111 does
        (1 = the last text-encoder layer, 2 = the one before it).
        """
        loras = dict(loras or {})
        unknown = sorted(set(loras) - set(self.loras))
        if unknown:
            raise KeyError(f"LoRA(s) not loaded: {unknown}; loaded: {sorted(self.loras)}")
        if preset is not None and preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; one of {list(PRESETS)}")
        chosen = PRESETS[preset or "standard"]
        steps = chosen.steps if steps is None else int(steps)
        guidance_scale = chosen.guidance_scale if guidance_scale is None else guidance_scale
        scheduler = scheduler or self.scheduler
        if scheduler not in SCHEDULERS:
            raise ValueError(f"unknown scheduler {scheduler!r}; one of {sorted(SCHEDULERS)}")
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        if not 1 <= clip_skip <= self.text_layers:
            raise ValueError(f"clip_skip must be in 1..{self.text_layers}, got {clip_skip}")
        width = int(width or self.base.resolution)
        height = int(height or self.base.resolution)
        if width % 8 or height % 8 or width <= 0 or height <= 0:
            raise ValueError(f"width and height must be positive multiples of 8: {width}x{height}")
        triggers = [
            word
            for name in sorted(loras)
            if loras[name] != 0
            for word in self.loras[name].trigger_words
            if word not in prompt
        ]
        params: dict[str, Any] = {
            "prompt": ", ".join([*dict.fromkeys(triggers), prompt]) if triggers else prompt,
            "negative_prompt": negative_prompt,
            "steps": steps,
            "scheduler": scheduler,
            "sampler": SCHEDULERS[scheduler][2],
            "guidance_scale": float(guidance_scale),
            "seed": int(seed),
            "width": width,
            "height": height,
            "model": self.model_name,
            "stand_in": self.base.stand_in,
            "loras": [
                {
                    "name": name,
                    "scale": float(scale),
                    "sha256": self.loras[name].sha256,
                    "short_hash": self.loras[name].short_hash,
                }
                for name, scale in sorted(loras.items())
            ],
        }
        # Keys that were added later only appear when they differ from the old behaviour, so
        # sidecars of earlier sweeps still match and resume.
        if preset is not None:
            params["preset"] = preset
        if clip_skip != 1:
            params["clip_skip"] = clip_skip
        if triggers:
            params["trigger_words"] = triggers
        if conditioning is not None:
            params["conditioning"] = conditioning.record()
        return params

    # --- rendering ----------------------------------------------------------------------------

    def render(self, prompt: str, seed: int, **options: Any) -> Image.Image:
        """One image; only the LoRAs named in `loras` are active, at their scales.

        The image's `info` carries the A1111 `parameters` text and the full parameters (JSON),
        which `write_image` stores.
        """
        return self.render_batch([{"prompt": prompt, "seed": seed, **options}])[0]

    def render_batch(self, requests: Sequence[dict[str, Any]]) -> list[Image.Image]:
        """Several images in one sampling loop, each with its own seed and prompt.

        The requests must agree on everything but prompt, negative prompt, seed and clip skip
        (LoRAs, steps, guidance, size, scheduler, conditioning); see `batch_key`.
        """
        if not requests:
            return []
        conditionings = [request.get("conditioning") for request in requests]
        params = [self.parameters(**request) for request in requests]
        keys = {batch_key(item) for item in params}
        if len(keys) > 1:
            raise ValueError("a batch must share LoRAs, steps, guidance, size and scheduler")
        if any(c is not conditionings[0] and c != conditionings[0] for c in conditionings):
            raise ValueError("a batch must share its conditioning")
        first, conditioning = params[0], conditionings[0]
        self._activate({item["name"]: item["scale"] for item in first["loras"]})
        pipeline = self._pipeline_for(conditioning)
        pipeline.scheduler = self._build_scheduler(first["scheduler"])
        do_cfg = first["guidance_scale"] > 1.0
        generators = [torch.Generator("cpu").manual_seed(item["seed"]) for item in params]
        extra: dict[str, Any] = {}
        if conditioning is not None:
            extra.update(self._conditioning_arguments(conditioning, first))
        with torch.no_grad():
            extra.update(self._encode(pipeline, params, do_cfg))
            with self._per_image(pipeline, len(params), do_cfg):
                images = pipeline(
                    num_inference_steps=first["steps"],
                    guidance_scale=first["guidance_scale"],
                    width=first["width"],
                    height=first["height"],
                    generator=generators,
                    output_type="pil",
                    **extra,
                ).images
        if conditioning is not None and conditioning.kind == "inpaint":
            # The VAE round trip changes pixels outside the mask too: paste the original back
            # there, as A1111 does, so an inpainting only ever changes the masked region.
            images = [
                pipeline.image_processor.apply_overlay(
                    extra["mask_image"], extra["image"], image
                ).convert("RGB")
                for image in images
            ]
        for image, item in zip(images, params, strict=True):
            image.info[PARAMETERS_KEY] = a1111_parameters(item)
            image.info[SIDECAR_KEY] = json.dumps(item, sort_keys=True)
        return images

    def _encode(self, pipeline: Any, params: list[dict], do_cfg: bool) -> dict[str, Any]:
        """Each prompt encoded on its own (a batch must not change a single image's bytes)."""
        # `_execution_device` walks every module (10 ms a call): only offloading needs it.
        device = self.device if self.memory == "device" else pipeline._execution_device
        parts: dict[str, list[torch.Tensor]] = {}
        with _text_model_shim(pipeline.text_encoder):
            for item in params:
                self._encode_one(pipeline, item, do_cfg, device, parts)
        return {name: torch.cat(tensors) for name, tensors in parts.items()}

    def _encode_one(
        self,
        pipeline: Any,
        item: dict[str, Any],
        do_cfg: bool,
        device: Any,
        parts: dict[str, list[torch.Tensor]],
    ) -> None:
        names = ["prompt_embeds", "negative_prompt_embeds"]
        if self.is_sdxl:
            names += ["pooled_prompt_embeds", "negative_pooled_prompt_embeds"]
        key = (item["prompt"], item["negative_prompt"], item.get("clip_skip", 1), do_cfg)
        # A sweep encodes each prompt once per seed and per LoRA cell; the text encoders only
        # change when a LoRA patches them, so the embeddings are reused until then (the same
        # tensors the encoder would compute again: bytes do not change).
        cacheable = not self._text_encoders_patched()
        encoded = self._embeddings.get(key) if cacheable else None
        if encoded is None:
            clip_skip = item.get("clip_skip", 1) - 1 or None  # diffusers counts skipped layers
            encoded = pipeline.encode_prompt(
                prompt=item["prompt"],
                device=device,
                num_images_per_prompt=1,
                do_classifier_free_guidance=do_cfg,
                negative_prompt=item["negative_prompt"] or None,
                clip_skip=clip_skip,
            )
            if cacheable:
                if len(self._embeddings) >= EMBEDDING_CACHE_SIZE:
                    self._embeddings.pop(next(iter(self._embeddings)))
                self._embeddings[key] = encoded
        for name, tensor in zip(names, encoded, strict=True):
            if tensor is not None:
                parts.setdefault(name, []).append(tensor)

    def _text_encoders_patched(self) -> bool:
        """Whether a loaded LoRA reaches into a text encoder (then embeddings depend on it)."""
        encoders = (
            getattr(self.pipeline, "text_encoder", None),
            getattr(self.pipeline, "text_encoder_2", None),
        )
        return any(getattr(encoder, "peft_config", None) for encoder in encoders)

    @contextlib.contextmanager
    def _per_image(self, pipeline: Any, count: int, do_cfg: bool) -> Iterator[None]:
        """In exact mode, run the UNet, ControlNet and VAE decoder one image at a time; always
        time them (the benchmark's share of time outside UNet and VAE)."""
        exact = self.batch_mode == "exact"
        groups = [[k, count + k] if do_cfg else [k] for k in range(count)]
        patched = [
            (pipeline.unet, "forward", "unet"),
            (pipeline.vae, "decode", "vae"),
        ]
        if getattr(pipeline, "controlnet", None) is not None:
            patched.append((pipeline.controlnet, "forward", "unet"))
        originals = []
        for module, method, label in patched:
            original = module.__dict__.get(method)
            bound = getattr(module, method)
            groups_here = groups if label == "unet" else [[k] for k in range(count)]
            size = count * (2 if do_cfg and label == "unet" else 1)
            wrapped = _timed(
                _split_rows(bound, groups_here, size) if exact and count > 1 else bound,
                self.timer,
                label,
            )
            setattr(module, method, wrapped)
            originals.append((module, method, original))
        try:
            yield
        finally:
            for module, method, original in originals:
                if original is None:
                    delattr(module, method)
                else:
                    setattr(module, method, original)

    def _activate(self, scales: dict[str, float]) -> None:
        if not self.loras:
            return
        if not scales:
            self.pipeline.disable_lora()
            return
        self.pipeline.enable_lora()
        self.pipeline.set_adapters(list(scales), list(scales.values()))

    # --- conditioning -------------------------------------------------------------------------

    def _pipeline_for(self, conditioning: Conditioning | None) -> Any:
        """The base pipeline, or one derived from it that shares its modules (and LoRAs)."""
        if conditioning is None:
            return self.pipeline
        import diffusers

        kind = conditioning.kind
        key = (kind, conditioning.control_type if kind == "control" else "")
        if key not in self._derived:
            prefix = "StableDiffusionXL" if self.is_sdxl else "StableDiffusion"
            names = {"control": "ControlNetPipeline", "img2img": "Img2ImgPipeline"}
            pipeline_class = getattr(diffusers, prefix + names.get(kind, "InpaintPipeline"))
            extra = {}
            if kind == "control":
                extra["controlnet"] = self.controlnet(conditioning.control_type)
            derived = pipeline_class.from_pipe(self.pipeline, **extra)
            derived.set_progress_bar_config(disable=True)
            if kind == "control" and self.memory == "device":
                derived.controlnet.to(self.device)
            self._derived[key] = derived
        return self._derived[key]

    def controlnet(self, control_type: str) -> Any:
        """The ControlNet for a conditioning type: a local model, or with a stand-in base a
        stand-in ControlNet built deterministically (random weights, the real class)."""
        if control_type not in self._controlnets:
            from diffusers import ControlNetModel

            path = self._controlnet_paths.get(control_type)
            if path:
                model = ControlNetModel.from_pretrained(
                    resolve_pretrained(path), dtype=self.pipeline.unet.dtype
                )
            elif self.base.stand_in:
                from charaforge.conditioning import build_stand_in_controlnet

                model = build_stand_in_controlnet(self.pipeline.unet, control_type)
            else:
                raise ConfigError(
                    f"eval.controlnets.{control_type}: no local ControlNet given for a real "
                    "base model (nothing is downloaded)"
                )
            self._controlnets[control_type] = model.eval()
        return self._controlnets[control_type]

    def _conditioning_arguments(self, conditioning: Conditioning, first: dict) -> dict[str, Any]:
        size = (first["width"], first["height"])
        image = conditioning.image.convert("RGB").resize(size, Image.Resampling.BICUBIC)
        if conditioning.kind == "control":
            return {
                "image": image,
                "controlnet_conditioning_scale": float(conditioning.conditioning_scale),
            }
        arguments: dict[str, Any] = {"image": image, "strength": float(conditioning.strength)}
        if conditioning.kind == "inpaint":
            assert conditioning.mask is not None
            arguments["mask_image"] = conditioning.mask.convert("L").resize(
                size, Image.Resampling.NEAREST
            )
        return arguments


@contextlib.contextmanager
def _text_model_shim(text_encoder: Any) -> Iterator[None]:
    """diffusers' SD clip skip reads `text_encoder.text_model.final_layer_norm`; transformers 5
    flattened CLIPTextModel (no `text_model`), so point the old path at the same module."""
    if text_encoder is None or hasattr(text_encoder, "text_model"):
        yield
        return
    from types import SimpleNamespace

    object.__setattr__(
        text_encoder, "text_model", SimpleNamespace(final_layer_norm=text_encoder.final_layer_norm)
    )
    try:
        yield
    finally:
        object.__delattr__(text_encoder, "text_model")


def batch_key(params: dict[str, Any]) -> str:
    """What the images of one batch must share (everything but prompt, seed and clip skip)."""
    shared = {
        key: value
        for key, value in params.items()
        if key
        not in {"prompt", "negative_prompt", "seed", "clip_skip", "trigger_words", "conditioning"}
    }
    return json.dumps(shared, sort_keys=True)


def _rows(value: Any, index: torch.Tensor, size: int) -> Any:
    if torch.is_tensor(value) and value.dim() > 0 and value.shape[0] == size:
        return value.index_select(0, index.to(value.device))
    if isinstance(value, (list, tuple)):
        return type(value)(_rows(item, index, size) for item in value)
    if isinstance(value, dict):
        return {key: _rows(item, index, size) for key, item in value.items()}
    return value


def _join(parts: list[Any], order: torch.Tensor) -> Any:
    first = parts[0]
    if torch.is_tensor(first):
        return torch.cat(parts).index_select(0, order.to(first.device))
    if isinstance(first, (list, tuple)):
        joined = [_join([part[i] for part in parts], order) for i in range(len(first))]
        return type(first)(joined) if isinstance(first, list) else tuple(joined)
    if hasattr(first, "sample"):  # a diffusers output object
        return type(first)(sample=_join([part.sample for part in parts], order))
    return first


def _split_rows(function: Any, groups: list[list[int]], size: int) -> Any:
    """Call `function` once per group of batch rows (an image's unconditional and conditional
    rows) and put the results back in batch order; other batch sizes pass straight through."""
    indices = [torch.tensor(group) for group in groups]
    order = torch.argsort(torch.cat(indices))

    def call(*args: Any, **kwargs: Any) -> Any:
        sample = args[0] if args else next(iter(kwargs.values()))
        if not torch.is_tensor(sample) or sample.shape[0] != size:
            return function(*args, **kwargs)
        parts = [
            function(*_rows(args, index, size), **_rows(kwargs, index, size)) for index in indices
        ]
        return _join(parts, order)

    return call


def _timed(function: Any, timer: RenderTimer | None, label: str) -> Any:
    if timer is None:
        return function
    import time

    def call(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            setattr(timer, label, getattr(timer, label) + time.perf_counter() - started)
            timer.calls[label] = timer.calls.get(label, 0) + 1

    return call


def a1111_parameters(params: dict[str, Any]) -> str:
    """The `parameters` text A1111 writes (and its PNG Info tab and ComfyUI read back)."""
    prompt = params["prompt"] + "".join(
        f" <lora:{lora['name']}:{lora['scale']:g}>" for lora in params["loras"]
    )
    fields = [
        f"Steps: {params['steps']}",
        f"Sampler: {params['sampler']}",
        f"CFG scale: {params['guidance_scale']:g}",
        f"Seed: {params['seed']}",
        f"Size: {params['width']}x{params['height']}",
        f"Model: {params['model']}",
    ]
    if params.get("clip_skip", 1) != 1:
        fields.append(f"Clip skip: {params['clip_skip']}")
    conditioning = params.get("conditioning")
    if conditioning and conditioning["kind"] != "control":
        fields.append(f"Denoising strength: {conditioning['strength']:g}")
    if conditioning and conditioning["kind"] == "control":
        fields.append(
            f'ControlNet 0: "Module: {conditioning["control_type"]}, '
            f'Weight: {conditioning["conditioning_scale"]:g}"'
        )
    if params["loras"]:
        hashes = ", ".join(f"{lora['name']}: {lora['short_hash']}" for lora in params["loras"])
        fields.append(f'Lora hashes: "{hashes}"')
    lines = [prompt]
    if params["negative_prompt"]:
        lines.append(f"Negative prompt: {params['negative_prompt']}")
    lines.append(", ".join(fields))
    return "\n".join(lines)


def png_bytes(image: Image.Image) -> bytes:
    """The PNG (with its `parameters` chunk) as bytes, exactly as `write_image` writes it."""
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=_png_info(image), optimize=False, compress_level=6)
    return buffer.getvalue()


def _png_info(image: Image.Image) -> PngInfo:
    info = PngInfo()
    if PARAMETERS_KEY in image.info:
        info.add_text(PARAMETERS_KEY, image.info[PARAMETERS_KEY])
    return info


def write_image(path: str | Path, image: Image.Image) -> None:
    """The PNG with its `parameters` chunk, and `<name>.json` beside it with the full parameters.

    The sidecar is written first: a PNG on disk always has its sidecar (resume relies on it).
    """
    path = Path(path)
    if SIDECAR_KEY in image.info:
        write_json(path.with_suffix(".json"), json.loads(image.info[SIDECAR_KEY]))
    write_png(path, image, pnginfo=_png_info(image))


def read_sidecar(path: str | Path) -> dict[str, Any] | None:
    sidecar = Path(path).with_suffix(".json")
    if not sidecar.is_file():
        return None
    try:
        return json.loads(sidecar.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return None
