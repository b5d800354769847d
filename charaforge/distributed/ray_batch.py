"""Batch jobs on Ray: with `RayBatchRows` given to the server (`charaforge serve
--batch-ray-workers N`; `create_app(settings, batch_rows=...)`), the rows of an HTTP batch job are
rendered by kept Ray engine actors (the same pool as the sweep's, distributed/engine_pool.py)
instead of the server's device queue, one row in flight per actor, so N actors (one per GPU of
the cluster) work through a job at once while the server's own devices stay free for the
interactive routes.

The server still plans every row (LoRA names resolved against its registry) and writes every
file itself, atomically, before the row is committed in SQLite; an actor only renders. A row
whose actor dies is retried by Ray (`ray.max_retries`) and then counts as a failed attempt like
any other error, so the job's resume and retry rules are those of the local queue. Rows are
seeded: the bytes are those of the local queue.
"""

from __future__ import annotations

import logging
import queue
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from charaforge.config.resources import RayConfig
from charaforge.distributed.engine_pool import EngineActor, kept_pool
from charaforge.generate.request import RenderRequest
from charaforge.serve.registry import RegisteredLora
from charaforge.serve.worker import Worker

log = logging.getLogger(__name__)


class BatchEngineActor(EngineActor):
    """An engine actor that also renders batch rows, with the server's on-demand LoRA cache."""

    def __init__(self, cwd: str, base_dir: str, engine_options: dict[str, Any]) -> None:
        super().__init__(cwd, base_dir, engine_options)
        self.loras = Worker(self.engine, queue.Queue())  # its LoRA bookkeeping; no thread

    def render_requests(
        self, requests: list[RenderRequest], entries: dict[str, RegisteredLora]
    ) -> list[Image.Image]:
        self.loras.ensure_loaded(entries)
        images = self.engine.render_batch(requests)
        self.images += len(images)
        return images


RowPlan = tuple[list[RenderRequest], dict[str, RegisteredLora]]


@dataclass
class RayBatchRows:
    """Renders a batch job's rows on `workers` kept actors (serve.batch.RemoteRows)."""

    config: RayConfig
    workers: int
    base_dir: str | Path
    engine_options: dict[str, Any]

    def __call__(
        self,
        rows: list[tuple[int, Any, int]],
        plan_row: Callable[[Any], RowPlan],
        on_done: Callable[[int, Image.Image], None],
        on_error: Callable[[int, Exception, int], None],
        keep_going: Callable[[], bool],
    ) -> None:
        """Render `rows` ((idx, row, attempts), in order), at most one row per actor in
        flight. `plan_row` builds a row's requests (its errors go to `on_error`), `on_done(idx,
        image)` writes and commits a row, `keep_going()` stops handing out rows (cancel,
        shutdown); rows in flight then still finish."""
        import ray

        pool = kept_pool(self.config, self.base_dir, self.engine_options, BatchEngineActor)
        actors, _ = pool.ready(self.workers)
        idle = list(actors)
        in_flight: dict[Any, tuple[int, int, Any]] = {}  # ref: (idx, attempts, actor)
        todo = list(rows)
        while todo or in_flight:
            while todo and idle and keep_going():
                idx, row, attempts = todo.pop(0)
                try:
                    requests, entries = plan_row(row)
                except Exception as error:  # a bad row: recorded, the job goes on
                    on_error(idx, error, attempts)
                    continue
                actor = idle.pop(0)
                ref = actor.render_requests.remote(requests, entries)
                in_flight[ref] = (idx, attempts, actor)
            if not in_flight:
                break
            [ref], _ = ray.wait(list(in_flight), num_returns=1)
            idx, attempts, actor = in_flight.pop(ref)
            idle.append(actor)
            try:
                image = ray.get(ref)[0]
            except Exception as error:  # the actor's error (or its death after the retries)
                cause = getattr(error, "cause", None)
                on_error(idx, cause if isinstance(cause, Exception) else error, attempts)
                continue
            on_done(idx, image)
