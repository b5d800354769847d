"""The generation engine, the sweep and the CLI, with a stand-in base and a LoRA trained here."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageDraw
from safetensors import safe_open
from typer.testing import CliRunner

from charaforge.cli import app
from charaforge.config import ConfigError, EvalConfig, ModelConfig, TrainConfig
from charaforge.engine import SCHEDULERS, GenerationEngine, read_sidecar, write_image
from charaforge.models import write_base
from charaforge.sweep import run_sweep
from charaforge.train import checkpoint_path, train_all

RENDER = {"steps": 4, "guidance_scale": 5.0, "negative_prompt": "lowres"}
PROMPT = "aoi_cf, 1girl, red hair"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """data/base (stand-in) and data/train (one candidate, alpha != rank, two checkpoints)."""
    root = tmp_path_factory.mktemp("engine")
    write_base(ModelConfig(family="sd15", source="stand_in", resolution=64), root / "base")
    images = root / "dataset" / "images"
    images.mkdir(parents=True)
    rows = []
    for index in range(4):
        image = Image.new("RGB", (64, 64), (200, 40 * index, 90))
        ImageDraw.Draw(image).ellipse((16, 8 + index, 48, 40 + index), fill=(20, 20, 220))
        image.save(images / f"{index}.png")
        rows.append(
            {"image_path": str(images / f"{index}.png"), "caption": PROMPT, "split": "train"}
        )
    pd.DataFrame(rows).to_parquet(root / "dataset" / "metadata.parquet")
    train = TrainConfig(
        batch_size=2,
        max_steps=4,
        checkpoint_every=2,
        target_modules=["to_q", "to_k", "to_v", "to_out.0"],
        candidates=[{"name": "r4", "rank": 4, "alpha": 8, "learning_rate": 0.05}],
    )
    train_all(
        root / "base",
        root / "dataset",
        train,
        64,
        1,
        root / "train",
        root / "plots",
        trigger="aoi_cf",
    )
    return root


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
    assert metadata["ss_output_name"] == "r4"
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
        expected = engine.parameters(PROMPT, 5, loras={"r4": 0.5}, **RENDER)
    finally:
        engine.unload_lora("r4")
    write_image(tmp_path / "out.png", image)
    text = Image.open(tmp_path / "out.png").info["parameters"]
    lines = text.split("\n")
    assert lines[0] == f"{PROMPT} <lora:r4:0.5>"
    assert lines[1] == "Negative prompt: lowres"
    assert "Steps: 4, Sampler: Euler, CFG scale: 5, Seed: 5, Size: 64x64" in lines[2]
    assert f'Lora hashes: "r4: {expected["loras"][0]["short_hash"]}"' in lines[2]
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


def test_sweep_refuses_a_candidate_named_base(engine: GenerationEngine, tmp_path: Path) -> None:
    (tmp_path / "summary.json").write_text(
        json.dumps({"candidates": [{"name": "base", "checkpoints": [1]}], "stand_in": True})
    )
    evaluation = EvalConfig(
        prompts=["x"], seeds=[0], lora_scales=[1.0], steps=1, guidance_scale=1, scheduler="ddim"
    )
    with pytest.raises(ConfigError, match="reserved"):
        run_sweep(engine, tmp_path, evaluation, "t", 64, 0, tmp_path / "out")


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
    assert sidecar["loras"][0]["name"] == "r4-2" and sidecar["loras"][0]["scale"] == 0.0
    # Scale 0 is the base model, pixel for pixel.
    assert _pixels(Image.open(out).convert("RGB")) == _pixels(engine.render(PROMPT, 7, **RENDER))

    args[args.index("r4@2:0")] = "nobody:1"
    missing = CliRunner().invoke(app, args)
    assert missing.exit_code == 2
    assert "no candidate 'nobody'" in caplog.text
