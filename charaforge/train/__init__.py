"""LoRA training for SD1.5 and SDXL, by concern (SimpleTuner-like):

data (split, buckets, batch order, captions) -> text (caption encoding) -> caches and encodings
(latents and text through content-keyed caches) -> loss (noise, timesteps, targets, min-SNR) ->
validation (loss, samples) -> export (diffusers + kohya files) -> resume_state (the full state
for an exact resume) -> trainer (`CandidateTrainer`, one candidate's run) -> grid (`train_all`:
the base loaded and checked once, every candidate in turn).
"""

from charaforge.train.grid import train_all, train_candidate
from charaforge.train.settings import RunContext, checkpoint_steps
from charaforge.train.trainer import CandidateTrainer, TrainResult

__all__ = [
    "CandidateTrainer",
    "RunContext",
    "TrainResult",
    "checkpoint_steps",
    "train_all",
    "train_candidate",
]
