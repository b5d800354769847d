"""The LoRA registry: named LoRAs in one folder, with trigger words and default scales.

`<lora_dir>/registry.yaml` (optional) names LoRAs:

    loras:
      aoi:
        file: aoi/aoi-000016.safetensors   # relative to the LoRA folder
        trigger_words: [aoi_cf]
        default_scale: 0.8
        description: Aoi, trained by CharaForge (r4, lr 1e-3)

Any `*.safetensors` directly in the folder is also available under its file stem; its trigger
words come from the kohya metadata (`modelspec.trigger_phrase`, `ss_tag_frequency` is ignored).
Names and files never reach outside the folder: names are plain words, files are resolved
(symlinks included) and must stay inside it.

Trained candidates are served too, with no registry file: every exported checkpoint of the train
stage's folder is `<candidate>@<step>` (its trigger from the kohya file's metadata), `<candidate>`
names its last checkpoint, and `champion` names the checkpoint the latest selection report chose
(`reports/metrics.json`, the selection the MLflow `@champion` alias names), with the champion's
LoRA scale as its default scale.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from charaforge.core import layout
from charaforge.errors import ConfigError
from charaforge.generate.loras import a1111_lora_file

REGISTRY_FILE = "registry.yaml"
CHAMPION = "champion"
# `@` only separates a candidate from its step: a name still never holds a separator or a dot.
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_@-]{0,79}$"
_NAME = re.compile(NAME_PATTERN)


class LoraEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    file: str = Field(min_length=1)
    trigger_words: list[str] = []
    default_scale: float = Field(default=1.0, ge=-4.0, le=4.0)
    description: str = ""


class RegistryFile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    loras: dict[str, LoraEntry] = {}


@dataclass(frozen=True)
class RegisteredLora:
    name: str
    file: Path
    trigger_words: tuple[str, ...]
    default_scale: float
    description: str
    aliases: tuple[str, ...] = ()


class LoraNotFound(KeyError):
    """No LoRA of that name in the folder (or the name is not acceptable)."""


def check_name(name: str) -> str:
    """A LoRA name is a plain word: no separators, no dots, so it can never name a path."""
    if not _NAME.match(name):
        raise ValueError(
            f"LoRA name {name[:80]!r}: use 1-80 letters, digits, '_', '-' or '@' (starting with "
            "a letter or digit)"
        )
    return name


class LoraRegistry:
    """The LoRAs a person may load by name (CLI, HTTP)."""

    def __init__(
        self,
        lora_dir: str | Path,
        train_dir: str | Path | None = None,
        reports_dir: str | Path | None = None,
    ) -> None:
        """`lora_dir` must exist unless `train_dir` is given (then a missing LoRA folder is
        simply empty); `reports_dir` holds the selection's metrics.json (the champion)."""
        self.root = Path(lora_dir).resolve()
        self.train_dir = Path(train_dir).resolve() if train_dir is not None else None
        self.reports_dir = Path(reports_dir) if reports_dir is not None else None
        if not self.root.is_dir() and self.train_dir is None:
            raise ConfigError(f"lora_dir: {lora_dir} is not a folder")
        self._aliases: dict[str, str] = {}
        self._entries = self._read()

    def _read(self) -> dict[str, RegisteredLora]:
        entries: dict[str, RegisteredLora] = {}
        self._aliases = {}
        if self.train_dir is not None:
            entries.update(self._read_trained())
        if not self.root.is_dir():
            return entries
        for file in sorted(self.root.glob("*.safetensors")):
            if _NAME.match(file.stem) and self._in_root(file):
                entries[file.stem] = RegisteredLora(
                    file.stem, file.resolve(), _metadata_triggers(file), 1.0, ""
                )
        registry = self.root / REGISTRY_FILE
        if registry.is_file():
            try:
                raw = yaml.safe_load(registry.read_text(encoding="utf-8")) or {}
                parsed = RegistryFile.model_validate(raw)
            except (yaml.YAMLError, ValidationError) as error:
                raise ConfigError(f"{registry}: invalid registry: {error}") from None
            for name, entry in parsed.loras.items():
                try:
                    check_name(name)
                except ValueError as error:
                    raise ConfigError(f"{registry}: loras.{name}: {error}") from None
                file = self.root / entry.file
                if not self._in_root(file):
                    raise ConfigError(
                        f"{registry}: loras.{name}.file: {entry.file!r} is outside the LoRA folder"
                    )
                if not file.resolve().is_file():
                    raise ConfigError(f"{registry}: loras.{name}.file: {entry.file!r} not found")
                entries[name] = RegisteredLora(
                    name,
                    file.resolve(),
                    tuple(entry.trigger_words),
                    entry.default_scale,
                    entry.description,
                )
        return entries

    def _read_trained(self) -> dict[str, RegisteredLora]:
        """`<candidate>@<step>` for every exported checkpoint; aliases `<candidate>` (last
        step) and `champion` (the latest selection's choice, at its scale)."""
        assert self.train_dir is not None
        entries: dict[str, RegisteredLora] = {}
        if not self.train_dir.is_dir():
            return entries
        for candidate_dir in sorted(p for p in self.train_dir.iterdir() if p.is_dir()):
            steps = [
                step
                for step in layout.candidate_steps(candidate_dir)
                if layout.checkpoint_path(candidate_dir, step).is_file()
            ]
            if not _NAME.match(candidate_dir.name) or not steps:
                continue
            for step in steps:
                name = f"{candidate_dir.name}@{step}"
                file = layout.checkpoint_path(candidate_dir, step).resolve()
                entries[name] = RegisteredLora(
                    name,
                    file,
                    _metadata_triggers(a1111_lora_file(file)),
                    1.0,
                    f"trained candidate {candidate_dir.name}, step {step}",
                )
            self._aliases[candidate_dir.name] = f"{candidate_dir.name}@{steps[-1]}"
        champion = self._champion()
        if champion is not None:
            name, scale = champion
            if name in entries:
                entries[name] = replace(
                    entries[name],
                    default_scale=scale,
                    description=entries[name].description + " (the champion)",
                )
                self._aliases[CHAMPION] = name
        for alias, name in self._aliases.items():
            entries[name] = replace(entries[name], aliases=(*entries[name].aliases, alias))
        return entries

    def _champion(self) -> tuple[str, float] | None:
        """(`<candidate>@<step>`, scale) of the latest selection report, if there is one."""
        if self.reports_dir is None:
            return None
        metrics = self.reports_dir / "metrics.json"
        if not metrics.is_file():
            return None
        try:
            champion = json.loads(metrics.read_text(encoding="utf-8"))["champion"]
            name = f"{champion['candidate']}@{int(champion['step'])}"
            return name, float(champion["lora_scale"])
        except (ValueError, KeyError, TypeError) as error:
            raise ConfigError(f"{metrics}: no readable champion ({error})") from None

    def _in_root(self, path: Path) -> bool:
        return path.resolve().is_relative_to(self.root)

    def _inside(self, path: Path) -> bool:
        if self.train_dir is not None and path.resolve().is_relative_to(self.train_dir):
            return True
        return path.resolve().is_relative_to(self.root)

    def canonical(self, name: str) -> str:
        """The name an alias (`champion`, `<candidate>`) stands for; other names unchanged."""
        return self._aliases.get(name, name)

    def reload(self) -> None:
        self._entries = self._read()

    def names(self) -> list[str]:
        """Every name a request may use (canonical names and aliases)."""
        return sorted({*self._entries, *self._aliases})

    def get(self, name: str) -> RegisteredLora:
        """The entry for `name`; refuses names that are not plain words or not in the folder."""
        try:
            check_name(name)
        except ValueError as error:
            raise LoraNotFound(str(error)) from None
        entry = self._entries.get(self.canonical(name))
        if entry is None or not self._inside(entry.file):
            raise LoraNotFound(f"no LoRA named {name!r} in the LoRA folder")
        return entry

    def entries(self) -> list[RegisteredLora]:
        """One entry per LoRA (aliases are listed in its `aliases`)."""
        return [self._entries[name] for name in sorted(self._entries)]


def _metadata_triggers(file: Path) -> tuple[str, ...]:
    from safetensors import safe_open

    try:
        with safe_open(file, "pt") as handle:
            metadata = handle.metadata() or {}
    except Exception:  # an unreadable file is refused when it is loaded, with its own error
        return ()
    phrase = metadata.get("modelspec.trigger_phrase", "")
    return tuple(word.strip() for word in phrase.split(",") if word.strip())
