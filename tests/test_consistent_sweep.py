"""Shared attention as a sweep suite option: groups rendered together, masks saved, resume."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from engine_fixtures import one_thread  # noqa: F401  (a fixture: pytest finds it by name)
from PIL import Image

from charaforge.config import EvalConfig, ModelConfig
from charaforge.core.files import write_json
from charaforge.generate.engine import GenerationEngine
from charaforge.generate.records import read_sidecar
from charaforge.generate.sweep import run_sweep
from charaforge.generate.sweep_methods import MASK_DIR
from charaforge.models.base import write_base

SUITE = """white room#{trigger}, 1girl#standing
white room#{trigger}, 1girl#waving
white room#{trigger}, 1girl#sitting
"""

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A stand-in base and a train stage with no candidates: the sweep renders the base row."""
    root = tmp_path_factory.mktemp("consistent_sweep")
    write_base(ModelConfig(family="sd15", source="stand_in", resolution=64), root / "base")
    write_json(root / "train" / "summary.json", {"candidates": []})
    (root / "suite.txt").write_text(SUITE)
    return root


@pytest.fixture(scope="module")
def engine(workspace: Path) -> GenerationEngine:
    return GenerationEngine(workspace / "base", device="cpu")


def _eval(workspace: Path, **suite: object) -> EvalConfig:
    return EvalConfig(
        prompts=["{trigger}, portrait"],
        seeds=[0],
        lora_scales=[0.0],
        steps=3,
        guidance_scale=4.0,
        scheduler="euler",
        batch_size=2,  # smaller than the group: a consistent group is one batch anyway
        suites={"fixed": {"file": str(workspace / "suite.txt"), "seeds": [0], **suite}},
    )


def _pixels(path: Path) -> bytes:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB")).tobytes()


def test_a_shared_attention_suite_renders_its_group_together_and_resumes(
    engine: GenerationEngine, workspace: Path, tmp_path: Path
) -> None:
    args = (engine, workspace / "train", "aoi_cf", 64, 7)
    plain = run_sweep(args[0], args[1], _eval(workspace), *args[2:], out_dir=tmp_path / "plain")
    shared_eval = _eval(workspace, method="shared_attention", save_masks=True)
    out = tmp_path / "shared"
    shared = run_sweep(args[0], args[1], shared_eval, *args[2:], out_dir=out)
    rows = shared.index[shared.index["suite"] == "fixed"].sort_values("prompt_index")
    paths = [Path(path) for path in rows["image_path"]]
    plain_rows = plain.index[plain.index["suite"] == "fixed"].sort_values("prompt_index")
    plain_paths = [Path(path) for path in plain_rows["image_path"]]
    # The identity shot renders as alone; the frames attend to it and change.
    assert _pixels(paths[0]) == _pixels(plain_paths[0])
    assert all(_pixels(a) != _pixels(b) for a, b in zip(paths[1:], plain_paths[1:], strict=True))
    # The plain prompt outside the suite is untouched.
    outside = shared.index[shared.index["suite"].isna()]["image_path"].iloc[0]
    assert _pixels(Path(outside)) == _pixels(Path(str(outside).replace("/shared/", "/plain/")))
    # Frames record their identity shot (prompt and seed), so a changed identity re-renders them.
    record = read_sidecar(paths[1])["consistency"]
    assert record["identity"] == {
        "prompt": rows.iloc[0]["prompt"],
        "seed": int(rows.iloc[0]["seed"]),
    }
    # Character masks as overlays (image | red highlight), one per suite image, none elsewhere.
    masks = sorted((out / MASK_DIR).rglob("*.png"))
    assert len(masks) == 3
    with Image.open(masks[0]) as overlay:
        assert overlay.size == (128, 64)
    # A rerun renders nothing; a deleted frame is rendered again, with its identity shot in
    # the batch (not rewritten), to the same bytes.
    frame_bytes = paths[2].read_bytes()
    identity_time = paths[0].stat().st_mtime_ns
    again = run_sweep(args[0], args[1], shared_eval, *args[2:], out_dir=out)
    assert again.rendered == 0
    paths[2].unlink()
    resumed = run_sweep(args[0], args[1], shared_eval, *args[2:], out_dir=out)
    assert resumed.rendered == 1
    assert paths[2].read_bytes() == frame_bytes
    assert paths[0].stat().st_mtime_ns == identity_time


def test_an_ip_adapter_suite_conditions_frames_on_their_identity_shot(
    engine: GenerationEngine, workspace: Path, tmp_path: Path
) -> None:
    args = (engine, workspace / "train", "aoi_cf", 64, 7)
    plain = run_sweep(args[0], args[1], _eval(workspace), *args[2:], out_dir=tmp_path / "plain")
    ip_eval = _eval(workspace, method="ip_adapter", ip_adapter_scale=1.0)
    out = tmp_path / "ip"
    result = run_sweep(args[0], args[1], ip_eval, *args[2:], out_dir=out)
    rows = result.index[result.index["suite"] == "fixed"].sort_values("prompt_index")
    paths = [Path(path) for path in rows["image_path"]]
    plain_rows = plain.index[plain.index["suite"] == "fixed"].sort_values("prompt_index")
    plain_paths = [Path(path) for path in plain_rows["image_path"]]
    assert _pixels(paths[0]) == _pixels(plain_paths[0])  # the identity shot renders alone
    assert all(_pixels(a) != _pixels(b) for a, b in zip(paths[1:], plain_paths[1:], strict=True))
    record = read_sidecar(paths[1])["ip_adapter"]
    identity_file = paths[0].relative_to(out).as_posix()
    assert record["source"] == identity_file and record["scale"] == 1.0
    assert "ip_adapter" not in read_sidecar(paths[0])
    # Resume: nothing to do; the frames read their reference back from disk.
    assert run_sweep(args[0], args[1], ip_eval, *args[2:], out_dir=out).rendered == 0


def test_suite_consistency_options_are_validated(workspace: Path) -> None:
    with pytest.raises(ValueError, match="method"):
        _eval(workspace, method="storydiffusion")
    with pytest.raises(ValueError, match="mask_threshold"):
        _eval(workspace, mask_threshold=2.0)
