"""CLIP-I and CLIP-T for every image of the evaluation sweep, on open_clip.

CLIP-I of a generated image is the mean cosine between its CLIP image embedding and each reference
image embedding (the dataset's train split); CLIP-T is the cosine between its image embedding and
the embedding of its prompt with the trigger word removed (the trigger is a made-up token the
text encoder never learnt, so leaving it in would only add noise). Both are raw cosines in -1..1,
and scorers.json records model, preprocessing and scale, because the literature reports CLIP
scores on several incompatible scales.

The stand-in is a tiny open_clip CLIP registered at run time and built with random weights under
a fixed seed: every code path (open_clip's tokenizer, its preprocessing, its towers) is the real
one, only the numbers mean nothing, and everything computed with it is labelled as such.
"""

from __future__ import annotations

import json
import logging
import re
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from PIL import Image
from tqdm import tqdm

from charaforge.config import (
    SCORE_METRICS,
    ClipConfig,
    ConfigError,
    PoseConfig,
    ScoreConfig,
    TaggerConfig,
)
from charaforge.io import find_local_file, sha256_file, write_json, write_parquet

log = logging.getLogger(__name__)

METRICS = SCORE_METRICS
SCALE = "raw cosine, -1..1"
INDEX_COLUMNS = (
    "image_id",
    "image_path",
    "candidate",
    "step",
    "lora_scale",
    "prompt_index",
    "prompt",
    "seed",
)
# Columns the engine may add (data-contracts.md); carried into scores.parquet when present.
OPTIONAL_INDEX_COLUMNS = ("suite", "prompt_group", "identity_shot", "pose_image_id")

STAND_IN_NAME = "charaforge-tiny-clip"
# Same tower classes as ViT-B-32 (ViT image tower, causal text transformer, CLIP BPE vocabulary),
# shrunk so that a few hundred 64 px images embed in seconds on two CPU cores.
STAND_IN_ARCHITECTURE: dict[str, Any] = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "head_width": 32, "patch_size": 16},
    "text_cfg": {
        "context_length": 77,
        "vocab_size": 49408,
        "width": 64,
        "heads": 2,
        "layers": 2,
    },
}


@dataclass
class ClipEmbedder:
    """An open_clip model with its inference preprocessing and tokenizer."""

    model: torch.nn.Module
    preprocess: Any
    tokenizer: Any
    description: dict[str, Any] = field(default_factory=dict)
    stand_in: bool = True

    @torch.inference_mode()
    def embed_images(
        self, images: Sequence[Image.Image | str | Path], batch_size: int = 16
    ) -> np.ndarray:
        """L2-normalised image embeddings (float64, one row per image, input order kept)."""
        rows = []
        for batch in _batches(list(images), batch_size, "embedding images"):
            pixels = torch.stack([self.preprocess(_open_rgb(item)) for item in batch])
            rows.append(self.model.encode_image(pixels).double())
        return _normalise(rows, self._dim)

    @torch.inference_mode()
    def embed_texts(self, texts: Sequence[str], batch_size: int = 16) -> np.ndarray:
        """L2-normalised text embeddings (float64, one row per text, input order kept)."""
        rows = []
        for batch in _batches(list(texts), batch_size, "embedding prompts"):
            rows.append(self.model.encode_text(self.tokenizer(list(batch))).double())
        return _normalise(rows, self._dim)

    @property
    def _dim(self) -> int:
        return int(self.model.text_projection.shape[-1])


def _batches(items: list, batch_size: int, what: str) -> Iterator[list]:
    starts = range(0, len(items), batch_size)
    for start in tqdm(starts, desc=what, unit="batch", disable=None, leave=False):
        yield items[start : start + batch_size]


def _open_rgb(item: Image.Image | str | Path) -> Image.Image:
    if isinstance(item, Image.Image):
        return item.convert("RGB")
    with Image.open(item) as image:
        return image.convert("RGB")


def _normalise(rows: list[torch.Tensor], dim: int) -> np.ndarray:
    if not rows:
        return np.zeros((0, dim), dtype=np.float64)
    embeddings = torch.cat(rows).numpy()
    # Normalised in float64 so that an image compared with itself gives 1 to ~1e-15.
    return embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)


def _register_stand_in() -> None:
    """Make the stand-in architecture known to open_clip's model registry (idempotent)."""
    import open_clip

    if STAND_IN_NAME in open_clip.list_models():
        return
    # open_clip registers architectures from JSON files; the registry keeps what it read, so the
    # file can go right after.
    with tempfile.TemporaryDirectory(prefix="charaforge-clip-") as folder:
        config_file = Path(folder) / f"{STAND_IN_NAME}.json"
        config_file.write_text(json.dumps(STAND_IN_ARCHITECTURE), encoding="utf-8")
        open_clip.add_model_config(config_file)
    if STAND_IN_NAME not in open_clip.list_models():
        raise RuntimeError(f"open_clip did not register the stand-in architecture {STAND_IN_NAME}")


def load_clip(config: ClipConfig) -> ClipEmbedder:
    """Build the stand-in (seeded random weights) or load `model_name` from a local file."""
    import open_clip

    if config.source == "stand_in":
        _register_stand_in()
        # fork_rng: seeding must not disturb the caller's global random stream.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.stand_in_seed)
            model, _, preprocess = open_clip.create_model_and_transforms(STAND_IN_NAME)
        tokenizer = open_clip.get_tokenizer(STAND_IN_NAME)
        description = {
            "model": STAND_IN_NAME,
            "architecture": STAND_IN_ARCHITECTURE,
            "weights": f"random, torch.manual_seed({config.stand_in_seed})",
        }
    else:
        _register_stand_in()  # so a checkpoint of the stand-in architecture loads like any other
        if config.model_name not in open_clip.list_models():
            raise ConfigError(
                f"score.clip.model_name: unknown open_clip architecture {config.model_name!r}"
            )
        weights = find_local_file(
            config.path or "",
            "score.clip.path",
            "put the open_clip checkpoint there, or set score.clip.source=stand_in",
        )
        # An absolute file path: open_clip then loads that file and never treats it as a tag.
        model, _, preprocess = open_clip.create_model_and_transforms(
            config.model_name, pretrained=str(weights.resolve())
        )
        tokenizer = open_clip.get_tokenizer(config.model_name)
        description = {
            "model": config.model_name,
            "weights": weights.name,
            "weights_sha256": sha256_file(weights),
        }
    model.eval()
    preprocess_cfg = dict(model.visual.preprocess_cfg)
    size = preprocess_cfg["size"]
    height, width = (size, size) if isinstance(size, int) else size
    description["preprocessing"] = {
        "resize": f"{preprocess_cfg['resize_mode']} side to {min(height, width)} px, "
        f"{preprocess_cfg['interpolation']}",
        "crop": f"center {width}x{height}",
        "mean": list(preprocess_cfg["mean"]),
        "std": list(preprocess_cfg["std"]),
        "mode": preprocess_cfg["mode"],
        "transform": repr(preprocess),
    }
    return ClipEmbedder(
        model=model,
        preprocess=preprocess,
        tokenizer=tokenizer,
        description=description,
        stand_in=config.source == "stand_in",
    )


def strip_trigger(prompt: str, trigger: str) -> str:
    """The prompt without the trigger word, and without the empty separators it leaves behind."""
    pattern = re.compile(rf"(?<![\w]){re.escape(trigger)}(?![\w])", flags=re.IGNORECASE)
    parts = []
    for part in prompt.split(","):
        cleaned = " ".join(pattern.sub(" ", part).split())
        if cleaned:
            parts.append(cleaned)
    return ", ".join(parts)


def clip_i_scores(generated: np.ndarray, references: np.ndarray) -> np.ndarray:
    """Mean cosine of each generated embedding with every reference embedding."""
    if len(references) == 0:
        raise ValueError("CLIP-I needs at least one reference image")
    return (generated @ references.T).mean(axis=1)


def clip_t_scores(images: np.ndarray, texts: np.ndarray) -> np.ndarray:
    """Row-wise cosine between image i and text i."""
    return np.einsum("ij,ij->i", images, texts)


def nearest_neighbour_similarity(generated: np.ndarray, training: np.ndarray) -> np.ndarray:
    """Per generated image, the highest cosine with any training image (memorisation)."""
    if len(training) == 0:
        raise ValueError("memorisation needs at least one training image")
    return (generated @ training.T).max(axis=1)


def phash_bits(images: Sequence[Image.Image | str | Path]) -> np.ndarray:
    """64-bit DCT perceptual hashes (imagehash.phash) as an (n, 64) bool array."""
    import imagehash

    return np.array(
        [imagehash.phash(_open_rgb(image)).hash.ravel() for image in images], dtype=bool
    ).reshape(len(images), 64)


def nearest_hamming(generated: np.ndarray, training: np.ndarray) -> np.ndarray:
    """Per generated hash, the smallest Hamming distance to any training hash."""
    if len(training) == 0:
        raise ValueError("memorisation needs at least one training image")
    return (generated[:, None, :] != training[None, :, :]).sum(axis=2).min(axis=1)


def group_consistency(
    embeddings: np.ndarray, groups: Sequence[object | None], anchors: Sequence[bool]
) -> np.ndarray:
    """Per image, cosine with the normalised mean embedding of its group's identity shots.

    The CharaConsist reading of a prompt group: the first prompt of a group is the identity
    shot and the rest should show the same character. NaN for the identity shots themselves,
    for rows outside any group (None), for rows without an embedding (NaN) and for groups with
    no usable identity shot.
    """
    result = np.full(len(embeddings), np.nan)
    labels = pd.Series([None if g is None else str(g) for g in groups], dtype=object)
    anchors = np.asarray(anchors, dtype=bool)
    usable = ~np.isnan(embeddings).any(axis=1)
    for _, members in labels.dropna().groupby(labels.dropna(), sort=False).groups.items():
        rows = np.asarray(members)
        shots = rows[anchors[rows] & usable[rows]]
        if len(shots) == 0:
            continue
        anchor = embeddings[shots].mean(axis=0)
        anchor = anchor / np.linalg.norm(anchor)
        others = rows[~anchors[rows] & usable[rows]]
        result[others] = embeddings[others] @ anchor
    return result


def suite_groups(index: pd.DataFrame) -> tuple[list[str | None], list[bool]]:
    """Per row, its (candidate, step, scale, suite group) key or None, and whether it is the
    group's identity shot (engine columns `suite`, `prompt_group`, `identity_shot`)."""
    if "prompt_group" not in index.columns or "identity_shot" not in index.columns:
        return [None] * len(index), [False] * len(index)
    suites = index["suite"] if "suite" in index.columns else pd.Series("", index=index.index)
    keys: list[str | None] = []
    for candidate, step, scale, suite, group in zip(
        index["candidate"], index["step"], index["lora_scale"], suites, index["prompt_group"],
        strict=True,
    ):  # fmt: skip
        if pd.isna(group):
            keys.append(None)
        else:
            keys.append(f"{candidate}|{int(step)}|{float(scale):g}|{suite}|{int(group)}")
    anchors = [bool(value) if not pd.isna(value) else False for value in index["identity_shot"]]
    return keys, anchors


def group_diversity(embeddings: np.ndarray, groups: Sequence[object]) -> np.ndarray:
    """Per image, the mean cosine distance (1 - cos) to the other images of its group.

    NaN for an image alone in its group: spread is undefined for one sample.
    """
    result = np.full(len(embeddings), np.nan)
    labels = pd.Series(list(groups))
    for _, members in labels.groupby(labels, sort=False).groups.items():
        rows = np.asarray(members)
        if len(rows) < 2:
            continue
        similarity = embeddings[rows] @ embeddings[rows].T
        distance = (1.0 - similarity).sum(axis=1) / (len(rows) - 1)  # the diagonal adds 1 - 1 = 0
        result[rows] = distance
    return result


def defining_tags(tag_lists: Sequence[Sequence[str]], fraction: float) -> list[str]:
    """Tags carried by at least `fraction` of the images: what makes the character recognisable."""
    if not tag_lists:
        return []
    counts: dict[str, int] = {}
    for tags in tag_lists:
        for tag in set(tags):
            counts[tag] = counts.get(tag, 0) + 1
    needed = fraction * len(tag_lists)
    return sorted(tag for tag, count in counts.items() if count >= needed - 1e-9)


def prompt_tags(prompt: str) -> set[str]:
    return {part.strip().lower() for part in prompt.split(",") if part.strip()}


def tag_consistency(
    predicted: Sequence[str], defining: set[str], vocabulary: set[str], requested: set[str]
) -> tuple[float, float]:
    """(precision, recall) of the character's defining tags in one image's predicted tags.

    Recall: the share of defining tags the tagger found. Precision: among the predicted tags the
    dataset knows (`vocabulary`), leaving out those the prompt asked for (`requested`, not the
    character's doing), the share that are defining tags; NaN when there is no such tag.
    """
    found = set(predicted)
    recall = len(found & defining) / len(defining) if defining else float("nan")
    judged = (found & vocabulary) - (requested - defining)
    precision = len(judged & defining) / len(judged) if judged else float("nan")
    return precision, recall


def _resolve(root: Path, path: str) -> Path:
    candidate = Path(path)
    return candidate if candidate.is_absolute() else root / candidate


def prompt_groups(index: pd.DataFrame) -> list[str]:
    """Each row's prompt group: its suite group (`suite`, `prompt_group`) when the engine gave
    one, else its own prompt (the images of one prompt across seeds)."""
    groups = [f"prompt {int(number)}" for number in index["prompt_index"]]
    if "prompt_group" in index.columns:
        suites = index["suite"] if "suite" in index.columns else pd.Series("", index=index.index)
        for position, (suite, group) in enumerate(zip(suites, index["prompt_group"], strict=True)):
            if not pd.isna(group):
                groups[position] = f"suite {'' if pd.isna(suite) else suite} group {int(group)}"
    return groups


def _extra_index_columns(index: pd.DataFrame) -> list[str]:
    return [column for column in OPTIONAL_INDEX_COLUMNS if column in index.columns]


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
    index = pd.read_parquet(Path(generate_dir) / "index.parquet")
    missing = [column for column in INDEX_COLUMNS if column not in index.columns]
    if missing:
        raise ValueError(f"{generate_dir}/index.parquet lacks columns {missing}")
    metadata = pd.read_parquet(Path(dataset_dir) / "metadata.parquet")
    train = metadata[metadata["split"] == "train"].sort_values("image_id")
    references = train["image_path"].tolist()
    if not references:
        raise ValueError(f"{dataset_dir}/metadata.parquet has no train-split reference images")

    scores = index.loc[:, [*INDEX_COLUMNS, *_extra_index_columns(index)]].copy()
    image_paths = [_resolve(root, path) for path in index["image_path"]]
    reference_paths = [_resolve(root, path) for path in references]
    records: dict[str, dict[str, Any]] = {}

    # CLIP: identity to the references, prompt alignment, diversity and memorisation.
    embedder = load_clip(config.clip)
    log.info(
        "scoring %d images against %d references with %s%s",
        len(index),
        len(references),
        embedder.description["model"],
        " (stand-in)" if embedder.stand_in else "",
    )
    batch = config.batch_size
    reference_embeddings = embedder.embed_images(reference_paths, batch)
    image_embeddings = embedder.embed_images(image_paths, batch)
    scored_prompts = [strip_trigger(prompt, trigger) for prompt in index["prompt"]]
    # Each distinct prompt is encoded once, in sorted order, so the sweep order cannot matter.
    unique_prompts = sorted(set(scored_prompts))
    prompt_embeddings = embedder.embed_texts(unique_prompts, batch)
    row_of_prompt = {prompt: row for row, prompt in enumerate(unique_prompts)}
    text_embeddings = prompt_embeddings[[row_of_prompt[p] for p in scored_prompts]]
    scores["clip_i"] = clip_i_scores(image_embeddings, reference_embeddings)
    scores["clip_t"] = clip_t_scores(image_embeddings, text_embeddings)
    groups = list(
        zip(
            index["candidate"],
            index["step"],
            index["lora_scale"],
            prompt_groups(index),
            strict=True,
        )
    )
    scores["diversity"] = group_diversity(image_embeddings, groups)
    suite_keys, anchors = suite_groups(index)
    scores["consistency_clip"] = group_consistency(image_embeddings, suite_keys, anchors)
    has_suites = bool(scores["consistency_clip"].notna().any())
    scores["nn_similarity"] = nearest_neighbour_similarity(image_embeddings, reference_embeddings)
    distance = nearest_hamming(phash_bits(image_paths), phash_bits(reference_paths))
    scores["nn_phash_distance"] = distance.astype(np.float64)
    memorised = distance <= config.memorisation.phash_distance
    if not embedder.stand_in:
        memorised |= scores["nn_similarity"].to_numpy() >= config.memorisation.copy_threshold
    scores["memorised"] = memorised.astype(np.float64)
    records.update(_clip_records(embedder, len(references), trigger, config, has_suites))

    # ArcFace identity.
    records.update(_score_faces(scores, image_paths, reference_paths, config, suite_keys, anchors))

    # Pose fidelity.
    records.update(_score_poses(scores, index, pose_dir, pose_config, dataset_dir, root, metadata))

    # Tag consistency.
    tagger = _build_score_tagger(config, tagger_config, embedder, train)
    if config.tags.tagger == "clip":
        tagger_config = None  # the pipeline's post-processing belongs to the pipeline's tagger
    shared = image_embeddings if config.tags.tagger == "clip" else None
    records.update(_score_tags(scores, index, train, tagger, config, tagger_config, root, shared))

    out_dir = Path(out_dir)
    write_parquet(out_dir / "scores.parquet", scores)
    write_json(out_dir / "scorers.json", records)
    return scores


def _build_score_tagger(
    config: ScoreConfig,
    tagger_config: TaggerConfig | None,
    embedder: ClipEmbedder,
    train: pd.DataFrame,
) -> Any:
    """The tagger that judges generated images.

    `score.tags.tagger: clip`: CLIP zero-shot (charaforge.tagging) over the dataset's own tag
    vocabulary, on the scoring CLIP; `pipeline`: the pipeline's `tagger` section, unless it is the
    sidecar reader, which cannot see pixels (then None: not applicable).
    """
    from charaforge.tagging import ClipZeroShotTagger, build_tagger

    if config.tags.tagger == "clip":
        vocabulary = sorted({tag for tags in train["tags"] for tag in tags})
        if not vocabulary:
            return None
        return ClipZeroShotTagger(
            embedder, vocabulary, threshold=config.tags.threshold, batch_size=config.batch_size
        )
    if tagger_config is None or tagger_config.backend == "sidecar":
        return None
    return build_tagger(tagger_config)


def _score_faces(
    scores: pd.DataFrame,
    image_paths: list[Path],
    reference_paths: list[Path],
    config: ScoreConfig,
    suite_keys: list[str | None],
    anchors: list[bool],
) -> dict[str, dict[str, Any]]:
    from charaforge.face import identity_scores, load_face_scorer, reference_embedding

    with load_face_scorer(config.face) as scorer:
        reference_faces = scorer.embed_images(reference_paths, config.batch_size)
        reference = reference_embedding(reference_faces)
        image_faces = scorer.embed_images(image_paths, config.batch_size)
    found = ~np.isnan(image_faces).any(axis=1)
    scores["face_detected"] = found.astype(np.float64)
    scores["arcface"] = identity_scores(image_faces, reference)
    scores["consistency_arcface"] = group_consistency(image_faces, suite_keys, anchors)
    has_consistency = bool(scores["consistency_arcface"].notna().any())
    n_reference_faces = int((~np.isnan(reference_faces).any(axis=1)).sum())
    applicable = reference is not None and bool(found.any())
    if reference is None:
        reason = "no face found in any reference image"
    elif not found.any():
        reason = "no face found in any generated image"
    else:
        reason = ""
    log.info(
        "arcface: faces in %d/%d references and %d/%d sweep images%s",
        n_reference_faces,
        len(reference_paths),
        int(found.sum()),
        len(found),
        " (stand-in recognition model)" if scorer.stand_in else "",
    )
    common = {**scorer.description, "stand_in": scorer.stand_in}
    return {
        "arcface": {
            **common,
            "scale": SCALE,
            "definition": "cosine between the embedding of the image's largest face and the "
            "normalised mean embedding of the faces found in the references; NaN without a face",
            "references": f"dataset train split: faces in {n_reference_faces} of "
            f"{len(reference_paths)} images",
            "images_without_face": int((~found).sum()),
            "applicable": applicable,
            "reason": reason,
            "identity_threshold": config.face.identity_threshold,
        },
        "consistency_arcface": {
            **common,
            "scale": SCALE,
            "definition": "ArcFace cosine with the mean face of the identity shots of the same "
            "candidate, step, scale and suite group (CharaConsist); NaN outside suite groups",
            "applicable": has_consistency,
            "reason": ""
            if has_consistency
            else "no suite group with faces in the identity shot and another image",
        },
        "face_detected": {
            **common,
            "model": scorer.description["detector"],
            "stand_in": False,  # the detector is a real model; only recognition may be a stand-in
            "scale": "share of images, 0..1",
            "definition": "1 when a face was detected in the image, else 0",
            "applicable": True,
        },
    }


def _score_poses(
    scores: pd.DataFrame,
    index: pd.DataFrame,
    pose_dir: str | Path | None,
    pose_config: PoseConfig | None,
    dataset_dir: str | Path,
    root: Path,
    metadata: pd.DataFrame,
) -> dict[str, dict[str, Any]]:
    from charaforge.metrics_pose import POSE_METRICS, score_pose_fidelity

    keypoints = None
    if pose_dir is not None and (Path(pose_dir) / "keypoints.parquet").is_file():
        keypoints = pd.read_parquet(Path(pose_dir) / "keypoints.parquet")
    if pose_config is None:
        for name in POSE_METRICS:
            scores[name] = np.nan
        result_reason, applicable, ceiling, n_conditioned = "no pose configuration", False, None, 0
    else:
        sources = {row.image_id: _resolve(root, row.image_path) for row in metadata.itertuples()}
        result = score_pose_fidelity(index, keypoints, sources, root, pose_config)
        for name in POSE_METRICS:
            scores[name] = result.per_image[name].to_numpy()
        result_reason, applicable = result.reason, result.applicable
        ceiling, n_conditioned = result.ceiling, result.n_conditioned
    if not applicable:
        log.info("pose fidelity not applicable: %s", result_reason)
    common = {
        "model": "MediaPipe Pose (charaforge.pose.PoseDetector, COCO-17 view)",
        "stand_in": False,
        "applicable": applicable,
        "reason": result_reason,
        "conditioned_images": n_conditioned,
        "ceiling": ceiling,
        "preprocessing": "conditioning keypoints scaled from the source photo to the generated "
        "size; keypoints below pose.min_visibility are left out",
    }
    return {
        "pose_oks": {
            **common,
            "scale": "OKS, 0..1",
            "definition": "COCO OKS with COCO sigmas against the conditioning keypoints; object "
            "area = their bounding-box area; 0 when no person is detected",
        },
        "pose_pck_01": {
            **common,
            "scale": "share of keypoints, 0..1",
            "definition": "PCK@0.1 of max(bbox width, height) of the conditioning keypoints",
        },
        "pose_pck_02": {
            **common,
            "scale": "share of keypoints, 0..1",
            "definition": "PCK@0.2 of max(bbox width, height) of the conditioning keypoints",
        },
        "pose_detected": {
            **common,
            "scale": "share of images, 0..1",
            "definition": "1 when the detector finds a person in the pose-conditioned image",
        },
    }


def _score_tags(
    scores: pd.DataFrame,
    index: pd.DataFrame,
    train: pd.DataFrame,
    tagger: Any,
    config: ScoreConfig,
    tagger_config: TaggerConfig | None,
    root: Path,
    embeddings: np.ndarray | None = None,
) -> dict[str, dict[str, Any]]:
    character_rows = train
    if "style" in train.columns and (train["style"] != "photo").any():
        # The character's own images; real photos in the set are not the character.
        character_rows = train[train["style"] != "photo"]
    tag_lists = [list(tags) for tags in character_rows["tags"]]
    defining = set(defining_tags(tag_lists, config.tags.defining_fraction))
    vocabulary = {tag for tags in train["tags"] for tag in tags}
    precision = np.full(len(index), np.nan)
    recall = np.full(len(index), np.nan)
    if tagger is None:
        reason = "the pipeline's tagger reads sidecar captions and cannot tag generated images"
    elif not defining:
        reason = "no tag is shared by enough training images to define the character"
    else:
        reason = ""
        from charaforge.tagging import TagRequest, postprocess

        requests = [
            TagRequest(str(row.image_id), str(_resolve(root, row.image_path)), None)
            for row in index.itertuples()
        ]
        # The score stage's own CLIP tagger reuses the image embeddings computed for CLIP-I;
        # other backends are batched when they can (one embedding pass), else image by image.
        if embeddings is not None:
            results = [tagger.select(row) for row in tagger.score_embeddings(embeddings)]
        elif hasattr(tagger, "tag_many"):
            results = tagger.tag_many(requests)
        else:
            results = [tagger.tag(request) for request in requests]
        for position, (result, prompt) in enumerate(zip(results, index["prompt"], strict=True)):
            if tagger_config is not None:
                result = postprocess(result, tagger_config)
            precision[position], recall[position] = tag_consistency(
                result.tags, defining, vocabulary, prompt_tags(str(prompt))
            )
    scores["tag_precision"] = precision
    scores["tag_recall"] = recall
    applicable = not reason
    common = {
        "model": getattr(tagger, "name", "none"),
        "stand_in": bool(getattr(tagger, "stand_in", False)),
        "scale": "share of tags, 0..1",
        "defining_tags": sorted(defining),
        "defining_fraction": config.tags.defining_fraction,
        "applicable": applicable,
        "reason": reason,
    }
    return {
        "tag_precision": {
            **common,
            "definition": "share of defining tags among the predicted dataset tags the prompt "
            "did not ask for",
        },
        "tag_recall": {**common, "definition": "share of the defining tags the tagger found"},
    }


def _clip_records(
    embedder: ClipEmbedder,
    n_references: int,
    trigger: str,
    config: ScoreConfig,
    has_suites: bool,
) -> dict[str, dict[str, Any]]:
    memorisation = config.memorisation
    criterion = (
        f"its pHash is within Hamming distance {memorisation.phash_distance} of a training image's"
    )
    if embedder.stand_in:
        criterion += " (the stand-in CLIP is not used for this)"
    else:
        criterion += f" or its CLIP cosine with one is at least {memorisation.copy_threshold:g}"
    common = {
        **embedder.description,
        "library": "open_clip",
        "scale": SCALE,
        "stand_in": embedder.stand_in,
        "applicable": True,
    }
    return {
        "clip_i": {
            **common,
            "definition": "mean cosine between the image embedding and each reference embedding",
            "references": f"dataset train split ({n_references} images)",
        },
        "clip_t": {
            **common,
            "definition": "cosine between the image embedding and the prompt embedding",
            "prompt": f"trigger word {trigger!r} removed, leftover separators cleaned",
        },
        "diversity": {
            **common,
            "scale": "mean cosine distance (1 - cos), 0..2",
            "definition": "mean CLIP cosine distance to the other images of the same candidate, "
            "step, LoRA scale and prompt group (the suite group when the sweep has one, else "
            "the prompt); NaN when alone",
        },
        "consistency_clip": {
            **common,
            "definition": "CLIP cosine with the mean embedding of the identity shots of the "
            "same candidate, step, scale and suite group (CharaConsist); NaN outside suite groups",
            "applicable": has_suites,
            "reason": "" if has_suites else "the sweep has no prompt suite groups",
        },
        "nn_similarity": {
            **common,
            "definition": "highest CLIP cosine with any training image (memorisation)",
            "copy_threshold": config.memorisation.copy_threshold,
        },
        "nn_phash_distance": {
            "model": "imagehash.phash (64-bit DCT hash, no weights)",
            "stand_in": False,
            "applicable": True,
            "scale": "Hamming distance, 0..64",
            "definition": "smallest pHash Hamming distance to any training image",
        },
        "memorised": {
            "model": "pHash" + ("" if embedder.stand_in else f" + {embedder.description['model']}"),
            "stand_in": False,
            "applicable": True,
            "scale": "share of images, 0..1",
            "definition": "1 when the image copies a training image, else 0",
            "criterion": criterion,
        },
    }
