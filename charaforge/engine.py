"""The generation engine: the one code path that renders images, for the sweep, the CLI and HTTP.

It loads the base pipeline once and keeps it; LoRAs are loaded as named peft adapters and only
those a request names are active for it. Each image gets its own torch.Generator("cpu") seeded
with the request's seed, so an image depends on its parameters alone, not on what was rendered
before it. PNGs carry A1111's `parameters` text chunk (so the web UIs read them) and a JSON
sidecar with the full parameters.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from charaforge.io import sha256_file, write_json, write_png
from charaforge.models import load_base_pipeline, read_base_info

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
    "unipc": ("UniPCMultistepScheduler", {}, "UniPC"),
}
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


def lora_file(path: str | Path) -> Path:
    """A LoRA file given as a .safetensors file or a checkpoint folder holding one."""
    path = Path(path)
    if path.is_dir():
        path = path / "pytorch_lora_weights.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"LoRA weights not found: {path}")
    return path


class GenerationEngine:
    """Renders images from the base pipeline with any set of loaded LoRAs at given scales."""

    def __init__(
        self,
        base_dir: str | Path = "data/base",
        scheduler: str = "euler",
        device: torch.device | None = None,
    ) -> None:
        self.base = read_base_info(base_dir)
        self.pipeline = load_base_pipeline(base_dir, device)
        self._scheduler_config = self.pipeline.scheduler.config
        self.loras: dict[str, LoadedLora] = {}
        self.scheduler = ""
        self.set_scheduler(scheduler)

    @property
    def model_name(self) -> str:
        return self.base.display_name

    def set_scheduler(self, name: str) -> None:
        """Swap the sampler; every scheduler is built from the base model's own schedule."""
        import diffusers

        if name not in SCHEDULERS:
            raise ValueError(f"unknown scheduler {name!r}; one of {sorted(SCHEDULERS)}")
        class_name, extra, _ = SCHEDULERS[name]
        scheduler_class = getattr(diffusers, class_name)
        self.pipeline.scheduler = scheduler_class.from_config(self._scheduler_config, **extra)
        self.scheduler = name

    def load_lora(self, name: str, path: str | Path) -> LoadedLora:
        """Load a diffusers or kohya LoRA file as the adapter `name` (inactive until rendered)."""
        if not _ADAPTER_NAME.match(name):
            raise ValueError(f"LoRA name {name!r}: use letters, digits, '_' or '-' only")
        file = lora_file(path)
        if name in self.loras:
            self.unload_lora(name)
        with warnings.catch_warnings():
            # peft warns whenever a second adapter joins the first: that is the point here.
            warnings.filterwarnings("ignore", message=".*multiple adapters.*")
            self.pipeline.load_lora_weights(str(file), adapter_name=name)
        loaded = LoadedLora(name, file, sha256_file(file), lora_short_hash(file))
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

    def parameters(
        self,
        prompt: str,
        seed: int,
        loras: dict[str, float] | None = None,
        steps: int = 20,
        guidance_scale: float = 7.0,
        negative_prompt: str = "",
        width: int | None = None,
        height: int | None = None,
    ) -> dict[str, Any]:
        """Everything that determines an image (the JSON sidecar), without rendering it."""
        loras = dict(loras or {})
        unknown = sorted(set(loras) - set(self.loras))
        if unknown:
            raise KeyError(f"LoRA(s) not loaded: {unknown}; loaded: {sorted(self.loras)}")
        return {
            "prompt": prompt,
            "negative_prompt": negative_prompt,
            "steps": int(steps),
            "scheduler": self.scheduler,
            "sampler": SCHEDULERS[self.scheduler][2],
            "guidance_scale": float(guidance_scale),
            "seed": int(seed),
            "width": int(width or self.base.resolution),
            "height": int(height or self.base.resolution),
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

    def render(
        self,
        prompt: str,
        seed: int,
        loras: dict[str, float] | None = None,
        steps: int = 20,
        guidance_scale: float = 7.0,
        negative_prompt: str = "",
        width: int | None = None,
        height: int | None = None,
    ) -> Image.Image:
        """One image; only the LoRAs named in `loras` are active, at their scales.

        The image's `info` carries the A1111 `parameters` text and the full parameters (JSON),
        which `write_image` stores.
        """
        params = self.parameters(
            prompt, seed, loras, steps, guidance_scale, negative_prompt, width, height
        )
        self._activate({item["name"]: item["scale"] for item in params["loras"]})
        generator = torch.Generator("cpu").manual_seed(params["seed"])
        with torch.no_grad():
            image = self.pipeline(
                prompt=prompt,
                negative_prompt=negative_prompt or None,
                num_inference_steps=params["steps"],
                guidance_scale=params["guidance_scale"],
                width=params["width"],
                height=params["height"],
                generator=generator,
                output_type="pil",
            ).images[0]
        image.info[PARAMETERS_KEY] = a1111_parameters(params)
        image.info[SIDECAR_KEY] = json.dumps(params, sort_keys=True)
        return image

    def _activate(self, scales: dict[str, float]) -> None:
        if not self.loras:
            return
        if not scales:
            self.pipeline.disable_lora()
            return
        self.pipeline.enable_lora()
        self.pipeline.set_adapters(list(scales), list(scales.values()))


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
    if params["loras"]:
        hashes = ", ".join(f"{lora['name']}: {lora['short_hash']}" for lora in params["loras"])
        fields.append(f'Lora hashes: "{hashes}"')
    lines = [prompt]
    if params["negative_prompt"]:
        lines.append(f"Negative prompt: {params['negative_prompt']}")
    lines.append(", ".join(fields))
    return "\n".join(lines)


def write_image(path: str | Path, image: Image.Image) -> None:
    """The PNG with its `parameters` chunk, and `<name>.json` beside it with the full parameters."""
    path = Path(path)
    info = PngInfo()
    if PARAMETERS_KEY in image.info:
        info.add_text(PARAMETERS_KEY, image.info[PARAMETERS_KEY])
    if SIDECAR_KEY in image.info:
        write_json(path.with_suffix(".json"), json.loads(image.info[SIDECAR_KEY]))
    write_png(path, image, pnginfo=info)


def read_sidecar(path: str | Path) -> dict[str, Any] | None:
    sidecar = Path(path).with_suffix(".json")
    if not sidecar.is_file():
        return None
    try:
        return json.loads(sidecar.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return None
