"""The `charaforge` command line: the same GenerationEngine the pipeline's sweep uses.

charaforge generate "aoi_cf, 1girl, red hair" --lora r4_lr1e-3:0.8 --seed 3 --out aoi.png
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated

import typer

from charaforge.config import ConfigError
from charaforge.engine import SCHEDULERS, GenerationEngine, adapter_name, lora_file, write_image
from charaforge.train import checkpoint_path

log = logging.getLogger("charaforge")

app = typer.Typer(help="CharaForge: train, evaluate and use character LoRAs.", no_args_is_help=True)


@app.callback()
def main(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False,
) -> None:
    """CharaForge: train, evaluate and use character LoRAs for Stable Diffusion."""
    from charaforge.stage import configure_logging

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
            help="PATH_OR_NAME[:SCALE]: a .safetensors file, a checkpoint folder, or a trained "
            "candidate NAME or NAME@STEP under --train-dir. Repeat for several.",
        ),
    ] = None,
    seed: Annotated[int, typer.Option(help="Generator seed (torch.Generator('cpu')).")] = 0,
    steps: Annotated[int, typer.Option(min=1, help="Sampling steps.")] = 20,
    guidance_scale: Annotated[float, typer.Option("--cfg", help="Classifier-free guidance.")] = 7.0,
    negative_prompt: Annotated[str, typer.Option("--negative", help="Negative prompt.")] = "",
    scheduler: Annotated[str, typer.Option(help=f"One of {', '.join(SCHEDULERS)}.")] = "euler",
    width: Annotated[int | None, typer.Option(help="Width (default: the model's).")] = None,
    height: Annotated[int | None, typer.Option(help="Height (default: the model's).")] = None,
    out: Annotated[Path, typer.Option(help="Output PNG (a .json sidecar goes beside it).")] = Path(
        "charaforge.png"
    ),
    base: Annotated[Path, typer.Option(help="The base model folder (the `base` stage).")] = Path(
        "data/base"
    ),
    train_dir: Annotated[Path, typer.Option(help="Where trained candidates live.")] = Path(
        "data/train"
    ),
) -> None:
    """Render one image with the base model and any LoRAs, exactly as the sweep renders."""
    try:
        engine = GenerationEngine(base, scheduler=scheduler)
        scales: dict[str, float] = {}
        for spec in lora or []:
            reference, scale = parse_lora_spec(spec)
            name, file = resolve_lora(reference, train_dir)
            if name in scales:
                name = adapter_name(f"{name}-{len(scales)}")
            engine.load_lora(name, file)
            scales[name] = scale
        image = engine.render(
            prompt,
            seed,
            loras=scales,
            steps=steps,
            guidance_scale=guidance_scale,
            negative_prompt=negative_prompt,
            width=width,
            height=height,
        )
    except (ConfigError, FileNotFoundError, KeyError, ValueError) as error:
        log.error("%s", error)
        raise typer.Exit(2) from None
    write_image(out, image)
    parameters = json.loads(image.info["charaforge"])
    log.info(
        "wrote %s (%s)", out, "stand-in model" if parameters["stand_in"] else parameters["model"]
    )


@app.command()
def params(
    overrides: Annotated[
        list[str] | None, typer.Argument(help="Hydra overrides, e.g. eval.seeds=[0,1,2].")
    ] = None,
    root: Annotated[Path, typer.Option(help="Repository root holding conf/.")] = Path("."),
) -> None:
    """Compose conf/ into params.yaml exactly as `dvc exp run` does (`dvc repro` never does)."""
    from charaforge.compose import compose_params

    try:
        compose_params(root, overrides or [])
    except ConfigError as error:
        log.error("%s", error)
        raise typer.Exit(2) from None
    log.info("wrote %s", root / "params.yaml")
