"""The web UI's feature tabs: Image-to-image / Inpaint, ControlNet, Character suites, Selection
and Training. Each builds its requests with the same code as the HTTP routes (serve.render.plan,
serve.features, serve.reports) and renders on the same device queue.

Called inside `gr.Blocks` by serve.ui.build_ui; Gradio is imported lazily (it is slow to import
and the API alone does not need it).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from charaforge.config import CONTROL_TYPES
from charaforge.generate.request import Conditioning, RenderRequest
from charaforge.serve.features import control_conditioning, plan_suite
from charaforge.serve.limits import ServerSettings, open_image_bytes
from charaforge.serve.registry import RegisteredLora
from charaforge.serve.render import PlanError, plan
from charaforge.serve.reports import NoReport, read_report, training_curves
from charaforge.serve.worker import QueueFull, RenderCancelled, Service

NO_LORA = "(none)"
LOSSLESS = "png"  # image format of every UI image: webp, Gradio's default, changes pixels
RANKING_COLUMNS = ("rank", "candidate", "step", "lora_scale", "composite", "ci_low", "ci_high")


def wait_for(
    service: Service,
    requests: Sequence[RenderRequest],
    entries: Mapping[str, RegisteredLora],
    progress: Any,
    label: str = "ui",
    work: Callable | None = None,
) -> list[Image.Image]:
    """Queue a job and wait for it, reporting its sampling steps to Gradio's progress bar."""
    import gradio as gr

    try:
        job = service.submit(requests, entries, label=label, work=work)
        while True:
            try:
                return job.future.result(timeout=0.25)
            except TimeoutError:
                if job.steps:
                    progress((job.step, job.steps), desc="sampling", unit="steps")
    except (PlanError, QueueFull, RenderCancelled, ValueError, KeyError) as error:
        raise gr.Error(str(error).strip("'\"")) from None


def plan_or_error(
    service: Service,
    template: RenderRequest,
    seeds: Sequence[int],
    loras: Mapping[str, float | None],
) -> tuple[list[RenderRequest], dict[str, RegisteredLora]]:
    import gradio as gr

    try:
        return plan(service, template, seeds, loras)
    except PlanError as error:
        raise gr.Error(str(error)) from None


def checked_image(image: Image.Image | None, settings: ServerSettings, what: str) -> Image.Image:
    """An uploaded image through the same size and pixel limits as the HTTP uploads."""
    import io

    import gradio as gr

    if image is None:
        raise gr.Error(f"upload {what} first")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    try:
        return open_image_bytes(buffer.getvalue(), settings, what)
    except ValueError as error:
        raise gr.Error(str(error)) from None


def editor_mask(value: Mapping[str, Any] | None) -> Image.Image | None:
    """The mask painted on an ImageEditor (white where any layer has paint); None if unpainted."""
    if not value or not value.get("layers"):
        return None
    painted = None
    for layer in value["layers"]:
        if layer is None:
            continue
        alpha = np.asarray(layer.convert("RGBA"))[..., 3] > 0
        painted = alpha if painted is None else painted | alpha
    if painted is None or not painted.any():
        return None
    return Image.fromarray((painted * 255).astype(np.uint8), "L")


def _template(prompt: str, negative: str, seed: float, steps: float, size: tuple) -> RenderRequest:
    width, height = (int(value) or None for value in size)
    return RenderRequest(
        prompt=prompt,
        seed=int(seed),
        negative_prompt=negative,
        steps=int(steps) or None,
        width=width,
        height=height,
    )


def _common(gr: Any, prefix: str, resolution: int) -> list[Any]:
    """Prompt, negative, seed, steps, width, height (0: the image's own size for uploads)."""
    prompt = gr.Textbox(label="Prompt", lines=2, elem_id=f"{prefix}-prompt")
    negative = gr.Textbox(label="Negative prompt", elem_id=f"{prefix}-negative")
    with gr.Row():
        seed = gr.Number(0, label="Seed", precision=0, elem_id=f"{prefix}-seed")
        steps = gr.Number(0, label="Steps (0: preset)", precision=0, elem_id=f"{prefix}-steps")
        width = gr.Number(resolution, label="Width", precision=0, elem_id=f"{prefix}-width")
        height = gr.Number(resolution, label="Height", precision=0, elem_id=f"{prefix}-height")
    return [prompt, negative, seed, steps, width, height]


def img2img_tab(gr: Any, service: Service) -> None:
    settings = service.settings
    PROGRESS = gr.Progress()  # Gradio fills a handler's progress argument by its default

    def render(
        editor: dict | None,
        mask_upload: Image.Image | None,
        strength: float,
        prompt: str,
        negative: str,
        seed: float,
        steps: float,
        width: float,
        height: float,
        progress: Any = PROGRESS,
    ) -> tuple[list, str]:
        image = checked_image((editor or {}).get("background"), settings, "an image")
        image = image.convert("RGB")
        if mask_upload is not None:
            mask = checked_image(mask_upload, settings, "mask").convert("L")
        else:
            mask = editor_mask(editor)
        if mask is not None and mask.size != image.size:
            mask = mask.resize(image.size, Image.Resampling.NEAREST)
        size = (int(width) or image.size[0] // 8 * 8, int(height) or image.size[1] // 8 * 8)
        try:
            conditioning = Conditioning(
                "inpaint" if mask is not None else "img2img",
                image,
                mask=mask,
                strength=float(strength),
            )
        except ValueError as error:
            raise gr.Error(str(error)) from None
        template = _template(prompt, negative, seed, steps, size)
        template = RenderRequest(**{**template.__dict__, "conditioning": conditioning})
        requests, entries = plan_or_error(service, template, [int(seed)], {})
        images = wait_for(service, requests, entries, progress, label="img2img")
        shown = [images[0]] + ([mask.convert("RGB")] if mask is not None else [])
        return shown, images[0].info.get("charaforge", "")

    with gr.Tab("Image-to-image / Inpaint"):
        gr.Markdown(
            "Upload an image; paint over the region to repaint (inpaint) or leave it unpainted"
            " (image-to-image). A mask upload (white = repaint) replaces the painting."
        )
        editor = gr.ImageEditor(
            format=LOSSLESS,
            label="Image (paint the mask)",
            type="pil",
            sources=["upload"],
            brush=gr.Brush(colors=["#ffffff"], color_mode="fixed"),
            elem_id="edit-image",
        )
        mask_upload = gr.Image(
            format=LOSSLESS, label="Mask (optional)", type="pil", elem_id="edit-mask"
        )
        strength = gr.Slider(0.05, 1.0, value=0.75, step=0.05, label="Strength")
        common = _common(gr, "edit", service.engine.base.resolution)
        run = gr.Button("Render", variant="primary", elem_id="edit-run")
        gallery = gr.Gallery(
            format=LOSSLESS, label="Result (and the mask used)", elem_id="edit-gallery"
        )
        parameters = gr.Code(label="Parameters", language="json", elem_id="edit-parameters")
        run.click(render, [editor, mask_upload, strength, *common], [gallery, parameters])


def controlnet_tab(gr: Any, service: Service) -> None:
    settings = service.settings
    PROGRESS = gr.Progress()

    def render(
        upload: Image.Image | None,
        control_type: str,
        source: str,
        scale: float,
        prompt: str,
        negative: str,
        seed: float,
        steps: float,
        width: float,
        height: float,
        progress: Any = PROGRESS,
    ) -> tuple[list, str]:
        image = checked_image(upload, settings, "a control image or photo")
        try:
            conditioning = control_conditioning(
                image, control_type, source == "photo", scale=float(scale)
            )
        except (ValueError, OSError) as error:
            raise gr.Error(str(error)) from None
        template = _template(prompt, negative, seed, steps, (width, height))
        template = RenderRequest(**{**template.__dict__, "conditioning": conditioning})
        requests, entries = plan_or_error(service, template, [int(seed)], {})
        images = wait_for(service, requests, entries, progress, label="controlnet")
        return [images[0], conditioning.image], images[0].info.get("charaforge", "")

    with gr.Tab("ControlNet"):
        upload = gr.Image(
            format=LOSSLESS, label="Control map or photo", type="pil", elem_id="control-image"
        )
        with gr.Row():
            control_type = gr.Dropdown(
                list(CONTROL_TYPES), value="openpose", label="Control type", elem_id="control-type"
            )
            source = gr.Radio(
                ["map", "photo"],
                value="map",
                label="The upload is (photo: extract the map, e.g. MediaPipe pose, canny)",
                elem_id="control-source",
            )
            scale = gr.Slider(0, 2, value=1.0, step=0.05, label="Conditioning scale")
        common = _common(gr, "control", service.engine.base.resolution)
        run = gr.Button("Render", variant="primary", elem_id="control-run")
        gallery = gr.Gallery(
            format=LOSSLESS, label="Result and the control map", elem_id="control-gallery"
        )
        parameters = gr.Code(label="Parameters", language="json", elem_id="control-parameters")
        run.click(render, [upload, control_type, source, scale, *common], [gallery, parameters])


def suites_tab(gr: Any, service: Service, lora_choices: Callable[[], list[str]]) -> None:
    PROGRESS = gr.Progress()

    def render(
        file: str | None,
        text: str,
        background: str,
        lora: str,
        scale: float,
        seed: float,
        steps: float,
        size: float,
        progress: Any = PROGRESS,
    ) -> tuple[list, str]:
        if file:
            text = Path(file).read_bytes()[: 256 * 1024].decode("utf-8", "replace")
        if not text.strip():
            raise gr.Error("upload a suite file or type `background#character#action` lines")
        loras = {} if lora == NO_LORA else {lora: float(scale)}
        trigger = ""
        if lora != NO_LORA:
            words = service.registry.get(lora).trigger_words
            trigger = words[0] if words else ""
        template = _template("x", "", seed, steps, (size, size))
        try:
            groups = plan_suite(
                service, text, template, loras, background == "fixed", trigger=trigger
            )
        except PlanError as error:
            raise gr.Error(str(error)) from None
        shown, records = [], []
        for number, group in enumerate(groups, start=1):
            images = wait_for(service, group.requests, group.entries, progress, label="suite")
            for prompt, image in zip(group.prompts, images, strict=True):
                role = "identity" if prompt.identity_shot else f"frame {prompt.position}"
                shown.append((image, f"group {number} · {role}: {prompt.action}"))
                records.append(json.loads(image.info["charaforge"]))
        return shown, json.dumps(records, indent=1)

    with gr.Tab("Character suites"):
        gr.Markdown(
            "`background#character#action` lines, a blank line between groups; the first line"
            " of a group is its identity shot, the others share its character (shared"
            " attention). `{trigger}` is replaced by the LoRA's trigger word."
        )
        upload = gr.File(label="Suite file (.txt)", file_types=[".txt"], elem_id="suite-file")
        text = gr.Textbox(label="or the lines", lines=4, elem_id="suite-text")
        with gr.Row():
            background = gr.Radio(
                ["fixed", "varying"], value="varying", label="Background", elem_id="suite-bg"
            )
            lora = gr.Dropdown(lora_choices(), value=NO_LORA, label="Suite LoRA")
            scale = gr.Slider(-2, 2, value=1.0, step=0.05, label="Suite LoRA scale")
        with gr.Row():
            seed = gr.Number(0, label="Seed", precision=0, elem_id="suite-seed")
            steps = gr.Number(0, label="Steps (0: preset)", precision=0, elem_id="suite-steps")
            size = gr.Number(
                service.engine.base.resolution, label="Size", precision=0, elem_id="suite-size"
            )
        run = gr.Button("Render suite", variant="primary", elem_id="suite-run")
        gallery = gr.Gallery(format=LOSSLESS, label="Groups", columns=4, elem_id="suite-gallery")
        parameters = gr.Code(label="Parameters", language="json", elem_id="suite-parameters")
        run.click(
            render,
            [upload, text, background, lora, scale, seed, steps, size],
            [gallery, parameters],
        )


def selection_tab(gr: Any, service: Service) -> None:
    def load() -> tuple[str, list[list[Any]], list]:
        try:
            report = read_report(service.settings.reports_dir)
        except NoReport as error:
            return str(error), [], []
        champion = report.champion
        summary = (
            f"champion: {champion['candidate']}@{champion['step']} at scale "
            f"{champion['lora_scale']} (composite {champion.get('composite')})"
        )
        table = [[row.get(column) for column in RANKING_COLUMNS] for row in report.ranking]
        return summary, table, [str(path) for path in report.plots]

    # Read when the tab is opened (and on Reload), not when the server starts.
    with gr.Tab("Selection") as tab:
        champion = gr.Textbox(label="Champion", elem_id="selection-champion")
        ranking = gr.Dataframe(
            headers=list(RANKING_COLUMNS), label="Ranking", elem_id="selection-ranking"
        )
        grids = gr.Gallery(format=LOSSLESS, label="Plots and grids", elem_id="selection-plots")
        gr.Button("Reload", elem_id="selection-reload").click(
            load, None, [champion, ranking, grids]
        )
        tab.select(load, None, [champion, ranking, grids])


def training_tab(gr: Any, service: Service) -> None:
    import pandas as pd

    def load() -> tuple[Any, list[list[Any]]]:
        points = training_curves(service.settings.tracking_uri)
        frame = pd.DataFrame(points, columns=["run", "candidate", "metric", "step", "value"])
        frame["series"] = frame["candidate"] + " " + frame["metric"]
        last = frame.sort_values("step").groupby(["candidate", "metric"]).tail(1)
        table = [
            [row.candidate, row.metric, int(row.step), round(float(row.value), 6)]
            for row in last.sort_values(["candidate", "metric"]).itertuples()
        ]
        return frame, table

    # Read from MLflow when the tab is opened (and on Reload), not when the server starts.
    with gr.Tab("Training") as tab:
        gr.Markdown("Loss and validation loss of the candidates' runs in MLflow.")
        plot = gr.LinePlot(
            x="step", y="value", color="series", label="Curves", elem_id="training-plot"
        )
        last = gr.Dataframe(
            headers=["candidate", "metric", "last step", "value"],
            label="Last values",
            elem_id="training-table",
        )
        gr.Button("Reload", elem_id="training-reload").click(load, None, [plot, last])
        tab.select(load, None, [plot, last])
