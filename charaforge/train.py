"""LoRA training for the UNet, in the shape of diffusers' train_text_to_image_lora example.

The loop reads top to bottom: load and freeze the base model, attach the LoRA adapter with peft,
build the data, then per step encode latents, draw noise and timesteps, predict the noise, take
the MSE and step. Checkpoints are saved through the pipeline's own `save_lora_weights`, so they
load anywhere diffusers LoRAs load. Every random draw comes from a torch.Generator seeded from
the global seed and the candidate name: the same params and data give the same bytes on CPU.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import transforms
from tqdm.auto import tqdm

from charaforge.config import CandidateConfig, ConfigError, TrainConfig
from charaforge.io import atomic_path, derive_seed, write_csv, write_json
from charaforge.models import load_base_pipeline, read_base_info

log = logging.getLogger(__name__)

LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
StepCallback = Callable[[int, dict[str, float]], None]


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
    seconds: float = 0.0
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
        }


@dataclass
class TrainingData:
    """The train split, preprocessed once: pixels in [-1, 1] and caption token ids."""

    pixels: torch.Tensor
    input_ids: torch.Tensor
    captions: list[str]


def checkpoint_steps(train: TrainConfig) -> list[int]:
    """Every `checkpoint_every` steps, and always the last step."""
    steps = list(range(train.checkpoint_every, train.max_steps + 1, train.checkpoint_every))
    return steps if steps and steps[-1] == train.max_steps else [*steps, train.max_steps]


def checkpoint_path(candidate_dir: str | Path, step: int) -> Path:
    return Path(candidate_dir) / f"checkpoint-{step}" / LORA_WEIGHTS


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


def _targeted_layers(unet: torch.nn.Module, target: str) -> list[tuple[str, torch.nn.Module]]:
    # The same rule peft applies to a list of target names: the full name or its dotted suffix.
    return [
        (name, module)
        for name, module in unet.named_modules()
        if (name == target or name.endswith("." + target))
        and isinstance(module, torch.nn.Linear | torch.nn.Conv2d)
    ]


def check_candidates(unet: torch.nn.Module, train: TrainConfig) -> None:
    """Fail before any training if a target matches nothing or a rank exceeds a layer's size."""
    smallest = None
    for target in train.target_modules:
        layers = _targeted_layers(unet, target)
        if not layers:
            raise ConfigError(
                f"train.target_modules: {target!r} matches no Linear/Conv2d layer of the UNet"
            )
        for name, module in layers:
            if isinstance(module, torch.nn.Linear):
                size = min(module.in_features, module.out_features)
            else:
                size = min(module.in_channels, module.out_channels)
            if smallest is None or size < smallest[0]:
                smallest = (size, name)
    assert smallest is not None
    for candidate in train.candidates:
        if candidate.rank > smallest[0]:
            raise ConfigError(
                f"train.candidates[{candidate.name}].rank: {candidate.rank} is larger than the "
                f"targeted layer {smallest[1]} ({smallest[0]} features): at most {smallest[0]}"
            )


# --- the pieces of the loop ---------------------------------------------------------------------


def build_training_data(rows: pd.DataFrame, tokenizer: Any, resolution: int) -> TrainingData:
    preprocess = transforms.Compose(
        [
            transforms.Resize(resolution, interpolation=transforms.InterpolationMode.BILINEAR),
            transforms.CenterCrop(resolution),
            transforms.ToTensor(),
            transforms.Normalize([0.5], [0.5]),
        ]
    )
    pixels = []
    for path in rows["image_path"]:
        with Image.open(path) as image:
            pixels.append(preprocess(image.convert("RGB")))
    captions = [str(caption) for caption in rows["caption"]]
    input_ids = tokenizer(
        captions,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids
    return TrainingData(pixels=torch.stack(pixels), input_ids=input_ids, captions=captions)


def batch_indices(size: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Endless batches: a fresh permutation per epoch, carried over between epochs."""
    pending = torch.empty(0, dtype=torch.long)
    while True:
        while len(pending) < batch_size:
            pending = torch.cat([pending, torch.randperm(size, generator=generator)])
        yield pending[:batch_size]
        pending = pending[batch_size:]


def attach_lora(unet: torch.nn.Module, candidate: CandidateConfig, train: TrainConfig, seed: int):
    """Add the peft LoRA adapter; its gaussian init draws from a seeded private RNG."""
    from peft import LoraConfig

    config = LoraConfig(
        r=candidate.rank,
        lora_alpha=candidate.alpha,
        init_lora_weights="gaussian",
        target_modules=list(train.target_modules),
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, candidate.name, "lora_init"))
        unet.add_adapter(config)
    return config


def _json_ready(value: Any) -> Any:
    # Sets (peft stores target_modules as one) would serialise in hash order: sort them.
    if isinstance(value, set | frozenset):
        return sorted(_json_ready(item) for item in value)
    if isinstance(value, dict):
        return {key: _json_ready(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_json_ready(item) for item in value]
    return value


def canonical_safetensors(data: bytes) -> bytes:
    """The same file with its JSON header's keys sorted.

    safetensors writes the `__metadata__` map in hash order, which changes from one process to
    the next; sorting the header keeps the bytes (and DVC hashes) stable. Tensor offsets are
    relative to the data section, so the data bytes stay as they are.
    """
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + length])
    encoded = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # safetensors aligns the data section to 8 bytes
    return len(encoded).to_bytes(8, "little") + encoded + data[8 + length :]


def save_safetensors(
    path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]
) -> None:
    import safetensors.torch

    data = safetensors.torch.save(tensors, metadata=metadata)
    path.write_bytes(canonical_safetensors(data))


def kohya_state_dict(unet: torch.nn.Module, alpha: float) -> dict[str, torch.Tensor]:
    """The adapter in kohya's layout (lora_unet_*.lora_down/.lora_up/.alpha) for A1111/ComfyUI.

    diffusers' converter writes alpha = rank whatever lora_alpha was (the effective scale would
    change), so each `.alpha` is set to the trained lora_alpha here.
    """
    from diffusers.utils import convert_state_dict_to_kohya
    from peft.utils import get_peft_model_state_dict

    peft_state = {f"unet.{k}": v for k, v in get_peft_model_state_dict(unet).items()}
    converted = convert_state_dict_to_kohya(peft_state)
    for key in [key for key in converted if key.endswith(".alpha")]:
        converted[key] = torch.tensor(float(alpha), dtype=torch.float32)
    return {key: value.contiguous() for key, value in converted.items()}


def kohya_metadata(
    candidate: CandidateConfig, step: int, resolution: int, trigger: str | None, stand_in: bool
) -> dict[str, str]:
    """The header keys A1111 and the kohya tools read (ss_*, modelspec.*)."""
    metadata = {
        "ss_base_model_version": "sd_v1",
        "ss_output_name": candidate.name,
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(candidate.rank),
        "ss_network_alpha": f"{candidate.alpha:g}",
        "ss_learning_rate": f"{candidate.learning_rate:g}",
        "ss_steps": str(step),
        "ss_resolution": f"({resolution}, {resolution})",
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": "stable-diffusion-v1/lora",
        "modelspec.implementation": "diffusers",
        "modelspec.title": f"{candidate.name}-{step}",
        "modelspec.resolution": f"{resolution}x{resolution}",
        "charaforge.stand_in": str(stand_in).lower(),
    }
    if trigger:
        metadata["modelspec.trigger_phrase"] = trigger
    return metadata


def kohya_file_name(candidate: str, step: int) -> str:
    return f"{candidate}-{step:06d}.safetensors"


def save_checkpoint(
    pipeline_class: Any,
    unet: torch.nn.Module,
    lora_config: Any,
    out_dir: Path,
    kohya: tuple[str, dict[str, str]],
) -> None:
    """checkpoint-<step>/: the diffusers LoRA (with its LoraConfig, so alpha loads back) and the
    same weights in kohya's layout (file name, metadata)."""
    from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    # What diffusers' default writer stores (the LoraConfig under "unet."), written by us only
    # to get deterministic bytes.
    config = _json_ready(lora_config.to_dict())
    packed = {f"{pipeline_class.unet_name}.{key}": value for key, value in config.items()}
    metadata = {
        "format": "pt",
        LORA_ADAPTER_METADATA_KEY: json.dumps(packed, indent=2, sort_keys=True),
    }

    def save_function(weights: dict[str, torch.Tensor], filename: str) -> None:
        save_safetensors(Path(filename), weights, metadata)

    kohya_name, kohya_header = kohya
    with atomic_path(out_dir) as temp:
        pipeline_class.save_lora_weights(temp, unet_lora_layers=layers, save_function=save_function)
        save_safetensors(
            temp / kohya_name, kohya_state_dict(unet, lora_config.lora_alpha), kohya_header
        )


VALIDATION_TIMESTEPS = (100, 300, 500, 700, 900)


def validation_loss(
    vae: Any,
    unet: torch.nn.Module,
    noise_scheduler: Any,
    data: TrainingData,
    text_states: torch.Tensor,
    seed: int,
) -> float:
    """Mean noise-prediction MSE on the val split at fixed timesteps.

    The noise comes from a generator re-seeded on every call and shared by all candidates, and
    the latents are the posterior means: every checkpoint of every candidate is measured on
    exactly the same problem, so the numbers compare (and rise when a LoRA over-fits).
    """
    generator = torch.Generator("cpu").manual_seed(derive_seed(seed, "validation"))
    device = text_states.device
    was_training = unet.training
    unet.eval()
    losses = []
    with torch.no_grad():
        latents = vae.encode(data.pixels.to(device)).latent_dist.mean * vae.config.scaling_factor
        for timestep in VALIDATION_TIMESTEPS:
            noise = torch.randn(latents.shape, generator=generator).to(device)
            timesteps = torch.full((len(latents),), timestep, dtype=torch.long, device=device)
            noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
            if noise_scheduler.config.prediction_type == "v_prediction":
                target = noise_scheduler.get_velocity(latents, noise, timesteps)
            else:
                target = noise
            prediction = unet(noisy_latents, timesteps, text_states).sample
            losses.append(F.mse_loss(prediction.float(), target.float()).item())
    unet.train(was_training)
    return float(sum(losses) / len(losses))


# --- the loop -----------------------------------------------------------------------------------


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
) -> TrainResult:
    """Train one LoRA candidate; write checkpoint-<step>/ and history.csv under out_dir.

    `trigger` only labels the kohya file (modelspec.trigger_phrase); captions already hold it.
    """
    from diffusers import DDPMScheduler

    out_dir = Path(out_dir)
    rows = read_split(dataset_dir)
    val_rows = read_split(dataset_dir, "val")
    info = read_base_info(base_dir)

    # Load the base model and freeze it: only the LoRA matrices train.
    pipeline = load_base_pipeline(base_dir)
    device = pipeline.device
    vae, text_encoder, unet = pipeline.vae, pipeline.text_encoder, pipeline.unet
    for module in (vae, text_encoder, unet):
        module.requires_grad_(False)
    check_candidates(unet, train.model_copy(update={"candidates": [candidate]}))
    noise_scheduler = DDPMScheduler.from_config(pipeline.scheduler.config)

    lora_config = attach_lora(unet, candidate, train, seed)
    lora_parameters = [parameter for parameter in unet.parameters() if parameter.requires_grad]
    optimizer = torch.optim.AdamW(lora_parameters, lr=candidate.learning_rate)

    # The data: pixels and captions once; the frozen text encoder's output never changes.
    data = build_training_data(rows, pipeline.tokenizer, resolution)
    val_data = (
        build_training_data(val_rows, pipeline.tokenizer, resolution) if len(val_rows) else None
    )
    with torch.no_grad():
        text_states = text_encoder(data.input_ids.to(device))[0]
        val_states = text_encoder(val_data.input_ids.to(device))[0] if val_data else None
    batches = batch_indices(
        len(data.pixels), train.batch_size, _generator(seed, candidate, "batches")
    )
    noise_generator = _generator(seed, candidate, "noise")

    saves = set(checkpoint_steps(train))
    history: list[dict[str, float]] = []
    val_losses: list[float] = []
    started = time.perf_counter()
    unet.train()
    progress = tqdm(range(1, train.max_steps + 1), desc=f"train {candidate.name}", leave=False)
    for step in progress:
        index = next(batches)
        pixels = data.pixels[index].to(device)
        with torch.no_grad():
            posterior = vae.encode(pixels).latent_dist
            latents = posterior.sample(generator=noise_generator) * vae.config.scaling_factor
        noise = torch.randn(latents.shape, generator=noise_generator).to(device)
        timesteps = torch.randint(
            0, noise_scheduler.config.num_train_timesteps, (len(index),), generator=noise_generator
        ).to(device)
        noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
        if noise_scheduler.config.prediction_type == "v_prediction":
            target = noise_scheduler.get_velocity(latents, noise, timesteps)
        else:
            target = noise

        prediction = unet(noisy_latents, timesteps, text_states[index.to(device)]).sample
        loss = F.mse_loss(prediction.float(), target.float(), reduction="mean")
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        metrics = {"loss": float(loss.detach()), "learning_rate": optimizer.param_groups[0]["lr"]}
        if step in saves and val_data is not None:
            metrics["val_loss"] = validation_loss(
                vae, unet, noise_scheduler, val_data, val_states, seed
            )
            val_losses.append(metrics["val_loss"])
        history.append({"step": step, **metrics})
        progress.set_postfix(loss=f"{metrics['loss']:.4f}", refresh=False)
        if on_step is not None:
            on_step(step, metrics)
        if step in saves:
            kohya = (
                kohya_file_name(candidate.name, step),
                kohya_metadata(candidate, step, resolution, trigger, info.stand_in),
            )
            save_checkpoint(
                type(pipeline), unet, lora_config, out_dir / f"checkpoint-{step}", kohya
            )
            log.info("%s: saved checkpoint-%d (loss %.4f)", candidate.name, step, metrics["loss"])
    progress.close()

    frame = pd.DataFrame(history, columns=["step", "loss", "learning_rate", "val_loss"])
    write_csv(out_dir / "history.csv", frame)
    return TrainResult(
        name=candidate.name,
        rank=candidate.rank,
        alpha=candidate.alpha,
        learning_rate=candidate.learning_rate,
        checkpoints=sorted(saves),
        final_loss=history[-1]["loss"],
        val_loss=val_losses if val_data is not None else None,
        seconds=time.perf_counter() - started,
        history=frame,
    )


def _generator(seed: int, candidate: CandidateConfig, purpose: str) -> torch.Generator:
    # CPU generators: the same draws whatever device the model runs on.
    return torch.Generator("cpu").manual_seed(derive_seed(seed, candidate.name, purpose))


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
) -> list[TrainResult]:
    """Train every candidate; write data/train/summary.json and the loss-curve plot files."""
    read_split(dataset_dir)
    info = read_base_info(base_dir)
    check_candidates(load_base_pipeline(base_dir).unet, train)

    results = []
    for candidate in train.candidates:
        callback = None
        if on_step is not None:
            callback = _bind(on_step, candidate.name)
        result = train_candidate(
            base_dir, dataset_dir, candidate, train, resolution, seed,
            Path(out_dir) / candidate.name, on_step=callback, trigger=trigger,
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
