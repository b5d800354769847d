"""A batch job's rows (the job file format) and their SQLite store, with waiters for a job's end.

`BatchStore` keeps jobs and rows in one SQLite file (stdlib sqlite3); `JobEndWaiters` lets the
status route answer the moment a job leaves `queued`/`running` (a long poll) instead of clients
polling: the store tells it of every such change, whichever thread makes it.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import io
import json
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError

from charaforge.serve.limits import Body

MAX_ROWS = 10_000
COLUMNS = ("prompt", "negative", "pose_image", "lora", "seed", "width", "height", "steps")
ACTIVE_STATES = ("queued", "running")  # any other state (done, failed, cancelled) is an end


class BatchRow(Body):
    """One row of a job file."""

    prompt: str = Field(min_length=1, max_length=2000, description="Prompt; `<lora:...>` tags.")
    negative: str = Field(default="", max_length=2000, description="Negative prompt.")
    pose_image: str = Field(
        default="",
        max_length=24 * 1024 * 1024,
        description="An OpenPose skeleton image: a path in the working folder, or base64.",
    )
    lora: str = Field(default="", description="`NAME` or `NAME:SCALE` (';' between several).")
    seed: int = Field(default=0, ge=0, lt=2**63, description="The row's seed.")
    width: int | None = Field(default=None, ge=8, description="Width (model default).")
    height: int | None = Field(default=None, ge=8, description="Height (model default).")
    steps: int | None = Field(default=None, ge=1, description="Steps (preset default).")


def parse_job_file(data: bytes, filename: str = "") -> list[BatchRow]:
    """A CSV (header `prompt,negative,pose_image,lora,seed,width,height,steps`, only `prompt`
    required) or a JSON list of row objects (or `{"rows": [...]}`); ValueError with the row."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise ValueError("job file: not UTF-8 text") from None
    stripped = text.lstrip()
    if filename.endswith(".json") or stripped.startswith(("[", "{")):
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"job file: invalid JSON ({error.msg}, line {error.lineno})") from None
        raw = raw.get("rows") if isinstance(raw, dict) else raw
        if not isinstance(raw, list):
            raise ValueError('job file: JSON must be a list of rows or {"rows": [...]}')
        records = raw
    else:
        reader = csv.DictReader(io.StringIO(text))
        unknown = sorted(set(reader.fieldnames or ()) - set(COLUMNS))
        if "prompt" not in (reader.fieldnames or ()) or unknown:
            raise ValueError(f"job file: CSV columns must be among {list(COLUMNS)} with prompt")
        records = [{k: v for k, v in row.items() if v not in ("", None)} for row in reader]
    if not records or len(records) > MAX_ROWS:
        raise ValueError(f"job file: 1 to {MAX_ROWS} rows, got {len(records)}")
    rows = []
    for index, record in enumerate(records):
        try:
            rows.append(BatchRow.model_validate(record))
        except ValidationError as error:
            first = error.errors()[0]
            where = ".".join(str(part) for part in first["loc"])
            raise ValueError(f"job file row {index}: {where}: {first['msg']}") from None
    return rows


class BatchStore:
    """Jobs and rows in one SQLite file (one connection per call: any thread may use it)."""

    def __init__(self, path: Path, on_end: Callable[[str], None] | None = None) -> None:
        self.path = path
        self.on_end = on_end  # told the job id whenever set_job ends a job
        path.parent.mkdir(parents=True, exist_ok=True)
        with self._db() as db:
            db.executescript(
                """
                CREATE TABLE IF NOT EXISTS jobs (
                    id TEXT PRIMARY KEY, created REAL, day TEXT, state TEXT, total INTEGER);
                CREATE TABLE IF NOT EXISTS rows (
                    job_id TEXT, idx INTEGER, spec TEXT, state TEXT, attempts INTEGER,
                    error TEXT, image TEXT, PRIMARY KEY (job_id, idx));
                """
            )

    def _db(self) -> sqlite3.Connection:
        return sqlite3.connect(self.path, timeout=30, isolation_level=None)

    def create(self, rows: list[BatchRow]) -> str:
        job_id = uuid.uuid4().hex[:16]
        with self._db() as db:
            db.execute("BEGIN")
            db.execute(
                "INSERT INTO jobs VALUES (?, ?, ?, 'queued', ?)",
                (job_id, time.time(), time.strftime("%Y-%m-%d"), len(rows)),
            )
            db.executemany(
                "INSERT INTO rows VALUES (?, ?, ?, 'pending', 0, '', '')",
                [(job_id, i, row.model_dump_json()) for i, row in enumerate(rows)],
            )
            db.execute("COMMIT")
        return job_id

    def job(self, job_id: str) -> dict[str, Any] | None:
        with self._db() as db:
            found = db.execute(
                "SELECT id, day, state, total FROM jobs WHERE id = ?", (job_id,)
            ).fetchone()
            if found is None:
                return None
            rows = db.execute(
                "SELECT idx, state, attempts, error, image FROM rows WHERE job_id = ? ORDER BY idx",
                (job_id,),
            ).fetchall()
        return {
            "job_id": found[0],
            "day": found[1],
            "state": found[2],
            "total": found[3],
            "done": sum(1 for row in rows if row[1] == "done"),
            "failed": sum(1 for row in rows if row[1] == "failed"),
            "errors": [{"row": row[0], "error": row[3]} for row in rows if row[1] == "failed"],
            "images": [row[4] for row in rows if row[1] == "done"],
        }

    def next_job(self) -> str | None:
        with self._db() as db:
            found = db.execute(
                "SELECT id FROM jobs WHERE state IN ('queued', 'running') ORDER BY created LIMIT 1"
            ).fetchone()
        return found[0] if found else None

    def pending_rows(self, job_id: str) -> list[tuple[int, BatchRow, int]]:
        with self._db() as db:
            rows = db.execute(
                "SELECT idx, spec, attempts FROM rows WHERE job_id = ? AND state = 'pending' "
                "ORDER BY idx",
                (job_id,),
            ).fetchall()
        return [(idx, BatchRow.model_validate_json(spec), tries) for idx, spec, tries in rows]

    def set_job(
        self, job_id: str, state: str, only_if: tuple[str, ...] = (), notify: bool = True
    ) -> bool:
        """Set the job's state (only from one of `only_if`, when given); an end is told to
        `on_end` unless `notify` is off (the runner tells it once the job's last commit is in)."""
        with self._db() as db:
            if only_if:
                marks = ",".join("?" * len(only_if))
                cursor = db.execute(
                    f"UPDATE jobs SET state = ? WHERE id = ? AND state IN ({marks})",
                    (state, job_id, *only_if),
                )
            else:
                cursor = db.execute("UPDATE jobs SET state = ? WHERE id = ?", (state, job_id))
        changed = cursor.rowcount == 1
        if changed and notify and state not in ACTIVE_STATES and self.on_end is not None:
            self.on_end(job_id)  # after the commit: a woken waiter reads the new state
        return changed

    def state(self, job_id: str) -> str | None:
        with self._db() as db:
            found = db.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return found[0] if found else None

    def finish_rows(self, job_id: str, images: list[tuple[int, str]]) -> None:
        """Mark rows done in one transaction (one commit per engine call, not per row)."""
        with self._db() as db:
            db.execute("BEGIN")
            db.executemany(
                "UPDATE rows SET state = 'done', image = ? WHERE job_id = ? AND idx = ?",
                [(image, job_id, idx) for idx, image in images],
            )
            db.execute("COMMIT")

    def fail_row(self, job_id: str, idx: int, error: str, final: bool) -> None:
        with self._db() as db:
            db.execute(
                "UPDATE rows SET attempts = attempts + 1, error = ?, state = ? "
                "WHERE job_id = ? AND idx = ?",
                (error[:500], "failed" if final else "pending", job_id, idx),
            )


class JobEndWaiters:
    """Asyncio futures waiting for a job's end, resolved from any thread (`ended`).

    A waiter registers (`watch`) before it reads the job's state, so an end that comes between
    the read and the wait still wakes it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._futures: dict[str, set[asyncio.Future]] = {}

    def watch(self, job_id: str) -> asyncio.Future:
        """A future of the running event loop, resolved when `job_id` ends."""
        future = asyncio.get_running_loop().create_future()
        with self._lock:
            self._futures.setdefault(job_id, set()).add(future)
        return future

    def forget(self, job_id: str, future: asyncio.Future) -> None:
        with self._lock:
            watching = self._futures.get(job_id, set())
            watching.discard(future)
            if not watching:
                self._futures.pop(job_id, None)

    def ended(self, job_id: str) -> None:
        with self._lock:
            futures = self._futures.pop(job_id, set())
        for future in futures:
            with contextlib.suppress(RuntimeError):  # its event loop has closed: nobody waits
                future.get_loop().call_soon_threadsafe(_resolve, future)


def _resolve(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)
