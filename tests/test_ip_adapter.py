"""IP-Adapter: the stand-in's files in the layout diffusers' `load_ip_adapter` reads, and image
prompts through the engine and the CLI on the SD1.5 and SDXL stand-ins."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from engine_fixtures import one_thread  # noqa: F401  (a fixture: pytest finds it by name)
from PIL import Image, ImageDraw
from safetensors import safe_open
from typer.testing import CliRunner

from charaforge.cli import app
from charaforge.config import ModelConfig
from charaforge.errors import ConfigError
from charaforge.generate.engine import GenerationEngine
from charaforge.generate.ip_adapter import (
    IMAGE_ENCODER_DIR,
    build_stand_in_ip_adapter,
    load_for_engine,
    load_ip_adapter,
)
from charaforge.generate.request import ImagePrompt, RenderRequest
from charaforge.models.base import load_base_pipeline, write_base

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPT = "aoi_cf, 1girl, red hair"
RENDER = {"steps": 3, "guidance_scale": 5.0}


def _reference(colour: tuple[int, int, int]) -> Image.Image:
    image = Image.new("RGB", (48, 48), "white")
    ImageDraw.Draw(image).ellipse((8, 8, 40, 40), fill=colour)
    return image


def _pixels(image: Image.Image) -> bytes:
    return np.asarray(image).tobytes()


@pytest.fixture(scope="module")
def bases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ip_adapter")
    for family in ("sd15", "sdxl"):
        write_base(ModelConfig(family=family, source="stand_in", resolution=64), root / family)
    return {"sd15": root / "sd15", "sdxl": root / "sdxl"}


def test_stand_in_files_load_with_diffusers_and_keep_their_weights(
    bases: dict[str, Path], tmp_path: Path
) -> None:
    from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0

    pipeline = load_base_pipeline(bases["sd15"], torch.device("cpu"))
    weights = build_stand_in_ip_adapter(pipeline.unet, tmp_path / "ip", seed=3)
    assert (tmp_path / "ip" / IMAGE_ENCODER_DIR / "config.json").is_file()
    cross = [name for name in pipeline.unet.attn_processors if name.endswith("attn2.processor")]
    with safe_open(weights, "pt") as handle:
        keys = set(handle.keys())
        tensors = {key: handle.get_tensor(key) for key in keys}
    # The published key names: image_proj.* and ip_adapter.<1, 3, 5...>.to_k_ip / to_v_ip.
    expected = {f"image_proj.{name}" for name in ("proj.weight", "proj.bias", "norm.weight")}
    expected |= {"image_proj.norm.bias"}
    for position in range(len(cross)):
        expected |= {f"ip_adapter.{2 * position + 1}.to_{kv}_ip.weight" for kv in "kv"}
    assert keys == expected
    load_ip_adapter(pipeline, weights)
    processors = pipeline.unet.attn_processors
    assert all(isinstance(processors[name], IPAdapterAttnProcessor2_0) for name in cross)
    # The loader put the file's tensors where they belong (order of the processors, odd ids).
    last = processors[cross[-1]]
    key = f"ip_adapter.{2 * len(cross) - 1}.to_k_ip.weight"
    assert torch.equal(last.to_k_ip[0].weight, tensors[key])
    projection = pipeline.unet.encoder_hid_proj.image_projection_layers[0]
    assert torch.equal(projection.image_embeds.weight, tensors["image_proj.proj.weight"])
    assert type(pipeline.image_encoder).__name__ == "CLIPVisionModelWithProjection"
    # The same seed writes the same weights.
    again = build_stand_in_ip_adapter(pipeline.unet, tmp_path / "again", seed=3)
    assert again.read_bytes() == weights.read_bytes()


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_the_reference_image_changes_the_render_and_scale_0_is_the_base(
    bases: dict[str, Path], family: str
) -> None:
    engine = GenerationEngine(bases[family], device="cpu")
    base = engine.render(PROMPT, 5, **RENDER)
    red, blue = _reference((220, 30, 30)), _reference((30, 30, 220))
    with_red = engine.render(PROMPT, 5, image_prompt=ImagePrompt(red, 1.0), **RENDER)
    assert engine.ip_adapter_loaded
    assert _pixels(with_red) != _pixels(base)
    assert _pixels(engine.render(PROMPT, 5, image_prompt=ImagePrompt(blue, 1.0), **RENDER)) != (
        _pixels(with_red)
    )
    half = engine.render(PROMPT, 5, image_prompt=ImagePrompt(red, 0.5), **RENDER)
    assert _pixels(half) not in (_pixels(with_red), _pixels(base))
    # Scale 0, and a request without a reference once the adapter is loaded: the base bytes.
    assert _pixels(engine.render(PROMPT, 5, image_prompt=ImagePrompt(red, 0.0), **RENDER)) == (
        _pixels(base)
    )
    assert _pixels(engine.render(PROMPT, 5, **RENDER)) == _pixels(base)
    # The sidecar records the reference and its scale.
    record = json.loads(with_red.info["charaforge"])["ip_adapter"]
    assert record["scale"] == 1.0 and record["adapter"] == "stand-in"
    assert len(record["image"]) == 16


def test_an_image_prompt_batch_is_byte_identical_to_single_renders(
    bases: dict[str, Path],
) -> None:
    engine = GenerationEngine(bases["sd15"], device="cpu")
    prompt = ImagePrompt(_reference((30, 200, 30)), 0.8)
    requests = [
        RenderRequest(prompt=f"{PROMPT}, {pose}", seed=seed, image_prompt=prompt, **RENDER)
        for seed, pose in ((1, "standing"), (2, "sitting"))
    ]
    batch = engine.render_batch(requests)
    singles = [engine.render_batch([request])[0] for request in requests]
    assert [_pixels(image) for image in batch] == [_pixels(image) for image in singles]
    other = RenderRequest(
        prompt=PROMPT, seed=3, image_prompt=ImagePrompt(_reference((0, 0, 0)), 0.8), **RENDER
    )
    with pytest.raises(ValueError, match="a batch must share"):
        engine.render_batch([requests[0], other])


def test_missing_adapters_fail_with_one_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_ip_adapter(None, tmp_path / "missing.safetensors")
    lonely = tmp_path / "ip-adapter_sd15.safetensors"
    lonely.write_bytes(b"")
    with pytest.raises(ConfigError, match="image_encoder"):
        load_ip_adapter(None, lonely)
    # A real base model and no weight file: refused before anything is loaded.
    with pytest.raises(ConfigError, match="no local IP-Adapter"):
        load_for_engine(None, None, stand_in=False)


def test_the_cli_renders_with_a_reference_image(bases: dict[str, Path], tmp_path: Path) -> None:
    reference = tmp_path / "reference.png"
    _reference((200, 30, 30)).save(reference)
    common = ["--base", str(bases["sd15"]), "--steps", "2", "--seed", "4", "--device", "cpu"]
    runner = CliRunner()
    plain = runner.invoke(app, ["generate", PROMPT, *common, "--out", str(tmp_path / "a.png")])
    assert plain.exit_code == 0, plain.output
    result = runner.invoke(
        app,
        [
            "generate",
            PROMPT,
            *common,
            "--ip-adapter-image",
            str(reference),
            "--ip-adapter-scale",
            "1.0",
            "--out",
            str(tmp_path / "b.png"),
        ],
    )
    assert result.exit_code == 0, result.output
    assert (tmp_path / "a.png").read_bytes() != (tmp_path / "b.png").read_bytes()
    sidecar = json.loads((tmp_path / "b.png").with_suffix(".json").read_text())
    assert sidecar["ip_adapter"]["source"] == "reference.png"
    missing = runner.invoke(
        app, ["generate", PROMPT, *common, "--ip-adapter-image", str(tmp_path / "nope.png")]
    )
    assert missing.exit_code == 2
