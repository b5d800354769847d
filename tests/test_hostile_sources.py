"""A hostile source folder through real `dvc repro`: nothing hangs, every entry is accounted for.

The corpus is built here, outside the project's own demo data: links to nothing, to themselves
and to devices, a FIFO and a socket (reading either blocks), names that are not UTF-8 or hold a
newline, hidden files, AVIF-named garbage, an SVG, a thin strip and a sparse 3 GiB file. DVC used
to hash `data.source` itself and hung or failed on these; now the always-run `scan` stage lists
the folder and `ingest` depends on its table.
"""

from __future__ import annotations

import hashlib
import io
import os
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import stand_in_params_text
from PIL import Image
from test_pipeline import _env, _fresh_copy

pytestmark = pytest.mark.slow


def _png(size: tuple[int, int], colour: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    image = Image.new("RGB", size, colour)
    for x in range(0, size[0], 7):  # some texture so that images differ
        image.putpixel((x, x % size[1]), (255 - colour[0], 0, 0))
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def build_hostile_corpus(root: Path) -> dict[bytes, str]:
    """Every class of hostile entry; returns the expected `status/kind` by raw relative name."""
    root.mkdir()
    raw = os.fsencode(root)
    expected: dict[bytes, str] = {}

    def put(name: bytes, data: bytes, outcome: str) -> None:
        with open(os.path.join(raw, name), "wb") as handle:
            handle.write(data)
        expected[name] = outcome

    put(b"good.png", _png((64, 64), (10, 200, 30)), "kept")
    put(b"good2.png", _png((80, 64), (200, 10, 30)), "kept")
    put(b"good2.txt", b"a caption\n", "ignored/sidecar")
    put(b"caf\xe9.png", _png((64, 72), (30, 30, 200)), "kept")  # Latin-1 name: not UTF-8
    put(b"new\nline.png", _png((72, 64), (90, 90, 20)), "kept")
    put(b".hidden.png", _png((64, 64), (1, 2, 3)), "ignored/hidden")
    put(b"fake.avif", b"\x00\x00\x00\x1cftypavif" + os.urandom(64), "quarantined/not_image")
    put(
        b"drawing.svg",
        b'<svg xmlns="http://www.w3.org/2000/svg" width="64" height="64"></svg>',
        "quarantined/unsupported_format",
    )
    put(b"strip.png", _png((2048, 40), (50, 50, 50)), "quarantined/bad_aspect")
    put(b"notes.md", b"# not an image\n", "ignored/not_image_name")
    with open(os.path.join(raw, b"big.png"), "wb") as handle:
        handle.truncate(3 * 1024**3)  # sparse: 3 GiB by size, no blocks on disk
    expected[b"big.png"] = "quarantined/too_large"
    os.symlink(b"nowhere.png", os.path.join(raw, b"dangling.png"))
    expected[b"dangling.png"] = "quarantined/broken_symlink"
    os.symlink(b"self.png", os.path.join(raw, b"self.png"))
    expected[b"self.png"] = "quarantined/symlink_loop"
    os.mkfifo(os.path.join(raw, b"pipe.png"))
    expected[b"pipe.png"] = "quarantined/not_regular_file"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(os.path.join(root, "sock.png"))  # the socket file stays after close
    listener.close()
    expected[b"sock.png"] = "quarantined/not_regular_file"
    os.symlink(b"/dev/zero", os.path.join(raw, b"zero.png"))  # endless character device
    expected[b"zero.png"] = "quarantined/not_regular_file"
    os.symlink(b"/dev/null", os.path.join(raw, b"null.jpg"))
    expected[b"null.jpg"] = "quarantined/not_regular_file"
    os.symlink(b"/", os.path.join(raw, b"whole_machine"))  # following it would walk everything
    expected[b"whole_machine"] = "ignored/symlinked_folder"
    os.mkdir(os.path.join(raw, b"sub"))
    put(b"sub/nested.png", _png((64, 64), (120, 10, 120)), "kept")
    os.symlink(b"..", os.path.join(raw, b"sub/up"))
    expected[b"sub/up"] = "quarantined/symlink_loop"
    os.mkdir(os.path.join(raw, b".git"))
    put(b".git/HEAD", b"ref: refs/heads/main\n", "unlisted")  # inside a hidden folder
    del expected[b".git/HEAD"]
    expected[b".git"] = "ignored/hidden"
    return expected


def _snapshot(root: Path) -> dict[bytes, str]:
    """Names, types, link targets and (small file) hashes, read without following links."""
    state: dict[bytes, str] = {}
    for folder, folders, files in os.walk(os.fsencode(root)):
        for name in folders + files:
            path = os.path.join(folder, name)
            info = os.lstat(path)
            if stat.S_ISLNK(info.st_mode):
                state[path] = "link:" + os.fsdecode(os.readlink(path))
            elif stat.S_ISREG(info.st_mode) and info.st_size < 1 << 20:
                with open(path, "rb") as handle:
                    state[path] = hashlib.sha256(handle.read()).hexdigest()
            else:
                state[path] = f"{stat.S_IFMT(info.st_mode)}:{info.st_size}"
    return state


def _expected_escape(raw: bytes) -> str:
    # Derived by hand for the two odd names of the corpus, not through escape_name.
    odd = {b"caf\xe9.png": "caf\\xe9.png", b"new\nline.png": "new\\x0aline.png"}
    return odd[raw] if raw in odd else raw.decode()


@pytest.fixture(scope="module")
def hostile_repo(repo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    corpus = tmp_path_factory.mktemp("hostile") / "corpus"
    expected = build_hostile_corpus(corpus)
    workdir = _fresh_copy(repo_root, tmp_path_factory.mktemp("repo"))
    params = yaml.safe_load(stand_in_params_text())
    params["data"]["source"] = str(corpus)
    (workdir / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    before = _snapshot(corpus)
    dvc = str(Path(sys.executable).parent / "dvc")
    # A hang (DVC reading the FIFO) fails the test through the timeout.
    first = subprocess.run(
        [dvc, "repro", "ingest"],
        cwd=workdir,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    second = subprocess.run(
        [dvc, "repro", "ingest"],
        cwd=workdir,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    return {
        "workdir": workdir,
        "corpus": corpus,
        "expected": expected,
        "before": before,
        "after": _snapshot(corpus),
        "first": first,
        "second": second,
    }


def _relative(source_path: str) -> str:
    return source_path.split("/corpus/", 1)[1]


def test_repro_exits_zero_and_leaves_inputs_alone(hostile_repo: dict) -> None:
    first = hostile_repo["first"]
    assert first.returncode == 0, first.stdout + first.stderr
    assert "Traceback" not in first.stderr
    assert hostile_repo["before"] == hostile_repo["after"]


def test_every_entry_is_accounted_for_by_name(hostile_repo: dict) -> None:
    workdir, expected = hostile_repo["workdir"], hostile_repo["expected"]
    scan = pd.read_parquet(workdir / "data/scan/entries.parquet")
    assert sorted(scan["raw_relative_path"]) == sorted(expected)
    manifest = pd.read_parquet(workdir / "data/ingest/manifest.parquet")
    quarantine = pd.read_parquet(workdir / "data/ingest/quarantine.parquet")
    ignored = pd.read_parquet(workdir / "data/ingest/ignored.parquet")
    outcome: dict[str, list[str]] = {}
    for path in manifest["source_path"]:
        outcome.setdefault(_relative(path), []).append("kept")
    for table, status in ((quarantine, "quarantined"), (ignored, "ignored")):
        for path, kind in zip(table["source_path"], table["kind"], strict=True):
            outcome.setdefault(_relative(path), []).append(f"{status}/{kind}")
    want = {_expected_escape(raw): [what] for raw, what in expected.items()}
    assert outcome == want
    assert (quarantine["reason"].str.len() > 10).all()


def test_tables_hold_escaped_names_and_captions(hostile_repo: dict) -> None:
    manifest = pd.read_parquet(hostile_repo["workdir"] / "data/ingest/manifest.parquet")
    by_name = dict(
        zip(manifest["source_path"].map(_relative), manifest["sidecar_text"], strict=True)
    )
    assert by_name["good2.png"] == "a caption"
    assert "caf\\xe9.png" in by_name and "new\\x0aline.png" in by_name


def test_second_repro_rescans_and_skips_ingest(hostile_repo: dict) -> None:
    second = hostile_repo["second"]
    assert second.returncode == 0, second.stdout + second.stderr
    assert "Running stage 'scan'" in second.stdout
    assert "Running stage 'ingest'" not in second.stdout, second.stdout
