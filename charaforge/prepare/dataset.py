"""Dataset: the metadata table, captions, a deterministic train/val split and the exports.

One row per kept image. Columns (docs/data-contracts.md):
`image_id, image_path, character, outfit, pose_tag, style, tags, source, split, notes, caption`.

- character: `data.character` for every row (the dataset is one character's).
- outfit / pose_tag: the image's tags that match OUTFIT_WORDS / POSE_TAGS, in tag order, joined
  with ", " ("" when none match). A tag matches the outfit vocabulary when its last word (or the
  whole tag) is an item of clothing, so "blue dress" is an outfit.
- style: "photo" when a tag is in PHOTO_TAGS, else "illustration".
- tags: list[str], the tagger's tags. source: the source file the image was ingested from.
- split: "val" when a uniform number drawn from hash(seed, image_id) is below val_fraction, else
  "train"; with at least two images and val_fraction > 0, each split gets at least one image.
- notes: "; "-joined remarks a person should see ("no person detected", "no tags", ...).
- caption: `caption_template` with {trigger}, {character}, {outfit}, {pose}, {style} and {tags}
  filled in; {tags} holds the tags that no other field of the template already placed.

Exports: `kohya/<repeats>_<trigger>/` holds the train split (image + caption, written both as
`.caption`, sd-scripts' default extension, and as `.txt`, what A1111-era tools and
`--caption_extension .txt` read: kohya trains on every image in the folder, so validation
images stay out); `imagefolder/{train,val}/` holds
both splits with `metadata.jsonl` lines `{"file_name", "text"}` (Hugging Face imagefolder).
Images with no tags whose captions no model tagger looked at (no sidecar, tagger `sidecar`)
would train on the trigger word alone: `build_dataset` stops before writing anything unless
`allow_trigger_only_captions`. The dataset card `README.md` (with the Hugging Face `datasets` YAML
header) gives the counts, the caption sources, the images captioned with the trigger word
alone, the split rule, example captions and the most frequent tags with a bar chart
(`tag_frequency.png`); `tag_frequency.csv` has every tag (`charaforge.prepare.dataset_card`).
"""

from __future__ import annotations

import json
import logging
import re
import string
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from charaforge.config import DatasetConfig
from charaforge.core.contracts import defining_tags, kept_rows
from charaforge.core.files import (
    atomic_path,
    derive_seed,
    write_bytes,
    write_parquet,
    write_text,
)
from charaforge.core.progress import progress
from charaforge.errors import ConfigError
from charaforge.prepare.dataset_card import write_card
from charaforge.prepare.ingest import portable_path

log = logging.getLogger(__name__)

METADATA_COLUMNS = [
    "image_id",
    "image_path",
    "character",
    "outfit",
    "pose_tag",
    "style",
    "tags",
    "source",
    "split",
    "notes",
    "caption",
]
OUTFIT_WORDS = frozenset(
    {
        "dress", "skirt", "shirt", "blouse", "sweater", "hoodie", "jacket", "coat", "suit",
        "spacesuit", "uniform", "serafuku", "kimono", "yukata", "armor", "bikini", "swimsuit",
        "leotard", "pants", "shorts", "jeans", "overalls", "apron", "cape", "cloak", "robe",
        "bodysuit", "pajamas", "tuxedo", "vest", "scarf", "hat",
    }
)  # fmt: skip
POSE_TAGS = (
    "standing", "sitting", "kneeling", "lying", "squatting", "walking", "running", "jumping",
    "arms up", "arms at sides", "arms behind back", "arms behind head", "crossed arms",
    "outstretched arms", "hand on hip", "hands on hips", "waving", "v", "peace sign",
)  # fmt: skip
PHOTO_TAGS = frozenset({"photo", "photo (medium)", "photorealistic", "realistic", "real life"})


@dataclass
class DatasetSummary:
    images: int
    train: int
    val: int
    without_person: int
    without_tags: int
    trigger_only_captions: int = 0


CAPTION_EXTENSIONS = (".caption", ".txt")  # sd-scripts' default first, then the common one
SIDECAR_TAGGER = "sidecar"  # the `tagger` value of rows whose tags only a sidecar could give


def uncaptioned_images(tags: pd.DataFrame, image_ids: list[str]) -> list[str]:
    """The images with no tags that no model tagger looked at (no sidecar caption came with
    them and the tagger was the sidecar reader): their captions would be the trigger alone."""
    tagger_of = dict(zip(tags["image_id"], tags["tagger"], strict=True))
    tags_of = dict(zip(tags["image_id"], tags["tags"], strict=True))
    return [
        image_id
        for image_id in image_ids
        if len(tags_of.get(image_id, [])) == 0
        and tagger_of.get(image_id, SIDECAR_TAGGER) == SIDECAR_TAGGER
    ]


def uncaptioned_message(count: int, total: int) -> str:
    """The one-line stop message: how many images lack a caption and which settings fix it."""
    return (
        f"{count} of {total} images have no caption (no sidecar .txt came with them and "
        "tagger.backend=sidecar tags nothing else), so the LoRA would learn from the trigger "
        "word alone; fix: caption them with a model tagger (-S tagger=clip, or -S tagger=wd14 "
        "-S tagger.wd14.model_path=<folder with model.onnx>; keeping the sidecars of the others: "
        "-S tagger.fill_missing=clip|wd14), add .txt captions beside the images, or accept "
        "trigger-only captions with -S data.allow_trigger_only_captions=true"
    )


def outfit_of(tags: list[str]) -> str:
    return ", ".join(t for t in tags if t in OUTFIT_WORDS or t.rsplit(" ", 1)[-1] in OUTFIT_WORDS)


def pose_tag_of(tags: list[str]) -> str:
    vocabulary = set(POSE_TAGS)
    return ", ".join(t for t in tags if t in vocabulary)


def style_of(tags: list[str]) -> str:
    return "photo" if any(t in PHOTO_TAGS for t in tags) else "illustration"


def split_of(image_ids: list[str], seed: int, val_fraction: float) -> list[str]:
    """train/val per image from a hash of (seed, image_id): stable when images come and go."""
    draws = [derive_seed(seed, "split", image_id) / 2**63 for image_id in image_ids]
    splits = ["val" if draw < val_fraction else "train" for draw in draws]
    if len(splits) >= 2 and val_fraction > 0:
        if "val" not in splits:
            splits[min(range(len(draws)), key=draws.__getitem__)] = "val"
        if "train" not in splits:
            splits[max(range(len(draws)), key=draws.__getitem__)] = "train"
    return splits


def caption_of(
    template: str,
    trigger: str,
    character: str,
    tags: list[str],
    pruned: frozenset[str] = frozenset(),
) -> str:
    """The caption from `template`; {tags} holds the tags no other field of it placed, less the
    `pruned` ones (the character's defining tags, with `prune_defining_fraction`)."""
    fields = {name for _, name, _, _ in string.Formatter().parse(template) if name}
    outfit, pose = outfit_of(tags), pose_tag_of(tags)
    placed: set[str] = set(pruned)
    if "outfit" in fields:
        placed |= set(outfit.split(", "))
    if "pose" in fields:
        placed |= set(pose.split(", "))
    style = style_of(tags)
    if "style" in fields and style == "photo":
        placed |= PHOTO_TAGS
    rest = [tag for tag in tags if tag not in placed]
    text = template.format(
        trigger=trigger,
        character=character,
        outfit=outfit,
        pose=pose,
        style=style,
        tags=", ".join(rest),
    )
    # An empty field leaves separators behind ("aoi_cf, "): tidy them away.
    text = re.sub(r"(\s*,\s*)+", ", ", text)
    return text.strip().strip(",").strip()


def build_metadata(
    rows: pd.DataFrame,
    tags: pd.DataFrame,
    poses: pd.DataFrame,
    config: DatasetConfig,
    character: str,
    trigger: str,
    seed: int,
    images_dir: str,
) -> pd.DataFrame:
    """The metadata table for the kept manifest rows, sorted by source path."""
    tags_of = dict(zip(tags["image_id"], tags["tags"], strict=True))
    person_of = dict(zip(poses["image_id"], poses["has_person"], strict=True))
    rows = rows.sort_values("source_path").reset_index(drop=True)
    pruned: frozenset[str] = frozenset()
    if config.prune_defining_fraction is not None:
        character_tags = [
            [str(t) for t in tags_of.get(image_id, [])]
            for image_id in rows["image_id"]
            if style_of([str(t) for t in tags_of.get(image_id, [])]) != "photo"
        ]
        pruned = frozenset(defining_tags(character_tags, config.prune_defining_fraction))
    records = []
    for row in rows.itertuples():
        image_tags = [str(t) for t in tags_of.get(row.image_id, [])]
        notes = []
        if not person_of.get(row.image_id, False):
            notes.append("no person detected")
        if not image_tags:
            notes.append("no tags")
        records.append(
            {
                "image_id": row.image_id,
                "image_path": f"{images_dir}/{row.image_id}.png",
                "character": character,
                "outfit": outfit_of(image_tags),
                "pose_tag": pose_tag_of(image_tags),
                "style": style_of(image_tags),
                "tags": image_tags,
                "source": row.source_path,
                "notes": "; ".join(notes),
                "caption": caption_of(
                    config.caption_template, trigger, character, image_tags, pruned
                ),
            }
        )
    table = pd.DataFrame(records, columns=[c for c in METADATA_COLUMNS if c != "split"])
    table.insert(
        METADATA_COLUMNS.index("split"),
        "split",
        split_of(table["image_id"].tolist(), seed, config.val_fraction),
    )
    return table[METADATA_COLUMNS]


def _jsonl(records: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in records)


def build_dataset(
    ingest_dir: str | Path,
    dedupe_dir: str | Path,
    tag_dir: str | Path,
    pose_dir: str | Path,
    out_dir: str | Path,
    config: DatasetConfig,
    character: str,
    trigger: str,
    seed: int,
    allow_trigger_only_captions: bool = False,
) -> DatasetSummary:
    """Write metadata.parquet, images/, kohya/ and imagefolder/ under `out_dir`.

    Raises ConfigError, before writing anything, when images would be captioned with the trigger
    word alone (see `uncaptioned_images`) and `allow_trigger_only_captions` is false.
    """
    out_dir = Path(out_dir)
    manifest = pd.read_parquet(Path(ingest_dir) / "manifest.parquet")
    dedupe_table = pd.read_parquet(Path(dedupe_dir) / "dedupe.parquet")
    tags = pd.read_parquet(Path(tag_dir) / "tags.parquet")
    poses = pd.read_parquet(Path(pose_dir) / "keypoints.parquet")
    rows = kept_rows(manifest, dedupe_table)
    images_dir = portable_path(out_dir / "images")
    table = build_metadata(rows, tags, poses, config, character, trigger, seed, images_dir)
    uncaptioned = uncaptioned_images(tags, table["image_id"].tolist())
    if uncaptioned and not allow_trigger_only_captions:
        raise ConfigError(uncaptioned_message(len(uncaptioned), len(table)))
    source_of = dict(zip(rows["image_id"], rows["image_path"], strict=True))
    # One image's bytes at a time, written to each export as it is read: memory stays flat.
    lines: dict[str, list[dict]] = {"train": [], "val": []}
    with (
        atomic_path(out_dir / "images") as images,
        atomic_path(out_dir / "kohya") as kohya,
        atomic_path(out_dir / "imagefolder") as imagefolder,
    ):
        images.mkdir(parents=True)
        concept = kohya / f"{config.kohya_repeats}_{trigger}"
        concept.mkdir(parents=True)
        for split in lines:
            (imagefolder / split).mkdir(parents=True)
        for row in progress(table.itertuples(), len(table), "dataset"):
            data = Path(source_of[row.image_id]).read_bytes()
            name = f"{row.image_id}.png"
            write_bytes(images / name, data)
            if row.split == "train":
                write_bytes(concept / name, data)
                for extension in CAPTION_EXTENSIONS:
                    write_text(concept / f"{row.image_id}{extension}", row.caption + "\n")
            write_bytes(imagefolder / row.split / name, data)
            lines[row.split].append({"file_name": name, "text": row.caption})
        for split, records in lines.items():
            write_text(imagefolder / split / "metadata.jsonl", _jsonl(records))
    write_parquet(out_dir / "metadata.parquet", table)
    ingest_summary = Path(ingest_dir) / "summary.json"
    counts = {
        "source files accepted by ingest": len(manifest),
        "dropped by dedupe (exact and near-duplicates)": int((~dedupe_table["keep"]).sum()),
    }
    if ingest_summary.is_file():
        report = json.loads(ingest_summary.read_text(encoding="utf-8"))
        counts["quarantined by ingest"] = int(report.get("quarantined", 0))
    kept_tags = tags[tags["image_id"].isin(set(table["image_id"]))]
    write_card(
        out_dir,
        table,
        config,
        character,
        trigger,
        sorted(set(tags["tagger"])),
        counts,
        caption_sources=kept_tags["tagger"].value_counts().sort_index().to_dict(),
        trigger_only=uncaptioned,
    )

    summary = DatasetSummary(
        images=len(table),
        train=int((table["split"] == "train").sum()),
        val=int((table["split"] == "val").sum()),
        without_person=int(table["notes"].str.contains("no person detected").sum()),
        without_tags=int((table["tags"].map(len) == 0).sum()),
        trigger_only_captions=len(uncaptioned),
    )
    if uncaptioned:
        log.warning(
            "dataset: %d images captioned with the trigger word alone "
            "(data.allow_trigger_only_captions=true)",
            len(uncaptioned),
        )
    log.info(
        "dataset: %d images (%d train, %d val), %d without a person, %d without tags",
        summary.images,
        summary.train,
        summary.val,
        summary.without_person,
        summary.without_tags,
    )
    return summary
