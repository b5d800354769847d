"""The `charaforge` command line: the same GenerationEngine the pipeline's sweep uses.

charaforge generate "aoi_cf, 1girl, red hair" --lora r4_lr1e-3:0.8 --seed 3 --out aoi.png
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

# Start-up stays fast (`charaforge --help`, argument and config errors never import torch,
# diffusers, pandas or MLflow): only light modules are imported here. cli.py is the one place
# where the command modules are imported inside the command functions, each where it is used;
# everywhere else the no-function-level-import rule holds.
from charaforge.core import layout
from charaforge.core.layout import checkpoint_path
from charaforge.core.logs import configure_logging
from charaforge.errors import ConfigError
from charaforge.generate.loras import adapter_name, lora_file, parse_prompt_loras
from charaforge.generate.records import write_image
from charaforge.generate.request import (
    CONTROL_TYPES,
    PRESETS,
    SCHEDULERS,
    Conditioning,
    ControlUnit,
    ImagePrompt,
    RenderRequest,
)

# Defaults shown in --help, copied here so that the help does not import their heavy modules
# (serve.http: FastAPI and the engine; pipeline.compose: the whole config schema). A test checks
# they equal the originals.
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860
DEFAULT_CONFIG = "config"

log = logging.getLogger("charaforge")

# Options `params` and `check` share: where conf/ is and which primary config composes it.
RootOption = Annotated[Path, typer.Option(help="Repository root holding conf/.")]
ConfigNameOption = Annotated[
    str, typer.Option(help="Primary config in conf/: config (the world demo) or stand_in.")
]

# Plain click help and tracebacks: typer's rich rendering imports ~0.4 s of modules per call.
app = typer.Typer(
    help="CharaForge: train, evaluate and use character LoRAs.",
    no_args_is_help=True,
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
)


@app.callback()
def main(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False,
) -> None:
    """CharaForge: train, evaluate and use character LoRAs for Stable Diffusion."""

    configure_logging(logging.DEBUG if verbose else logging.INFO)


def parse_lora_spec(spec: str) -> tuple[str, float]:
    """`PATH_OR_NAME[:SCALE]` -> (PATH_OR_NAME, scale); the scale defaults to 1.

    A spec whose text after the last `:` is not a number is an existing path (a `:` in a file
    name) or a bad scale, reported as such rather than as a missing file.
    """
    head, sep, tail = spec.rpartition(":")
    if not sep or Path(spec).exists():
        return spec, 1.0
    try:
        return head, float(tail)
    except ValueError:
        raise ValueError(
            f"--lora {spec!r}: bad scale {tail!r} (expected a number, e.g. {head}:0.8)"
        ) from None


def _trained_steps(candidate_dir: Path) -> list[int]:
    steps = []
    for folder in candidate_dir.glob("checkpoint-*"):
        number = folder.name.split("-", 1)[1]
        if number.isdigit():
            steps.append(int(number))
    return sorted(steps)


def _trained_candidates(train_dir: Path) -> str:
    """`name (steps 10, 20), ...` for every candidate under train_dir, for error messages."""
    listed = [
        f"{folder.name} (steps {', '.join(map(str, steps))})"
        for folder in sorted(train_dir.glob("*"))
        if folder.is_dir() and (steps := _trained_steps(folder))
    ]
    return ", ".join(listed) if listed else f"none under {train_dir}"


def parse_control_spec(spec: str, preprocess: Callable[[str, Any], Any] | None) -> ControlUnit:
    """`TYPE:IMAGE[:SCALE[:START:END]]` -> a ControlUnit (the map made from a photo if asked)."""
    parts = spec.split(":")
    if len(parts) not in (2, 3, 5):
        raise ValueError(f"--extra-control {spec!r}: expected TYPE:IMAGE[:SCALE[:START:END]]")
    try:
        numbers = [float(part) for part in parts[2:]]
    except ValueError:
        raise ValueError(f"--extra-control {spec!r}: SCALE, START and END are numbers") from None
    from charaforge.generate.conditioning import load_image

    image = load_image(parts[1])
    image = preprocess(parts[0], image) if preprocess else image
    scale = numbers[0] if numbers else 1.0
    start, end = numbers[1:] if len(numbers) == 3 else (0.0, 1.0)
    return ControlUnit(parts[0], image, scale, start, end)


def resolve_lora(reference: str, train_dir: Path) -> tuple[str, Path]:
    """A LoRA file or checkpoint folder, or a trained candidate: `NAME` (last checkpoint) or
    `NAME@STEP`; returns (adapter name, file). Errors list the candidates and steps there are."""
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
            f"LoRA {reference!r}: no such file, and no candidate {name!r}; "
            f"trained candidates: {_trained_candidates(train_dir)}"
        )
    steps = _trained_steps(candidate_dir)
    if not steps:
        raise FileNotFoundError(f"LoRA {reference!r}: {candidate_dir} has no checkpoints")
    if not step:
        chosen = steps[-1]
    elif step.isdigit() and int(step) in steps:
        chosen = int(step)
    else:
        raise FileNotFoundError(
            f"LoRA {reference!r}: candidate {name!r} has no checkpoint at step {step!r}; "
            f"its steps: {', '.join(map(str, steps))}"
        )
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
        str, typer.Option(help=f"One of {', '.join(CONTROL_TYPES)} (the map's type).")
    ] = "openpose",
    control_from_photo: Annotated[
        bool, typer.Option(help="Make the control maps from photos (the preprocessors).")
    ] = False,
    control_scale: Annotated[float, typer.Option(help="ControlNet weight.")] = 1.0,
    control_window: Annotated[
        tuple[float, float], typer.Option(help="Fractions of the steps the ControlNet acts in.")
    ] = (0.0, 1.0),
    extra_control: Annotated[
        list[str] | None,
        typer.Option(
            help="Another ControlNet: TYPE:IMAGE[:SCALE[:START:END]] (repeat for several)."
        ),
    ] = None,
    depth_model: Annotated[
        str | None, typer.Option(help="A local depth-estimation model (depth/normal from photos).")
    ] = None,
    controlnet: Annotated[
        str | None, typer.Option(help="A local ControlNet folder (required with real weights).")
    ] = None,
    extra_controlnet: Annotated[
        list[str] | None,
        typer.Option(help="TYPE=FOLDER: the local ControlNet of an --extra-control type."),
    ] = None,
    init_image: Annotated[Path | None, typer.Option(help="Image-to-image: the start.")] = None,
    mask: Annotated[Path | None, typer.Option(help="Inpainting mask (white = repaint).")] = None,
    strength: Annotated[float, typer.Option(help="img2img / inpaint denoising strength.")] = 0.75,
    ip_adapter_image: Annotated[
        Path | None, typer.Option(help="IP-Adapter reference image (style or face).")
    ] = None,
    ip_adapter_scale: Annotated[float, typer.Option(help="IP-Adapter scale (0: no effect).")] = 0.6,
    ip_adapter: Annotated[
        Path | None,
        typer.Option(help="A local IP-Adapter weight file, image_encoder/ beside it."),
    ] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N or mps.")] = "auto",
    memory: Annotated[
        str,
        typer.Option(
            help="device, model_cpu_offload, sequential_cpu_offload or balanced (split over GPUs)."
        ),
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
    reports_dir: Annotated[
        Path, typer.Option(help="The selection report's folder (`--lora champion`).")
    ] = Path(layout.REPORTS_DIR),
) -> None:
    """Render images with the base model and any LoRAs, exactly as the sweep renders.

    `<lora:NAME:WEIGHT>` tags in the prompt load LoRAs as --lora does.
    """

    try:
        # Everything the user can get wrong is checked before the base model is loaded.
        if preset not in PRESETS:
            raise ValueError(f"--preset {preset!r}: expected one of {', '.join(PRESETS)}")
        if scheduler not in SCHEDULERS:
            raise ValueError(f"--scheduler {scheduler!r}: expected one of {', '.join(SCHEDULERS)}")
        if mask is not None and init_image is None:
            raise ValueError("--mask needs --init-image")
        controlnets = {control_type: controlnet} if controlnet else {}
        for spec in extra_controlnet or []:
            kind, separator, folder = spec.partition("=")
            if not separator or kind not in CONTROL_TYPES:
                raise ValueError(f"--extra-controlnet {spec!r}: expected TYPE=FOLDER")
            controlnets[kind] = folder
        # Trained candidates (`NAME@STEP`) and `champion` (the latest selection report's
        # choice, at its scale) resolve as the server resolves them.
        from charaforge.serve.registry import LoraRegistry  # no torch: before the model loads

        registry = LoraRegistry(lora_dir or layout.LORAS_DIR, train_dir, reports_dir)
        prompt, tagged = parse_prompt_loras(prompt)
        specs: list[tuple[str, float | None]] = [
            (reference, scale if ":" in spec else None)
            for spec in lora or []
            for reference, scale in [parse_lora_spec(spec)]
        ]
        chosen: list[tuple[str, Path, tuple[str, ...], float]] = []
        for reference, wanted in [*specs, *tagged.items()]:
            triggers: tuple[str, ...] = ()
            scale = 1.0 if wanted is None else wanted
            if reference in registry.names():
                entry = registry.get(reference)
                name, file, triggers = entry.name, entry.file, entry.trigger_words
                scale = entry.default_scale if wanted is None else wanted
            elif reference == "champion":
                raise FileNotFoundError(
                    f"LoRA 'champion': no selection report with a champion in {reports_dir} "
                    "(run the pipeline's report stage first)"
                )
            else:
                name, file = resolve_lora(reference, train_dir)
            if name in {taken for taken, *_ in chosen}:
                name = adapter_name(f"{name}-{len(chosen)}")
            chosen.append((name, file, triggers, scale))
        # Only now the heavy part: torch, diffusers, the preprocessors and the base model.
        from charaforge.generate.conditioning import load_image, mask_image
        from charaforge.generate.controls import ControlPreprocessor, save_control_maps
        from charaforge.generate.engine import GenerationEngine

        engine = GenerationEngine(
            base,
            scheduler=scheduler,
            device=device,
            memory=memory,
            controlnets=controlnets,
            ip_adapter=ip_adapter,
        )
        scales: dict[str, float] = {}
        for name, file, triggers, scale in chosen:
            engine.load_lora(name, file, trigger_words=triggers)
            scales[name] = scale
        conditioning = None
        if control_image is not None:
            preprocess = ControlPreprocessor(depth_model) if control_from_photo else None
            image = load_image(control_image)
            image = preprocess(control_type, image) if preprocess else image
            extra_units: list[ControlUnit] = [
                parse_control_spec(spec, preprocess) for spec in extra_control or []
            ]
            conditioning = Conditioning(
                "control",
                image,
                control_type=control_type,
                conditioning_scale=control_scale,
                guidance_start=control_window[0],
                guidance_end=control_window[1],
                controls=tuple(extra_units),
            )
        elif init_image is not None:
            kind = "inpaint" if mask is not None else "img2img"
            conditioning = Conditioning(
                kind,
                load_image(init_image),
                mask=mask_image(mask) if mask is not None else None,
                strength=strength,
            )
        image_prompt = None
        if ip_adapter_image is not None:
            image_prompt = ImagePrompt(
                load_image(ip_adapter_image), ip_adapter_scale, source=ip_adapter_image.name
            )
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
                    image_prompt=image_prompt,
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
        if conditioning is not None and conditioning.kind == "control":
            save_control_maps(path, conditioning.control_units())
        parameters = json.loads(image.info["charaforge"])
        log.info(
            "wrote %s (%s)",
            path,
            "stand-in model" if parameters["stand_in"] else parameters["model"],
        )


@app.command()
def edit(
    image: Annotated[Path, typer.Argument(help="The photo whose subject is kept.")],
    prompt: Annotated[str, typer.Argument(help="The new background.")],
    mask: Annotated[
        Path | None, typer.Option(help="Subject mask (white = keep); default: segment a person.")
    ] = None,
    seed: Annotated[int, typer.Option(help="Generator seed.")] = 0,
    steps: Annotated[int | None, typer.Option(min=1, help="Sampling steps.")] = None,
    guidance_scale: Annotated[float | None, typer.Option("--cfg", help="Guidance.")] = None,
    negative_prompt: Annotated[str, typer.Option("--negative", help="Negative prompt.")] = "",
    size: Annotated[
        tuple[int, int] | None, typer.Option(help="Output WIDTH HEIGHT (default: the photo's).")
    ] = None,
    shadow: Annotated[bool, typer.Option(help="Add a ground shadow under the subject.")] = False,
    shadow_opacity: Annotated[float, typer.Option(help="Darkest shadow (0-1).")] = 0.5,
    blend_margin: Annotated[
        int, typer.Option(min=0, help="Feathered edge (px) where the subject meets the new image.")
    ] = 4,
    subject_blend: Annotated[
        float, typer.Option(help="Weight of the original subject (1 = its exact colours).")
    ] = 1.0,
    relight: Annotated[bool, typer.Option(help="Relight with IC-Light before blending.")] = False,
    relight_strength: Annotated[float, typer.Option(help="IC-Light denoising strength.")] = 0.5,
    iclight: Annotated[
        str | None, typer.Option(help="A local IC-Light offsets file (fc or fbc).")
    ] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N or mps.")] = "auto",
    out: Annotated[Path, typer.Option(help="Output PNG (+ .mask.png and .sheet.png).")] = Path(
        "edit.png"
    ),
    base: Annotated[Path, typer.Option(help="The base model folder (the `base` stage).")] = Path(
        layout.BASE_DIR
    ),
) -> None:
    """Replace a photo's background from a prompt, keeping the subject (ProdGen's edit)."""
    from charaforge.generate import edit as editing
    from charaforge.generate.conditioning import load_image, mask_image
    from charaforge.generate.engine import GenerationEngine

    try:
        photo = load_image(image)
        subject = mask_image(mask) if mask is not None else None
        request = editing.EditRequest(
            image=photo,
            prompt=prompt,
            seed=seed,
            mask=subject,
            steps=steps,
            guidance_scale=guidance_scale,
            negative_prompt=negative_prompt,
            size=size,
            shadow=shadow,
            shadow_opacity=shadow_opacity,
            blend_margin=blend_margin,
            subject_blend=subject_blend,
            relight=relight,
            relight_strength=relight_strength,
        )
        engine = GenerationEngine(base, device=device)
        relighter = editing.make_relighter(engine, iclight) if relight else None
        result = editing.replace_background(engine, request, relighter)
    except (ConfigError, FileNotFoundError, KeyError, ValueError) as error:
        log.error("%s", str(error).strip("'\""))
        raise typer.Exit(2) from None
    paths = editing.write_edit(result, out, prompt, engine.base.stand_in)
    summary = editing.edit_summary(result)
    log.info(
        "wrote %s, %s and %s (subject %.0f%% of the image, %.0f%% kept whole)",
        paths["image"],
        paths["mask"],
        paths["sheet"],
        100 * summary["subject_fraction"],
        100 * summary["fully_kept_fraction"],
    )


@app.command(name="filter")
def filter_images(
    images: Annotated[Path, typer.Argument(help="A folder of generated images.")],
    references: Annotated[
        Path,
        typer.Option(help="The character's dataset folder (its train split) or reference images."),
    ],
    out: Annotated[Path, typer.Option(help="Where accepted/, rejected/ and scores go.")],
    clip_threshold: Annotated[
        float | None, typer.Option(help="Minimum CLIP-I (mean cosine with the references).")
    ] = None,
    identity_threshold: Annotated[
        float | None, typer.Option(help="Minimum ArcFace identity (cosine with the mean face).")
    ] = None,
    params_file: Annotated[
        Path, typer.Option("--params", help="params.yaml whose score.clip / score.face are used.")
    ] = Path("params.yaml"),
    batch_size: Annotated[int, typer.Option(min=1, help="Images per embedding batch.")] = 16,
) -> None:
    """Sort a batch into accepted/ and rejected/ by likeness to the character (rejects kept)."""
    import contextlib

    from charaforge.config import load_params
    from charaforge.evaluate import consistency
    from charaforge.models.clip import load_clip
    from charaforge.models.face import load_face_scorer

    try:
        thresholds = consistency.FilterThresholds(clip_threshold, identity_threshold)
        score = load_params(params_file).score
        reference_images = consistency.dataset_references(references)
        clip = load_clip(score.clip) if clip_threshold is not None else None
        with contextlib.ExitStack() as stack:
            face = None
            if identity_threshold is not None:
                face = stack.enter_context(load_face_scorer(score.face))
            for model, label in ((clip, "CLIP"), (face, "face model")):
                if model is not None and model.stand_in:
                    log.warning("filter: the %s is a stand-in (random weights)", label)
            table = consistency.filter_to_folders(
                images, reference_images, out, thresholds, clip, face, batch_size
            )
    except (ConfigError, FileNotFoundError, KeyError, ValueError) as error:
        log.error("%s", str(error).strip("'\""))
        raise typer.Exit(2) from None
    log.info("accepted %d of %d (scores in %s)", table["accepted"].sum(), len(table), out)


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
    train_dir: Annotated[
        Path, typer.Option(help="Trained candidates, served as NAME@STEP.")
    ] = Path(layout.TRAIN_DIR),
    reports_dir: Annotated[
        Path, typer.Option(help="The selection report's folder (the `champion` alias).")
    ] = Path(layout.REPORTS_DIR),
    max_cost: Annotated[
        int, typer.Option(min=1, help="Most width x height x steps x images per request.")
    ] = 512 * 512 * 30 * 4,
    timeout: Annotated[
        float, typer.Option(min=1, help="Seconds a render may run before it is cancelled.")
    ] = 300.0,
    ui: Annotated[bool, typer.Option(help="Mount the web UI at /ui.")] = True,
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
    batch_ray_workers: Annotated[
        int, typer.Option(min=0, help="Batch jobs on N Ray engine actors ($RAY_ADDRESS or local).")
    ] = 0,
) -> None:
    """Serve the generation engine over HTTP (OpenAPI schema at /docs and /openapi.json)."""
    import os

    from charaforge.config.resources import RayConfig
    from charaforge.distributed.ray_batch import RayBatchRows
    from charaforge.serve.http import ServerSettings, serve as run_server
    from charaforge.serve.registry import LoraRegistry

    settings = ServerSettings(
        base_dir=base,
        lora_dir=lora_dir,
        train_dir=train_dir,
        reports_dir=reports_dir,
        max_cost=max_cost,
        request_timeout_s=timeout,
        ui=ui,
        devices=device or ["auto"],
        memory=memory,
        queue_size=queue_size,
        token=os.environ.get(token_env) or None,
        max_size=max_size,
        max_steps=max_steps,
        max_batch=max_batch,
        cpu_threads=cpu_threads,
        # The pipeline's MLflow store (pipeline.tracking's default), for the Training tab.
        tracking_uri=os.environ.get("MLFLOW_TRACKING_URI")
        or (f"sqlite:///{Path('mlflow.db').resolve()}" if Path("mlflow.db").is_file() else None),
        # POST /api/v1/eval/report's fixed validation: the project's eval, score, pose sections.
        params_file=Path("params.yaml"),
    )
    if host not in ("127.0.0.1", "localhost", "::1") and settings.token is None:
        log.warning("listening on %s without a bearer token (set $%s)", host, token_env)
    try:
        if not LoraRegistry(lora_dir, train_dir, reports_dir).entries():
            raise ConfigError(
                f"nothing to serve: no trained checkpoint under {train_dir} and no LoRA in "
                f"{lora_dir} (run the pipeline first: `dvc repro`)"
            )
        options = {"scheduler": settings.scheduler, "cpu_threads": cpu_threads, "memory": memory}
        rows = RayBatchRows(RayConfig(), batch_ray_workers, base, options)
        run_server(settings, host=host, port=port, batch_rows=rows if batch_ray_workers else None)
    except ConfigError as error:
        log.error("%s", error)
        raise typer.Exit(2) from None


@app.command()
def params(
    overrides: Annotated[
        list[str] | None, typer.Argument(help="Hydra overrides, e.g. eval.seeds=[0,1,2].")
    ] = None,
    root: RootOption = Path("."),
    config_name: ConfigNameOption = DEFAULT_CONFIG,
) -> None:
    """Compose conf/ into params.yaml exactly as `dvc exp run` does (`dvc repro` never does)."""
    from charaforge.pipeline.compose import compose_params

    try:
        compose_params(root, overrides or [], config_name=config_name)
    except ConfigError as error:
        log.error("%s", error)
        raise typer.Exit(2) from None
    log.info("wrote %s", root / "params.yaml")


@app.command("lora-resize")
def lora_resize(
    source: Annotated[Path, typer.Argument(help="A kohya LoRA .safetensors file.")],
    destination: Annotated[Path, typer.Argument(help="Where to write the resized file.")],
    rank: Annotated[int, typer.Option(min=1, help="The new (lower) rank.")],
) -> None:
    """Resize a LoRA to a lower rank by SVD (as kohya's resize tool), reporting what it keeps."""
    from charaforge.models.lora_resize import resize_file  # imported here: cli stays light

    try:
        report = resize_file(source, destination, rank)
    except (FileNotFoundError, ValueError, OSError) as error:
        log.error("%s", error)
        raise typer.Exit(2) from None
    log.info(
        "wrote %s: %d modules at rank %d, %.4f of the energy retained (least in one module %.4f)",
        destination, report.modules, rank, report.retained_energy, report.min_retained_energy,
    )  # fmt: skip


@app.command("lora-merge")
def lora_merge(
    lora: Annotated[Path, typer.Argument(help="A LoRA file or checkpoint folder.")],
    out_dir: Annotated[Path, typer.Argument(help="Folder for the checkpoint + diffusers/.")],
    scale: Annotated[float, typer.Option(help="The LoRA scale merged in.")] = 1.0,
    base: Annotated[Path, typer.Option(help="The base model folder.")] = layout.BASE_DIR,
) -> None:
    """Merge a LoRA into the base at a scale: a single-file checkpoint and a diffusers folder."""
    from charaforge.generate.merge import merge_lora  # imported here: cli stays light

    try:
        result = merge_lora(base, lora, out_dir, scale)
    except (FileNotFoundError, ValueError, OSError, ConfigError) as error:
        log.error("%s", error)
        raise typer.Exit(2) from None
    log.info("wrote %s and %s (%d weights changed)", *result.paths, result.changed_modules)


@app.command()
def check(
    overrides: Annotated[
        list[str] | None, typer.Argument(help="Hydra overrides, as given to `dvc exp run -S`.")
    ] = None,
    root: RootOption = Path("."),
    config_name: ConfigNameOption = DEFAULT_CONFIG,
) -> None:
    """Validate conf/ with these overrides (and the model from its config files) without
    touching params.yaml or any output: run it before `dvc exp run -S ...`, which deletes a
    stage's outputs before the stage can refuse a bad value."""
    import tempfile

    from charaforge.generate.prompts import check_suites
    from charaforge.pipeline.compose import compose_params
    from charaforge.prepare.ingest import check_source
    from charaforge.train.preflight import check_from_configs

    try:
        with tempfile.TemporaryDirectory() as scratch:
            checked = compose_params(
                root, overrides or [], output=Path(scratch) / "params.yaml", config_name=config_name
            )
        if checked.data.source != layout.DEMO_DIR:  # the demo stage makes its own source
            check_source(root / checked.data.source)
        check_suites(checked.eval, root)
        if checked.train.mixed_precision == "fp16":
            import torch

            if not torch.cuda.is_available():
                raise ConfigError("train.mixed_precision: fp16 needs a CUDA GPU; use bf16 or no")
        if checked.model.source == "pretrained" and checked.model.path:
            check_from_configs(checked.model.path, checked.train, checked.model.resolution)
    except ConfigError as error:
        log.error("%s", error)
        raise typer.Exit(2) from None
    log.info("configuration ok")


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
    from charaforge.pipeline import new_character  # light: yaml, tomllib, subprocess

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
