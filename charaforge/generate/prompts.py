"""CharaConsist prompt suites: `background#character#action` lines, groups separated by blank
lines, the first line of a group being the identity shot.

A fixed-background suite keeps one background through a group while the action changes; a
changing-background suite keeps the action while the background changes. `{trigger}` in any
field is replaced by the LoRA's trigger word.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from charaforge.config import PLACEHOLDER, PROMPT_PLACEHOLDERS, EvalConfig
from charaforge.errors import ConfigError


@dataclass(frozen=True)
class SuitePrompt:
    suite: str
    group: int
    position: int  # 0 = the group's identity shot
    background: str
    character: str
    action: str

    @property
    def identity_shot(self) -> bool:
        return self.position == 0

    def text(self, trigger: str) -> str:
        """The prompt: character first (it carries the trigger), then action, then background."""
        parts = [self.character, self.action, self.background]
        return ", ".join(part.replace("{trigger}", trigger) for part in parts if part)


def parse_suite(text: str, suite: str, source: str = "<text>") -> list[SuitePrompt]:
    """Parse a suite; a malformed line fails with its file and line number."""
    prompts: list[SuitePrompt] = []
    group, position = 0, 0
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line:
            if position:
                group, position = group + 1, 0
            continue
        if line.startswith("//"):  # comment lines are allowed
            continue
        fields = [field.strip() for field in line.split("#")]
        if len(fields) != 3 or not fields[1]:
            raise ConfigError(
                f"{source}:{number}: expected `background#character#action` with a character, "
                f"got {line!r}"
            )
        # As for eval.prompts: only `{trigger}` is filled in, so a typo such as `{trigerr}`
        # would be rendered literally into every frame of the suite.
        unknown = sorted(set(PLACEHOLDER.findall(line)) - PROMPT_PLACEHOLDERS)
        if unknown:
            names = ", ".join("{" + name + "}" for name in unknown)
            raise ConfigError(
                f"{source}:{number}: unknown placeholder {names}; the known one is {{trigger}}"
            )
        prompts.append(SuitePrompt(suite, group, position, *fields))
        position += 1
    if not prompts:
        raise ConfigError(f"{source}: no prompts")
    return prompts


def read_suite(path: str | Path, suite: str) -> list[SuitePrompt]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"eval.suites.{suite}: {path} not found")
    return parse_suite(path.read_text(encoding="utf-8"), suite, str(path))


def check_suites(eval: EvalConfig, root: str | Path = ".") -> None:
    """Read and check every suite file of `eval` (a missing file, a malformed line, an unknown
    placeholder), so that the sweep refuses them before loading any model."""
    for name, suite in sorted(eval.suites.items()):
        read_suite(Path(root) / suite.file, name)
