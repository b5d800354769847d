"""Consistent characters (generate.consistent): the character mask on known-answer attention
maps, the shared attention against a hand-written softmax, and groups rendered on the SD1.5 and
SDXL stand-ins (identity untouched, frames attending to identity tokens, empty mask = plain)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from engine_fixtures import one_thread  # noqa: F401  (a fixture: pytest finds it by name)
from PIL import Image

from charaforge.config import ModelConfig
from charaforge.generate.consistent import (
    CHARACTER_MASK_KEY,
    Consistency,
    SharedAttention,
    SharedSelfAttention,
    _attend_with,
    character_map,
    character_token_indices,
    mask_at,
    mask_overlay,
)
from charaforge.generate.engine import GenerationEngine
from charaforge.generate.request import RenderRequest
from charaforge.models.base import build_clip_tokenizer, write_base

pytestmark = pytest.mark.usefixtures("one_thread")

CHARACTER = "aoi_cf, 1girl, red hair"
PROMPTS = [
    f"{CHARACTER}, standing, white studio",
    f"{CHARACTER}, waving, forest clearing",
    f"{CHARACTER}, sitting, city street",
]
SEEDS = [11, 12, 13]
RENDER = {"steps": 3, "guidance_scale": 5.0}


# --- the mask -----------------------------------------------------------------------------------


def _known_maps() -> tuple[list[torch.Tensor], np.ndarray]:
    """Cross-attention probabilities of two layers (8x8 and 4x4 tokens, 2 heads, 6 text tokens)
    where the character's tokens (1, 2) look at rows 2-5 x columns 2-5 and a distractor token (4)
    at the opposite corner; the answer is that square."""
    answer = np.zeros((8, 8), dtype=bool)
    answer[2:6, 2:6] = True
    generator = torch.Generator().manual_seed(0)
    maps = []
    for side in (8, 4):
        probs = torch.rand(2, side * side, 6, generator=generator) * 0.01
        square = torch.zeros(side, side)
        scale = side // 4
        square[1 * scale : 3 * scale, 1 * scale : 3 * scale] = 1.0
        probs[:, :, 1] += 0.5 * square.flatten()
        probs[:, :, 2] += 0.4 * square.flatten()
        corner = torch.zeros(side, side)
        corner[: side // 4, -(side // 4) :] = 1.0
        probs[:, :, 4] += 3.0 * corner.flatten()
        maps.append(probs)
    return maps, answer


def test_the_character_mask_covers_the_character_region_of_known_attention() -> None:
    maps, answer = _known_maps()
    mask = character_map(maps, [1, 2], (8, 8)) > 0.5
    assert np.array_equal(mask.numpy(), answer)
    # At a coarser layer the same region, pooled: the 2x2 centre of 4x4.
    coarse = np.zeros((4, 4), dtype=bool)
    coarse[1:3, 1:3] = True
    assert np.array_equal(
        mask_at(character_map(maps, [1, 2], (8, 8)), 16, 0.5).numpy(), coarse.flatten()
    )
    # The distractor's columns are not the character's: its corner is left out.
    assert not mask[:2, -2:].any()
    # The distractor's own map is the corner.
    assert (character_map(maps, [4], (8, 8)) > 0.5)[:2, -2:].all()


def test_a_flat_map_gives_an_empty_mask() -> None:
    flat = [torch.full((2, 64, 6), 1 / 6)]
    assert not (character_map(flat, [1], (8, 8)) > 0.0).any()


def test_character_tokens_are_found_in_the_prompt() -> None:
    tokenizer = build_clip_tokenizer()
    indices = character_token_indices(tokenizer, PROMPTS[1], "1girl, red hair")
    ids = tokenizer(PROMPTS[1])["input_ids"]
    decoded = tokenizer.decode([ids[i] for i in indices])
    assert decoded.replace(" ", "") == "1girl,redhair"
    assert indices[0] > 1  # after BOS and the trigger's tokens
    with pytest.raises(ValueError, match="not part of the prompt"):
        character_token_indices(tokenizer, PROMPTS[1], "blue hair")


def test_shared_attention_matches_a_hand_written_softmax() -> None:
    from diffusers.models.attention_processor import Attention

    torch.manual_seed(0)
    attn = Attention(query_dim=16, heads=2, dim_head=8).eval()
    hidden, extra = torch.randn(2, 6, 16), torch.randn(2, 3, 16)
    allowed = torch.tensor([True, False, True, True, False, True])
    with torch.no_grad():
        got = _attend_with(attn, hidden, extra, allowed)
        expected = torch.empty_like(got)
        for row in range(2):
            q = hidden[row] @ attn.to_q.weight.T
            k_all = torch.cat([hidden[row], extra[row]]) @ attn.to_k.weight.T
            v_all = torch.cat([hidden[row], extra[row]]) @ attn.to_v.weight.T
            heads = []
            for head in range(2):
                part = slice(8 * head, 8 * head + 8)
                scores = q[:, part] @ k_all[:, part].T / np.sqrt(8)
                scores[~allowed, 6:] = -torch.inf  # these queries see only their own image
                heads.append(scores.softmax(-1) @ v_all[:, part])
            expected[row] = torch.cat(heads, -1) @ attn.to_out[0].weight.T + attn.to_out[0].bias
    assert torch.allclose(got, expected, atol=1e-5)


def test_the_overlay_shows_the_image_and_the_red_character() -> None:
    image = Image.new("RGB", (8, 8), (0, 0, 255))
    mask = Image.new("L", (8, 8), 0)
    mask.paste(255, (0, 0, 4, 8))
    sheet = np.asarray(mask_overlay(image, mask))
    assert sheet.shape == (8, 16, 3)
    assert (sheet[:, :8] == (0, 0, 255)).all()  # the image itself
    assert sheet[0, 8, 0] > 100 and sheet[0, 15, 0] == 0  # red where the character is


def test_consistency_options_are_checked() -> None:
    with pytest.raises(ValueError, match="mask_threshold"):
        Consistency(CHARACTER, mask_threshold=1.5)
    with pytest.raises(ValueError, match="both"):
        Consistency(CHARACTER, identity_prompt=PROMPTS[0])


# --- rendering groups ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def engines(tmp_path_factory: pytest.TempPathFactory) -> dict[str, GenerationEngine]:
    root = tmp_path_factory.mktemp("consistent")
    built = {}
    for family in ("sd15", "sdxl"):
        write_base(ModelConfig(family=family, source="stand_in", resolution=64), root / family)
        built[family] = GenerationEngine(root / family)
    return built


def _group(
    consistent: bool, share_background: bool = False, threshold: float = 0.5
) -> list[RenderRequest]:
    requests = []
    for position, (prompt, seed) in enumerate(zip(PROMPTS, SEEDS, strict=True)):
        consistency = None
        if consistent:
            consistency = Consistency(
                CHARACTER,
                identity_prompt=None if position == 0 else PROMPTS[0],
                identity_seed=None if position == 0 else SEEDS[0],
                share_background=share_background,
                mask_threshold=threshold,
            )
        requests.append(RenderRequest(prompt=prompt, seed=seed, consistency=consistency, **RENDER))
    return requests


class KeyCounter:
    """Forward hooks on every self-attention key projection: how many tokens each call's keys
    span (an image alone: its layer's own token count; more: tokens of another image)."""

    def __init__(self, unet: torch.nn.Module) -> None:
        self.lengths: list[int] = []
        self.handles = [
            module.to_k.register_forward_hook(self._hook)
            for name, module in unet.named_modules()
            if name.endswith("attn1")
        ]

    def _hook(self, module: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        self.lengths.append(inputs[0].shape[1])

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


def _pixels(image: Image.Image) -> bytes:
    return np.asarray(image).tobytes()


def _key_lengths(engine: GenerationEngine, requests: list[RenderRequest]) -> tuple[list, list]:
    counter = KeyCounter(engine.pipeline.unet)
    try:
        images = engine.render_batch(requests)
    finally:
        counter.close()
    return images, counter.lengths


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_frames_attend_to_the_identity_and_the_identity_renders_as_alone(
    engines: dict[str, GenerationEngine], family: str
) -> None:
    engine = engines[family]
    plain, plain_keys = _key_lengths(engine, _group(False))
    shared, shared_keys = _key_lengths(engine, _group(True))
    token_counts = set(plain_keys)  # the layers' own token counts
    # Plain: every key projection sees exactly one image's tokens; shared: some calls see more.
    assert all(length in token_counts for length in plain_keys)
    crossing = [length for length in shared_keys if length not in token_counts]
    assert crossing, "no self-attention attended to another image's tokens"
    assert _pixels(shared[0]) == _pixels(plain[0])  # the identity shot is not touched
    for frame in (1, 2):
        assert _pixels(shared[frame]) != _pixels(plain[frame])
    # The same group again: the same bytes.
    again = engine.render_batch(_group(True))
    assert [_pixels(image) for image in again] == [_pixels(image) for image in shared]
    # Character masks come back with the images (mode L, image size).
    for image in shared:
        mask = image.info[CHARACTER_MASK_KEY]
        assert mask.mode == "L" and mask.size == image.size
    assert CHARACTER_MASK_KEY not in plain[0].info


def test_an_empty_mask_renders_the_plain_images(engines: dict[str, GenerationEngine]) -> None:
    engine = engines["sd15"]
    plain = engine.render_batch(_group(False))
    # A normalised map never exceeds 1: threshold 1 leaves the mask empty, nothing is shared.
    empty, keys = _key_lengths(engine, _group(True, threshold=1.0))
    assert [_pixels(image) for image in empty] == [_pixels(image) for image in plain]
    assert len(set(keys)) <= 2  # only the layers' own token counts (8x8 and 4x4 at 64 px)
    for image in empty:
        assert not np.asarray(image.info[CHARACTER_MASK_KEY]).any()


def test_sharing_the_background_shares_more_tokens(engines: dict[str, GenerationEngine]) -> None:
    engine = engines["sd15"]
    _, character_keys = _key_lengths(engine, _group(True))
    background, background_keys = _key_lengths(engine, _group(True, share_background=True))
    character_only = engine.render_batch(_group(True))
    assert sum(background_keys) > sum(character_keys)
    assert _pixels(background[1]) != _pixels(character_only[1])


def test_frames_attend_to_the_identity_tokens_row_for_row() -> None:
    """The processor on one attention layer: the identity call stores its tokens and runs as
    plain; a frame whose tokens equal the identity's gets its plain output back (attending to a
    copy of one's own tokens leaves softmax-weighted means unchanged); a frame with other tokens
    gets the attention over its own and the identity's tokens of the same row."""
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0

    torch.manual_seed(0)
    attn = Attention(query_dim=16, heads=2, dim_head=8).eval()
    state = SharedAttention(token_indices=[[1], [1]], latent_hw=(2, 3), share_background=True)
    processor = SharedSelfAttention(state, "layer", AttnProcessor2_0())
    identity, frame = torch.randn(2, 6, 16), torch.randn(2, 6, 16)
    with torch.no_grad():
        state.begin_image(0)
        plain_identity = AttnProcessor2_0()(attn, identity)
        assert torch.equal(processor(attn, identity), plain_identity)
        state.begin_image(1)
        assert torch.allclose(processor(attn, identity.clone()), plain_identity, atol=1e-6)
        expected = _attend_with(attn, frame, identity, None)
        assert torch.allclose(processor(attn, frame), expected)
        swapped = _attend_with(attn, frame, identity.flip(0), None)
        assert not torch.allclose(expected, swapped, atol=1e-4)  # rows are matched, not mixed
    assert state.attended == [0, 2 * 2 * 6]


def test_the_sidecar_records_the_group_and_bad_groups_fail(
    engines: dict[str, GenerationEngine],
) -> None:
    engine = engines["sd15"]
    requests = _group(True)
    record = engine.parameters(requests[1])["consistency"]
    assert record["identity"] == {"prompt": PROMPTS[0], "seed": SEEDS[0]}
    assert record["character"] == CHARACTER
    assert "identity" not in engine.parameters(requests[0])["consistency"]
    with pytest.raises(ValueError, match="first is the identity"):
        engine.render_batch(requests[1:])
    with pytest.raises(ValueError, match="first is the identity"):
        engine.render_batch([requests[0], _group(False)[1]])
    wrong = RenderRequest(
        prompt=PROMPTS[1],
        seed=SEEDS[1],
        consistency=Consistency(CHARACTER, identity_prompt=PROMPTS[2], identity_seed=SEEDS[0]),
        **RENDER,
    )
    with pytest.raises(ValueError, match="must name the batch's identity"):
        engine.render_batch([requests[0], wrong])


def test_a_group_of_one_renders_as_plain_with_its_mask(
    engines: dict[str, GenerationEngine],
) -> None:
    """A group of one (the identity alone) renders as plain and still returns its mask."""
    engine = engines["sd15"]
    alone = engine.render_batch(_group(True)[:1])
    assert _pixels(alone[0]) == _pixels(engine.render_batch(_group(False)[:1])[0])
    assert alone[0].info[CHARACTER_MASK_KEY].size == alone[0].size
