"""A fast, quiet command line: help and argument errors import nothing heavy; errors list what
exists; other libraries' noise stays out of a non-terminal log and no line there is over 200
characters. Each check runs a real `python` process with stderr a pipe (not a terminal)."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from charaforge import cli
from charaforge.core.layout import checkpoint_path
from charaforge.core.logs import NATIVE_NOISE, LineStream, brief_metrics

ROOT = Path(__file__).resolve().parents[1]
# (pydantic is not in the list: typer itself uses it to convert arguments.)
HEAVY = ("torch", "diffusers", "transformers", "pandas", "mlflow", "fastapi", "numpy")
# Runs the CLI in-process, then reports which heavy modules the run imported.
RUN_CLI = textwrap.dedent(
    """
    import sys
    from charaforge.cli import app
    try:
        app(sys.argv[1:], prog_name="charaforge")
    except SystemExit as done:
        code = done.code
    else:
        code = 0
    print("HEAVY=" + ",".join(m for m in {heavy!r} if m in sys.modules), file=sys.stderr)
    sys.exit(code)
    """
).format(heavy=HEAVY)


def run_python(code: str, *args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,  # stdout and stderr are pipes: the non-terminal case
        text=True,
        env=env,
        cwd=cwd,
        timeout=240,
    )


def heavy_imports(result: subprocess.CompletedProcess[str]) -> list[str]:
    line = next(line for line in result.stderr.splitlines() if line.startswith("HEAVY="))
    return [name for name in line.removeprefix("HEAVY=").split(",") if name]


def make_candidates(train_dir: Path) -> None:
    for name, steps in {"r4": (2, 4), "r8": (4,)}.items():
        for step in steps:
            folder = checkpoint_path(train_dir / name, step)
            folder.mkdir(parents=True)
            (folder / "pytorch_lora_weights.safetensors").write_bytes(b"")


def test_help_imports_nothing_heavy() -> None:
    result = run_python(RUN_CLI, "--help")
    assert result.returncode == 0, result.stderr
    assert "generate" in result.stdout
    assert heavy_imports(result) == []
    result = run_python(RUN_CLI, "generate", "--help")
    assert result.returncode == 0 and "--lora" in result.stdout
    assert heavy_imports(result) == []


@pytest.mark.parametrize(
    ("lora", "expected"),
    [
        ("r4@3", "candidate 'r4' has no checkpoint at step '3'; its steps: 2, 4"),
        ("r4@last", "has no checkpoint at step 'last'; its steps: 2, 4"),
        ("nobody@2", "trained candidates: r4 (steps 2, 4), r8 (steps 4)"),
        ("r4@2:big", "bad scale 'big'"),
        ("r4:", "bad scale ''"),
    ],
)
def test_lora_errors_list_what_exists_before_loading_anything(
    tmp_path: Path, lora: str, expected: str
) -> None:
    make_candidates(tmp_path / "train")
    args = ["generate", "x", "--lora", lora, "--train-dir", str(tmp_path / "train")]
    result = run_python(RUN_CLI, *args, "--base", str(tmp_path / "no-base"))
    assert result.returncode == 2
    assert expected in result.stderr
    assert "Traceback" not in result.stderr
    # The LoRA is checked before the base model is loaded: torch was never imported.
    assert "torch" not in heavy_imports(result)


def test_other_argument_errors_exit_2_without_torch(tmp_path: Path) -> None:
    for args, expected in [
        (["--preset", "turbo"], "--preset 'turbo': expected one of draft, standard"),
        (["--scheduler", "plms"], "--scheduler 'plms': expected one of euler"),
        (["--mask", "m.png"], "--mask needs --init-image"),
    ]:
        result = run_python(RUN_CLI, "generate", "x", *args)
        assert result.returncode == 2, args
        assert expected in result.stderr
        assert "torch" not in heavy_imports(result)


def test_resolve_lora_picks_the_named_or_last_step(tmp_path: Path) -> None:
    make_candidates(tmp_path)
    name, file = cli.resolve_lora("r4", tmp_path)
    assert name == "r4-4" and file.parent == checkpoint_path(tmp_path / "r4", 4)
    name, file = cli.resolve_lora("r4@2", tmp_path)
    assert name == "r4-2" and file.parent == checkpoint_path(tmp_path / "r4", 2)
    assert cli.parse_lora_spec("r4@2:0.5") == ("r4@2", 0.5)
    assert cli.parse_lora_spec("r4") == ("r4", 1.0)


def test_help_defaults_equal_the_modules_they_copy() -> None:
    from charaforge.pipeline import compose
    from charaforge.serve import http

    assert (cli.DEFAULT_HOST, cli.DEFAULT_PORT) == (http.DEFAULT_HOST, http.DEFAULT_PORT)
    assert cli.DEFAULT_CONFIG == compose.DEFAULT_CONFIG


# Real noise makers: MediaPipe's pose graph (C++ lines on fd 2), open_clip's stand-in CLIP (INFO
# lines on the root logger), bitsandbytes' CPU optimizer, tqdm bars (one with a long label);
# and what must still show: our own log lines, another library's warning, a native error line.
NOISY_RUN = textwrap.dedent(
    """
    import logging, os, sys
    from charaforge.core.logs import configure_logging
    configure_logging()
    import bitsandbytes, numpy as np, open_clip, torch
    from PIL import Image
    from skimage import data
    from tqdm.auto import tqdm
    from charaforge.config import PoseConfig
    from charaforge.prepare.pose import PoseDetector

    config = PoseConfig(backend="mediapipe", model_complexity=1, min_detection_confidence=0.5)
    with PoseDetector(config) as detector:
        found = detector.detect(Image.fromarray(data.astronaut())).has_person
        os.write(2, b"E0000 00:00:1.0  7 real.cc:1] a native error stays\\n")
    from charaforge.models.face import MediaPipeFaceDetector  # its Face Mesh graph writes too

    mesh = MediaPipeFaceDetector(0.5)
    mesh.detect(np.ascontiguousarray(data.astronaut()))
    mesh.close()
    logging.getLogger("charaforge").info("person found: %s", found)
    open_clip.create_model("ViT-B-32", pretrained=None)
    bitsandbytes.optim.AdamW8bit([torch.nn.Parameter(torch.zeros(8))]).step()
    for _ in tqdm(range(300), desc="a long label " * 30):
        pass
    for _ in tqdm(range(3000), mininterval=0):
        pass
    logging.getLogger("somelib").warning("a warning a user can act on")
    """
)


def test_a_non_terminal_log_is_quiet_and_has_short_lines() -> None:
    result = run_python(NOISY_RUN)
    assert result.returncode == 0, result.stderr[-3000:]
    # Split at newlines only: a line a log file keeps is one, however many `\r` repaints it holds.
    lines = (result.stdout + result.stderr).split("\n")
    assert max(len(line) for line in lines) <= 200
    text = "\n".join(lines)
    assert "person found: True" in text
    assert "a warning a user can act on" in text
    assert "a native error stays" in text
    assert "100%" in text  # bars still report, one line per repaint
    for noise in ("INFO root:", "inference_feedback_manager", "XNNPACK", "absl::InitializeLog"):
        assert noise not in text, noise
    assert not any(NATIVE_NOISE.search(line) for line in lines)
    assert "No pretrained weights loaded" not in text


def test_repaints_stay_on_their_own_lines_beside_another_writer() -> None:
    """Two processes sharing one log (the world stage's workers): a bar's repaint is ended at once,
    so the other's log line never continues it; tqdm's closing newline adds no empty line."""
    log = io.StringIO()
    bar, other = LineStream(log), LineStream(log)
    bar.write("\rworld VAE:  10%|#   | 1/10")
    other.write("INFO world CLIP: loss 7.5 -> 2.5\n")
    bar.write("\rworld VAE: 100%|####| 10/10" + " " * 5)
    bar.write("\n")
    other.write("done\n")
    assert log.getvalue().split("\n") == [
        "world VAE:  10%|#   | 1/10",
        "INFO world CLIP: loss 7.5 -> 2.5",
        "world VAE: 100%|####| 10/10",
        "done",
        "",
    ]


def test_a_stage_s_bars_repaint_rarely_in_a_log() -> None:
    """A stage module imports tqdm before `run_stage` sets up logging; the `stages` package sets
    tqdm's switches first (python -m stages.<name> imports it before the module)."""
    code = textwrap.dedent(
        """
        import time
        import stages
        from tqdm import tqdm
        from charaforge.core.logs import configure_logging
        configure_logging()
        for _ in tqdm(range(60), desc="train"):
            time.sleep(0.02)
        """
    )
    # Not inherited from this process (an in-process stage test may have set them here).
    env = {k: v for k, v in os.environ.items() if not k.startswith("TQDM_")}
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**env, "PYTHONPATH": str(ROOT)},
        cwd=ROOT,
        timeout=240,
    )
    assert result.returncode == 0, result.stderr
    bars = [line for line in result.stderr.split("\n") if line.startswith("train")]
    # The first repaint and the last (100%); a repaint every 0.1 s would give about a dozen.
    assert len(bars) == 2 and "100%" in bars[-1], bars


def test_a_metrics_log_line_is_short_with_the_weakest_values_first() -> None:
    metrics = {"clip_loss_first": 7.5357, "clip_loss_last": 2.5306, "clip_logit_scale": 16.06}
    metrics |= {f"clip_zero_shot_attribute_number_{i}": 0.99 - i / 100 for i in range(12)}
    line = brief_metrics(metrics, "clip_")
    assert len(line) <= 155 and line.endswith(", ...")
    assert line.startswith("loss 7.54 -> 2.53, zero_shot_attribute_number_11 0.88, ")
    assert "logit_scale" not in line
