"""The kept actor pools of this process, by configuration (engine_pool.py makes them). Apart
from engine_pool so that whatever must free the pools' CPUs and GPUs (the candidate grid) can
do so without importing the generation engine."""

from __future__ import annotations

from typing import Any

KEPT: dict[tuple, Any] = {}  # key: a pool with `shutdown()`


def release_pools() -> None:
    """Stop every kept actor of this process (their CPUs and GPUs go back to Ray)."""
    for pool in KEPT.values():
        pool.shutdown()
    KEPT.clear()
