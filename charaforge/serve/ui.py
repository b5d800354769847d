"""The web UI: Gradio 6 Blocks mounted on the same FastAPI app at /ui, using the same device
queue, the same prompt-LoRA parsing and the same limits as the HTTP routes.

Tabs: Generate (prompt, negative, LoRA picker with scale and trigger insertion, scheduler,
preset, seed, size, batch; gallery; parameters), Image-to-image / Inpaint, ControlNet, Character
suites, Selection and Training (serve.ui_tabs), Batch (upload a CSV/JSON job, status, cancel),
LoRAs (the registry). Renders show their sampling steps in Gradio's progress bar.
Gradio's wheel ships its frontend; the theme uses system fonts only, so the
page loads with no network.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from charaforge.generate.request import PRESETS, SCHEDULERS, RenderRequest
from charaforge.serve.batch import BatchRunner
from charaforge.serve.batch_store import parse_job_file
from charaforge.serve.ui_tabs import (
    LOSSLESS,
    NO_LORA,
    controlnet_tab,
    img2img_tab,
    plan_or_error,
    selection_tab,
    suites_tab,
    training_tab,
    wait_for,
)
from charaforge.serve.worker import Service

UI_PATH = "/ui"


def build_ui(service: Service, batches: BatchRunner) -> Any:
    import gradio as gr

    PROGRESS = gr.Progress()  # Gradio fills a handler's progress argument by its default

    def lora_choices() -> list[str]:
        service.registry.reload()
        return [NO_LORA, *service.registry.names()]

    def insert_trigger(prompt: str, lora: str) -> str:
        if lora == NO_LORA:
            return prompt
        words = [w for w in service.registry.get(lora).trigger_words if w not in prompt]
        return ", ".join([*words, prompt]) if words and prompt else ", ".join(words) or prompt

    def generate(
        prompt: str,
        negative: str,
        lora: str,
        scale: float,
        scheduler: str,
        preset: str,
        seed: float,
        width: float,
        height: float,
        steps: float,
        batch: float,
        progress: Any = PROGRESS,
    ) -> tuple[list, str]:
        template = RenderRequest(
            prompt=prompt,
            seed=0,
            negative_prompt=negative,
            width=int(width),
            height=int(height),
            steps=int(steps) or None,
            scheduler=scheduler,
            preset=preset,
        )
        loras = {} if lora == NO_LORA else {lora: float(scale)}
        seeds = [int(seed) + offset for offset in range(int(batch))]
        requests, entries = plan_or_error(service, template, seeds, loras)
        images = wait_for(service, requests, entries, progress)
        parameters = [json.loads(image.info["charaforge"]) for image in images]
        return images, json.dumps(parameters, indent=1)

    def submit_batch(file: str | None) -> tuple[str, str, None]:
        if not file:
            raise gr.Error("upload a CSV or JSON job file first")
        path = Path(file)
        try:
            rows = parse_job_file(path.read_bytes()[: 16 * 1024 * 1024], path.name)
        except ValueError as error:
            raise gr.Error(str(error)) from None
        job_id = batches.submit(rows)
        return job_id, batch_status(job_id), None  # the upload is cleared for the next job

    def batch_status(job_id: str) -> str:
        status = batches.job(job_id.strip()) if job_id.strip() else None
        if status is None:
            return "no such job"
        return (
            f"{status['state']}: {status['done']}/{status['total']} done, {status['failed']} failed"
        )

    def cancel_batch(job_id: str) -> str:
        batches.cancel(job_id.strip())
        return batch_status(job_id)

    def lora_table() -> list[list[Any]]:
        service.registry.reload()
        return [
            [e.name, ", ".join(e.aliases), ", ".join(e.trigger_words), e.default_scale]
            for e in service.registry.entries()
        ]

    with gr.Blocks(title="CharaForge") as blocks:
        gr.Markdown("# CharaForge")
        with gr.Tab("Generate"):
            prompt = gr.Textbox(label="Prompt (<lora:NAME:WEIGHT> tags apply LoRAs)", lines=2)
            negative = gr.Textbox(label="Negative prompt")
            with gr.Row():
                lora = gr.Dropdown(lora_choices(), value=NO_LORA, label="LoRA")
                scale = gr.Slider(-2, 2, value=1.0, step=0.05, label="LoRA scale")
                trigger = gr.Button("Insert trigger")
            with gr.Row():
                scheduler = gr.Dropdown(list(SCHEDULERS), value="euler", label="Scheduler")
                preset = gr.Dropdown(list(PRESETS), value="standard", label="Preset")
                steps = gr.Number(0, label="Steps (0: preset)", precision=0)
                seed = gr.Number(0, label="Seed", precision=0)
            with gr.Row():
                width = gr.Number(service.engine.base.resolution, label="Width", precision=0)
                height = gr.Number(service.engine.base.resolution, label="Height", precision=0)
                batch = gr.Number(1, label="Batch", precision=0, minimum=1)
            run = gr.Button("Generate", variant="primary", elem_id="generate")
            gallery = gr.Gallery(format=LOSSLESS, label="Images", elem_id="gallery")
            parameters = gr.Code(label="Parameters", language="json", elem_id="parameters")
            trigger.click(insert_trigger, [prompt, lora], prompt)
            run.click(
                generate,
                [
                    prompt,
                    negative,
                    lora,
                    scale,
                    scheduler,
                    preset,
                    seed,
                    width,
                    height,
                    steps,
                    batch,
                ],
                [gallery, parameters],
            )
        img2img_tab(gr, service)
        controlnet_tab(gr, service)
        suites_tab(gr, service, lora_choices)
        with gr.Tab("Batch"):
            upload = gr.File(
                label="Job file (CSV or JSON)", file_types=[".csv", ".json"], elem_id="job-file"
            )
            job_id = gr.Textbox(label="Job id", elem_id="job-id")
            status = gr.Textbox(label="Status", elem_id="job-status")
            with gr.Row():
                submit = gr.Button("Submit", elem_id="batch-submit")
                refresh = gr.Button("Refresh", elem_id="batch-refresh")
                cancel = gr.Button("Cancel", elem_id="batch-cancel")
            submit.click(submit_batch, upload, [job_id, status, upload])
            refresh.click(batch_status, job_id, status)
            cancel.click(cancel_batch, job_id, status)
        with gr.Tab("LoRAs"):
            table = gr.Dataframe(
                lora_table(),
                headers=["name", "aliases", "trigger words", "default scale"],
                label="LoRAs",
            )
            gr.Button("Reload").click(lora_table, None, table)
        selection_tab(gr, service)
        training_tab(gr, service)
    return blocks


def mount_ui(app: Any, service: Service, batches: BatchRunner, token: str | None) -> None:
    import gradio as gr

    blocks = build_ui(service, batches)
    # System fonts only: the default theme would fetch Google Fonts.
    theme = gr.themes.Default(font=["sans-serif"], font_mono=["monospace"])
    auth = ("charaforge", token) if token else None
    gr.mount_gradio_app(app, blocks, path=UI_PATH, theme=theme, auth=auth, ssr_mode=False)
