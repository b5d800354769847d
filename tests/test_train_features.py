"""Each trainer option, observed where it acts: a test here fails when the option is switched off.

Every test drives a real `CandidateTrainer` on the tiny stand-in and checks the option against a
value derived independently (the min-SNR formula from the scheduler's alphas, the same generator
draws done by hand, SDXL's size conditioning from the image sizes) or through a hook on the
library modules it must reach (autocast around the UNet and text encoder, torch's checkpoint,
bitsandbytes' 8-bit state, peft's dropout, the captions the text encoder sees).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import torch.utils.checkpoint
from PIL import Image
from test_models_train import tiny_train

from charaforge.config import ModelConfig, TrainConfig
from charaforge.models.base import write_base
from charaforge.train import CandidateTrainer
from charaforge.train.grid import prepare
from charaforge.train.processes import Share

RESOLUTION = 64


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The trainer's default state and cache folders are relative (data/...): keep them here.
    monkeypatch.chdir(tmp_path)


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _config(rank: int = 4, **overrides) -> TrainConfig:
    candidate = {"name": "c", "rank": rank, "alpha": rank, "learning_rate": 1e-3}
    values = {"max_steps": 1, "checkpoint_every": 1, "candidates": [candidate]}
    return tiny_train(**{**values, **overrides})


@contextmanager
def _trainer(base_dir: Path, dataset_dir: Path, train: TrainConfig) -> Iterator[CandidateTrainer]:
    base, data = prepare(base_dir, dataset_dir, train, RESOLUTION)
    candidate = train.candidates[0]
    with CandidateTrainer(
        base, data, candidate, train, RESOLUTION, 3, Path("out"), Path("state")
    ) as trainer:
        yield trainer


NO_TEXT_CACHE = {"latents": True, "text_encoder_outputs": False}


# --- the loss: min-SNR, noise offset -------------------------------------------------------------


def test_min_snr_weights_the_loss_by_the_formula(base_dir: Path, dataset_dir: Path) -> None:
    gamma = 2.0
    with _trainer(base_dir, dataset_dir, _config(min_snr_gamma=gamma)) as trainer:
        batch = trainer.order.next()
        latents, noise, _ = trainer.noisy_inputs(batch)
        timesteps = torch.tensor([10, 900])  # SNR far above gamma, and far below it
        predictions = []
        hook = trainer.base.unet.register_forward_hook(
            lambda module, args, output: predictions.append(output.sample.detach())
        )
        with torch.no_grad():
            text = trainer.batch_text(batch, Share(list(range(len(batch))), 1.0))
            loss = trainer.batch_loss(batch, latents, noise, timesteps, text)
        hook.remove()
        alphas_cumprod = trainer.base.noise_scheduler.alphas_cumprod[timesteps]
    # Min-SNR-gamma (Hang et al. 2023), epsilon prediction: w = min(SNR, gamma) / SNR with
    # SNR = alpha_bar / (1 - alpha_bar).
    snr = alphas_cumprod / (1 - alphas_cumprod)
    weights = torch.clamp(snr, max=gamma) / snr
    assert weights[0] < 0.1 and weights[1] == 1.0
    per_sample = ((predictions[0].float() - noise) ** 2).mean(dim=(1, 2, 3))
    assert torch.allclose(loss, (per_sample * weights).mean(), rtol=1e-5)
    assert not torch.allclose(loss, per_sample.mean(), rtol=1e-2)


def test_noise_offset_adds_one_draw_per_image_and_channel(
    base_dir: Path, dataset_dir: Path
) -> None:
    offset = 0.3
    with _trainer(base_dir, dataset_dir, _config(noise_offset=offset)) as trainer:
        batch = trainer.order.next()
        generator = torch.Generator().set_state(trainer.generators["noise"].get_state())
        latents, noise, timesteps = trainer.noisy_inputs(batch)
        parameters = torch.stack([trainer.data.encoded[i].latent_parameters for i in batch])
        scaling = trainer.base.vae.config.scaling_factor
        steps = trainer.base.noise_scheduler.config.num_train_timesteps
    # The same draws by hand, in the trainer's order: latent sample, noise, offset, timesteps.
    mean, logvar = parameters.chunk(2, dim=1)
    sample = mean + torch.exp(0.5 * logvar.clamp(-30.0, 20.0)) * torch.randn(
        mean.shape, generator=generator
    )
    plain = torch.randn(mean.shape, generator=generator)
    per_channel = torch.randn((len(batch), mean.shape[1], 1, 1), generator=generator)
    expected_steps = torch.randint(0, steps, (len(batch),), generator=generator)
    assert torch.equal(latents, sample * scaling)
    assert torch.equal(noise, plain + offset * per_channel)
    assert torch.equal(timesteps, expected_steps)


# --- memory and speed: gradient checkpointing, 8-bit AdamW, bf16 autocast -------------------------


def test_gradient_checkpointing_runs_the_unet_blocks_through_torch_checkpoint(
    base_dir: Path, dataset_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []
    real = torch.utils.checkpoint.checkpoint

    def counting(function, *args, **kwargs):
        calls.append(function)
        return real(function, *args, **kwargs)

    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", counting)
    with _trainer(base_dir, dataset_dir, _config(gradient_checkpointing=True)) as trainer:
        assert trainer.base.unet.is_gradient_checkpointing
        trainer.optimizer_step()
        unet = trainer.base.unet
    assert len(calls) >= 4  # every down, mid and up block of the step's forward
    assert not unet.is_gradient_checkpointing  # the shared base is left as loaded


# A 64x64 layer of the stand-in and rank 64: both LoRA matrices hold 4,096 elements, the size
# from which bitsandbytes keeps 8-bit state (smaller tensors get 32-bit state).
WIDE_LAYER = "mid_block.attentions.0.transformer_blocks.0.attn1.to_q"


def test_adamw8bit_keeps_8bit_state_for_the_lora_matrices(
    base_dir: Path, dataset_dir: Path
) -> None:
    import bitsandbytes

    train = _config(rank=64, optimizer="adamw8bit", target_modules=[WIDE_LAYER])
    with _trainer(base_dir, dataset_dir, train) as trainer:
        trainer.optimizer_step()
        optimizer = trainer.optimizer.optimizer  # inside accelerate's wrapper
        assert isinstance(optimizer, bitsandbytes.optim.AdamW8bit)
        matrices = [p for p in trainer.parameters if p.numel() >= 4096]
        assert len(matrices) == 2  # lora_A and lora_B
        for parameter in matrices:
            state = optimizer.state[parameter]
            assert state["state1"].dtype == torch.uint8
            assert state["state2"].dtype == torch.uint8


def test_bf16_runs_the_unet_and_the_text_encoder_under_autocast(
    base_dir: Path, dataset_dir: Path
) -> None:
    train = _config(mixed_precision="bf16", cache=NO_TEXT_CACHE)
    seen: dict[str, list] = {"unet": [], "text": []}

    def recorder(name: str):
        def hook(module, args):
            seen[name].append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))

        return hook

    with _trainer(base_dir, dataset_dir, train) as trainer:
        hooks = [
            trainer.base.unet.register_forward_pre_hook(recorder("unet")),
            trainer.base.pipeline.text_encoder.register_forward_pre_hook(recorder("text")),
        ]
        trainer.optimizer_step()
        for hook in hooks:
            hook.remove()
    for name, calls in seen.items():
        assert calls and all(call == (True, torch.bfloat16) for call in calls), (name, calls)


# --- SDXL's size conditioning -------------------------------------------------------------------


@pytest.fixture(scope="module")
def sdxl_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("xl") / "base"
    write_base(ModelConfig(family="sdxl", source="stand_in", resolution=RESOLUTION), out)
    return out


def test_sdxl_time_ids_carry_original_size_crop_and_target(
    sdxl_base: Path, dataset_dir: Path
) -> None:
    seen = []
    with _trainer(sdxl_base, dataset_dir, _config()) as trainer:
        hook = trainer.base.unet.register_forward_pre_hook(
            lambda module, args, kwargs: seen.append(kwargs["added_cond_kwargs"]["time_ids"]),
            with_kwargs=True,
        )
        batch = trainer.order.next()
        with torch.no_grad():
            text = trainer.batch_text(batch, Share(list(range(len(batch))), 1.0))
            trainer.batch_loss(batch, *trainer.noisy_inputs(batch), text)
        hook.remove()
        paths = [trainer.data.items[i].path for i in batch]
    # SDXL's micro-conditioning: (original height, width, crop top, left, target height,
    # width). Each image is scaled to cover the square target and centre-cropped.
    expected = []
    for path in paths:
        with Image.open(path) as image:
            width, height = image.size
        scale = max(RESOLUTION / width, RESOLUTION / height)
        resized = (round(width * scale), round(height * scale))
        top, left = (resized[1] - RESOLUTION) // 2, (resized[0] - RESOLUTION) // 2
        expected.append([height, width, top, left, RESOLUTION, RESOLUTION])
    assert expected[0] == [80, 96, 0, 6, 64, 64]  # the drawn images are 96x80
    assert seen[0].tolist() == expected


# --- captions and LoRA dropout in the loop --------------------------------------------------------


def test_captions_are_shuffled_and_dropped_in_the_loop(base_dir: Path, dataset_dir: Path) -> None:
    train = _config(
        max_steps=6,
        caption={"shuffle": True, "keep_tokens": 1, "dropout": 0.4},
        cache=NO_TEXT_CACHE,
    )
    seen = []
    with _trainer(base_dir, dataset_dir, train) as trainer:
        tokenizer = trainer.base.pipeline.tokenizer
        hook = trainer.base.pipeline.text_encoder.register_forward_pre_hook(
            lambda module, args: seen.append(args[0][0])
        )
        for _ in range(6):
            trainer.optimizer_step()
        hook.remove()
        originals = {item.caption.replace(" ", "") for item in trainer.data.items}

    def tags(text: str) -> list[str]:
        return [tag for tag in text.replace(" ", "").split(",") if tag]

    captions = [tokenizer.decode(ids, skip_special_tokens=True) for ids in seen]
    assert len(captions) == 12  # 6 steps x batch 2
    dropped = [text for text in captions if not text.strip()]
    kept = [tags(text) for text in captions if text.strip()]
    assert 0 < len(dropped) < len(captions)
    assert all(text[0] == "aoi_cf" for text in kept)  # keep_tokens=1
    assert any(",".join(text) not in originals for text in kept)  # some order changed
    assert all(sorted(text) in [sorted(tags(o)) for o in originals] for text in kept)


def test_lora_dropout_drops_in_training_only(base_dir: Path, dataset_dir: Path) -> None:
    with _trainer(base_dir, dataset_dir, _config(lora_dropout=0.25)) as trainer:
        layer = trainer.base.unet.get_submodule(
            "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
        )
        dropout = layer.lora_dropout["default"]
        assert isinstance(dropout, torch.nn.Dropout) and dropout.p == 0.25
        calls = []
        hook = dropout.register_forward_hook(
            lambda module, args, output: calls.append(
                (module.training, not torch.equal(args[0], output))
            )
        )
        trainer.run()
        hook.remove()
    training = [changed for is_training, changed in calls if is_training]
    assert training and all(training)  # the loop trains with dropout on
    assert all(not changed for is_training, changed in calls if not is_training)
