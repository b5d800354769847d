"""The exported LoRA files: both formats load through diffusers' `load_lora_weights` and render
the same image, the kohya file follows the A1111/ComfyUI conventions (SD1 and SDXL), its
text-encoder keys name modules of the real checkpoints' text encoders (real shapes, meta
device), and the PNGs name the kohya file with A1111's hash of it."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from test_models_train import make_dataset, tiny_train

from charaforge.config import ModelConfig
from charaforge.core.layout import checkpoint_path
from charaforge.generate.engine import GenerationEngine
from charaforge.generate.records import write_image
from charaforge.models.base import load_base_pipeline, write_base
from charaforge.models.lora_files import LoraExport, kohya_file_name, write_lora_files
from charaforge.train import RunContext, train_candidate
from charaforge.train.checks import TEXT_PRESETS

PREFIXES = {"sd15": ("lora_unet_", "lora_te_"), "sdxl": ("lora_unet_", "lora_te1_", "lora_te2_")}


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("dataset") / "dataset", train_images=2)


@pytest.fixture(scope="module", params=["sd15", "sdxl"])
def trained(request, tmp_path_factory: pytest.TempPathFactory, dataset_dir: Path) -> dict:
    """A LoRA on every layer kind (attention, feed-forward, convs) and the text encoder(s), with
    alpha != rank so a wrong alpha would show."""
    family = request.param
    root = tmp_path_factory.mktemp(family)
    write_base(ModelConfig(family=family, source="stand_in", resolution=64), root / "base")
    train = tiny_train(
        max_steps=2,
        checkpoint_every=2,
        target_modules="all",
        text_encoder_lora=True,
        candidates=[
            {
                "name": "c",
                "rank": 4,
                "alpha": 2,
                "learning_rate": 5e-2,
                "text_encoder_learning_rate": 1e-2,
            }
        ],
        cache={"latents": True, "text_encoder_outputs": False, "dir": str(root / "cache")},
    )
    context = RunContext(trigger="aoi_cf", git_commit="0123abc")
    train_candidate(
        root / "base", dataset_dir, train.candidates[0], train, 64, 3, root / "out",
        state_dir=root / "state", context=context,
    )  # fmt: skip
    folder = checkpoint_path(root / "out", 2).parent
    return {"family": family, "base": root / "base", "folder": folder}


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The trainer's default state and cache folders are relative (data/...): keep them here.
    monkeypatch.chdir(tmp_path)


def _render(pipeline, lora: Path | None) -> np.ndarray:
    if lora is not None:
        pipeline.load_lora_weights(str(lora))
    generator = torch.Generator("cpu").manual_seed(11)
    image = pipeline(
        "aoi_cf, 1girl", num_inference_steps=2, generator=generator, height=64, width=64,
        output_type="np",
    ).images[0]  # fmt: skip
    if lora is not None:
        pipeline.unload_lora_weights()
    return image


def test_both_formats_load_through_diffusers_and_render_identically(trained: dict) -> None:
    pipeline = load_base_pipeline(trained["base"])
    base = _render(pipeline, None)
    diffusers_image = _render(pipeline, trained["folder"] / "pytorch_lora_weights.safetensors")
    kohya_image = _render(pipeline, trained["folder"] / kohya_file_name("c", 2))
    assert np.abs(diffusers_image - base).max() > 1e-3  # the LoRA does something
    np.testing.assert_allclose(kohya_image, diffusers_image, rtol=0, atol=1e-6)
    # And the base comes back once unloaded.
    np.testing.assert_array_equal(_render(pipeline, None), base)


def test_kohya_keys_alpha_and_metadata_follow_the_conventions(trained: dict) -> None:
    family = trained["family"]
    with safe_open(str(trained["folder"] / kohya_file_name("c", 2)), "pt") as handle:
        keys = list(handle.keys())
        tensors = {key: handle.get_tensor(key) for key in keys}
        metadata = handle.metadata()
    modules = {
        key.rsplit(".", 2)[0] if key.endswith(".weight") else key.rsplit(".", 1)[0] for key in keys
    }
    for module in modules:
        assert module.startswith(PREFIXES[family]), module
        assert re.fullmatch(r"lora_(unet|te|te1|te2)_[A-Za-z0-9_]+", module), module
        assert f"{module}.lora_down.weight" in tensors and f"{module}.lora_up.weight" in tensors
        assert float(tensors[f"{module}.alpha"]) == 2.0  # the trained alpha, not the rank
        assert tensors[f"{module}.lora_down.weight"].shape[0] == 4
    for prefix in PREFIXES[family]:
        assert any(module.startswith(prefix) for module in modules), prefix
    # Attention, feed-forward and resnet convs (4-d weights) are all there.
    assert any(module.endswith("attn1_to_q") for module in modules)
    assert any(module.endswith("ff_net_2") for module in modules)
    assert any(tensors[f"{m}.lora_down.weight"].ndim == 4 for m in modules)
    expected_version = {"sd15": "sd_v1", "sdxl": "sdxl_base_v1-0"}[family]
    assert metadata["ss_base_model_version"] == expected_version
    assert metadata["ss_network_dim"] == "4" and metadata["ss_network_alpha"] == "2"
    assert metadata["ss_output_name"] == "c-000002"
    assert metadata["modelspec.architecture"].endswith("/lora")
    assert metadata["modelspec.trigger_phrase"] == "aoi_cf"
    assert metadata["ss_text_encoder_lr"] == "0.01" and metadata["ss_unet_lr"] == "0.05"
    assert metadata["charaforge.git_commit"] == "0123abc"
    assert metadata["charaforge.stand_in"] == "true"
    assert len(metadata["charaforge.data_hash"]) == len(metadata["charaforge.config_hash"]) == 16
    assert json.loads(metadata["ss_tag_frequency"])["train"]["aoi_cf"] == 2


def test_diffusers_file_carries_each_components_adapter_config(trained: dict) -> None:
    with safe_open(str(trained["folder"] / "pytorch_lora_weights.safetensors"), "pt") as handle:
        keys = list(handle.keys())
        config = json.loads(handle.metadata()["lora_adapter_metadata"])
    assert config["unet.r"] == 4 and config["unet.lora_alpha"] == 2
    assert config["text_encoder.lora_alpha"] == 2
    assert any(key.startswith("text_encoder.") for key in keys)
    if trained["family"] == "sdxl":
        assert any(key.startswith("text_encoder_2.") for key in keys)
        assert config["text_encoder_2.r"] == 4


def _te_modules(path: Path, prefix: str) -> dict[str, dict[str, torch.Tensor]]:
    """The kohya file's modules under one text-encoder prefix, with their tensors by suffix."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    with safe_open(str(path), "pt") as handle:
        names = handle.keys()  # safetensors' handle is not iterable
        for key in names:
            module, _, suffix = key.partition(".")
            if module.startswith(prefix):
                modules.setdefault(module.removeprefix(prefix), {})[suffix] = handle.get_tensor(key)
    return modules


def test_text_encoder_lora_loads_from_both_files_and_changes_the_encoding(trained: dict) -> None:
    """Both files put the text-encoder LoRA on every trained module (none silently dropped),
    and it changes what the encoder(s) compute, identically for the two layouts."""
    family = trained["family"]
    pipeline = load_base_pipeline(trained["base"])
    components = ["text_encoder", "text_encoder_2"] if family == "sdxl" else ["text_encoder"]
    tokens = pipeline.tokenizer(
        ["aoi_cf, 1girl"], padding="max_length", max_length=pipeline.tokenizer.model_max_length,
        return_tensors="pt",
    ).input_ids  # fmt: skip

    def encodings() -> dict[str, torch.Tensor]:
        with torch.no_grad():
            return {name: getattr(pipeline, name)(tokens)[0] for name in components}

    def wrapped(name: str) -> int:
        return sum(hasattr(m, "lora_A") for m in getattr(pipeline, name).modules())

    base = encodings()
    kohya = trained["folder"] / kohya_file_name("c", 2)
    prefixes = {"text_encoder": "lora_te_"} if family == "sd15" else {
        "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"
    }  # fmt: skip
    encoded = {}
    for file in (trained["folder"] / "pytorch_lora_weights.safetensors", kohya):
        pipeline.load_lora_weights(str(file))
        for name in components:
            assert wrapped(name) == len(_te_modules(kohya, prefixes[name])) > 0, (file, name)
        encoded[file.name] = encodings()
        pipeline.unload_lora_weights()
    for name in components:
        diffusers_state = encoded["pytorch_lora_weights.safetensors"][name]
        assert (diffusers_state - base[name]).abs().max() > 1e-4, name
        torch.testing.assert_close(encoded[kohya.name][name], diffusers_state)


def _a1111_lora_hash(path: Path) -> str:
    """A1111's hash of a .safetensors LoRA (kohya's "addnet" hash): SHA-256 of the bytes after
    the 8-byte length and the JSON header, first 12 hex digits."""
    data = path.read_bytes()
    header_length = int.from_bytes(data[:8], "little")
    return hashlib.sha256(data[8 + header_length :]).hexdigest()[:12]


def test_png_names_the_kohya_file_and_carries_its_a1111_hash(trained: dict, tmp_path: Path) -> None:
    """Rendered with the checkpoint folder (diffusers' file, as the sweep does), the PNG names
    the kohya file by its stem (as A1111 lists it) with A1111's hash of that file."""
    engine = GenerationEngine(trained["base"])
    engine.load_lora("c-2", trained["folder"])
    image = engine.render("aoi_cf, 1girl", 3, loras={"c-2": 0.5}, steps=2)
    write_image(tmp_path / "out.png", image)
    text = Image.open(tmp_path / "out.png").info["parameters"]
    kohya = trained["folder"] / "c-000002.safetensors"
    diffusers_file = trained["folder"] / "pytorch_lora_weights.safetensors"
    assert _a1111_lora_hash(kohya) != _a1111_lora_hash(diffusers_file)
    assert text.split("\n")[0].endswith(" <lora:c-000002:0.5>")
    assert f'Lora hashes: "c-000002: {_a1111_lora_hash(kohya)}"' in text


# --- real shapes -----------------------------------------------------------------------------

# The text encoders of the real checkpoints (the configs diffusers' single-file loader builds):
# SD1.5's and SDXL's first are CLIP ViT-L/14's text tower, SDXL's second OpenCLIP ViT-bigG's.
CLIP_L = {
    "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
    "intermediate_size": 3072, "vocab_size": 49408, "max_position_embeddings": 77,
    "hidden_act": "quick_gelu", "projection_dim": 768,
}  # fmt: skip
CLIP_BIG_G = {
    "hidden_size": 1280, "num_hidden_layers": 32, "num_attention_heads": 20,
    "intermediate_size": 5120, "vocab_size": 49408, "max_position_embeddings": 77,
    "hidden_act": "gelu", "projection_dim": 1280,
}  # fmt: skip
LORA_SUFFIXES = ("lora_down.weight", "lora_up.weight", "alpha")


def _clip_text_model(config: dict, with_projection: bool = False) -> torch.nn.Module:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    model_class = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    with torch.device("meta"):  # real shapes, no memory, no init
        return model_class(CLIPTextConfig(**config))


def _checkpoint_layout(config: dict) -> dict[str, torch.nn.Module]:
    """The text tower's modules as the original checkpoints name them (with the `text_model`
    level), built without the export code: CLIPTextModelWithProjection keeps that level in
    every transformers version, and diffusers' own constant for SD1.5 checkpoints confirms it."""
    from diffusers.loaders.single_file_utils import CHECKPOINT_KEY_NAMES, LDM_CLIP_PREFIX_TO_REMOVE

    reference = _clip_text_model(config, with_projection=True)
    checkpoint_keys = {LDM_CLIP_PREFIX_TO_REMOVE[0] + key for key in reference.state_dict()}
    assert CHECKPOINT_KEY_NAMES["clip"] in checkpoint_keys
    return {
        name: module
        for name, module in reference.named_modules()
        if name.startswith("text_model.") and isinstance(module, torch.nn.Linear)
    }


def _export_text_loras(folder: Path, family: str, preset: str) -> Path:
    """LoRAs on real-shaped text encoders, written by the project's exporter."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    encoders = {"text_encoder": _clip_text_model(CLIP_L)}  # flattened in transformers 5
    if family == "sdxl":
        encoders["text_encoder_2"] = _clip_text_model(CLIP_BIG_G, with_projection=True)
    generator = torch.Generator().manual_seed(0)
    states, configs = {}, {}
    for component, encoder in encoders.items():
        config = LoraConfig(r=4, lora_alpha=2, target_modules=TEXT_PRESETS[preset])
        encoder.add_adapter(config)
        # The encoder lives on the meta device: give its LoRA real values of the real shapes.
        states[component] = {
            key: torch.randn(value.shape, generator=generator)
            for key, value in get_peft_model_state_dict(encoder).items()
        }
        configs[component] = config.to_dict()
    export = LoraExport(family=family, name="c", step=1, rank=4, alpha=2.0, configs=configs)
    write_lora_files(folder, export, states, resolution=512)
    return folder / kohya_file_name("c", 1)


@pytest.mark.parametrize(
    ("family", "preset", "expected"),
    [
        ("sd15", "attention", {"lora_te_": 48}),
        ("sd15", "attention_ff", {"lora_te_": 72}),
        ("sdxl", "attention", {"lora_te1_": 48, "lora_te2_": 128}),
    ],
)
def test_text_encoder_keys_name_the_real_checkpoint_modules(
    tmp_path: Path, family: str, preset: str, expected: dict[str, int]
) -> None:
    """Every text-encoder key of the kohya file, stripped of its prefix and LoRA suffix, is a
    module of the checkpoint's text encoder (dots as `_`), every targeted module is there, and
    the shapes fit; the diffusers file uses the same paths under `text_encoder.`."""
    kohya = _export_text_loras(tmp_path, family, preset)
    layouts = {"lora_te_": CLIP_L, "lora_te1_": CLIP_L, "lora_te2_": CLIP_BIG_G}
    components = {"lora_te_": "text_encoder", "lora_te1_": "text_encoder"}
    components["lora_te2_"] = "text_encoder_2"
    with safe_open(str(tmp_path / "pytorch_lora_weights.safetensors"), "pt") as handle:
        diffusers_keys = set(handle.keys())
    counts = {}
    for prefix in expected:
        layout = _checkpoint_layout(layouts[prefix])
        by_kohya_name = {name.replace(".", "_"): name for name in layout}
        modules = _te_modules(kohya, prefix)
        unmatched = sorted(set(modules) - set(by_kohya_name))
        assert unmatched == [], f"{len(unmatched)} unmatched, e.g. {prefix}{unmatched[0]}"
        targeted = {n for n in layout if n.rsplit(".", 1)[-1] in TEXT_PRESETS[preset]}
        assert {by_kohya_name[name] for name in modules} == targeted
        counts[prefix] = len(modules)
        for name, tensors in modules.items():
            linear = layout[by_kohya_name[name]]
            assert sorted(tensors) == sorted(LORA_SUFFIXES), name
            assert tensors["lora_down.weight"].shape == (4, linear.in_features)
            assert tensors["lora_up.weight"].shape == (linear.out_features, 4)
            assert float(tensors["alpha"]) == 2.0
            component = components[prefix]
            for kind in ("lora_A", "lora_B"):
                assert f"{component}.{by_kohya_name[name]}.{kind}.weight" in diffusers_keys
    assert counts == expected
