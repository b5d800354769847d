"""ArcFace identity of every sweep image, on charaforge.models.face.

Each image's largest face is detected, aligned and embedded (charaforge.models.face: 5 landmarks,
`norm_crop` to 112x112, a 512-d ArcFace embedding); its identity score is the cosine with the
normalised mean embedding of the faces found in the references (the dataset's train split), and
its consistency the cosine with the mean face of its suite group's identity shots. An image
without a face scores NaN; with no face anywhere the metric is marked not applicable.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from charaforge.config import FaceConfig
from charaforge.evaluate.columns import COSINE_SCALE, FamilyScores
from charaforge.evaluate.groups import group_consistency
from charaforge.models.face import identity_scores, load_face_scorer, reference_embedding

log = logging.getLogger(__name__)


def score_faces(
    image_paths: Sequence[Path],
    reference_paths: Sequence[Path],
    config: FaceConfig,
    batch_size: int,
    suite_keys: Sequence[str | None],
    anchors: Sequence[bool],
) -> FamilyScores:
    """Face detection, ArcFace identity to the references and consistency within suite groups."""
    with load_face_scorer(config) as scorer:
        reference_faces = scorer.embed_images(list(reference_paths), batch_size)
        reference = reference_embedding(reference_faces)
        image_faces = scorer.embed_images(list(image_paths), batch_size)
    found = ~np.isnan(image_faces).any(axis=1)
    consistency = group_consistency(image_faces, suite_keys, anchors)
    has_consistency = bool((~np.isnan(consistency)).any())
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
    records = {
        "arcface": {
            **common,
            "scale": COSINE_SCALE,
            "definition": "cosine between the embedding of the image's largest face and the "
            "normalised mean embedding of the faces found in the references; NaN without a face",
            "references": f"dataset train split: faces in {n_reference_faces} of "
            f"{len(reference_paths)} images",
            "images_without_face": int((~found).sum()),
            "applicable": applicable,
            "reason": reason,
            "identity_threshold": config.identity_threshold,
        },
        "consistency_arcface": {
            **common,
            "scale": COSINE_SCALE,
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
    columns = {
        "face_detected": found.astype(np.float64),
        "arcface": identity_scores(image_faces, reference),
        "consistency_arcface": consistency,
    }
    return FamilyScores(columns=columns, records=records)
