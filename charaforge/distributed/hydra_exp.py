"""A Hydra multirun whose every job is one DVC experiment, so that any Hydra launcher can spread
a hyper-parameter sweep while DVC stays the ledger of results:

    python -m charaforge.distributed.hydra_exp --multirun 'seed=1,2' \
        'train.candidates.0.learning_rate=1e-4,3e-4' [hydra/launcher=submitit_slurm ...]

Hydra composes conf/ for each job (a bad key or value fails before any job starts), and the job
runs `dvc exp run --temp -S <its overrides>` in the directory it was started from: the
experiment runs in its own temporary copy and is recorded by DVC (`dvc exp show`) and MLflow,
as a `dvc queue start` run is. With Hydra's basic launcher the jobs run one after another on
this machine; with hydra-submitit-launcher's `submitit_slurm` each is a SLURM job (GPUs and
time: `hydra.launcher.gpus_per_node=1 hydra.launcher.timeout_min=240`). The stand-in pipeline:
`--config-name stand_in`. Hydra's own files go to .dvc/tmp/hydra (untracked, not copied into
the experiments) unless `hydra.sweep.dir` says otherwise.
"""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig

SWEEP_DIR = "hydra.sweep.dir=.dvc/tmp/hydra/${now:%Y-%m-%d_%H-%M-%S}"


def experiment_command(overrides: list[str]) -> list[str]:
    """The `dvc exp run` of one job's overrides (Hydra syntax, as `-S` takes it)."""
    command = ["dvc", "exp", "run", "--temp"]
    for override in overrides:
        command += ["-S", override]
    return command


@hydra.main(version_base="1.3", config_path="../../conf", config_name="config")
def run_job(config: Any) -> None:
    """One job of the multirun: its overrides as one DVC experiment."""
    del config  # composed only to check the overrides; the experiment composes it again
    hydra_config = HydraConfig.get()
    command = experiment_command(list(hydra_config.overrides.task))
    done = subprocess.run(command, cwd=hydra_config.runtime.cwd, check=False)
    if done.returncode != 0:
        raise SystemExit(done.returncode)  # dvc has said why


def main() -> None:
    if not any(argument.startswith("hydra.sweep.dir=") for argument in sys.argv[1:]):
        sys.argv.append(SWEEP_DIR)
    run_job()


if __name__ == "__main__":
    main()
