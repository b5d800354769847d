"""Connecting to Ray: an embedded local Ray (`ray.num_cpus`), or a cluster (`ray.address`, or
the RAY_ADDRESS environment variable: "auto", "ray://head:10001", "host:6379")."""

from __future__ import annotations

import logging
import os
from typing import Any

from charaforge.config.resources import RayConfig

TOKEN_SETUP_LOGGER = "ray._private.authentication.authentication_token_setup"


def connect(config: RayConfig) -> Any:
    """Join the configured cluster, or start an embedded local Ray once per process."""
    import ray

    if ray.is_initialized():
        return ray
    address = config.address or os.environ.get("RAY_ADDRESS")
    # Ray's driver logger at WARNING: its INFO lines ("Started a local Ray instance", where the
    # token was saved) are noise in a stage's log; its warnings and errors still show.
    options: dict[str, Any] = {
        "log_to_driver": False,
        "include_dashboard": False,
        "logging_level": logging.WARNING,
    }
    if address:
        ray.init(address=address, **options)
    else:
        # Ray starts its workers 15 nice levels below the driver (its raylet first); on a machine
        # doing other work the embedded Ray's actors then got half the CPU the in-process sweep
        # got (benchmarks/bench_distributed.py). Ray's own job supervisor sets 0 the same way.
        os.environ.setdefault("RAY_worker_niceness", "0")
        # Ray 2.60 turns token authentication on for a new local cluster (generating the token)
        # and says so in a 250-character warning at every start; nothing to act on for a cluster
        # of our own. (Setting RAY_AUTH_MODE=token instead skips generating the token.)
        logging.getLogger(TOKEN_SETUP_LOGGER).setLevel(logging.ERROR)
        ray.init(num_cpus=config.num_cpus, num_gpus=config.num_gpus, **options)
    return ray
