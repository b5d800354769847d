"""Training the candidate grid: the base model is loaded and checked once, the data planned
and encoded once, then each candidate trains its own LoRA on them (`CandidateTrainer`)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from charaforge.config import TrainConfig
from charaforge.config.train import CandidateConfig
from charaforge.core.files import write_csv, write_json
from charaforge.models.base import set_cpu_threads
from charaforge.train.base_model import FrozenBase
from charaforge.train.data import read_split
from charaforge.train.encodings import TrainingData
from charaforge.train.settings import RunContext
from charaforge.train.trainer import CandidateTrainer, StepCallback, TrainResult

log = logging.getLogger(__name__)

GridCallback = Callable[[str, int, dict[str, float]], None]


def prepare(
    base_dir: str | Path, dataset_dir: str | Path, train: TrainConfig, resolution: int
) -> tuple[FrozenBase, TrainingData]:
    """Every check first (the split, then the configuration against the loaded model), then
    the frozen base and the planned, encoded data that all candidates share."""
    rows, val_rows = read_split(dataset_dir), read_split(dataset_dir, "val")
    base = FrozenBase.load(base_dir, train, resolution)
    return base, TrainingData.build(base, rows, val_rows, train, resolution)


def train_candidate(
    base_dir: str | Path,
    dataset_dir: str | Path,
    candidate: CandidateConfig,
    train: TrainConfig,
    resolution: int,
    seed: int,
    out_dir: str | Path,
    on_step: StepCallback | None = None,
    trigger: str | None = None,
    state_dir: str | Path | None = None,
    context: RunContext | None = None,
) -> TrainResult:
    """Train one LoRA candidate; write checkpoint-<step>/, samples/ and history.csv to out_dir.

    `state_dir` (default: `<train.state_dir>/<candidate>`) receives the full training state
    every checkpoint; with `train.resume` the run continues from the latest one of the same
    configuration and data. `trigger` labels the kohya file and fills `{trigger}` in sample
    prompts; captions already hold it.
    """
    only = train.model_copy(update={"candidates": [candidate]})
    base, data = prepare(base_dir, dataset_dir, only, resolution)
    context = context or RunContext(trigger=trigger)
    with CandidateTrainer(
        base, data, candidate, train, resolution, seed, out_dir, state_dir, context
    ) as trainer:
        return trainer.run(on_step)


def train_all(
    base_dir: str | Path,
    dataset_dir: str | Path,
    train: TrainConfig,
    resolution: int,
    seed: int,
    out_dir: str | Path = "data/train",
    plots_dir: str | Path = "reports/plots/train_loss",
    on_step: GridCallback | None = None,
    trigger: str | None = None,
    state_dir: str | Path | None = None,
    context: RunContext | None = None,
) -> list[TrainResult]:
    """Train every candidate; write data/train/summary.json and the loss-curve plot files.

    Every check runs first, for all candidates, so a bad configuration fails before any work.
    """
    set_cpu_threads(train.cpu_threads)
    base, data = prepare(base_dir, dataset_dir, train, resolution)
    context = context or RunContext(trigger=trigger)
    state_root = Path(state_dir) if state_dir else Path(train.state_dir)

    results = []
    for candidate in train.candidates:
        callback = None if on_step is None else _bind(on_step, candidate.name)
        with CandidateTrainer(
            base, data, candidate, train, resolution, seed, Path(out_dir) / candidate.name,
            state_root / candidate.name, context,
        ) as trainer:  # fmt: skip
            result = trainer.run(callback)
        log.info(
            "%s: %d steps in %.1f s, final loss %.4f",
            candidate.name, train.max_steps, result.seconds, result.final_loss,
        )  # fmt: skip
        results.append(result)
    if trainer.is_main:  # N processes (accelerate launch): one copy of each output
        write_grid_outputs(results, base.info.stand_in, out_dir, plots_dir)
    return results


def write_grid_outputs(
    results: list[TrainResult], stand_in: bool, out_dir: str | Path, plots_dir: str | Path
) -> None:
    """The loss-curve plot files and data/train/summary.json, in candidate order (whoever
    trained them, in whatever order)."""
    for result in results:
        write_csv(Path(plots_dir) / f"{result.name}.csv", result.history[["step", "loss"]])
    summary = {"candidates": [r.summary() for r in results], "stand_in": stand_in}
    write_json(Path(out_dir) / "summary.json", summary)


def _bind(on_step: GridCallback, name: str) -> StepCallback:
    return lambda step, metrics: on_step(name, step, metrics)
