"""One SD1.5 training step and one 64 px render at the real model shapes, on CPU.

The UNet (860M parameters), the CLIP ViT-L text encoder (12 layers, width 768) and the VAE are
built from SD1.5's published configurations with seeded random weights (no weights can be
downloaded here), saved as a diffusers folder with the real CLIP BPE tokenizer, and used as a
`pretrained` base: the project's loader finds and reads it, its trainer takes one step with LoRA
on the UNet (`all` preset) and the text encoder at clip skip 2, and its engine renders with the
exported file, plain and through a real-shaped ControlNet (diffusers' `from_unet`, SD1.5's
(16, 32, 96, 256) conditioning embedding). What only real shapes show is checked: 12 text layers
(clip skip 2 leaves the last one untrained), 768-wide cross-attention, conv LoRAs on 320-1280
channels, the kohya keys of a real training run against every tool's layout, 3-channel control
conditioning at pixel resolution.

Memory: each phase frees its models (peak RSS about 6-7 GB, printed). The parameter counts are
SD1.5's published ones, so a config that drifts from the real one fails here.
"""

from __future__ import annotations

import gc
import resource
import shutil
import time
from collections.abc import Iterator
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from engine_fixtures import one_thread  # noqa: F401  (a fixture: pytest finds it by name)
from peft.tuners.lora import LoraLayer
from PIL import Image, ImageDraw
from safetensors import safe_open
from safetensors.torch import load_file
from test_lora_real_shapes import CLIP_L, EXPECTED_MODULES, SD15_UNET, unmatched_per_tool
from test_models_train import make_dataset

from charaforge.config import ModelConfig, TrainConfig
from charaforge.core.layout import checkpoint_dir, checkpoint_path
from charaforge.generate.conditioning import build_stand_in_controlnet
from charaforge.generate.engine import GenerationEngine
from charaforge.generate.request import Conditioning
from charaforge.models.base import (
    assemble_sd15_pipeline,
    build_clip_tokenizer,
    save_stand_in,
    write_base,
)
from charaforge.models.lora_files import kohya_file_name
from charaforge.train import train_candidate

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

# SD1.5's VAE (its vae/config.json).
SD15_VAE = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 2,
    "down_block_types": ("DownEncoderBlock2D",) * 4, "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (128, 256, 512, 512), "norm_num_groups": 32, "sample_size": 512,
    "scaling_factor": 0.18215,
}  # fmt: skip
# The published parameter counts of SD1.5's UNet, CLIP ViT-L/14 text tower and VAE.
SD15_PARAMETERS = {"unet": 859_520_964, "text_encoder": 123_060_480, "vae": 83_653_863}
RANK, ALPHA, CLIP_SKIP = 4, 2.0, 2


def _peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def _report(label: str, start: float) -> None:
    print(f"{label}: {time.perf_counter() - start:.1f} s, peak RSS {_peak_rss_gib():.2f} GiB")


@pytest.fixture(scope="module")
def real_base(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimpleNamespace]:
    """data/base for a local diffusers folder holding the real-shaped SD1.5 (random weights),
    and a real-shaped ControlNet folder beside it. Removed afterwards (about 6 GB)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    start = time.perf_counter()
    root = tmp_path_factory.mktemp("real_sd15")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        unet = UNet2DConditionModel(**SD15_UNET)
        text_encoder = CLIPTextModel(CLIPTextConfig(**CLIP_L))
        vae = AutoencoderKL(**SD15_VAE)
        # The project's ControlNet builder: diffusers' from_unet, output convolutions non-zero.
        controlnet = build_stand_in_controlnet(unet, "openpose")
    counts = {
        name: sum(p.numel() for p in model.parameters())
        for name, model in (("unet", unet), ("text_encoder", text_encoder), ("vae", vae))
    }
    assert counts == SD15_PARAMETERS
    pipeline = assemble_sd15_pipeline(vae, unet, text_encoder, build_clip_tokenizer())
    save_stand_in(pipeline, root / "weights")  # diffusers layout + vocab.json / merges.txt
    controlnet.save_pretrained(root / "controlnet")
    del pipeline, unet, text_encoder, vae, controlnet
    gc.collect()
    model = ModelConfig(
        family="sd15", source="pretrained", path=str(root / "weights"), resolution=64
    )
    write_base(model, root / "base")
    _report("real SD1.5 built and saved", start)
    yield SimpleNamespace(root=root, base=root / "base", controlnet=root / "controlnet")
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def trained(real_base: SimpleNamespace) -> SimpleNamespace:
    """One step of the project's trainer on the real-shaped base: LoRA on the UNet (every
    Linear/Conv2d of its blocks) and the text encoder, captions at clip skip 2, 64 px images."""
    start = time.perf_counter()
    root = real_base.root
    dataset = make_dataset(root / "dataset", train_images=1, val_images=1)
    train = TrainConfig(
        batch_size=1, max_steps=1, checkpoint_every=1, target_modules="all",
        text_encoder_lora=True, clip_skip=CLIP_SKIP, cpu_threads=1,
        cache={"latents": False, "text_encoder_outputs": False, "dir": str(root / "cache")},
        candidates=[{"name": "real", "rank": RANK, "alpha": ALPHA, "learning_rate": 1e-2}],
    )  # fmt: skip
    result = train_candidate(
        real_base.base, dataset, train.candidates[0], train, 64, 3, root / "train",
        state_dir=root / "state",
    )  # fmt: skip
    gc.collect()
    _report("one training step (load, step, validation, export)", start)
    kohya = checkpoint_dir(root / "train", 1) / kohya_file_name("real", 1)
    return SimpleNamespace(result=result, kohya=kohya, diffusers=checkpoint_path(root / "train", 1))


def test_one_training_step_at_real_shapes_trains_what_it_should(trained: SimpleNamespace) -> None:
    assert np.isfinite(trained.result.final_loss)
    tensors = load_file(str(trained.kohya))
    with safe_open(str(trained.kohya), "pt") as handle:
        metadata = handle.metadata()
    assert metadata["ss_clip_skip"] == str(CLIP_SKIP)
    assert metadata["ss_base_model_version"] == "sd_v1"
    modules: dict[str, dict[str, tuple[int, ...]]] = {}
    for key, value in tensors.items():
        module, _, suffix = key.partition(".")
        modules.setdefault(module, {})[suffix] = tuple(value.shape)
    # Every module of the real layout, every key matched by every tool's rule.
    assert len(modules) == EXPECTED_MODULES["sd15", "all"]
    assert unmatched_per_tool("sd15", modules) == {"kohya": [], "comfyui": [], "a1111": []}
    for module in modules:
        assert float(tensors[f"{module}.alpha"]) == ALPHA
    # The real widths: cross-attention keys read 768-wide text states, the deepest blocks are
    # 1280 wide, the text encoder's MLP 3072.
    attn2 = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    assert modules[attn2]["lora_down.weight"] == (RANK, 768)
    assert modules["lora_unet_mid_block_resnets_0_conv1"]["lora_down.weight"] == (RANK, 1280, 3, 3)
    assert modules["lora_te_text_model_encoder_layers_0_mlp_fc1"]["lora_up.weight"] == (3072, RANK)

    # The up matrices start at zero: a module trained iff its up matrix moved. Every UNet module
    # and the text layers 0-10 got a gradient; at clip skip 2 the 12th layer's output is never
    # used, so its LoRA is exactly as initialised.
    def moved(module: str) -> bool:
        return bool(tensors[f"{module}.lora_up.weight"].abs().max() > 0)

    unet = [m for m in modules if m.startswith("lora_unet_")]
    text = [m for m in modules if m.startswith("lora_te_")]
    assert len(unet) == EXPECTED_MODULES["sd15", "all"] - 12 * 6 and len(text) == 12 * 6
    assert all(moved(m) for m in unet)
    last = "lora_te_text_model_encoder_layers_11_"
    assert all(moved(m) for m in text if not m.startswith(last))
    assert not any(moved(m) for m in text if m.startswith(last))


def _skeleton() -> Image.Image:
    image = Image.new("RGB", (64, 64), (0, 0, 0))
    draw = ImageDraw.Draw(image)
    draw.line((32, 10, 32, 40), fill=(255, 0, 0), width=3)
    draw.line((20, 22, 44, 22), fill=(0, 255, 0), width=3)
    draw.line((32, 40, 22, 60), fill=(0, 0, 255), width=3)
    draw.line((32, 40, 42, 60), fill=(255, 255, 0), width=3)
    return image


def test_one_render_at_real_shapes_with_the_lora_and_a_controlnet(
    real_base: SimpleNamespace, trained: SimpleNamespace
) -> None:
    start = time.perf_counter()
    engine = GenerationEngine(
        real_base.base, device=torch.device("cpu"), cpu_threads=1,
        controlnets={"openpose": str(real_base.controlnet)},
    )  # fmt: skip
    assert engine.text_layers == 12
    engine.load_lora("kohya", trained.kohya)
    engine.load_lora("diffusers", trained.diffusers)
    # Both files reach every trained layer of the UNet and the text encoder, with the same
    # weights and scale (the kohya file through diffusers' converter of A1111's names).
    models = (engine.pipeline.unet, engine.pipeline.text_encoder)
    layers = [m for model in models for m in model.modules() if isinstance(m, LoraLayer)]
    for name in ("kohya", "diffusers"):
        assert sum(name in layer.lora_A for layer in layers) == EXPECTED_MODULES["sd15", "all"]
    for layer in layers:
        for factor in (layer.lora_A, layer.lora_B):
            torch.testing.assert_close(factor["kohya"].weight, factor["diffusers"].weight)
        assert layer.scaling["kohya"] == layer.scaling["diffusers"] == ALPHA / RANK
    request = {"steps": 2, "guidance_scale": 5.0, "clip_skip": CLIP_SKIP, "width": 64}

    def render(**options) -> np.ndarray:
        image = engine.render("aoi_cf, 1girl, red hair", 7, **request, **options)
        assert image.size == (64, 64) and image.mode == "RGB"
        pixels = np.asarray(image, dtype=np.int16)
        assert pixels.std() > 1.0  # not a flat image (a NaN render decodes to black)
        return pixels

    off = render(loras={"kohya": 0.0})
    kohya = render(loras={"kohya": 1.0})
    # The LoRA changes the image; the kohya file (A1111's names, read through diffusers'
    # converter) and the diffusers file are the same weights, so they render alike.
    assert np.abs(kohya - off).mean() > 1.0
    assert np.abs(render(loras={"diffusers": 1.0}) - kohya).max() <= 2
    posed = render(loras={"kohya": 1.0}, conditioning=Conditioning("control", _skeleton()))
    assert np.abs(posed - kohya).mean() > 1.0
    controlnet = engine.controlnet("openpose")
    assert controlnet.controlnet_cond_embedding.conv_in.in_channels == 3
    assert tuple(controlnet.config.block_out_channels) == SD15_UNET["block_out_channels"]
    _report("engine load + 4 renders (2 steps, CFG)", start)
