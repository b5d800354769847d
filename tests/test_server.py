"""`charaforge serve`: the real FastAPI app under a real uvicorn on loopback, real engine."""

from __future__ import annotations

import base64
import io
import ipaddress
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import psutil
import pytest
import requests
import uvicorn
from engine_fixtures import (
    PROMPT,
    make_workspace,
    one_thread,  # noqa: F401  (a fixture: pytest finds it by name)
)
from PIL import Image

from charaforge.core.layout import checkpoint_path
from charaforge.generate.engine import GenerationEngine
from charaforge.generate.records import png_bytes
from charaforge.serve.http import ServerSettings, create_app
from charaforge.serve.registry import LoraRegistry

TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
REQUEST = {"prompt": PROMPT, "seed": 3, "steps": 2, "guidance_scale": 5.0}

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = make_workspace(tmp_path_factory.mktemp("server"), max_steps=2)
    loras = root / "loras"
    (loras / "nested").mkdir(parents=True)
    kohya = next(checkpoint_path(root / "train" / "r4", 2).parent.glob("r4-*.safetensors"))
    shutil.copy(kohya, loras / "r4.safetensors")  # kohya layout, trigger in its metadata
    shutil.copy(checkpoint_path(root / "train" / "r4", 2), loras / "nested" / "aoi.safetensors")
    (loras / "registry.yaml").write_text(
        "loras:\n  aoi:\n    file: nested/aoi.safetensors\n    trigger_words: [aoi_cf, red_coat]\n"
        "    default_scale: 0.8\n    description: test LoRA\n"
    )
    outside = root / "outside.safetensors"
    shutil.copy(loras / "r4.safetensors", outside)
    (loras / "evil.safetensors").symlink_to(outside)  # a link out of the folder: never served
    return root


@pytest.fixture(scope="module")
def server(workspace: Path) -> Iterator[tuple[str, object]]:
    settings = ServerSettings(
        base_dir=workspace / "base",
        lora_dir=workspace / "loras",
        devices=["cpu"],
        queue_size=2,
        token=TOKEN,
        max_size=128,
        max_steps=8,
        max_batch=2,
        max_cost=128 * 128 * 8,
        cpu_threads=1,
    )
    app = create_app(settings)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert time.monotonic() < deadline, "server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", app.state.service
    server.should_exit = True
    thread.join(timeout=30)
    app.state.service.stop()


def _image(payload: dict, index: int = 0) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(payload["images"][index])))


def test_health_openapi_and_bearer_token(server: tuple[str, object]) -> None:
    url, _ = server
    health = requests.get(f"{url}/health", timeout=30)
    assert health.status_code == 200
    assert health.json()["stand_in"] is True and health.json()["devices"] == ["cpu"]
    for path in ("/openapi.json", "/docs"):  # behind the token when one is set
        assert requests.get(f"{url}{path}", timeout=30).status_code == 401
    docs = requests.get(f"{url}/docs", headers=AUTH, timeout=30)
    assert docs.ok and "/sdapi/v1/img2img" in docs.text and "cdn" not in docs.text.lower()
    schema = requests.get(f"{url}/openapi.json", headers=AUTH, timeout=30).json()
    assert {"/health", "/txt2img", "/loras", "/loras/load", "/loras/unload"} <= set(schema["paths"])
    assert requests.get(f"{url}/loras", timeout=30).status_code == 401
    wrong = {"Authorization": "Bearer nope"}
    assert requests.post(f"{url}/txt2img", json=REQUEST, headers=wrong, timeout=30).status_code == (
        401
    )


def test_txt2img_serves_what_the_engine_renders(
    server: tuple[str, object], workspace: Path
) -> None:
    url, _ = server
    response = requests.post(
        f"{url}/txt2img", json={**REQUEST, "batch_size": 2}, headers=AUTH, timeout=120
    )
    assert response.status_code == 200, response.text
    payload = response.json()
    assert [item["seed"] for item in payload["parameters"]] == [3, 4]
    served = _image(payload, 1)
    assert (
        "Seed: 4" in served.info["parameters"] and payload["info"][1] == served.info["parameters"]
    )
    engine = GenerationEngine(workspace / "base", device="cpu")
    alone = engine.render(PROMPT, 4, steps=2, guidance_scale=5.0)
    # Byte for byte: the served image (second of a batch) is the engine's single render.
    assert base64.b64decode(payload["images"][1]) == png_bytes(alone)


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"width": 100}, "multiple of 8"),
        ({"width": 256}, "width/height: at most 128"),
        ({"steps": 50}, "steps: at most 8"),
        ({"batch_size": 3}, "batch_size: at most 2"),
        ({"seeds": [1, 2]}, "seeds has 2 entries"),
        ({"scheduler": "plms"}, "unknown scheduler"),
        ({"loras": {"nope": 1.0}}, "unknown LoRA 'nope'"),
        ({"prompt": "a <lora:nope:0.5>"}, "unknown LoRA 'nope'"),
        ({"steps": 8, "width": 128, "height": 128, "batch_size": 2}, "over this server's budget"),
        ({"prompt": ""}, "at least 1 character"),
        ({"colour": "red"}, "Extra inputs"),
    ],
)
def test_bad_requests_get_422_with_the_reason(
    server: tuple[str, object], change: dict, reason: str
) -> None:
    url, _ = server
    response = requests.post(f"{url}/txt2img", json={**REQUEST, **change}, headers=AUTH, timeout=30)
    assert response.status_code == 422
    assert reason in response.text


def test_lora_load_swap_unload_and_triggers(server: tuple[str, object]) -> None:
    url, _ = server
    base = requests.post(f"{url}/txt2img", json=REQUEST, headers=AUTH, timeout=120).json()
    listed = {item["name"]: item for item in requests.get(f"{url}/loras", headers=AUTH).json()}
    assert set(listed) == {"aoi", "r4"}  # the link out of the folder is not offered
    assert listed["aoi"]["trigger_words"] == ["aoi_cf", "red_coat"]
    assert listed["r4"]["trigger_words"] == ["aoi_cf"]  # from the kohya/modelspec metadata

    for name in ("aoi", "r4"):
        loaded = requests.post(f"{url}/loras/load", json={"name": name}, headers=AUTH, timeout=60)
        assert loaded.status_code == 200, loaded.text
    both = requests.post(
        f"{url}/txt2img",
        json={**REQUEST, "loras": {"aoi": 0.5, "r4": 0.5}},
        headers=AUTH,
        timeout=120,
    ).json()
    parameters = both["parameters"][0]
    assert [lora["name"] for lora in parameters["loras"]] == ["aoi", "r4"]
    assert parameters["prompt"] == f"red_coat, {PROMPT}"  # aoi_cf was already there
    assert not np.array_equal(np.asarray(_image(both)), np.asarray(_image(base)))

    for name in ("aoi", "r4"):
        assert requests.post(f"{url}/loras/unload", json={"name": name}, headers=AUTH).ok
    again = requests.post(f"{url}/txt2img", json=REQUEST, headers=AUTH, timeout=120).json()
    assert again["images"] == base["images"]  # the base model's exact bytes are back
    assert requests.post(f"{url}/loras/unload", json={"name": "r4"}, headers=AUTH).status_code == (
        404
    )


@pytest.mark.parametrize(
    "name", ["../outside", "..", "nested/aoi", "/etc/passwd", "evil", "r4.safetensors", "%2e%2e"]
)
def test_lora_names_never_leave_the_lora_folder(server: tuple[str, object], name: str) -> None:
    url, service = server
    response = requests.post(f"{url}/loras/load", json={"name": name}, headers=AUTH, timeout=30)
    assert response.status_code in (404, 422), response.text
    assert name not in service.engine.loras and not service.engine.loras


def test_registry_refuses_files_outside_the_folder(tmp_path: Path) -> None:
    (tmp_path / "loras").mkdir()
    (tmp_path / "loras" / "registry.yaml").write_text("loras:\n  x:\n    file: ../x.safetensors\n")
    (tmp_path / "x.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="outside the LoRA folder"):
        LoraRegistry(tmp_path / "loras")


def test_a_burst_gets_200_422_or_429_none_lost_and_the_server_stays_up(
    server: tuple[str, object],
) -> None:
    url, service = server
    worker = service.workers[0]
    post = lambda body: requests.post(f"{url}/txt2img", json=body, headers=AUTH, timeout=300)  # noqa: E731
    with ThreadPoolExecutor(max_workers=12) as pool:
        worker.lock.acquire()  # the worker takes one job and waits: the queue fills for sure
        try:

            def wait_for(key: str, value: int) -> None:
                deadline = time.monotonic() + 60
                while requests.get(f"{url}/health").json()[key] < value:
                    assert time.monotonic() < deadline, f"{key} never reached {value}"
                    time.sleep(0.05)

            held = [pool.submit(post, {**REQUEST, "seed": 0})]
            wait_for("running", 1)
            held += [pool.submit(post, {**REQUEST, "seed": seed}) for seed in (1, 2)]
            wait_for("queued", 2)
            assert post(REQUEST).status_code == 429
            burst = [
                pool.submit(post, {**REQUEST, "seed": 10 + i, **({"steps": 99} if i % 3 else {})})
                for i in range(9)
            ]
            burst_codes = [future.result().status_code for future in burst]
        finally:
            worker.lock.release()
        held_codes = [future.result().status_code for future in held]
    assert held_codes == [200, 200, 200]
    assert sorted(set(burst_codes)) == [422, 429]
    assert burst_codes.count(422) == 6
    assert requests.get(f"{url}/health").status_code == 200
    assert post(REQUEST).status_code == 200


def test_serve_listens_on_loopback_unless_told() -> None:
    import inspect

    from charaforge.cli import serve

    assert inspect.signature(serve).parameters["host"].default == "127.0.0.1"
    assert ServerSettings().token is None  # no token unless one is given


def test_charaforge_serve_listens_on_loopback_only_by_default(workspace: Path) -> None:
    """The real command with no --host: every socket it listens on is a loopback address."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [str(Path(sys.executable).parent / "charaforge"), "serve", "--port", str(port)]
    command += ["--base", str(workspace / "base"), "--lora-dir", str(workspace / "loras")]
    command += ["--device", "cpu", "--cpu-threads", "1"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, process.stderr.read().decode() if process.stderr else ""
            assert time.monotonic() < deadline, "charaforge serve did not start"
            try:
                if requests.get(f"http://127.0.0.1:{port}/health", timeout=2).ok:
                    break
            except requests.ConnectionError:
                time.sleep(0.2)
        listening = [
            connection.laddr
            for connection in psutil.Process(process.pid).net_connections(kind="inet")
            if connection.status == psutil.CONN_LISTEN
        ]
        assert listening, "no listening socket found"
        assert all(ipaddress.ip_address(address.ip).is_loopback for address in listening), listening
        assert {address.port for address in listening} == {port}
    finally:
        process.terminate()
        process.wait(timeout=30)
