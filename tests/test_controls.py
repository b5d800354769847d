"""Control types: each preprocessor against an independent computation, and the engine's
ControlNets (one or several, with scales and guidance windows) on the stand-in SD1.5."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from engine_fixtures import PROMPT, one_thread  # noqa: F401  (a fixture: pytest finds it by name)
from PIL import Image, ImageDraw
from skimage import data
from typer.testing import CliRunner

from charaforge.cli import app
from charaforge.config import ModelConfig
from charaforge.generate import controls
from charaforge.generate.engine import GenerationEngine
from charaforge.generate.records import read_sidecar, write_image
from charaforge.generate.request import CONTROL_TYPES, Conditioning, ControlUnit
from charaforge.models.base import write_base

pytestmark = pytest.mark.usefixtures("one_thread")

RENDER = {"steps": 3, "guidance_scale": 5.0, "width": 32, "height": 32}


@pytest.fixture(scope="module")
def astronaut() -> Image.Image:
    return Image.fromarray(data.astronaut()).resize((128, 128), Image.Resampling.BICUBIC)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("controls") / "base"
    write_base(ModelConfig(family="sd15", source="stand_in", resolution=32), base)
    return base


@pytest.fixture(scope="module")
def engine(base_dir: Path) -> GenerationEngine:
    return GenerationEngine(base_dir, device="cpu", cpu_threads=1)


def _array(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.float64)


def test_canny_is_opencv_canny(astronaut: Image.Image) -> None:
    import cv2

    gray = cv2.cvtColor(np.asarray(astronaut), cv2.COLOR_RGB2GRAY)
    expected = cv2.Canny(gray, 100, 200)
    made = np.asarray(controls.canny_map(astronaut))
    assert made.shape == (128, 128, 3) and 0 < (expected > 0).mean() < 0.5
    # PIL's and OpenCV's grey conversions round a few pixels differently.
    assert (made[..., 0] != expected).mean() < 0.01
    assert (made[..., 0] == made[..., 2]).all()


def test_lineart_softedge_scribble_on_a_drawn_square() -> None:
    """A dark square outline on white: lines where the outline is, strokes wider than edges."""
    image = Image.new("RGB", (64, 64), "white")
    ImageDraw.Draw(image).rectangle((16, 16, 47, 47), outline="black", width=2)
    outline = np.zeros((64, 64), bool)
    outline[16:48, 16:48] = True
    outline[18:46, 18:46] = False
    lines = _array(controls.lineart_map(image))[..., 0] > 0
    assert lines[outline].mean() > 0.9 and lines[~outline].mean() < 0.05

    soft = _array(controls.softedge_map(image))[..., 0]
    assert soft.max() == 255 and soft[30:34, 30:34].max() == 0  # flat interior: no gradient
    assert soft[17, 30] > 100 and soft[2, 2] == 0

    edges = _array(controls.canny_map(image))[..., 0] > 0
    strokes = _array(controls.scribble_map(image, stroke=3))[..., 0] > 0
    assert (strokes >= edges).all() and strokes.sum() > 1.5 * edges.sum()


def test_normal_of_a_known_depth_ramp_matches_the_hand_computation() -> None:
    slope = 0.5
    ramp = np.tile(np.arange(32, dtype=np.float32) * slope, (32, 1))  # nearer to the right
    normal = _array(controls.normal_from_depth(ramp))
    # n = (-k, 0, 1) / sqrt(k^2 + 1), RGB = (n + 1) * 127.5
    length = np.sqrt(slope**2 + 1)
    expected = np.round((np.array([-slope, 0.0, 1.0]) / length + 1) * 127.5)
    np.testing.assert_array_equal(normal[8:24, 8:24], np.broadcast_to(expected, (16, 16, 3)))
    flat = _array(controls.normal_from_depth(np.ones((8, 8), np.float32)))
    assert (flat == [128, 128, 255]).all()


def test_segmentation_is_mediapipe_person_mask(astronaut: Image.Image) -> None:
    import mediapipe as mp

    with mp.solutions.selfie_segmentation.SelfieSegmentation(model_selection=0) as segmenter:
        probability = segmenter.process(np.asarray(astronaut)).segmentation_mask
    person = probability >= 0.5
    seg = np.asarray(controls.segmentation_map(astronaut))
    assert (np.all(seg == controls.ADE20K_PERSON, axis=-1) == person).all()
    assert (seg[~person] == 0).all()
    assert 0.2 < person.mean() < 0.8  # the astronaut fills about half the photo


def test_depth_stand_in_is_deterministic_and_every_type_makes_a_map(
    astronaut: Image.Image,
) -> None:
    preprocessor = controls.ControlPreprocessor()
    assert preprocessor.depth_is_stand_in
    depth = preprocessor.depth(astronaut)
    assert depth.shape == (128, 128) and depth.std() > 0
    np.testing.assert_array_equal(depth, controls.ControlPreprocessor().depth(astronaut))
    # normal is computed from the depth the same preprocessor estimates
    np.testing.assert_array_equal(
        np.asarray(preprocessor("normal", astronaut)),
        np.asarray(controls.normal_from_depth(depth)),
    )
    for control_type in CONTROL_TYPES:
        made = preprocessor(control_type, astronaut)
        assert made.size == astronaut.size and made.mode == "RGB", control_type
        assert np.asarray(made).std() > 0, control_type
    with pytest.raises(ValueError, match="control_type"):
        preprocessor("sketchy", astronaut)


def test_each_control_type_changes_the_render_and_its_scale_matters(
    engine: GenerationEngine, astronaut: Image.Image
) -> None:
    plain = _array(engine.render(PROMPT, 1, **RENDER))
    preprocessor = controls.ControlPreprocessor()
    for control_type in CONTROL_TYPES:
        image = preprocessor(control_type, astronaut)
        renders = {
            scale: _array(
                engine.render(
                    PROMPT,
                    1,
                    conditioning=Conditioning(
                        "control", image, control_type=control_type, conditioning_scale=scale
                    ),
                    **RENDER,
                )
            )
            for scale in (0.0, 0.5, 1.5)
        }
        # scale 0 adds zero residuals: the unconditioned image up to float rounding
        assert np.abs(renders[0.0] - plain).max() <= 1.0, control_type
        assert np.abs(renders[1.5] - plain).mean() > 0.5, control_type
        assert np.abs(renders[1.5] - renders[0.5]).mean() > 0.2, control_type


def test_several_controlnets_with_their_own_scales_and_windows(
    engine: GenerationEngine, astronaut: Image.Image, tmp_path: Path
) -> None:
    canny = controls.canny_map(astronaut)
    seg = controls.segmentation_map(astronaut)

    def render(*units: ControlUnit) -> Image.Image:
        first, *rest = units
        conditioning = Conditioning(
            "control",
            first.image,
            control_type=first.control_type,
            conditioning_scale=first.conditioning_scale,
            guidance_start=first.guidance_start,
            guidance_end=first.guidance_end,
            controls=tuple(rest),
        )
        return engine.render(PROMPT, 2, conditioning=conditioning, **RENDER)

    canny_only = render(ControlUnit("canny", canny))
    both = render(ControlUnit("canny", canny), ControlUnit("segmentation", seg))
    assert np.abs(_array(both) - _array(canny_only)).mean() > 0.2
    # The second net at scale 0 contributes nothing: the first alone, up to rounding.
    muted = render(ControlUnit("canny", canny), ControlUnit("segmentation", seg, 0.0))
    assert np.abs(_array(muted) - _array(canny_only)).max() <= 1.0
    # A guidance window that ends early acts in fewer steps: a different image.
    early = render(ControlUnit("canny", canny), ControlUnit("segmentation", seg, 1.0, 0.0, 0.34))
    assert np.abs(_array(early) - _array(both)).mean() > 0.1
    # ...and one that starts late too (each net keeps its own window)
    late = render(ControlUnit("canny", canny), ControlUnit("segmentation", seg, 1.0, 0.6, 1.0))
    assert np.abs(_array(late) - _array(both)).mean() > 0.1
    assert np.abs(_array(late) - _array(early)).mean() > 0.1
    assert type(engine._derived[("control", "canny+segmentation")].controlnet).__name__ == (
        "MultiControlNetModel"
    )
    parameters = json.loads(early.info["charaforge"])["conditioning"]
    assert parameters["controls"][0]["control_type"] == "segmentation"
    assert parameters["controls"][0]["guidance_end"] == pytest.approx(0.34)
    assert 'ControlNet 1: "Module: segmentation' in early.info["parameters"]

    out = tmp_path / "both.png"
    write_image(out, both)
    units = (ControlUnit("canny", canny), ControlUnit("segmentation", seg))
    written = controls.save_control_maps(out, units)
    names = ["both.control0-canny.png", "both.control1-segmentation.png"]
    assert [p.name for p in written] == names
    assert np.array_equal(np.asarray(Image.open(written[1]).convert("RGB")), np.asarray(seg))
    assert read_sidecar(out)["conditioning"]["controls"][0]["control_type"] == "segmentation"


def test_bad_control_settings_fail_clearly(astronaut: Image.Image) -> None:
    with pytest.raises(ValueError, match="guidance window"):
        ControlUnit("canny", astronaut, guidance_start=0.6, guidance_end=0.5)
    with pytest.raises(ValueError, match="control_type"):
        Conditioning("control", astronaut, controls=(ControlUnit("nope", astronaut),))
    with pytest.raises(ValueError, match="only kind 'control'"):
        Conditioning("img2img", astronaut, controls=(ControlUnit("canny", astronaut),))


def test_generate_cli_makes_maps_from_photos_and_saves_them(
    base_dir: Path, astronaut: Image.Image, tmp_path: Path
) -> None:
    photo = tmp_path / "photo.png"
    astronaut.save(photo)
    out = tmp_path / "posed.png"
    arguments = ["generate", PROMPT, "--control-image", str(photo), "--control-type", "canny"]
    arguments += ["--control-from-photo", "--extra-control", f"segmentation:{photo}:0.5:0:0.5"]
    arguments += ["--control-window", "0", "0.75", "--steps", "2", "--width", "32"]
    arguments += ["--height", "32", "--base", str(base_dir), "--out", str(out)]
    result = CliRunner().invoke(app, [*arguments, "--device", "cpu"])
    assert result.exit_code == 0, result.output
    canny = Image.open(tmp_path / "posed.control0-canny.png").convert("RGB")
    assert np.array_equal(np.asarray(canny), np.asarray(controls.canny_map(astronaut)))
    assert (tmp_path / "posed.control1-segmentation.png").is_file()
    conditioning = read_sidecar(out)["conditioning"]
    assert conditioning["guidance_end"] == 0.75
    assert conditioning["controls"][0] == {
        **conditioning["controls"][0],
        "control_type": "segmentation",
        "conditioning_scale": 0.5,
        "guidance_end": 0.5,
    }
    bad = CliRunner().invoke(app, [*arguments[:-2], "--extra-control", "canny", "--out", str(out)])
    assert bad.exit_code == 2
