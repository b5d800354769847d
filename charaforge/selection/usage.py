"""What to use: the champion card at the top of the report, and the champion's files with a
Hugging Face model card in `reports/champion/`.

`export_champion` copies the champion checkpoint's two files (the kohya / A1111 / ComfyUI file and
the diffusers file) to `reports/champion/`, with a few of its sweep images and a `README.md` in
the Hugging Face model-card format (YAML front matter: base_model, tags, instance_prompt, widget).
Everything is byte-deterministic: no run ids or timestamps (MLflow holds those).
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from charaforge.core import layout
from charaforge.core.files import atomic_path, write_text
from charaforge.core.layout import kohya_file_name
from charaforge.selection.champion import Selection

CHAMPION_DIR = "champion"  # under the report folder
WIDGET_IMAGES = 3  # sweep images of the champion shown in the model card
MLFLOW_UI = "http://127.0.0.1:5000"  # `make mlflow-ui` (mlflow ui's default address)


@dataclass(frozen=True)
class ChampionCard:
    """The first thing the report shows: what to load, how, and whether it is worth it."""

    candidate: str
    step: int
    lora_scale: str
    trigger: str
    kohya_file: str  # paths relative to the repository root
    diffusers_file: str
    checkpoint_dir: str
    a1111_prompt: str  # `<lora:name:scale>`
    generate_command: str
    verdict: str  # beats / does not beat the base model (short)
    why: str  # why this row and not the top of the ranking
    model_card: str
    registered_model: str
    registry_uri: str  # models:/<name>@champion
    registry_link: str  # the model's page in the MLflow UI


def relative_to_root(path: str | Path, root: str | Path) -> str:
    """`path` as the report shows it: relative to the repository root when inside it."""
    try:
        return Path(path).resolve().relative_to(Path(root).resolve()).as_posix()
    except ValueError:
        return Path(path).as_posix()


def _verdict(selection: Selection) -> str:
    comparison = selection.baseline
    if comparison is None:
        return "not compared with the base model (no scale-0 row in the sweep)"
    difference = f"{comparison.difference:+.4f} composite"
    return {
        "beats": f"yes: beats the base model ({difference}, beyond its CI)",
        "worse": f"no: WORSE than the base model ({difference}, beyond its CI)",
    }.get(comparison.verdict, f"no: does not beat the base model beyond its CI ({difference})")


def _why(selection: Selection) -> str:
    champion = selection.champion
    if not selection.statistical_tie:
        return f"rank {int(champion['rank'])}: the best composite, no statistical tie"
    return (
        f"rank {int(champion['rank'])}: {len(selection.tied)} LoRA rows are a statistical tie "
        "(within noise of the best mean composite); among them the rule takes the smallest LoRA "
        "scale, then the earliest step"
    )


def champion_prompt(index: pd.DataFrame, champion: pd.Series) -> str:
    """The champion's first evaluation prompt (what the ready-to-paste command renders)."""
    rows = index[
        (index["candidate"] == champion["candidate"])
        & (index["step"] == champion["step"])
        & (index["lora_scale"] == champion["lora_scale"])
    ].sort_values(["prompt_index", "seed"])
    return str(rows.iloc[0]["prompt"]) if len(rows) else ""


def champion_card(
    selection: Selection,
    index: pd.DataFrame,
    train_dir: str | Path,
    out_dir: str | Path,
    trigger: str,
    character: str,
    registered_model: str,
    root: str | Path = ".",
    mlflow_ui: str = MLFLOW_UI,
) -> ChampionCard:
    """The card of the selection's champion; paths relative to the repository root `root`."""
    champion = selection.champion
    candidate, step = str(champion["candidate"]), int(champion["step"])
    scale = f"{float(champion['lora_scale']):g}"
    kohya = kohya_file_name(candidate, step)
    folder = Path(relative_to_root(Path(out_dir) / CHAMPION_DIR, root))
    checkpoint = layout.checkpoint_dir(Path(train_dir) / candidate, step)
    prompt = champion_prompt(index, champion) or trigger
    command = shlex.join(
        [
            "charaforge",
            "generate",
            prompt,
            "--lora",
            f"{candidate}@{step}:{scale}",
            "--seed",
            "0",
            "--out",
            f"{character or candidate}.png",
        ]
    )
    return ChampionCard(
        candidate=candidate,
        step=step,
        lora_scale=scale,
        trigger=trigger,
        kohya_file=(folder / kohya).as_posix(),
        diffusers_file=(folder / layout.LORA_WEIGHTS).as_posix(),
        checkpoint_dir=relative_to_root(checkpoint, root),
        a1111_prompt=f"<lora:{Path(kohya).stem}:{scale}>",
        generate_command=command,
        verdict=_verdict(selection),
        why=_why(selection),
        model_card=(folder / "README.md").as_posix(),
        registered_model=registered_model,
        registry_uri=f"models:/{registered_model}@champion",
        registry_link=f"{mlflow_ui}/#/models/{registered_model}",
    )


def model_card(
    card: ChampionCard,
    base_model: dict[str, Any] | None,
    widgets: list[tuple[str, str]],
    stand_in: bool,
) -> str:
    """README.md in the Hugging Face model-card format for the champion LoRA."""
    base = (base_model or {}).get("path") or f"charaforge {(base_model or {}).get('source')}"
    family = (base_model or {}).get("family", "sd15")
    front = {
        "base_model": str(base),
        "tags": [
            "text-to-image",
            "stable-diffusion-xl" if family == "sdxl" else "stable-diffusion",
            "lora",
            "diffusers",
            "template:sd-lora",
            "character",
            "charaforge",
        ],
        "instance_prompt": card.trigger,
        "widget": [{"text": text, "output": {"url": url}} for text, url in widgets],
        "library_name": "diffusers",
    }
    warning = (
        "\n> Computed with stand-in models (random weights): these files and scores show the "
        "pipeline works, not a usable character.\n"
        if stand_in
        else ""
    )
    return (
        "---\n"
        + yaml.safe_dump(front, sort_keys=False, allow_unicode=True)
        + "---\n\n"
        + f"""# {card.candidate}, step {card.step}: a character LoRA by CharaForge
{warning}
Trigger word: `{card.trigger}`. Recommended LoRA scale: {card.lora_scale}. Against the base
model: {card.verdict}.

## Files

- `{Path(card.kohya_file).name}`: kohya / A1111 / ComfyUI format (put it in `models/Lora/`;
  prompt with `{card.a1111_prompt}`)
- `{Path(card.diffusers_file).name}`: diffusers / PEFT format

## Use

```python
pipe.load_lora_weights("path/to/this/folder", weight_name="{Path(card.diffusers_file).name}")
pipe.fuse_lora(lora_scale={card.lora_scale})
```

```bash
{card.generate_command}
```

Registry: `{card.registry_uri}` (MLflow).
"""
    )


def export_champion(
    card: ChampionCard,
    index: pd.DataFrame,
    selection: Selection,
    base_model: dict[str, Any] | None,
    root: str | Path = ".",
) -> bool:
    """Write `reports/champion/` (the two LoRA files, widget images, README.md); False when the
    champion's checkpoint folder is absent (nothing is written then)."""
    root = Path(root)
    checkpoint = root / card.checkpoint_dir
    kohya = checkpoint / Path(card.kohya_file).name
    diffusers = checkpoint / layout.LORA_WEIGHTS
    if not diffusers.is_file():
        return False
    champion = selection.champion
    rows = index[
        (index["candidate"] == champion["candidate"])
        & (index["step"] == champion["step"])
        & (index["lora_scale"] == champion["lora_scale"])
    ].sort_values(["prompt_index", "seed"])
    rows = rows.drop_duplicates("prompt_index").head(WIDGET_IMAGES)
    with atomic_path(root / Path(card.kohya_file).parent) as folder:
        (folder / "images").mkdir(parents=True)
        (folder / diffusers.name).write_bytes(diffusers.read_bytes())
        if kohya.is_file():
            (folder / kohya.name).write_bytes(kohya.read_bytes())
        widgets = []
        for row in rows.itertuples():
            source = root / str(row.image_path)
            if source.is_file():
                name = f"images/prompt{int(row.prompt_index)}-seed{int(row.seed)}.png"
                (folder / name).write_bytes(source.read_bytes())
                widgets.append((str(row.prompt), name))
        text = model_card(card, base_model, widgets, bool(selection.stand_in))
        write_text(folder / "README.md", text)
    return True
