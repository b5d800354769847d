"""Costs that stay flat as the folder grows: ingest -> dedupe -> tag -> pose -> dataset.

For each size (default 1k, 5k and 20k images) a folder of generated images is made: drawn
figures on photo-like smoothed-noise backgrounds, JPEG and PNG, each with a sidecar caption,
and 5% planted near-duplicates (resized, recompressed copies). Each size runs the five data
stages' library calls (the stand-in configuration, conf/stand_in.yaml) in its own process, so
its peak resident memory (ru_maxrss) is its own. Printed per size: seconds per image of every
stage and in all, peak memory, and both as ratios against the smallest size measured in the
same run (targets: seconds per image within 1.3x, peak memory within 1.5x).

    .venv/bin/python benchmarks/bench_scaling.py                  # 1000, 5000, 20000
    .venv/bin/python benchmarks/bench_scaling.py --sizes 100,400  # a quick run

Measured 2026-12-02 on the shared 2-core machine, load 13-18 (other sessions running; the
20k size and then 10k were left out: at this load 10k alone would have taken ~40 minutes).
ms per image, peak RSS (ru_maxrss, MB; 635 MB after imports and making the folder):

    images | ingest dedupe  tag  pose dataset | total        | peak MB      | load
      1000 |   80.6   11.1 0.15  59.7    32.0 | 183.5        |  862         | 14.8-14.3
      5000 |  107.5   15.9 0.11  61.4    16.3 | 201.3 (1.10x)| 1023 (1.19x) | 13.4-17.5

Peak after each stage at 5000: ingest 681, dedupe 1023 (the contact sheet: rows x the largest
cluster: 346 clusters of up to 19 members, ~440 MB of RGB; since capped at 100 clusters x 8
members, <= ~54 MB, not re-measured in this benchmark), pose and dataset add
nothing above it. Ingest's rise per image follows the load (13 -> 17.5), not the size: its loop
holds one image at a time. Unloaded (load 1.4, before the streaming changes): 1000 images
59.9 ms/image, 904 MB.

Measured 2026-12-02, all three sizes in one run (load 1.1-3.5: the test suite ran beside 1k/5k),
1779 s in all. ms per image (ingest dedupe tag pose dataset | total), peak RSS MB:

     1000 | 32.0 5.0 0.05 33.6 6.2 | 76.9        | 862
     5000 | 41.2 3.7 0.04 25.6 3.0 | 73.5 (0.96x)| 880 (1.02x)
    20000 | 29.7 2.5 0.03 16.3 1.4 | 49.8 (0.65x)| 964 (1.12x)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SIDE = 256
DUPLICATE_FRACTION = 0.05
STAGES = ("ingest", "dedupe", "tag", "pose", "dataset")
WORDS = ("red hair", "blue eyes", "smile", "standing", "sitting", "hat", "jacket", "outdoors")


def drawn_image(rng: np.random.Generator) -> Image.Image:
    """A figure (head, body, limbs) over a smooth photo-like background, all from `rng`."""
    coarse = rng.normal(size=(SIDE // 16, SIDE // 16, 3))
    field = ndimage.gaussian_filter(coarse, sigma=(rng.uniform(1, 3), rng.uniform(1, 3), 0))
    field = np.uint8(255 * (field - field.min()) / (np.ptp(field) + 1e-9))
    image = Image.fromarray(field).resize((SIDE, SIDE), Image.BICUBIC)
    draw = ImageDraw.Draw(image)
    colour = tuple(int(c) for c in rng.integers(0, 256, 3))
    x, y = (int(v) for v in rng.integers(SIDE // 3, 2 * SIDE // 3, 2))
    head = int(rng.integers(12, 24))
    draw.ellipse([x - head, y - 3 * head, x + head, y - head], fill=colour)
    draw.rectangle([x - head, y - head, x + head, y + 2 * head], fill=colour[::-1])
    for dx in (-1, 1):
        draw.line(
            [x, y, x + dx * 2 * head, y + int(rng.integers(-head, head))], fill=colour, width=5
        )
        draw.line([x, y + 2 * head, x + dx * head, y + 4 * head], fill=colour, width=6)
    return image


def suffix_of(index: int) -> str:
    return "jpg" if index % 2 else "png"


def make_folder(folder: Path, count: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    duplicates = int(count * DUPLICATE_FRACTION)
    originals = count - duplicates
    for index in range(count):
        if index < originals:
            image = drawn_image(rng)
        else:  # a planted near-duplicate of an earlier image
            earlier = int(rng.integers(0, originals))
            with Image.open(folder / f"img_{earlier:06d}.{suffix_of(earlier)}") as opened:
                image = opened.convert("RGB").resize((SIDE * 3 // 4, SIDE * 3 // 4))
        path = folder / f"img_{index:06d}.{suffix_of(index)}"
        image.save(path, quality=88)
        tags = rng.choice(WORDS, 3, replace=False)
        path.with_suffix(".txt").write_text(", ".join(tags) + "\n")


def child(count: int, root: Path) -> None:
    """One size, in this process: the five stages' library calls; prints a JSON line."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from charaforge.config import load_params
    from charaforge.core import layout
    from charaforge.core.logs import configure_logging
    from charaforge.pipeline.compose import compose_params
    from charaforge.prepare import dataset, dedupe, ingest, pose
    from charaforge.tagging import run as tagging

    configure_logging()
    params_path = root / "params.yaml"
    compose_params(REPO, output=params_path, config_name="stand_in")
    params = load_params(params_path)
    make_folder(root / "inbox", count)
    os.chdir(root)
    baseline_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    data = params.data
    seconds: dict[str, float] = {}
    peak_after: dict[str, float] = {}  # ru_maxrss after each stage: which stage set the peak
    load_before = os.getloadavg()[0]
    calls = {
        "ingest": lambda: ingest.ingest_folder("inbox", layout.INGEST_DIR, data.ingest),
        "dedupe": lambda: dedupe.dedupe_folder(layout.INGEST_DIR, layout.DEDUPE_DIR, data.dedupe),
        "tag": lambda: tagging.tag_folder(
            layout.INGEST_DIR, layout.DEDUPE_DIR, layout.TAG_DIR, params.tagger
        ),
        "pose": lambda: pose.pose_folder(
            layout.INGEST_DIR, layout.DEDUPE_DIR, layout.POSE_DIR, params.pose
        ),
        "dataset": lambda: dataset.build_dataset(
            layout.INGEST_DIR,
            layout.DEDUPE_DIR,
            layout.TAG_DIR,
            layout.POSE_DIR,
            layout.DATASET_DIR,
            data.dataset,
            character=data.character,
            trigger=data.trigger,
            seed=params.seed,
        ),
    }
    for stage in STAGES:
        start = time.perf_counter()
        calls[stage]()
        seconds[stage] = time.perf_counter() - start
        peak_after[stage] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(
        "RESULT "
        + json.dumps(
            {
                "count": count,
                "seconds": seconds,
                "peak_mb": peak / 1024,
                "start_mb": baseline_rss / 1024,
                "peak_after_mb": peak_after,
                "load": [load_before, os.getloadavg()[0]],
            }
        )  # fmt: skip
    )


def measure(count: int) -> dict:
    with tempfile.TemporaryDirectory(prefix=f"bench-scaling-{count}-") as root:
        result = subprocess.run(
            [sys.executable, __file__, "--child", str(count), "--root", root],
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"},
        )
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    if result.returncode != 0 or not lines:
        raise SystemExit(f"size {count} failed:\n{result.stderr[-3000:]}")
    return json.loads(lines[-1].removeprefix("RESULT "))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,5000,20000", help="comma-separated image counts")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.root)
        return
    sizes = sorted(int(size) for size in args.sizes.split(","))
    print(f"CPU cores: {os.cpu_count()}, load {os.getloadavg()[0]:.1f} (compare ratios)")
    results = []
    for count in sizes:
        results.append(measure(count))
        print(f"  {count} images done: {json.dumps(results[-1])}", flush=True)
    base = results[0]
    base_total = sum(base["seconds"].values()) / base["count"]
    header = " ".join(f"{stage:>9}" for stage in STAGES)
    print(
        f"{'images':>7} | ms/image: {header} {'total':>9} | x{sizes[0]:<5} | peak MB | x{sizes[0]}"
        " | load at start, end"
    )
    for result in results:
        per_image = {stage: 1000 * result["seconds"][stage] / result["count"] for stage in STAGES}
        total = sum(result["seconds"].values()) / result["count"]
        cells = " ".join(f"{per_image[stage]:9.2f}" for stage in STAGES)
        load = ", ".join(f"{value:.1f}" for value in result["load"])
        print(
            f"{result['count']:>7} |           {cells} {1000 * total:9.2f} | "
            f"{total / base_total:5.2f}x | {result['peak_mb']:7.0f} | "
            f"{result['peak_mb'] / base['peak_mb']:4.2f}x | {load}"
        )
    print("peak MB after each stage (ru_maxrss; start = after imports and the folder is made):")
    for result in results:
        after = " ".join(f"{stage} {result['peak_after_mb'][stage]:.0f}" for stage in STAGES)
        print(f"{result['count']:>7} | start {result['start_mb']:.0f} {after}")


if __name__ == "__main__":
    main()
