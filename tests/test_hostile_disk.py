"""Disk full: a stage that cannot write says so in one line, naming the path, the free space and
how much the write needs, and leaves no partial output folder. The contract lives in `run_stage`,
the edge every stage goes through. The limit is a real one, RLIMIT_FSIZE in the stage process
(writes fail with EFBIG, as a full disk fails them with ENOSPC); no root is needed for it."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
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


def _workspace(tmp_path: Path) -> Path:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    noise = np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    for index in range(3):  # each normalised PNG is ~190 KB: over the 64 KB limit
        Image.fromarray(np.roll(noise, index, axis=0)).save(inbox / f"{index}.png")
    params = stand_in_params_dict()
    params["data"]["source"] = "inbox"
    params["tracking"]["enabled"] = False
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")
    (tmp_path / "dvc.yaml").write_bytes((REPO / "dvc.yaml").read_bytes())  # the declared outs
    return tmp_path


def _one_disk_line(result: subprocess.CompletedProcess, output: str) -> str:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1, result.stderr
    assert "file size limit" in errors[0] and output in errors[0] and "MiB free" in errors[0]
    # How much the write needs: at least the 64 KiB limit it had reached (nothing else wrote).
    needed = re.search(r"needs more than the ([0-9.]+) (bytes|KiB|MiB)", errors[0])
    assert needed, errors[0]
    scale = {"bytes": 1, "KiB": 1024, "MiB": 1024**2}[needed[2]]
    assert float(needed[1]) * scale >= 64 * 1024, errors[0]
    return errors[0]


# ingest writes its folder through one atomic rename; dedupe writes file by file into its
# folder (the partial folder the stage edge must remove): one error contract for both.
@pytest.mark.parametrize(
    ("stage", "before"), [("ingest", ("scan",)), ("dedupe", ("scan", "ingest"))]
)
def test_full_disk_is_one_line_and_leaves_no_partial_output(
    tmp_path: Path, stage: str, before: tuple[str, ...]
) -> None:
    workdir = _workspace(tmp_path)
    for earlier in before:
        assert _stage(workdir, f"stages.{earlier}", limited=False).returncode == 0
    result = _stage(workdir, f"stages.{stage}", limited=True)
    _one_disk_line(result, f"data/{stage}")
    assert not (workdir / f"data/{stage}").exists()
    assert sorted(p.name for p in (workdir / "data").iterdir()) == sorted(before)  # no temps


def test_every_stage_goes_through_the_one_error_edge() -> None:
    """The disk contract lives in `run_stage` alone: every stage module's entry point calls it."""
    stages = sorted((REPO / "stages").glob("[!_]*.py"))
    assert len(stages) >= 12
    for module in stages:
        tree = ast.parse(module.read_text(encoding="utf-8"))
        called = {
            node.func.id
            for node in ast.walk(tree)
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
        }
        assert "run_stage" in called, f"{module.name} does not run through run_stage"
