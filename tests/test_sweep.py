"""The sweep's CharaConsist suites, pose conditions, contact sheets, batching and resume."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from engine_fixtures import (
    make_workspace,
    one_thread,  # noqa: F401  (a fixture: pytest finds it by name)
)
from PIL import Image, ImageDraw

from charaforge.config import EvalConfig
from charaforge.errors import ConfigError
from charaforge.generate.engine import GenerationEngine
from charaforge.generate.prompts import parse_suite
from charaforge.generate.records import read_sidecar
from charaforge.generate.sweep import image_seed, run_sweep

SUITE = """// comment
white room#{trigger}, 1girl#standing
white room#{trigger}, 1girl#waving

forest#{trigger}, 1girl#standing
"""

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = make_workspace(tmp_path_factory.mktemp("sweep"), max_steps=2)
    (root / "suite.txt").write_text(SUITE)
    pose = root / "pose"
    (pose / "skeletons").mkdir(parents=True)
    rows = []
    for image_id, person in (("bbb", True), ("aaa", False), ("ccc", True)):
        rows.append({"image_id": image_id, "has_person": person})
        if person:
            skeleton = Image.new("RGB", (64, 64))
            ImageDraw.Draw(skeleton).line((32, 8, 20 + len(rows), 56), fill=(0, 255, 0), width=3)
            skeleton.save(pose / "skeletons" / f"{image_id}.png")
    pd.DataFrame(rows).to_parquet(pose / "keypoints.parquet")
    return root


@pytest.fixture(scope="module")
def engine(workspace: Path) -> GenerationEngine:
    return GenerationEngine(workspace / "base", device="cpu")


def _eval(workspace: Path, batch_size: int) -> EvalConfig:
    return EvalConfig(
        prompts=["{trigger}, portrait"],
        seeds=[0],
        lora_scales=[0.0, 1.0],
        steps=2,
        guidance_scale=4.0,
        scheduler="euler_a",  # draws noise at every step: per-image generators matter
        batch_size=batch_size,
        suites={"fixed": {"file": str(workspace / "suite.txt"), "seeds": [0, 1]}},
        pose={"enabled": True, "skeletons": 1, "prompt_indices": [0], "seeds": [0]},
    )


def test_characonsist_parsing() -> None:
    prompts = parse_suite(SUITE, "fixed")
    assert [(p.group, p.position, p.identity_shot) for p in prompts] == [
        (0, 0, True),
        (0, 1, False),
        (1, 0, True),
    ]
    assert prompts[1].text("tok") == "tok, 1girl, waving, white room"
    with pytest.raises(ConfigError, match=r"<text>:2: expected"):
        parse_suite("a#b#c\nno hashes here\n", "bad")


def test_sweep_with_suites_and_poses_batches_exactly_and_resumes(
    engine: GenerationEngine, workspace: Path, tmp_path: Path
) -> None:
    evaluation = _eval(workspace, batch_size=4)
    out = tmp_path / "generate"
    done: list[str] = []

    def interrupt(job: object) -> None:
        done.append(job.relative_path())
        if len(done) == 5:
            raise KeyboardInterrupt  # as if the run were killed mid-sweep

    args = (engine, workspace / "train", evaluation, "aoi_cf", 64, 7, out)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(*args, pose_dir=workspace / "pose", on_image=interrupt)
    # Nothing half-written: no temporary files, every PNG has its sidecar, no index yet.
    leftovers = [path for path in out.rglob("*") if path.name.startswith(".")]
    assert leftovers == []
    pngs = sorted(out.rglob("*.png"))
    assert len(pngs) == 5 and all(read_sidecar(path) for path in pngs)
    assert not (out / "index.parquet").exists()

    result = run_sweep(*args, pose_dir=workspace / "pose")
    index = result.index
    # base + 1 checkpoint... (2 steps -> checkpoint 2) x scale 1: 2 cells; per cell:
    # 1 prompt x 1 seed + 3 suite prompts x 2 seeds + 1 pose image = 8.
    assert len(index) == 16 and (result.rendered, result.skipped) == (11, 5)
    suite_rows = index[index["suite"] == "fixed"]
    assert sorted(suite_rows["prompt_group"].unique()) == [0, 1]
    assert suite_rows["identity_shot"].sum() == 8  # two identity shots x 2 seeds x 2 cells
    assert index["suite"].isna().sum() == 4 and index["prompt_group"].isna().sum() == 4
    posed = index[index["pose_image_id"].notna()]
    assert list(posed["pose_image_id"]) == ["bbb", "bbb"]  # first person in image_id order
    plain = index[(index["prompt_index"] == 0) & index["pose_image_id"].isna()]
    assert set(posed["seed"]) == set(plain["seed"]) == {image_seed(7, 0, 0)}  # paired
    assert set(posed["image_id"]).isdisjoint(plain["image_id"])  # the pose changes the image
    assert read_sidecar(posed.iloc[0]["image_path"])["conditioning"]["source"] == "bbb"
    stored = pd.read_parquet(out / "index.parquet")
    assert stored.equals(index)
    # Contact sheet per candidate: rows = 4 prompts, columns = base + 1 checkpoint.
    (grid,) = result.grids
    assert grid == out / "grids" / "r4.png"
    assert Image.open(grid).size == (40 + 2 * 96, 32 + 4 * 96)

    # One image per call gives the very same bytes as batches of 4.
    single = run_sweep(
        engine,
        workspace / "train",
        _eval(workspace, batch_size=1),
        "aoi_cf",
        64,
        7,
        tmp_path / "single",
        pose_dir=workspace / "pose",
    )
    assert list(single.index["image_id"]) == list(index["image_id"])


def test_pose_conditions_need_the_pose_stage(
    engine: GenerationEngine, workspace: Path, tmp_path: Path
) -> None:
    with pytest.raises(ConfigError, match="keypoints.parquet not found"):
        run_sweep(
            engine,
            workspace / "train",
            _eval(workspace, 2),
            "t",
            64,
            0,
            tmp_path / "o",
            pose_dir=tmp_path,
        )
    with pytest.raises(ValueError, match="pose.prompt_indices"):
        EvalConfig(
            prompts=["x"],
            seeds=[0],
            lora_scales=[1.0],
            steps=1,
            guidance_scale=1,
            scheduler="euler",
            pose={"enabled": True, "prompt_indices": [3]},
        )


def test_fused_batches_are_the_plans_chunks_so_a_resumed_sweep_gives_the_same_bytes(
    workspace: Path, tmp_path: Path
) -> None:
    """In fused mode an image's bytes depend on its batch: the batches are fixed chunks of the
    plan, a chunk with a missing image renders whole, and the sidecar names the batch."""
    fused = GenerationEngine(workspace / "base", device="cpu", batch_mode="fused")
    evaluation = EvalConfig(
        prompts=["{trigger}, portrait", "{trigger}, smiling"],
        seeds=[0, 1],
        lora_scales=[0.0, 1.0],
        steps=2,
        guidance_scale=4.0,
        scheduler="euler_a",
        batch_size=3,  # 4 images a cell: chunks of 3 and 1
    )
    args = (fused, workspace / "train", evaluation, "aoi_cf", 64, 7)
    whole = run_sweep(*args, tmp_path / "whole")
    chunks = [read_sidecar(path)["fused_batch"] for path in whole.index["image_path"]]
    assert [chunk["size"] for chunk in chunks] == [3, 3, 3, 1] * 2
    assert len({chunk["members"] for chunk in chunks}) == 4

    out = tmp_path / "resumed"
    run_sweep(*args, out)
    # The second image of the first chunk goes missing (as after a kill).
    missing = out / Path(whole.index["image_path"].iloc[1]).relative_to(tmp_path / "whole")
    missing.unlink()
    missing.with_suffix(".json").unlink()
    resumed = run_sweep(*args, out)
    assert (resumed.rendered, resumed.skipped) == (1, 7)
    assert list(resumed.index["image_id"]) == list(whole.index["image_id"])
    # Every sidecar now names the batch a rerun would use: nothing is rendered again.
    assert run_sweep(*args, out).rendered == 0
