"""What identifies a candidate's run: the settings that decide its numbers, its checkpoint
steps, the fingerprint a saved state must match, and the provenance its files record."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from charaforge.config import TrainConfig, config_hash
from charaforge.config.train import CandidateConfig


@dataclass
class RunContext:
    """What a run's files record about where they came from (provenance)."""

    trigger: str | None = None
    git_commit: str = "unknown"


def checkpoint_steps(train: TrainConfig) -> list[int]:
    """Every `checkpoint_every` steps, and always the last step."""
    steps = list(range(train.checkpoint_every, train.max_steps + 1, train.checkpoint_every))
    return steps if steps and steps[-1] == train.max_steps else [*steps, train.max_steps]


def result_settings(
    candidate: CandidateConfig, train: TrainConfig, resolution: int, seed: int
) -> dict[str, Any]:
    """The configuration that decides the numbers: not where caches and states live, not the
    resume switch, not the devices or the executor, not the other candidates."""
    settings = train.model_dump(
        mode="json",
        exclude={"candidates", "resume", "state_dir", "cache", "devices", "executor"},
    )
    return {
        "candidate": candidate.model_dump(mode="json"),
        "train": settings,
        "resolution": resolution,
        "seed": seed,
    }


def run_fingerprint(
    candidate: CandidateConfig,
    train: TrainConfig,
    resolution: int,
    seed: int,
    data: str,
    model: str,
) -> str:
    """What a saved state must match to be resumed: everything that changes the numbers (the
    caches and the resume switch do not)."""
    return config_hash(
        {**result_settings(candidate, train, resolution, seed), "data": data, "model": model}
    )


@dataclass
class TrainResult:
    """What one candidate's training produced (summary.json holds all but `seconds`)."""

    name: str
    rank: int
    alpha: float
    learning_rate: float
    checkpoints: list[int]
    final_loss: float
    val_loss: list[float] | None = None  # one per checkpoint; None without a val split
    initial_val_loss: float | None = None  # before the first step (the LoRA is a no-op then)
    seconds: float = 0.0
    resumed_from: int = 0
    history: pd.DataFrame = field(default_factory=pd.DataFrame, repr=False)

    def summary(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "rank": self.rank,
            "alpha": self.alpha,
            "learning_rate": self.learning_rate,
            "checkpoints": self.checkpoints,
            "final_loss": self.final_loss,
            "val_loss": self.val_loss,
            "initial_val_loss": self.initial_val_loss,
        }
