"""The champion: a stated rule over the ranking, ties settled by the lightest touch.

With a handful of prompts and seeds per row, neighbouring rows are often within noise of each
other, so the champion is chosen by SELECTION_RULE instead of by the top mean alone; a row that
copies its training images (memorisation) is never champion, and the champion is compared with
the base model on the very same (prompt, seed) pairs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from charaforge.config import ReportConfig
from charaforge.core.files import derive_seed
from charaforge.errors import ConfigError
from charaforge.selection.ranking import BASE_CANDIDATE, lora_rows
from charaforge.selection.statistics import PairedDifference, paired_difference

SELECTION_RULE = (
    "Only LoRA-bearing rows (LoRA scale > 0) that do not memorise their training set (at most "
    "{max_copy:.0%} of their images copies of a training image, see the memorisation guard) "
    "can be champion. Among them the row with the highest mean composite is the provisional "
    "champion. An eligible row is a statistical tie with it when the {confidence:.0%} paired "
    "bootstrap confidence interval of their composite difference, over the (prompt, seed) "
    "images both rendered from the same noise, includes 0 (rows that cannot be paired: when "
    "their own confidence intervals overlap). Among the tied rows the champion is the one with "
    "the smallest LoRA scale, then the earliest step, then the higher mean composite, then the "
    "candidate name in alphabetical order: the lightest touch that is as good. The base model "
    'row (candidate "base", no LoRA) is the baseline and is never the champion; the champion is '
    "compared with it on the same pairs, and the report says plainly when it is not better."
)


@dataclass(frozen=True)
class Selection:
    """The ranked table and the champion chosen from it."""

    table: pd.DataFrame  # one row per (candidate, step, lora_scale), ranked
    champion: pd.Series
    provisional: pd.Series  # the top eligible LoRA row by mean composite
    tied: pd.DataFrame  # eligible rows statistically tied with the provisional champion
    stand_in: tuple[str, ...] = ()  # what was a stand-in model (empty: all real weights)
    baseline: PairedDifference | None = None
    warnings: tuple[str, ...] = ()

    @property
    def statistical_tie(self) -> bool:
        return len(self.tied) > 1


def selection_rule(config: ReportConfig) -> str:
    """SELECTION_RULE with the configured confidence and memorisation limit filled in."""
    return SELECTION_RULE.format(confidence=config.confidence, max_copy=config.max_copy_fraction)


def choose_champion(
    table: pd.DataFrame,
    scores: pd.DataFrame | None = None,
    weights: dict[str, float] | None = None,
    config: ReportConfig | None = None,
    seed: int = 0,
) -> Selection:
    """Apply SELECTION_RULE to a ranked table.

    With the per-image `scores` (and the composite `weights` and `config`), a row ties with the
    provisional champion when the paired bootstrap CI of their composite difference, over the
    (prompt, seed) pairs both rendered, includes 0: every candidate renders a prompt from the same
    noise, so pairing removes the prompt-to-prompt spread that dominates the rows' own CIs.
    Without them, or when the rows cannot be paired, overlapping CIs are the tie test.
    """
    candidates = lora_rows(table)
    if candidates.empty:
        raise ConfigError(
            "no LoRA-bearing rows (lora_scale > 0) to choose a champion from: the sweep rendered "
            "only the base model (check eval.lora_scales)"
        )
    warnings: list[str] = []
    eligible = candidates
    if "memorising" in candidates:
        eligible = candidates[~candidates["memorising"].astype(bool)]
        if eligible.empty:
            warnings.append(
                "Every LoRA row memorises its training set: the champion below copies training "
                "images and should not be used."
            )
            eligible = candidates
    provisional = eligible.iloc[0]  # the table is ranked by composite
    tied_mask = []
    for _, row in eligible.iterrows():
        difference = None
        if scores is not None and weights is not None and config is not None:
            parts = ("report.tie", row["candidate"], int(row["step"]), float(row["lora_scale"]))
            difference = paired_difference(
                scores,
                provisional,
                row,
                weights,
                config.bootstrap_draws,
                config.confidence,
                derive_seed(seed, *parts),
            )
        if difference is None:
            tied_mask.append(
                row["ci_low"] <= provisional["ci_high"] and provisional["ci_low"] <= row["ci_high"]
            )
        else:
            tied_mask.append(difference.ci_low <= 0.0)
    tied = eligible[np.array(tied_mask, dtype=bool)].sort_values(
        ["lora_scale", "step", "composite", "candidate"], ascending=[True, True, False, True]
    )
    return Selection(
        table=table,
        champion=tied.iloc[0],
        provisional=provisional,
        tied=tied,
        warnings=tuple(warnings),
    )


def compare_with_baseline(
    scores: pd.DataFrame,
    champion: pd.Series,
    weights: dict[str, float],
    config: ReportConfig,
    seed: int,
) -> PairedDifference | None:
    """Paired bootstrap of champion minus base composite over the shared (prompt, seed) pairs."""
    base = scores[scores["candidate"] == BASE_CANDIDATE]
    if base.empty:
        return None
    return paired_difference(
        scores,
        champion,
        base.iloc[0],
        weights,
        config.bootstrap_draws,
        config.confidence,
        derive_seed(seed, "report.baseline"),
    )


def baseline_composite(table: pd.DataFrame) -> float | None:
    """The base model's composite, or None when the sweep has no base row."""
    base_rows = table[table["candidate"] == BASE_CANDIDATE]
    return float(base_rows["composite"].iloc[0]) if len(base_rows) else None
