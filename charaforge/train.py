"""LoRA training for SD1.5 and SDXL, in the shape of diffusers' LoRA training examples.

`train_candidate` reads top to bottom: load and freeze the base model, check the configuration,
attach the LoRA adapters with peft, plan the data (aspect-ratio buckets) and fill the caches,
prepare with accelerate, resume from the latest saved state if there is one, then per step
draw a batch, encode the captions, draw noise and timesteps, predict, weight the loss (min-SNR),
step; every N steps validate, render samples, export the LoRA in both formats and save the full
training state. Every random draw comes from a generator seeded from the global seed and the
candidate name, and every one of them is saved with the state: the same params and data give
the same bytes on CPU, killed and resumed or not.
"""

from __future__ import annotations

import contextlib
import logging
import random
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from tqdm.auto import tqdm

from charaforge import checkpoint as states
from charaforge.caches import TensorCache, cache_key, component_fingerprint
from charaforge.config import CandidateConfig, ConfigError, TrainConfig, config_hash
from charaforge.io import atomic_path, derive_seed, sha256_file, write_csv, write_json, write_png
from charaforge.lora_files import (
    LORA_WEIGHTS,
    LoraExport,
    json_ready,
    kohya_file_name,
    write_lora_files,
)
from charaforge.models import (
    load_base_pipeline,
    pipeline_location,
    read_base_info,
    set_cpu_threads,
)

log = logging.getLogger(__name__)

__all__ = ["LORA_WEIGHTS", "checkpoint_path", "kohya_file_name", "train_all", "train_candidate"]

StepCallback = Callable[[int, dict[str, float]], None]
HISTORY_COLUMNS = ["step", "loss", "learning_rate", "grad_norm", "val_loss"]

# Target presets. UNet names are diffusers' module names; text-encoder names are CLIP's.
UNET_PRESETS: dict[str, list[str]] = {
    "attention": ["to_q", "to_k", "to_v", "to_out.0"],
    "attention_ff": ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"],
    # kohya's LoCon set: attention, feed-forward, the transformer projections, and the convs and
    # time projections of every resnet, down- and up-sampler.
    "all": [
        *("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"),
        *("proj_in", "proj_out", "conv1", "conv2", "conv_shortcut", "time_emb_proj"),
        *("downsamplers.0.conv", "upsamplers.0.conv"),
    ],
}
TEXT_PRESETS: dict[str, list[str]] = {
    "attention": ["q_proj", "k_proj", "v_proj", "out_proj"],
    "attention_ff": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    "all": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
}
TEXT_COMPONENTS = ("text_encoder", "text_encoder_2")
VALIDATION_TIMESTEPS = (100, 300, 500, 700, 900)


@dataclass
class TrainResult:
    """What one candidate's training produced (summary.json holds all but `seconds`)."""

    name: str
    rank: int
    alpha: float
    learning_rate: float
    checkpoints: list[int]
    final_loss: float
    val_loss: list[float] | None = None  # one per checkpoint; None without a val split
    initial_val_loss: float | None = None  # before the first step (the LoRA is a no-op then)
    seconds: float = 0.0
    resumed_from: int = 0
    history: pd.DataFrame = field(default_factory=pd.DataFrame, repr=False)

    def summary(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "rank": self.rank,
            "alpha": self.alpha,
            "learning_rate": self.learning_rate,
            "checkpoints": self.checkpoints,
            "final_loss": self.final_loss,
            "val_loss": self.val_loss,
            "initial_val_loss": self.initial_val_loss,
        }


def checkpoint_steps(train: TrainConfig) -> list[int]:
    """Every `checkpoint_every` steps, and always the last step."""
    steps = list(range(train.checkpoint_every, train.max_steps + 1, train.checkpoint_every))
    return steps if steps and steps[-1] == train.max_steps else [*steps, train.max_steps]


def checkpoint_path(candidate_dir: str | Path, step: int) -> Path:
    """The diffusers LoRA file of one checkpoint (what the generation engine loads)."""
    return Path(candidate_dir) / f"checkpoint-{step}" / LORA_WEIGHTS


def target_modules(train: TrainConfig) -> tuple[list[str], list[str]]:
    """The UNet's and the text encoders' target module names."""
    if isinstance(train.target_modules, str):
        return UNET_PRESETS[train.target_modules], TEXT_PRESETS[train.target_modules]
    return list(train.target_modules), TEXT_PRESETS["attention"]


# --- checks that run before any work ------------------------------------------------------------


def read_split(dataset_dir: str | Path, split: str = "train") -> pd.DataFrame:
    """One split of data/dataset/metadata.parquet; image paths are relative to the cwd.

    An empty train split is a configuration that cannot train; an empty val split only means
    no validation loss.
    """
    table = Path(dataset_dir) / "metadata.parquet"
    if not table.is_file():
        raise ConfigError(f"{table}: not found (run the `dataset` stage first)")
    rows = pd.read_parquet(table)
    missing = {"image_path", "caption", "split"} - set(rows.columns)
    if missing:
        raise ConfigError(f"{table}: missing columns {sorted(missing)}")
    rows = rows[rows["split"] == split].sort_values("image_path").reset_index(drop=True)
    if rows.empty and split == "train":
        raise ConfigError(f"{table}: no rows with split == 'train': nothing to train on")
    absent = [path for path in rows["image_path"] if not Path(path).is_file()]
    if absent:
        raise ConfigError(f"{table}: {len(absent)} {split} image(s) missing, e.g. {absent[0]}")
    return rows


def _targeted_layers(model: torch.nn.Module, target: str) -> list[tuple[str, torch.nn.Module]]:
    # The same rule peft applies to a list of target names: the full name or its dotted suffix.
    return [
        (name, module)
        for name, module in model.named_modules()
        if (name == target or name.endswith("." + target))
        and isinstance(module, torch.nn.Linear | torch.nn.Conv2d)
    ]


def _layer_size(module: torch.nn.Module) -> int:
    if isinstance(module, torch.nn.Linear):
        return min(module.in_features, module.out_features)
    return min(module.in_channels, module.out_channels)


def check_candidates(pipeline: Any, train: TrainConfig, resolution: int | None = None) -> None:
    """Fail before any training if the configuration cannot train this model.

    A target that matches nothing, a rank larger than a targeted layer, a resolution the UNet
    cannot take, fp16 without a GPU, or an optimizer whose package is missing.
    """
    unet_targets, text_targets = target_modules(train)
    models = [("UNet", pipeline.unet, unet_targets, isinstance(train.target_modules, list))]
    if train.text_encoder_lora:
        for encoder in _text_encoders(pipeline):
            models.append(("text encoder", encoder, text_targets, False))
    smallest: tuple[int, str] | None = None
    for label, model, targets, explicit in models:
        matched = 0
        for target in targets:
            layers = _targeted_layers(model, target)
            if not layers and explicit:
                raise ConfigError(
                    f"train.target_modules: {target!r} matches no Linear/Conv2d layer of the "
                    f"{label}"
                )
            matched += len(layers)
            for name, module in layers:
                if smallest is None or _layer_size(module) < smallest[0]:
                    smallest = (_layer_size(module), name)
        if not matched:
            raise ConfigError(f"train.target_modules: nothing in the {label} matches {targets}")
    assert smallest is not None
    for candidate in train.candidates:
        if candidate.rank > smallest[0]:
            raise ConfigError(
                f"train.candidates[{candidate.name}].rank: {candidate.rank} is larger than the "
                f"targeted layer {smallest[1]} ({smallest[0]} features): at most {smallest[0]}"
            )
    if resolution is not None:
        multiple = size_multiple(pipeline)
        if resolution % multiple:
            raise ConfigError(
                f"model.resolution: {resolution} is not a multiple of {multiple} (the VAE and "
                "UNet down-sample by that much)"
            )
    if train.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise ConfigError("train.mixed_precision: fp16 needs a CUDA GPU; use bf16 or no on CPU")
    if train.optimizer == "adamw8bit":
        try:
            import bitsandbytes  # noqa: F401
        except ImportError as error:
            raise ConfigError(f"train.optimizer: adamw8bit needs bitsandbytes ({error})") from None
    if train.lr_warmup_steps > train.max_steps:
        raise ConfigError(
            f"train.lr_warmup_steps: {train.lr_warmup_steps} is more than train.max_steps "
            f"({train.max_steps})"
        )


def size_multiple(pipeline: Any) -> int:
    """Image sides must be a multiple of this: the VAE's factor times the UNet's down-sampling."""
    return pipeline.vae_scale_factor * 2 ** (len(pipeline.unet.config.block_out_channels) - 1)


# --- data: buckets, order, captions -------------------------------------------------------------


@dataclass(frozen=True)
class Item:
    """One training image as it is encoded: the crop box and the size it is resized to."""

    path: str
    sha256: str
    caption: str
    size: tuple[int, int]  # (width, height) after resize and crop
    original: tuple[int, int]  # (height, width) of the source image, SDXL's micro-conditioning
    crop: tuple[int, int]  # (top, left) in the resized image, SDXL's micro-conditioning


def bucket_sizes(resolution: int, multiple: int, max_aspect: float) -> list[tuple[int, int]]:
    """kohya-style buckets: about resolution**2 pixels, sides multiples of `multiple`."""
    area = resolution * resolution
    sizes = set()
    width = multiple
    while width <= resolution * max_aspect:
        height = max(multiple, (area // width) // multiple * multiple)
        if max(width, height) / min(width, height) <= max_aspect:
            sizes.add((width, height))
        width += multiple
    sizes.add((resolution, resolution))
    return sorted(sizes)


def plan_items(
    rows: pd.DataFrame, resolution: int, train: TrainConfig, multiple: int
) -> list[Item]:
    """Assign each image its size (its bucket, or the square) and its centre crop."""
    buckets = (
        bucket_sizes(resolution, multiple, train.buckets.max_aspect)
        if train.buckets.enabled
        else [(resolution, resolution)]
    )
    items = []
    for path, caption in zip(rows["image_path"], rows["caption"], strict=True):
        with Image.open(path) as image:
            width, height = image.size
        aspect = width / height
        size = min(buckets, key=lambda b: (abs(np.log(b[0] / b[1]) - np.log(aspect)), b))
        scale = max(size[0] / width, size[1] / height)
        resized = (round(width * scale), round(height * scale))
        crop = ((resized[1] - size[1]) // 2, (resized[0] - size[0]) // 2)
        items.append(Item(str(path), sha256_file(path), str(caption), size, (height, width), crop))
    return items


def load_pixels(item: Item) -> torch.Tensor:
    """The image resized to cover its size, centre-cropped, as a (3, h, w) tensor in [-1, 1]."""
    with Image.open(item.path) as image:
        image = image.convert("RGB")
        width, height = image.size
        scale = max(item.size[0] / width, item.size[1] / height)
        resized = image.resize(
            (round(width * scale), round(height * scale)), Image.Resampling.BILINEAR
        )
        top, left = item.crop
        cropped = resized.crop((left, top, left + item.size[0], top + item.size[1]))
    array = np.asarray(cropped, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


class DataOrder:
    """Endless batches of item indices, every batch from one bucket.

    Each epoch shuffles the images with the order generator, groups them by bucket into batches
    and shuffles the batches. Its state (generator, epoch plan, position) is saved with every
    checkpoint, so a resumed run draws exactly the batches the uninterrupted one would have.
    """

    def __init__(self, items: list[Item], batch_size: int, generator: torch.Generator) -> None:
        self.buckets = [item.size for item in items]
        self.batch_size = batch_size
        self.generator = generator
        self.epoch = 0
        self.plan: list[list[int]] = []
        self.position = 0

    def _plan_epoch(self) -> list[list[int]]:
        order = torch.randperm(len(self.buckets), generator=self.generator).tolist()
        groups: dict[tuple[int, int], list[int]] = {}
        for index in order:
            groups.setdefault(self.buckets[index], []).append(index)
        batches = [
            group[start : start + self.batch_size]
            for _, group in sorted(groups.items())
            for start in range(0, len(group), self.batch_size)
        ]
        shuffle = torch.randperm(len(batches), generator=self.generator).tolist()
        return [batches[index] for index in shuffle]

    def next(self) -> list[int]:
        if self.position >= len(self.plan):
            self.plan = self._plan_epoch()
            self.position = 0
            self.epoch += 1
        batch = self.plan[self.position]
        self.position += 1
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "plan": self.plan, "position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.plan, self.position = state["epoch"], state["plan"], state["position"]


def augment_caption(caption: str, train: TrainConfig, generator: torch.Generator) -> str:
    """kohya's caption shuffle (the first `keep_tokens` tags stay put) and caption dropout."""
    if (
        train.caption.dropout > 0
        and float(torch.rand((), generator=generator)) < train.caption.dropout
    ):
        return ""
    if train.caption.shuffle:
        tags = [tag.strip() for tag in caption.split(",") if tag.strip()]
        kept, rest = tags[: train.caption.keep_tokens], tags[train.caption.keep_tokens :]
        order = torch.randperm(len(rest), generator=generator).tolist()
        caption = ", ".join(kept + [rest[index] for index in order])
    return caption


# --- the model pieces ---------------------------------------------------------------------------


def _text_encoders(pipeline: Any) -> list[torch.nn.Module]:
    encoders = [pipeline.text_encoder]
    if getattr(pipeline, "text_encoder_2", None) is not None:
        encoders.append(pipeline.text_encoder_2)
    return encoders


def _tokenizers(pipeline: Any) -> list[Any]:
    tokenizers = [pipeline.tokenizer]
    if getattr(pipeline, "tokenizer_2", None) is not None:
        tokenizers.append(pipeline.tokenizer_2)
    return tokenizers


def encode_captions(pipeline: Any, family: str, captions: list[str]) -> dict[str, torch.Tensor]:
    """Text conditioning as the pipelines compute it: SD1.5's last hidden state; SDXL's two
    penultimate hidden states side by side plus text_encoder_2's pooled projection.

    One caption at a time, so a batch gives the very bits the cache holds per caption.
    """
    device = pipeline.unet.device
    states, pooled = [], []
    for caption in captions:
        parts = []
        for tokenizer, encoder in zip(_tokenizers(pipeline), _text_encoders(pipeline), strict=True):
            ids = tokenizer(
                [caption],
                padding="max_length",
                max_length=tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids.to(device)
            if family == "sd15":
                parts.append(encoder(ids)[0])
            else:
                output = encoder(ids, output_hidden_states=True)
                parts.append(output.hidden_states[-2])
                last_pooled = output[0]  # text_encoder_2's text_embeds (the last encoder's)
        states.append(torch.cat(parts, dim=-1))
        if family == "sdxl":
            pooled.append(last_pooled)
    encoded = {"states": torch.cat(states)}
    if family == "sdxl":
        encoded["pooled"] = torch.cat(pooled)
    return encoded


def sdxl_time_ids(items: list[Item]) -> torch.Tensor:
    """SDXL's micro-conditioning per image: original size, crop corner, target size."""
    return torch.tensor(
        [[*item.original, *item.crop, item.size[1], item.size[0]] for item in items],
        dtype=torch.float32,
    )


def attach_lora(
    pipeline: Any, candidate: CandidateConfig, train: TrainConfig, seed: int
) -> dict[str, Any]:
    """Add the peft LoRA adapters (UNet, and the text encoders when asked).

    Their gaussian init draws from a seeded private RNG. Returns each component's LoraConfig.
    """
    from peft import LoraConfig

    unet_targets, text_targets = target_modules(train)
    components = {"unet": (pipeline.unet, unet_targets)}
    if train.text_encoder_lora:
        for name, encoder in zip(TEXT_COMPONENTS, _text_encoders(pipeline), strict=False):
            components[name] = (encoder, text_targets)
    configs = {}
    for name, (model, targets) in components.items():
        config = LoraConfig(
            r=candidate.rank,
            lora_alpha=candidate.alpha,
            lora_dropout=train.lora_dropout,
            init_lora_weights="gaussian",
            target_modules=list(targets),
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(seed, candidate.name, "lora_init", name))
            model.add_adapter(config)
        configs[name] = config
    return configs


def adapter_state(pipeline: Any, components: list[str]) -> dict[str, dict[str, torch.Tensor]]:
    """Each trained component's LoRA weights, with peft's keys (no adapter name)."""
    from peft.utils import get_peft_model_state_dict

    return {
        name: {
            key: value.detach().cpu()
            for key, value in get_peft_model_state_dict(getattr(pipeline, name)).items()
        }
        for name in components
    }


def load_adapter_state(pipeline: Any, flat: dict[str, torch.Tensor]) -> None:
    """Copy saved LoRA weights (`<component>.<peft key>`) into the live adapters, exactly."""
    for key, value in flat.items():
        component, _, peft_key = key.partition(".")
        model = getattr(pipeline, component)
        module_path, _, parameter = peft_key.rpartition(".")  # ...lora_A.weight
        target = model.get_submodule(module_path + ".default")
        with torch.no_grad():
            getattr(target, parameter).copy_(value)


def build_optimizer(parameters: list[dict[str, Any]], train: TrainConfig) -> torch.optim.Optimizer:
    if train.optimizer == "adamw8bit":
        import bitsandbytes

        return bitsandbytes.optim.AdamW8bit(parameters, weight_decay=train.weight_decay)
    return torch.optim.AdamW(parameters, weight_decay=train.weight_decay)


def peak_memory_mb() -> float:
    """Peak GPU memory allocated, or the process's peak resident memory on CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# --- the loss, validation and samples -----------------------------------------------------------


def diffusion_loss(
    unet: torch.nn.Module,
    noise_scheduler: Any,
    latents: torch.Tensor,
    text: dict[str, torch.Tensor],
    time_ids: torch.Tensor | None,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    min_snr_gamma: float | None,
) -> torch.Tensor:
    """The noise-prediction (or v-prediction) MSE, per-sample weighted by min-SNR when asked."""
    noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
    prediction_type = noise_scheduler.config.prediction_type
    target = (
        noise_scheduler.get_velocity(latents, noise, timesteps)
        if prediction_type == "v_prediction"
        else noise
    )
    extra = {}
    if time_ids is not None:
        extra["added_cond_kwargs"] = {"text_embeds": text["pooled"], "time_ids": time_ids}
    prediction = unet(noisy_latents, timesteps, text["states"], **extra).sample
    if min_snr_gamma is None:
        return F.mse_loss(prediction.float(), target.float(), reduction="mean")
    from diffusers.training_utils import compute_snr

    snr = compute_snr(noise_scheduler, timesteps)
    clipped = torch.minimum(snr, torch.full_like(snr, min_snr_gamma))
    weights = clipped / (snr + 1) if prediction_type == "v_prediction" else clipped / snr
    per_sample = F.mse_loss(prediction.float(), target.float(), reduction="none")
    per_sample = per_sample.mean(dim=list(range(1, per_sample.ndim)))
    return (per_sample * weights).mean()


@dataclass
class Encoded:
    """An item's cached encodings: latent posterior parameters and (optionally) text."""

    latent_parameters: torch.Tensor
    text: dict[str, torch.Tensor] | None


def validation_loss(
    unet: torch.nn.Module,
    noise_scheduler: Any,
    items: list[Item],
    encoded: list[Encoded],
    scaling_factor: float,
    family: str,
    seed: int,
) -> float:
    """Mean noise-prediction MSE on the val split at fixed timesteps and fixed noise.

    The noise comes from a generator re-seeded on every call and shared by all candidates, and
    the latents are the posterior means: every checkpoint of every candidate is measured on
    exactly the same problem, so the numbers compare (and rise when a LoRA over-fits).
    """
    generator = torch.Generator("cpu").manual_seed(derive_seed(seed, "validation"))
    device = unet.device
    was_training = unet.training
    unet.eval()
    # One batch per bucket (images of one size), in a fixed order.
    groups: dict[tuple[int, int], list[int]] = {}
    for index, item in enumerate(items):
        groups.setdefault(item.size, []).append(index)
    losses, counts = [], []
    with torch.no_grad():
        for _, members in sorted(groups.items()):
            means = [encoded[i].latent_parameters.chunk(2, dim=0)[0] for i in members]
            latents = torch.stack(means).to(device) * scaling_factor
            time_ids = (
                sdxl_time_ids([items[i] for i in members]).to(device) if family == "sdxl" else None
            )
            text = {
                key: torch.cat([encoded[i].text[key] for i in members]).to(device)
                for key in encoded[members[0]].text
            }
            for timestep in VALIDATION_TIMESTEPS:
                noise = torch.randn(latents.shape, generator=generator).to(device)
                timesteps = torch.full((len(members),), timestep, dtype=torch.long, device=device)
                loss = diffusion_loss(
                    unet, noise_scheduler, latents, text, time_ids, noise, timesteps, None
                )
                losses.append(float(loss) * len(members))
                counts.append(len(members))
    unet.train(was_training)
    return float(sum(losses) / sum(counts))


def render_samples(
    pipeline: Any,
    train: TrainConfig,
    resolution: int,
    seed: int,
    trigger: str | None,
    out_dir: Path,
    stand_in: bool,
) -> None:
    """Sample images from the fixed prompts and seeds (the same for every step and candidate)."""
    with atomic_path(out_dir) as temp:
        temp.mkdir(parents=True)
        for prompt_index, template in enumerate(train.validation.sample_prompts):
            prompt = template.replace("{trigger}", trigger or "")
            for sample_seed in train.validation.sample_seeds:
                generator = torch.Generator("cpu").manual_seed(
                    derive_seed(seed, "train_sample", prompt_index, sample_seed)
                )
                with torch.no_grad():
                    image = pipeline(
                        prompt,
                        num_inference_steps=train.validation.sample_steps,
                        guidance_scale=train.validation.sample_guidance_scale,
                        generator=generator,
                        height=resolution,
                        width=resolution,
                    ).images[0]
                info = PngInfo()
                info.add_text("parameters", f"{prompt}\nSeed: {sample_seed}")
                # Anything a stand-in model drew says so, in the file itself.
                info.add_text("charaforge.stand_in", str(stand_in).lower())
                write_png(temp / f"p{prompt_index}-s{sample_seed}.png", image, pnginfo=info)


# --- the loop -----------------------------------------------------------------------------------


@dataclass
class RunContext:
    """What a run's files record about where they came from (provenance)."""

    trigger: str | None = None
    git_commit: str = "unknown"


def _generator(seed: int, candidate: CandidateConfig, purpose: str) -> torch.Generator:
    # CPU generators: the same draws whatever device the model runs on.
    return torch.Generator("cpu").manual_seed(derive_seed(seed, candidate.name, purpose))


def data_fingerprint(items: list[Item], val_items: list[Item]) -> str:
    payload = [[item.sha256, item.caption, list(item.size)] for item in items]
    payload += [["val", item.sha256, item.caption, list(item.size)] for item in val_items]
    return config_hash({"items": payload})


def model_fingerprint(base_dir: str | Path) -> str:
    location = pipeline_location(base_dir)
    parts = sorted(p.name for p in location.iterdir() if p.is_dir())
    return config_hash({part: component_fingerprint(location / part) for part in parts})


def run_fingerprint(
    candidate: CandidateConfig,
    train: TrainConfig,
    resolution: int,
    seed: int,
    data: str,
    model: str,
) -> str:
    """What a saved state must match to be resumed: everything that changes the numbers (the
    caches and the resume switch do not)."""
    return config_hash(
        {**_result_settings(candidate, train, resolution, seed), "data": data, "model": model}
    )


def _result_settings(
    candidate: CandidateConfig, train: TrainConfig, resolution: int, seed: int
) -> dict[str, Any]:
    # The configuration that decides the numbers: not where caches and states live, not the
    # resume switch, not the other candidates.
    settings = train.model_dump(mode="json", exclude={"candidates", "resume", "state_dir", "cache"})
    return {
        "candidate": candidate.model_dump(mode="json"),
        "train": settings,
        "resolution": resolution,
        "seed": seed,
    }


@dataclass
class Run:
    """One candidate's run: its settings, the base model's info and where its files go."""

    candidate: CandidateConfig
    train: TrainConfig
    resolution: int
    seed: int
    out_dir: Path
    state_dir: Path
    context: RunContext
    info: Any  # the base model's BaseInfo (family, display name, stand-in)

    @property
    def family(self) -> str:
        return self.info.family


@dataclass
class Models:
    """The frozen base model, the training noise scheduler and the accelerator."""

    pipeline: Any
    text_encoders: list[torch.nn.Module]
    noise_scheduler: Any
    accelerator: Any
    device: torch.device

    @property
    def vae(self) -> torch.nn.Module:
        return self.pipeline.vae

    @property
    def unet(self) -> torch.nn.Module:
        return self.pipeline.unet


@dataclass
class Adapters:
    """The attached LoRA adapters: each component's LoraConfig and the trained parameters."""

    configs: dict[str, Any]
    unet_parameters: list[torch.nn.Parameter]
    text_parameters: list[torch.nn.Parameter]

    @property
    def components(self) -> list[str]:
        return list(self.configs)


@dataclass
class Prepared:
    """What trains, after accelerate: the plain modules (which the pipeline keeps for
    validation, samples and export) and their wrapped twins, optimizer and scheduler."""

    trained_models: list[torch.nn.Module]
    wrapped_models: list[torch.nn.Module]
    optimizer: Any
    lr_scheduler: Any


@dataclass
class LoopState:
    """Everything a saved state restores: the RNGs, the data order and the record so far."""

    generators: dict[str, torch.Generator]
    order: DataOrder
    history: list[dict[str, Any]] = field(default_factory=list)
    val_losses: list[float] = field(default_factory=list)
    initial_val_loss: float | None = None
    start: int = 0  # the step the loop continues after (0: a fresh start)


class CachedEncoder:
    """VAE latent posteriors and text conditioning, through the caches (see caches.py)."""

    def __init__(self, models: Models, base_dir: str | Path, run: Run) -> None:
        self.models = models
        self.family = run.family
        location = pipeline_location(base_dir)
        cache = run.train.cache
        self.latent_cache = TensorCache(cache.dir if cache.latents else None, "latents")
        self.text_cache = TensorCache(cache.dir if cache.text_encoder_outputs else None, "text")
        self.vae_fingerprint = component_fingerprint(location / "vae")
        self.text_fingerprint = config_hash(
            {
                name: component_fingerprint(location / name)
                for name in ("text_encoder", "text_encoder_2")
                if (location / name).is_dir()
            }
        )

    def latent(self, item: Item) -> torch.Tensor:
        """The posterior's parameters (mean and log-variance), not a sample."""
        key = cache_key("latent", item.sha256, self.vae_fingerprint, item.size, item.crop)
        vae = self.models.vae

        def compute() -> dict[str, torch.Tensor]:
            with torch.no_grad():
                pixels = load_pixels(item)[None].to(self.models.device, dtype=vae.dtype)
                return {"parameters": vae.encode(pixels).latent_dist.parameters[0].float()}

        return self.latent_cache.get_or_compute(key, compute)["parameters"]

    def text(self, caption: str) -> dict[str, torch.Tensor]:
        key = cache_key("text", self.family, caption, self.text_fingerprint)

        def compute() -> dict[str, torch.Tensor]:
            with torch.no_grad():
                return encode_captions(self.models.pipeline, self.family, [caption])

        return self.text_cache.get_or_compute(key, compute)

    def report(self) -> None:
        self.latent_cache.report()
        self.text_cache.report()


@dataclass
class TrainingData:
    """The planned train and val items and their (cached) encodings."""

    items: list[Item]
    val_items: list[Item]
    encoded: list[Encoded]
    val_encoded: list[Encoded]
    encoder: CachedEncoder


def run_validation(models: Models, data: TrainingData, run: Run) -> float:
    """The deterministic validation loss of the current weights (fixed timesteps and noise)."""
    return validation_loss(
        models.unet,
        models.noise_scheduler,
        data.val_items,
        data.val_encoded,
        models.vae.config.scaling_factor,
        run.family,
        run.seed,
    )


def load_frozen_models(base_dir: str | Path, run: Run) -> Models:
    """Load the base model and freeze it: only the LoRA matrices train.

    The configuration is checked against the loaded model before any work. On a GPU with mixed
    precision the frozen weights go to half precision (the VRAM saving); the SDXL VAE overflows
    in fp16, so it stays.
    """
    from accelerate import Accelerator
    from diffusers import DDPMScheduler

    train = run.train
    pipeline = load_base_pipeline(base_dir)
    vae, unet = pipeline.vae, pipeline.unet
    text_encoders = _text_encoders(pipeline)
    for module in (vae, unet, *text_encoders):
        module.requires_grad_(False)
    check_candidates(
        pipeline, train.model_copy(update={"candidates": [run.candidate]}), run.resolution
    )
    noise_scheduler = DDPMScheduler.from_config(pipeline.scheduler.config)
    _reset_accelerate_precision(train.mixed_precision)
    accelerator = Accelerator(
        mixed_precision=train.mixed_precision,
        gradient_accumulation_steps=train.gradient_accumulation_steps,
        cpu=not torch.cuda.is_available(),
    )
    device = accelerator.device
    if device.type == "cuda" and train.mixed_precision != "no":
        weight_dtype = torch.float16 if train.mixed_precision == "fp16" else torch.bfloat16
        unet.to(dtype=weight_dtype)
        for encoder in text_encoders:
            encoder.to(dtype=weight_dtype)
    return Models(pipeline, text_encoders, noise_scheduler, accelerator, device)


def attach_adapters(models: Models, run: Run) -> Adapters:
    """Attach the LoRA adapters; their parameters stay in float32 whatever the frozen weights
    are. Gradient checkpointing is switched on here when asked."""
    train = run.train
    lora_configs = attach_lora(models.pipeline, run.candidate, train, run.seed)
    unet_parameters = [p for p in models.unet.parameters() if p.requires_grad]
    text_parameters = [p for e in models.text_encoders for p in e.parameters() if p.requires_grad]
    for parameter in (*unet_parameters, *text_parameters):
        parameter.data = parameter.data.float()
    if train.gradient_checkpointing:
        models.unet.enable_gradient_checkpointing()
        if train.text_encoder_lora:
            for encoder in models.text_encoders:
                encoder.gradient_checkpointing_enable()
    return Adapters(lora_configs, unet_parameters, text_parameters)


def build_optimizer_and_scheduler(adapters: Adapters, run: Run) -> tuple[Any, Any]:
    """The optimizer (one parameter group per learning rate) and the learning-rate schedule."""
    from diffusers.optimization import get_scheduler

    candidate, train = run.candidate, run.train
    groups = [{"params": adapters.unet_parameters, "lr": candidate.learning_rate}]
    if adapters.text_parameters:
        text_lr = candidate.text_encoder_learning_rate
        groups.append(
            {
                "params": adapters.text_parameters,
                "lr": candidate.learning_rate if text_lr is None else text_lr,
            }
        )
    optimizer = build_optimizer(groups, train)
    lr_scheduler = get_scheduler(
        train.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=train.lr_warmup_steps,
        num_training_steps=train.max_steps,
    )
    return optimizer, lr_scheduler


def build_data(
    models: Models,
    base_dir: str | Path,
    rows: pd.DataFrame,
    val_rows: pd.DataFrame,
    run: Run,
) -> TrainingData:
    """Sizes (buckets) and crops once; latents and text through the caches.

    Train items are encoded up front only for what is cached; validation always uses the
    caches' functions (never augmented captions).
    """
    train = run.train
    multiple = size_multiple(models.pipeline)
    items = plan_items(rows, run.resolution, train, multiple)
    val_items = plan_items(val_rows, run.resolution, train, multiple) if len(val_rows) else []
    encoder = CachedEncoder(models, base_dir, run)
    encoded = [
        Encoded(
            encoder.latent(item) if train.cache.latents else torch.empty(0),
            encoder.text(item.caption) if train.cache.text_encoder_outputs else None,
        )
        for item in items
    ]
    val_encoded = [Encoded(encoder.latent(item), encoder.text(item.caption)) for item in val_items]
    encoder.report()
    return TrainingData(items, val_items, encoded, val_encoded, encoder)


def prepare_with_accelerate(
    models: Models, run: Run, optimizer: Any, lr_scheduler: Any
) -> Prepared:
    """accelerate wraps what trains (DDP across processes, autocast)."""
    text_encoders = models.text_encoders if run.train.text_encoder_lora else []
    trained_models = [models.unet, *text_encoders]
    *wrapped_models, optimizer, lr_scheduler = models.accelerator.prepare(
        *trained_models, optimizer, lr_scheduler
    )
    return Prepared(trained_models, wrapped_models, optimizer, lr_scheduler)


def new_loop_state(run: Run, items: list[Item]) -> LoopState:
    """The trainer's own generators, seeded from the seed and the candidate's name, and the
    data order drawing from the first of them. Created in this order, always."""
    generators = {
        "order": _generator(run.seed, run.candidate, "batches"),
        "noise": _generator(run.seed, run.candidate, "noise"),
        "captions": _generator(run.seed, run.candidate, "captions"),
    }
    order = DataOrder(items, run.train.batch_size, generators["order"])
    return LoopState(generators, order)


def restore_or_init(
    run: Run,
    fingerprint: str,
    models: Models,
    data: TrainingData,
    prepared: Prepared,
    loop: LoopState,
) -> None:
    """Resume from the latest state of this very run, or start afresh from seeded RNGs.

    A fresh start measures the initial validation loss first, then seeds python's, numpy's and
    torch's global RNGs (peft's dropout draws from torch's); a resumed run restores them all.
    """
    train, state_dir, candidate = run.train, run.state_dir, run.candidate
    latest = states.latest_state(state_dir, fingerprint) if train.resume else None
    if not train.resume and state_dir.exists():
        import shutil

        shutil.rmtree(state_dir)
    states.clean_stale_temporaries(state_dir)
    if latest is not None:
        loop.start = latest.step
        load_adapter_state(models.pipeline, states.load_adapter(latest.folder))
        training = states.load_training(latest.folder)
        prepared.optimizer.load_state_dict(training["optimizer"])
        prepared.lr_scheduler.load_state_dict(training["lr_scheduler"])
        loop.order.load_state_dict(training["order"])
        states.restore_rng(training["rng"], loop.generators)
        loop.history = latest.progress["history"]
        loop.val_losses = latest.progress["val_losses"]
        loop.initial_val_loss = latest.progress["initial_val_loss"]
        log.info("%s: resuming from step %d (%s)", candidate.name, loop.start, latest.folder)
    else:
        if data.val_items:
            loop.initial_val_loss = run_validation(models, data, run)
        random.seed(derive_seed(run.seed, candidate.name, "python"))
        np.random.seed(derive_seed(run.seed, candidate.name, "numpy") % 2**32)
        torch.manual_seed(derive_seed(run.seed, candidate.name, "torch"))


@dataclass
class Exporter:
    """Writes a checkpoint's LoRA files (both formats) and its samples into out_dir."""

    run: Run
    adapters: Adapters
    items: list[Item]
    config_digest: str
    data_digest: str

    def export(
        self, step: int, peft_states: dict[str, dict[str, torch.Tensor]], samples: Path | None
    ) -> None:
        run, out_dir = self.run, self.run.out_dir
        metadata = _export_metadata(
            run.candidate,
            run.train,
            step,
            run.context,
            run.info,
            self.items,
            self.config_digest,
            self.data_digest,
        )
        lora = LoraExport(
            family=run.family,
            name=run.candidate.name,
            step=step,
            rank=run.candidate.rank,
            alpha=run.candidate.alpha,
            configs={
                name: self.adapters.configs[name].to_dict() for name in self.adapters.components
            },
            metadata=metadata,
        )
        with atomic_path(out_dir / f"checkpoint-{step}") as temp:
            temp.mkdir(parents=True)
            write_lora_files(temp, lora, peft_states, run.resolution)
        if (
            samples is not None
            and samples.is_dir()
            and not (out_dir / "samples" / samples.name).exists()
        ):
            with atomic_path(out_dir / "samples" / samples.name) as temp:
                import shutil

                shutil.copytree(samples, temp)

    def rewrite_missing(self, start: int) -> None:
        """A resumed run whose earlier exports were removed (DVC clears outputs) writes them
        again from the saved states."""
        for saved in states.saved_states(self.run.state_dir):
            if saved.step <= start and not checkpoint_path(self.run.out_dir, saved.step).is_file():
                flat = states.load_adapter(saved.folder)
                self.export(saved.step, _split_components(flat), saved.folder / states.SAMPLES_DIR)


def noisy_inputs(
    batch: list[int],
    data: TrainingData,
    models: Models,
    train: TrainConfig,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Latents (a fresh sample from each image's cached posterior), noise and timesteps.

    Every draw comes from the noise generator in this order: latent sample, noise, offset
    noise, timesteps. Reordering them changes every number after.
    """
    device = models.device
    parameters = torch.stack(
        [
            data.encoded[i].latent_parameters
            if train.cache.latents
            else data.encoder.latent(data.items[i])
            for i in batch
        ]
    )
    mean, logvar = parameters.chunk(2, dim=1)
    std = torch.exp(0.5 * torch.clamp(logvar, -30.0, 20.0))
    sample = mean + std * torch.randn(mean.shape, generator=generator)
    latents = (sample * models.vae.config.scaling_factor).to(device)
    noise = torch.randn(latents.shape, generator=generator)
    if train.noise_offset:
        # Offset noise (Guttenberg 2023): lets the model learn overall brightness.
        noise = noise + train.noise_offset * torch.randn(
            (*latents.shape[:2], 1, 1), generator=generator
        )
    noise = noise.to(device)
    timesteps = torch.randint(
        0,
        models.noise_scheduler.config.num_train_timesteps,
        (len(batch),),
        generator=generator,
    ).to(device)
    return latents, noise, timesteps


def batch_text(
    batch: list[int],
    data: TrainingData,
    models: Models,
    run: Run,
    generator: torch.Generator,
) -> dict[str, torch.Tensor]:
    """The batch's text conditioning: from the cache, or its augmented captions encoded now
    (with gradients only when the text encoders train)."""
    train = run.train
    if train.cache.text_encoder_outputs:
        return {
            key: torch.cat([data.encoded[i].text[key] for i in batch]).to(models.device)
            for key in data.encoded[batch[0]].text
        }
    captions = [augment_caption(data.items[i].caption, train, generator) for i in batch]
    grad = contextlib.nullcontext() if train.text_encoder_lora else torch.no_grad()
    with grad:
        return encode_captions(models.pipeline, run.family, captions)


def training_step(
    run: Run,
    models: Models,
    adapters: Adapters,
    data: TrainingData,
    prepared: Prepared,
    loop: LoopState,
) -> tuple[float, float]:
    """One optimizer step over `gradient_accumulation_steps` batches.

    Returns the mean loss and the gradient norm (NaN if the gradients never synced).
    """
    train, accelerator = run.train, models.accelerator
    step_loss, grad_norm = 0.0, float("nan")
    for _ in range(train.gradient_accumulation_steps):
        batch = loop.order.next()
        batch_items = [data.items[index] for index in batch]
        latents, noise, timesteps = noisy_inputs(
            batch, data, models, train, loop.generators["noise"]
        )
        with accelerator.accumulate(*prepared.wrapped_models), accelerator.autocast():
            text = batch_text(batch, data, models, run, loop.generators["captions"])
            time_ids = (
                sdxl_time_ids(batch_items).to(models.device) if run.family == "sdxl" else None
            )
            loss = diffusion_loss(
                prepared.wrapped_models[0],
                models.noise_scheduler,
                latents,
                text,
                time_ids,
                noise,
                timesteps,
                train.min_snr_gamma,
            )
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                all_parameters = [*adapters.unet_parameters, *adapters.text_parameters]
                grad_norm = float(accelerator.clip_grad_norm_(all_parameters, train.max_grad_norm))
            prepared.optimizer.step()
            prepared.lr_scheduler.step()
            prepared.optimizer.zero_grad(set_to_none=True)
        step_loss += float(loss.detach()) / train.gradient_accumulation_steps
    return step_loss, grad_norm


def record_step(
    step: int,
    step_loss: float,
    grad_norm: float,
    is_checkpoint: bool,
    run: Run,
    models: Models,
    data: TrainingData,
    prepared: Prepared,
    loop: LoopState,
) -> dict[str, Any]:
    """The step's metrics (validation loss at checkpoints and every `validation.every` steps),
    appended to the history; returns them."""
    val_every = run.train.validation.every
    metrics: dict[str, Any] = {
        "loss": step_loss,
        "learning_rate": prepared.lr_scheduler.get_last_lr()[0],
        "grad_norm": grad_norm,
    }
    if data.val_items and (is_checkpoint or (val_every and step % val_every == 0)):
        metrics["val_loss"] = run_validation(models, data, run)
        if is_checkpoint:
            loop.val_losses.append(metrics["val_loss"])
    loop.history.append({"step": step, **metrics})
    return metrics


def save_checkpoint(
    step: int,
    step_loss: float,
    fingerprint: str,
    run: Run,
    models: Models,
    adapters: Adapters,
    prepared: Prepared,
    loop: LoopState,
    exporter: Exporter,
) -> None:
    """Render the samples, export the LoRA in both formats, then save the full training state
    (adapter, optimizer, scheduler, data order, every RNG, history) for resuming."""
    train = run.train
    samples = None
    if train.validation.sample_prompts:
        samples = run.out_dir / "samples" / f"step-{step:06d}"
        for model in prepared.trained_models:
            model.eval()
        render_samples(
            models.pipeline,
            train,
            run.resolution,
            run.seed,
            run.context.trigger,
            samples,
            run.info.stand_in,
        )
        for model in prepared.trained_models:
            model.train()
    peft_states = adapter_state(models.pipeline, adapters.components)
    exporter.export(step, peft_states, samples)
    training = {
        "optimizer": prepared.optimizer.state_dict(),
        "lr_scheduler": prepared.lr_scheduler.state_dict(),
        "order": loop.order.state_dict(),
        "rng": states.capture_rng(loop.generators),
    }
    flat = {
        f"{name}.{key}": value
        for name, state in peft_states.items()
        for key, value in state.items()
    }
    progress_payload = {
        "initial_val_loss": loop.initial_val_loss,
        "fingerprint": fingerprint,
        "history": loop.history,
        "val_losses": loop.val_losses,
    }
    states.save_state(run.state_dir, step, flat, training, progress_payload, samples)
    log.info("%s: saved checkpoint-%d (loss %.4f)", run.candidate.name, step, step_loss)


def finish(
    run: Run, loop: LoopState, data: TrainingData, saves: set[int], started: float
) -> TrainResult:
    """Write history.csv and sum the run up."""
    candidate = run.candidate
    frame = pd.DataFrame(loop.history, columns=HISTORY_COLUMNS)
    write_csv(run.out_dir / "history.csv", frame)
    return TrainResult(
        name=candidate.name,
        rank=candidate.rank,
        alpha=candidate.alpha,
        learning_rate=candidate.learning_rate,
        checkpoints=sorted(saves),
        final_loss=float(loop.history[-1]["loss"]),
        val_loss=loop.val_losses if data.val_items else None,
        initial_val_loss=loop.initial_val_loss,
        seconds=time.perf_counter() - started,
        resumed_from=loop.start,
        history=frame,
    )


def train_candidate(
    base_dir: str | Path,
    dataset_dir: str | Path,
    candidate: CandidateConfig,
    train: TrainConfig,
    resolution: int,
    seed: int,
    out_dir: str | Path,
    on_step: StepCallback | None = None,
    trigger: str | None = None,
    state_dir: str | Path | None = None,
    context: RunContext | None = None,
) -> TrainResult:
    """Train one LoRA candidate; write checkpoint-<step>/, samples/ and history.csv to out_dir.

    `state_dir` (default: `<train.state_dir>/<candidate>`) receives the full training state
    every checkpoint; with `train.resume` the run continues from the latest one of the same
    configuration and data. `trigger` labels the kohya file and fills `{trigger}` in sample
    prompts; captions already hold it.
    """
    started = time.perf_counter()
    run = Run(
        candidate=candidate,
        train=train,
        resolution=resolution,
        seed=seed,
        out_dir=Path(out_dir),
        state_dir=Path(state_dir) if state_dir else Path(train.state_dir) / candidate.name,
        context=context or RunContext(trigger=trigger),
        info=read_base_info(base_dir),
    )
    rows, val_rows = read_split(dataset_dir), read_split(dataset_dir, "val")

    models = load_frozen_models(base_dir, run)
    adapters = attach_adapters(models, run)
    optimizer, lr_scheduler = build_optimizer_and_scheduler(adapters, run)
    data = build_data(models, base_dir, rows, val_rows, run)
    prepared = prepare_with_accelerate(models, run, optimizer, lr_scheduler)
    loop = new_loop_state(run, data.items)
    saves = set(checkpoint_steps(train))
    data_digest = data_fingerprint(data.items, data.val_items)
    fingerprint = run_fingerprint(
        candidate, train, resolution, seed, data_digest, model_fingerprint(base_dir)
    )
    config_digest = config_hash(_result_settings(candidate, train, resolution, seed))
    restore_or_init(run, fingerprint, models, data, prepared, loop)
    exporter = Exporter(run, adapters, data.items, config_digest, data_digest)
    exporter.rewrite_missing(loop.start)

    for model in prepared.trained_models:
        model.train()
    progress = tqdm(
        range(loop.start + 1, train.max_steps + 1),
        desc=f"train {candidate.name}",
        initial=loop.start,
        total=train.max_steps,
        leave=False,
    )
    for step in progress:
        step_started = time.perf_counter()
        step_loss, grad_norm = training_step(run, models, adapters, data, prepared, loop)
        states.kill_point("step", step)
        metrics = record_step(
            step, step_loss, grad_norm, step in saves, run, models, data, prepared, loop
        )
        progress.set_postfix(loss=f"{step_loss:.4f}", refresh=False)
        if on_step is not None:
            timing = {
                "step_seconds": time.perf_counter() - step_started,
                "memory_mb": peak_memory_mb(),
            }
            on_step(step, {**metrics, **timing})
        if step in saves:
            save_checkpoint(
                step, step_loss, fingerprint, run, models, adapters, prepared, loop, exporter
            )
    progress.close()
    return finish(run, loop, data, saves, started)


def _reset_accelerate_precision(mixed_precision: str) -> None:
    """accelerate keeps one process-wide state and refuses a second Accelerator with another
    precision; one process (tests, a notebook) may train several configurations in turn."""
    from accelerate.state import AcceleratorState

    state = AcceleratorState._shared_state
    if state and str(state.get("_mixed_precision", mixed_precision)) != mixed_precision:
        AcceleratorState._reset_state()


def _split_components(flat: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    split: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in flat.items():
        component, _, peft_key = key.partition(".")
        split.setdefault(component, {})[peft_key] = value
    return split


def _tag_frequency(items: list[Item]) -> dict[str, dict[str, int]]:
    counts: dict[str, int] = {}
    for item in items:
        for tag in (tag.strip() for tag in item.caption.split(",")):
            if tag:
                counts[tag] = counts.get(tag, 0) + 1
    return {"train": dict(sorted(counts.items()))}


def _export_metadata(
    candidate: CandidateConfig,
    train: TrainConfig,
    step: int,
    context: RunContext,
    info: Any,
    items: list[Item],
    config_digest: str,
    data_digest: str,
) -> dict[str, str]:
    """The kohya ss_* training keys, the trigger, and provenance (no run-dependent values: the
    files are DVC outputs and must be byte-identical across runs)."""
    import json

    text_lr = candidate.text_encoder_learning_rate
    text_lr = (candidate.learning_rate if text_lr is None else text_lr) * train.text_encoder_lora
    metadata = {
        "ss_learning_rate": f"{candidate.learning_rate:g}",
        "ss_unet_lr": f"{candidate.learning_rate:g}",
        "ss_text_encoder_lr": f"{text_lr:g}",
        "ss_network_train_unet_only": str(not train.text_encoder_lora),
        "ss_max_train_steps": str(train.max_steps),
        "ss_batch_size_per_device": str(train.batch_size),
        "ss_gradient_accumulation_steps": str(train.gradient_accumulation_steps),
        "ss_gradient_checkpointing": str(train.gradient_checkpointing),
        "ss_lr_scheduler": train.lr_scheduler,
        "ss_lr_warmup_steps": str(train.lr_warmup_steps),
        "ss_optimizer": "bitsandbytes.optim.AdamW8bit"
        if train.optimizer == "adamw8bit"
        else "torch.optim.AdamW",
        "ss_mixed_precision": train.mixed_precision,
        "ss_min_snr_gamma": "None" if train.min_snr_gamma is None else f"{train.min_snr_gamma:g}",
        "ss_noise_offset": f"{train.noise_offset:g}",
        "ss_network_dropout": f"{train.lora_dropout:g}",
        "ss_shuffle_caption": str(train.caption.shuffle),
        "ss_keep_tokens": str(train.caption.keep_tokens),
        "ss_caption_dropout_rate": f"{train.caption.dropout:g}",
        "ss_enable_bucket": str(train.buckets.enabled),
        "ss_cache_latents": str(train.cache.latents),
        "ss_num_train_images": str(len(items)),
        "ss_tag_frequency": json.dumps(_tag_frequency(items), sort_keys=True),
        "ss_network_args": json.dumps({"target_modules": json_ready(target_modules(train)[0])}),
        "ss_sd_model_name": info.display_name,
        "charaforge.stand_in": str(info.stand_in).lower(),
        "charaforge.git_commit": context.git_commit,
        "charaforge.config_hash": config_digest,
        "charaforge.data_hash": data_digest,
    }
    if context.trigger:
        metadata["modelspec.trigger_phrase"] = context.trigger
    return metadata


def train_all(
    base_dir: str | Path,
    dataset_dir: str | Path,
    train: TrainConfig,
    resolution: int,
    seed: int,
    out_dir: str | Path = "data/train",
    plots_dir: str | Path = "reports/plots/train_loss",
    on_step: Callable[[str, int, dict[str, float]], None] | None = None,
    trigger: str | None = None,
    state_dir: str | Path | None = None,
    context: RunContext | None = None,
) -> list[TrainResult]:
    """Train every candidate; write data/train/summary.json and the loss-curve plot files.

    Every check runs first, for all candidates, so a bad configuration fails before any work.
    """
    set_cpu_threads(train.cpu_threads)
    read_split(dataset_dir)
    info = read_base_info(base_dir)
    check_candidates(load_base_pipeline(base_dir), train, resolution)
    context = context or RunContext(trigger=trigger)
    state_root = Path(state_dir) if state_dir else Path(train.state_dir)

    results = []
    for candidate in train.candidates:
        callback = None
        if on_step is not None:
            callback = _bind(on_step, candidate.name)
        result = train_candidate(
            base_dir, dataset_dir, candidate, train, resolution, seed,
            Path(out_dir) / candidate.name, on_step=callback, trigger=trigger,
            state_dir=state_root / candidate.name, context=context,
        )  # fmt: skip
        log.info(
            "%s: %d steps in %.1f s, final loss %.4f",
            candidate.name, train.max_steps, result.seconds, result.final_loss,
        )  # fmt: skip
        write_csv(Path(plots_dir) / f"{candidate.name}.csv", result.history[["step", "loss"]])
        results.append(result)
    summary = {"candidates": [result.summary() for result in results], "stand_in": info.stand_in}
    write_json(Path(out_dir) / "summary.json", summary)
    return results


def _bind(on_step: Callable[[str, int, dict[str, float]], None], name: str) -> StepCallback:
    return lambda step, metrics: on_step(name, step, metrics)
