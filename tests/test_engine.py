"""The generation engine, the sweep and the CLI, with a stand-in base and a LoRA trained here."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from engine_fixtures import (
    PROMPT,
    RENDER,
    make_workspace,
    one_thread,  # noqa: F401  (a fixture: pytest finds it by name)
)
from PIL import Image, ImageDraw
from safetensors import safe_open
from typer.testing import CliRunner

from charaforge.cli import app
from charaforge.config import EvalConfig
from charaforge.core.layout import checkpoint_path
from charaforge.errors import ConfigError
from charaforge.generate.engine import GenerationEngine
from charaforge.generate.records import png_bytes, read_sidecar, write_image
from charaforge.generate.request import PRESETS, SCHEDULERS, Conditioning, RenderRequest
from charaforge.generate.sweep import run_sweep

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """data/base (stand-in) and data/train (one candidate, alpha != rank, two checkpoints)."""
    return make_workspace(tmp_path_factory.mktemp("engine"))


@pytest.fixture(scope="module")
def engine(workspace: Path) -> GenerationEngine:
    return GenerationEngine(workspace / "base")


def _pixels(image: Image.Image) -> bytes:
    return np.asarray(image).tobytes()


def test_same_seed_same_image_and_the_seed_matters(engine: GenerationEngine) -> None:
    first = engine.render(PROMPT, 3, **RENDER)
    assert first.size == (64, 64)
    assert _pixels(engine.render(PROMPT, 3, **RENDER)) == _pixels(first)
    assert _pixels(engine.render(PROMPT, 4, **RENDER)) != _pixels(first)


def test_loading_and_unloading_a_lora_leaves_the_base_untouched(
    engine: GenerationEngine, workspace: Path
) -> None:
    base = _pixels(engine.render(PROMPT, 0, **RENDER))
    engine.load_lora("r4", checkpoint_path(workspace / "train" / "r4", 4))
    try:
        # The file's metadata restores alpha (8, not the rank 4): the LoRA acts at full strength.
        assert engine.pipeline.unet.peft_config["r4"].lora_alpha == 8
        assert _pixels(engine.render(PROMPT, 0, loras={"r4": 1.0}, **RENDER)) != base
        assert _pixels(engine.render(PROMPT, 0, loras={"r4": 0.0}, **RENDER)) == base
        assert _pixels(engine.render(PROMPT, 0, **RENDER)) == base  # loaded but not requested
    finally:
        engine.unload_lora("r4")
    assert _pixels(engine.render(PROMPT, 0, **RENDER)) == base
    with pytest.raises(KeyError, match="not loaded"):
        engine.render(PROMPT, 0, loras={"r4": 1.0}, **RENDER)


def test_swapping_a_checkpoint_reuses_the_peft_layers_and_renders_the_same_bytes(
    engine: GenerationEngine, workspace: Path
) -> None:
    folder = workspace / "train" / "r4"
    engine.load_lora("fresh", checkpoint_path(folder, 4))
    try:
        fresh = engine.render(PROMPT, 5, loras={"fresh": 1.0}, **RENDER)
    finally:
        engine.unload_lora("fresh")
    engine.load_lora("r4-2", checkpoint_path(folder, 2))
    layer = engine.pipeline.unet.get_submodule(_ATTENTION_QUERY)
    try:
        engine.render(PROMPT, 5, loras={"r4-2": 1.0}, **RENDER)
        engine.swap_lora("r4-2", "r4-4", checkpoint_path(folder, 4))
        assert sorted(engine.loras) == ["r4-4"]
        # The sweep's point: checkpoint 4's weights went into checkpoint 2's layers.
        assert engine.pipeline.unet.get_submodule(_ATTENTION_QUERY) is layer
        swapped = engine.render(PROMPT, 5, loras={"r4-4": 1.0}, **RENDER)
        assert _pixels(swapped) == _pixels(fresh)
        assert json.loads(swapped.info["charaforge"])["loras"][0]["name"] == "r4-4"
        # A kohya file has other tensor names: it is loaded afresh, under its own name.
        engine.swap_lora("r4-4", "kohya", folder / "checkpoint-4" / "r4-000004.safetensors")
        assert sorted(engine.loras) == ["kohya"]
        assert engine.pipeline.unet.get_submodule(_ATTENTION_QUERY) is not layer
    finally:
        for name in list(engine.loras):
            engine.unload_lora(name)


_ATTENTION_QUERY = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"


def test_kohya_file_renders_like_the_diffusers_file(
    engine: GenerationEngine, workspace: Path
) -> None:
    folder = workspace / "train" / "r4" / "checkpoint-4"
    kohya = folder / "r4-000004.safetensors"
    with safe_open(kohya, "pt") as handle:
        names = list(handle.keys())
        metadata = handle.metadata()
        alphas = {float(handle.get_tensor(name)) for name in names if name.endswith(".alpha")}
    assert all(name.startswith("lora_unet_") for name in names)
    assert alphas == {8.0}  # the trained lora_alpha, not the rank diffusers' converter writes
    assert metadata["ss_base_model_version"] == "sd_v1"
    assert metadata["ss_output_name"] == kohya.stem == "r4-000004"
    assert metadata["modelspec.trigger_phrase"] == "aoi_cf"
    assert metadata["charaforge.stand_in"] == "true"

    base = np.asarray(engine.render(PROMPT, 2, **RENDER), dtype=float)
    renders = {}
    for name, file in (("diffusers", folder), ("kohya", kohya)):
        engine.load_lora(name, file)
        try:
            renders[name] = np.asarray(
                engine.render(PROMPT, 2, loras={name: 1.0}, **RENDER), dtype=float
            )
        finally:
            engine.unload_lora(name)
    # Same LoRA, two layouts: the images agree to rounding, and the LoRA does change the image.
    effect = np.abs(renders["diffusers"] - base).mean()
    assert effect > 1.0
    assert np.abs(renders["kohya"] - renders["diffusers"]).mean() < 0.5


def test_png_carries_a1111_parameters_and_a_json_sidecar(
    engine: GenerationEngine, workspace: Path, tmp_path: Path
) -> None:
    engine.load_lora("r4", workspace / "train" / "r4" / "checkpoint-2")
    try:
        image = engine.render(PROMPT, 5, loras={"r4": 0.5}, **RENDER)
        expected = engine.parameters(
            RenderRequest.from_options(PROMPT, 5, loras={"r4": 0.5}, **RENDER)
        )
    finally:
        engine.unload_lora("r4")
    write_image(tmp_path / "out.png", image)
    text = Image.open(tmp_path / "out.png").info["parameters"]
    lines = text.split("\n")
    # A1111 lists a LoRA by its file's stem: the kohya file beside the checkpoint.
    assert lines[0] == f"{PROMPT} <lora:r4-000002:0.5>"
    assert lines[1] == "Negative prompt: lowres"
    assert "Steps: 4, Sampler: Euler, CFG scale: 5, Seed: 5, Size: 64x64" in lines[2]
    assert f'Lora hashes: "r4-000002: {expected["loras"][0]["short_hash"]}"' in lines[2]
    assert read_sidecar(tmp_path / "out.png") == expected
    assert expected["stand_in"] is True


def test_every_scheduler_renders_and_unknown_ones_are_refused(engine: GenerationEngine) -> None:
    images = set()
    try:
        for name in SCHEDULERS:
            engine.set_scheduler(name)
            images.add(_pixels(engine.render(PROMPT, 1, **RENDER)))
        with pytest.raises(ValueError, match="unknown scheduler"):
            engine.set_scheduler("plms")
    finally:
        engine.set_scheduler("euler")
    assert len(images) == len(SCHEDULERS)


def test_sweep_renders_the_grid_matches_single_renders_and_resumes(
    engine: GenerationEngine, workspace: Path, tmp_path: Path
) -> None:
    evaluation = EvalConfig(
        prompts=["{trigger}, standing", "{trigger}, sitting"],
        negative_prompt="lowres",
        seeds=[0, 1],
        lora_scales=[0.0, 1.0],
        steps=4,
        guidance_scale=5.0,
        scheduler="euler",
    )
    out = tmp_path / "generate"
    result = run_sweep(engine, workspace / "train", evaluation, "aoi_cf", 64, 1234, out)
    index = result.index
    # base: 2 prompts x 2 seeds; r4: 2 checkpoints x 1 scale x 2 prompts x 2 seeds.
    assert len(index) == 4 + 8 and result.rendered == 12
    assert index.groupby("candidate").size().to_dict() == {"base": 4, "r4": 8}
    assert set(index.loc[index.candidate == "base", "step"]) == {0}
    assert index["prompt"].str.startswith("aoi_cf, ").all()
    assert pd.read_parquet(out / "index.parquet").equals(index)
    # Paired comparison: every candidate starts from the same noise for a (prompt, seed).
    assert index.groupby(["prompt_index", "seed"]).ngroups == 4

    # An image of the sweep is the image the engine renders alone from the same parameters.
    row = index[(index.candidate == "r4") & (index.step == 2)].iloc[0]
    engine.load_lora("alone", checkpoint_path(workspace / "train" / "r4", 2))
    try:
        alone = engine.render(row.prompt, int(row.seed), loras={"alone": 1.0}, **RENDER)
    finally:
        engine.unload_lora("alone")
    assert _pixels(alone) == _pixels(Image.open(row.image_path).convert("RGB"))

    # Resume: nothing is rendered again, and a missing image is rendered back identically.
    before = (out / "index.parquet").read_bytes()
    again = run_sweep(engine, workspace / "train", evaluation, "aoi_cf", 64, 1234, out)
    assert (again.rendered, again.skipped) == (0, 12)
    assert (out / "index.parquet").read_bytes() == before
    Path(row.image_path).unlink()
    third = run_sweep(engine, workspace / "train", evaluation, "aoi_cf", 64, 1234, out)
    assert third.rendered == 1
    assert (out / "index.parquet").read_bytes() == before


def test_cli_generate_renders_what_the_engine_renders(
    engine: GenerationEngine, workspace: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    out = tmp_path / "cli.png"
    args = ["generate", PROMPT, "--seed", "7", "--steps", "4", "--cfg", "5", "--negative", "lowres"]
    args += ["--lora", "r4@2:0", "--base", str(workspace / "base"), "--out", str(out)]
    args += ["--train-dir", str(workspace / "train")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    sidecar = read_sidecar(out)
    # A trained checkpoint keeps its registry name (`<candidate>@<step>`, as the server names it).
    assert sidecar["loras"][0]["name"] == "r4@2" and sidecar["loras"][0]["scale"] == 0.0
    # Scale 0 is the base model, pixel for pixel.
    assert _pixels(Image.open(out).convert("RGB")) == _pixels(engine.render(PROMPT, 7, **RENDER))

    args[args.index("r4@2:0")] = "nobody:1"
    missing = CliRunner().invoke(app, args)
    assert missing.exit_code == 2
    assert "no candidate 'nobody'" in caplog.text


def test_an_image_is_the_same_bytes_alone_and_in_a_batch(
    engine: GenerationEngine, workspace: Path
) -> None:
    engine.load_lora("r4", checkpoint_path(workspace / "train" / "r4", 4))
    try:
        requests = [
            {"prompt": prompt, "seed": seed, "loras": {"r4": 0.7}, "clip_skip": skip, **RENDER}
            for prompt, seed, skip in [(PROMPT, 11, 1), ("aoi_cf, sitting", 12, 2), ("x", 13, 1)]
        ]
        batch = engine.render_batch([RenderRequest(**r) for r in requests])
        alone = [engine.render(**request) for request in requests]
        assert [png_bytes(image) for image in batch] == [png_bytes(image) for image in alone]
        # Fused batches run one forward for all images: equal only up to rounding.
        engine.batch_mode = "fused"
        try:
            fused = engine.render_batch([RenderRequest(**r) for r in requests])
        finally:
            engine.batch_mode = "exact"
        for image, single in zip(fused, alone, strict=True):
            difference = np.abs(np.asarray(image, float) - np.asarray(single, float))
            assert difference.max() <= 2
        with pytest.raises(ValueError, match="must share"):
            engine.render_batch(
                [RenderRequest(**{**requests[0], "loras": {}}), RenderRequest(**requests[1])]
            )
    finally:
        engine.unload_lora("r4")


def test_presets_clip_skip_karras_and_trigger_words(
    engine: GenerationEngine, workspace: Path
) -> None:
    draft = engine.parameters(RenderRequest.from_options(PROMPT, 0, preset="draft"))
    assert (draft["steps"], draft["guidance_scale"]) == (
        PRESETS["draft"].steps,
        PRESETS["draft"].guidance_scale,
    )
    assert (
        engine.parameters(RenderRequest.from_options(PROMPT, 0, preset="draft", steps=3))["steps"]
        == 3
    )
    base = engine.render(PROMPT, 1, **RENDER)
    skipped = engine.render(PROMPT, 1, clip_skip=2, **RENDER)
    assert _pixels(skipped) != _pixels(base)
    assert "Clip skip: 2" in skipped.info["parameters"]
    with pytest.raises(ValueError, match="clip_skip"):
        engine.parameters(
            RenderRequest.from_options(PROMPT, 0, clip_skip=3)
        )  # the stand-in text encoder has 2 layers
    karras = engine.render(PROMPT, 1, scheduler="dpmpp_2m_karras", **RENDER)
    assert "Sampler: DPM++ 2M Karras" in karras.info["parameters"]
    assert engine.pipeline.scheduler.config.use_karras_sigmas
    engine.load_lora("r4", checkpoint_path(workspace / "train" / "r4", 2), ["aoi_cf", "red coat"])
    try:
        params = engine.parameters(RenderRequest.from_options("1girl", 0, loras={"r4": 1.0}))
        assert params["prompt"] == "aoi_cf, red coat, 1girl"
        assert params["trigger_words"] == ["aoi_cf", "red coat"]
        assert (
            engine.parameters(RenderRequest.from_options("1girl", 0, loras={"r4": 0.0}))["prompt"]
            == "1girl"
        )
    finally:
        engine.unload_lora("r4")


def _distance(image: Image.Image, other: Image.Image) -> float:
    return float(np.abs(np.asarray(image, float) - np.asarray(other, float)).mean())


def test_controlnet_img2img_and_inpainting(engine: GenerationEngine) -> None:
    skeleton = Image.new("RGB", (64, 64))
    ImageDraw.Draw(skeleton).line((32, 8, 32, 56), fill=(255, 0, 0), width=4)
    base = engine.render(PROMPT, 2, **RENDER)
    pose = Conditioning("control", skeleton, source="abc")
    posed = engine.render(PROMPT, 2, conditioning=pose, **RENDER)
    assert _distance(posed, base) > 0.5
    assert json.loads(posed.info["charaforge"])["conditioning"]["source"] == "abc"
    batch = engine.render_batch(
        [RenderRequest(prompt=PROMPT, seed=seed, conditioning=pose, **RENDER) for seed in (2, 3)]
    )
    assert png_bytes(batch[0]) == png_bytes(posed)

    light = Conditioning("img2img", base, strength=0.3)
    strong = Conditioning("img2img", base, strength=1.0)
    lightly = engine.render(PROMPT, 2, conditioning=light, **RENDER)
    assert _distance(lightly, base) < _distance(
        engine.render(PROMPT, 2, conditioning=strong, **RENDER), base
    )
    assert "Denoising strength: 0.3" in lightly.info["parameters"]

    mask = Image.new("L", (64, 64))
    ImageDraw.Draw(mask).rectangle((0, 0, 31, 63), fill=255)
    inpaint = Conditioning("inpaint", base, mask=mask, strength=1.0)
    after = np.asarray(engine.render(PROMPT, 2, conditioning=inpaint, **RENDER), float)
    before = np.asarray(base, float)
    assert np.array_equal(after[:, 32:], before[:, 32:])  # outside the mask: untouched
    assert np.abs(after[:, :32] - before[:, :32]).mean() > 1.0
    with pytest.raises(ValueError, match="needs a mask"):
        Conditioning("inpaint", base)


def test_memory_modes_and_devices_are_checked_before_loading(workspace: Path) -> None:
    # (model_cpu_offload runs on the CPU: tests/test_offload.py checks its bytes.)
    with pytest.raises(ConfigError, match="memory: sequential_cpu_offload .* needs a GPU"):
        GenerationEngine(workspace / "base", device="cpu", memory="sequential_cpu_offload")
    with pytest.raises(ConfigError, match="memory:"):
        GenerationEngine(workspace / "base", device="cpu", memory="lots")
    with pytest.raises(ConfigError, match="not available"):
        GenerationEngine(workspace / "base", device="cuda:7")


def test_sdxl_stand_in_renders_batches_exactly_with_clip_skip_and_control(tmp_path: Path) -> None:
    from charaforge.config import ModelConfig
    from charaforge.models.base import write_base

    write_base(ModelConfig(family="sdxl", source="stand_in", resolution=64), tmp_path / "xl")
    xl = GenerationEngine(tmp_path / "xl", device="cpu")
    assert (
        xl.is_sdxl
        and xl.parameters(RenderRequest.from_options("x", 0))["model"] == "charaforge-stand-in-sdxl"
    )
    requests = [
        {"prompt": prompt, "seed": seed, "steps": 2, "guidance_scale": 5.0, "clip_skip": skip}
        for prompt, seed, skip in [("a", 1, 1), ("b", 2, 2)]
    ]
    batch = xl.render_batch([RenderRequest(**r) for r in requests])
    assert [png_bytes(image) for image in batch] == [png_bytes(xl.render(**r)) for r in requests]
    skeleton = Image.new("RGB", (64, 64))
    ImageDraw.Draw(skeleton).line((32, 8, 32, 56), fill=(255, 0, 0), width=4)
    posed = xl.render(**requests[0], conditioning=Conditioning("control", skeleton))
    assert _pixels(posed) != _pixels(batch[0])


def test_cli_generate_with_registry_batch_and_inpainting(
    engine: GenerationEngine, workspace: Path, tmp_path: Path
) -> None:
    loras = tmp_path / "loras"
    loras.mkdir()
    (loras / "aoi.safetensors").write_bytes(
        checkpoint_path(workspace / "train" / "r4", 2).read_bytes()
    )
    (loras / "registry.yaml").write_text(
        "loras:\n  hero:\n    file: aoi.safetensors\n    trigger_words: [hero_tok]\n"
    )
    start = tmp_path / "start.png"
    engine.render(PROMPT, 1, **RENDER).save(start)
    mask = Image.new("L", (64, 64))
    ImageDraw.Draw(mask).rectangle((0, 0, 31, 63), fill=255)
    mask.save(tmp_path / "mask.png")
    out = tmp_path / "cli.png"
    args = ["generate", "1girl", "--seed", "4", "--steps", "2", "--batch-size", "2"]
    args += ["--lora", "hero:0.5", "--lora-dir", str(loras), "--base", str(workspace / "base")]
    args += ["--init-image", str(start), "--mask", str(tmp_path / "mask.png"), "--strength", "1"]
    args += ["--scheduler", "dpmpp_2m_karras", "--out", str(out), "--device", "cpu"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    first, second = read_sidecar(tmp_path / "cli-0.png"), read_sidecar(tmp_path / "cli-1.png")
    assert (first["seed"], second["seed"]) == (4, 5)
    assert first["prompt"] == "hero_tok, 1girl" and first["conditioning"]["kind"] == "inpaint"
    kept = np.asarray(Image.open(tmp_path / "cli-0.png").convert("RGB"))[:, 32:]
    assert np.array_equal(kept, np.asarray(Image.open(start).convert("RGB"))[:, 32:])

    args[args.index(str(tmp_path / "mask.png"))] = str(tmp_path / "missing.png")
    assert CliRunner().invoke(app, args).exit_code == 2


def test_a_misspelt_render_option_fails_at_construction(engine: GenerationEngine) -> None:
    with pytest.raises(TypeError, match="guidance"):
        RenderRequest(prompt=PROMPT, seed=0, guidance=5.0)  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="stepz"):
        engine.render(PROMPT, 0, stepz=2)
