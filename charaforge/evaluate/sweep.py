"""The score stage's library side: read the sweep and the dataset, run every metric family,
write `scores.parquet` and `scorers.json`.

Families run in a fixed order (CLIP embeddings first, because the group, memorisation and CLIP
tag metrics reuse them) and each adds its own columns (evaluate.columns) and descriptions. A
missing or malformed input is a `MissingInputError` naming the stage that makes it, so the stage
edge reports it in one line.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
import pyarrow

from charaforge.config import PoseConfig, ScoreConfig, TaggerConfig
from charaforge.core.files import write_json, write_parquet
from charaforge.errors import MissingInputError, require_stage_output
from charaforge.evaluate.clip import embed_sweep, score_clip
from charaforge.evaluate.columns import (
    INDEX_COLUMNS,
    METRIC_COLUMNS,
    OPTIONAL_INDEX_COLUMNS,
    FamilyScores,
    resolve_image_path,
)
from charaforge.evaluate.consistency import filter_sweep
from charaforge.evaluate.context import score_context
from charaforge.evaluate.face import score_faces
from charaforge.evaluate.groups import score_groups, suite_groups
from charaforge.evaluate.memorisation import score_memorisation
from charaforge.evaluate.oracle import judge_sweep
from charaforge.evaluate.pose import score_poses
from charaforge.evaluate.tags import score_tags
from charaforge.models.clip import load_clip

log = logging.getLogger(__name__)

# What the score stage writes into its folder (docs/data-contracts.md).
SCORES_FILE = "scores.parquet"
SCORERS_FILE = "scorers.json"
ORACLE_FILE = "oracle.parquet"  # ground truth (world only), never read by the ranking
FILTER_DIR = "filter"  # score.filter: accepted/, rejected/ and the verdicts


def read_stage_table(path: Path, stage: str, columns: Sequence[str] = ()) -> pd.DataFrame:
    """A parquet table an earlier stage wrote, or a MissingInputError saying which stage to run."""
    require_stage_output(path, stage)
    try:
        table = pd.read_parquet(path)
    except (OSError, pyarrow.ArrowException) as error:
        raise MissingInputError(
            f"{path}: unreadable ({error}); rerun the `{stage}` stage"
        ) from None
    missing = [column for column in columns if column not in table.columns]
    if missing:
        raise MissingInputError(f"{path}: lacks columns {missing}; rerun the `{stage}` stage")
    return table


def _require_images(paths: Sequence[Path], table: Path, stage: str) -> None:
    absent = [path for path in paths if not path.is_file()]
    if absent:
        raise MissingInputError(
            f"{table}: {len(absent)} listed image(s) missing, e.g. {absent[0]} "
            f"(rerun the `{stage}` stage)"
        )


def score_sweep(
    generate_dir: str | Path,
    dataset_dir: str | Path,
    config: ScoreConfig,
    trigger: str,
    out_dir: str | Path,
    root: str | Path = ".",
    *,
    pose_dir: str | Path | None = None,
    pose_config: PoseConfig | None = None,
    tagger_config: TaggerConfig | None = None,
) -> pd.DataFrame:
    """Score every sweep image; write scores.parquet and scorers.json under `out_dir`.

    Image paths in the tables are relative to the repository root `root` (data-contracts.md).
    A metric whose inputs are absent (no pose-conditioned image, a tagger that cannot see
    pixels, no face in the references) is written as NaN and marked not applicable.
    """
    root = Path(root)
    index_path = Path(generate_dir) / "index.parquet"
    metadata_path = Path(dataset_dir) / "metadata.parquet"
    index = read_stage_table(index_path, "generate", INDEX_COLUMNS)
    metadata = read_stage_table(
        metadata_path, "dataset", ("image_id", "image_path", "split", "tags")
    )
    train = metadata[metadata["split"] == "train"].sort_values("image_id")
    if train.empty:
        raise MissingInputError(
            f"{metadata_path}: no train-split reference images (rerun the `dataset` stage)"
        )
    image_paths = [resolve_image_path(root, path) for path in index["image_path"]]
    reference_paths = [resolve_image_path(root, path) for path in train["image_path"]]
    _require_images(image_paths, index_path, "generate")
    _require_images(reference_paths, metadata_path, "dataset")

    embedder = load_clip(config.clip)
    log.info(
        "scoring %d images against %d references with %s%s",
        len(index),
        len(reference_paths),
        embedder.description["model"],
        " (stand-in)" if embedder.stand_in else "",
    )
    embeddings = embed_sweep(
        embedder, image_paths, reference_paths, index["prompt"], trigger, config.batch_size
    )
    suite_keys, anchors = suite_groups(index)
    families: list[FamilyScores] = [
        score_clip(embedder, embeddings, trigger),
        score_groups(index, embedder, embeddings.images),
        score_memorisation(embedder, embeddings, image_paths, reference_paths, config.memorisation),
        score_faces(
            image_paths, reference_paths, config.face, config.batch_size, suite_keys, anchors
        ),
        score_poses(index, pose_dir, pose_config, metadata, root),
        score_tags(
            index,
            train,
            config.tags,
            tagger_config,
            embedder,
            embeddings.images,
            root,
            config.batch_size,
        ),
        score_context(
            index,
            train,
            config.tags.defining_fraction,
            embedder,
            embeddings.images,
            trigger,
            config.batch_size,
        ),
    ]

    carried = [*INDEX_COLUMNS, *(c for c in OPTIONAL_INDEX_COLUMNS if c in index.columns)]
    scores = index.loc[:, carried].copy()
    columns = {name: values for family in families for name, values in family.columns.items()}
    records = {name: record for family in families for name, record in family.records.items()}
    if set(columns) != set(METRIC_COLUMNS) or set(records) != set(METRIC_COLUMNS):
        raise RuntimeError(f"metric families wrote {sorted(columns)}, not {METRIC_COLUMNS}")
    for name in METRIC_COLUMNS:
        scores[name] = columns[name]

    out_dir = Path(out_dir)
    write_parquet(out_dir / SCORES_FILE, scores)
    write_json(out_dir / SCORERS_FILE, records)
    if config.filter.enabled:
        filter_sweep(
            image_paths,
            scores["clip_i"],
            scores["arcface"],
            config.filter,
            out_dir / FILTER_DIR,
        )
    if config.oracle:
        require_stage_output(Path(config.oracle), "world")
        write_parquet(
            out_dir / ORACLE_FILE,
            judge_sweep(index.loc[:, carried], config.oracle, root, config.batch_size),
        )
    return scores
