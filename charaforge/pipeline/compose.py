"""Compose conf/ into params.yaml exactly as `dvc exp run` does.

`dvc repro` never recomposes, so `charaforge params` (and `make params`) call the same DVC
function that `dvc exp run` calls; a test checks the committed params.yaml is in sync.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from charaforge.config import Params, load_params
from charaforge.core.files import atomic_path
from charaforge.errors import ConfigError

DEFAULT_CONFIG = "config"  # conf/config.yaml: the world demo; conf/stand_in.yaml: the tests'


def compose_params(
    root: str | Path = ".",
    overrides: Sequence[str] = (),
    output: str | Path | None = None,
    config_name: str = DEFAULT_CONFIG,
) -> Params:
    """Compose `<root>/conf/<config_name>.yaml` with Hydra overrides into `output` (default
    `<root>/params.yaml`).

    The composed file is validated against the schema before it replaces params.yaml, so a bad
    override fails here, naming the key, and leaves the old params.yaml in place.
    """
    import tempfile

    from dvc.utils.hydra import compose_and_dump
    from hydra.errors import HydraException

    root = Path(root).resolve()
    output = Path(output) if output is not None else root / "params.yaml"
    with tempfile.TemporaryDirectory() as scratch:
        candidate = Path(scratch) / "params.yaml"
        try:
            compose_and_dump(
                candidate, str(root / "conf"), None, config_name, str(root), list(overrides)
            )
        except HydraException as error:  # a malformed override or an unknown config choice
            raise ConfigError(f"overrides: {str(error).splitlines()[0]}") from None
        params = load_params(candidate)
        with atomic_path(output) as temp:
            temp.write_bytes(candidate.read_bytes())
    return params
