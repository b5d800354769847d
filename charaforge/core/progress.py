"""One progress bar style for the per-image loops of the data stages."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm.auto import tqdm

Item = TypeVar("Item")
# Fewer items than this finish before a bar is worth reading (and tests stay quiet).
PROGRESS_MIN = 16


def progress(items: Iterable[Item], total: int, desc: str) -> Iterator[Item]:
    """`items` with a tqdm bar on stderr (`desc`, images per second) when there are many."""
    yield from tqdm(items, total=total, desc=desc, unit="img", disable=total < PROGRESS_MIN)
