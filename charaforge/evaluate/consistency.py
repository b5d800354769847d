"""Consistency filter for batch generation: set aside the images that do not look like the
character, as a person picking keepers would, without deleting anything.

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
from pathlib import Path

import numpy as np
import pandas as pd

from charaforge.config import FaceConfig
from charaforge.core.files import write_csv
from charaforge.models.face import identity_scores, load_face_scorer, reference_embedding

log = logging.getLogger(__name__)

SET_ASIDE = "set_aside"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
SIDECAR_SUFFIXES = (".json", ".txt")
CONSISTENCY_COLUMNS = ["file", "identity", "face_found", "kept", "location"]


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
