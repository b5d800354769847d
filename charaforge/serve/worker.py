"""The one device queue every route shares (own API, /api/v1, /sdapi/v1, batch jobs, web UI).

One worker thread per device owns one GenerationEngine (the base loaded once, LoRAs swapped in
place); jobs wait in one bounded queue and are refused (429) when it is full, so a burst never
piles up unbounded work. A job names the LoRAs it needs; the worker loads those it does not hold
yet (on-demand, at most MAX_ON_DEMAND kept beside the pinned ones). Every sampling step reports
progress and checks the job's cancel flag and its time limit, so a cancelled or overlong render
stops within one step instead of holding the worker.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from charaforge.generate.engine import GenerationEngine
from charaforge.generate.request import RenderRequest
from charaforge.serve.limits import ServerSettings
from charaforge.serve.registry import LoraNotFound, LoraRegistry, RegisteredLora

log = logging.getLogger(__name__)

MAX_ON_DEMAND = 8  # LoRAs loaded by a prompt or request and kept for the next one


class RenderCancelled(Exception):
    """The job was cancelled (by its client, a batch cancel, or its time limit)."""


class QueueFull(Exception):
    """No room in the device queue (429)."""


@dataclass
class Job:
    requests: list[RenderRequest]
    loras: dict[str, RegisteredLora]
    label: str = "txt2img"
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)
    cancel_event: threading.Event = field(default_factory=threading.Event)
    timeout_s: float | None = None
    step: int = 0
    steps: int = 0
    started: float | None = None
    reason: str = ""
    # Work other than one render_batch of `requests` (a background replacement...), run on the
    # worker's engine with its lock held like any render.
    work: Callable[[GenerationEngine], list[Image.Image]] | None = None

    def cancel(self, reason: str = "cancelled") -> None:
        self.reason = reason
        self.cancel_event.set()
        self.future.cancel()  # a job still queued never starts

    def on_step(self, done: int, total: int) -> None:
        self.step, self.steps = done, total
        if self.cancel_event.is_set():
            raise RenderCancelled(self.reason or "cancelled")
        if (
            self.timeout_s is not None
            and self.started is not None
            and time.monotonic() - self.started > self.timeout_s
        ):
            raise RenderCancelled(f"the render ran over the server's {self.timeout_s:g} s limit")


class Worker:
    """One device: one engine, one thread, jobs from the shared queue."""

    def __init__(
        self, engine: GenerationEngine, jobs: queue.Queue, cpu_threads: int | None = None
    ) -> None:
        self.engine = engine
        self.cpu_threads = cpu_threads
        self.lock = threading.Lock()  # held while rendering and while (un)loading LoRAs
        self.jobs = jobs
        self.running = 0  # jobs taken off the queue and not finished (0 or 1)
        self.current: Job | None = None
        self.pinned: set[str] = set()  # loaded through /loras/load: never evicted
        self._used: dict[str, int] = {}
        self._clock = 0
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        if self.cpu_threads is not None:
            import torch

            torch.set_num_threads(self.cpu_threads)  # OpenMP settings are per thread
        while True:
            job = self.jobs.get()
            if job is None:
                return
            if not job.future.set_running_or_notify_cancel():
                continue
            self.running += 1
            try:
                with self.lock:
                    self.current, job.started = job, time.monotonic()
                    self.ensure_loaded(job.loras)
                    self.engine.step_callback = job.on_step
                    try:
                        if job.work is not None:
                            images = job.work(self.engine)
                        else:
                            images = self.engine.render_batch(job.requests)
                    finally:
                        self.engine.step_callback = None
                        self.current = None
                job.future.set_result(images)
            except Exception as error:  # handed to the request that caused it
                job.future.set_exception(error)
            finally:
                self.running -= 1

    def ensure_loaded(self, entries: Mapping[str, RegisteredLora], pin: bool = False) -> None:
        """Load what `entries` name and the engine lacks (or holds from another file); evict
        the least recently used on-demand LoRAs beyond MAX_ON_DEMAND. Call with `lock` held."""
        for name, entry in entries.items():
            loaded = self.engine.loras.get(name)
            if loaded is None or loaded.file != entry.file:
                self.engine.load_lora(name, entry.file, entry.trigger_words)
            self._clock += 1
            self._used[name] = self._clock
            if pin:
                self.pinned.add(name)
        evictable = sorted(
            (self._used.get(name, 0), name)
            for name in self.engine.loras
            if name not in self.pinned and name not in entries
        )
        while len(evictable) > MAX_ON_DEMAND:
            _, name = evictable.pop(0)
            self.engine.unload_lora(name)
            self._used.pop(name, None)

    def unload(self, name: str) -> None:
        """Call with `lock` held."""
        self.pinned.discard(name)
        self._used.pop(name, None)
        self.engine.unload_lora(name)


class Service:
    """The engines, their queue and the LoRA registry, shared by every route."""

    def __init__(
        self,
        settings: ServerSettings,
        engine_factory: Callable[[str], GenerationEngine] | None = None,
    ) -> None:
        self.settings = settings
        self.registry = LoraRegistry(settings.lora_dir, settings.train_dir, settings.reports_dir)
        self.jobs: queue.Queue = queue.Queue(maxsize=settings.queue_size)
        factory = engine_factory or (
            lambda device: GenerationEngine(
                settings.base_dir,
                scheduler=settings.scheduler,
                device=device,
                memory=settings.memory,
            )
        )
        self.workers = [
            Worker(factory(device), self.jobs, settings.cpu_threads) for device in settings.devices
        ]
        for worker in self.workers:
            worker.thread.start()
        self.loras_lock = threading.Lock()
        self.started = time.time()

    @property
    def engine(self) -> GenerationEngine:
        return self.workers[0].engine

    def resolve_loras(
        self, requested: Mapping[str, float | None]
    ) -> tuple[dict[str, float], dict[str, RegisteredLora]]:
        """Names (aliases included) -> (canonical name: scale, canonical name: entry); a scale
        of None takes the LoRA's default scale. LoraNotFound names the unknown LoRA."""
        scales: dict[str, float] = {}
        entries: dict[str, RegisteredLora] = {}
        if requested:
            self.registry.reload()
        for name, scale in requested.items():
            try:
                entry = self.registry.get(name)
            except LoraNotFound:
                known = self.registry.names()
                shown = ", ".join(known[:20]) + (", ..." if len(known) > 20 else "")
                raise LoraNotFound(
                    f"unknown LoRA {name[:80]!r} (known: {shown or 'none'})"
                ) from None
            if entry.name in scales:
                raise ValueError(f"LoRA {entry.name!r} is named twice (an alias and its name)")
            scales[entry.name] = entry.default_scale if scale is None else float(scale)
            entries[entry.name] = entry
        return scales, entries

    def submit(
        self,
        requests: Sequence[RenderRequest],
        entries: Mapping[str, RegisteredLora],
        label: str = "txt2img",
        block: bool = False,
        work: Callable[[GenerationEngine], list[Image.Image]] | None = None,
    ) -> Job:
        """Queue one job; QueueFull when there is no room (unless `block`). `work`, when
        given, runs instead of rendering `requests` (which then only describe the job)."""
        job = Job(
            list(requests),
            dict(entries),
            label=label,
            timeout_s=self.settings.request_timeout_s,
            work=work,
        )
        try:
            self.jobs.put(job, block=block)
        except queue.Full:
            raise QueueFull("the queue is full; retry later") from None
        return job

    async def render(self, job: Job) -> list[Image.Image]:
        """Wait for a job; a client that goes away cancels it (the worker stops within a step)."""
        try:
            return await asyncio.wrap_future(job.future)
        except asyncio.CancelledError:
            job.cancel("the client went away")
            raise

    def load_pinned(self, entry: RegisteredLora) -> Any:
        with self.loras_lock:
            for worker in self.workers:
                with worker.lock:
                    worker.ensure_loaded({entry.name: entry}, pin=True)
        return self.engine.loras[entry.name]

    def unload(self, name: str) -> None:
        with self.loras_lock:
            for worker in self.workers:
                with worker.lock:
                    worker.unload(name)

    def current_job(self) -> Job | None:
        for worker in self.workers:
            if worker.current is not None:
                return worker.current
        return None

    def stop(self) -> None:
        for _ in self.workers:
            self.jobs.put(None)
