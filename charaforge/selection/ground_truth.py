"""Ground truth, world only: the attribute oracle's verdict per ranked row, beside the ranking.

With the world models the score stage also writes `oracle.parquet`: what the world's attribute
oracle (trained apart from every scorer, never part of the composite) sees in every sweep image.
This section shows, for each ranking row in ranking order, the oracle's identity (share of the
character's attributes drawn right), the share of images with the whole character right, and its
prompt-following (share of the prompted background and other context drawn right), with a
bootstrap CI of the identity. It lets a reader check the selection against the truth: the
ranking comes from the scorers alone, and this table says whether they were right.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from charaforge.selection.statistics import KEY, bootstrap_mean_ci, row_mask

ORACLE_FILE = "oracle.parquet"
_REQUIRED = [*KEY, "oracle_identity", "oracle_prompt_following"]


@dataclass(frozen=True)
class GroundTruth:
    """Per ranking row (KEY): oracle means, in the ranking's order."""

    table: pd.DataFrame  # KEY, identity, identity_ci_low/high, character_right, prompt_following

    def row(self, candidate: str, step: int, lora_scale: float) -> pd.Series:
        wanted = pd.Series({"candidate": candidate, "step": step, "lora_scale": lora_scale})
        return self.table[row_mask(self.table, wanted)].iloc[0]


def read_ground_truth(
    score_dir: str | Path,
    ranking: pd.DataFrame,
    draws: int,
    confidence: float,
    seed: int,
) -> GroundTruth | None:
    """The oracle's summary per ranking row, or None when the score stage wrote no oracle file."""
    path = Path(score_dir) / ORACLE_FILE
    if not path.is_file():
        return None
    judged = pd.read_parquet(path)
    missing = [column for column in _REQUIRED if column not in judged.columns]
    if missing:
        raise ValueError(f"{path}: lacks column(s) {missing}; rerun the `score` stage")
    rows = []
    for _, ranked in ranking.iterrows():
        images = judged[row_mask(judged, ranked)]
        identity = images["oracle_identity"].to_numpy(dtype=np.float64)
        following = images["oracle_prompt_following"].to_numpy(dtype=np.float64)
        low, high = (
            bootstrap_mean_ci(identity, draws, confidence, seed) if len(identity) else (np.nan,) * 2
        )
        rows.append(
            {
                "candidate": ranked["candidate"],
                "step": ranked["step"],
                "lora_scale": ranked["lora_scale"],
                "identity": float(identity.mean()) if len(identity) else np.nan,
                "identity_ci_low": low,
                "identity_ci_high": high,
                "character_right": float((identity == 1.0).mean()) if len(identity) else np.nan,
                "prompt_following": float(np.nanmean(following))
                if np.isfinite(following).any()
                else np.nan,
                "n_images": len(identity),
            }
        )
    return GroundTruth(pd.DataFrame(rows))
