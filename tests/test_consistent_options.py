"""Shared-attention options: StoryDiffusion's sampled group tokens, the strength of the shared
tokens (against a hand-written weighted softmax), sharing in the up blocks only and over a
window of the steps; on one attention layer and on the SD1.5 stand-in."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from engine_fixtures import one_thread  # noqa: F401  (a fixture: pytest finds it by name)

from charaforge.config import ModelConfig
from charaforge.generate.consistent import SharedAttention, SharedSelfAttention, _attend_with
from charaforge.generate.engine import GenerationEngine
from charaforge.generate.request import Consistency, RenderRequest
from charaforge.models.base import write_base

pytestmark = pytest.mark.usefixtures("one_thread")

CHARACTER = "aoi_cf, 1girl, red hair"
PROMPTS = [
    f"{CHARACTER}, standing, white studio",
    f"{CHARACTER}, waving, forest clearing",
    f"{CHARACTER}, sitting, city street",
]
SEEDS = [11, 12, 13]
RENDER = {"steps": 2, "guidance_scale": 5.0}


def _attention() -> torch.nn.Module:
    from diffusers.models.attention_processor import Attention

    torch.manual_seed(0)
    return Attention(query_dim=16, heads=2, dim_head=8).eval()


def test_strength_multiplies_the_softmax_weight_of_each_shared_token() -> None:
    attn = _attention()
    hidden, extra = torch.randn(2, 6, 16), torch.randn(2, 3, 16)
    allowed = torch.tensor([True, False, True, True, False, True])
    strength = 3.0
    with torch.no_grad():
        got = _attend_with(attn, hidden, extra, allowed, strength)
        expected = torch.empty_like(got)
        for row in range(2):
            q = hidden[row] @ attn.to_q.weight.T
            k_all = torch.cat([hidden[row], extra[row]]) @ attn.to_k.weight.T
            v_all = torch.cat([hidden[row], extra[row]]) @ attn.to_v.weight.T
            heads = []
            for head in range(2):
                part = slice(8 * head, 8 * head + 8)
                weights = torch.exp(q[:, part] @ k_all[:, part].T / np.sqrt(8))
                weights[:, 6:] *= strength  # each shared token counts `strength` times
                weights[~allowed, 6:] = 0.0
                weights = weights / weights.sum(-1, keepdim=True)
                heads.append(weights @ v_all[:, part])
            expected[row] = torch.cat(heads, -1) @ attn.to_out[0].weight.T + attn.to_out[0].bias
        plain_strength = _attend_with(attn, hidden, extra, allowed)
    assert torch.allclose(got, expected, atol=1e-5)
    assert not torch.allclose(got, plain_strength, atol=1e-4)


def _run_layer(group_tokens: float, images: list[torch.Tensor], steps: int = 1) -> tuple:
    """Every image through one processor (share_background: every token is offered)."""
    attn = _attention()
    from diffusers.models.attention_processor import AttnProcessor2_0

    state = SharedAttention(
        token_indices=[[1]] * len(images),
        latent_hw=(2, 3),
        share_background=True,
        group_tokens=group_tokens,
        steps=steps,
    )
    processor = SharedSelfAttention(state, "up_blocks.0.attn1", AttnProcessor2_0())
    outputs = []
    with torch.no_grad():
        for _ in range(steps):
            outputs = []
            for index, image in enumerate(images):
                state.begin_image(index)
                outputs.append(processor(attn, image))
    return attn, state, outputs


def test_group_tokens_add_sampled_tokens_of_the_earlier_frames() -> None:
    torch.manual_seed(1)
    images = [torch.randn(2, 6, 16) for _ in range(3)]
    attn, state, whole = _run_layer(1.0, images)
    with torch.no_grad():
        # Every token of frame 1 sampled: frame 2 attends to the identity's and frame 1's.
        expected = _attend_with(attn, images[2], torch.cat([images[0], images[1]], dim=1), None)
        identity_only = _attend_with(attn, images[2], images[0], None)
    assert torch.allclose(whole[2], expected, atol=1e-6)
    assert torch.allclose(whole[1], _attend_with(attn, images[1], images[0], None), atol=1e-6)
    assert state.attended == [0, 2 * 6, 2 * (6 + 6)]
    _, half_state, half = _run_layer(0.5, images)
    assert half_state.attended == [0, 2 * 6, 2 * (6 + 3)]  # half of frame 1's six tokens
    assert not torch.allclose(half[2], identity_only, atol=1e-5)
    assert not torch.allclose(half[2], expected, atol=1e-5)
    _, _, none = _run_layer(0.0, images)
    assert torch.allclose(none[2], identity_only, atol=1e-6)
    # Reproducible, and drawn afresh per step.
    _, _, again = _run_layer(0.5, images)
    assert torch.equal(again[2], half[2])
    drawn = []
    for step in range(6):
        half_state.step = step
        drawn.append(tuple(half_state.group_samples("up_blocks.0.attn1", 6)[0][1].tolist()))
    assert len(set(drawn)) > 1 and all(len(sample) == 3 for sample in drawn)


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> GenerationEngine:
    root = tmp_path_factory.mktemp("consistent_options")
    write_base(ModelConfig(family="sd15", source="stand_in", resolution=64), root / "sd15")
    return GenerationEngine(root / "sd15")


def _group(**options: object) -> list[RenderRequest]:
    requests = []
    for position, (prompt, seed) in enumerate(zip(PROMPTS, SEEDS, strict=True)):
        consistency = Consistency(
            CHARACTER,
            identity_prompt=None if position == 0 else PROMPTS[0],
            identity_seed=None if position == 0 else SEEDS[0],
            share_background=True,  # every token offered: the stand-in's maps are arbitrary
            **options,
        )
        requests.append(RenderRequest(prompt=prompt, seed=seed, consistency=consistency, **RENDER))
    return requests


class NamedKeyCounter:
    """Forward hooks on the self-attention key projections: (layer name, key length) per call."""

    def __init__(self, unet: torch.nn.Module) -> None:
        self.calls: list[tuple[str, int]] = []
        self.handles = [
            module.to_k.register_forward_hook(self._hook(name))
            for name, module in unet.named_modules()
            if name.endswith("attn1")
        ]

    def _hook(self, name: str):
        def hook(module: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            self.calls.append((name, inputs[0].shape[1]))

        return hook

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


def _render(engine: GenerationEngine, requests: list[RenderRequest]) -> tuple[list, list]:
    counter = NamedKeyCounter(engine.pipeline.unet)
    try:
        images = engine.render_batch(requests)
    finally:
        counter.close()
    return [np.asarray(image).tobytes() for image in images], counter.calls


def _crossing(calls: list[tuple[str, int]]) -> list[tuple[str, int]]:
    # The first UNet call is the identity shot's first step: its layers' own token counts.
    layers = len({name for name, _ in calls})
    own = {length for _, length in calls[:layers]}
    return [(name, length) for name, length in calls if length not in own]


def test_group_tokens_blocks_and_window_on_a_rendered_group(engine: GenerationEngine) -> None:
    base, base_calls = _render(engine, _group())
    group, group_calls = _render(engine, _group(group_tokens=0.5))
    # Frame 1 has no earlier frame: its bytes are the identity-only render's.
    assert group[:2] == base[:2]
    assert group[2] != base[2]
    assert sum(n for _, n in group_calls) > sum(n for _, n in base_calls)
    assert engine.parameters(_group(group_tokens=0.5)[1])["consistency"]["group_tokens"] == 0.5
    assert "group_tokens" not in engine.parameters(_group()[1])["consistency"]

    up, up_calls = _render(engine, _group(blocks="up"))
    crossing_all, crossing_up = _crossing(base_calls), _crossing(up_calls)
    assert crossing_up and all(name.startswith("up_blocks") for name, _ in crossing_up)
    assert any(not name.startswith("up_blocks") for name, _ in crossing_all)
    assert up[1] != base[1]

    early, early_calls = _render(engine, _group(window=(0.0, 0.5)))
    # Half of the 2 steps share: half the crossing calls.
    assert len(_crossing(early_calls)) * 2 == len(crossing_all)
    assert early[1] != base[1]

    strong, _ = _render(engine, _group(strength=4.0))
    assert strong[0] == base[0] and strong[1] != base[1]


@pytest.mark.parametrize(
    ("blocks", "prefixes"),
    [
        ("mid", ("mid_block",)),
        ("down", ("down_blocks",)),
        ("down+mid", ("down_blocks", "mid_block")),
    ],
)
def test_sharing_in_chosen_blocks_only(
    engine: GenerationEngine, blocks: str, prefixes: tuple[str, ...]
) -> None:
    _, base_calls = _render(engine, _group())
    images, calls = _render(engine, _group(blocks=blocks))
    crossing = _crossing(calls)
    # Only the chosen blocks' self-attention sees identity tokens, and each of them does.
    assert {name.split(".")[0] for name, _ in crossing} == set(prefixes)
    assert {name.split(".")[0] for name, _ in _crossing(base_calls)} == {
        "down_blocks",
        "mid_block",
        "up_blocks",
    }
    assert images[1] != _render(engine, _group(blocks="up"))[0][1]
    with pytest.raises(ValueError, match="consistency.blocks must be one of"):
        Consistency(CHARACTER, blocks="middle")  # type: ignore[arg-type]
