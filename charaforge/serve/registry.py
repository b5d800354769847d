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
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from charaforge.errors import ConfigError

REGISTRY_FILE = "registry.yaml"
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$"
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


class LoraNotFound(KeyError):
    """No LoRA of that name in the folder (or the name is not acceptable)."""


def check_name(name: str) -> str:
    """A LoRA name is a plain word: no separators, no dots, so it can never name a path."""
    if not _NAME.match(name):
        raise ValueError(
            f"LoRA name {name!r}: use 1-64 letters, digits, '_' or '-' (starting with a letter "
            "or digit)"
        )
    return name


class LoraRegistry:
    """The LoRAs a person may load by name (CLI, HTTP)."""

    def __init__(self, lora_dir: str | Path) -> None:
        self.root = Path(lora_dir).resolve()
        if not self.root.is_dir():
            raise ConfigError(f"lora_dir: {lora_dir} is not a folder")
        self._entries = self._read()

    def _read(self) -> dict[str, RegisteredLora]:
        entries: dict[str, RegisteredLora] = {}
        for file in sorted(self.root.glob("*.safetensors")):
            if _NAME.match(file.stem) and self._inside(file):
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
                if not self._inside(file):
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

    def _inside(self, path: Path) -> bool:
        return path.resolve().is_relative_to(self.root)

    def reload(self) -> None:
        self._entries = self._read()

    def names(self) -> list[str]:
        return sorted(self._entries)

    def get(self, name: str) -> RegisteredLora:
        """The entry for `name`; refuses names that are not plain words or not in the folder."""
        try:
            check_name(name)
        except ValueError as error:
            raise LoraNotFound(str(error)) from None
        entry = self._entries.get(name)
        if entry is None or not self._inside(entry.file):
            raise LoraNotFound(f"no LoRA named {name!r} in the LoRA folder")
        return entry

    def entries(self) -> list[RegisteredLora]:
        return [self._entries[name] for name in self.names()]


def _metadata_triggers(file: Path) -> tuple[str, ...]:
    from safetensors import safe_open

    try:
        with safe_open(file, "pt") as handle:
            metadata = handle.metadata() or {}
    except Exception:  # an unreadable file is refused when it is loaded, with its own error
        return ()
    phrase = metadata.get("modelspec.trigger_phrase", "")
    return tuple(word.strip() for word in phrase.split(",") if word.strip())
