"""Dedupe: exact and perceptual near-duplicates, clustered, with a deterministic keep policy.

Every distinct image (`image_id`) gets a perceptual hash (imagehash). Two images are linked when
the Hamming distance of their hashes is at most `threshold`; clusters are the connected components
of that graph (so A~B and B~C put A, B and C together even if A and C are further apart). Manifest
rows that share an `image_id` (byte-identical after normalisation) are exact duplicates and always
share a cluster.

Keep policy inside a cluster, deterministic: the largest resolution, then the sharpest (variance of
the Laplacian), then one that came with a sidecar caption (so exact copies do not lose their
caption), then the smallest source path. Exactly one row per cluster is kept, so of several rows
sharing an `image_id` one is kept and the others point at it. dedupe.parquet has one row per
manifest row (docs/data-contracts.md: it adds `source_path` to say which row).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import imagehash
import numpy as np
import pandas as pd
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from charaforge.config import DedupeConfig
from charaforge.io import write_parquet, write_png

log = logging.getLogger(__name__)

HASHERS = {
    "phash": imagehash.phash,
    "dhash": imagehash.dhash,
    "whash": imagehash.whash,
    "average_hash": imagehash.average_hash,
}
DEDUPE_COLUMNS = ["image_id", "source_path", "hash", "cluster_id", "keep", "duplicate_of"]
# Popcount of every byte value: Hamming distance = sum of POPCOUNT[a ^ b] over the packed bytes.
POPCOUNT = (
    np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1).sum(axis=1).astype(np.uint16)
)


@dataclass
class DedupeSummary:
    rows: int
    kept: int
    dropped: int
    clusters: int  # clusters with more than one row


def image_hash(image: Image.Image, config: DedupeConfig) -> imagehash.ImageHash:
    return HASHERS[config.hash](image, hash_size=config.hash_size)


def pack_hashes(hashes: list[imagehash.ImageHash]) -> np.ndarray:
    """Hashes as rows of packed bits, shape (n, ceil(bits / 8)), dtype uint8."""
    if not hashes:
        return np.zeros((0, 0), dtype=np.uint8)
    bits = np.stack([np.asarray(h.hash, dtype=bool).ravel() for h in hashes])
    return np.packbits(bits, axis=1)


def near_pairs(packed: np.ndarray, threshold: int, block: int = 1024) -> np.ndarray:
    """All pairs (i < j) with Hamming distance <= threshold, as an (m, 3) array of i, j, distance.

    Vectorised XOR + popcount over a block of rows at a time, so memory stays at
    block x n x bytes instead of n x n x bytes.
    """
    found: list[np.ndarray] = []
    n = len(packed)
    for start in range(0, n, block):
        rows = packed[start : start + block]
        distances = POPCOUNT[rows[:, None, :] ^ packed[None, :, :]].sum(axis=2)
        i, j = np.nonzero(distances <= threshold)
        i = i + start
        upper = i < j
        found.append(np.stack([i[upper], j[upper], distances[i[upper] - start, j[upper]]], axis=1))
    return np.concatenate(found) if found else np.zeros((0, 3), dtype=np.int64)


def sharpness(image: Image.Image) -> float:
    """Variance of the Laplacian of the grey image: higher is sharper."""
    grey = np.asarray(image.convert("L"), dtype=np.float64)
    return float(ndimage.laplace(grey).var())


def _cluster_labels(n: int, pairs: np.ndarray) -> np.ndarray:
    graph = coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(n, n))
    _, labels = connected_components(graph, directed=False)
    # Renumber clusters by first appearance so ids follow manifest order, not scipy's internals.
    _, first = np.unique(labels, return_index=True)
    order = np.argsort(first)
    remap = np.empty_like(order)
    remap[order] = np.arange(len(order))
    return remap[labels]


def dedupe(manifest: pd.DataFrame, config: DedupeConfig) -> pd.DataFrame:
    """The dedupe table for a manifest (one row per manifest row, in manifest order)."""
    manifest = manifest.reset_index(drop=True)
    unique = manifest.drop_duplicates("image_id").reset_index(drop=True)
    if unique.empty:
        return pd.DataFrame(columns=DEDUPE_COLUMNS).astype({"cluster_id": "int64", "keep": bool})
    path_of = dict(zip(unique["image_id"], unique["image_path"], strict=True))

    def load(image_id: str) -> Image.Image:
        with Image.open(path_of[image_id]) as image:
            return image.convert("RGB")

    # One image in memory at a time: a large folder never has to fit in RAM.
    hashes = [image_hash(load(image_id), config) for image_id in unique["image_id"]]
    pairs = near_pairs(pack_hashes(hashes), config.threshold)
    labels = _cluster_labels(len(unique), pairs)
    hash_of = {image_id: str(h) for image_id, h in zip(unique["image_id"], hashes, strict=True)}
    cluster_of = dict(zip(unique["image_id"], labels.tolist(), strict=True))

    frame = manifest[["image_id", "source_path", "width", "height"]].copy()
    frame["captioned"] = manifest["sidecar_text"].notna()
    frame["hash"] = frame["image_id"].map(hash_of)
    frame["cluster_id"] = frame["image_id"].map(cluster_of).astype("int64")
    frame["keep"] = False
    frame["duplicate_of"] = None
    for _, members in frame.groupby("cluster_id", sort=True):
        if len(members) == 1:
            frame.loc[members.index, "keep"] = True
            continue
        ranked = members.assign(
            pixels=members["width"] * members["height"],
            sharp=[sharpness(load(i)) for i in members["image_id"]],
        ).sort_values(
            ["pixels", "sharp", "captioned", "source_path"], ascending=[False, False, False, True]
        )
        winner = ranked.index[0]
        frame.loc[winner, "keep"] = True
        losers = members.index.drop(winner)
        frame.loc[losers, "duplicate_of"] = frame.loc[winner, "image_id"]
    return frame[DEDUPE_COLUMNS].astype({"keep": bool})


def kept_rows(manifest: pd.DataFrame, dedupe_table: pd.DataFrame) -> pd.DataFrame:
    """Manifest rows of the kept images (one per kept image_id), in manifest order."""
    kept = dedupe_table.loc[dedupe_table["keep"], ["source_path"]]
    return manifest.merge(kept, on="source_path", how="inner").reset_index(drop=True)


def contact_sheet(table: pd.DataFrame, manifest: pd.DataFrame, thumb: int = 128) -> Image.Image:
    """One row per cluster with more than one member: the kept image, then the dropped ones."""
    path_of = dict(zip(manifest["image_id"], manifest["image_path"], strict=False))
    sizes = table.groupby("cluster_id")["image_id"].transform("size")
    clusters = [group for _, group in table[sizes > 1].groupby("cluster_id", sort=True)]
    font = ImageFont.load_default()
    label = 28
    columns = max((len(group) for group in clusters), default=1)
    sheet = Image.new(
        "RGB", (columns * (thumb + 8) + 8, max(len(clusters), 1) * (thumb + label + 8) + 8), "white"
    )
    draw = ImageDraw.Draw(sheet)
    if not clusters:
        draw.text((8, 8), "no duplicate clusters", fill="black", font=font)
        return sheet
    for row, group in enumerate(clusters):
        group = group.sort_values(["keep", "source_path"], ascending=[False, True])
        kept_hash = imagehash.hex_to_hash(group["hash"].iloc[0]) if group["keep"].iloc[0] else None
        for column, member in enumerate(group.itertuples()):
            x, y = 8 + column * (thumb + 8), 8 + row * (thumb + label + 8)
            with Image.open(path_of[member.image_id]) as image:
                preview = image.convert("RGB")
                preview.thumbnail((thumb, thumb), Image.LANCZOS)
            sheet.paste(preview, (x, y))
            if member.keep:
                status = "KEEP"
            else:
                distance = imagehash.hex_to_hash(member.hash) - kept_hash if kept_hash else "?"
                status = f"drop (d={distance})"
            draw.rectangle(
                [x, y, x + thumb - 1, y + thumb - 1], outline="green" if member.keep else "red"
            )
            draw.text((x, y + thumb + 2), status, fill="black", font=font)
            draw.text(
                (x, y + thumb + 14), Path(member.source_path).name[:22], fill="black", font=font
            )
    return sheet


def dedupe_folder(
    ingest_dir: str | Path, out_dir: str | Path, config: DedupeConfig
) -> DedupeSummary:
    """Read `ingest_dir/manifest.parquet`; write dedupe.parquet and contact_sheet.png."""
    manifest = pd.read_parquet(Path(ingest_dir) / "manifest.parquet")
    table = dedupe(manifest, config)
    write_parquet(Path(out_dir) / "dedupe.parquet", table)
    write_png(Path(out_dir) / "contact_sheet.png", contact_sheet(table, manifest))
    sizes = table.groupby("cluster_id").size()
    summary = DedupeSummary(
        rows=len(table),
        kept=int(table["keep"].sum()),
        dropped=int((~table["keep"]).sum()),
        clusters=int((sizes > 1).sum()),
    )
    log.info(
        "dedupe: %d rows, %d kept, %d dropped, %d duplicate clusters",
        summary.rows,
        summary.kept,
        summary.dropped,
        summary.clusters,
    )
    return summary
