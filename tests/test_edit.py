"""Background replacement and relighting on the stand-in SD1.5 (64 px, 3 steps)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from engine_fixtures import one_thread  # noqa: F401  (a fixture: pytest finds it by name)
from PIL import Image, ImageDraw
from safetensors.torch import save_file
from skimage import data
from typer.testing import CliRunner

from charaforge.cli import app
from charaforge.config import ModelConfig
from charaforge.errors import ConfigError
from charaforge.generate import edit, relight
from charaforge.generate.controls import person_mask
from charaforge.generate.engine import GenerationEngine
from charaforge.generate.records import read_sidecar
from charaforge.models.base import write_base

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPT = "a beach at sunset"
STEPS = {"steps": 3, "guidance_scale": 5.0}


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("edit") / "base"
    write_base(ModelConfig(family="sd15", source="stand_in", resolution=64), base)
    return base


@pytest.fixture(scope="module")
def engine(base_dir: Path) -> GenerationEngine:
    return GenerationEngine(base_dir, device="cpu", cpu_threads=1)


@pytest.fixture(scope="module")
def product() -> tuple[Image.Image, Image.Image]:
    """A striped red 'product' on a grey table, and its mask (white = the subject)."""
    image = Image.new("RGB", (64, 64), (128, 128, 128))
    draw = ImageDraw.Draw(image)
    draw.rectangle((18, 14, 45, 53), fill=(220, 30, 40))
    for y in range(16, 52, 6):
        draw.line((18, y, 45, y), fill=(250, 220, 0), width=2)
    mask = Image.new("L", (64, 64), 0)
    ImageDraw.Draw(mask).rectangle((18, 14, 45, 53), fill=255)
    return image, mask


def _array(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.float64)


def test_subject_kept_outside_the_margin_background_replaced(
    engine: GenerationEngine, product: tuple[Image.Image, Image.Image]
) -> None:
    image, mask = product
    request = edit.EditRequest(image=image, prompt=PROMPT, seed=3, mask=mask, **STEPS)
    result = edit.replace_background(engine, request)
    after, before = _array(result.image), _array(image)
    inside = np.asarray(mask) >= 128
    # 4 px or more inside the subject (independently: the mask shrunk by 4 px on each side)
    core = np.zeros_like(inside)
    core[18:50, 22:42] = True
    assert np.array_equal(after[core], before[core])
    assert np.abs(after[~inside] - before[~inside]).mean() > 5.0  # a new background
    # the margin mixes the two: neither the original nor the new background there
    ring = inside & ~core
    alpha = result.alpha
    assert (alpha[core] == 1.0).all() and (alpha[~inside] == 0.0).all()
    assert 0.0 < alpha[ring].min() < 1.0
    assert alpha[32, 18] < alpha[32, 19] < alpha[32, 20] < alpha[32, 21]
    background = _array(result.background)
    ring_mix = after[ring]
    assert not np.array_equal(ring_mix, before[ring])
    assert not np.array_equal(ring_mix, background[ring])
    # deterministic
    again = edit.replace_background(engine, request)
    assert np.array_equal(_array(again.image), after)
    # the parameters of the background render travel with the image
    assert result.image.info["parameters"].startswith(PROMPT)


def test_blend_margin_zero_keeps_every_subject_pixel(
    engine: GenerationEngine, product: tuple[Image.Image, Image.Image]
) -> None:
    image, mask = product
    request = edit.EditRequest(
        image=image, prompt=PROMPT, seed=3, mask=mask, blend_margin=0, **STEPS
    )
    result = edit.replace_background(engine, request)
    inside = np.asarray(mask) >= 128
    assert np.array_equal(_array(result.image)[inside], _array(image)[inside])


def test_ground_shadow_darkens_only_the_background_under_the_subject(
    engine: GenerationEngine, product: tuple[Image.Image, Image.Image]
) -> None:
    image, mask = product
    plain = edit.replace_background(
        engine, edit.EditRequest(image=image, prompt=PROMPT, seed=3, mask=mask, **STEPS)
    )
    shaded = edit.replace_background(
        engine,
        edit.EditRequest(
            image=image, prompt=PROMPT, seed=3, mask=mask, shadow=True, shadow_opacity=0.8, **STEPS
        ),
    )
    a, b = _array(plain.image), _array(shaded.image)
    under = (slice(54, 57), slice(24, 40))  # just below the subject's foot
    assert b[under].mean() < 0.8 * a[under].mean()
    assert np.array_equal(a[:8], b[:8])  # far above: untouched
    inside = np.asarray(mask) >= 128
    core = np.zeros_like(inside)
    core[18:50, 22:42] = True
    assert np.array_equal(a[core], b[core])


def test_segmentation_mask_when_none_is_given(engine: GenerationEngine) -> None:
    photo = Image.fromarray(data.astronaut()).resize((64, 64), Image.Resampling.LANCZOS)
    result = edit.replace_background(
        engine, edit.EditRequest(image=photo, prompt=PROMPT, seed=0, **STEPS)
    )
    expected = np.asarray(person_mask(photo))
    assert np.array_equal(np.asarray(result.subject_mask), expected)
    assert 0.2 < (expected > 0).mean() < 0.8


def test_stand_in_relight_changes_the_background_and_keeps_the_subject(
    engine: GenerationEngine, product: tuple[Image.Image, Image.Image], tmp_path: Path
) -> None:
    image, mask = product
    relighter = edit.make_relighter(engine, None)
    assert relighter.stand_in and relighter.unet.config.in_channels == 8
    common = {"image": image, "prompt": PROMPT, "seed": 3, "mask": mask, **STEPS}
    plain = edit.replace_background(engine, edit.EditRequest(**common))
    relit = edit.replace_background(
        engine, edit.EditRequest(**common, relight=True), relighter=relighter
    )
    assert relit.relit is not None
    # the subject's latent reaches the UNet only through IC-Light's extra input channels
    composite = relit.background
    with_subject = relighter.relight(composite, mask, PROMPT, 3, steps=3)
    without = relighter.relight(composite, Image.new("L", (64, 64), 0), PROMPT, 3, steps=3)
    assert np.abs(_array(with_subject) - _array(without)).mean() > 0.05
    assert np.array_equal(
        _array(with_subject), _array(relighter.relight(composite, mask, PROMPT, 3, steps=3))
    )
    outside = np.asarray(mask) < 128
    assert np.abs(_array(relit.image)[outside] - _array(plain.image)[outside]).mean() > 1.0
    core = (slice(18, 50), slice(22, 42))
    assert np.array_equal(_array(relit.image)[core], _array(image)[core])
    # subject_blend < 1 lets the relit light into the subject
    half = edit.replace_background(
        engine, edit.EditRequest(**common, relight=True, subject_blend=0.5), relighter=relighter
    )
    assert np.abs(_array(half.image)[core] - _array(image)[core]).mean() > 1.0

    paths = edit.write_edit(relit, tmp_path / "edited.png", "product", stand_in=True)
    sheet = Image.open(paths["sheet"])
    assert sheet.size == (5 * 128, 30 + 128)  # before, mask, background, relit, after
    # the first panel is the original, the last the result (nearest-neighbour thumbnails)
    first = np.asarray(sheet.convert("RGB"))[30:, :128]
    assert np.array_equal(first[::2, ::2], np.asarray(image)[:, :])
    assert read_sidecar(paths["image"])["conditioning"]["kind"] == "inpaint"
    assert np.array_equal(np.asarray(Image.open(paths["mask"])), np.asarray(mask))


def test_iclight_offsets_load_as_base_plus_offset(engine: GenerationEngine, tmp_path: Path) -> None:
    """Zero offsets give the base UNet (new channels zero); fbc is read from conv_in's width."""
    base = engine.pipeline.unet
    widened = relight.widened_unet(base, "fbc")
    zeros = {key: torch.zeros_like(value) for key, value in widened.state_dict().items()}
    path = tmp_path / "iclight_sd15_fbc.safetensors"
    save_file(zeros, str(path))
    loaded, variant = relight.load_iclight(path, base)
    assert variant == "fbc" and loaded.config.in_channels == 12
    generator = torch.Generator("cpu").manual_seed(0)
    latent = torch.randn(1, 4, 8, 8, generator=generator)
    extra = torch.randn(1, 8, 8, 8, generator=generator)
    text = torch.randn(1, 77, base.config.cross_attention_dim, generator=generator)
    with torch.no_grad():
        expected = base(latent, 10, encoder_hidden_states=text).sample
        got = loaded(torch.cat([latent, extra], 1), 10, encoder_hidden_states=text).sample
        torch.testing.assert_close(got, expected)
        # a real offset on the first convolution changes the output
        bumped = dict(zeros)
        bumped["conv_in.weight"] = torch.full_like(zeros["conv_in.weight"], 0.01)
        save_file(bumped, str(path))
        offset, _ = relight.load_iclight(path, base)
        changed = offset(torch.cat([latent, extra], 1), 10, encoder_hidden_states=text).sample
    assert (changed - expected).abs().mean() > 1e-4
    save_file({"conv_in.weight": torch.zeros(32, 5, 3, 3)}, str(path))
    with pytest.raises(ConfigError, match="4 or 8"):
        relight.load_iclight(path, base)


def test_edit_cli_writes_the_image_mask_and_sheet(
    base_dir: Path, product: tuple[Image.Image, Image.Image], tmp_path: Path
) -> None:
    image, mask = product
    image.save(tmp_path / "product.png")
    mask.save(tmp_path / "mask.png")
    out = tmp_path / "out" / "beach.png"
    arguments = ["edit", str(tmp_path / "product.png"), PROMPT]
    arguments += ["--mask", str(tmp_path / "mask.png")]
    arguments += ["--base", str(base_dir), "--steps", "2", "--shadow", "--out", str(out)]
    result = CliRunner().invoke(app, [*arguments, "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert out.is_file() and out.with_name("beach.sheet.png").is_file()
    assert out.with_name("beach.mask.png").is_file()
    bad = CliRunner().invoke(app, ["edit", str(tmp_path / "missing.png"), PROMPT])
    assert bad.exit_code == 2 and "Traceback" not in bad.output
