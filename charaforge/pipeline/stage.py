"""The edge every DVC stage goes through: validate params, open the MLflow run, report errors.

A stage module is `run_stage("name", body, sections=(...))` plus a short `body(ctx)` that calls the
library. A bad configuration stops here, before any work, with one message naming the key.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from charaforge.config import Params, config_hash, load_params
from charaforge.core.files import sha256_file
from charaforge.errors import CharaForgeError
from charaforge.pipeline.tracking import StageRun, stage_run, stage_run_name

log = logging.getLogger("charaforge")


@dataclass
class StageContext:
    name: str
    params: Params
    run: StageRun

    def tag_data_hash(self, *paths: str | Path) -> None:
        """Record the content hash of the stage's key input table(s) as provenance."""
        digests = [sha256_file(path)[:16] for path in paths if Path(path).is_file()]
        if digests:
            self.run.set_tags({"charaforge.data_hash": "-".join(digests)})


def configure_logging(level: int = logging.INFO) -> None:
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    for noisy in ("alembic", "urllib3", "PIL", "matplotlib", "httpx", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def run_stage(
    name: str,
    body: Callable[[StageContext], None],
    sections: Sequence[str] = (),
    params_path: str | Path = "params.yaml",
) -> None:
    """Run one stage: load and validate params, track it in MLflow.

    Every expected failure (a bad config, a missing input or earlier stage, a missing model) is a
    `CharaForgeError`: it ends the stage with one log line and exit code 2, never a traceback.
    """
    configure_logging()
    try:
        params = load_params(params_path)
    except CharaForgeError as error:
        log.error("%s: %s", name, error)
        raise SystemExit(2) from None
    logged = {section: getattr(params, section).model_dump(mode="json") for section in sections}
    logged["seed"] = params.seed
    tags = {
        "charaforge.config_hash": config_hash(logged),
        "charaforge.character": params.data.character,
    }
    run_name = stage_run_name(name, params.data.character)
    with stage_run(params.tracking, name, tags=tags, run_name=run_name) as run:
        run.log_params(logged)
        try:
            body(StageContext(name=name, params=params, run=run))
        except CharaForgeError as error:
            log.error("%s: %s", name, error)
            raise SystemExit(2) from None
    log.info("stage %s done", name)
