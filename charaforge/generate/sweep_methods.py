"""How the images of one sweep cell are rendered, per suite method.

`independent`: every image alone, in batches of `eval.batch_size`. `shared_attention`
(generate.consistent): each group (per seed) in one batch, identity shot first, the frames
attending to its character tokens; when only a frame is missing, the identity shot is rendered
again with it (not rewritten) so the frame gets the same bytes. `ip_adapter`: the identity shot
alone first, then the frames with the identity shot's image as their IP-Adapter reference (read
back from disk, so a resumed sweep conditions on the very file it scores). A suite method is a
sweep axis: a suite whose `method` is a list renders every group once per method, with the same
prompts and seeds (the job's `method`; the index's `method` column), and the score stage's
consistency columns compare them pair by pair.

Jobs are the sweep's `SweepJob`s (duck-typed here: `prompt`, `sample`, `seed`, `pose`, `method`,
`relative_path()`), so this module stays below generate.sweep.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from PIL import Image

from charaforge.config import EvalConfig, SuiteConfig
from charaforge.core.files import write_bytes, write_png
from charaforge.generate.consistent import CHARACTER_MASK_KEY, mask_overlay
from charaforge.generate.engine import GenerationEngine
from charaforge.generate.records import fused_batch_record, read_sidecar, write_image
from charaforge.generate.request import Consistency, ImagePrompt, RenderRequest

MASK_DIR = "masks"

# (job, consistency, image_prompt) -> the job's request.
MakeRequest = Callable[[Any, Consistency | None, ImagePrompt | None], RenderRequest]


def render_cell(
    engine: GenerationEngine,
    jobs: list[Any],
    make_request: MakeRequest,
    eval: EvalConfig,
    out_dir: Path,
    on_done: Callable[[Any, bool], None],
    work: Path | None = None,
) -> None:
    """Render the cell's missing images; `on_done(job, rendered)` after each job. With a `work`
    folder every image is kept there too as it is rendered, and reused from there (run_sweep)."""
    first_pass = [job for job in jobs if _method(job, eval) != "ip_adapter" or _is_identity(job)]
    requests = [(job, make_request(job, _consistency(job, jobs, eval), None)) for job in first_pass]
    _render(engine, requests, eval, out_dir, on_done, work)
    frames = [job for job in jobs if job not in first_pass]
    if frames:
        identities = {_group_key(job): job for job in first_pass if _is_identity(job)}
        references = [
            (job, _reference(identities[_group_key(job)], eval, out_dir)) for job in frames
        ]
        # One batch per reference: a batch shares its image prompt.
        for identity_path in dict.fromkeys(path for _, (_, path) in references):
            group = [
                (job, make_request(job, None, prompt))
                for job, (prompt, path) in references
                if path == identity_path
            ]
            _render(engine, group, eval, out_dir, on_done, work)


def _render(
    engine: GenerationEngine,
    requests: list[tuple[Any, RenderRequest]],
    eval: EvalConfig,
    out_dir: Path,
    on_done: Callable[[Any, bool], None],
    work: Path | None,
) -> None:
    fused = engine.batch_mode == "fused"
    chunk_records = _fused_records(engine, requests, eval.batch_size) if fused else {}
    pending = []
    for job, request in requests:
        path = out_dir / job.relative_path()
        wanted = engine.parameters(request)
        if job in chunk_records:
            wanted = {**wanted, "fused_batch": chunk_records[job]}
        kept = work / job.relative_path() if work is not None else None
        if path.is_file() and read_sidecar(path) == wanted:
            on_done(job, False)
        elif kept is not None and kept.is_file() and read_sidecar(kept) == wanted:
            _copy_image(kept, path)
            on_done(job, False)
        else:
            pending.append((job, request))
    waiting = {job for job, _ in pending}

    def store(job: Any, image: Image.Image) -> None:
        if work is not None:
            write_image(work / job.relative_path(), image)
            _copy_image(work / job.relative_path(), out_dir / job.relative_path())
        else:
            write_image(out_dir / job.relative_path(), image)
        _write_mask(out_dir, job, image, eval)
        on_done(job, True)

    # PNG encoding and the files on a thread: a batch's images are written while the next one
    # renders; all are on disk when this returns (a frame pass reads its identity shot back).
    with ImageWriter() as writer:
        for batch in _batches(pending, requests, eval.batch_size, fused):
            images = engine.render_batch([request for _, request in batch])
            for (job, _), image in zip(batch, images, strict=True):
                if job in waiting:  # else an identity shot rendered again only for its frames
                    writer.submit(store, job, image)


class ImageWriter:
    """One thread that runs `submit`ted writes in order. After a failed one (a full disk, or a
    callback that interrupts the sweep) it runs no more, and the error is raised in the caller
    at its next `submit` or on leaving the `with`: the files on disk are exactly those whose
    write and callback ran, as when writing inline."""

    def __init__(self) -> None:
        self._queue: queue.Queue = queue.Queue()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="sweep-writer", daemon=True)

    def __enter__(self) -> ImageWriter:
        self._thread.start()
        return self

    def submit(self, function: Callable[..., None], *args: Any) -> None:
        self._raise()
        self._queue.put((function, args))

    def __exit__(self, *exc_info: object) -> None:
        self._queue.put(None)
        self._thread.join()
        if exc_info[0] is None:
            self._raise()

    def _raise(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            if self._error is None:
                try:
                    item[0](*item[1])
                except BaseException as error:  # noqa: BLE001 - re-raised in the caller
                    self._error = error


def is_independent(job: Any, eval: EvalConfig) -> bool:
    """Whether the job's image depends on no other job of its cell (no shared attention, no
    identity shot as image prompt): such jobs can be rendered apart, on different workers."""
    return _method(job, eval) == "independent"


def _suite(job: Any, eval: EvalConfig) -> SuiteConfig | None:
    return eval.suites.get(job.prompt.suite or "") if job.pose is None else None


def _method(job: Any, eval: EvalConfig) -> str:
    return job.method if _suite(job, eval) is not None else "independent"


def _is_identity(job: Any) -> bool:
    return bool(job.prompt.identity_shot)


def _group_key(job: Any) -> tuple:
    return (job.prompt.suite, job.prompt.group, job.sample, job.method)


def _consistency(job: Any, jobs: list[Any], eval: EvalConfig) -> Consistency | None:
    """A shared-attention suite's part: the identity shot, or a frame naming it."""
    suite = _suite(job, eval)
    if suite is None or _method(job, eval) != "shared_attention":
        return None
    identity = None
    if not _is_identity(job):
        identity = next(
            other for other in jobs if _is_identity(other) and _group_key(other) == _group_key(job)
        )
    return Consistency(
        job.prompt.character or "",
        identity_prompt=identity.prompt.text if identity else None,
        identity_seed=identity.seed if identity else None,
        share_background=suite.share_background,
        mask_threshold=suite.mask_threshold,
        group_tokens=suite.group_tokens,
        strength=suite.strength,
        blocks=suite.blocks,
        window=(float(suite.window[0]), float(suite.window[1])),
    )


def _reference(identity: Any, eval: EvalConfig, out_dir: Path) -> tuple[ImagePrompt, Path]:
    suite = _suite(identity, eval)
    assert suite is not None
    path = out_dir / identity.relative_path()
    with Image.open(path) as image:
        picture = image.convert("RGB")
    return ImagePrompt(picture, suite.ip_adapter_scale, source=identity.relative_path()), path


def _plan_chunks(
    requests: list[tuple[Any, RenderRequest]], batch_size: int
) -> list[list[tuple[Any, RenderRequest]]]:
    """The independent images in the plan's order, in chunks of `batch_size`."""
    plain = [item for item in requests if item[1].consistency is None]
    return [plain[start : start + batch_size] for start in range(0, len(plain), batch_size)]


def _fused_records(
    engine: GenerationEngine, requests: list[tuple[Any, RenderRequest]], batch_size: int
) -> dict[Any, dict]:
    """Each independent job's fused batch, as the engine records it in the sidecar."""
    records = {}
    for chunk in _plan_chunks(requests, batch_size):
        record = fused_batch_record([engine.parameters(request) for _, request in chunk])
        records.update({job: record for job, _ in chunk})
    return records


def _batches(
    pending: list[tuple[Any, RenderRequest]],
    requests: list[tuple[Any, RenderRequest]],
    batch_size: int,
    fused: bool = False,
) -> list[list[tuple[Any, RenderRequest]]]:
    """Independent images in batches of `batch_size`; a consistent group as one batch, identity
    shot first and whole (the frames attend to it), whenever one of its images is pending.

    In exact mode an image's bytes do not depend on its batch, so the pending images are packed
    together. In fused mode they do, so the batches are the plan's own chunks, each rendered
    whole whenever one of its images is pending (the finished ones are not written again).
    """
    waiting = {job for job, _ in pending}
    batches = _plan_chunks(requests if fused else pending, batch_size)
    if fused:
        batches = [batch for batch in batches if any(job in waiting for job, _ in batch)]
    groups: dict[tuple, list[tuple[Any, RenderRequest]]] = {}
    for job, request in requests:
        if request.consistency is not None:
            groups.setdefault(_group_key(job), []).append((job, request))
    for members in groups.values():
        if any(job in waiting for job, _ in members):
            batches.append(sorted(members, key=lambda item: not _is_identity(item[0])))
    return batches


def _write_mask(out_dir: Path, job: Any, image: Image.Image, eval: EvalConfig) -> None:
    suite = _suite(job, eval)
    if suite is not None and suite.save_masks and CHARACTER_MASK_KEY in image.info:
        overlay = mask_overlay(image, image.info[CHARACTER_MASK_KEY])
        write_png(out_dir / MASK_DIR / job.relative_path(), overlay)


def _copy_image(source: Path, target: Path) -> None:
    """A kept image and its sidecar into the output, sidecar first (as write_image writes)."""
    write_bytes(target.with_suffix(".json"), source.with_suffix(".json").read_bytes())
    write_bytes(target, source.read_bytes())
