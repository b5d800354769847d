"""The dataset card: README.md with the Hugging Face `datasets` YAML header, the tag frequency
table and its bar chart (`charaforge.prepare.dataset` calls `write_card`)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import yaml

from charaforge.config import DatasetConfig
from charaforge.core.contracts import tag_frequency
from charaforge.core.files import write_bytes, write_csv, write_text


def tag_frequency_plot(frequency: pd.DataFrame, images: int, title: str) -> bytes:
    """A horizontal bar chart of tag counts (PNG bytes, no timestamp: same data, same bytes)."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    height = 1.2 + 0.28 * max(len(frequency), 1)
    figure, axis = plt.subplots(figsize=(6.4, height), dpi=100)
    try:
        ordered = frequency.iloc[::-1]
        axis.barh(ordered["tag"], ordered["count"], color="#4878a8")
        axis.set_xlabel(f"images with the tag (of {images})")
        axis.set_xlim(0, max(images, 1))
        axis.set_title(title, fontsize=10)
        axis.tick_params(axis="y", labelsize=8)
        figure.tight_layout()
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", metadata={"Software": None})
    finally:
        plt.close(figure)
    return buffer.getvalue()


def _markdown_table(header: list[str], rows: list[list[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def write_card(
    out_dir: Path,
    table: pd.DataFrame,
    config: DatasetConfig,
    character: str,
    trigger: str,
    taggers: list[str],
    counts: dict[str, int],
    caption_sources: dict[str, int] | None = None,
    trigger_only: list[str] | None = None,
) -> None:
    """README.md (the dataset card), tag_frequency.csv and tag_frequency.png under `out_dir`.

    `caption_sources`: images per tagger their tags came from; `trigger_only`: the images whose
    caption is the trigger word alone (no caption came with them, no model tagged them).
    """
    frequency = tag_frequency(table["tags"].tolist())
    write_csv(out_dir / "tag_frequency.csv", frequency)
    top = frequency.head(config.card_top_tags)
    stand_in = any("stand-in" in name for name in taggers)
    title = f"{character}: top {len(top)} tags" + (" (stand-in tagger)" if stand_in else "")
    write_bytes(out_dir / "tag_frequency.png", tag_frequency_plot(top, len(table), title))

    splits = table["split"].value_counts()
    styles = table["style"].value_counts()
    rows = [
        ["images", len(table)],
        ["train / val", f"{int(splits.get('train', 0))} / {int(splits.get('val', 0))}"],
        *[[f"style: {name}", int(count)] for name, count in sorted(styles.items())],
        ["no person detected", int(table["notes"].str.contains("no person detected").sum())],
        ["without tags", int((table["tags"].map(len) == 0).sum())],
        ["distinct tags", len(frequency)],
        *[[name, value] for name, value in counts.items()],
    ]
    examples = table.head(3)["caption"].tolist()
    warning = (
        "\n> **Stand-in tagger**: the tags come from a model with random weights; they mean "
        "nothing about the images.\n"
        if stand_in
        else ""
    )
    trigger_only = trigger_only or []
    sources = _markdown_table(
        ["tags from", "images"],
        [[f"`{name}`", count] for name, count in (caption_sources or {}).items()],
    )
    if trigger_only:
        listed = "\n".join(f"- `{image_id}`" for image_id in trigger_only)
        trigger_only_text = (
            f"**{len(trigger_only)} images are captioned with the trigger word alone** (no caption "
            f"came with them and no model tagger tagged them; `data.allow_trigger_only_captions` "
            f"is true):\n\n{listed}"
        )
    else:
        trigger_only_text = "No image is captioned with the trigger word alone."
    card = f"""{dataset_card_header(character, len(table))}# Dataset card: {character}

A character LoRA training set built by CharaForge (ingest, dedupe, tag, pose, dataset stages).
Trigger word: `{trigger}`. Tagger: {", ".join(f"`{name}`" for name in taggers) or "none"}.
{warning}
## Counts

{_markdown_table(["", "count"], rows)}

## Split

Deterministic by content: an image is in `val` when a number drawn from hash(seed, image_id) is
below {config.val_fraction}; adding or removing images never moves the others.

## Captions

Template `{config.caption_template}`.

{sources}

{trigger_only_text}

Examples:

{chr(10).join(f"- `{caption}`" for caption in examples)}

## Tag frequencies (top {len(top)})

![tag frequencies](tag_frequency.png)

{_markdown_table(["tag", "images", "fraction"], top.values.tolist())}

Every tag: `tag_frequency.csv`.

## Files

- `metadata.parquet`: one row per image (`image_id, image_path, character, outfit, pose_tag,
  style, tags, source, split, notes, caption`)
- `images/`: the training images (RGB PNG, named by content hash)
- `kohya/{config.kohya_repeats}_{trigger}/`: the train split for kohya sd-scripts, each caption
  twice: `.caption` (sd-scripts' default) and `.txt` (pass `--caption_extension .txt` to read
  those instead); `--train_data_dir kohya` trains it with {config.kohya_repeats} repeats
- `imagefolder/{{train,val}}/metadata.jsonl`: Hugging Face `imagefolder` layout
"""
    write_text(out_dir / "README.md", card)


def dataset_card_header(character: str, images: int) -> str:
    """The Hugging Face `datasets` YAML front matter: the imagefolder export as two splits."""
    size = "n<1K" if images < 1000 else "1K<n<10K" if images < 10000 else "10K<n<100K"
    header = {
        "pretty_name": f"{character} (CharaForge character dataset)",
        "task_categories": ["text-to-image"],
        "tags": ["lora", "character", "charaforge"],
        "size_categories": [size],
        "configs": [
            {
                "config_name": "default",
                "data_files": [
                    {"split": "train", "path": "imagefolder/train/*"},
                    {"split": "validation", "path": "imagefolder/val/*"},
                ],
            }
        ],
    }
    return "---\n" + yaml.safe_dump(header, sort_keys=False, allow_unicode=True) + "---\n\n"
