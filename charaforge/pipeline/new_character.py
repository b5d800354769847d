"""`charaforge new`: one's own character, start to finish, as a normal DVC experiment.

`new_character` turns a folder of images (or a kohya sd-scripts TOML dataset config) into a
Hydra experiment file `conf/experiment/<name>.yaml` (the `# @package _global_` pattern: it
overrides whatever the primary config sets, the `--model` / `--tagger` choices included, as
`override /model: ...` entries of its defaults list) and the DVC command that runs it:
`dvc exp run -S +experiment=<name> report`. The file is the whole experiment: running that
command again gives the same run. Naming the `report` stage as the target runs exactly the
stages the report needs; the `demo` stage is not among them once `data.source` is the user's
folder, so it never runs for a user's character.

A kohya TOML (`[[datasets]]` / `[[datasets.subsets]]` with `image_dir`, `num_repeats`,
`class_tokens`, `caption_extension`; options fall back from subset to dataset to `[general]`)
is staged into `data/sources/<name>/`: each subset's images with their captions renamed to the
`.txt` sidecars ingest reads. `class_tokens` are not written as captions (kohya uses them when a
caption file is missing): such images count as uncaptioned, and the dataset stage says so.
"""

from __future__ import annotations

import logging
import re
import subprocess
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from charaforge.core.files import atomic_path, write_bytes, write_text
from charaforge.errors import ConfigError

log = logging.getLogger(__name__)

EXPERIMENT_DIR = "conf/experiment"
SOURCES_DIR = "data/sources"  # staged kohya subsets (not a DVC output; data/ is not in git)
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"})
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
# The contexts a new character is evaluated in (eval.from_data), written into the experiment
# file for the user to edit.
FRAMINGS = ["full body", "upper body", "portrait", "full body"]
ACTIONS = ["standing", "sitting", "smiling", "walking"]
BACKGROUNDS = ["white background", "outdoors", "indoors", "city street"]


@dataclass(frozen=True)
class KohyaSubset:
    image_dir: Path
    num_repeats: int
    class_tokens: str | None
    caption_extension: str


@dataclass(frozen=True)
class NewCharacter:
    """What the user asked for: a character name, its trigger word and where its images are."""

    name: str
    trigger: str
    source: Path
    model: str | None = None  # a conf/model choice (tiny_sd15, sd15, sdxl, ...)
    model_path: str | None = None
    tagger: str | None = None  # a conf/tagger choice (clip, wd14, sidecar)
    kohya_repeats: int | None = None
    # More settings, KEY=VALUE (VALUE in YAML), written into the experiment file (a command-line
    # key override would be checked before the file's group overrides apply, and fail).
    overrides: tuple[str, ...] = field(default_factory=tuple)


def _choices(root: Path, group: str) -> list[str]:
    return sorted(path.stem for path in (root / "conf" / group).glob("*.yaml"))


def check_request(root: Path, request: NewCharacter) -> None:
    """Fail with one line naming the bad option before anything is written."""
    if not _NAME.match(request.name):
        raise ConfigError(f"--name {request.name!r}: use letters, digits, '_' or '-'")
    if not request.trigger.strip() or "," in request.trigger:
        raise ConfigError(f"--trigger {request.trigger!r}: one word or phrase without commas")
    if not request.source.exists():
        raise ConfigError(f"{request.source}: not found (a folder of images or a kohya .toml)")
    for group, choice in (("model", request.model), ("tagger", request.tagger)):
        if choice is not None and choice not in _choices(root, group):
            raise ConfigError(
                f"--{group} {choice!r}: not in conf/{group}/; choose one of "
                + ", ".join(_choices(root, group))
            )


def _option(table: Sequence[dict], key: str, default: object) -> object:
    for level in table:
        if key in level:
            return level[key]
    return default


def read_kohya_toml(path: Path) -> list[KohyaSubset]:
    """The subsets of a kohya sd-scripts dataset config; relative `image_dir`s are resolved
    against the TOML file's folder."""
    try:
        config = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as error:
        raise ConfigError(f"{path}: not a readable TOML file ({error})") from None
    general = config.get("general", {})
    subsets = []
    for number, dataset in enumerate(config.get("datasets", [])):
        for index, subset in enumerate(dataset.get("subsets", [])):
            levels = (subset, dataset, general)
            image_dir = subset.get("image_dir")
            if not image_dir:
                raise ConfigError(f"{path}: datasets[{number}].subsets[{index}] has no image_dir")
            folder = (path.parent / str(image_dir)).resolve()
            if not folder.is_dir():
                raise ConfigError(f"{path}: image_dir {image_dir!r}: no such folder ({folder})")
            subsets.append(
                KohyaSubset(
                    image_dir=folder,
                    num_repeats=int(_option(levels, "num_repeats", 1)),
                    class_tokens=_option(levels, "class_tokens", None),
                    caption_extension=str(_option(levels, "caption_extension", ".caption")),
                )
            )
    if not subsets:
        raise ConfigError(f"{path}: no [[datasets.subsets]] with an image_dir")
    return subsets


def stage_kohya_source(subsets: Sequence[KohyaSubset], destination: Path) -> int:
    """Copy each subset's images and captions (as `.txt`) under `destination`; the image count."""
    count = 0
    with atomic_path(destination) as folder:
        folder.mkdir(parents=True)
        for index, subset in enumerate(subsets):
            target = folder / f"{index:02d}_{subset.image_dir.name}"
            target.mkdir()
            for image in sorted(subset.image_dir.iterdir()):
                if not image.is_file() or image.suffix.lower() not in IMAGE_SUFFIXES:
                    continue
                write_bytes(target / image.name, image.read_bytes())
                caption = image.with_suffix(subset.caption_extension)
                if caption.is_file():
                    text = caption.read_text(encoding="utf-8", errors="replace")
                    write_text(target / f"{image.stem}.txt", text)
                count += 1
    return count


def _set(config: dict, override: str) -> None:
    key, sep, value = override.partition("=")
    if not sep or not key.strip() or key.startswith(("+", "~")):
        raise ConfigError(f"--set {override!r}: expected KEY=VALUE, e.g. tagger.clip.threshold=0.3")
    *parents, leaf = key.strip().split(".")
    for name in parents:
        config = config.setdefault(name, {})
        if not isinstance(config, dict):
            raise ConfigError(f"--set {override!r}: {name} is not a section")
    config[leaf] = yaml.safe_load(value)


def experiment_config(request: NewCharacter, source: str) -> dict:
    """The Hydra experiment file's content (a `# @package _global_` override of the primary)."""
    config: dict = {}
    # Group choices: the file's own defaults list (conf/preset/stand_in.yaml says why a primary
    # config keeps its choices out of its own defaults list, so that these win).
    choices = [
        {f"override /{group}": choice}
        for group, choice in (("model", request.model), ("tagger", request.tagger))
        if choice
    ]
    if choices:
        config["defaults"] = [*choices, "_self_"]
    config["data"] = {"source": source, "character": request.name, "trigger": request.trigger}
    if request.kohya_repeats is not None:
        config["data"]["dataset"] = {"kohya_repeats": request.kohya_repeats}
    if request.model_path:
        config["model"] = {"path": request.model_path}
    # Evaluated on its own defining tags in these contexts (charaforge.generate.data_prompts).
    config["eval"] = {
        "prompts": [],
        "from_data": {
            "enabled": True,
            "framings": FRAMINGS,
            "actions": ACTIONS,
            "backgrounds": BACKGROUNDS,
        },
    }
    for override in request.overrides:
        _set(config, override)
    return config


def hydra_overrides(request: NewCharacter) -> list[str]:
    """The command line's Hydra overrides: the experiment alone (its file holds the rest)."""
    return [f"+experiment={request.name}"]


def dvc_command(request: NewCharacter) -> list[str]:
    """`dvc exp run` of the experiment, targeted at `report` (the demo stage is not upstream)."""
    command = ["dvc", "exp", "run"]
    for override in hydra_overrides(request):
        command += ["-S", override]
    return [*command, "report"]


def write_experiment(root: Path, request: NewCharacter) -> Path:
    """Check the request, stage a kohya TOML source, write conf/experiment/<name>.yaml."""
    check_request(root, request)
    source = request.source.resolve()
    if source.is_file():
        if source.suffix.lower() != ".toml":
            raise ConfigError(f"{source}: expected a folder of images or a kohya .toml file")
        subsets = read_kohya_toml(source)
        staged = root / SOURCES_DIR / request.name
        images = stage_kohya_source(subsets, staged)
        log.info("new: staged %d images of %d kohya subsets in %s", images, len(subsets), staged)
        if request.kohya_repeats is None:
            request = NewCharacter(**{**request.__dict__, "kohya_repeats": subsets[0].num_repeats})
        source_text = f"{SOURCES_DIR}/{request.name}"
    else:
        source_text = str(source)
    path = root / EXPERIMENT_DIR / f"{request.name}.yaml"
    header = (
        "# @package _global_\n"
        f"# {request.name}: written by `charaforge new`; edit it and run it again with\n"
        f"#   {' '.join(dvc_command(request))}\n"
    )
    body = yaml.safe_dump(experiment_config(request, source_text), sort_keys=False)
    write_text(path, header + body)
    log.info("new: wrote %s", path.relative_to(root))
    return path


def run_experiment(root: Path, request: NewCharacter) -> int:
    """Run the experiment through DVC (output streamed); DVC's exit code."""
    command = dvc_command(request)
    log.info("new: %s", " ".join(command))
    try:
        return subprocess.run(command, cwd=root, check=False).returncode
    except FileNotFoundError:
        raise ConfigError("dvc: not found on PATH (activate the project's .venv)") from None
