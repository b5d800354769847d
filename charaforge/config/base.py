"""The base of every config section: unknown keys are errors, values are frozen."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Strict(BaseModel):
    # strict: no coercion, so `seed: true` is not 1 and `steps: "10"` is not 10 (YAML already
    # gives the right types; a wrong one is a typo worth naming). Tuples from YAML lists opt out
    # per field.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)
