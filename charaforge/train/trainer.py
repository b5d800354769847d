"""One candidate's LoRA training, as one object: `CandidateTrainer`.

It owns what one candidate's run needs on top of the shared frozen base and data: the LoRA
adapters, the optimizer and learning-rate schedule (prepared by accelerate), its own random
generators, the data order, and the record so far. Used as a context manager: entering attaches
the adapters and restores the latest saved state of this very run (or starts afresh), leaving
takes the adapters out again, so the base is pristine for the next candidate.

`train()` reads like the recipe (diffusers' train_text_to_image_lora.py): per step draw a batch,
a latent sample, noise and timesteps, encode the captions, predict, weight the loss (min-SNR),
step; every N steps validate, render samples, export the LoRA in both formats and save the full
training state. Every random draw comes from a generator seeded from the global seed and the
candidate name, and every one of them is saved with the state: the same params and data give the
same bytes on CPU, killed and resumed or not.
"""

from __future__ import annotations

import contextlib
import logging
import random
import resource
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from charaforge.config import TrainConfig, config_hash
from charaforge.config.train import CandidateConfig
from charaforge.core.files import derive_seed, write_csv
from charaforge.train import resume_state
from charaforge.train.adapters import (
    adapter_state,
    attach_lora,
    build_optimizer,
    load_adapter_state,
    remove_lora,
)
from charaforge.train.base_model import FrozenBase
from charaforge.train.data import DataOrder, augment_caption
from charaforge.train.encodings import TrainingData
from charaforge.train.export import Exporter, export_metadata
from charaforge.train.loss import diffusion_loss, noisy_inputs
from charaforge.train.processes import (
    Share,
    batch_share,
    check_process_count,
    die_with_launcher,
    gather_rng,
    log_samples,
    reset_accelerate_precision,
    unprepare,
)
from charaforge.train.settings import (
    RunContext,
    TrainResult,
    checkpoint_steps,
    result_settings,
    run_fingerprint,
)
from charaforge.train.text import encode_captions, sdxl_time_ids
from charaforge.train.validation import render_samples, validation_loss

log = logging.getLogger(__name__)

StepCallback = Callable[[int, dict[str, float]], None]
HISTORY_COLUMNS = ["step", "loss", "learning_rate", "grad_norm", "val_loss"]
# The trainer's own generators, created in this order, always: data order, noise, captions.
GENERATOR_PURPOSES = {"order": "batches", "noise": "noise", "captions": "captions"}
NUMPY_SEED_LIMIT = 2**32  # numpy's legacy global seed must be below this
KIB_PER_MIB = 1024  # ru_maxrss is in KiB on Linux


def peak_memory_mb() -> float:
    """Peak GPU memory allocated, or the process's peak resident memory on CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / KIB_PER_MIB


class CandidateTrainer:
    """Trains one LoRA candidate on a frozen base (see the module docstring)."""

    def __init__(
        self,
        base: FrozenBase,
        data: TrainingData,
        candidate: CandidateConfig,
        train: TrainConfig,
        resolution: int,
        seed: int,
        out_dir: str | Path,
        state_dir: str | Path | None = None,
        context: RunContext | None = None,
    ) -> None:
        self.base, self.data = base, data
        self.candidate, self.train = candidate, train
        self.resolution, self.seed = resolution, seed
        self.out_dir = Path(out_dir)
        self.state_dir = Path(state_dir) if state_dir else Path(train.state_dir) / candidate.name
        self.context = context or RunContext()
        self.saves = set(checkpoint_steps(train))
        self.fingerprint = run_fingerprint(
            candidate, train, resolution, seed, data.fingerprint, base.fingerprint
        )
        self.is_main = True  # set on entering, from accelerate
        # Set on entering: the adapters, optimizer, schedule, generators and the record.
        self.lora_configs: dict[str, Any] = {}
        self.trained_models: list[torch.nn.Module] = []  # the plain modules the pipeline holds
        self.wrapped_models: list[torch.nn.Module] = []  # accelerate's (DDP across processes)
        self.parameters: list[torch.nn.Parameter] = []
        self.generators: dict[str, torch.Generator] = {}
        self.history: list[dict[str, Any]] = []
        self.val_losses: list[float] = []
        self.initial_val_loss: float | None = None
        self.start = 0  # the step the loop continues after (0: a fresh start)

    # --- entering and leaving ------------------------------------------------------------------

    def __enter__(self) -> CandidateTrainer:
        from accelerate import Accelerator
        from accelerate.utils import DataLoaderConfiguration

        train = self.train
        reset_accelerate_precision(train.mixed_precision)
        # split_batches: train.batch_size is the global batch, shared by the processes, and
        # accelerate's prepared scheduler then steps once per optimizer step (without it, it
        # steps once per process per optimizer step: N times too fast).
        self.accelerator = Accelerator(
            mixed_precision=train.mixed_precision,
            gradient_accumulation_steps=train.gradient_accumulation_steps,
            cpu=not torch.cuda.is_available(),
            dataloader_config=DataLoaderConfiguration(split_batches=True),
        )
        check_process_count(self.accelerator, train.processes)
        die_with_launcher()
        self.device = self.accelerator.device
        self.is_main = self.accelerator.is_main_process
        try:
            self._attach_adapters()
            optimizer, lr_scheduler = self._optimizer_and_schedule()
            *self.wrapped_models, self.optimizer, self.lr_scheduler = self.accelerator.prepare(
                *self.trained_models, optimizer, lr_scheduler
            )
            self.generators = {
                name: torch.Generator("cpu").manual_seed(
                    derive_seed(self.seed, self.candidate.name, purpose)
                )  # CPU generators: the same draws whatever device the model runs on
                for name, purpose in GENERATOR_PURPOSES.items()
            }
            self.order = DataOrder(self.data.items, train.batch_size, self.generators["order"])
            self._restore_or_start()
            self.exporter = Exporter(
                self.candidate, train, self.base.info, self.context, self.resolution,
                self.out_dir, self.state_dir, self.lora_configs,
                export_metadata(
                    self.candidate, train, self.context, self.base.info, self.data.items,
                    config_hash(result_settings(self.candidate, train, self.resolution, self.seed)),
                    self.data.fingerprint,
                ),
                unet_config=self.base.unet.config,
                prediction_type=self.base.noise_scheduler.config.prediction_type,
            )  # fmt: skip
            if self.is_main:
                self.exporter.rewrite_missing(self.start)
            self.accelerator.wait_for_everyone()
        except BaseException:
            self._detach_adapters()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._detach_adapters()

    def _attach_adapters(self) -> None:
        """The LoRA adapters; their parameters train in float32 whatever the frozen weights
        are. Gradient checkpointing is switched on here when asked."""
        from diffusers.training_utils import cast_training_params

        base, train = self.base, self.train
        self.lora_configs = attach_lora(base.pipeline, self.candidate, train, self.seed)
        text_encoders = base.text_encoders if train.text_encoder_lora else []
        self.trained_models = [base.unet, *text_encoders]
        cast_training_params(self.trained_models, dtype=torch.float32)
        if train.gradient_checkpointing:
            base.unet.enable_gradient_checkpointing()
            for encoder in text_encoders:
                encoder.gradient_checkpointing_enable()

    def _detach_adapters(self) -> None:
        """Back to the frozen base as loaded: forward, checkpointing, adapters, eval mode."""
        if not self.lora_configs:
            return
        for model in self.trained_models:
            unprepare(model)
            model.eval()
        if self.train.gradient_checkpointing:
            self.base.unet.disable_gradient_checkpointing()
            for encoder in self.trained_models[1:]:
                encoder.gradient_checkpointing_disable()
        remove_lora(self.base.pipeline, list(self.lora_configs))
        self.lora_configs = {}

    def _optimizer_and_schedule(self) -> tuple[Any, Any]:
        """One parameter group per learning rate, and the learning-rate schedule."""
        from diffusers.optimization import get_scheduler

        candidate, train = self.candidate, self.train
        unet_parameters = [p for p in self.base.unet.parameters() if p.requires_grad]
        text_parameters = [
            p for model in self.trained_models[1:] for p in model.parameters() if p.requires_grad
        ]
        self.parameters = [*unet_parameters, *text_parameters]
        groups = [{"params": unet_parameters, "lr": candidate.learning_rate}]
        if text_parameters:
            text_lr = candidate.text_encoder_learning_rate
            lr = candidate.learning_rate if text_lr is None else text_lr
            groups.append({"params": text_parameters, "lr": lr})
        optimizer = build_optimizer(groups, train)
        lr_scheduler = get_scheduler(
            train.lr_scheduler,
            optimizer=optimizer,
            num_warmup_steps=train.lr_warmup_steps,
            num_training_steps=train.max_steps,
        )
        return optimizer, lr_scheduler

    def _restore_or_start(self) -> None:
        """Resume from the latest state of this very run, or start afresh from seeded RNGs.

        A fresh start measures the initial validation loss first, then seeds python's, numpy's
        and torch's global RNGs (peft's dropout draws from torch's); a resumed run restores them.
        """
        name, state_dir = self.candidate.name, self.state_dir
        # Only the main process clears states (foreign ones, or all without resume); the others
        # read the state folder once it has.
        if self.is_main:
            if self.train.resume:
                resume_state.latest_state_discarding_foreign(state_dir, self.fingerprint)
            elif state_dir.exists():
                shutil.rmtree(state_dir)
            resume_state.clean_stale_temporaries(state_dir)
        self.accelerator.wait_for_everyone()
        latest = resume_state.latest_state(state_dir) if self.train.resume else None
        if latest is None:
            if self.data.val_items:
                self.initial_val_loss = self.validation_loss()
            # Per process (rank 0 keeps the single-process seeds): peft's dropout masks are
            # drawn from torch's global RNG and must not repeat across the processes' samples.
            rank = self.accelerator.process_index
            extra = (rank,) if rank else ()
            random.seed(derive_seed(self.seed, name, "python", *extra))
            np.random.seed(derive_seed(self.seed, name, "numpy", *extra) % NUMPY_SEED_LIMIT)
            torch.manual_seed(derive_seed(self.seed, name, "torch", *extra))
            return
        self.start = latest.step
        load_adapter_state(self.base.pipeline, resume_state.load_adapter(latest.folder))
        training = resume_state.load_training(latest.folder)
        self.optimizer.load_state_dict(training["optimizer"])
        self.lr_scheduler.load_state_dict(training["lr_scheduler"])
        self.order.load_state_dict(training["order"])
        per_process = training.get("rng_per_process") or [training["rng"]]
        resume_state.restore_rng(per_process[self.accelerator.process_index], self.generators)
        self.history = latest.progress["history"]
        self.val_losses = latest.progress["val_losses"]
        self.initial_val_loss = latest.progress["initial_val_loss"]
        log.info("%s: resuming from step %d (%s)", name, self.start, latest.folder)

    # --- the loop ------------------------------------------------------------------------------

    def run(self, on_step: StepCallback | None = None) -> TrainResult:
        """Train from the step after `start` to `max_steps`; write history.csv; sum up."""
        started = time.perf_counter()
        for model in self.trained_models:
            model.train()
        steps = range(self.start + 1, self.train.max_steps + 1)
        progress = tqdm(
            steps, desc=f"train {self.candidate.name}", initial=self.start,
            total=self.train.max_steps, leave=False, disable=not self.is_main,
        )  # fmt: skip
        for step in progress:
            step_started = time.perf_counter()
            step_loss, grad_norm = self.optimizer_step()
            resume_state.kill_point("step", step)
            metrics = self.record(step, step_loss, grad_norm)
            progress.set_postfix(loss=f"{step_loss:.4f}", refresh=False)
            if on_step is not None and self.is_main:
                timing = {
                    "step_seconds": time.perf_counter() - step_started,
                    "memory_mb": peak_memory_mb(),
                }
                on_step(step, {**metrics, **timing})
            if step in self.saves:
                self.save_checkpoint(step, step_loss)
        progress.close()
        return self.result(time.perf_counter() - started)

    def optimizer_step(self) -> tuple[float, float]:
        """One optimizer step over `gradient_accumulation_steps` batches.

        Returns the mean loss and the gradient norm (NaN if the gradients never synced).
        """
        train, accelerator = self.train, self.accelerator
        step_loss, grad_norm = 0.0, float("nan")
        for _ in range(train.gradient_accumulation_steps):
            # The global batch and all its draws, alike on every process; then this one's share.
            batch = self.order.next()
            share = batch_share(accelerator, len(batch))
            latents, noise, timesteps = map(share.take, self.noisy_inputs(batch))
            local = [batch[position] for position in share.positions]
            log_samples(
                len(self.history) + 1, accelerator.process_index,
                [self.data.items[i].path for i in local] if share.weight else [],
            )  # fmt: skip
            with accelerator.accumulate(*self.wrapped_models), accelerator.autocast():
                # Inside autocast: the text encoders run in the mixed precision too.
                text = self.batch_text(batch, share)
                loss = self.batch_loss(local, latents, noise, timesteps, text)
                # DDP averages the processes' gradients: weighted so that the average is the
                # gradient of the global batch's mean loss (weight 1 for an even split).
                accelerator.backward(loss * share.weight if share.weight != 1.0 else loss)
                if accelerator.sync_gradients:
                    grad_norm = float(
                        accelerator.clip_grad_norm_(self.parameters, train.max_grad_norm)
                    )
                self.optimizer.step()
                self.lr_scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
            step_loss += self._global_loss(loss, share, len(batch)) / (
                train.gradient_accumulation_steps
            )
        return step_loss, grad_norm

    def _global_loss(self, loss: torch.Tensor, share: Share, global_size: int) -> float:
        """The global batch's mean loss (this process's own with one process)."""
        if self.accelerator.num_processes == 1:
            return float(loss.detach())
        local_sum = (
            loss.detach().float() * share.weight * global_size / self.accelerator.num_processes
        )
        return float(self.accelerator.reduce(local_sum.to(self.device), "sum")) / global_size

    def noisy_inputs(self, batch: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The batch's latents (a fresh posterior sample), noise (with offset) and timesteps,
        from the noise generator."""
        return noisy_inputs(
            self.data.latent_parameters(batch),
            self.base.vae.config.scaling_factor,
            self.train.noise_offset,
            self.base.noise_scheduler.config.num_train_timesteps,
            self.generators["noise"],
            self.device,
        )

    def batch_loss(
        self,
        batch: list[int],
        latents: torch.Tensor,
        noise: torch.Tensor,
        timesteps: torch.Tensor,
        text: dict[str, torch.Tensor],
    ) -> torch.Tensor:
        """The batch's (min-SNR weighted) loss, through the wrapped UNet."""
        time_ids = None
        if self.base.family == "sdxl":
            time_ids = sdxl_time_ids([self.data.items[i] for i in batch]).to(self.device)
        return diffusion_loss(
            self.wrapped_models[0], self.base.noise_scheduler, latents, text, time_ids,
            noise, timesteps, self.train.min_snr_gamma,
        )  # fmt: skip

    def batch_text(self, batch: list[int], share: Share) -> dict[str, torch.Tensor]:
        """The text conditioning of this process's share of the global batch: from the cache,
        or the augmented captions encoded now (with gradients only when the text encoders
        train). Every caption of the global batch is augmented, so the caption generator draws
        alike on every process."""
        train = self.train
        local = [batch[position] for position in share.positions]
        if train.cache.text_encoder_outputs:
            cached = self.data.cached_text(local)
            return {key: value.to(self.device) for key, value in cached.items()}
        generator = self.generators["captions"]
        augmented = [augment_caption(self.data.items[i].caption, train, generator) for i in batch]
        captions = [augmented[position] for position in share.positions]
        grad = contextlib.nullcontext() if train.text_encoder_lora else torch.no_grad()
        with grad:
            return encode_captions(
                self.base.pipeline, self.base.family, captions, train.clip_skip, self.device
            )

    # --- validation, checkpoints, the record ---------------------------------------------------

    def validation_loss(self) -> float:
        """The deterministic validation loss of the current weights (fixed timesteps, noise)."""
        return validation_loss(
            self.base.unet, self.base.noise_scheduler, self.data.val_items, self.data.val_encoded,
            self.base.vae.config.scaling_factor, self.base.family, self.seed,
        )  # fmt: skip

    def record(self, step: int, step_loss: float, grad_norm: float) -> dict[str, Any]:
        """The step's metrics (validation loss at checkpoints and every `validation.every`
        steps), appended to the history; returns them."""
        val_every = self.train.validation.every
        is_checkpoint = step in self.saves
        metrics: dict[str, Any] = {
            "loss": step_loss,
            "learning_rate": self.lr_scheduler.get_last_lr()[0],
            "grad_norm": grad_norm,
        }
        if self.data.val_items and (is_checkpoint or (val_every and step % val_every == 0)):
            metrics["val_loss"] = self.validation_loss()
            if is_checkpoint:
                self.val_losses.append(metrics["val_loss"])
        self.history.append({"step": step, **metrics})
        return metrics

    def save_checkpoint(self, step: int, step_loss: float) -> None:
        """Render the samples, export the LoRA in both formats, then save the full training
        state (adapter, optimizer, scheduler, data order, every RNG, history) for resuming.

        Every process gives its RNG state; only the main process writes, after the others have
        finished the step."""
        rng_per_process = gather_rng(self.accelerator, resume_state.capture_rng(self.generators))
        self.accelerator.wait_for_everyone()
        if not self.is_main:
            return
        samples = None
        if self.train.validation.sample_prompts:
            samples = self.out_dir / "samples" / f"step-{step:06d}"
            for model in self.trained_models:
                model.eval()
            render_samples(
                self.base.pipeline, self.train, self.resolution, self.seed,
                self.context.trigger, samples, self.base.info.stand_in,
            )  # fmt: skip
            for model in self.trained_models:
                model.train()
        peft_states = adapter_state(self.base.pipeline, list(self.lora_configs))
        self.exporter.export(step, peft_states, samples)
        training = {
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.lr_scheduler.state_dict(),
            "order": self.order.state_dict(),
            "rng": rng_per_process[0],
        }
        if len(rng_per_process) > 1:
            training["rng_per_process"] = rng_per_process
        flat = {
            f"{name}.{key}": value
            for name, state in peft_states.items()
            for key, value in state.items()
        }
        progress_payload = {
            "initial_val_loss": self.initial_val_loss,
            "fingerprint": self.fingerprint,
            "history": self.history,
            "val_losses": self.val_losses,
        }
        resume_state.save_state(self.state_dir, step, flat, training, progress_payload, samples)
        log.info("%s: saved checkpoint-%d (loss %.4f)", self.candidate.name, step, step_loss)

    def result(self, seconds: float) -> TrainResult:
        """Write history.csv (the main process) and sum the run up."""
        candidate = self.candidate
        frame = pd.DataFrame(self.history, columns=HISTORY_COLUMNS)
        self.accelerator.wait_for_everyone()
        if self.is_main:
            write_csv(self.out_dir / "history.csv", frame)
        return TrainResult(
            name=candidate.name,
            rank=candidate.rank,
            alpha=candidate.alpha,
            learning_rate=candidate.learning_rate,
            checkpoints=sorted(self.saves),
            final_loss=float(self.history[-1]["loss"]),
            val_loss=self.val_losses if self.data.val_items else None,
            initial_val_loss=self.initial_val_loss,
            seconds=seconds,
            resumed_from=self.start,
            history=frame,
        )
