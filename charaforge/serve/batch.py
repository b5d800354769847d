"""Batch jobs (seed 001's `/api/v1/batch/*`): a CSV or JSON job file, persisted in SQLite.

A job is its rows (`prompt,negative,pose_image,lora,seed,width,height,steps`; the format and the
store are in batch_store.py), rendered through the shared device queue (consecutive rows that
differ only in prompt and seed in one engine call of up to `max_batch` images: the engine gives
each the bytes it gives it alone) and written as `<index>.png` + `<index>.json` under
`<outputs>/<date>/<job_id>/`. Every row's state is in SQLite, committed (once per engine call)
only after its files are written atomically: a server killed mid-job resumes after a restart
with the rows not yet done (a row killed between its write and its commit is rendered again into
the same file name with the same bytes, so nothing is duplicated or missing). A failing row is
retried MAX_ATTEMPTS times, then recorded as failed, and the job goes on. Rows are seeded, so
the same job file gives the same bytes.

Latency, not only throughput: the runner thread sleeps on an event that `submit` sets (the
IDLE_POLL_S timeout is only a fallback), one group's files are written and committed on a
writer thread while the next group renders, and `wait_job` lets the status route answer the
moment a job ends (a long poll) instead of clients polling it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from charaforge.core.files import sha256_bytes
from charaforge.generate.records import write_image
from charaforge.generate.request import PRESETS, Conditioning, RenderRequest
from charaforge.serve.batch_store import ACTIVE_STATES, BatchRow, BatchStore, JobEndWaiters
from charaforge.serve.limits import ServerSettings, decode_image, open_image_bytes
from charaforge.serve.registry import RegisteredLora
from charaforge.serve.render import PlanError, plan
from charaforge.serve.worker import Job, RenderCancelled, Service

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 3
# The idle runner's wait for `submit`'s wake-up; it looks for work this often anyway (a safety
# net only: a job submitted while it waits wakes it at once).
IDLE_POLL_S = 1.0
# The longest `?wait=` a status request may ask for (seconds): a long poll holds a connection.
MAX_STATUS_WAIT_S = 30.0
# How base64 PNG, JPEG and WebP data begin (their magic bytes encoded): such a pose_image is
# image data, not a path.
BASE64_IMAGE_STARTS = ("iVBORw0KGgo", "/9j/", "UklGR")


def outputs_root(settings: ServerSettings) -> Path:
    """`$AI_CACHE_ROOT/outputs/charaforge`, or the project's `outputs/charaforge` when unset."""
    if settings.outputs_dir is not None:
        return Path(settings.outputs_dir)
    cache = os.environ.get("AI_CACHE_ROOT")
    return (Path(cache) / "outputs" if cache else Path("outputs")) / "charaforge"


def _lora_column(text: str) -> dict[str, float | None]:
    loras: dict[str, float | None] = {}
    for part in filter(None, (item.strip() for item in text.split(";"))):
        name, sep, scale = part.partition(":")
        try:
            loras[name.strip()] = float(scale) if sep else None
        except ValueError:
            raise ValueError(f"lora {part[:60]!r}: the scale is not a number") from None
    return loras


@dataclass(frozen=True)
class PlannedRow:
    """A pending row made into its engine request, with what decides which rows batch together."""

    idx: int
    attempts: int
    request: RenderRequest
    entries: dict[str, RegisteredLora]
    key: tuple
    cost: int


# Renders a job's pending rows elsewhere (distributed.ray_batch.RayBatchRows: Ray engine actors):
# (rows, plan_row, on_done(idx, image), on_error(idx, error, attempts), keep_going()).
RemoteRows = Callable[..., None]


class BatchRunner:
    """One thread that works through the stored jobs, oldest first, via the device queue (or
    `remote_rows`, when given)."""

    def __init__(
        self, service: Service, settings: ServerSettings, remote_rows: RemoteRows | None = None
    ) -> None:
        self.service = service
        self.settings = settings
        self.remote_rows = remote_rows
        self.root = outputs_root(settings)
        self.db_path = Path(settings.jobs_db or self.root / "jobs.sqlite")
        self.wake = threading.Event()
        self.ends = JobEndWaiters()
        self.stopping = threading.Event()
        self.current: Job | None = None
        # The job `_run_job` is on, under `_end_lock` with the cancel: a cancelled running job's
        # end is told only once its last group's files and rows are committed.
        self._running: str | None = None
        self._end_lock = threading.Lock()
        self._store: BatchStore | None = None
        self._start_lock = threading.Lock()
        self.thread = threading.Thread(target=self._run, daemon=True)
        if self.db_path.is_file():  # jobs of an earlier run: resume them
            self._start()

    def _start(self) -> BatchStore:
        """The store and the runner thread, made on first use (a server that never gets a batch
        job writes nothing)."""
        with self._start_lock:
            if self._store is None:
                self._store = BatchStore(self.db_path, on_end=self.ends.ended)
                self.thread.start()
            return self._store

    @property
    def store(self) -> BatchStore:
        return self._start()

    def job(self, job_id: str) -> dict[str, Any] | None:
        return self._store.job(job_id) if self._store is not None else None

    async def wait_job(self, job_id: str, wait_s: float) -> dict[str, Any] | None:
        """The job's status once it has ended or `wait_s` seconds have passed (a long poll:
        woken by the store the moment the job ends); None for an unknown job. The SQLite reads
        run in threads, never on the event loop."""
        ended = self.ends.watch(job_id)  # before the read: an end right after it still wakes
        try:
            status = await asyncio.to_thread(self.job, job_id)
            if status is None or status["state"] not in ACTIVE_STATES or wait_s <= 0:
                return status
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(ended, timeout=wait_s)
            return await asyncio.to_thread(self.job, job_id)
        finally:
            self.ends.forget(job_id, ended)

    def submit(self, rows: list[BatchRow]) -> str:
        job_id = self.store.create(rows)
        self.wake.set()
        return job_id

    def cancel(self, job_id: str) -> bool:
        if self._store is None:
            return False
        with self._end_lock:
            draining = self._running == job_id  # `_run_job` tells the end after its last commit
            cancelled = self.store.set_job(
                job_id, "cancelled", only_if=("queued", "running"), notify=not draining
            )
        current = self.current
        if cancelled and current is not None and current.label == f"batch:{job_id}":
            current.cancel("the batch job was cancelled")
        return cancelled

    def stop(self) -> None:
        self.stopping.set()
        self.wake.set()

    def _run(self) -> None:
        while not self.stopping.is_set():
            job_id = self.store.next_job()
            if job_id is None:
                self.wake.wait(timeout=IDLE_POLL_S)
                self.wake.clear()
                continue
            try:
                self._run_job(job_id)
            except Exception:  # a job never takes the runner down with it
                log.exception("batch job %s stopped", job_id)
                self.store.set_job(job_id, "failed")

    def _run_job(self, job_id: str) -> None:
        with self._end_lock:
            self._running = job_id
        try:
            self._work_on(job_id)
        finally:
            with self._end_lock:
                self._running = None
                if self.store.state(job_id) == "cancelled":
                    self.ends.ended(job_id)  # a cancel during the job: now its commits are in

    def _work_on(self, job_id: str) -> None:
        self.store.set_job(job_id, "running", only_if=("queued",))
        day = self.store.job(job_id)["day"]  # type: ignore[index]
        folder = self.root / day / job_id
        if self.remote_rows is not None:
            self._run_rows_remotely(job_id, folder)
        # The with waits for the last group's files and commit on every way out (a cancel, a
        # stop, an error): the job is marked done only after them.
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="batch-writer") as writer:
            self._render_rows(job_id, folder, writer)
        if not self.store.pending_rows(job_id):
            self.store.set_job(job_id, "done", only_if=("running",))

    def _render_rows(self, job_id: str, folder: Path, writer: ThreadPoolExecutor) -> None:
        """The job's pending rows, group by group, pipelined: a group's files are written and
        its rows committed on `writer` while the next group renders. At most one group waits
        for its files (bounded memory; a write error such as a full disk is raised here, before
        another group is handed over). Its rows are still pending in the store until that
        commit, so they are left out of the next group."""
        writing: Future | None = None
        being_written: set[int] = set()
        while not self.stopping.is_set():
            pending = [
                row for row in self.store.pending_rows(job_id) if row[0] not in being_written
            ]
            if not pending or self.store.state(job_id) != "running":
                break
            group, failures = self._next_group(pending)
            for idx, error, final in failures:
                self.store.fail_row(job_id, idx, error, final)
            if not group:
                continue
            try:
                images = self._render_group(job_id, group)
            except RenderCancelled:
                break  # the job was cancelled (or the server is stopping): rows stay pending
            except (ValueError, KeyError, OSError) as error:
                if len(group) > 1:  # render them one by one, so only the bad row fails
                    self._render_alone(job_id, folder, group)
                    continue
                idx, attempts = group[0].idx, group[0].attempts
                self.store.fail_row(
                    job_id, idx, str(error).strip("'\""), attempts + 1 >= MAX_ATTEMPTS
                )
                continue
            if writing is not None:
                writing.result()
            writing = writer.submit(self._write, job_id, folder, group, images)
            being_written = {planned.idx for planned in group}
        if writing is not None:
            writing.result()

    def _run_rows_remotely(self, job_id: str, folder: Path) -> None:
        """The job's pending rows through `remote_rows`; rows that end up pending again (an
        error with attempts left) go through the loop of `_run_job`."""

        def done(idx: int, image: Image.Image) -> None:
            path = folder / f"{idx:05d}.png"
            write_image(path, image)  # sidecar, then PNG, each atomic
            self.store.finish_rows(job_id, [(idx, str(path))])

        def failed(idx: int, error: Exception, attempts: int) -> None:
            final = attempts + 1 >= MAX_ATTEMPTS or isinstance(error, PlanError)
            self.store.fail_row(job_id, idx, str(error).strip("'\""), final)

        def keep_going() -> bool:
            return not self.stopping.is_set() and self.store.state(job_id) == "running"

        assert self.remote_rows is not None
        self.remote_rows(self.store.pending_rows(job_id), self._plan_one, done, failed, keep_going)

    def _plan_one(self, row: BatchRow) -> tuple[list[RenderRequest], dict]:
        """One row's requests and LoRA entries, as a remote renderer takes them."""
        planned = self._plan_row(0, row, 0)
        return [planned.request], planned.entries

    def _next_group(
        self, pending: list[tuple[int, BatchRow, int]]
    ) -> tuple[list[PlannedRow], list[tuple[int, str, bool]]]:
        """The first pending rows that can share one engine call (the same settings but prompt
        and seed, at most `max_batch` and `max_cost` together), and the rows refused on the way.

        The engine renders a row's bytes alike alone and in a batch (exact mode), so grouping
        changes speed only; a group ends at the first row that differs."""
        group: list[PlannedRow] = []
        failures: list[tuple[int, str, bool]] = []
        cost = 0
        for idx, row, attempts in pending:
            try:
                planned = self._plan_row(idx, row, attempts)
            except (PlanError, ValueError, KeyError, OSError) as error:
                final = attempts + 1 >= MAX_ATTEMPTS or isinstance(error, PlanError)
                failures.append((idx, str(error).strip("'\""), final))
                if group:
                    break
                continue
            if group and (
                planned.key != group[0].key
                or len(group) >= self.settings.max_batch
                or cost + planned.cost > self.settings.max_cost
            ):
                break
            group.append(planned)
            cost += planned.cost
        return group, failures

    def _plan_row(self, idx: int, row: BatchRow, attempts: int) -> PlannedRow:
        conditioning = None
        if row.pose_image:
            conditioning = Conditioning("control", self._pose(row.pose_image))
        template = RenderRequest(
            prompt=row.prompt,
            seed=row.seed,
            negative_prompt=row.negative,
            width=row.width,
            height=row.height,
            steps=row.steps,
            conditioning=conditioning,
        )
        requests, entries = plan(self.service, template, [row.seed], _lora_column(row.lora))
        request = requests[0]
        steps = request.steps or PRESETS[request.preset or "standard"].steps
        key = (
            tuple(sorted(request.loras.items())),
            steps,
            request.guidance_scale,
            request.width,
            request.height,
            request.scheduler,
            request.preset,
            sha256_bytes(row.pose_image.encode()) if row.pose_image else "",
        )
        cost = int(request.width or 0) * int(request.height or 0) * steps
        return PlannedRow(idx, attempts, request, entries, key, cost)

    def _render_group(self, job_id: str, group: list[PlannedRow]) -> list[Image.Image]:
        requests = [planned.request for planned in group]
        if group[0].request.conditioning is not None:  # rows of one pose share its image
            shared = group[0].request.conditioning
            requests = [dataclasses.replace(r, conditioning=shared) for r in requests]
        entries = {name: e for planned in group for name, e in planned.entries.items()}
        job = self.service.submit(requests, entries, label=f"batch:{job_id}", block=True)
        self.current = job
        if self.store.state(job_id) != "running":  # cancelled before `current` named this job
            job.cancel("the batch job was cancelled")
        try:
            return job.future.result()
        finally:
            self.current = None

    def _render_alone(self, job_id: str, folder: Path, group: list[PlannedRow]) -> None:
        for planned in group:
            try:
                images = self._render_group(job_id, [planned])
            except (ValueError, KeyError, OSError) as error:
                final = planned.attempts + 1 >= MAX_ATTEMPTS
                self.store.fail_row(job_id, planned.idx, str(error).strip("'\""), final)
                continue
            self._write(job_id, folder, [planned], images)

    def _write(
        self, job_id: str, folder: Path, group: list[PlannedRow], images: list[Image.Image]
    ) -> None:
        """Every image's files (sidecar, then PNG, each atomic), then one commit for them all:
        a kill in between leaves the rows pending, rendered again into the same names."""
        paths = []
        for planned, image in zip(group, images, strict=True):
            path = folder / f"{planned.idx:05d}.png"
            write_image(path, image)
            paths.append((planned.idx, str(path)))
        self.store.finish_rows(job_id, paths)

    def _pose(self, reference: str) -> Image.Image:
        """A pose image: base64 (a `data:image/...;base64,` URL or plain base64, as JSON jobs
        send them), or a file inside the working folder or $AI_CACHE_ROOT only."""
        if reference.startswith("data:") or reference.startswith(BASE64_IMAGE_STARTS):
            try:
                return decode_image(reference, self.settings, "pose_image").convert("RGB")
            except ValueError as error:
                raise PlanError(str(error)) from None
        roots = [Path.cwd().resolve()]
        if os.environ.get("AI_CACHE_ROOT"):
            roots.append(Path(os.environ["AI_CACHE_ROOT"]).resolve())
        path = Path(reference).resolve()
        if not any(path.is_relative_to(root) for root in roots) or not path.is_file():
            raise PlanError(f"pose_image {reference[:80]!r}: not a file inside {roots[0]}")
        return open_image_bytes(path.read_bytes(), self.settings, "pose_image").convert("RGB")
