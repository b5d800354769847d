"""POST /api/v1/eval/report on a real uvicorn: a fresh fixed prompt + pose validation of one LoRA.

The server renders the sweep's fixed prompts and its pose condition (a MediaPipe skeleton of a
real photo, through the stand-in's pose ControlNet) for the named LoRA at the asked scale, on its
device queue, and scores them with the score stage's scorers. Observed here: the served images
are the engine's own renders of those requests (made apart from the server), CLIP-I is the mean
cosine recomputed here from the images on disk, the images and scores move with the LoRA and its
scale, an unknown LoRA is a 422 naming it, and the route keeps the token and the queue limit.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import requests
import yaml
from engine_fixtures import (
    make_workspace,
    one_thread,  # noqa: F401  (a fixture: pytest finds it by name)
)
from PIL import Image
from serve_fixtures import running
from skimage import data as skimage_data

from charaforge.config import validate_params
from charaforge.core.files import derive_seed, write_parquet, write_png
from charaforge.generate.engine import GenerationEngine
from charaforge.generate.request import Conditioning, RenderRequest
from charaforge.models.clip import load_clip
from charaforge.prepare.pose import detect_poses
from charaforge.serve.app import create_app
from charaforge.serve.limits import ServerSettings

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]

TOKEN = "eval-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
PROMPT = "{trigger}, 1girl, red hair, standing"


def _params(stand_in: dict) -> dict:
    params = copy.deepcopy(stand_in)
    params["data"]["trigger"] = "aoi_cf"
    params["eval"].update(
        prompts=[PROMPT], seeds=[0, 1], steps=2, negative_prompt="lowres", suites={}
    )
    params["eval"]["from_data"]["enabled"] = False
    params["eval"]["pose"].update(
        enabled=True, skeletons=1, prompt_indices=[0], seeds=[0], control_types=["openpose"]
    )
    return params


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory, _stand_in_params: dict) -> Path:
    root = make_workspace(tmp_path_factory.mktemp("eval"), max_steps=4)
    params = _params(_stand_in_params)
    validate_params(params)
    (root / "params.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")
    # The references the scorers compare with: the drawn training images, as `dataset` lists them.
    references = sorted((root / "dataset" / "images").glob("*.png"))
    table = pd.DataFrame(
        {
            "image_id": [path.stem for path in references],
            "image_path": [str(path) for path in references],
            "split": "train",
            "tags": [["1girl", "red hair"]] * len(references),
        }
    )
    write_parquet(root / "refs" / "metadata.parquet", table)
    # The pose stage's output for one real photo of a person (scikit-image's astronaut).
    photo = root / "photos" / "astronaut.png"
    photo.parent.mkdir()
    Image.fromarray(skimage_data.astronaut()).save(photo)
    rows = pd.DataFrame({"image_id": ["astronaut"], "image_path": [str(photo)]})
    keypoints, skeletons = detect_poses(rows, validate_params(params).pose)
    assert keypoints["has_person"].all()
    write_parquet(root / "pose" / "keypoints.parquet", keypoints)
    write_png(root / "pose" / "skeletons" / "astronaut.png", skeletons["astronaut"])
    return root


@pytest.fixture(scope="module")
def server(project: Path) -> Iterator[tuple[str, object]]:
    settings = ServerSettings(
        base_dir=project / "base",
        lora_dir=project / "none",
        train_dir=project / "train",
        devices=["cpu"],
        cpu_threads=1,
        outputs_dir=project / "outputs",
        token=TOKEN,
        queue_size=1,
        params_file=project / "params.yaml",
        dataset_dir=project / "refs",
        pose_dir=project / "pose",
    )
    app = create_app(settings)
    with running(app) as url:
        yield url, app
    app.state.batches.stop()
    app.state.service.stop()


def _validate(url: str, **body: object) -> dict:
    response = requests.post(f"{url}/api/v1/eval/report", json=body, headers=AUTH, timeout=600)
    assert response.status_code == 200, response.text
    return response.json()


def _expected_requests(project: Path, lora: dict[str, float]) -> list[RenderRequest]:
    """What the validation must render, built here from params.yaml (the sweep's seeds)."""
    params = yaml.safe_load((project / "params.yaml").read_text())
    render = {
        "prompt": PROMPT.replace("{trigger}", "aoi_cf"),
        "loras": lora,
        "steps": 2,
        "guidance_scale": params["eval"]["guidance_scale"],
        "negative_prompt": "lowres",
        "width": 64,
        "height": 64,
        "scheduler": params["eval"]["scheduler"],
    }
    seeds = [derive_seed(params["seed"], "generate", 0, sample) for sample in (0, 1)]
    skeleton = Image.open(project / "pose" / "skeletons" / "astronaut.png").convert("RGB")
    pose = Conditioning("control", skeleton, control_type="openpose", source="astronaut")
    return [RenderRequest(seed=seed, **render) for seed in seeds] + [
        RenderRequest(seed=seeds[0], conditioning=pose, **render)
    ]


def _pixels(path: str | Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB")).astype(int)


def test_a_fresh_validation_renders_and_scores_the_named_lora(server, project: Path) -> None:
    url, app = server
    entry = app.state.service.registry.get("r4@2")
    answer = _validate(url, lora_id="r4@2", lora_scale=1.0)
    assert answer["lora_id"] == "r4@2" and answer["lora_scale"] == 1.0
    images = answer["images"]
    assert [image["pose_image_id"] for image in images] == [None, None, "astronaut"]

    # The served images are the engine's renders of the fixed requests, made here apart.
    engine = GenerationEngine(project / "base", device="cpu")
    engine.load_lora("r4@2", entry.file, entry.trigger_words)
    expected = engine.render_batch(_expected_requests(project, {"r4@2": 1.0})[:2])
    expected += engine.render_batch(_expected_requests(project, {"r4@2": 1.0})[2:])
    for image, direct in zip(images, expected, strict=True):
        assert (_pixels(image["image_path"]) == np.asarray(direct)).all()
        assert Path(image["metadata_path"]).is_file()

    # CLIP-I recomputed from the files: mean cosine with each reference image.
    params = validate_params(yaml.safe_load((project / "params.yaml").read_text()))
    embedder = load_clip(params.score.clip)
    references = sorted((project / "dataset" / "images").glob("*.png"))
    generated = embedder.embed_images([Path(image["image_path"]) for image in images], 4)
    clip_i = (generated @ embedder.embed_images(references, 4).T).mean(axis=1)
    served = [image["scores"]["clip_i"] for image in images]
    assert served == pytest.approx(clip_i.tolist(), abs=1e-5)
    assert answer["means"]["clip_i"] == pytest.approx(float(clip_i.mean()), abs=1e-5)
    # Pose fidelity is scored on the pose-conditioned image only.
    assert images[2]["scores"]["pose_detected"] is not None
    assert images[0]["scores"]["pose_detected"] is None
    assert answer["scorers"]["clip_i"]["stand_in"] is True
    assert answer["skipped"] == []


def test_scores_move_with_the_lora_and_its_scale(server, project: Path) -> None:
    url, _ = server
    full = _validate(url, lora_id="r4@4", lora_scale=1.0)
    off = _validate(url, lora_id="r4@4", lora_scale=0.0)
    other = _validate(url, lora_id="r4@2", lora_scale=1.0)
    # Scale 0 is the base model: its images are the engine's renders without any LoRA.
    engine = GenerationEngine(project / "base", device="cpu")
    base = engine.render_batch(_expected_requests(project, {})[:2])
    for image, direct in zip(off["images"][:2], base, strict=True):
        assert (_pixels(image["image_path"]) == np.asarray(direct)).all()
    for first, second in ((full, off), (full, other)):
        assert (
            _pixels(first["images"][0]["image_path"]) != _pixels(second["images"][0]["image_path"])
        ).any()
        assert first["means"]["clip_i"] != second["means"]["clip_i"]
        assert first["folder"] != second["folder"]


def test_unknown_lora_token_and_queue_limits(server) -> None:
    url, app = server
    refused = requests.post(
        f"{url}/api/v1/eval/report", json={"lora_id": "nope"}, headers=AUTH, timeout=60
    )
    assert refused.status_code == 422 and "nope" in refused.json()["detail"]
    anonymous = requests.post(f"{url}/api/v1/eval/report", json={"lora_id": "r4@2"}, timeout=60)
    assert anonymous.status_code == 401
    bad_scale = requests.post(
        f"{url}/api/v1/eval/report", json={"lora_id": "r4@2", "lora_scale": -1}, headers=AUTH
    )
    assert bad_scale.status_code == 422

    # The worker busy and the one queue place taken: the validation is refused with 429.
    service = app.state.service
    worker = service.workers[0]
    request = RenderRequest(prompt="aoi_cf", seed=0, steps=1)
    worker.lock.acquire()
    try:
        running_job = service.submit([request], {})
        deadline = time.monotonic() + 300
        while service.jobs.qsize():  # the worker took it and waits for the lock
            assert time.monotonic() < deadline
            time.sleep(0.05)
        waiting_job = service.submit([request], {})
        full = requests.post(
            f"{url}/api/v1/eval/report", json={"lora_id": "r4@2"}, headers=AUTH, timeout=60
        )
        assert full.status_code == 429, full.text
    finally:
        worker.lock.release()
    for job in (running_job, waiting_job):
        job.future.result(timeout=300)
    assert _validate(url, lora_id="r4@2")["lora_id"] == "r4@2"  # room again: it runs
