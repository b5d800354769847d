"""The web UI in Debian's Chromium (playwright): generate an image with a LoRA, run a small batch
to the end, cancel another; the page loads with every request on loopback (no CDN)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from engine_fixtures import (
    PROMPT,
    make_workspace,
    one_thread,  # noqa: F401  (a fixture: pytest finds it by name)
)
from serve_fixtures import running, write_selection

from charaforge.serve.app import create_app
from charaforge.serve.limits import ServerSettings

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking"]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, object, Path]]:
    root = make_workspace(tmp_path_factory.mktemp("ui"), max_steps=2)
    write_selection(root / "reports", "r4", 2, 0.6)
    settings = ServerSettings(
        base_dir=root / "base",
        lora_dir=root / "none",
        train_dir=root / "train",
        reports_dir=root / "reports",
        devices=["cpu"],
        cpu_threads=1,
        outputs_dir=root / "outputs",
        ui=True,
    )
    app = create_app(settings)
    with running(app) as url:
        yield url, app, root
    app.state.batches.stop()
    app.state.service.stop()


def test_generate_with_a_lora_and_run_and_cancel_batches(server, tmp_path: Path) -> None:
    from playwright.sync_api import expect, sync_playwright

    url, app, _ = server
    small = tmp_path / "small.json"
    small.write_text(json.dumps([{"prompt": PROMPT, "seed": s, "steps": 2} for s in range(2)]))
    large = tmp_path / "large.json"
    large.write_text(json.dumps([{"prompt": PROMPT, "seed": s, "steps": 8} for s in range(200)]))
    requested: list[str] = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.on("request", lambda request: requested.append(request.url))
            page.goto(f"{url}/ui/", wait_until="networkidle")
            page.get_by_label("Prompt").first.fill(PROMPT)
            page.get_by_label("Steps (0: preset)").fill("2")
            page.get_by_label("LoRA", exact=True).click()
            page.get_by_role("option", name="champion").click()
            page.locator("#generate").click()
            expect(page.locator("#gallery img").first).to_be_visible(timeout=120_000)
            expect(page.locator("#parameters")).to_contain_text("r4@2", timeout=30_000)

            page.get_by_role("tab", name="Batch").click()
            with page.expect_file_chooser() as chooser:
                page.locator("#job-file").click()
            chooser.value.set_files(str(small))
            page.locator("#batch-submit").click()
            job = page.locator("#job-id textarea, #job-id input").first
            expect(job).not_to_have_value("", timeout=60_000)
            small_id = job.input_value()
            for _ in range(600):
                page.locator("#batch-refresh").click()
                status = page.locator("#job-status textarea, #job-status input").first
                page.wait_for_timeout(200)
                if status.input_value().startswith("done"):
                    break
            assert status.input_value() == "done: 2/2 done, 0 failed"

            with page.expect_file_chooser() as chooser:
                page.locator("#job-file").click()
            chooser.value.set_files(str(large))
            page.locator("#batch-submit").click()
            expect(job).not_to_have_value(small_id, timeout=60_000)
            page.locator("#batch-cancel").click()
            expect(status).to_have_value(re.compile(r"^cancelled"), timeout=60_000)
            large_id = job.input_value()
        finally:
            browser.close()
    assert app.state.batches.job(small_id)["done"] == 2
    large_status = app.state.batches.job(large_id)
    assert large_status["state"] == "cancelled" and large_status["done"] < 200
    outside = [u for u in requested if not u.startswith(("http://127.0.0.1", "data:", "blob:"))]
    assert not outside, outside  # the page loads offline
