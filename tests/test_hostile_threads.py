"""Threads: every float-computing piece of `score` runs with a fixed thread count, so the bytes of
scores.parquet do not depend on the machine's core count."""

from __future__ import annotations

from charaforge.config import FaceConfig, ScoreConfig
from charaforge.models.face import _load_recognizer


def test_arcface_session_runs_on_one_thread() -> None:
    # onnxruntime's default (0: one thread per core) changes float sums with the machine.
    model, _ = _load_recognizer(FaceConfig())
    options = model.session.get_session_options()
    assert (options.intra_op_num_threads, options.inter_op_num_threads) == (1, 1)


def test_score_has_a_thread_setting_defaulting_to_one() -> None:
    assert ScoreConfig.model_fields["cpu_threads"].default == 1
