"""Dedupe: exact and perceptual near-duplicates, clustered, with a deterministic keep policy.

Every distinct image (`image_id`) gets a perceptual hash (imagehash: pHash by default, dHash,
wHash, average hash or colour hash). Two images are linked when the Hamming distance of their
hashes is at most `threshold`; clusters are the connected components of that graph (so A~B and
B~C put A, B and C together even if A and C are further apart). Manifest rows that share an
`image_id` (byte-identical after normalisation) are exact duplicates and always share a cluster.

Speed, so that a million images is practical:
- Hashing decodes no more pixels than the hash needs: a JPEG is decoded by libjpeg-turbo's DCT
  scaling (simplejpeg, up to 8x smaller, greyscale straight from the luma plane; Pillow's draft
  mode where simplejpeg cannot decode the file) and other formats are
  box-reduced right after decoding, before imagehash's own resize. The work is spread over a
  process pool, results in input order.
- The search is multi-index hashing (Norouzi et al.) on faiss's binary inverted file
  (prepare/hamming.py): the hash is cut into m blocks; by the pigeonhole principle two hashes
  within distance r agree within about r / m bits on at least one block, so each block's key
  values are inverted lists probed within that small radius, and faiss compares only the codes
  in the probed lists. A cost model picks m (blocks near log2 of the number of hashes), or the
  vectorised all-pairs search when that is cheaper (few hashes). Both return exactly the same
  pairs (tests check this against brute force and imagehash's own distance).

Keep policy inside a cluster, deterministic: the largest resolution, then the sharpest (variance of
the Laplacian), then one that came with a sidecar caption (so exact copies do not lose their
caption), then the smallest source path. Exactly one row per cluster is kept, so of several rows
sharing an `image_id` one is kept and the others point at it. dedupe.parquet has one row per
manifest row (docs/data-contracts.md: it adds `source_path` to say which row).
"""

from __future__ import annotations

import io
import logging
import math
import os
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import imagehash
import numpy as np
import pandas as pd
import simplejpeg
from PIL import Image, ImageDraw, ImageFont, ImageOps
from scipy import ndimage
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from tqdm.auto import tqdm

from charaforge.config import DedupeConfig
from charaforge.core.files import write_parquet, write_png
from charaforge.prepare.hamming import search_pairs
from charaforge.prepare.ingest import to_rgb

log = logging.getLogger(__name__)


def _colorhash(image: Image.Image, hash_size: int = 3) -> imagehash.ImageHash:
    return imagehash.colorhash(image, binbits=hash_size)


def _whash(image: Image.Image, hash_size: int = 8) -> imagehash.ImageHash:
    # A fixed working scale: imagehash's default (the largest power of two below the image
    # side) would make the hash depend on resolution, which is what near-duplicates differ in.
    return imagehash.whash(image, hash_size=hash_size, image_scale=whash_scale(hash_size))


HASHERS = {
    "phash": imagehash.phash,
    "dhash": imagehash.dhash,
    "whash": _whash,
    "average_hash": imagehash.average_hash,
    "colorhash": _colorhash,
}
DEDUPE_COLUMNS = ["image_id", "source_path", "hash", "cluster_id", "keep", "duplicate_of"]
# EXIF orientation (tag 274) -> the transpose that undoes it, as ImageOps.exif_transpose maps it.
ORIENTATION_TAG = 0x0112
EXIF_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
# Clusters drawn on the contact sheet at most: with CONTACT_SHEET_MEMBERS, a sheet of at most
# ~54 MB in memory (uncapped, 5000 generated images made 346 clusters of up to 19: ~440 MB).
CONTACT_SHEET_CLUSTERS = 100
# Members of one cluster drawn at most (its row's width).
CONTACT_SHEET_MEMBERS = 8
# Fewer hashes than this are hashed in the calling process: a pool costs more than it saves.
PARALLEL_MIN = 16


@dataclass
class DedupeSummary:
    rows: int
    kept: int
    dropped: int
    clusters: int  # clusters with more than one row


def whash_scale(hash_size: int) -> int:
    return max(64, hash_size * 8)


def working_size(hash_name: str, hash_size: int) -> int:
    """The side, in pixels, that the hash resizes every image to (what decoding must reach)."""
    return {
        "phash": hash_size * 4,
        "dhash": hash_size + 1,
        "average_hash": hash_size,
        "whash": whash_scale(hash_size),
        "colorhash": 64,
    }[hash_name]


def image_hash(image: Image.Image, config: DedupeConfig) -> imagehash.ImageHash:
    return HASHERS[config.hash](image, hash_size=config.hash_size)


def _jpeg_luma(path: str | Path, side: int) -> Image.Image | None:
    """The luma plane of a JPEG, DCT-scaled by libjpeg-turbo (simplejpeg) to the smallest size
    of at least `side` pixels on both sides (what Pillow's draft mode picks); EXIF orientation
    applied. None when simplejpeg cannot decode it (CMYK, damaged): Pillow then takes over.

    Why not Pillow's draft mode alone: simplejpeg hands libjpeg-turbo the file in memory and asks
    for the grey output directly, which measured ~1.5x faster per image than draft + load (the
    Huffman decoding both must do in full is the rest)."""
    data = Path(path).read_bytes()
    if data[:2] != b"\xff\xd8":
        return None
    try:
        # Only colour spaces whose grey output is the luma plane (libjpeg-turbo would hand back
        # the first ink channel of a CMYK or YCCK file).
        if simplejpeg.decode_jpeg_header(data)[2] not in ("Gray", "YCbCr"):
            return None
        pixels = simplejpeg.decode_jpeg(data, colorspace="GRAY", min_width=side, min_height=side)
        with Image.open(io.BytesIO(data)) as header:  # lazy: reads the markers, not the pixels
            orientation = header.getexif().get(ORIENTATION_TAG, 1)
    except (ValueError, OSError):
        return None
    image = Image.fromarray(pixels[:, :, 0])
    method = EXIF_TRANSPOSE.get(orientation)
    return image.transpose(method) if method is not None else image


def load_for_hash(path: str | Path, hash_name: str, hash_size: int) -> Image.Image:
    """Decode only as many pixels as the hash needs (see the module docstring); EXIF applied."""
    need = working_size(hash_name, hash_size)
    mode = "RGB" if hash_name == "colorhash" else "L"
    luma = _jpeg_luma(path, 2 * need) if mode == "L" else None
    if luma is not None:
        factor = min(luma.size) // (2 * need)
        return luma.reduce(factor) if factor >= 2 else luma
    with Image.open(path) as image:
        if image.format == "JPEG":
            # DCT scaling: the decoder skips the detail the hash would throw away. At least
            # twice the working side is kept so that imagehash's antialiased resize still
            # averages over several source pixels.
            image.draft(mode, (2 * need, 2 * need))
        image.load()
        image = ImageOps.exif_transpose(image)
        if image.mode not in ("L", "RGB"):
            # Palette, CMYK, 16-bit, alpha: ingest's conversion (16-bit rescaled, not clipped;
            # alpha on white), and reduce() wants 8-bit pixels anyway.
            image = to_rgb(image, (255, 255, 255)).convert(mode)
        factor = min(image.size) // (2 * need)
        if factor >= 2:
            image = image.reduce(factor)
        return image.convert(mode)


def hash_file(path: str | Path, hash_name: str, hash_size: int) -> bytes:
    """Packed hash bits of one image file (the row format of `pack_hashes`)."""
    image = load_for_hash(path, hash_name, hash_size)
    code = HASHERS[hash_name](image, hash_size=hash_size)
    return np.packbits(np.asarray(code.hash, dtype=bool).ravel()).tobytes()


def _single_threaded_worker() -> None:
    """Pool initializer: one native thread per process. With N processes on N cores, BLAS/OpenMP
    pools inside each (numpy, scipy's DCT) only fight the other processes for the same cores."""
    for variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[variable] = "1"


def _hash_chunk(paths: Sequence[str], hash_name: str, hash_size: int) -> bytes:
    # One task per chunk, one bytes object back: a pickled round trip per chunk, not per image.
    return b"".join(hash_file(path, hash_name, hash_size) for path in paths)


def hash_files(
    paths: Sequence[str | Path], config: DedupeConfig, workers: int | None = None
) -> np.ndarray:
    """Packed hashes (n x bytes, uint8) of image files, in input order, over a process pool.

    Why a second process used to add nothing on small folders: below PARALLEL_MIN (then 64)
    everything ran in the calling process, and above it each image was a pickled task. Now the
    pool starts from PARALLEL_MIN = 16, the images go in a few contiguous chunks per worker (an
    order-preserving join), and every worker is single-threaded (`_single_threaded_worker`).
    What remains is the pool's own start-up (measured: ~0.4 s for two workers on the loaded
    2-core machine, the time of ~15 JPEG hashes) and, there, a second core that others use.
    """
    workers = workers if workers is not None else (config.workers or os.cpu_count() or 1)
    names = [str(path) for path in paths]
    if not names:
        return np.zeros((0, 0), dtype=np.uint8)
    task = partial(_hash_chunk, hash_name=config.hash, hash_size=config.hash_size)
    progress = tqdm(
        total=len(names), desc="dedupe: hashing", unit="img", disable=len(names) < PARALLEL_MIN
    )
    parts = []
    if workers <= 1 or len(names) < PARALLEL_MIN:
        for start in range(0, len(names), PARALLEL_MIN):
            parts.append(task(names[start : start + PARALLEL_MIN]))
            progress.update(len(names[start : start + PARALLEL_MIN]))
    else:
        # A few chunks per worker: big enough that task overhead vanishes, small enough that a
        # slow chunk (large PNGs) does not leave the other workers idle at the end.
        size = max(1, math.ceil(len(names) / (workers * 4)))
        chunks = [names[start : start + size] for start in range(0, len(names), size)]
        with ProcessPoolExecutor(
            max_workers=min(workers, len(chunks)), initializer=_single_threaded_worker
        ) as pool:
            for chunk, part in zip(chunks, pool.map(task, chunks), strict=True):
                parts.append(part)
                progress.update(len(chunk))
    progress.close()
    rows = b"".join(parts)
    return np.frombuffer(rows, dtype=np.uint8).reshape(len(names), -1).copy()


def hex_of(packed: np.ndarray) -> list[str]:
    """Hex strings of packed hashes, as imagehash's str() writes them."""
    return [row.tobytes().hex() for row in packed]


def hex_distance(a: str, b: str) -> int:
    """Hamming distance of two hex-written hashes of the same length."""
    return (int(a, 16) ^ int(b, 16)).bit_count()


def pack_hashes(hashes: list[imagehash.ImageHash]) -> np.ndarray:
    """Hashes as rows of packed bits, shape (n, ceil(bits / 8)), dtype uint8."""
    if not hashes:
        return np.zeros((0, 0), dtype=np.uint8)
    bits = np.stack([np.asarray(h.hash, dtype=bool).ravel() for h in hashes])
    return np.packbits(bits, axis=1)


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

    packed = hash_files(unique["image_path"].tolist(), config)
    pairs = search_pairs(packed, config.threshold, config.search)
    labels = _cluster_labels(len(unique), pairs)
    hash_of = dict(zip(unique["image_id"], hex_of(packed), strict=True))
    cluster_of = dict(zip(unique["image_id"], labels.tolist(), strict=True))

    frame = manifest[["image_id", "source_path", "width", "height"]].copy()
    frame["captioned"] = manifest["sidecar_text"].notna()
    frame["hash"] = frame["image_id"].map(hash_of)
    frame["cluster_id"] = frame["image_id"].map(cluster_of).astype("int64")
    frame["keep"] = False
    frame["duplicate_of"] = None
    # Whole-table operations, not a loop over clusters: one sort ranks every cluster at once.
    single = frame.groupby("cluster_id")["image_id"].transform("size") == 1
    frame.loc[single, "keep"] = True
    members = frame[~single]
    if len(members):
        sharp_of = {
            image_id: sharpness(load(image_id)) for image_id in members["image_id"].unique()
        }
        ranked = members.assign(
            pixels=members["width"] * members["height"], sharp=members["image_id"].map(sharp_of)
        ).sort_values(
            ["cluster_id", "pixels", "sharp", "captioned", "source_path"],
            ascending=[True, False, False, False, True],
            kind="stable",
        )
        winners = ranked.drop_duplicates("cluster_id")
        frame.loc[winners.index, "keep"] = True
        losers = members.index.difference(winners.index)
        winner_of = dict(zip(winners["cluster_id"], winners["image_id"], strict=True))
        frame.loc[losers, "duplicate_of"] = frame.loc[losers, "cluster_id"].map(winner_of)
    return frame[DEDUPE_COLUMNS].astype({"keep": bool})


def contact_sheet(
    table: pd.DataFrame,
    manifest: pd.DataFrame,
    thumb: int = 128,
    max_clusters: int = CONTACT_SHEET_CLUSTERS,
    max_members: int = CONTACT_SHEET_MEMBERS,
) -> Image.Image:
    """One row per cluster with more than one member: the kept image, then the dropped ones.

    The first `max_clusters` clusters only, then a line saying how many more dedupe.parquet has,
    and the first `max_members` of a cluster, the last cell naming how many more: the sheet is for
    a person to look at, and its area would otherwise grow with the folder (the rows times the
    largest cluster, which chains of near-duplicates make larger as the folder grows).
    """
    path_of = dict(zip(manifest["image_id"], manifest["image_path"], strict=False))
    sizes = table.groupby("cluster_id")["image_id"].transform("size")
    clusters = [group for _, group in table[sizes > 1].groupby("cluster_id", sort=True)]
    left_out = max(0, len(clusters) - max_clusters)
    clusters = clusters[:max_clusters]
    font = ImageFont.load_default()
    label = 28
    columns = min(max((len(group) for group in clusters), default=1), max_members)
    footer = label if left_out else 0
    sheet = Image.new(
        "RGB",
        (columns * (thumb + 8) + 8, max(len(clusters), 1) * (thumb + label + 8) + 8 + footer),
        "white",
    )
    draw = ImageDraw.Draw(sheet)
    if not clusters:
        draw.text((8, 8), "no duplicate clusters", fill="black", font=font)
        return sheet
    if left_out:
        more = f"... and {left_out} more clusters (dedupe.parquet lists them all)"
        draw.text((8, sheet.height - footer), more, fill="black", font=font)
    for row, group in enumerate(clusters):
        group = group.sort_values(["keep", "source_path"], ascending=[False, True])
        kept_hash = group["hash"].iloc[0] if group["keep"].iloc[0] else None
        hidden = len(group) - max_members
        for column, member in enumerate(group.head(max_members).itertuples()):
            x, y = 8 + column * (thumb + 8), 8 + row * (thumb + label + 8)
            with Image.open(path_of[member.image_id]) as image:
                preview = image.convert("RGB")
                preview.thumbnail((thumb, thumb), Image.LANCZOS)
            sheet.paste(preview, (x, y))
            if member.keep:
                status = "KEEP"
            else:
                distance = hex_distance(member.hash, kept_hash) if kept_hash else "?"
                status = f"drop (d={distance})"
            draw.rectangle(
                [x, y, x + thumb - 1, y + thumb - 1], outline="green" if member.keep else "red"
            )
            draw.text((x, y + thumb + 2), status, fill="black", font=font)
            name = Path(member.source_path).name[:22]
            if hidden > 0 and column == max_members - 1:
                name = f"+{hidden} more"
            draw.text((x, y + thumb + 14), name, fill="black", font=font)
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
