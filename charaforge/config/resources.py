"""Where the work runs: the Ray cluster (or an embedded local one) for the candidate grid and
the evaluation sweep. None of it changes a result: outputs are byte-identical wherever they run."""

from __future__ import annotations

from pydantic import Field, field_validator

from charaforge.config.base import Strict


class RayConfig(Strict):
    # None: the RAY_ADDRESS environment variable if set, else an embedded local `ray.init()`;
    # "auto" (a running local cluster), "ray://head:10001" (Ray Client) or "host:6379".
    address: str | None = None
    # CPUs (and GPUs) an embedded local Ray may use; None: Ray's default (all the machine's).
    num_cpus: int | None = Field(default=None, ge=1)
    num_gpus: int | None = Field(default=None, ge=0)
    # GPUs each candidate's training task and each sweep actor asks Ray for (0 on CPU).
    gpus_per_task: float = Field(default=0.0, ge=0.0)
    # A task or actor whose process dies is retried this many times (finished work is kept).
    max_retries: int = Field(default=3, ge=0)

    @field_validator("address")
    @classmethod
    def _address_form(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("give a Ray address (auto, ray://host:port, host:port) or null")
        return value
