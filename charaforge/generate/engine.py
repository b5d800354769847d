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
import copy
import json
import logging
import re
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from PIL import Image

from charaforge.core import layout
from charaforge.errors import ConfigError
from charaforge.generate.batching import (
    RenderTimer,
    per_image,
    step_end_callback,
    text_model_shim,
)
from charaforge.generate.conditioning import (
    combine_controlnets,
    control_arguments,
    load_controlnet,
)
from charaforge.generate.consistent import (
    CHARACTER_MASK_KEY,
    group_state,
    shared_attention,
)
from charaforge.generate.devices import apply_memory, check_memory_mode, resolve_device
from charaforge.generate.ip_adapter import image_prompt_arguments, load_for_engine
from charaforge.generate.loras import (
    LoadedLora,
    copy_lora_weights,
    describe_lora,
    hotswappable,
    load_peft_only_adapter,
    lora_file,
    text_encoders_patched,
)
from charaforge.generate.records import (
    PARAMETERS_KEY,
    SIDECAR_KEY,
    a1111_parameters,
    batch_key,
    fused_batch_record,
)
from charaforge.generate.request import SCHEDULERS, Conditioning, RenderRequest
from charaforge.models.base import (
    load_base_pipeline,
    read_base_info,
    resolve_pretrained,
    set_cpu_threads,
)
from charaforge.models.clip_skip import diffusers_clip_skip
from charaforge.models.loading import WEIGHTS_LOADING_LOCK

log = logging.getLogger(__name__)


BatchMode = Literal["exact", "fused"]

EMBEDDING_CACHE_SIZE = 256
_ADAPTER_NAME = re.compile(r"^[A-Za-z0-9_@-]+$")  # `@`: `<candidate>@<step>`


class GenerationEngine:
    """Renders images from the base pipeline with any set of loaded LoRAs at given scales."""

    def __init__(
        self,
        base_dir: str | Path = layout.BASE_DIR,
        scheduler: str = "euler",
        device: torch.device | str | None = None,
        memory: str = "device",
        batch_mode: str = "exact",
        controlnets: dict[str, str] | None = None,
        cpu_threads: int | None = None,
        ip_adapter: str | Path | None = None,
    ) -> None:
        if batch_mode not in ("exact", "fused"):
            raise ConfigError(f"batch_mode: {batch_mode!r} is not 'exact' or 'fused'")
        if isinstance(device, str) or device is None:
            device = resolve_device(device or "auto")
        check_memory_mode(memory, device)
        set_cpu_threads(cpu_threads)
        self.device = device
        self.memory = memory
        self.batch_mode = batch_mode
        self.base = read_base_info(base_dir)
        # Offloaded pipelines are loaded on the CPU; accelerate's hooks move each module in turn.
        # `balanced` lets accelerate place whole models on the GPUs (diffusers' device_map).
        self.pipeline = load_base_pipeline(
            base_dir,
            device if memory == "device" else torch.device("cpu"),
            device_map="balanced" if memory == "balanced" else None,
        )
        apply_memory(self.pipeline, self.memory, self.device)
        self.is_sdxl = type(self.pipeline).__name__.startswith("StableDiffusionXL")
        self._scheduler_config = self.pipeline.scheduler.config
        self._controlnet_paths = dict(controlnets or {})
        self._controlnets: dict[str, Any] = {}
        # An IP-Adapter weight file (image_encoder/ beside it); a stand-in base builds its own.
        self._ip_adapter_path = ip_adapter
        self.ip_adapter_loaded = False
        self._derived: dict[tuple[str, str], Any] = {}
        self.loras: dict[str, LoadedLora] = {}
        # The peft adapter holding each LoRA: its own name, or, after `swap_lora`, the name of the
        # LoRA whose layers it took over.
        self._slots: dict[str, str] = {}
        self._active: tuple | None = None  # the adapter state `_activate` last set
        self._schedulers: dict[str, Any] = {}  # a fresh one per name, copied for each render
        self._embeddings: dict[tuple, tuple] = {}
        self.timer: RenderTimer | None = None
        # Called as (step done, steps) after every sampling step (the server's progress and
        # cancellation: an exception raised by it ends the render).
        self.step_callback: Callable[[int, int], None] | None = None
        self.scheduler = ""
        self.set_scheduler(scheduler)

    @property
    def model_name(self) -> str:
        return self.base.display_name

    @property
    def text_layers(self) -> int:
        return int(self.pipeline.text_encoder.config.num_hidden_layers)

    def set_scheduler(self, name: str) -> None:
        """The default sampler for requests that name none."""
        self._build_scheduler(name)
        self.scheduler = name

    def _build_scheduler(self, name: str) -> Any:
        """Every scheduler is built from the base model's own noise schedule."""
        import diffusers

        if name not in SCHEDULERS:
            raise ValueError(f"unknown scheduler {name!r}; one of {sorted(SCHEDULERS)}")
        if name not in self._schedulers:
            class_name, extra, _ = SCHEDULERS[name]
            built = getattr(diffusers, class_name).from_config(self._scheduler_config, **extra)
            self._schedulers[name] = built
        # A copy of the untouched one: a render never sees state another render left behind.
        return copy.deepcopy(self._schedulers[name])

    # --- LoRAs --------------------------------------------------------------------------------

    def load_lora(
        self, name: str, path: str | Path, trigger_words: Sequence[str] = ()
    ) -> LoadedLora:
        """Load a diffusers or kohya LoRA file as the adapter `name` (inactive until rendered).

        `trigger_words` are added to the prompt of every request that uses this LoRA.
        """
        if not _ADAPTER_NAME.match(name):
            raise ValueError(f"LoRA name {name!r}: use letters, digits, '_', '-' or '@' only")
        file = lora_file(path)
        if name in self.loras:
            self.unload_lora(name)
        with WEIGHTS_LOADING_LOCK, warnings.catch_warnings():
            # peft warns whenever a second adapter joins the first: that is the point here.
            warnings.filterwarnings("ignore", message=".*multiple adapters.*")
            if not load_peft_only_adapter(self.pipeline, name, file):  # LoHa, LoKr
                self.pipeline.load_lora_weights(str(file), adapter_name=name)
        loaded = describe_lora(name, file, tuple(trigger_words))
        self.loras[name], self._slots[name], self._active = loaded, name, None
        log.debug("loaded LoRA %s from %s", name, file)
        return loaded

    def swap_lora(
        self, old: str | None, name: str, path: str | Path, trigger_words: Sequence[str] = ()
    ) -> LoadedLora:
        """Replace the loaded LoRA `old` (None: none) by the file at `path`, loaded as `name`.

        When the files differ only in their weights (`hotswappable`: a sweep's checkpoints), the
        weights are copied into old's peft layers instead of building new ones (the slowest part
        of a load: peft walks the UNet and wraps every target module); the result is the same
        tensors, so the same bytes. Otherwise old is unloaded and `name` loaded."""
        file = lora_file(path)
        swappable = old in self.loras and name not in self.loras and _ADAPTER_NAME.match(name)
        if old is None or not swappable or not hotswappable(self.loras[old].file, file):
            if old in self.loras:
                self.unload_lora(old)
            return self.load_lora(name, file, trigger_words)
        slot = self._slots.pop(old)
        del self.loras[old]
        copy_lora_weights(self.pipeline.unet, slot, file)
        loaded = describe_lora(name, file, tuple(trigger_words))
        self.loras[name], self._slots[name], self._active = loaded, slot, None
        log.debug("swapped LoRA %s for %s (adapter %s) from %s", old, name, slot, file)
        return loaded

    def unload_lora(self, name: str) -> None:
        """Remove the adapter; with none left the UNet is restored to its exact base modules."""
        if name not in self.loras:
            raise KeyError(f"LoRA {name!r} is not loaded")
        del self.loras[name]
        slot, self._active = self._slots.pop(name), None
        if self.loras:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*which is now deleted.*")
                self.pipeline.delete_adapters([slot])
        else:
            self.pipeline.unload_lora_weights()

    # --- parameters ---------------------------------------------------------------------------

    def parameters(self, request: RenderRequest) -> dict[str, Any]:
        """Everything that determines an image (the JSON sidecar), without rendering it.

        `preset` fills steps and guidance that are not given; `clip_skip` counts as A1111 does
        (1 = the last text-encoder layer, 2 = the one before it).
        """
        prompt, seed, clip_skip = request.prompt, request.seed, request.clip_skip
        negative_prompt, conditioning = request.negative_prompt, request.conditioning
        loras = dict(request.loras)
        unknown = sorted(set(loras) - set(self.loras))
        if unknown:
            raise KeyError(f"LoRA(s) not loaded: {unknown}; loaded: {sorted(self.loras)}")
        steps, guidance_scale, scheduler, width, height = request.settings(
            self.scheduler, self.base.resolution, self.text_layers
        )
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
                    "a1111_name": self.loras[name].a1111_name,
                }
                for name, scale in sorted(loras.items())
            ],
        }
        # Keys that were added later only appear when they differ from the old behaviour, so
        # sidecars of earlier sweeps still match and resume.
        if request.preset is not None:
            params["preset"] = request.preset
        if clip_skip != 1:
            params["clip_skip"] = clip_skip
        if triggers:
            params["trigger_words"] = triggers
        if conditioning is not None:
            params["conditioning"] = conditioning.record()
        if request.consistency is not None:
            params["consistency"] = request.consistency.record()
        if request.image_prompt is not None:
            adapter = Path(self._ip_adapter_path).name if self._ip_adapter_path else "stand-in"
            params["ip_adapter"] = {**request.image_prompt.record(), "adapter": adapter}
        return params

    # --- rendering ----------------------------------------------------------------------------

    def render(self, prompt: str, seed: int, **options: Any) -> Image.Image:
        """One image; only the LoRAs named in `loras` are active, at their scales.

        The image's `info` carries the A1111 `parameters` text and the full parameters (JSON),
        which `write_image` stores.
        """
        return self.render_batch([RenderRequest.from_options(prompt, seed, **options)])[0]

    def render_batch(self, requests: Sequence[RenderRequest]) -> list[Image.Image]:
        """Several images in one sampling loop, each with its own seed and prompt.

        The requests must agree on everything but prompt, negative prompt, seed and clip skip
        (LoRAs, steps, guidance, size, scheduler, conditioning); see `batch_key`.
        """
        if not requests:
            return []
        conditionings = [request.conditioning for request in requests]
        params = [self.parameters(request) for request in requests]
        keys = {batch_key(item) for item in params}
        if len(keys) > 1:
            raise ValueError("a batch must share LoRAs, steps, guidance, size and scheduler")
        if any(c is not conditionings[0] and c != conditionings[0] for c in conditionings):
            raise ValueError("a batch must share its conditioning")
        first, conditioning = params[0], conditionings[0]
        self._activate({item["name"]: item["scale"] for item in first["loras"]})
        if requests[0].image_prompt is not None:
            self.load_ip_adapter()  # before deriving: derived pipelines share its image encoder
        pipeline = self._pipeline_for(conditioning)
        pipeline.scheduler = self._build_scheduler(first["scheduler"])
        do_cfg = first["guidance_scale"] > 1.0
        generators = [torch.Generator("cpu").manual_seed(item["seed"]) for item in params]
        extra: dict[str, Any] = {}
        if conditioning is not None:
            extra.update(self._conditioning_arguments(conditioning, first))
        if requests[0].image_prompt is not None or self.ip_adapter_loaded:
            extra.update(image_prompt_arguments(pipeline, requests[0].image_prompt))
        scale = pipeline.vae_scale_factor
        state = group_state(
            pipeline.tokenizer,
            [(request.prompt, request.seed, request.consistency) for request in requests],
            [item["prompt"] for item in params],
            (first["height"] // scale, first["width"] // scale),
            first["steps"],
        )
        if self.step_callback is not None:
            extra["callback_on_step_end"] = step_end_callback(self.step_callback)
        exact = self.batch_mode == "exact"
        with torch.no_grad():
            extra.update(self._encode(pipeline, params, do_cfg))
            with (
                per_image(pipeline, len(params), do_cfg, exact, self.timer, state),
                shared_attention(pipeline.unet, state) if state else contextlib.nullcontext(),
            ):
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
        masks = state.character_masks(images[0].size) if state else [None] * len(images)
        if self.batch_mode == "fused" and state is None:
            record = fused_batch_record(params)
            params = [{**item, "fused_batch": record} for item in params]
        for image, item, mask in zip(images, params, masks, strict=True):
            if mask is not None:
                image.info[CHARACTER_MASK_KEY] = mask
            image.info[PARAMETERS_KEY] = a1111_parameters(item)
            image.info[SIDECAR_KEY] = json.dumps(item, sort_keys=True)
        return images

    def _encode(self, pipeline: Any, params: list[dict], do_cfg: bool) -> dict[str, Any]:
        """Each prompt encoded on its own (a batch must not change a single image's bytes)."""
        # `_execution_device` walks every module (10 ms a call): only offloading needs it.
        device = self.device if self.memory == "device" else pipeline._execution_device
        parts: dict[str, list[torch.Tensor]] = {}
        with text_model_shim(pipeline.text_encoder):
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
        cacheable = not text_encoders_patched(self.pipeline)
        encoded = self._embeddings.get(key) if cacheable else None
        if encoded is None:
            clip_skip = diffusers_clip_skip(item.get("clip_skip", 1))
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

    def _activate(self, scales: dict[str, float]) -> None:
        # set_adapters walks every module: skip it when the last render left the same state
        # (every load, swap and unload forgets that state).
        wanted = tuple(scales.items())
        if not self.loras or wanted == self._active:
            return
        if not scales:
            self.pipeline.disable_lora()
        else:
            self.pipeline.enable_lora()
            slots = [self._slots[name] for name in scales]
            self.pipeline.set_adapters(slots, list(scales.values()))
        self._active = wanted

    # --- IP-Adapter ---------------------------------------------------------------------------

    def load_ip_adapter(self) -> None:
        """Load the IP-Adapter into the base pipeline once (generate.ip_adapter.load_for_engine)."""
        if not self.ip_adapter_loaded:
            load_for_engine(self.pipeline, self._ip_adapter_path, self.base.stand_in)
            apply_memory(
                self.pipeline, self.memory, self.device
            )  # offload hooks for the new image encoder too
            self._derived.clear()  # derived pipelines must see the image encoder
            self.ip_adapter_loaded = True

    # --- conditioning -------------------------------------------------------------------------

    def _pipeline_for(self, conditioning: Conditioning | None) -> Any:
        """The base pipeline, or one derived from it that shares its modules (and LoRAs)."""
        if conditioning is None:
            return self.pipeline
        import diffusers

        kind = conditioning.kind
        types = [unit.control_type for unit in conditioning.control_units()]
        key = (kind, "+".join(types) if kind == "control" else "")
        if key not in self._derived:
            prefix = "StableDiffusionXL" if self.is_sdxl else "StableDiffusion"
            names = {"control": "ControlNetPipeline", "img2img": "Img2ImgPipeline"}
            pipeline_class = getattr(diffusers, prefix + names.get(kind, "InpaintPipeline"))
            extra = {}
            if kind == "control":
                extra["controlnet"] = combine_controlnets([self.controlnet(t) for t in types])
            derived = pipeline_class.from_pipe(self.pipeline, **extra)
            derived.set_progress_bar_config(disable=True)
            if kind == "control" and self.memory in ("device", "balanced"):
                derived.controlnet.to(self.device)
            self._derived[key] = derived
        return self._derived[key]

    def controlnet(self, control_type: str) -> Any:
        """The ControlNet for a conditioning type (`eval.controlnets`), loaded once."""
        if control_type not in self._controlnets:
            path = self._controlnet_paths.get(control_type)
            self._controlnets[control_type] = load_controlnet(
                control_type,
                resolve_pretrained(path) if path else None,
                self.pipeline.unet,
                self.base.stand_in,
            )
        return self._controlnets[control_type]

    def _conditioning_arguments(self, conditioning: Conditioning, first: dict) -> dict[str, Any]:
        size = (first["width"], first["height"])
        if conditioning.kind == "control":
            return control_arguments(conditioning.control_units(), size)
        image = conditioning.image.convert("RGB").resize(size, Image.Resampling.BICUBIC)
        arguments: dict[str, Any] = {"image": image, "strength": float(conditioning.strength)}
        if conditioning.kind == "inpaint":
            assert conditioning.mask is not None
            arguments["mask_image"] = conditioning.mask.convert("L").resize(
                size, Image.Resampling.NEAREST
            )
        return arguments
