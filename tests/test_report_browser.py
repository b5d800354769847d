"""The selection report opens in a real headless browser with every image and plot present.

Debian's Chromium (/usr/bin/chromium) driven by playwright: every <img> must have decoded
(naturalWidth > 0), the two plots (score versus step, Pareto) must be there, and the page must
not have tried to fetch anything (it is self-contained).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
from test_score_report import _make_generate, _make_train_and_base

from charaforge.config import ReportConfig
from charaforge.core.files import write_json, write_parquet
from charaforge.selection import report

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking"]
IMAGE_STATE = (
    "els => els.map(e => ({w: e.naturalWidth, h: e.naturalHeight, cls: e.className, "
    "alt: e.alt, done: e.complete}))"
)


def _scores(root: Path) -> None:
    index = pd.read_parquet(root / "data/generate/index.parquet")
    rng = np.random.default_rng(0)
    scores = index.assign(
        clip_i=rng.normal(0.5, 0.05, len(index)),
        clip_t=rng.normal(0.3, 0.05, len(index)),
        arcface=np.where(rng.random(len(index)) < 0.3, np.nan, rng.normal(0.4, 0.1, len(index))),
    )
    write_parquet(root / "data/score/scores.parquet", scores)
    info = {"model": "tiny", "scale": "raw cosine, -1..1", "stand_in": True, "applicable": True}
    write_json(
        root / "data/score/scorers.json",
        {"clip_i": info, "clip_t": info, "arcface": {**info, "images_without_face": 5}},
    )


def test_report_opens_in_headless_chromium_with_every_image(tmp_path: Path) -> None:
    from playwright.sync_api import sync_playwright

    root = tmp_path / "repo"
    _make_generate(root)
    _make_train_and_base(root)
    _scores(root)
    config = ReportConfig(weights={"arcface": 0.4, "clip_i": 0.3, "clip_t": 0.3}, title="T")
    report.report_selection(
        root / "data/score",
        root / "data/generate",
        root / "data/train",
        config,
        tmp_path / "reports",
        root / "data/base",
        seed=0,
        root=root,
    )
    # Opened from a folder of its own: nothing next to it can satisfy a relative link.
    alone = tmp_path / "alone"
    alone.mkdir()
    page_path = alone / "selection.html"
    shutil.copy(tmp_path / "reports/selection.html", page_path)

    # Negative control: the same page with one undecodable image must be caught by the check.
    spoiled_path = alone / "spoiled.html"
    spoiled_path.write_text(
        page_path.read_text().replace("<h2>", '<img src="data:image/png;base64,AAAA"><h2>', 1)
    )

    requests: list[str] = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.on("request", lambda request: requests.append(request.url))
            page.goto(page_path.as_uri(), wait_until="load")
            images = page.eval_on_selector_all("img", IMAGE_STATE)
            headings = page.eval_on_selector_all("h2", "els => els.map(e => e.textContent)")
            banner = page.text_content(".banner")
            ranking_rows = page.eval_on_selector_all("table tr.champion", "els => els.length")
            control = browser.new_page()
            control.goto(spoiled_path.as_uri(), wait_until="load")
            spoiled = control.eval_on_selector_all("img", IMAGE_STATE)
        finally:
            browser.close()

    assert [image for image in spoiled if image["w"] <= 0] == [spoiled[0]]

    assert len(images) > 2
    broken = [image for image in images if not image["done"] or image["w"] <= 0]
    assert not broken, broken
    plots = [image for image in images if image["cls"] == "plot"]
    assert len(plots) == 2  # score versus step, Pareto
    assert all(plot["w"] >= 300 and plot["h"] >= 200 for plot in plots)
    assert any(heading.startswith("Score versus step") for heading in headings)
    assert any(heading.startswith("Pareto front: identity (arcface)") for heading in headings)
    assert any(heading.startswith("Composite per prompt") for heading in headings)
    assert banner is not None and "stand-in" in banner
    assert ranking_rows == 1
    # Only the page itself (and its data: URIs) were loaded: nothing from the network or disk.
    assert [url for url in requests if not url.startswith("data:")] == [page_path.as_uri()]
