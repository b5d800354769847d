"""Disk full: a stage that cannot write says so in one line, naming the path and the free space,
and leaves no partial output folder. The limit is a real one, RLIMIT_FSIZE in the stage process
(writes fail with EFBIG, as a full disk fails them with ENOSPC); no root is needed for it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import yaml
from conftest import stand_in_params_dict
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
LIMITED = (
    "import resource, runpy, signal, sys\n"
    "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"  # EFBIG instead of being killed
    "resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))\n"
    "runpy.run_module(sys.argv[1], run_name='__main__')\n"
)


def _stage(workdir: Path, module: str, limited: bool) -> subprocess.CompletedProcess:
    command = [sys.executable, "-c", LIMITED, module] if limited else [sys.executable, "-m", module]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        command, cwd=workdir, env=env, capture_output=True, text=True, timeout=300
    )


def test_full_disk_is_one_line_and_leaves_no_partial_output(tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    noise = np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    for index in range(3):  # each normalised PNG is ~190 KB: over the 64 KB limit
        Image.fromarray(np.roll(noise, index, axis=0)).save(inbox / f"{index}.png")
    params = stand_in_params_dict()
    params["data"]["source"] = "inbox"
    params["tracking"]["enabled"] = False
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")
    assert _stage(tmp_path, "stages.scan", limited=False).returncode == 0
    result = _stage(tmp_path, "stages.ingest", limited=True)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1, result.stderr
    assert "file size limit" in errors[0] and "data/ingest" in errors[0]
    assert "MiB free" in errors[0]
    assert not (tmp_path / "data/ingest").exists()
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["scan"]  # no temp folders
