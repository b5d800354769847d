"""The edge every DVC stage goes through: validate params, open the MLflow run, report errors.

A stage module is `run_stage("name", body, sections=(...))` plus a short `body(ctx)` that calls the
library. A bad configuration stops here, before any work, with one message naming the key.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml
from filelock import FileLock, Timeout

from charaforge.config import Params, config_hash, load_params
from charaforge.core.files import stale_temp_folders
from charaforge.core.logs import configure_logging  # one set-up for stages and the CLI
from charaforge.errors import DISK_ERRNOS, CharaForgeError, disk_message
from charaforge.pipeline.tracking import (
    OUTPUT_HASH_TAG,
    StageRun,
    Terminated,
    content_digest,
    stage_run,
    stage_run_name,
)

log = logging.getLogger("charaforge")


@dataclass
class StageContext:
    name: str
    params: Params
    run: StageRun

    def tag_data_hash(self, *paths: str | Path) -> None:
        """Record the content hash of the stage's key input table(s) as provenance."""
        if digest := content_digest(*paths):
            self.run.set_tags({"charaforge.data_hash": digest})

    def tag_output_hash(self, *paths: str | Path) -> None:
        """Record the content hash of the stage's key output(s): the report links to the run
        whose hash is that of the files it reads (selection.mlflow_links)."""
        if digest := content_digest(*paths):
            self.run.set_tags({OUTPUT_HASH_TAG: digest})


def run_stage(
    name: str,
    body: Callable[[StageContext], None],
    sections: Sequence[str] = (),
    params_path: str | Path = "params.yaml",
    before: Callable[[Params], None] | None = None,
) -> None:
    """Run one stage: load and validate params, track it in MLflow.

    Every expected failure (a bad config, a missing input or earlier stage, a missing model) is a
    `CharaForgeError`: it ends the stage with one log line and exit code 2, never a traceback.
    `before(params)` runs after validation and before tracking (the train stage relaunches itself
    in N processes there). In a process of a distributed launch other than rank 0, tracking is
    off: only the main process logs to MLflow.
    """
    configure_logging()
    try:
        params = load_params(params_path)
        if before is not None:
            before(params)
    except CharaForgeError as error:
        log.error("%s: %s", name, error)
        raise SystemExit(2) from None
    if os.environ.get("RANK", "0") != "0":
        params = params.model_copy(
            update={"tracking": params.tracking.model_copy(update={"enabled": False})}
        )
    logged = {section: getattr(params, section).model_dump(mode="json") for section in sections}
    logged["seed"] = params.seed
    tags = {
        "charaforge.config_hash": config_hash(logged),
        "charaforge.character": params.data.character,
    }
    run_name = stage_run_name(name, params.data.character)
    try:
        with (
            # One lock per workspace: with N processes (accelerate launch) the main one holds it.
            workspace_lock(name)
            if os.environ.get("RANK", "0") == "0"
            else contextlib.nullcontext(),
            stage_run(params.tracking, name, tags=tags, run_name=run_name) as run,
        ):
            if os.environ.get("RANK", "0") == "0":  # under the lock: no live run of this stage
                remove_stale_temps(name)
            run.log_params(logged)
            body(StageContext(name=name, params=params, run=run))
    except CharaForgeError as error:
        log.error("%s: %s", name, error)
        raise SystemExit(2) from None
    except OSError as error:
        if error.errno not in DISK_ERRNOS:
            raise
        removed = remove_outputs(name)
        log.error("%s: %s%s", name, disk_message(error), f" (removed {removed})" if removed else "")
        raise SystemExit(2) from None
    except Terminated:
        log.error("%s: terminated (SIGTERM); its MLflow run is marked KILLED", name)
        raise SystemExit(143) from None
    except KeyboardInterrupt:
        log.error("%s: interrupted; its MLflow run is marked KILLED", name)
        raise SystemExit(130) from None
    log.info("stage %s done", name)


def remove_outputs(stage: str, dvc_file: str | Path = "dvc.yaml") -> list[str]:
    """Delete the stage's cached outputs after a disk error, so no partial folder is left where
    DVC would take it for an output; a stage re-run writes them from scratch anyway."""
    removed = []
    for path in _declared_paths(stage, dvc_file, sections=("outs",)):
        if not path.exists():
            continue
        shutil.rmtree(path) if path.is_dir() else path.unlink()
        removed.append(path.as_posix())
    return removed


def _declared_paths(
    stage: str, dvc_file: str | Path, sections: Sequence[str] = ("outs", "metrics", "plots")
) -> list[Path]:
    """The stage's paths in these dvc.yaml sections (templated `${...}` paths left out)."""
    try:
        spec = yaml.safe_load(Path(dvc_file).read_text(encoding="utf-8"))["stages"][stage]
    except (OSError, KeyError, TypeError, yaml.YAMLError):
        return []
    paths = []
    for section in sections:
        for out in spec.get(section, []) or []:
            path = str(next(iter(out)) if isinstance(out, dict) else out)
            if "${" not in path:
                paths.append(Path(path))
    return paths


def remove_stale_temps(stage: str, dvc_file: str | Path = "dvc.yaml") -> list[str]:
    """Delete the temporary folders a SIGKILLed run of this stage left beside its outputs
    (`data/.ingest.k3j9x2ab/`: an atomic write that never got to its clean-up). Called under the
    stage's workspace lock, so no live run of the stage is writing them."""
    removed = []
    for path in _declared_paths(stage, dvc_file):
        for folder in stale_temp_folders(path):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder.as_posix())
    if removed:
        log.warning("%s: removed what a killed run left: %s", stage, ", ".join(removed))
    return removed


def lock_path(stage: str) -> Path:
    """The lock of one stage in this workspace (a queued experiment's copy has its own)."""
    folder = Path(".dvc/tmp") if Path(".dvc").is_dir() else Path(".charaforge")
    return folder / f"charaforge-stage-{stage}.lock"


@contextlib.contextmanager
def workspace_lock(stage: str) -> Iterator[None]:
    """Refuse, in one line, to run a stage beside a live run of the same stage here.

    A stage process can outlive its `dvc` parent (killing only `dvc`); a second `dvc repro`
    would then run beside it on the same outputs and training state. The OS releases the lock
    when its holder dies, so a killed run never blocks the next.
    """
    path = lock_path(stage)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(path, timeout=0)
    try:
        lock.acquire()
    except Timeout:
        holder = path.with_suffix(".pid")
        pid = holder.read_text(encoding="utf-8").strip() if holder.is_file() else "?"
        raise CharaForgeError(
            f"stage {stage} is already running in this workspace (pid {pid}, lock {path}); "
            "wait for it or end it"
        ) from None
    try:
        path.with_suffix(".pid").write_text(str(os.getpid()), encoding="utf-8")
        yield
    finally:
        lock.release()
