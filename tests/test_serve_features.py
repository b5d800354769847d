"""The generation features over HTTP on a real uvicorn: canny ControlNet (/api/v1/controlnet and
A1111's `alwayson_scripts.controlnet`), background replacement (/api/v1/edit), shared-attention
suites (/api/v1/suite), the selection report (/api/v1/eval/report), base64 pose images in batch
rows, and batch rows rendered together. Each served image is compared with the engine's own
render of the same request, made here apart from the server."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import requests
from engine_fixtures import (
    PROMPT,
    make_workspace,
    one_thread,  # noqa: F401  (a fixture: pytest finds it by name)
)
from PIL import Image, ImageDraw
from serve_fixtures import b64_png, decode, running, write_selection

from charaforge.generate.controls import canny_map
from charaforge.generate.edit import EditRequest, replace_background
from charaforge.generate.engine import GenerationEngine
from charaforge.generate.records import png_bytes
from charaforge.generate.request import Conditioning, RenderRequest
from charaforge.serve.app import create_app
from charaforge.serve.limits import ServerSettings
from charaforge.serve.ui_tabs import editor_mask

pytestmark = pytest.mark.usefixtures("one_thread")

RANKING = (
    "rank,candidate,step,lora_scale,composite,ci_low,ci_high\n"
    "1,r4,2,0.6,0.75,0.7,0.8\n"
    "2,r4,4,1.0,0.5,0.4,0.6\n"
    "3,r4,2,1.0,0.25,0.2,0.3\n"
)


def _photo() -> Image.Image:
    image = Image.new("RGB", (64, 64), (40, 90, 160))
    draw = ImageDraw.Draw(image)
    draw.rectangle([16, 8, 48, 56], fill=(230, 200, 60))
    draw.ellipse([24, 14, 40, 30], fill=(250, 250, 250))
    return image


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = make_workspace(tmp_path_factory.mktemp("features"), max_steps=4)
    write_selection(root / "reports", "r4", 2, 0.6)
    (root / "reports" / "ranking.csv").write_text(RANKING)
    return root


@pytest.fixture(scope="module")
def server(workspace: Path) -> Iterator[tuple[str, object]]:
    settings = ServerSettings(
        base_dir=workspace / "base",
        lora_dir=workspace / "none",
        train_dir=workspace / "train",
        reports_dir=workspace / "reports",
        devices=["cpu"],
        cpu_threads=1,
        outputs_dir=workspace / "outputs",
    )
    app = create_app(settings)
    with running(app) as url:
        yield url, app
    app.state.batches.stop()
    app.state.service.stop()


@pytest.fixture(scope="module")
def engine(workspace: Path) -> GenerationEngine:
    return GenerationEngine(workspace / "base", device="cpu")


def _saved(response: requests.Response) -> Image.Image:
    assert response.status_code == 200, response.text
    return Image.open(response.json()["image_path"]).convert("RGB")


def _same(a: Image.Image, b: Image.Image) -> bool:
    return a.size == b.size and (np.asarray(a) == np.asarray(b.convert("RGB"))).all()


def test_canny_controlnet_over_the_seed_api_and_a1111(server, engine) -> None:
    url, _ = server
    conditioning = Conditioning("control", canny_map(_photo()), control_type="canny")
    expected = engine.render_batch(
        [RenderRequest(prompt=PROMPT, seed=3, steps=2, conditioning=conditioning)]
    )[0]
    plain = engine.render_batch([RenderRequest(prompt=PROMPT, seed=3, steps=2)])[0]
    assert png_bytes(expected) != png_bytes(plain)

    body = {"prompt": PROMPT, "seed": 3, "steps": 2, "image": b64_png(_photo())}
    assert _same(_saved(requests.post(f"{url}/api/v1/controlnet", json=body)), expected)
    as_map = {**body, "image": b64_png(canny_map(_photo())), "extract": False}
    assert _same(_saved(requests.post(f"{url}/api/v1/controlnet", json=as_map)), expected)

    unit = {
        "input_image": b64_png(_photo()),
        "module": "canny",
        "model": "control_v11p_sd15_canny [d14c016b]",
        "weight": 1.0,
    }
    a1111 = {
        "prompt": PROMPT,
        "seed": 3,
        "steps": 2,
        "alwayson_scripts": {"controlnet": {"args": [unit]}, "ADetailer": {"args": []}},
    }
    response = requests.post(f"{url}/sdapi/v1/txt2img", json=a1111, timeout=120)
    assert response.status_code == 200, response.text
    assert _same(decode(response.json()["images"][0]).convert("RGB"), expected)
    info = json.loads(response.json()["info"])
    assert "alwayson_scripts.ADetailer" in info["ignored_fields"]
    disabled = {**a1111, "alwayson_scripts": {"controlnet": {"args": [{**unit, "enabled": False}]}}}
    response = requests.post(f"{url}/sdapi/v1/txt2img", json=disabled, timeout=120)
    assert _same(decode(response.json()["images"][0]).convert("RGB"), plain)
    unknown = {
        **a1111,
        "alwayson_scripts": {"controlnet": {"args": [{**unit, "model": "x", "module": "x"}]}},
    }
    refused = requests.post(f"{url}/sdapi/v1/txt2img", json=unknown, timeout=120)
    assert refused.status_code == 422 and "names no type" in refused.text


def test_background_replacement_keeps_the_subject(server, engine) -> None:
    url, _ = server
    subject = Image.new("L", (64, 64), 0)
    ImageDraw.Draw(subject).rectangle([16, 8, 48, 56], fill=255)
    body = {
        "prompt": "beach, sunset",
        "seed": 1,
        "steps": 2,
        "image": b64_png(_photo()),
        "mask": b64_png(subject),
    }
    served = _saved(requests.post(f"{url}/api/v1/edit", json=body, timeout=120))
    request = EditRequest(image=_photo(), prompt="beach, sunset", seed=1, mask=subject, steps=2)
    expected = replace_background(engine, request).image
    assert _same(served, expected)
    pixels, original = np.asarray(served).astype(int), np.asarray(_photo()).astype(int)
    assert (pixels[20:45, 28:37] == original[20:45, 28:37]).all()  # deep inside the subject
    assert np.abs(pixels[:, :8] - original[:, :8]).mean() > 5  # the background was repainted
    empty = {**body, "mask": b64_png(Image.new("L", (64, 64), 0))}
    refused = requests.post(f"{url}/api/v1/edit", json=empty, timeout=120)
    assert refused.status_code == 422 and "mask is empty" in refused.text


def test_a_suite_renders_groups_with_shared_attention(server, engine) -> None:
    url, _ = server
    text = "beach#aoi_cf, 1girl#standing\nbeach#aoi_cf, 1girl#sitting\n\npark#aoi_cf, 1girl#running"
    response = requests.post(
        f"{url}/api/v1/suite", json={"prompt": text, "seed": 2, "steps": 2}, timeout=300
    )
    assert response.status_code == 200, response.text
    groups = response.json()["groups"]
    assert [len(group) for group in groups] == [2, 1]
    identity, frame = (Image.open(item["image_path"]) for item in groups[0])
    alone = engine.render_batch(
        [
            RenderRequest(prompt=prompt, seed=2, steps=2)
            for prompt in ("aoi_cf, 1girl, standing, beach", "aoi_cf, 1girl, sitting, beach")
        ]
    )
    assert _same(identity.convert("RGB"), alone[0])  # the identity shot renders as alone
    assert not _same(frame.convert("RGB"), alone[1])  # the frame attends to it
    record = json.loads(Path(groups[0][1]["metadata_path"]).read_text())
    assert record["consistency"]["identity"] == {
        "prompt": "aoi_cf, 1girl, standing, beach",
        "seed": 2,
    }
    bad = requests.post(f"{url}/api/v1/suite", json={"prompt": "no hashes here"}, timeout=30)
    assert bad.status_code == 422 and "suite:1" in bad.text


def test_eval_report_serves_the_latest_selection(server) -> None:
    url, _ = server
    report = requests.get(f"{url}/api/v1/eval/report", timeout=30).json()
    assert report["champion"]["candidate"] == "r4" and report["champion"]["step"] == 2
    assert [row["rank"] for row in report["ranking"]] == [1, 2, 3]
    rows = f"{url}/api/v1/eval/report"
    champion = requests.get(rows, params={"lora_id": "champion"}, timeout=30).json()
    assert champion["lora_id"] == "r4@2"
    assert [(row["step"], row["lora_scale"]) for row in champion["rows"]] == [(2, 0.6), (2, 1.0)]
    every_step = requests.get(rows, params={"lora_id": "r4@4"}, timeout=30).json()
    assert [row["composite"] for row in every_step["rows"]] == [0.5]
    missing = requests.get(rows, params={"lora_id": "nope"}, timeout=30)
    assert missing.status_code == 404
    # A fresh validation needs the project's params (this server was given none).
    fresh = requests.post(rows, json={"lora_id": "r4@2"}, timeout=30)
    assert fresh.status_code == 503 and "params.yaml" in fresh.text


def _wait(url: str, job_id: str) -> dict:
    deadline = time.monotonic() + 300
    while (status := requests.get(f"{url}/api/v1/batch/status/{job_id}").json())["state"] in (
        "queued",
        "running",
    ):
        assert time.monotonic() < deadline, status
        time.sleep(0.2)
    return status


def test_batch_rows_take_base64_poses_and_render_together(server, engine) -> None:
    url, app = server
    pose = Image.new("RGB", (64, 64))
    ImageDraw.Draw(pose).line([(32, 8), (32, 40), (16, 60)], fill=(255, 0, 85), width=4)
    rows = [
        {"prompt": PROMPT, "seed": seed, "steps": 2, "pose_image": b64_png(pose)}
        for seed in range(3)
    ] + [{"prompt": PROMPT, "seed": 9, "steps": 3}]
    submitted: list[int] = []
    service = app.state.service
    real_submit = service.submit
    service.submit = lambda requests_, *args, **kwargs: (  # count the engine calls
        submitted.append(len(requests_)) or real_submit(requests_, *args, **kwargs)
    )
    try:
        job = requests.post(f"{url}/api/v1/batch/submit", json=rows, timeout=30).json()
        status = _wait(url, job["job_id"])
    finally:
        service.submit = real_submit
    assert status["done"] == 4, status["errors"]
    assert submitted == [3, 1]  # the three rows that share settings in one engine call
    conditioning = Conditioning("control", pose)
    for seed in range(3):
        expected = engine.render_batch(
            [RenderRequest(prompt=PROMPT, seed=seed, steps=2, conditioning=conditioning)]
        )[0]
        assert Path(status["images"][seed]).read_bytes() == png_bytes(expected)


def test_the_mask_painted_on_the_image_editor() -> None:
    """Gradio's ImageEditor value: the background and transparent layers with the brush strokes;
    the inpainting mask is white wherever any layer has paint, and None when nothing is painted."""
    background = _photo()
    stroke = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    ImageDraw.Draw(stroke).rectangle([4, 4, 19, 11], fill=(255, 255, 255, 255))
    other = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    other.putpixel((60, 60), (255, 255, 255, 40))
    mask = editor_mask({"background": background, "layers": [stroke, other], "composite": None})
    expected = np.zeros((64, 64), bool)
    expected[4:12, 4:20] = True
    expected[60, 60] = True
    assert (np.asarray(mask) == np.where(expected, 255, 0)).all()
    empty = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    assert editor_mask({"background": background, "layers": [empty]}) is None
    assert editor_mask(None) is None
