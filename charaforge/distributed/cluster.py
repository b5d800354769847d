"""Connecting to Ray: an embedded local Ray (`ray.num_cpus`), or a cluster (`ray.address`, or
the RAY_ADDRESS environment variable: "auto", "ray://head:10001", "host:6379")."""

from __future__ import annotations

import os
from typing import Any

from charaforge.config.resources import RayConfig


def connect(config: RayConfig) -> Any:
    """Join the configured cluster, or start an embedded local Ray once per process."""
    import ray

    if ray.is_initialized():
        return ray
    address = config.address or os.environ.get("RAY_ADDRESS")
    options: dict[str, Any] = {"log_to_driver": False, "include_dashboard": False}
    if address:
        ray.init(address=address, **options)
    else:
        # Ray starts its workers 15 nice levels below the driver (its raylet first); on a machine
        # doing other work the embedded Ray's actors then got half the CPU the in-process sweep
        # got (benchmarks/bench_distributed.py). Ray's own job supervisor sets 0 the same way.
        os.environ.setdefault("RAY_worker_niceness", "0")
        ray.init(num_cpus=config.num_cpus, num_gpus=config.num_gpus, **options)
    return ray
