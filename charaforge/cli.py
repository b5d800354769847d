"""The `charaforge` command line: the same GenerationEngine the pipeline's sweep uses.

charaforge generate "aoi_cf, 1girl, red hair" --lora r4_lr1e-3:0.8 --seed 3 --out aoi.png
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated

import typer

from charaforge.core import layout
from charaforge.core.layout import checkpoint_path
from charaforge.errors import ConfigError
from charaforge.generate.conditioning import canny_map, depth_map, load_image, mask_image
from charaforge.generate.engine import GenerationEngine
from charaforge.generate.loras import adapter_name, lora_file
from charaforge.generate.records import write_image
from charaforge.generate.request import PRESETS, SCHEDULERS, Conditioning, RenderRequest
from charaforge.pipeline import new_character  # light: yaml, tomllib, subprocess
from charaforge.pipeline.compose import DEFAULT_CONFIG, compose_params
from charaforge.pipeline.stage import configure_logging
from charaforge.serve.http import DEFAULT_HOST, DEFAULT_PORT, ServerSettings
from charaforge.serve.http import serve as run_server
from charaforge.serve.registry import LoraRegistry

log = logging.getLogger("charaforge")

app = typer.Typer(help="CharaForge: train, evaluate and use character LoRAs.", no_args_is_help=True)


@app.callback()
def main(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False,
) -> None:
    """CharaForge: train, evaluate and use character LoRAs for Stable Diffusion."""

    configure_logging(logging.DEBUG if verbose else logging.INFO)


def parse_lora_spec(spec: str) -> tuple[str, float]:
    """`PATH_OR_NAME[:SCALE]` -> (PATH_OR_NAME, scale); the scale defaults to 1."""
    head, sep, tail = spec.rpartition(":")
    if sep:
        try:
            return head, float(tail)
        except ValueError:
            pass
    return spec, 1.0


def resolve_lora(reference: str, train_dir: Path) -> tuple[str, Path]:
    """A LoRA file or checkpoint folder, or a trained candidate: `NAME` (last checkpoint) or
    `NAME@STEP`; returns (adapter name, file)."""
    path = Path(reference)
    if path.exists():
        file = lora_file(path)
        if file.parent.name.startswith("checkpoint-"):  # <candidate>/checkpoint-<step>/
            stem = f"{file.parent.parent.name}-{file.parent.name.split('-', 1)[1]}"
        else:
            stem = file.stem
        return adapter_name(stem), file
    name, _, step = reference.partition("@")
    candidate_dir = train_dir / name
    if not candidate_dir.is_dir():
        raise FileNotFoundError(
            f"LoRA {reference!r}: no such file, and no candidate {name!r} under {train_dir}"
        )
    if step:
        chosen = int(step)
    else:
        steps = [int(d.name.split("-", 1)[1]) for d in candidate_dir.glob("checkpoint-*")]
        if not steps:
            raise FileNotFoundError(f"LoRA {reference!r}: {candidate_dir} has no checkpoints")
        chosen = max(steps)
    return adapter_name(f"{name}-{chosen}"), lora_file(checkpoint_path(candidate_dir, chosen))


@app.command()
def generate(
    prompt: Annotated[str, typer.Argument(help="The prompt (include the trigger word).")],
    lora: Annotated[
        list[str] | None,
        typer.Option(
            help="NAME_OR_PATH[:SCALE]: a LoRA of --lora-dir by name (its trigger words are "
            "added), a .safetensors file, a checkpoint folder, or a trained candidate NAME or "
            "NAME@STEP under --train-dir. Repeat for several.",
        ),
    ] = None,
    seed: Annotated[int, typer.Option(help="Generator seed (torch.Generator('cpu')).")] = 0,
    batch_size: Annotated[
        int, typer.Option(min=1, help="Images; image i uses seed + i (OUT gets -i suffixes).")
    ] = 1,
    preset: Annotated[
        str, typer.Option(help=f"Quality preset ({', '.join(PRESETS)}): steps and guidance.")
    ] = "standard",
    steps: Annotated[int | None, typer.Option(min=1, help="Sampling steps (over the preset).")] = (
        None
    ),
    guidance_scale: Annotated[
        float | None, typer.Option("--cfg", help="Classifier-free guidance (over the preset).")
    ] = None,
    negative_prompt: Annotated[str, typer.Option("--negative", help="Negative prompt.")] = "",
    scheduler: Annotated[str, typer.Option(help=f"One of {', '.join(SCHEDULERS)}.")] = "euler",
    clip_skip: Annotated[int, typer.Option(min=1, help="A1111 clip skip (1 = last layer).")] = 1,
    width: Annotated[int | None, typer.Option(help="Width (default: the model's).")] = None,
    height: Annotated[int | None, typer.Option(help="Height (default: the model's).")] = None,
    control_image: Annotated[
        Path | None, typer.Option(help="ControlNet input: a skeleton/edge/depth map or a photo.")
    ] = None,
    control_type: Annotated[
        str, typer.Option(help="openpose (a skeleton image), canny or depth.")
    ] = "openpose",
    control_from_photo: Annotated[
        bool, typer.Option(help="Derive the canny/depth map from --control-image.")
    ] = False,
    depth_model: Annotated[
        str | None, typer.Option(help="A local depth-estimation model (for depth from a photo).")
    ] = None,
    controlnet: Annotated[
        str | None, typer.Option(help="A local ControlNet folder (required with real weights).")
    ] = None,
    init_image: Annotated[Path | None, typer.Option(help="Image-to-image: the start.")] = None,
    mask: Annotated[Path | None, typer.Option(help="Inpainting mask (white = repaint).")] = None,
    strength: Annotated[float, typer.Option(help="img2img / inpaint denoising strength.")] = 0.75,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N or mps.")] = "auto",
    memory: Annotated[
        str, typer.Option(help="device, model_cpu_offload or sequential_cpu_offload.")
    ] = "device",
    out: Annotated[Path, typer.Option(help="Output PNG (a .json sidecar goes beside it).")] = Path(
        "charaforge.png"
    ),
    base: Annotated[Path, typer.Option(help="The base model folder (the `base` stage).")] = Path(
        layout.BASE_DIR
    ),
    train_dir: Annotated[Path, typer.Option(help="Where trained candidates live.")] = Path(
        layout.TRAIN_DIR
    ),
    lora_dir: Annotated[
        Path | None, typer.Option(help="The LoRA folder (with an optional registry.yaml).")
    ] = None,
) -> None:
    """Render images with the base model and any LoRAs, exactly as the sweep renders."""

    try:
        controlnets = {control_type: controlnet} if controlnet else {}
        engine = GenerationEngine(
            base, scheduler=scheduler, device=device, memory=memory, controlnets=controlnets
        )
        registry = LoraRegistry(lora_dir) if lora_dir else None
        scales: dict[str, float] = {}
        for spec in lora or []:
            reference, scale = parse_lora_spec(spec)
            triggers: tuple[str, ...] = ()
            if registry is not None and reference in registry.names():
                entry = registry.get(reference)
                name, file, triggers = entry.name, entry.file, entry.trigger_words
            else:
                name, file = resolve_lora(reference, train_dir)
            if name in scales:
                name = adapter_name(f"{name}-{len(scales)}")
            engine.load_lora(name, file, trigger_words=triggers)
            scales[name] = scale
        conditioning = None
        if control_image is not None:
            image = load_image(control_image)
            if control_from_photo and control_type == "canny":
                image = canny_map(image)
            elif control_from_photo and control_type == "depth":
                image = depth_map(image, depth_model)
            conditioning = Conditioning("control", image, control_type=control_type)
        elif init_image is not None:
            kind = "inpaint" if mask is not None else "img2img"
            conditioning = Conditioning(
                kind,
                load_image(init_image),
                mask=mask_image(mask) if mask is not None else None,
                strength=strength,
            )
        elif mask is not None:
            raise ValueError("--mask needs --init-image")
        images = engine.render_batch(
            [
                RenderRequest(
                    prompt=prompt,
                    seed=seed + offset,
                    loras=scales,
                    steps=steps,
                    guidance_scale=guidance_scale,
                    negative_prompt=negative_prompt,
                    width=width,
                    height=height,
                    preset=preset,
                    clip_skip=clip_skip,
                    conditioning=conditioning,
                )
                for offset in range(batch_size)
            ]
        )
    except (ConfigError, FileNotFoundError, KeyError, ValueError) as error:
        log.error("%s", str(error).strip("'\""))
        raise typer.Exit(2) from None
    for offset, image in enumerate(images):
        path = out if batch_size == 1 else out.with_name(f"{out.stem}-{offset}{out.suffix}")
        write_image(path, image)
        parameters = json.loads(image.info["charaforge"])
        log.info(
            "wrote %s (%s)",
            path,
            "stand-in model" if parameters["stand_in"] else parameters["model"],
        )


@app.command()
def serve(
    host: Annotated[
        str, typer.Option(help="Listen address (loopback unless told).")
    ] = DEFAULT_HOST,
    port: Annotated[int, typer.Option(help="Port.")] = DEFAULT_PORT,
    base: Annotated[Path, typer.Option(help="The base model folder.")] = Path(layout.BASE_DIR),
    lora_dir: Annotated[Path, typer.Option(help="The LoRA folder (registry.yaml).")] = Path(
        layout.LORAS_DIR
    ),
    device: Annotated[
        list[str] | None, typer.Option(help="A device per worker (repeat); default auto.")
    ] = None,
    memory: Annotated[str, typer.Option(help="device, model_cpu_offload, ...")] = "device",
    queue_size: Annotated[int, typer.Option(min=1, help="Requests waiting at most.")] = 8,
    token_env: Annotated[
        str, typer.Option(help="Environment variable holding the bearer token (if set).")
    ] = "CHARAFORGE_TOKEN",
    max_size: Annotated[int, typer.Option(help="Largest width/height.")] = 1024,
    max_steps: Annotated[int, typer.Option(help="Most steps per request.")] = 100,
    max_batch: Annotated[int, typer.Option(help="Most images per request.")] = 4,
    cpu_threads: Annotated[
        int | None, typer.Option(min=1, help="torch CPU threads per worker (default: torch's).")
    ] = None,
) -> None:
    """Serve the generation engine over HTTP (OpenAPI schema at /docs and /openapi.json)."""
    import os

    settings = ServerSettings(
        base_dir=base,
        lora_dir=lora_dir,
        devices=device or ["auto"],
        memory=memory,
        queue_size=queue_size,
        token=os.environ.get(token_env) or None,
        max_size=max_size,
        max_steps=max_steps,
        max_batch=max_batch,
        cpu_threads=cpu_threads,
    )
    if host not in ("127.0.0.1", "localhost", "::1") and settings.token is None:
        log.warning("listening on %s without a bearer token (set $%s)", host, token_env)
    try:
        run_server(settings, host=host, port=port)
    except ConfigError as error:
        log.error("%s", error)
        raise typer.Exit(2) from None


@app.command()
def params(
    overrides: Annotated[
        list[str] | None, typer.Argument(help="Hydra overrides, e.g. eval.seeds=[0,1,2].")
    ] = None,
    root: Annotated[Path, typer.Option(help="Repository root holding conf/.")] = Path("."),
    config_name: Annotated[
        str,
        typer.Option(help="Primary config in conf/: config (the world demo) or stand_in."),
    ] = DEFAULT_CONFIG,
) -> None:
    """Compose conf/ into params.yaml exactly as `dvc exp run` does (`dvc repro` never does)."""

    try:
        compose_params(root, overrides or [], config_name=config_name)
    except ConfigError as error:
        log.error("%s", error)
        raise typer.Exit(2) from None
    log.info("wrote %s", root / "params.yaml")


@app.command()
def new(
    source: Annotated[
        Path, typer.Argument(help="A folder of images (.txt captions beside them) or a kohya TOML.")
    ],
    name: Annotated[str, typer.Option(help="The character's name (file and registry names).")],
    trigger: Annotated[str, typer.Option(help="The trigger word the LoRA learns.")],
    model: Annotated[
        str | None, typer.Option(help="A conf/model choice (tiny_sd15, sd15, sdxl, ...).")
    ] = None,
    model_path: Annotated[
        str | None, typer.Option(help="model.path: local weights (with --model sd15/sdxl).")
    ] = None,
    tagger: Annotated[
        str | None, typer.Option(help="A conf/tagger choice (clip, wd14) for uncaptioned images.")
    ] = None,
    overrides: Annotated[
        list[str] | None, typer.Option("--set", "-S", help="More settings KEY=VALUE (in the file).")
    ] = None,
    run: Annotated[bool, typer.Option(help="Run it with DVC (--no-run: only write it).")] = True,
    root: Annotated[Path, typer.Option(help="Repository root holding conf/ and dvc.yaml.")] = Path(
        "."
    ),
) -> None:
    """Your own character: write conf/experiment/NAME.yaml and run it as a DVC experiment."""
    request = new_character.NewCharacter(
        name=name,
        trigger=trigger,
        source=source,
        model=model,
        model_path=model_path,
        tagger=tagger,
        overrides=tuple(overrides or ()),
    )
    try:
        new_character.write_experiment(root.resolve(), request)
        if not run:
            typer.echo(" ".join(new_character.dvc_command(request)))
            return
        code = new_character.run_experiment(root.resolve(), request)
    except ConfigError as error:
        log.error("%s", error)
        raise typer.Exit(2) from None
    if code:
        log.error("new: the DVC experiment failed (exit %d); the stage's message is above", code)
        raise typer.Exit(2)
