"""The selection report opens in a real headless browser with every image and plot present.

Debian's Chromium (/usr/bin/chromium) driven by playwright, at 1400 x 900 px: every <img> must
have decoded (naturalWidth > 0), the plots (score versus step, Pareto, loss curves) must be there,
the champion card must be visible without scrolling, the ranking's deciding columns within the
viewport, and the page must not have tried to fetch anything (it is self-contained).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from safetensors.torch import save_file
from test_score_report import CANDIDATES, _make_dataset, _make_generate, _make_train_and_base

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
    # As many metrics as a real run shows: the full ranking is then wider than the screen.
    for metric in WIDE_METRICS:
        scores[metric] = rng.random(len(index))
    write_parquet(root / "data/score/scores.parquet", scores)
    info = {"model": "tiny", "scale": "raw cosine, -1..1", "stand_in": True, "applicable": True}
    write_json(
        root / "data/score/scorers.json",
        {
            "clip_i": info,
            "clip_t": info,
            "arcface": {**info, "images_without_face": 5},
            **{metric: info for metric in WIDE_METRICS},
        },
    )


VIEWPORT = {"width": 1400, "height": 900}
WIDE_METRICS = [
    "face_detected", "pose_oks", "pose_pck_01", "pose_pck_02", "pose_detected", "tag_precision",
    "tag_recall", "diversity", "consistency_clip", "consistency_arcface", "context_alignment",
]  # fmt: skip


def _run_outputs(root: Path) -> None:
    """What the report summarises beside the scores: loss histories, training samples, the
    checkpoints' files, the dataset with a quarantine list and a dedupe contact sheet."""
    import torch

    for name, steps in CANDIDATES.items():
        folder = root / "data/train" / name
        folder.mkdir(parents=True, exist_ok=True)
        history = pd.DataFrame({"step": range(1, 9), "loss": np.linspace(1.0, 0.6, 8)})
        history["val_loss"] = [np.nan if step not in steps else 0.9 for step in history["step"]]
        history.to_csv(folder / "history.csv", index=False)
        for step in steps:
            samples = folder / "samples" / f"step-{step:06d}"
            samples.mkdir(parents=True)
            Image.new("RGB", (32, 32), (step * 20, 90, 160)).save(samples / "p0-s0.png")
            checkpoint = folder / f"checkpoint-{step}"
            checkpoint.mkdir()
            weights = {"lora_A.weight": torch.full((4, 8), float(step))}
            save_file(weights, str(checkpoint / "pytorch_lora_weights.safetensors"))
            save_file(weights, str(checkpoint / f"{name}-{step:06d}.safetensors"))
    _make_dataset(root)
    quarantine = pd.DataFrame(
        {"source_path": ["in/broken.png"], "kind": ["corrupt"], "reason": ["truncated data"]}
    )
    write_parquet(root / "data/ingest/quarantine.parquet", quarantine)
    (root / "data/dedupe").mkdir(parents=True)
    Image.new("RGB", (120, 40), (200, 200, 200)).save(root / "data/dedupe/contact_sheet.png")


def test_report_opens_in_headless_chromium_with_every_image(tmp_path: Path) -> None:
    from playwright.sync_api import sync_playwright

    root = tmp_path / "repo"
    _make_generate(root)
    _make_train_and_base(root)
    _run_outputs(root)
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
        character="aoi",
        trigger="aoi_cf",
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
            page = browser.new_page(viewport=VIEWPORT)
            page.on("request", lambda request: requests.append(request.url))
            page.goto(page_path.as_uri(), wait_until="load")
            card = page.locator("#champion-card").bounding_box()
            card_text = page.text_content("#champion-card")
            deciding = page.eval_on_selector_all(
                "table.ranking th",
                "els => els.map(e => ({text: e.textContent,"
                " right: e.getBoundingClientRect().right}))",
            )
            full_hidden_before = page.eval_on_selector(
                "table.ranking-full", "e => !e.checkVisibility()"
            )
            page.click("details summary")
            full_width = page.locator("table.ranking-full").bounding_box()["width"]
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
    assert len(plots) == 3  # score versus step, Pareto, loss curves
    assert all(plot["w"] >= 300 and plot["h"] >= 200 for plot in plots)
    assert any(heading.startswith("Score versus step") for heading in headings)
    assert any(heading.startswith("Pareto front: identity (arcface)") for heading in headings)
    assert any(heading.startswith("Composite per prompt") for heading in headings)
    assert banner is not None and "stand-in" in banner
    assert ranking_rows == 2  # the champion's row in the compact and in the full ranking
    # The champion card: on screen without scrolling, saying what to load and how.
    assert card is not None and card["y"] >= 0
    assert card["y"] + card["height"] <= VIEWPORT["height"], card
    assert card["x"] + card["width"] <= VIEWPORT["width"], card
    for needed in ("<lora:", "charaforge generate", "aoi_cf", ".safetensors", "base model"):
        assert needed in card_text, needed
    # The deciding columns are all within the viewport; the full table waits in <details>.
    assert [cell["text"] for cell in deciding][:2] == ["rank", "candidate"]
    assert "composite" in [cell["text"] for cell in deciding]
    assert max(cell["right"] for cell in deciding) <= VIEWPORT["width"], deciding
    assert full_hidden_before
    assert full_width > VIEWPORT["width"]  # what the compact ranking spares the reader
    samples = [image for image in images if image["alt"].startswith("r4_lr1e-3 step-")]
    assert len(samples) == 2  # one per checkpoint
    assert any(image["alt"] == "dedupe contact sheet" for image in images)
    # Only the page itself (and its data: URIs) were loaded: nothing from the network or disk.
    assert [url for url in requests if not url.startswith("data:")] == [page_path.as_uri()]
