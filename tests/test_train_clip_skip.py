"""Training-time clip skip (A1111's count, 1 = the last layer): the trainer's text states, the
text-encoder cache keyed by clip skip and dtype, and the configuration checks."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from test_models_train import tiny_train

from charaforge.config import validate_params
from charaforge.errors import ConfigError
from charaforge.generate.batching import text_model_shim
from charaforge.models.base import build_stand_in_pipeline, load_base_pipeline, pipeline_location
from charaforge.train import CandidateTrainer
from charaforge.train.checks import check_candidates
from charaforge.train.encodings import CachedEncoder
from charaforge.train.grid import prepare
from charaforge.train.processes import Share
from charaforge.train.text import encode_captions

CAPTION = "aoi_cf, 1girl, red coat, smiling"


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _ids(tokenizer, caption: str) -> torch.Tensor:
    return tokenizer(
        [caption], padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
        return_tensors="pt",
    ).input_ids  # fmt: skip


def _layer_norm(module: torch.nn.LayerNorm, states: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(states, module.normalized_shape, module.weight, module.bias, module.eps)


@torch.no_grad()
def test_sd15_clip_skip_2_takes_the_penultimate_layer_through_the_final_norm() -> None:
    pipeline = build_stand_in_pipeline("sd15", 0, 64)
    encoder = pipeline.text_encoder
    # By hand: the encoder's per-layer outputs, one layer short of the last, through the final
    # LayerNorm by F.layer_norm with its weights.
    ids = _ids(pipeline.tokenizer, CAPTION)
    hidden = encoder(ids, output_hidden_states=True).hidden_states
    assert len(hidden) == encoder.config.num_hidden_layers + 1  # embeddings + every layer
    expected = _layer_norm(encoder.final_layer_norm, hidden[-2])
    last = _layer_norm(encoder.final_layer_norm, hidden[-1])

    skipped = encode_captions(pipeline, "sd15", [CAPTION], clip_skip=2)["states"]
    torch.testing.assert_close(skipped, expected, rtol=0, atol=1e-6)
    plain = encode_captions(pipeline, "sd15", [CAPTION])["states"]
    torch.testing.assert_close(plain, last, rtol=0, atol=1e-5)
    assert (skipped - plain).abs().max() > 1e-2
    # The engine's path (diffusers' encode_prompt, A1111 2 = diffusers 1) gives the same states.
    with text_model_shim(encoder):
        engine_states = pipeline.encode_prompt(CAPTION, "cpu", 1, False, clip_skip=1)[0]
    torch.testing.assert_close(skipped, engine_states, rtol=0, atol=1e-6)


@torch.no_grad()
def test_sdxl_clip_skip_2_moves_both_encoders_one_layer_down_and_keeps_the_pool() -> None:
    pipeline = build_stand_in_pipeline("sdxl", 0, 64)
    expected = []
    for tokenizer, encoder in (
        (pipeline.tokenizer, pipeline.text_encoder),
        (pipeline.tokenizer_2, pipeline.text_encoder_2),
    ):
        output = encoder(_ids(tokenizer, CAPTION), output_hidden_states=True)
        expected.append(output.hidden_states[-3])  # SDXL's default is -2; one more skipped
        pooled = output[0]
    encoded = encode_captions(pipeline, "sdxl", [CAPTION], clip_skip=2)
    torch.testing.assert_close(encoded["states"], torch.cat(expected, dim=-1), rtol=0, atol=0)
    torch.testing.assert_close(encoded["pooled"], pooled, rtol=0, atol=0)
    diffusers_states, _, diffusers_pooled, _ = pipeline.encode_prompt(
        CAPTION, device="cpu", do_classifier_free_guidance=False, clip_skip=1
    )
    torch.testing.assert_close(encoded["states"], diffusers_states, rtol=0, atol=1e-6)
    torch.testing.assert_close(encoded["pooled"], diffusers_pooled, rtol=0, atol=1e-6)


@torch.no_grad()
def test_text_cache_misses_when_clip_skip_or_dtype_changes(tmp_path: Path, base_dir: Path) -> None:
    pipeline = load_base_pipeline(base_dir, torch.device("cpu"))
    location = pipeline_location(base_dir)
    cache = {"dir": str(tmp_path / "cache"), "latents": False, "text_encoder_outputs": True}

    def encoder_at(clip_skip: int) -> CachedEncoder:
        return CachedEncoder(
            pipeline, "sd15", location, tiny_train(clip_skip=clip_skip, cache=cache)
        )

    first = encoder_at(1)
    states_1 = first.text(CAPTION)["states"].clone()
    assert (first.text_cache.hits, first.text_cache.misses) == (0, 1)
    again = encoder_at(1)
    torch.testing.assert_close(again.text(CAPTION)["states"], states_1, rtol=0, atol=0)
    assert (again.text_cache.hits, again.text_cache.misses) == (1, 0)

    skip_2 = encoder_at(2)
    states_2 = skip_2.text(CAPTION)["states"]
    assert (skip_2.text_cache.hits, skip_2.text_cache.misses) == (0, 1)
    torch.testing.assert_close(
        states_2, encode_captions(pipeline, "sd15", [CAPTION], 2)["states"], rtol=0, atol=0
    )
    assert (states_2 - states_1).abs().max() > 1e-2

    pipeline.text_encoder.to(torch.float64)  # a changed dtype (fp16/bf16 on a GPU) misses too
    wide = encoder_at(1)
    assert wide.text(CAPTION)["states"].dtype == torch.float64
    assert (wide.text_cache.hits, wide.text_cache.misses) == (0, 1)


def test_train_clip_skip_must_match_eval_and_fit_the_encoder(params_dict: dict) -> None:
    params_dict["train"]["clip_skip"] = 2
    with pytest.raises(ConfigError, match=r"train\.clip_skip \(2\) differs from eval\.clip_skip"):
        validate_params(params_dict)
    params_dict["eval"]["clip_skip"] = 2
    assert validate_params(params_dict).train.clip_skip == 2
    pipeline = build_stand_in_pipeline("sd15", 0, 64)  # its text encoder has 2 layers
    check_candidates(pipeline, tiny_train(clip_skip=2))
    with pytest.raises(ConfigError, match="train.clip_skip: 3 is more than"):
        check_candidates(pipeline, tiny_train(clip_skip=3))


@torch.no_grad()
def test_the_loop_encodes_uncached_captions_at_the_clip_skip(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, base_dir: Path, dataset_dir: Path
) -> None:
    monkeypatch.chdir(tmp_path)  # the trainer's default state and cache folders are relative
    candidate = {"name": "c", "rank": 2, "alpha": 2, "learning_rate": 1e-3}
    no_text_cache = {"latents": True, "text_encoder_outputs": False}
    train = tiny_train(
        max_steps=1, checkpoint_every=1, candidates=[candidate], cache=no_text_cache, clip_skip=2
    )
    base, data = prepare(base_dir, dataset_dir, train, 64)
    with CandidateTrainer(
        base, data, train.candidates[0], train, 64, 3, Path("out"), Path("state")
    ) as trainer:
        text = trainer.batch_text([0, 1], Share([0, 1], 1.0))
        captions = [trainer.data.items[i].caption for i in (0, 1)]  # no augmentation configured
        expected = encode_captions(base.pipeline, "sd15", captions, clip_skip=2)
    torch.testing.assert_close(text["states"], expected["states"], rtol=0, atol=0)
