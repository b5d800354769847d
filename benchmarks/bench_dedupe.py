"""Dedupe benchmark: hashing throughput, near-duplicate search time, precision / recall.

Every number is measured in this run, against a baseline measured in the same run, so the ratios
hold on a busy machine even where the absolute times do not:

1. Hashing: `prepare.dedupe.hash_files` (partial decoding + a process pool) against a plain
   per-image loop `imagehash.phash(Image.open(path))`, on the same JPEG and PNG files.
2. Search: multi-index hashing (`hamming.mih_pairs`: pigeonhole blocks, each an
   `IndexBinaryIVF` of faiss with one inverted list per key value, probed ready-made) against
   the vectorised all-pairs brute force on random 64-bit hashes with planted near pairs, at 100k
   and 1M hashes. Brute force at 1M (and at 100k with --quick) is extrapolated from a measured
   subset (it is quadratic); the output says so. Both methods must return identical pairs where
   both run. With --multihash also faiss's own `IndexBinaryMultiHash` (4 x 16-bit tables) at 20k
   and 40k hashes, to show how it grows (with the square of the count, one OpenMP thread too:
   2.1 s / 18.9 s / 142 s at 20k / 40k / 100k).
3. Quality: precision and recall of near-duplicate pairs at the configured threshold against the
   ground truth of planted copies (resized, low-quality JPEG, slightly cropped, brightness
   shifted), for the partial decode and for full decodes.

Run: .venv/bin/python benchmarks/bench_dedupe.py [--quick] [--only hashing|quality|search]
[--sizes 100000,1000000] [--threads N] [--multihash]
"""

from __future__ import annotations

import argparse
import io
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import imagehash
import numpy as np
from PIL import Image, ImageEnhance
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TQDM_DISABLE", "1")  # progress bars would interleave with the table

from charaforge.config import DedupeConfig  # noqa: E402
from charaforge.core.files import derive_seed  # noqa: E402
from charaforge.prepare import dedupe, hamming  # noqa: E402

SEED = 1234
CONFIG = DedupeConfig(hash="phash", hash_size=8, threshold=10)
TRANSFORMS = ("resized", "jpeg_q15", "cropped", "brighter", "darker")


def natural_image(index: int, width: int = 1024, height: int = 768) -> Image.Image:
    """A distinct image with photo-like low-frequency structure: smoothed coloured noise."""
    rng = np.random.default_rng(derive_seed(SEED, "bench", "image", index))
    coarse = rng.normal(size=(height // 16, width // 16, 3))
    field = ndimage.gaussian_filter(coarse, sigma=(rng.uniform(1, 4), rng.uniform(1, 4), 0))
    field = (field - field.min()) / (np.ptp(field) + 1e-9)
    small = Image.fromarray(np.uint8(field * 255))
    image = small.resize((width, height), Image.BICUBIC)
    detail = rng.integers(-12, 13, (height, width, 3))  # fine grain, as in photos
    pixels = np.clip(np.asarray(image, np.int16) + detail, 0, 255).astype(np.uint8)
    return Image.fromarray(pixels)


def planted_copy(image: Image.Image, kind: str, rng: np.random.Generator) -> Image.Image:
    width, height = image.size
    if kind == "resized":
        scale = rng.uniform(0.3, 0.6)
        return image.resize((round(width * scale), round(height * scale)), Image.BILINEAR)
    if kind == "jpeg_q15":
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=15)
        return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")
    if kind == "cropped":
        margin = rng.uniform(0.02, 0.05, size=4)
        box = (
            round(width * margin[0]),
            round(height * margin[1]),
            width - round(width * margin[2]),
            height - round(height * margin[3]),
        )
        return image.crop(box)
    factor = rng.uniform(1.12, 1.2) if kind == "brighter" else rng.uniform(0.8, 0.88)
    return ImageEnhance.Brightness(image).enhance(factor)


def timed(function, *args, **kwargs):  # noqa: ANN001, ANN201 - benchmark helper
    start = time.perf_counter()
    result = function(*args, **kwargs)
    return result, time.perf_counter() - start


def cpu_timed(function, *args, **kwargs):  # noqa: ANN001, ANN201 - benchmark helper
    """(result, wall seconds, CPU seconds of this process, all its threads): on a shared machine
    the CPU seconds say what the work costs, the wall seconds what the neighbours left of it."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = function(*args, **kwargs)
    return result, time.perf_counter() - wall, time.process_time() - cpu


def _range_pairs(index, packed: np.ndarray, threshold: int) -> np.ndarray:
    """Every pair (i < j, distance) a faiss binary index finds within `threshold` of the
    indexed hashes themselves, sorted."""
    limits, distances, labels = index.range_search(packed, threshold + 1)  # radius is strict
    queries = np.repeat(np.arange(len(packed)), np.diff(limits.astype(np.int64)))
    upper = queries < labels
    pairs = np.stack([queries[upper], labels[upper], distances[upper]], axis=1).astype(np.int64)
    return pairs[np.lexsort((pairs[:, 1], pairs[:, 0]))]


def flat_pairs(packed: np.ndarray, threshold: int) -> np.ndarray:
    """Exhaustive reference in C++: faiss's flat binary index, every pair compared."""
    import faiss

    index = faiss.IndexBinaryFlat(packed.shape[1] * 8)
    index.add(packed)
    return _range_pairs(index, packed, threshold)


def plain_loop(paths: list[Path]) -> list[imagehash.ImageHash]:
    hashes = []
    for path in paths:
        with Image.open(path) as image:
            hashes.append(imagehash.phash(image))
    return hashes


def bench_hashing(folder: Path, count: int) -> None:
    print(f"\n== 1. hashing throughput ({count} images of 1024x768 per format) ==")
    for suffix in ("jpg", "png"):
        paths = []
        for index in range(count):
            path = folder / f"hash_{index:04d}.{suffix}"
            natural_image(10_000 + index).save(path, quality=90) if suffix == "jpg" else (
                natural_image(10_000 + index).save(path)
            )
            paths.append(path)
        _, baseline, baseline_cpu = with_children(plain_loop, paths)
        _, one, one_cpu = with_children(dedupe.hash_files, paths, CONFIG, workers=1)
        workers = os.cpu_count() or 1
        _, pool, pool_cpu = with_children(dedupe.hash_files, paths, CONFIG, workers=workers)
        print(
            f"{suffix.upper()}: plain imagehash loop {count / baseline:7.1f} img/s | "
            f"partial decode, 1 process {count / one:7.1f} img/s ({baseline / one:4.1f}x) | "
            f"partial decode, {workers} processes {count / pool:7.1f} img/s "
            f"({baseline / pool:4.1f}x)"
        )
        # CPU per image (this process and its pool workers): what each image costs whatever
        # the neighbours do; CPU / wall: how many cores the run really got.
        print(
            f"     CPU ms/image: plain {baseline_cpu / count * 1e3:5.2f} | 1 process "
            f"{one_cpu / count * 1e3:5.2f} ({baseline_cpu / one_cpu:4.1f}x less) | {workers} "
            f"processes {pool_cpu / count * 1e3:5.2f} | cores used (CPU / wall): plain "
            f"{baseline_cpu / baseline:4.2f}, 1 process {one_cpu / one:4.2f}, {workers} processes "
            f"{pool_cpu / pool:4.2f}"
        )


def with_children(function, *args, **kwargs):  # noqa: ANN001, ANN201 - benchmark helper
    """(result, wall seconds, CPU seconds of this process and of its finished children)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    result, wall, cpu = cpu_timed(function, *args, **kwargs)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    children = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return result, wall, cpu + children


def random_hashes(n: int, planted: int, threshold: int) -> np.ndarray:
    rng = np.random.default_rng(derive_seed(SEED, "bench", "hashes", n))
    packed = rng.integers(0, 256, (n, 8), dtype=np.uint8)
    bits = np.unpackbits(packed[:planted], axis=1)
    for row in bits:
        row[rng.choice(64, int(rng.integers(0, threshold + 1)), replace=False)] ^= 1
    packed[n - planted :] = np.packbits(bits, axis=1)
    return packed


def bench_search(sizes: list[int], quick: bool, threads: int | None) -> None:
    threshold = CONFIG.threshold
    print(
        f"\n== 2. near-duplicate search (64-bit hashes, Hamming <= {threshold}, "
        f"faiss threads: {threads or 'default'}) =="
    )
    subset = 10_000
    sample = random_hashes(subset, 200, threshold)
    brute_pairs, brute_subset = timed(hamming.near_pairs, sample, threshold)
    mih_pairs, _ = timed(hamming.mih_pairs, sample, threshold, threads=threads)
    assert np.array_equal(brute_pairs, mih_pairs), "MIH and brute force disagree"
    print(f"brute force measured on {subset:,} hashes: {brute_subset:.2f} s (identical pairs)")
    for n in sizes:
        packed = random_hashes(n, n // 100, threshold)
        blocks = hamming.choose_blocks(n, 64, threshold)
        pairs, mih_time, mih_cpu = cpu_timed(hamming.mih_pairs, packed, threshold, threads=threads)
        print(
            f"n = {n:>9,}: MIH (faiss IVF, m = {blocks} blocks) {mih_time:8.2f} s wall, "
            f"{mih_cpu:7.2f} s CPU, {len(pairs):,} pairs"
        )
        if n <= 100_000 and not quick:
            reference, flat_time, flat_cpu = cpu_timed(flat_pairs, packed, threshold)
            assert np.array_equal(reference, pairs), "MIH and the flat index disagree"
            print(
                f"{'':14}exhaustive (faiss IndexBinaryFlat) {flat_time:8.2f} s wall, "
                f"{flat_cpu:7.2f} s CPU: identical pairs | speed-up {flat_time / mih_time:6.1f}x "
                f"wall, {flat_cpu / mih_cpu:6.1f}x CPU"
            )
        brute_time = brute_subset * (n / subset) ** 2
        print(
            f"{'':14}numpy brute force {brute_time:9.1f} s wall (estimated: {subset:,}-hash "
            f"measurement x (n / {subset:,})^2) | speed-up {brute_time / mih_time:7.1f}x"
        )


def faiss_pairs(packed: np.ndarray, threshold: int, blocks: int = 4) -> np.ndarray:
    """All pairs within `threshold` from faiss's multi-hash index: `blocks` tables of 64/blocks
    bits, each probed within threshold // blocks flips (pigeonhole: exact), then verified."""
    import faiss

    index = faiss.IndexBinaryMultiHash(packed.shape[1] * 8, blocks, packed.shape[1] * 8 // blocks)
    index.nflip = threshold // blocks
    index.add(packed)
    return _range_pairs(index, packed, threshold)


def bench_faiss(threshold: int) -> None:
    print("\n== 2b. the same search with faiss IndexBinaryMultiHash (4 x 16-bit tables) ==")
    for n in (20_000, 40_000):
        packed = random_hashes(n, 200, threshold)
        reference, mih_time = timed(hamming.mih_pairs, packed, threshold)
        pairs, faiss_time = timed(faiss_pairs, packed, threshold)
        same = np.array_equal(reference[:, :2], pairs[:, :2])
        print(
            f"n = {n:>7,}: faiss {faiss_time:7.2f} s | MIH (faiss IVF) {mih_time:6.2f} s | "
            f"same pairs: {same} | faiss / MIH {faiss_time / mih_time:5.1f}x"
        )


def bench_quality(folder: Path, originals: int) -> None:
    print(
        f"\n== 3. precision / recall on planted near-duplicates "
        f"({originals} originals x {len(TRANSFORMS)} copies, threshold {CONFIG.threshold}) =="
    )
    paths: list[Path] = []
    group: list[int] = []
    kind_of: list[str] = []
    for index in range(originals):
        image = natural_image(index)
        path = folder / f"orig_{index:04d}.jpg"
        image.save(path, quality=92)
        paths.append(path)
        group.append(index)
        kind_of.append("original")
        rng = np.random.default_rng(derive_seed(SEED, "bench", "copies", index))
        for kind in TRANSFORMS:
            copy = planted_copy(image, kind, rng)
            copy_path = folder / f"copy_{index:04d}_{kind}.png"
            copy.save(copy_path)
            paths.append(copy_path)
            group.append(index)
            kind_of.append(kind)
    group_array = np.asarray(group)
    truth = {
        (i, j)
        for i in range(len(paths))
        for j in range(i + 1, len(paths))
        if group_array[i] == group_array[j]
    }

    def report(name: str, packed: np.ndarray) -> None:
        found = {(int(i), int(j)) for i, j, _ in hamming.search_pairs(packed, CONFIG.threshold)}
        hits = found & truth
        precision = len(hits) / len(found) if found else 1.0
        recall = len(hits) / len(truth)
        per_kind = []
        for kind in TRANSFORMS:
            wanted = {(i, j) for i, j in truth if kind_of[j] == kind and kind_of[i] == "original"}
            per_kind.append(f"{kind} {len(wanted & found) / len(wanted):.3f}")
        print(
            f"{name}: precision {precision:.3f}, recall {recall:.3f} "
            f"({len(found)} pairs found, {len(truth)} true) | recall vs original: "
            + ", ".join(per_kind)
        )

    report("partial decode (hash_files)", dedupe.hash_files(paths, CONFIG))
    report("full decode (plain imagehash)", dedupe.pack_hashes(plain_loop(paths)))


def load() -> str:
    return "load average (1, 5, 15 min): " + ", ".join(f"{x:.1f}" for x in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, brute force estimated")
    parser.add_argument("--only", choices=["hashing", "quality", "search"], default=None)
    parser.add_argument("--count", type=int, default=None, help="images per format (hashing)")
    parser.add_argument("--sizes", default=None, help="hash counts of the search, comma-separated")
    parser.add_argument("--threads", type=int, default=None, help="faiss threads of the search")
    parser.add_argument("--multihash", action="store_true", help="also IndexBinaryMultiHash")
    args = parser.parse_args()
    print(f"CPU cores: {os.cpu_count()} (shared machine: compare ratios, not absolute times)")
    print(f"start: {load()}")
    with tempfile.TemporaryDirectory(prefix="bench-dedupe-") as folder:
        if args.only in (None, "hashing"):
            bench_hashing(Path(folder), args.count or (40 if args.quick else 200))
        if args.only in (None, "quality"):
            bench_quality(Path(folder), 30 if args.quick else 150)
    if args.only in (None, "search"):
        default = [100_000] if args.quick else [100_000, 1_000_000]
        sizes = [int(size) for size in args.sizes.split(",")] if args.sizes else default
        bench_search(sizes, args.quick, args.threads)
    if args.multihash:
        bench_faiss(CONFIG.threshold)
    print(f"end: {load()}")


if __name__ == "__main__":
    main()
