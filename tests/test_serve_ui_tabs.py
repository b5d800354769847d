"""The web UI's feature tabs in Debian's Chromium (playwright), each observed by its effect:
an inpainting mask painted with the mouse and one uploaded, each changing only its region, a
canny ControlNet render that differs from the plain one and equals the engine's own, a suite
whose frame differs from its plain render, the selection report's champion and ranking, and the
training curves of an MLflow run."""

from __future__ import annotations

import io
import re
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from engine_fixtures import (
    PROMPT,
    make_workspace,
    one_thread,  # noqa: F401  (a fixture: pytest finds it by name)
)
from PIL import Image, ImageDraw
from serve_fixtures import running, write_selection

from charaforge.generate.controls import canny_map
from charaforge.generate.records import png_bytes
from charaforge.generate.request import Conditioning, RenderRequest
from charaforge.serve.app import create_app
from charaforge.serve.limits import ServerSettings

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking"]
RANKING = (
    "rank,candidate,step,lora_scale,composite,ci_low,ci_high\n"
    "1,r4,2,0.6,0.75,0.7,0.8\n"
    "2,r4,4,1.0,0.5,0.4,0.6\n"
)


def _photo() -> Image.Image:
    image = Image.new("RGB", (64, 64), (40, 90, 160))
    draw = ImageDraw.Draw(image)
    draw.rectangle([16, 8, 48, 56], fill=(230, 200, 60))
    draw.ellipse([24, 14, 40, 30], fill=(250, 250, 250))
    return image


def _training_run(uri: str) -> None:
    import mlflow

    client = mlflow.tracking.MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("ui-test")
    run = client.create_run(experiment, tags={"charaforge.candidate": "r4"}, run_name="r4 · aoi")
    for step, (loss, val) in enumerate([(0.9, 0.95), (0.5, 0.61), (0.25, 0.375)], start=1):
        client.log_metric(run.info.run_id, "loss", loss, step=step)
        client.log_metric(run.info.run_id, "val_loss", val, step=step)
    client.set_terminated(run.info.run_id)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, object, Path]]:
    root = make_workspace(tmp_path_factory.mktemp("ui_tabs"), max_steps=2)
    write_selection(root / "reports", "r4", 2, 0.6)
    (root / "reports" / "ranking.csv").write_text(RANKING)
    (root / "reports" / "plots" / "images").mkdir(parents=True)
    _photo().save(root / "reports" / "plots" / "images" / "score_by_step.png")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    _training_run(uri)
    settings = ServerSettings(
        base_dir=root / "base",
        lora_dir=root / "none",
        train_dir=root / "train",
        reports_dir=root / "reports",
        devices=["cpu"],
        cpu_threads=1,
        outputs_dir=root / "outputs",
        tracking_uri=uri,
        ui=True,
    )
    app = create_app(settings)
    with running(app) as url:
        yield url, app, root
    app.state.batches.stop()
    app.state.service.stop()


def _pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(int)


def _gallery_images(page, gallery: str, count: int, replacing: str | None = None) -> list[bytes]:
    """The gallery's first `count` images, once shown (and, with `replacing`, once the first
    one is no longer the image of that source: a second run's result, not the first's)."""
    from playwright.sync_api import expect

    images = page.locator(f"#{gallery} img")
    expect(images.nth(count - 1)).to_be_visible(timeout=180_000)
    if replacing is not None:
        expect(images.first).not_to_have_attribute("src", replacing, timeout=180_000)
    sources = [images.nth(i).get_attribute("src") for i in range(count)]
    return [page.request.get(source).body() for source in sources]


def _zoom(page, editor: str) -> str:
    return page.locator(f"#{editor}").get_by_role("button", name=re.compile(r"^\d+%$")).inner_text()


def _brush_stroke(page, editor: str, unloaded_zoom: str, size: int = 64) -> None:
    """A mouse drag with the editor's brush (its default tool) near the left edge of the
    image, at mid height. The editor fits the image to its canvas (centred) once it has
    loaded it: wait for that zoom to settle, then place the stroke in image pixels."""
    deadline = time.monotonic() + 180
    previous = None
    while (zoom := _zoom(page, editor)) == unloaded_zoom or zoom != previous:
        assert time.monotonic() < deadline, f"the editor never fitted the image ({zoom})"
        previous = zoom
        page.wait_for_timeout(1000)
    scale = int(zoom.rstrip("%")) / 100
    box = page.locator(f"#{editor} canvas").first.bounding_box()
    centre_x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    left = centre_x - size / 2 * scale
    page.mouse.move(left + 2 * scale, y)
    page.mouse.down()
    for x in range(3, 7):
        page.mouse.move(left + x * scale, y, steps=3)
    page.mouse.up()


def _fill(page, prefix: str, prompt: str, steps: int = 2) -> None:
    page.locator(f"#{prefix}-prompt textarea").fill(prompt)
    page.locator(f"#{prefix}-steps input").fill(str(steps))


def test_feature_tabs(server, tmp_path: Path) -> None:
    from playwright.sync_api import expect, sync_playwright

    url, app, _ = server
    engine = app.state.service.engine
    photo = tmp_path / "photo.png"
    _photo().save(photo)
    mask = Image.new("L", (64, 64), 0)
    ImageDraw.Draw(mask).rectangle([0, 0, 31, 63], fill=255)  # repaint the left half only
    mask.save(tmp_path / "mask.png")
    requested: list[str] = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 2400})
            page.on("request", lambda request: requested.append(request.url))
            page.goto(f"{url}/ui/", wait_until="networkidle")

            # Inpaint with the brush: a stroke painted with the mouse on the editor's canvas is
            # the mask (shown beside the result); only the painted pixels change.
            page.get_by_role("tab", name="Image-to-image / Inpaint").click()
            unloaded = _zoom(page, "edit-image")
            page.locator("#edit-image input[type=file]").set_input_files(str(photo))
            _brush_stroke(page, "edit-image", unloaded)
            _fill(page, "edit", PROMPT)
            page.locator("#edit-run").click()
            result, used = (_pixels(data) for data in _gallery_images(page, "edit-gallery", 2))
            original = np.asarray(_photo()).astype(int)
            painted = used[..., 0] > 127
            assert painted[32, :8].all() and not painted[:, 48:].any()  # where it went
            assert (result[~painted] == original[~painted]).all()  # unpainted: the input's
            assert np.abs(result[painted] - original[painted]).mean() > 5  # painted: repainted
            brushed = page.locator("#edit-gallery img").first.get_attribute("src")

            # Inpaint with an uploaded mask (it wins over the painting): only the left half.
            page.locator("#edit-mask input[type=file]").set_input_files(str(tmp_path / "mask.png"))
            page.locator("#edit-run").click()
            inpainted = _pixels(_gallery_images(page, "edit-gallery", 1, replacing=brushed)[0])
            assert (inpainted[:, 32:] == original[:, 32:]).all()
            assert np.abs(inpainted[:, :32] - original[:, :32]).mean() > 5
            expect(page.locator("#edit-parameters")).to_contain_text('"inpaint"')

            # ControlNet, canny extracted from the photo: the engine's bytes, not the plain ones.
            page.get_by_role("tab", name="ControlNet").click()
            page.locator("#control-image input[type=file]").set_input_files(str(photo))
            page.locator("#control-type input").fill("canny")
            page.keyboard.press("Enter")
            page.locator("#control-source").get_by_label("photo").check()
            _fill(page, "control", PROMPT)
            page.locator("#control-run").click()
            rendered, control = _gallery_images(page, "control-gallery", 2)
            conditioning = Conditioning("control", canny_map(_photo()), control_type="canny")
            expected = engine.render_batch(
                [RenderRequest(prompt=PROMPT, seed=0, steps=2, conditioning=conditioning)]
            )[0]
            plain = engine.render_batch([RenderRequest(prompt=PROMPT, seed=0, steps=2)])[0]
            assert (_pixels(control) == np.asarray(canny_map(_photo()))).all()
            assert (_pixels(rendered) == np.asarray(expected)).all()
            assert png_bytes(expected) != png_bytes(plain)

            # A suite: identity shot plus one frame attending to it.
            page.get_by_role("tab", name="Character suites").click()
            page.locator("#suite-text textarea").fill(
                "beach#aoi_cf, 1girl, red hair#standing\nbeach#aoi_cf, 1girl, red hair#sitting"
            )
            page.locator("#suite-steps input").fill("2")
            page.locator("#suite-run").click()
            _, frame = _gallery_images(page, "suite-gallery", 2)
            expect(page.locator("#suite-gallery")).to_contain_text("group 1 · frame 1")
            alone = engine.render_batch(
                [RenderRequest(prompt="aoi_cf, 1girl, red hair, sitting, beach", seed=0, steps=2)]
            )[0]
            assert (_pixels(frame) != np.asarray(alone)).any()  # the shared attention acted
            expect(page.locator("#suite-parameters")).to_contain_text('"identity"')

            # Selection and Training read the report and MLflow.
            page.get_by_role("tab", name="Selection").click()
            expect(page.locator("#selection-champion textarea")).to_have_value(
                "champion: r4@2 at scale 0.6 (composite None)"
            )
            expect(page.locator("#selection-ranking")).to_contain_text("0.75")
            expect(page.locator("#selection-plots img").first).to_be_visible()
            page.get_by_role("tab", name="Training").click()
            table = page.locator("#training-table")
            expect(table).to_contain_text("val_loss")
            expect(table).to_contain_text("0.375")
        finally:
            browser.close()
    outside = [u for u in requested if not u.startswith(("http://127.0.0.1", "data:", "blob:"))]
    assert not outside, outside  # the page loads offline
