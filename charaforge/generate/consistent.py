"""Training-free consistent characters: shared self-attention across the images of a group.

CharaConsist's reading of a `background#character#action` group: the first image is the
identity shot, the others are frames of the same character. They are rendered in one sampling
loop; the identity shot renders as it would alone, and every frame's self-attention also attends
to the identity shot's tokens (its normalised hidden states through the frame's own key and value
projections, as StoryDiffusion's consistent self-attention does with sampled group tokens). Which
identity tokens are shared is decided by a foreground mask: the cross-attention of the prompt's
character span (the tokens of the `character` field), averaged over layers and heads, min-max
normalised and thresholded. Only character tokens are shared, so the frame keeps its own
background, and only the frame's own character queries (its mask from the previous step) look at
them; `share_background` shares every identity token with every query (the fixed-background mode).

Everything runs through diffusers attention processors installed on the UNet for one batch and
removed afterwards: the self-attention (`attn1`) processors share, the cross-attention (`attn2`)
ones record the maps, and both delegate to the processor that was there before (the default, or
an IP-Adapter's) whenever nothing is shared, so a frame with an empty mask is byte-identical to
its plain render. The images run one by one, identity first (`state.begin_image` is called by the
engine's per-image split before each), which is also what keeps the render deterministic.
"""

from __future__ import annotations

import contextlib
import math
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from charaforge.generate.request import Consistency

# image.info key under which the engine hands back each image's character mask ("L" image).
CHARACTER_MASK_KEY = "charaforge_character_mask"
OVERLAY_COLOUR = (255, 0, 0)
# A `blocks` choice's parts -> the prefix of their attention processors' names in a UNet.
BLOCK_PREFIXES = {"down": "down_blocks", "mid": "mid_block", "up": "up_blocks"}


def character_token_indices(tokenizer: Any, prompt: str, character: str) -> list[int]:
    """Positions of the character's tokens in the tokenized prompt (BOS is position 0)."""
    ids = tokenizer(prompt, truncation=True, max_length=tokenizer.model_max_length)["input_ids"]
    wanted = tokenizer(character, add_special_tokens=False)["input_ids"]
    for start in range(len(ids) - len(wanted) + 1):
        if ids[start : start + len(wanted)] == wanted:
            return list(range(start, start + len(wanted)))
    raise ValueError(f"consistency.character {character!r} is not part of the prompt {prompt!r}")


def layer_shape(tokens: int, latent_hw: tuple[int, int]) -> tuple[int, int]:
    """The (height, width) of a UNet layer with `tokens` spatial tokens (the latent halved by
    each down-sampling, rounding up as the UNet's padded convolutions do)."""
    height, width = latent_hw
    for _ in range(8):
        if height * width == tokens:
            return height, width
        height, width = math.ceil(height / 2), math.ceil(width / 2)
    raise ValueError(f"{tokens} tokens do not match a down-sampling of the latent {latent_hw}")


def normalise_map(total: torch.Tensor) -> torch.Tensor:
    """Min-max to [0, 1]; a flat map (no place stands out) becomes all zeros (empty mask)."""
    low, high = total.min(), total.max()
    if float(high - low) <= 1e-12:
        return torch.zeros_like(total)
    return (total - low) / (high - low)


def character_map(
    maps: Sequence[torch.Tensor], token_indices: Sequence[int], latent_hw: tuple[int, int]
) -> torch.Tensor:
    """The normalised character map at latent resolution from cross-attention probabilities.

    Each entry of `maps` is one layer's attention (heads, spatial tokens, text tokens) or
    (spatial tokens, text tokens); the character's columns are summed, heads averaged, every layer
    brought to the latent size (bilinear) and the layers averaged.
    """
    total = torch.zeros(latent_hw, dtype=torch.float32)
    for probs in maps:
        if probs.dim() == 3:
            probs = probs.float().mean(0)
        column = probs.float()[:, list(token_indices)].sum(-1)
        total += _to_latent(column, latent_hw)
    return normalise_map(total / max(len(maps), 1))


def _to_latent(column: torch.Tensor, latent_hw: tuple[int, int]) -> torch.Tensor:
    shape = layer_shape(column.numel(), latent_hw)
    grid = column.reshape(1, 1, *shape)
    if shape != latent_hw:
        grid = F.interpolate(grid, size=latent_hw, mode="bilinear", align_corners=False)
    return grid[0, 0]


def mask_at(map_: torch.Tensor, tokens: int, threshold: float) -> torch.Tensor:
    """The boolean mask (flattened) of a normalised map at the resolution of a layer."""
    shape = layer_shape(tokens, tuple(map_.shape))
    pooled = F.adaptive_avg_pool2d(map_[None, None], shape)[0, 0]
    return (pooled > threshold).flatten()


def mask_image(map_: torch.Tensor, threshold: float, size: tuple[int, int]) -> Image.Image:
    """The character mask as an "L" image of `size` (white = character)."""
    mask = (map_ > threshold).numpy().astype(np.uint8) * 255
    return Image.fromarray(mask, mode="L").resize(size, Image.Resampling.NEAREST)


def mask_overlay(image: Image.Image, mask: Image.Image, opacity: float = 0.5) -> Image.Image:
    """The image beside itself with the character region highlighted in red (CharaConsist's
    mask view), so a user sees where the shared attention applied."""
    base = image.convert("RGB")
    red = Image.new("RGB", base.size, OVERLAY_COLOUR)
    alpha = mask.convert("L").resize(base.size).point(lambda value: int(value * opacity))
    highlighted = Image.composite(red, base, alpha)
    sheet = Image.new("RGB", (base.width * 2, base.height), "white")
    sheet.paste(base, (0, 0))
    sheet.paste(highlighted, (base.width, 0))
    return sheet


@dataclass
class SharedAttention:
    """The state of one consistent batch: which image runs, the identity's tokens, the maps.

    `token_indices[k]` are image k's character tokens; `latent_hw` the latent size; `attended`
    counts, per image, the identity tokens its self-attention saw (summed over layers, rows and
    steps): the evidence that sharing happened.
    """

    token_indices: list[list[int]]
    latent_hw: tuple[int, int]
    share_background: bool = False
    mask_threshold: float = 0.5
    group_tokens: float = 0.0
    strength: float = 1.0
    blocks: str = "all"
    window: tuple[float, float] = (0.0, 1.0)
    steps: int = 1
    seed: int = 0
    current: int = -1
    step: int = -1  # the sampling step now running (counted at the identity shot's calls)
    # (layer, image) -> that image's normalised hidden states at the layer, this step.
    bank: dict[tuple[str, int], torch.Tensor] = field(default_factory=dict)
    maps: list[list[torch.Tensor]] = field(default_factory=list)
    latest: list[torch.Tensor | None] = field(default_factory=list)
    attended: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        count = len(self.token_indices)
        self.maps = [[] for _ in range(count)]
        self.latest = [None] * count
        self.attended = [0] * count

    @property
    def count(self) -> int:
        return len(self.token_indices)

    def begin_image(self, index: int) -> None:
        """Called before image `index`'s UNet call: the image that just ran has complete maps."""
        self._finish_current()
        self.current = index
        if index == 0:
            self.step += 1

    def finish(self) -> None:
        self._finish_current()

    def _finish_current(self) -> None:
        if 0 <= self.current < self.count and self.maps[self.current]:
            # Cross-attention probabilities are only kept for one call, then folded to a map.
            self.latest[self.current] = character_map(
                self.maps[self.current], self.token_indices[self.current], self.latent_hw
            )
            self.maps[self.current] = []

    def character_masks(self, size: tuple[int, int]) -> list[Image.Image | None]:
        return [
            None if map_ is None else mask_image(map_, self.mask_threshold, size)
            for map_ in self.latest
        ]

    def sharing_at(self, name: str) -> bool:
        """Whether the layer `name` shares at the step now running (blocks and window)."""
        if self.blocks != "all" and not name.startswith(
            tuple(BLOCK_PREFIXES[part] for part in self.blocks.split("+"))
        ):
            return False
        start, end = self.window
        position = max(self.step, 0)
        return start * self.steps <= position < end * self.steps

    def shared_for(self, tokens: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """For the current frame at a layer of `tokens` tokens: the identity token indices to
        share (None: none) and which of the frame's queries may see them (None: all)."""
        shared = self.source_tokens(0, tokens)
        if shared is None:
            return None, None
        if self.share_background:
            return shared, None
        own = self.latest[self.current]
        # Before the frame's own first map exists (its first step), every query may look.
        allowed = None if own is None else mask_at(own, tokens, self.mask_threshold)
        if allowed is not None and not bool(allowed.any()):
            return None, None
        return shared, allowed

    def source_tokens(self, image: int, tokens: int) -> torch.Tensor | None:
        """The token indices image `image` offers to share: all (fixed background) or its
        character mask's; None when there are none."""
        if self.share_background:
            return torch.arange(tokens)
        map_ = self.latest[image]
        if map_ is None:
            return None
        shared = mask_at(map_, tokens, self.mask_threshold).nonzero().flatten()
        return shared if shared.numel() else None

    def group_samples(self, name: str, tokens: int) -> list[tuple[int, torch.Tensor]]:
        """StoryDiffusion's sampled group tokens for the current frame at layer `name`: a
        `group_tokens` share of each earlier frame's offered tokens, drawn by a generator seeded
        from (seed, layer, frame, source, step), so a render is reproducible."""
        if self.group_tokens <= 0.0:
            return []
        samples = []
        for source in range(1, self.current):
            offered = self.source_tokens(source, tokens)
            if offered is None or (name, source) not in self.bank:
                continue
            count = round(self.group_tokens * offered.numel())
            if count == 0:
                continue
            key = f"{self.seed}|{name}|{self.current}|{source}|{self.step}".encode()
            generator = torch.Generator().manual_seed(zlib.crc32(key))
            chosen = torch.randperm(offered.numel(), generator=generator)[:count]
            samples.append((source, offered[chosen.sort().values]))
        return samples


class SharedSelfAttention:
    """attn1: the identity image stores its tokens; a frame also attends to the shared ones."""

    def __init__(self, state: SharedAttention, name: str, original: Any) -> None:
        self.state, self.name, self.original = state, name, original

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        state = self.state
        plain = (hidden_states, encoder_hidden_states, attention_mask, temb)
        if state.current == 0 or (state.group_tokens > 0 and state.current > 0):
            # Only the identity's tokens are needed, unless later frames sample earlier ones.
            state.bank[(self.name, state.current)] = hidden_states
        if state.current == 0:
            return self.original(attn, *plain, **kwargs)
        identity = state.bank.get((self.name, 0))
        usable = (
            identity is not None
            and hidden_states.dim() == 3
            and encoder_hidden_states is None
            and attention_mask is None
            and attn.spatial_norm is None
            and attn.group_norm is None
            and identity.shape == hidden_states.shape
            and state.sharing_at(self.name)
        )
        tokens = hidden_states.shape[1]
        shared, allowed = state.shared_for(tokens) if usable else (None, None)
        if shared is None:
            return self.original(attn, *plain, **kwargs)
        extras = [identity[:, shared]]
        extras += [
            state.bank[(self.name, j)][:, picked]
            for j, picked in state.group_samples(self.name, tokens)
        ]
        extra = torch.cat(extras, dim=1)
        state.attended[state.current] += int(extra.shape[1]) * hidden_states.shape[0]
        return _attend_with(attn, hidden_states, extra, allowed, state.strength)


def _attend_with(
    attn: Any,
    hidden_states: torch.Tensor,
    extra: torch.Tensor,
    allowed: torch.Tensor | None,
    strength: float = 1.0,
) -> torch.Tensor:
    """AttnProcessor2_0's computation with `extra` tokens appended to the keys and values;
    `allowed` (per query) says which queries may attend to them, `strength` weighs them (a
    log(strength) bias on their logits: the softmax weight of each shared token times strength)."""
    rows, length, _ = hidden_states.shape
    residual = hidden_states
    context = torch.cat([hidden_states, extra], dim=1)
    query, key, value = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
    head_dim = key.shape[-1] // attn.heads
    query = query.view(rows, -1, attn.heads, head_dim).transpose(1, 2)
    key = key.view(rows, -1, attn.heads, head_dim).transpose(1, 2)
    value = value.view(rows, -1, attn.heads, head_dim).transpose(1, 2)
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    mask = None
    if allowed is not None:
        own = torch.ones(length, length, dtype=torch.bool, device=query.device)
        outside = allowed.to(query.device)[:, None].expand(length, extra.shape[1])
        mask = torch.cat([own, outside], dim=1)[None, None]
    if strength != 1.0:
        # A float mask: 0 on the frame's own keys, log(strength) on the shared ones it may see.
        bias = torch.zeros(length, length + extra.shape[1], dtype=query.dtype, device=query.device)
        bias[:, length:] = math.log(strength)
        if mask is not None:
            bias = bias.masked_fill(~mask[0, 0], float("-inf"))
        mask = bias[None, None]
    output = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=0.0)
    output = output.transpose(1, 2).reshape(rows, -1, attn.heads * head_dim).to(query.dtype)
    output = attn.to_out[1](attn.to_out[0](output))
    if attn.residual_connection:
        output = output + residual
    return output / attn.rescale_output_factor


class CharacterMapRecorder:
    """attn2: runs the original cross-attention and records the character's attention map."""

    def __init__(self, state: SharedAttention, original: Any) -> None:
        self.state, self.original = state, original

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: Any = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        output = self.original(
            attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs
        )
        state = self.state
        text = encoder_hidden_states
        if isinstance(text, (tuple, list)):  # an IP-Adapter passes (text, image tokens)
            text = text[0]
        if 0 <= state.current < state.count and text is not None and hidden_states.dim() == 3:
            # The last row is the prompt's (the unconditional row comes first under CFG).
            row, context = hidden_states[-1:], text[-1:]
            if attn.norm_cross:
                context = attn.norm_encoder_hidden_states(context)
            query = attn.head_to_batch_dim(attn.to_q(row))
            key = attn.head_to_batch_dim(attn.to_k(context))
            state.maps[state.current].append(attn.get_attention_scores(query, key, None))
        return output


def group_state(
    tokenizer: Any,
    requests: Sequence[tuple[str, int, Consistency | None]],
    prompts: Sequence[str],
    latent_hw: tuple[int, int],
    steps: int = 1,
) -> SharedAttention | None:
    """The state of a batch given as (prompt, seed, consistency) per request, `prompts` the
    final prompts (triggers added): None for a plain batch; the first request must be the
    identity shot and every other one a frame naming it (its prompt and seed)."""
    parts = [part for _, _, part in requests]
    if all(part is None for part in parts):
        return None
    if any(part is None for part in parts) or not parts[0].is_identity:
        raise ValueError(
            "a consistent batch: every request has `consistency`, the first is the identity "
            "shot (no identity_prompt)"
        )
    identity = (requests[0][0], requests[0][1])
    for prompt, _, part in requests[1:]:
        if part.is_identity or (part.identity_prompt, part.identity_seed) != identity:
            raise ValueError(
                f"consistency of {prompt!r}: a frame must name the batch's identity shot (its "
                "prompt and seed)"
            )
        if part.settings() != parts[0].settings():
            raise ValueError(
                "a consistent batch shares its consistency options (all but the "
                "character and the identity)"
            )
    return SharedAttention(
        token_indices=[
            character_token_indices(tokenizer, prompt, part.character)
            for prompt, part in zip(prompts, parts, strict=True)
        ],
        latent_hw=latent_hw,
        share_background=parts[0].share_background,
        mask_threshold=parts[0].mask_threshold,
        group_tokens=parts[0].group_tokens,
        strength=parts[0].strength,
        blocks=parts[0].blocks,
        window=(float(parts[0].window[0]), float(parts[0].window[1])),
        steps=steps,
        seed=int(requests[0][1]),
    )


@contextlib.contextmanager
def shared_attention(unet: Any, state: SharedAttention) -> Iterator[SharedAttention]:
    """Install the sharing processors on every transformer block of the UNet for one batch."""
    originals = dict(unet.attn_processors)
    installed: dict[str, Any] = {}
    for name, processor in originals.items():
        if name.endswith("attn1.processor"):
            installed[name] = SharedSelfAttention(state, name, processor)
        elif name.endswith("attn2.processor"):
            installed[name] = CharacterMapRecorder(state, processor)
        else:
            installed[name] = processor
    unet.set_attn_processor(installed)
    try:
        yield state
    finally:
        state.finish()
        state.bank.clear()
        unet.set_attn_processor(originals)
