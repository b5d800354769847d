"""Consistency filter for batch generation: set aside the images that do not look like the
character, as a person picking keepers would, without deleting anything.

`filter_to_folders` (the `charaforge filter` command, and the score stage's filter option) scores
every image against reference embeddings of the dataset with CLIP-I (mean cosine with each
reference) and, when a face model is given, ArcFace identity; an image passes when it clears
every threshold in use. Accepted and rejected images are copied (with their sidecars) into
`accepted/` and `rejected/`, the scores and the reason of each verdict into `scores.parquet` and
`scores.csv`. The older `filter_folder` below moves the ArcFace rejects aside in place.

Each image's ArcFace identity (charaforge.models.face) against the reference embedding of the
character's images is compared with `score.face.identity_threshold`. Images under it, or with no
face at all, are moved (with their same-named sidecars) into a `set_aside/` folder next to them;
`consistency.csv` lists every image with its identity and where it is now. Moving is a rename
within one file system, so an interrupted run leaves every image whole in one of the two places,
and a rerun only looks at the images still in the folder.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from charaforge.config import ConsistencyFilterConfig, FaceConfig
from charaforge.core.files import write_bytes, write_csv, write_parquet
from charaforge.evaluate.clip import clip_i_scores
from charaforge.models.clip import ClipEmbedder
from charaforge.models.face import (
    FaceScorer,
    identity_scores,
    load_face_scorer,
    reference_embedding,
)

log = logging.getLogger(__name__)

SET_ASIDE = "set_aside"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
SIDECAR_SUFFIXES = (".json", ".txt")
CONSISTENCY_COLUMNS = ["file", "identity", "face_found", "kept", "location"]
ACCEPTED, REJECTED = "accepted", "rejected"
FILTER_COLUMNS = ["file", "clip_i", "identity", "face_found", "accepted", "reason", "location"]
FILTER_TABLE = "scores"


@dataclass(frozen=True)
class FilterThresholds:
    """The bars an image must clear; None leaves that score out (and uncomputed)."""

    clip_i: float | None = None
    identity: float | None = None

    def __post_init__(self) -> None:
        if self.clip_i is None and self.identity is None:
            raise ValueError("consistency filter: give a CLIP-I or an identity threshold")


def image_files(folder: str | Path) -> list[Path]:
    """The images directly in `folder`, sorted by name (the filter's input order)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: not a folder of images")
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def dataset_references(dataset: str | Path) -> list[Path]:
    """Reference images: a dataset folder's training split (metadata.parquet), or any folder's
    images."""
    dataset = Path(dataset)
    metadata = dataset / "metadata.parquet"
    if metadata.is_file():
        table = pd.read_parquet(metadata, columns=["image_path", "split"])
        paths = [Path(p) for p in table.loc[table["split"] == "train", "image_path"]]
        paths = [p if p.is_absolute() else dataset / p for p in paths]
    else:
        paths = image_files(dataset)
    if not paths:
        raise ValueError(f"{dataset}: no reference images")
    return paths


def consistency_scores(
    images: Sequence[Path],
    references: Sequence[Path],
    thresholds: FilterThresholds,
    clip: ClipEmbedder | None = None,
    face: FaceScorer | None = None,
    batch_size: int = 16,
) -> pd.DataFrame:
    """Each image's CLIP-I against the references and ArcFace identity against their mean face
    (only the scores a threshold asks for), and the verdict (`judge`)."""
    clip_i = identity = None
    if thresholds.clip_i is not None:
        if clip is None:
            raise ValueError("a CLIP-I threshold needs a CLIP model")
        reference = clip.embed_images(list(references), batch_size)
        clip_i = clip_i_scores(clip.embed_images(list(images), batch_size), reference)
    if thresholds.identity is not None:
        if face is None:
            raise ValueError("an identity threshold needs a face model")
        mean_face = reference_embedding(face.embed_images(list(references), batch_size))
        if mean_face is None:
            raise ValueError("consistency filter: no face found in any reference image")
        identity = identity_scores(face.embed_images(list(images), batch_size), mean_face)
    return judge([p.name for p in images], thresholds, clip_i, identity)


def judge(
    files: Sequence[str],
    thresholds: FilterThresholds,
    clip_i: Sequence[float] | None,
    identity: Sequence[float] | None,
) -> pd.DataFrame:
    """The verdict per image: accepted when every threshold in use is met (no face fails the
    identity bar); `reason` says which bars an image missed."""
    frame = pd.DataFrame({"file": list(files)})
    count = len(frame)
    nan = np.full(count, np.nan)
    clip_values = nan if clip_i is None else np.asarray(clip_i, np.float64)
    identity_values = nan if identity is None else np.asarray(identity, np.float64)
    frame["clip_i"] = np.round(clip_values, 6)
    frame["identity"] = np.round(identity_values, 6)
    found = ~np.isnan(identity_values)
    frame["face_found"] = pd.array(
        [pd.NA] * count if identity is None else found.tolist(), dtype="boolean"
    )
    reasons: list[list[str]] = [[] for _ in range(count)]
    for index in range(count):
        if thresholds.clip_i is not None and not clip_values[index] >= thresholds.clip_i:
            reasons[index].append(f"clip_i {clip_values[index]:.3f} < {thresholds.clip_i:g}")
        if thresholds.identity is not None:
            if not found[index]:
                reasons[index].append("no face")
            elif identity_values[index] < thresholds.identity:
                score = identity_values[index]
                reasons[index].append(f"identity {score:.3f} < {thresholds.identity:g}")
    frame["accepted"] = [not reason for reason in reasons]
    frame["reason"] = ["; ".join(reason) for reason in reasons]
    return frame


def filter_to_folders(
    images_dir: str | Path,
    references: Sequence[Path],
    out_dir: str | Path,
    thresholds: FilterThresholds,
    clip: ClipEmbedder | None = None,
    face: FaceScorer | None = None,
    batch_size: int = 16,
) -> pd.DataFrame:
    """Copy each image of `images_dir` (and its sidecars) into `out_dir/accepted/` or
    `out_dir/rejected/`; write `out_dir/scores.parquet` and `.csv`; return the table."""
    images = image_files(images_dir)
    table = consistency_scores(images, references, thresholds, clip, face, batch_size)
    return sort_into_folders(images, table, out_dir)


def sort_into_folders(
    images: Sequence[Path],
    table: pd.DataFrame,
    out_dir: str | Path,
    names: Sequence[str] | None = None,
) -> pd.DataFrame:
    """Copy each image (and its sidecars) by its verdict; write the table beside the folders.

    `names`: the file names in the folders (default the images' own; the sweep flattens its
    sub-folders into them so that no two images collide).
    Copies, not moves: the batch stays whole, and a rerun with other thresholds re-sorts it
    (an image is removed from the folder it no longer belongs in).
    """
    out_dir = Path(out_dir)
    locations = []
    names = [path.name for path in images] if names is None else list(names)
    for path, name, accepted in zip(images, names, table["accepted"], strict=True):
        verdict, other = (ACCEPTED, REJECTED) if accepted else (REJECTED, ACCEPTED)
        stem = Path(name).stem
        sidecars = [path.with_suffix(suffix) for suffix in SIDECAR_SUFFIXES]
        for item in [path, *[p for p in sidecars if p.is_file()]]:
            target = name if item == path else stem + item.suffix
            write_bytes(out_dir / verdict / target, item.read_bytes())
            (out_dir / other / target).unlink(missing_ok=True)
        locations.append(f"{verdict}/{name}")
    table = table.assign(location=locations)[FILTER_COLUMNS]
    write_parquet(out_dir / f"{FILTER_TABLE}.parquet", table)
    write_csv(out_dir / f"{FILTER_TABLE}.csv", table)
    log.info(
        "consistency filter: accepted %d of %d images into %s (rejects in %s)",
        int(table["accepted"].sum()),
        len(table),
        out_dir / ACCEPTED,
        out_dir / REJECTED,
    )
    return table


def filter_folder(
    folder: str | Path,
    reference_images: Sequence[str | Path],
    config: FaceConfig,
    batch_size: int = 32,
) -> pd.DataFrame:
    """Move images under the identity threshold into `folder/set_aside/`; return the table.

    The table (also written as `folder/consistency.csv`) has one row per image considered:
    file name, identity (NaN without a face), whether a face was found, whether it was kept, and
    its location relative to `folder`.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: not a folder of generated images")
    images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    with load_face_scorer(config) as scorer:
        reference = reference_embedding(scorer.embed_images(list(reference_images), batch_size))
        if reference is None:
            raise ValueError(
                "consistency filter: no face found in any reference image; nothing to compare "
                "with, nothing moved"
            )
        if scorer.stand_in:
            log.warning(
                "consistency filter uses the stand-in recognition model: its identities mean "
                "nothing (set score.face.recognition=pretrained)"
            )
        identity = identity_scores(scorer.embed_images(images, batch_size), reference)
    found = ~np.isnan(identity)
    kept = found & (np.nan_to_num(identity, nan=-2.0) >= config.identity_threshold)
    aside = folder / SET_ASIDE
    rows = []
    for path, score, has_face, keep in zip(images, identity, found, kept, strict=True):
        location = path.name
        if not keep:
            aside.mkdir(exist_ok=True)
            # Sidecars (.json parameters, .txt captions) travel with their image.
            sidecars = [path.with_suffix(suffix) for suffix in SIDECAR_SUFFIXES]
            for companion in [path, *[p for p in sidecars if p.is_file()]]:
                os.replace(companion, aside / companion.name)
            location = f"{SET_ASIDE}/{path.name}"
        rows.append(
            {
                "file": path.name,
                "identity": round(float(score), 6) if has_face else np.nan,
                "face_found": bool(has_face),
                "kept": bool(keep),
                "location": location,
            }
        )
    table = pd.DataFrame(rows, columns=CONSISTENCY_COLUMNS)
    write_csv(folder / "consistency.csv", table)
    log.info(
        "consistency filter: kept %d of %d images (identity >= %g), set aside %d in %s",
        int(kept.sum()),
        len(images),
        config.identity_threshold,
        int((~kept).sum()),
        aside,
    )
    return table


def filter_sweep(
    image_paths: Sequence[Path],
    clip_i: Sequence[float],
    identity: Sequence[float],
    config: ConsistencyFilterConfig,
    out_dir: str | Path,
) -> pd.DataFrame:
    """The score stage's filter option, on the CLIP-I and ArcFace columns it already computed:
    sweep images into `out_dir/accepted|rejected` named by their sweep path (`/` -> `__`)."""
    thresholds = FilterThresholds(config.clip_threshold, config.identity_threshold)
    names = [_sweep_name(Path(path)) for path in image_paths]
    table = judge(
        names,
        thresholds,
        clip_i if config.clip_threshold is not None else None,
        identity if config.identity_threshold is not None else None,
    )
    return sort_into_folders(image_paths, table, out_dir, names)


def _sweep_name(path: Path) -> str:
    """images/<candidate>/step-N/scale-S/<file>.png -> <candidate>__step-N__scale-S__<file>.png"""
    parts = path.parts
    after = len(parts) - 1 - parts[::-1].index("images") if "images" in parts else len(parts) - 1
    return "__".join(parts[after + 1 :]) if after < len(parts) - 1 else path.name
