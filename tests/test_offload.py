"""Memory modes (CharaConsist's four): model CPU offload runs on the CPU and gives the bytes of
the plain mode; sequential offload and the split over GPUs need CUDA and say so in one line."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from engine_fixtures import PROMPT, RENDER, one_thread  # noqa: F401  (one_thread: a fixture)
from PIL import Image
from typer.testing import CliRunner

from charaforge.cli import app
from charaforge.config import ModelConfig
from charaforge.errors import ConfigError
from charaforge.generate.devices import MEMORY_MODES, check_memory_mode
from charaforge.generate.engine import GenerationEngine
from charaforge.generate.request import Consistency, ImagePrompt, RenderRequest
from charaforge.models.base import write_base

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("offload") / "base"
    write_base(ModelConfig(family="sd15", source="stand_in", resolution=64), out)
    return out


def _requests() -> list[RenderRequest]:
    character = "aoi_cf, 1girl, red hair"
    prompts = [f"{PROMPT}, standing", f"{PROMPT}, waving"]
    return [
        RenderRequest(
            prompt=prompt,
            seed=seed,
            consistency=Consistency(
                character,
                identity_prompt=None if seed == 1 else prompts[0],
                identity_seed=None if seed == 1 else 1,
            ),
            **RENDER,
        )
        for seed, prompt in ((1, prompts[0]), (2, prompts[1]))
    ]


def test_model_offload_on_the_cpu_gives_the_plain_bytes(base: Path) -> None:
    plain = GenerationEngine(base, device="cpu")
    offloaded = GenerationEngine(base, device="cpu", memory="model_cpu_offload")
    # accelerate's offload hooks are really installed on every model of the pipeline.
    assert all(
        hasattr(getattr(offloaded.pipeline, name), "_hf_hook")
        for name in ("unet", "vae", "text_encoder")
    )
    assert not hasattr(plain.pipeline.unet, "_hf_hook")
    # A plain render and a consistent group (its own per-image UNet calls) in both modes.
    pixels = [
        np.asarray(image).tobytes()
        for engine in (plain, offloaded)
        for image in (
            engine.render(PROMPT, 3, **RENDER),
            *engine.render_batch(_requests()),
        )
    ]
    assert pixels[:3] == pixels[3:]
    # An IP-Adapter loaded later is offloaded too, and renders the same bytes.
    reference = ImagePrompt(Image.new("RGB", (32, 32), (200, 20, 20)), 1.0)
    with_plain = plain.render(PROMPT, 3, image_prompt=reference, **RENDER)
    with_offload = offloaded.render(PROMPT, 3, image_prompt=reference, **RENDER)
    assert hasattr(offloaded.pipeline.image_encoder, "_hf_hook")
    assert np.asarray(with_plain).tobytes() == np.asarray(with_offload).tobytes()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusals")
@pytest.mark.parametrize("memory", ["sequential_cpu_offload", "balanced"])
def test_gpu_only_modes_fail_in_one_line_on_the_cpu(
    base: Path, memory: str, caplog: pytest.LogCaptureFixture
) -> None:
    with pytest.raises(ConfigError, match=f"memory: {memory}") as raised:
        GenerationEngine(base, device="cpu", memory=memory)
    assert "\n" not in str(raised.value)
    result = CliRunner().invoke(
        app, ["generate", PROMPT, "--base", str(base), "--device", "cpu", "--memory", memory]
    )
    assert result.exit_code == 2
    assert any(f"memory: {memory}" in record.message for record in caplog.records)


def test_every_mode_is_known_and_unknown_ones_are_refused() -> None:
    assert MEMORY_MODES == ("device", "model_cpu_offload", "sequential_cpu_offload", "balanced")
    check_memory_mode("model_cpu_offload", torch.device("cpu"))
    with pytest.raises(ConfigError, match="not one of"):
        check_memory_mode("half", torch.device("cpu"))
