"""The world: renderer, captions, held-out character, and the pretrained diffusion world model."""

from __future__ import annotations

import hashlib
import io
import itertools
import json
from pathlib import Path

import pytest
import torch

from charaforge.config import ModelConfig, WorldConfig
from charaforge.models import world_diffusion
from charaforge.models.base import (
    build_clip_tokenizer,
    load_base_pipeline,
    read_base_info,
    write_base,
)
from charaforge.models.world import WORLD_JSON, train_world
from charaforge.models.world_diffusion import (
    CONTEXT_LENGTH,
    build_vae,
    encode_corpus,
    pretrain_diffusion,
    render_corpus,
    tokenize,
    train_unet,
    train_vae,
    vae_peer,
)
from charaforge.models.world_parallel import process_group
from charaforge.prepare.world import (
    ATTRIBUTES,
    CHARACTER_ATTRIBUTES,
    DEMO_CHARACTER,
    caption,
    held_out,
    make_scene,
    parse_caption,
    render,
    sample_scenes,
)
from charaforge.train.checks import size_multiple

TINY = WorldConfig.model_validate(
    {
        "image_size": 32,
        "corpus_size": 24,
        "vae": {"steps": 2, "batch_size": 4, "learning_rate": 1e-3},
        "unet": {"steps": 3, "batch_size": 4, "learning_rate": 1e-3, "caption_dropout": 0.5},
        "samples": {"prompts": ["1girl, red hair, beach background"], "seeds": [0], "steps": 2},
        # The scorers train beside the diffusion model in the stage; tiny here too.
        **{
            name: {"steps": 2, "batch_size": 8, "train_images": 16, "eval_images": 8}
            for name in ("clip", "tagger", "oracle")
        },
    }
)


def png_bytes(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def tree_digests(root: Path) -> dict[str, str]:
    return {
        str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


# --- renderer ---------------------------------------------------------------------------------


def test_attribute_vocabulary() -> None:
    assert len(ATTRIBUTES["hair_colour"]) == 6 and len(ATTRIBUTES["outfit_colour"]) == 6
    assert ATTRIBUTES["accessory"] == ("none", "hat", "sunglasses")
    assert len(ATTRIBUTES["background"]) == 5
    assert tuple(name for name in ATTRIBUTES if name != "background") == CHARACTER_ATTRIBUTES
    assert set(DEMO_CHARACTER) == set(CHARACTER_ATTRIBUTES)


def test_render_is_deterministic_and_seed_jitters() -> None:
    scene = sample_scenes(3, 1)[0]
    first = render(scene, seed=7)
    assert first.mode == "RGB" and first.size == (32, 32)
    assert png_bytes(first) == png_bytes(render(scene, seed=7))
    assert png_bytes(first) != png_bytes(render(scene, seed=8))
    assert render(scene, seed=7, size=64).size == (64, 64)


def test_every_attribute_value_is_visible() -> None:
    # Each value of an attribute must look different from every other value of it (same scene
    # otherwise, same seed): the models can only learn what the renders show.
    base = make_scene(
        hair_colour="black",
        hair_length="short",
        outfit_colour="red",
        outfit="dress",
        accessory="none",
        background="beach",
    )
    for name, values in ATTRIBUTES.items():
        renders = {
            value: torch.tensor(list(render(base.replace(**{name: value}), 0).get_flattened_data()))
            for value in values
        }
        for first, second in itertools.combinations(values, 2):
            difference = (renders[first].float() - renders[second].float()).abs().sum(dim=1)
            changed = int((difference > 60).sum())
            assert changed >= 12, f"{name}: {first} and {second} differ in {changed} pixels"


def test_caption_round_trips() -> None:
    for scene in sample_scenes(11, 200, exclude_demo=False):
        named = parse_caption(caption(scene))
        expected = scene.as_dict()
        if expected["accessory"] == "none":
            del expected["accessory"]  # no tag, so the prompt does not name it
        assert named == expected
        assert caption(scene, trigger="zqx").startswith("zqx, 1girl, ")
        assert parse_caption(caption(scene, trigger="zqx") + ", masterpiece") == expected


def test_demo_caption_and_unknown_values() -> None:
    scene = make_scene(**DEMO_CHARACTER, background="beach")
    assert caption(scene) == "1girl, pink hair, long hair, yellow dress, hat, beach background"
    assert held_out(scene) and held_out(scene.replace(background="snow"))
    assert not held_out(scene.replace(accessory="none"))
    with pytest.raises(ValueError, match="hair_colour"):
        make_scene(**{**scene.as_dict(), "hair_colour": "green"})
    with pytest.raises(ValueError, match="missing"):
        make_scene(hair_colour="pink")


def test_sampling_excludes_the_demo_character() -> None:
    drawn = sample_scenes(5, 3000)
    assert drawn == sample_scenes(5, 3000)
    assert not any(held_out(scene) for scene in drawn)
    # Without exclusion the demo character does come up (1 in 432 characters), so the filter works.
    assert any(held_out(scene) for scene in sample_scenes(5, 3000, exclude_demo=False))
    for name, values in ATTRIBUTES.items():
        assert {scene.get(name) for scene in drawn} == set(values)


# --- world models -----------------------------------------------------------------------------


def test_tiny_pretraining_is_byte_identical_and_loads_as_base(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    for run in ("a", "b"):
        pipeline, result = pretrain_diffusion(TINY, tmp_path / run / "pipeline", seed=5)
    assert tree_digests(tmp_path / "a") == tree_digests(tmp_path / "b")
    assert len(result.vae_losses) == 2 and len(result.unet_losses) == 3
    assert size_multiple(pipeline) == 8  # 4x VAE x 2x UNet: model.resolution 32 trains
    # A different seed gives other weights (the seed reaches every model).
    pretrain_diffusion(TINY, tmp_path / "c" / "pipeline", seed=6)
    assert tree_digests(tmp_path / "a") != tree_digests(tmp_path / "c")

    model = ModelConfig(
        family="sd15", source="world", path=str(tmp_path / "a" / "pipeline"), resolution=32
    )
    info = write_base(model, tmp_path / "base")
    assert info.world and not info.stand_in and read_base_info(tmp_path / "base").world
    assert info.display_name == "charaforge-world-sd15"
    loaded = load_base_pipeline(tmp_path / "base", device=torch.device("cpu"))
    image = loaded(
        "1girl, red hair",
        num_inference_steps=2,
        height=32,
        width=32,
        generator=torch.Generator("cpu").manual_seed(0),
    ).images[0]
    assert image.size == (32, 32)


def test_data_parallel_vae_matches_one_process_on_the_whole_batch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two ranks, each on half of every batch with averaged gradients, train the weights one
    process trains on the whole batch (up to float rounding) and encode the corpus as it does,
    half each, after rendering the corpus half each; the peer is a real spawned process talking
    gloo over loopback."""
    import multiprocessing

    torch.set_num_threads(1)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the spawned peer: one thread too
    corpus = render_corpus(TINY.corpus_size, TINY.image_size, 7)

    single_losses: list[float] = []
    single = train_vae(corpus, TINY, 7, lambda _s, loss: single_losses.append(loss))
    single_latents = encode_corpus(single, corpus)

    rendezvous = str(tmp_path / "rendezvous")
    peer = multiprocessing.get_context("spawn").Process(
        target=vae_peer, args=(TINY, 7, rendezvous, 1)
    )
    peer.start()
    parallel_losses: list[float] = []
    try:
        with process_group(rendezvous, rank=0) as shard:
            drawn: list[int] = []  # the renders this rank draws itself: its half of the corpus
            draw = world_diffusion.render
            monkeypatch.setattr(
                world_diffusion, "render", lambda *args: drawn.append(1) or draw(*args)
            )
            rendered = render_corpus(TINY.corpus_size, TINY.image_size, 7, shard)
            monkeypatch.setattr(world_diffusion, "render", draw)
            assert len(drawn) == TINY.corpus_size // 2
            parallel = train_vae(
                corpus, TINY, 7, lambda _s, loss: parallel_losses.append(loss), shard
            )
            parallel_latents = encode_corpus(parallel, corpus, shard=shard)
    finally:
        peer.join(timeout=120)
    assert peer.exitcode == 0
    # The corpus drawn half by each rank is the one process's, byte for byte.
    assert torch.equal(rendered.pixels, corpus.pixels)
    assert rendered.captions == corpus.captions

    difference = max(
        (a - b).abs().max().item()
        for a, b in zip(single.state_dict().values(), parallel.state_dict().values(), strict=True)
    )
    initial = build_vae(7, TINY.image_size).state_dict()
    moved = max(
        (a - b).abs().max().item()
        for a, b in zip(single.state_dict().values(), initial.values(), strict=True)
    )
    # Adam divides by the gradients' running scale, so rounding differences in near-zero
    # gradients reach the weights at up to ~lr; without the all-reduce the ranks' weights
    # differ at the movement's scale.
    print(
        f"data-parallel vs one process: max weight difference {difference:.2e}, moved {moved:.2e}"
    )
    assert moved > 5e-4  # training really changed the weights ...
    assert difference < moved / 10  # ... and both ways the same, up to float rounding
    assert parallel_losses == pytest.approx(single_losses, rel=1e-4)
    # Every image's latent, in corpus order, half of them encoded by the peer.
    assert parallel_latents.shape == single_latents.shape
    assert torch.allclose(parallel_latents, single_latents, atol=1e-3)


def test_min_snr_weights_the_world_unet_loss() -> None:
    """snr_gamma weights each sample by min(SNR, gamma) / SNR <= 1: the first step's loss falls
    below the plain mean with gamma 1 (SNR > 1 for roughly the first third of SD1.5's timesteps),
    and a gamma above every SNR of the schedule (the largest is ~1200, at t=0) gives the plain
    mean back."""
    torch.set_num_threads(1)
    latents = torch.randn((8, 4, 8, 8), generator=torch.Generator().manual_seed(0))
    tokenizer = build_clip_tokenizer(max_length=CONTEXT_LENGTH)
    token_ids = tokenize(tokenizer, [caption(scene) for scene in sample_scenes(3, 8)])
    empty_ids = tokenize(tokenizer, [""])[0]

    def first_loss(gamma: float | None) -> float:
        unet = TINY.unet.model_copy(update={"steps": 1, "batch_size": 32, "snr_gamma": gamma})
        losses: list[float] = []
        config = TINY.model_copy(update={"unet": unet})
        train_unet(latents, token_ids, empty_ids, config, 7, lambda _s, loss: losses.append(loss))
        return losses[0]

    plain = first_loss(None)
    assert first_loss(1.0) < 0.9 * plain
    assert first_loss(1e9) == pytest.approx(plain, rel=1e-6)


def test_world_base_needs_the_world_stage(tmp_path: Path) -> None:
    from charaforge.errors import ConfigError

    model = ModelConfig(
        family="sd15", source="world", path=str(tmp_path / "nothing"), resolution=32
    )
    with pytest.raises(ConfigError, match="world"):
        write_base(model, tmp_path / "base")


def test_world_stage_is_cheap_without_model_world(tmp_path: Path) -> None:
    result = train_world(TINY, tmp_path / "world", seed=1, model_source="stand_in")
    assert not result["used"]
    assert [p.name for p in (tmp_path / "world").iterdir()] == [WORLD_JSON]
    assert json.loads((tmp_path / "world" / WORLD_JSON).read_text())["used"] is False


@pytest.mark.slow
def test_world_stage_output_is_byte_identical(tmp_path: Path) -> None:
    """The whole world stage (worker processes, contact sheet, world.json) twice: same bytes."""
    results = [train_world(TINY, tmp_path / run, seed=2) for run in ("a", "b")]
    assert tree_digests(tmp_path / "a") == tree_digests(tmp_path / "b")
    written = json.loads((tmp_path / "a" / WORLD_JSON).read_text())
    assert written["used"] and written["held_out_character"] == DEMO_CHARACTER
    assert (tmp_path / "a" / "samples" / "contact_sheet.png").is_file()
    assert results[0]["timings"]["diffusion_cpu_seconds"]["total"] > 0
