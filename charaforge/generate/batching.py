"""Batching that keeps every image's bytes: per-image rows through the UNet/VAE, and timers.

CPU kernels pick different blockings for different batch sizes, so the engine's `exact` mode
calls the UNet, the ControlNet and the VAE decoder once per image (its unconditional and
conditional rows) inside one sampling loop; these wrappers split and re-join those rows.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import torch


@dataclass
class RenderTimer:
    """Seconds spent inside the UNet (and ControlNet) and the VAE, filled by the engine's hooks;
    the rest of a render is text encoding, scheduling, image conversion and Python."""

    unet: float = 0.0
    vae: float = 0.0
    calls: dict[str, int] = field(default_factory=dict)


@contextlib.contextmanager
def text_model_shim(text_encoder: Any) -> Iterator[None]:
    """diffusers' SD clip skip reads `text_encoder.text_model.final_layer_norm`; transformers 5
    flattened CLIPTextModel (no `text_model`), so point the old path at the same module."""
    if text_encoder is None or hasattr(text_encoder, "text_model"):
        yield
        return

    object.__setattr__(
        text_encoder, "text_model", SimpleNamespace(final_layer_norm=text_encoder.final_layer_norm)
    )
    try:
        yield
    finally:
        object.__delattr__(text_encoder, "text_model")


def _rows(value: Any, index: torch.Tensor, size: int) -> Any:
    if torch.is_tensor(value) and value.dim() > 0 and value.shape[0] == size:
        return value.index_select(0, index.to(value.device))
    if isinstance(value, (list, tuple)):
        return type(value)(_rows(item, index, size) for item in value)
    if isinstance(value, dict):
        return {key: _rows(item, index, size) for key, item in value.items()}
    return value


def _join(parts: list[Any], order: torch.Tensor) -> Any:
    first = parts[0]
    if torch.is_tensor(first):
        return torch.cat(parts).index_select(0, order.to(first.device))
    if isinstance(first, (list, tuple)):
        joined = [_join([part[i] for part in parts], order) for i in range(len(first))]
        return type(first)(joined) if isinstance(first, list) else tuple(joined)
    if hasattr(first, "sample"):  # a diffusers output object
        return type(first)(sample=_join([part.sample for part in parts], order))
    return first


def split_rows(
    function: Any,
    groups: list[list[int]],
    size: int,
    before_group: Callable[[int], None] | None = None,
) -> Any:
    """Call `function` once per group of batch rows (an image's unconditional and conditional
    rows) and put the results back in batch order; other batch sizes pass straight through.

    `before_group(k)` runs before group k's call (consistent attention follows the image).
    """
    indices = [torch.tensor(group) for group in groups]
    order = torch.argsort(torch.cat(indices))

    def call(*args: Any, **kwargs: Any) -> Any:
        sample = args[0] if args else next(iter(kwargs.values()))
        if not torch.is_tensor(sample) or sample.shape[0] != size:
            return function(*args, **kwargs)
        parts = []
        for position, index in enumerate(indices):
            if before_group is not None:
                before_group(position)
            parts.append(function(*_rows(args, index, size), **_rows(kwargs, index, size)))
        return _join(parts, order)

    return call


def step_end_callback(callback: Callable[[int, int], None]) -> Callable[..., dict]:
    """A diffusers `callback_on_step_end` that reports (step done, steps) to `callback`."""

    def on_step_end(pipeline: Any, step: int, timestep: Any, tensors: dict) -> dict:
        callback(step + 1, int(pipeline.num_timesteps))
        return tensors

    return on_step_end


def timed(function: Any, timer: RenderTimer | None, label: str) -> Any:
    if timer is None:
        return function

    def call(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            setattr(timer, label, getattr(timer, label) + time.perf_counter() - started)
            timer.calls[label] = timer.calls.get(label, 0) + 1

    return call


@contextlib.contextmanager
def per_image(
    pipeline: Any,
    count: int,
    do_cfg: bool,
    exact: bool,
    timer: RenderTimer | None,
    state: Any = None,
) -> Iterator[None]:
    """In exact mode, run the UNet, ControlNet and VAE decoder one image at a time; always
    time them (the benchmark's share of time outside UNet and VAE). A consistent group (`state`,
    consistent.SharedAttention) always runs image by image, identity first, telling the shared
    attention which image runs."""
    exact = exact or state is not None
    groups = [[k, count + k] if do_cfg else [k] for k in range(count)]
    patched = [
        (pipeline.unet, "forward", "unet"),
        (pipeline.vae, "decode", "vae"),
    ]
    if getattr(pipeline, "controlnet", None) is not None:
        patched.append((pipeline.controlnet, "forward", "unet"))
    originals = []
    for module, method, label in patched:
        original = module.__dict__.get(method)
        bound = getattr(module, method)
        groups_here = groups if label == "unet" else [[k] for k in range(count)]
        size = count * (2 if do_cfg and label == "unet" else 1)
        follow = state.begin_image if state is not None and module is pipeline.unet else None
        split = exact and (count > 1 or follow is not None)
        wrapped = timed(
            split_rows(bound, groups_here, size, follow) if split else bound, timer, label
        )
        setattr(module, method, wrapped)
        originals.append((module, method, original))
    try:
        yield
    finally:
        for module, method, original in originals:
            if original is None:
                delattr(module, method)
            else:
                setattr(module, method, original)
