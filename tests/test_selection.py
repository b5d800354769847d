"""The selection package's parts: one bootstrap, paired differences, the input error contract,
the templates (escaping, blocks, packaging) and the stage's one-line "run stage X first".

Inputs are the synthetic sweep of test_score_report (real PNGs and parquet tables).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from importlib import resources
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from test_score_report import _make_generate, _make_train_and_base, _report, _synthetic_scores

from charaforge.core.files import write_json, write_parquet
from charaforge.errors import MissingInputError
from charaforge.selection import render, statistics, tracking
from charaforge.selection.ground_truth import read_ground_truth


@pytest.fixture
def report_repo(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    _make_generate(root)
    _make_train_and_base(root)
    _synthetic_scores(root, ("r8_lr3e-4", 4, 1.0))
    return root


# --- statistics ----------------------------------------------------------------------------


def test_bootstrap_interval_is_numpy_resampling_with_the_given_seed() -> None:
    """Known answer built by hand: default_rng(seed).integers(0, n, (draws, n)), percentiles."""
    values = np.random.default_rng(3).normal(0.3, 0.05, 7)
    picks = np.random.default_rng(21).integers(0, 7, size=(500, 7))
    expected = np.quantile(values[picks].mean(axis=1), [0.25, 0.75])
    got = statistics.bootstrap_mean_ci(values, 500, 0.5, seed=21)
    np.testing.assert_array_equal(got, expected)
    # The composite interval is the same resampling with the composite as statistic.
    matrix = np.stack([values, values[::-1]], axis=1)
    weights = np.array([0.25, 0.75])
    composites = statistics.composite_of(matrix[picks], weights)
    np.testing.assert_array_equal(
        statistics.bootstrap_composite_ci(matrix, weights, 500, 0.5, seed=21),
        np.quantile(composites, [0.25, 0.75]),
    )
    with pytest.raises(ValueError, match="empty sample"):
        statistics.bootstrap_mean_ci(np.array([]), 100, 0.9, seed=0)


def _pair_frame(candidate: str, level: np.ndarray) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "candidate": candidate,
            "step": 4,
            "lora_scale": 1.0,
            "prompt_index": np.repeat([0, 1, 2], 2),
            "seed": np.tile([0, 1], 3),
            "clip_i": level,
        }
    )


def test_paired_difference_pairs_on_prompt_and_seed_whatever_the_row_order() -> None:
    spread = np.array([0.1, -0.1, 0.05, -0.05, 0.2, -0.2])
    first, second = _pair_frame("a", 0.5 + spread), _pair_frame("b", 0.49 + spread)
    scores = pd.concat([first, second.iloc[::-1]], ignore_index=True)  # b listed backwards
    difference = statistics.paired_difference(
        scores, first.iloc[0], second.iloc[0], {"clip_i": 1.0}, 200, 0.95, seed=5
    )
    assert difference is not None and difference.pairs == 6
    assert difference.difference == pytest.approx(0.01)
    # Every pair differs by exactly 0.01: so does every resample.
    assert difference.ci_low == pytest.approx(0.01) and difference.ci_high == pytest.approx(0.01)
    assert difference.verdict == "beats"
    unpaired = scores.assign(seed=np.where(scores["candidate"] == "b", scores["seed"] + 10, 0))
    assert (
        statistics.paired_difference(
            unpaired, first.iloc[0], second.iloc[0], {"clip_i": 1.0}, 200, 0.95, seed=5
        )
        is None
    )


# --- inputs: the error contract ------------------------------------------------------------


@pytest.mark.parametrize(
    ("spoil", "stage"),
    [
        (lambda root: (root / "data/score/scores.parquet").unlink(), "score"),
        (lambda root: (root / "data/score/scores.parquet").write_bytes(b"not parquet"), "score"),
        (lambda root: (root / "data/score/scorers.json").unlink(), "score"),
        (lambda root: (root / "data/score/scorers.json").write_text("{"), "score"),
        (lambda root: (root / "data/train/summary.json").unlink(), "train"),
        (lambda root: (root / "data/generate/index.parquet").unlink(), "generate"),
    ],
)
def test_a_missing_or_broken_input_names_the_stage_to_run(
    report_repo: Path, tmp_path: Path, spoil, stage: str
) -> None:
    spoil(report_repo)
    with pytest.raises(MissingInputError, match=f"the `{stage}` stage"):
        _report(report_repo, tmp_path / "reports")
    assert not (tmp_path / "reports").exists()  # checked before anything is written


def test_scores_without_a_needed_column_name_the_score_stage(
    report_repo: Path, tmp_path: Path
) -> None:
    scores = pd.read_parquet(report_repo / "data/score/scores.parquet").drop(columns="seed")
    write_parquet(report_repo / "data/score/scores.parquet", scores)
    with pytest.raises(MissingInputError, match=r"lacks column\(s\) \['seed'\].*`score` stage"):
        _report(report_repo, tmp_path / "reports")


def _with_nn_similarity(root: Path, threshold: float | None) -> None:
    scores = pd.read_parquet(root / "data/score/scores.parquet")
    # Half of every row's images at 0.96, half at 0.99.
    half = scores.groupby(["candidate", "step", "lora_scale"]).cumcount() % 2
    write_parquet(
        root / "data/score/scores.parquet", scores.assign(nn_similarity=0.96 + 0.03 * half)
    )
    scorers = json.loads((root / "data/score/scorers.json").read_text())
    info = {**scorers["clip_i"], "applicable": True}
    if threshold is not None:
        info["copy_threshold"] = threshold
    write_json(root / "data/score/scorers.json", {**scorers, "nn_similarity": info})


def test_the_copy_threshold_is_the_one_the_score_stage_recorded(
    report_repo: Path, tmp_path: Path
) -> None:
    _with_nn_similarity(report_repo, 0.98)  # half the images count as copies: 50% > 25%
    strict = _report(report_repo, tmp_path / "strict", weights={"clip_i": 0.5, "clip_t": 0.5})
    assert strict.table["copy_fraction"].eq(0.5).all() and strict.table["memorising"].all()
    markdown = (tmp_path / "strict/selection.md").read_text()
    assert "CLIP cosine with a training image is at least 0.98" in markdown
    _with_nn_similarity(report_repo, 0.995)  # none does
    lenient = _report(report_repo, tmp_path / "lenient", weights={"clip_i": 0.5, "clip_t": 0.5})
    assert lenient.table["copy_fraction"].eq(0.0).all()
    _with_nn_similarity(report_repo, None)
    with pytest.raises(MissingInputError, match="copy_threshold.*`score` stage"):
        _report(report_repo, tmp_path / "none", weights={"clip_i": 0.5, "clip_t": 0.5})


def test_the_report_stage_without_inputs_says_which_stage_to_run(
    tmp_path: Path, params_dict: dict, repo_root: Path
) -> None:
    """An empty repository with a valid params.yaml: exit 2, one line, no traceback."""
    params_dict["tracking"]["enabled"] = False
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params_dict), encoding="utf-8")
    done = subprocess.run(
        [sys.executable, "-m", "stages.report"],
        cwd=tmp_path,
        env={"PYTHONPATH": str(repo_root), "PATH": str(Path(sys.executable).parent)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "data/score/scores.parquet" in lines[0] and "run the `score` stage first" in lines[0]
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "reports").exists()


# --- rendering -----------------------------------------------------------------------------


def test_text_is_escaped_once_in_html_and_pipes_in_markdown(
    report_repo: Path, tmp_path: Path
) -> None:
    index = pd.read_parquet(report_repo / "data/generate/index.parquet")
    index["prompt"] = index["prompt"] + ' | "q" it\'s <b>&'
    write_parquet(report_repo / "data/generate/index.parquet", index)
    scores = pd.read_parquet(report_repo / "data/score/scores.parquet")
    write_parquet(report_repo / "data/score/scores.parquet", scores.assign(prompt=index["prompt"]))
    _report(report_repo, tmp_path / "reports")
    page = (tmp_path / "reports/selection.html").read_text()
    escaped = " | &quot;q&quot; it&#x27;s &lt;b&gt;&amp;"  # html.escape, not Jinja's &#34;
    assert page.count(escaped) == 2 * 2 + 2  # two contact sheets, per-prompt table: 2 prompts
    assert "<b>&" not in page and "&amp;amp;" not in page  # escaped, and only once
    markdown = (tmp_path / "reports/selection.md").read_text()
    assert ' \\| "q" it\'s <b>&' in markdown  # Markdown text as is, the pipe escaped
    assert "(candidate &quot;base&quot;, no LoRA)" in page  # the rule's quotes too


def test_both_pages_have_one_block_per_section() -> None:
    """A new report section (issue 10's ground truth) is one block per template."""
    markdown = render._environment(autoescape=False).get_template("selection.md.j2")
    page = render._environment(autoescape=True).get_template("selection.html.j2")
    shared = {
        "banner",
        "champion",
        "selection_rule",
        "ranking",
        "breakdown",
        "ground_truth",
        "scorers",
        "candidates",
        "champion_card",
        "dataset",
        "provenance",
        "axes",  # suite methods and control types side by side (selection.axes)
        "mlflow",  # links to the runs and the champion's model version (selection.mlflow_links)
    }
    # Markdown splits the wide ranking: the full table is its own section further down.
    assert set(markdown.blocks) == shared | {"all_metrics"}
    assert set(page.blocks) == shared | {"plots", "contact_sheets", "training"}


def test_the_templates_ship_with_the_package(repo_root: Path) -> None:
    shipped = sorted(
        entry.name
        for entry in resources.files("charaforge.selection").joinpath("templates").iterdir()
    )
    assert shipped == ["selection.html.j2", "selection.md.j2", "tables.html.j2", "tables.md.j2"]
    pyproject = tomllib.loads((repo_root / "pyproject.toml").read_text(encoding="utf-8"))
    globs = pyproject["tool"]["setuptools"]["package-data"]["charaforge.selection"]
    assert all(any(Path("templates", name).match(pattern) for pattern in globs) for name in shipped)
    assert any(
        dependency.startswith("jinja2") for dependency in pyproject["project"]["dependencies"]
    )


def test_tracking_logs_every_metric_column_but_keys_and_flags(
    report_repo: Path, tmp_path: Path
) -> None:
    selection = _report(report_repo, tmp_path / "reports")
    assert tracking.metric_columns(selection.table) == [
        "clip_i",
        "clip_t",
        "composite",
        "copy_fraction",
    ]


def test_ground_truth_summarises_the_oracle_per_ranked_row(tmp_path: Path) -> None:
    """The oracle's section: hand-computed means per row, in ranking order; absent without it."""
    ranking = pd.DataFrame(
        {"candidate": ["good", "base"], "step": [600, 0], "lora_scale": [1.0, 0.0]}
    )
    assert read_ground_truth(tmp_path, ranking, 200, 0.95, 0) is None
    judged = pd.DataFrame(
        {
            "candidate": ["base", "base", "good", "good", "good"],
            "step": [0, 0, 600, 600, 600],
            "lora_scale": [0.0, 0.0, 1.0, 1.0, 1.0],
            "oracle_identity": [0.2, 0.4, 1.0, 0.6, 0.8],
            "oracle_prompt_following": [1.0, 0.0, 1.0, 1.0, float("nan")],
        }
    )
    judged.to_parquet(tmp_path / "oracle.parquet")
    table = read_ground_truth(tmp_path, ranking, 200, 0.95, 0).table
    assert table["candidate"].tolist() == ["good", "base"]
    assert table["identity"].tolist() == pytest.approx([0.8, 0.3])
    assert table["character_right"].tolist() == pytest.approx([1 / 3, 0.0])
    assert table["prompt_following"].tolist() == pytest.approx([1.0, 0.5])
    assert table["n_images"].tolist() == [3, 2]
    assert (table["identity_ci_low"] <= table["identity"]).all()
    assert (table["identity"] <= table["identity_ci_high"]).all()
