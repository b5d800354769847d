"""model.prediction_type and model.rescale_betas_zero_snr: the training noise scheduler, the
training target, the engine's samplers and the exported LoRA's metadata all follow them."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from test_models_train import tiny_train

from charaforge.config import ModelConfig
from charaforge.config.train import CandidateConfig
from charaforge.core.layout import checkpoint_dir
from charaforge.errors import ConfigError
from charaforge.generate.engine import GenerationEngine
from charaforge.generate.request import SCHEDULERS
from charaforge.models.base import write_base
from charaforge.models.lora_files import kohya_file_name
from charaforge.train import train_candidate
from charaforge.train.base_model import FrozenBase
from charaforge.train.loss import diffusion_loss
from charaforge.train.text import encode_captions

TRAIN_TIMESTEPS = 1000  # SD1.5's num_train_timesteps (T)
V_MODEL = ModelConfig(
    family="sd15",
    source="stand_in",
    resolution=64,
    prediction_type="v_prediction",
    rescale_betas_zero_snr=True,
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def v_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("v_base") / "base"
    write_base(V_MODEL, out)
    return out


def test_v_prediction_trains_on_the_velocity_with_zero_terminal_snr(
    v_base: Path, base_dir: Path
) -> None:
    base = FrozenBase.load(v_base, tiny_train(), 64)
    scheduler = base.noise_scheduler
    assert scheduler.config.prediction_type == "v_prediction"
    assert float(scheduler.alphas_cumprod[-1]) < 1e-6  # zero terminal SNR
    plain = FrozenBase.load(base_dir, tiny_train(), 64).noise_scheduler
    assert plain.config.prediction_type == "epsilon"
    assert float(plain.alphas_cumprod[-1]) > 1e-3  # SD1.5's schedule ends at ~0.0047

    generator = torch.Generator().manual_seed(0)
    latents = torch.randn((2, 4, 8, 8), generator=generator)
    noise = torch.randn(latents.shape, generator=generator)
    timesteps = torch.tensor([10, 990])
    with torch.no_grad():
        text = encode_captions(base.pipeline, "sd15", ["1girl", "red coat"])
        loss = diffusion_loss(base.unet, scheduler, latents, text, None, noise, timesteps, None)
        # By hand: v = sqrt(a) * noise - sqrt(1 - a) * x0 at each sample's timestep.
        alpha = scheduler.alphas_cumprod[timesteps].view(-1, 1, 1, 1)
        velocity = alpha.sqrt() * noise - (1 - alpha).sqrt() * latents
        torch.testing.assert_close(velocity, scheduler.get_velocity(latents, noise, timesteps))
        noisy = alpha.sqrt() * latents + (1 - alpha).sqrt() * noise
        prediction = base.unet(noisy, timesteps, text["states"]).sample
    torch.testing.assert_close(loss, F.mse_loss(prediction, velocity), rtol=1e-5, atol=1e-6)
    assert abs(float(loss) - float(F.mse_loss(prediction, noise))) > 1e-3


def test_the_engine_samples_with_the_same_schedule(v_base: Path) -> None:
    engine = GenerationEngine(v_base, device=torch.device("cpu"))
    for name in ("euler", "dpmpp_2m", "ddim"):
        sampler = engine._build_scheduler(name)
        assert sampler.config.prediction_type == "v_prediction"
        assert sampler.config.rescale_betas_zero_snr
        assert float(sampler.alphas_cumprod[-1]) < 1e-6


def test_zero_terminal_snr_samples_from_the_last_timestep(v_base: Path, base_dir: Path) -> None:
    """With zero terminal SNR every sampler starts at t = T-1 (trailing spacing), the pure-noise
    step the rescaled schedule ends on: the engine's samplers and the trainer's sample renders.
    On SD1.5's own leading spacing the first step is T - T/steps + 1 (951 of 1000 at 20 steps)."""
    engine = GenerationEngine(v_base, device=torch.device("cpu"))
    plain = GenerationEngine(base_dir, device=torch.device("cpu"))
    last = TRAIN_TIMESTEPS - 1
    for name in SCHEDULERS:
        sampler = engine._build_scheduler(name)
        sampler.set_timesteps(20)
        assert round(float(sampler.timesteps[0])) == last, name
        if "karras" not in name:  # Karras sigmas start at sigma_max whatever the spacing
            sampler = plain._build_scheduler(name)
            sampler.set_timesteps(20)
            assert round(float(sampler.timesteps[0])) < last - 40, name
    samples = FrozenBase.load(v_base, tiny_train(), 64).pipeline.scheduler  # render_samples'
    samples.set_timesteps(4)
    assert [round(float(t)) for t in samples.timesteps] == [999, 749, 499, 249]


def test_exported_lora_metadata_says_v_and_the_clip_skip(
    v_base: Path, dataset_dir: Path, tmp_path: Path
) -> None:
    candidate = CandidateConfig(name="v", rank=2, alpha=2, learning_rate=1e-3)
    train = tiny_train(
        max_steps=1, checkpoint_every=1, candidates=[candidate.model_dump()], clip_skip=2
    )
    train_candidate(v_base, dataset_dir, candidate, train, 64, 3, tmp_path / "v",
                    state_dir=tmp_path / "state")  # fmt: skip
    path = checkpoint_dir(tmp_path / "v", 1) / kohya_file_name("v", 1)
    with safe_open(path, "pt") as handle:
        metadata = handle.metadata()
    assert metadata["ss_v_parameterization"] == "True"
    assert metadata["modelspec.prediction_type"] == "v"
    assert metadata["ss_clip_skip"] == "2"  # kohya's count is A1111's


def test_zero_terminal_snr_with_epsilon_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="rescale_betas_zero_snr needs model.prediction_type"):
        ModelConfig(**{**V_MODEL.model_dump(), "prediction_type": "epsilon"})
    # With prediction_type null the base decides: the stand-in predicts epsilon, so refused.
    write_base(ModelConfig(**{**V_MODEL.model_dump(), "prediction_type": None}), tmp_path / "b")
    with pytest.raises(ConfigError, match="model.rescale_betas_zero_snr: this base predicts"):
        FrozenBase.load(tmp_path / "b", tiny_train(), 64)
