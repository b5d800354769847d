"""The A1111-compatible API, driven as an A1111 user script would (plain `requests`, base64,
`json.loads(info)`), against a server started with its defaults on a trained workspace: the
candidates' checkpoints and the champion are served with no LoRA folder at all."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests
from engine_fixtures import (
    PROMPT,
    make_workspace,
    one_thread,  # noqa: F401  (a fixture: pytest finds it by name)
)
from PIL import Image
from serve_fixtures import b64_png, decode, running, write_selection

from charaforge.core.layout import checkpoint_path
from charaforge.generate.engine import GenerationEngine
from charaforge.generate.records import png_bytes
from charaforge.generate.request import Conditioning
from charaforge.serve.app import create_app
from charaforge.serve.limits import ServerSettings

pytestmark = pytest.mark.usefixtures("one_thread")

CHAMPION_SCALE = 0.6
# What an A1111 script posts: A1111 field names, some fields this engine has no use for.
SCRIPT_BODY = {
    "prompt": PROMPT,
    "negative_prompt": "lowres",
    "seed": 7,
    "steps": 2,
    "cfg_scale": 5.0,
    "sampler_name": "Euler a",
    "batch_size": 1,
    "n_iter": 2,
    "restore_faces": False,
    "override_settings": {"CLIP_stop_at_last_layers": 1},
}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = make_workspace(tmp_path_factory.mktemp("a1111"), max_steps=2)
    write_selection(root / "reports", "r4", 2, CHAMPION_SCALE)
    return root


@pytest.fixture(scope="module")
def server(workspace: Path) -> Iterator[tuple[str, object]]:
    settings = ServerSettings(
        base_dir=workspace / "base",
        lora_dir=workspace / "no-lora-folder",  # as after the pipeline: none
        train_dir=workspace / "train",
        reports_dir=workspace / "reports",
        devices=["cpu"],
        max_size=128,
        max_steps=8,
        max_cost=64 * 64 * 8 * 4,
        cpu_threads=1,
    )
    app = create_app(settings)
    with running(app) as url:
        yield url, app.state.service
    app.state.service.stop()


@pytest.fixture(scope="module")
def engine(workspace: Path) -> GenerationEngine:
    return GenerationEngine(workspace / "base", device="cpu")


def test_txt2img_as_an_a1111_script_sees_it(server: tuple[str, object], engine) -> None:
    url, _ = server
    response = requests.post(f"{url}/sdapi/v1/txt2img", json=SCRIPT_BODY, timeout=300)
    assert response.status_code == 200, response.text
    payload = response.json()
    info = json.loads(payload["info"])
    assert len(payload["images"]) == 2 and info["all_seeds"] == [7, 8]
    assert info["sampler_name"] == "Euler a" and info["steps"] == 2 and info["cfg_scale"] == 5.0
    assert info["ignored_fields"] == ["restore_faces"]
    assert payload["parameters"]["prompt"] == PROMPT
    second = decode(payload["images"][1])
    assert second.info["parameters"] == info["infotexts"][1]
    direct = engine.render(
        PROMPT, 8, steps=2, guidance_scale=5.0, negative_prompt="lowres", scheduler="euler_a"
    )
    assert png_bytes(direct) == png_bytes(second)  # the engine's very bytes


def test_prompt_lora_tag_applies_the_champion_at_its_scale(
    server: tuple[str, object], workspace: Path, engine
) -> None:
    url, _ = server
    body = {**SCRIPT_BODY, "n_iter": 1, "prompt": f"{PROMPT} <lora:champion>"}
    payload = requests.post(f"{url}/sdapi/v1/txt2img", json=body, timeout=300).json()
    info = json.loads(payload["info"])
    assert [(lora["name"], lora["scale"]) for lora in info["loras"]] == [("r4@2", CHAMPION_SCALE)]
    assert info["prompt"] == PROMPT  # the tag is removed from what is encoded
    file = checkpoint_path(workspace / "train" / "r4", 2)
    engine.load_lora("r4@2", file, trigger_words=("aoi_cf",))
    try:
        direct = engine.render(
            PROMPT,
            7,
            steps=2,
            guidance_scale=5.0,
            negative_prompt="lowres",
            scheduler="euler_a",
            loras={"r4@2": CHAMPION_SCALE},
        )
        base = engine.render(
            PROMPT, 7, steps=2, guidance_scale=5.0, negative_prompt="lowres", scheduler="euler_a"
        )
    finally:
        engine.unload_lora("r4@2")
    served = decode(payload["images"][0])
    assert png_bytes(served) == png_bytes(direct)
    assert not np.array_equal(np.asarray(served), np.asarray(base))  # the LoRA did something

    # Two LoRAs at once, each with its weight, one by its `<candidate>` alias.
    body["prompt"] = f"{PROMPT}, <lora:r4@2:0.3>, <lora:champion:0.3>"
    both = requests.post(f"{url}/sdapi/v1/txt2img", json=body, timeout=300)
    assert both.status_code == 422 and "named twice" in both.text  # the same LoRA twice


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"prompt": f"{PROMPT} <lora:nope:0.5>"}, "unknown LoRA 'nope'"),
        ({"prompt": f"{PROMPT} <lora:champion:lots>"}, "not a number"),
        ({"sampler_name": "PLMS"}, "is not offered"),
        ({"override_settings": {"sd_vae": "x"}}, "not supported"),
        ({"width": 100}, "multiple of 8"),
        ({"steps": 8, "batch_size": 4, "n_iter": 2}, "batch_size: at most 4"),
        ({"steps": 8, "width": 128, "height": 128}, "over this server's budget"),
    ],
)
def test_bad_a1111_requests_get_422_naming_the_problem(
    server: tuple[str, object], change: dict, reason: str
) -> None:
    url, _ = server
    response = requests.post(f"{url}/sdapi/v1/txt2img", json={**SCRIPT_BODY, **change}, timeout=60)
    assert response.status_code == 422, response.text
    assert reason in response.text


def test_img2img_prodgen_style_and_inpainting(server: tuple[str, object], engine) -> None:
    """Seed 002's use: an image and a prompt posted as JSON, the image in base64."""
    url, _ = server
    rng = np.random.default_rng(0)
    start = Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    body = {
        "init_images": [b64_png(start)],
        "prompt": PROMPT,
        "denoising_strength": 0.5,
        "steps": 4,
        "cfg_scale": 5.0,
        "seed": 11,
        "sampler_name": "DPM++ 2M",
        "scheduler": "Karras",
    }
    payload = requests.post(f"{url}/sdapi/v1/img2img", json=body, timeout=300).json()
    info = json.loads(payload["info"])
    assert info["denoising_strength"] == 0.5 and info["sampler_name"] == "DPM++ 2M Karras"
    served = decode(payload["images"][0])
    direct = engine.render(
        PROMPT,
        11,
        steps=4,
        guidance_scale=5.0,
        scheduler="dpmpp_2m_karras",
        width=64,
        height=64,
        conditioning=Conditioning("img2img", start, strength=0.5),
    )
    assert png_bytes(served) == png_bytes(direct)

    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (0, 0, 32, 64))  # repaint the left half only
    body.update(mask=b64_png(mask), denoising_strength=1.0)
    inpainted = decode(
        requests.post(f"{url}/sdapi/v1/img2img", json=body, timeout=300).json()["images"][0]
    )
    pixels, original = np.asarray(inpainted.convert("RGB")), np.asarray(start)
    assert np.array_equal(pixels[:, 40:], original[:, 40:])  # outside the mask: untouched
    assert not np.array_equal(pixels[:, :24], original[:, :24])

    bad = {**body, "init_images": ["bm90IGFuIGltYWdl"]}  # base64 of "not an image"
    refused = requests.post(f"{url}/sdapi/v1/img2img", json=bad, timeout=60)
    assert refused.status_code == 422 and "not a readable image" in refused.text


def test_listing_routes_have_a1111_shapes(server: tuple[str, object]) -> None:
    url, _ = server
    samplers = requests.get(f"{url}/sdapi/v1/samplers", timeout=30).json()
    assert {"Euler", "Euler a", "DPM++ 2M Karras"} <= {item["name"] for item in samplers}
    assert all(set(item) == {"name", "aliases", "options"} for item in samplers)
    models = requests.get(f"{url}/sdapi/v1/sd-models", timeout=30).json()
    assert set(models[0]) >= {"title", "model_name", "hash", "filename"}
    loras = {item["name"]: item for item in requests.get(f"{url}/sdapi/v1/loras").json()}
    assert set(loras) == {"r4@2"}  # the one checkpoint of the one candidate
    assert sorted(loras["r4@2"]["metadata"]["aliases"]) == ["champion", "r4"]
    assert loras["r4@2"]["metadata"]["default_scale"] == CHAMPION_SCALE
    assert loras["r4@2"]["metadata"]["trigger_words"] == ["aoi_cf"]
    progress = requests.get(f"{url}/sdapi/v1/progress", timeout=30).json()
    assert set(progress) >= {"progress", "eta_relative", "state", "current_image", "textinfo"}
    assert progress["state"]["sampling_steps"] == 0  # nothing running


@pytest.mark.parametrize(
    "raw",
    [
        '{"prompt": "a", "cfg_scale": NaN}',
        '{"prompt": "a", "cfg_scale": Infinity}',
        '{"prompt": "a \\ud800 b"}',
        '{"prompt": "a", "restore_faces": -Infinity}',
        '{"prompt": "a", "steps": 2, "override_settings": {"sd_model_checkpoint": NaN}}',
        '{"prompt": "a", "steps": 2',
        "\x00\xff not json at all",
        '{"prompt": "' + "x" * 300_000 + '"}',
    ],
)
def test_hostile_bodies_get_a_short_422_never_500(server: tuple[str, object], raw: str) -> None:
    url, _ = server
    response = requests.post(
        f"{url}/sdapi/v1/txt2img",
        data=raw.encode("utf-8", "surrogatepass"),
        headers={"Content-Type": "application/json"},
        timeout=60,
    )
    # Bytes that are not UTF-8 never reach validation: FastAPI answers 400 for those.
    assert response.status_code == (400 if "\xff" in raw else 422), response.text[:500]
    assert len(response.content) < 4000  # never the input echoed back whole
    response.json()  # always valid JSON


def test_200_concurrent_hostile_and_valid_requests_get_no_500(
    server: tuple[str, object],
) -> None:
    # The load test: NaN, Infinity, lone surrogates, broken JSON, 20 MB prompts, bodies
    # over the cost budget and a few valid renders, 200 at once from 32 threads.
    url, _ = server
    huge = '{"prompt": "' + "x" * (20 * 1024 * 1024) + '"}'
    kinds = [
        '{"prompt": "a", "cfg_scale": NaN}',
        '{"prompt": "a", "steps": Infinity}',
        '{"prompt": "a \\ud800 b"}',
        '{"prompt": "a", "steps": 2',
        json.dumps({**SCRIPT_BODY, "steps": 8, "width": 128, "height": 128, "batch_size": 4}),
        json.dumps({**SCRIPT_BODY, "n_iter": 1}),
    ]
    bodies = [huge if index % 40 == 0 else kinds[index % len(kinds)] for index in range(200)]

    def post(raw: str) -> tuple[int, int]:
        response = requests.post(
            f"{url}/sdapi/v1/txt2img",
            data=raw.encode("utf-8", "surrogatepass"),
            headers={"Content-Type": "application/json"},
            timeout=600,
        )
        return response.status_code, len(response.content)

    with ThreadPoolExecutor(max_workers=32) as pool:
        results = list(pool.map(post, bodies))
    codes = Counter(code for code, _ in results)
    assert all(code < 500 for code in codes), codes
    assert all(size < 4000 for code, size in results if code != 200), codes
    assert codes[422] >= 150 and codes[200] + codes[429] == 200 - codes[422], codes
    assert requests.get(f"{url}/health", timeout=30).ok


def test_a_render_over_the_time_limit_is_stopped_and_the_worker_goes_on(
    server: tuple[str, object],
) -> None:
    url, service = server
    service.settings.request_timeout_s = 0.0  # every render is over it after its first step
    try:
        response = requests.post(f"{url}/sdapi/v1/txt2img", json=SCRIPT_BODY, timeout=300)
    finally:
        service.settings.request_timeout_s = 300.0
    assert response.status_code == 504 and "limit" in response.text
    assert requests.post(f"{url}/sdapi/v1/txt2img", json=SCRIPT_BODY, timeout=300).ok


def test_cancelling_stops_a_render_at_the_next_step(server: tuple[str, object]) -> None:
    _, service = server
    from charaforge.generate.request import RenderRequest
    from charaforge.serve.worker import Job, RenderCancelled

    job = Job([RenderRequest(prompt=PROMPT, seed=1, steps=8)], {})
    seen = []
    original = job.on_step

    def cancel_after_first(done: int, total: int) -> None:
        seen.append(done)
        if done == 1:
            job.cancel_event.set()
        original(done, total)

    job.on_step = cancel_after_first  # type: ignore[method-assign]
    service.jobs.put(job)
    with pytest.raises(RenderCancelled):
        job.future.result(timeout=300)
    assert seen == [1]  # not one more step was sampled
