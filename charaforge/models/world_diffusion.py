"""Pretraining of the world's diffusion model: an SD1.5-family pipeline learnt from world renders.

The real classes of the stack, trained from scratch on CPU: an `AutoencoderKL` (blocks 32, 64, 64:
4x down-sampling, 32 px images -> 8x8x4 latents), then a `UNet2DConditionModel` (blocks 32, 64,
cross-attention width 64) trained jointly with a 2-layer, 64-wide `CLIPTextModel` on the real CLIP
BPE tokenizer, epsilon prediction on SD1.5's noise schedule, with caption dropout so that
classifier-free guidance works. The result is saved as a standard `StableDiffusionPipeline`
folder that the LoRA trainer and the generation engine load like real weights
(`size_multiple` = 4 x 2 = 8, so `model.resolution: 32` works).

Deterministic bytes on CPU: every random draw comes from its own generator seeded with
`derive_seed(seed, "world", <purpose>)`, deterministic kernels, one thread. The demo character is
never in the corpus (`sample_scenes(exclude_demo=True)`).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from charaforge.config import WorldConfig
from charaforge.core.files import derive_seed
from charaforge.models.base import (
    SD15_SCHEDULE,
    _clip_text_config,
    _seeded,
    assemble_sd15_pipeline,
    build_clip_tokenizer,
    save_stand_in,
    set_determinism,
)
from charaforge.models.objective import min_snr_weights
from charaforge.models.world_parallel import (
    Shard,
    average_gradients,
    gather_shares,
    process_group,
)
from charaforge.prepare.world import caption, render, sample_scenes

log = logging.getLogger(__name__)

TEXT_WIDTH = 64  # the text encoder's width = the UNet's cross-attention dimension
VAE_BLOCKS = (32, 64, 64)  # three blocks: 4x down-sampling
UNET_BLOCKS = (32, 64)
# Group norm over 4 channels per group (SD's VAE: 32 groups). With 32 groups the 32-channel
# full-resolution blocks normalise every channel on its own, which washes out the colour of
# small regions: after 300 steps the oracle read the hair colour of 65% of reconstructions
# right with 32 groups, 79% with 8 (all six attributes 55% / 69%, 256 held-out renders).
VAE_NORM_GROUPS = 8
# The UNet likewise (blocks of 32 and 64 channels): 1100 steps reached loss 0.053 with 8 groups
# against 0.070 with 32, and the oracle read the prompted outfit colour right 94% vs 57%.
UNET_NORM_GROUPS = 8
# The world's prompt length in tokens (SD1.5: 77). World captions are at most ~20 tokens, and
# with 77 the UNet's cross-attention spreads over ~57 padding tokens. Measured with the oracle
# (200 generations, 1100 steps): with 77 tokens the prompted background was right 0.26-0.48 of
# the time, with 32 tokens 0.94 (accessory 0.81). Every pipeline path pads to the tokenizer's
# model_max_length, so nothing else changes.
CONTEXT_LENGTH = 32
# Attention heads per UNet transformer (diffusers' `attention_head_dim` is the head count in
# UNet2DConditionModel): 2 heads of 16/32 channels cost 0.31 CPU-s a step against 0.52 with 8
# heads of 4/8 channels (batch 64, one thread), at no loss we could measure.
UNET_HEADS = 2
EVAL_IMAGES = 256  # renders held out of the corpus for the reconstruction error


@dataclass
class Corpus:
    """Rendered images (uint8, N x 3 x H x W) and their captions."""

    pixels: torch.Tensor
    captions: list[str]

    def __len__(self) -> int:
        return len(self.pixels)

    def batch(self, indices: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1], as the VAE sees them."""
        return self.pixels[indices].float() / 127.5 - 1.0


@dataclass
class DiffusionResult:
    vae_losses: list[float] = field(default_factory=list)
    unet_losses: list[float] = field(default_factory=list)
    reconstruction_mse: float = float("nan")
    latent_scaling_factor: float = float("nan")
    seconds: dict[str, float] = field(default_factory=dict)
    cpu_seconds: dict[str, float] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        return {
            "vae_final_loss": _tail_mean(self.vae_losses),
            "unet_final_loss": _tail_mean(self.unet_losses),
            "reconstruction_mse": self.reconstruction_mse,
            "latent_scaling_factor": self.latent_scaling_factor,
            "seconds": self.seconds,
            "cpu_seconds": self.cpu_seconds,
        }


def _tail_mean(values: list[float], window: int = 50) -> float:
    tail = values[-window:]
    return float(sum(tail) / len(tail)) if tail else float("nan")


class _Timer:
    """Wall and CPU seconds of named phases (CPU time is what the shared cores really cost)."""

    def __init__(self, result: DiffusionResult) -> None:
        self.result = result

    def phase(self, name: str) -> _Phase:
        return _Phase(self.result, name)


class _Phase:
    def __init__(self, result: DiffusionResult, name: str) -> None:
        self.result, self.name = result, name

    def __enter__(self) -> None:
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def __exit__(self, *_: object) -> None:
        self.result.seconds[self.name] = round(time.perf_counter() - self.wall, 3)
        self.result.cpu_seconds[self.name] = round(time.process_time() - self.cpu, 3)


def render_corpus(count: int, size: int, seed: int, shard: Shard | None = None) -> Corpus:
    """`count` world renders (never the demo character) with their captions.

    With a `shard` (world_parallel), each rank draws its share of the images and every rank
    receives all of them: each image depends only on its index, so the bytes are the same.
    """
    scenes = sample_scenes(derive_seed(seed, "world", "scenes"), count)
    shares = torch.tensor_split(torch.arange(count), shard.ranks if shard else 1)
    mine = shares[shard.rank if shard else 0].tolist()
    pixels = np.empty((len(mine), 3, size, size), dtype=np.uint8)
    for row, index in enumerate(mine):
        image = render(scenes[index], derive_seed(seed, "world", "render", index), size)
        pixels[row] = np.asarray(image, dtype=np.uint8).transpose(2, 0, 1)
    rendered = torch.from_numpy(pixels)
    if shard is not None:
        rendered = torch.cat(gather_shares(rendered, [len(share) for share in shares], shard))
    return Corpus(rendered, [caption(scene) for scene in scenes])


def _generator(seed: int, purpose: str) -> torch.Generator:
    return torch.Generator("cpu").manual_seed(derive_seed(seed, "world", purpose))


def _warmup(step: int, warmup_steps: int) -> float:
    return min(1.0, (step + 1) / max(1, warmup_steps))


def build_vae(seed: int, size: int) -> Any:
    from diffusers import AutoencoderKL

    return _seeded(
        derive_seed(seed, "world", "init", "vae"),
        lambda: AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * len(VAE_BLOCKS),
            up_block_types=("UpDecoderBlock2D",) * len(VAE_BLOCKS),
            block_out_channels=VAE_BLOCKS,
            layers_per_block=1,
            norm_num_groups=VAE_NORM_GROUPS,
            latent_channels=4,
            sample_size=size,
        ),
    )


def train_vae(
    corpus: Corpus,
    config: WorldConfig,
    seed: int,
    on_step: Callable[[int, float], None],
    shard: Shard | None = None,
) -> Any:
    """Reconstruction MSE plus a small KL term (as SD's VAE, without the adversarial loss).

    With a `shard` (world_parallel), this process trains on its rows of every global batch and
    the gradients are averaged over the ranks, so all ranks keep the same weights.
    """
    settings = config.vae
    rows = shard.rows(settings.batch_size) if shard else slice(None)
    vae = build_vae(seed, config.image_size)
    vae.train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=settings.learning_rate, weight_decay=0.0)
    parameters = list(vae.parameters())
    generator = _generator(seed, "vae")
    side = config.image_size // 2 ** (len(VAE_BLOCKS) - 1)
    quiet = shard is not None and shard.rank != 0  # one progress bar for the ranks
    for step in tqdm(
        range(settings.steps), desc="world VAE", position=0, mininterval=5, disable=quiet
    ):
        for group in optimizer.param_groups:
            group["lr"] = settings.learning_rate * _warmup(step, settings.warmup_steps)
        # The whole batch's randomness on every rank (the generators stay in step); each rank
        # trains on its own rows of it.
        indices = torch.randint(len(corpus), (settings.batch_size,), generator=generator)
        noise = torch.randn((settings.batch_size, 4, side, side), generator=generator)
        pixels = corpus.batch(indices[rows])
        posterior = vae.encode(pixels).latent_dist
        latents = posterior.mean + posterior.std * noise[rows]
        reconstruction = vae.decode(latents).sample
        loss = torch.nn.functional.mse_loss(reconstruction, pixels)
        loss = loss + settings.kl_weight * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        step_loss = average_gradients(parameters, loss) if shard else loss.item()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        on_step(step, step_loss)
    vae.eval()
    return vae


@torch.no_grad()
def encode_corpus(
    vae: Any, corpus: Corpus, batch_size: int = 256, shard: Shard | None = None
) -> torch.Tensor:
    """The latent means of every corpus image (unscaled). With a `shard`, each rank encodes its
    share of the corpus and every rank receives all of them (the ranks' VAEs are identical)."""
    shares = torch.tensor_split(torch.arange(len(corpus)), shard.ranks if shard else 1)
    mine = shares[shard.rank if shard else 0]
    parts = [
        vae.encode(corpus.batch(mine[start : start + batch_size])).latent_dist.mean
        for start in range(0, len(mine), batch_size)
    ]
    encoded = torch.cat(parts)
    if shard is None:
        return encoded
    return torch.cat(gather_shares(encoded, [len(share) for share in shares], shard))


@torch.no_grad()
def reconstruction_error(vae: Any, corpus: Corpus) -> float:
    """Mean squared error in [-1, 1] of decode(encode(x)) on renders the VAE never saw."""
    pixels = corpus.batch(torch.arange(len(corpus.captions)))
    reconstruction = vae.decode(vae.encode(pixels).latent_dist.mean).sample
    return float(torch.nn.functional.mse_loss(reconstruction, pixels))


def build_unet(seed: int, size: int) -> Any:
    from diffusers import UNet2DConditionModel

    return _seeded(
        derive_seed(seed, "world", "init", "unet"),
        lambda: UNet2DConditionModel(
            sample_size=size // 2 ** (len(VAE_BLOCKS) - 1),
            in_channels=4,
            out_channels=4,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            block_out_channels=UNET_BLOCKS,
            layers_per_block=1,
            cross_attention_dim=TEXT_WIDTH,
            attention_head_dim=UNET_HEADS,
            norm_num_groups=UNET_NORM_GROUPS,
        ),
    )


def build_text_encoder(seed: int) -> Any:
    from transformers import CLIPTextModel

    return _seeded(
        derive_seed(seed, "world", "init", "text_encoder"),
        lambda: CLIPTextModel(_clip_text_config(TEXT_WIDTH, CONTEXT_LENGTH)),
    )


def tokenize(tokenizer: Any, captions: list[str]) -> torch.Tensor:
    """Token ids exactly as StableDiffusionPipeline.encode_prompt makes them."""
    return tokenizer(
        captions,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids


def train_unet(
    latents: torch.Tensor,
    token_ids: torch.Tensor,
    empty_ids: torch.Tensor,
    config: WorldConfig,
    seed: int,
    on_step: Callable[[int, float], None],
) -> tuple[Any, Any]:
    """UNet and text encoder together: epsilon loss, caption dropout for guidance.

    One process: the other worker trains the scorers meanwhile. (Data-parallel over both, a
    step cost 0.22-0.26 s a rank against 0.3 s alone: the per-step work at batch 32 barely
    shrinks, so the second core served the VAE and the scorers better.)
    """
    from diffusers import DDPMScheduler

    settings = config.unet
    unet = build_unet(seed, config.image_size)
    text_encoder = build_text_encoder(seed)
    unet.train()
    text_encoder.train()
    noise_scheduler = DDPMScheduler(**SD15_SCHEDULE)
    parameters = [*unet.parameters(), *text_encoder.parameters()]
    # Fused AdamW: the 49408 x 64 token embedding is 80% of the parameters, and the foreach
    # update of it cost ~0.2 CPU-s a step (measured); the fused kernel is elementwise, so
    # deterministic on CPU.
    text_rate = settings.learning_rate
    if settings.text_learning_rate is not None:
        text_rate = settings.text_learning_rate
    groups = [
        {"params": list(unet.parameters()), "base_lr": settings.learning_rate},
        {"params": list(text_encoder.parameters()), "base_lr": text_rate},
    ]
    optimizer = torch.optim.AdamW(groups, lr=settings.learning_rate, weight_decay=1e-2, fused=True)
    generator = _generator(seed, "unet")
    steps = settings.steps
    for step in tqdm(range(steps), desc="world UNet", position=0, mininterval=5):
        # Linear warm-up, then cosine decay to a tenth: the late steps refine instead of jumping.
        progress = max(0.0, (step - settings.warmup_steps) / max(1, steps - settings.warmup_steps))
        decay = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))
        for group in optimizer.param_groups:
            group["lr"] = group["base_lr"] * _warmup(step, settings.warmup_steps) * decay
        indices = torch.randint(len(latents), (settings.batch_size,), generator=generator)
        clean = latents[indices]
        noise = torch.randn(clean.shape, generator=generator)
        timesteps = torch.randint(
            0, noise_scheduler.config.num_train_timesteps, (len(indices),), generator=generator
        )
        ids = token_ids[indices].clone()
        dropped = torch.rand(len(indices), generator=generator) < settings.caption_dropout
        ids[dropped] = empty_ids
        hidden = text_encoder(ids)[0]
        noisy = noise_scheduler.add_noise(clean, noise, timesteps)
        prediction = unet(noisy, timesteps, hidden).sample
        if settings.snr_gamma is None:
            loss = torch.nn.functional.mse_loss(prediction, noise)
        else:
            per_sample = ((prediction - noise) ** 2).mean(dim=(1, 2, 3))
            weights = min_snr_weights(noise_scheduler, timesteps, settings.snr_gamma)
            loss = (per_sample * weights).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        on_step(step, loss.item())
    unet.eval()
    text_encoder.eval()
    return unet, text_encoder


def pretrain_diffusion(
    config: WorldConfig,
    out_dir: str | Path,
    seed: int,
    on_step: Callable[[str, int, float], None] | None = None,
    rendezvous: str | None = None,
) -> tuple[Any, DiffusionResult]:
    """Render the corpus, train VAE then UNet + text encoder, save the pipeline to `out_dir`.

    With a `rendezvous` file the VAE phase (training and encoding the corpus) is data-parallel:
    this process is rank 0 and another runs `vae_peer` with the same file (world_parallel).
    """
    set_determinism()
    result = DiffusionResult()
    timer = _Timer(result)

    def record(model: str, losses: list[float]) -> Callable[[int, float], None]:
        def step(index: int, loss: float) -> None:
            losses.append(loss)
            if on_step is not None:
                on_step(model, index, loss)

        return step

    with ExitStack() as group:
        shard = None
        if rendezvous is not None:
            shard = group.enter_context(process_group(rendezvous, rank=0))
        with timer.phase("render"):
            corpus = render_corpus(config.corpus_size, config.image_size, seed, shard)
        with timer.phase("vae"):
            vae = train_vae(corpus, config, seed, record("vae", result.vae_losses), shard)
        with timer.phase("encode"):
            latents = encode_corpus(vae, corpus, shard=shard)
    with timer.phase("prepare"):  # reconstruction check, latent scale, token ids
        held = render_corpus(
            min(EVAL_IMAGES, config.corpus_size),
            config.image_size,
            derive_seed(seed, "world", "eval"),
        )
        result.reconstruction_mse = reconstruction_error(vae, held)
        # SD's convention: scale latents to unit variance; the pipeline multiplies by it.
        scaling = float(1.0 / latents.std())
        vae.register_to_config(scaling_factor=scaling)
        result.latent_scaling_factor = scaling
        tokenizer = build_clip_tokenizer(max_length=CONTEXT_LENGTH)
        token_ids = tokenize(tokenizer, corpus.captions)
        empty_ids = tokenize(tokenizer, [""])[0]
    with timer.phase("unet"):
        unet, text_encoder = train_unet(
            latents * scaling,
            token_ids,
            empty_ids,
            config,
            seed,
            record("unet", result.unet_losses),
        )
    with timer.phase("save"):
        pipeline = assemble_sd15_pipeline(vae, unet, text_encoder, tokenizer)
        save_stand_in(pipeline, out_dir)
    log.info(
        "world diffusion: VAE loss %.4f, reconstruction MSE %.4f, UNet loss %.4f (%.0f CPU-s)",
        _tail_mean(result.vae_losses),
        result.reconstruction_mse,
        _tail_mean(result.unet_losses),
        sum(result.cpu_seconds.values()),
    )
    return pipeline, result


def vae_peer(config: WorldConfig, seed: int, rendezvous: str, rank: int) -> None:
    """Another rank of the data-parallel VAE phase: its share of the corpus renders, its rows of
    every batch, its share of the corpus encoding.

    Builds the same initial weights from the seed and keeps them in step with rank 0 through the
    averaged gradients; rank 0 keeps the result, so nothing is returned.
    """
    set_determinism()
    with process_group(rendezvous, rank=rank) as shard:
        corpus = render_corpus(config.corpus_size, config.image_size, seed, shard)
        vae = train_vae(corpus, config, seed, lambda _step, _loss: None, shard)
        encode_corpus(vae, corpus, shard=shard)
