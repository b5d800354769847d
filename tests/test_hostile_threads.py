"""Threads: every float-computing piece of `score` (and the CLIP tagger of `tag`) runs with a fixed
thread count, so the bytes of scores.parquet (tags.parquet) do not depend on the machine's cores."""

from __future__ import annotations

from pathlib import Path

import torch
from test_score_report import _make_dataset, _make_generate, _make_train_and_base, _score

from charaforge.config import FaceConfig, ScoreConfig, TaggerConfig
from charaforge.models.base import set_cpu_threads
from charaforge.models.face import _load_recognizer
from charaforge.tagging.clip import ClipZeroShotTagger


def test_arcface_session_runs_on_one_thread() -> None:
    # onnxruntime's default (0: one thread per core) changes float sums with the machine.
    model, _ = _load_recognizer(FaceConfig())
    options = model.session.get_session_options()
    assert (options.intra_op_num_threads, options.inter_op_num_threads) == (1, 1)


def test_score_has_a_thread_setting_defaulting_to_one() -> None:
    assert ScoreConfig.model_fields["cpu_threads"].default == 1


def test_scores_parquet_bytes_do_not_depend_on_the_thread_count(tmp_path: Path) -> None:
    # The same sweep scored with 1 and with 2 torch threads (CPU reductions block differently).
    _make_dataset(tmp_path)
    _make_generate(tmp_path)
    _make_train_and_base(tmp_path)
    outputs = []
    for threads in (1, 2):
        set_cpu_threads(threads)
        assert torch.get_num_threads() == threads
        outputs.append(_score(tmp_path, tmp_path / f"threads-{threads}"))
    for name in ("scores.parquet", "scorers.json"):
        one, two = (tmp_path / f"threads-{n}" / name for n in (1, 2))
        assert one.read_bytes() == two.read_bytes(), name
    assert outputs[0]["clip_i"].notna().all()  # real numbers were compared, not empty columns


def test_clip_tagger_fixes_its_thread_count_before_embedding() -> None:
    config = TaggerConfig.model_validate(
        {
            "backend": "clip",
            "general_threshold": 0.35,
            "character_threshold": 0.85,
            "clip": {"vocabulary": ["red hair", "smile"], "cpu_threads": 1},
        }
    )
    before = torch.get_num_threads()
    set_cpu_threads(2)  # what torch would pick on a bigger machine
    try:
        ClipZeroShotTagger.from_config(config)
        assert torch.get_num_threads() == 1
    finally:
        set_cpu_threads(before)
