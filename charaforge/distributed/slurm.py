"""A Hydra sweep as a SLURM job array, DVC staying the ledger: `python -m
charaforge.distributed.slurm OVERRIDES... > sweep.sbatch` expands the sweep with Hydra's own
parser and sweeper (choice lists, `range()`, the cartesian product of several) and writes an
sbatch script whose array task i runs `dvc exp run --temp` with the i-th override set. Each
experiment runs in its own temporary copy of the repository and is recorded by DVC
(`dvc exp show`) and MLflow, as a local `dvc queue start` run would be. (The other route, a
Hydra launcher such as submitit's running the jobs: hydra_exp.py.)
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence

from charaforge.errors import ConfigError


def expand_sweep(overrides: Sequence[str]) -> list[list[str]]:
    """Every override set of a Hydra multirun sweep, in Hydra's order."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        parsed = OverridesParser.create().parse_overrides(list(overrides))
    except HydraException as error:
        raise ConfigError(f"overrides: {str(error).splitlines()[0]}") from None
    [sets] = BasicSweeper.split_arguments(parsed, None)
    return sets


def sbatch_script(
    sets: Sequence[Sequence[str]],
    gpus: int = 1,
    cpus: int = 8,
    hours: float = 4.0,
    parallel: int | None = None,
    job_name: str = "charaforge-sweep",
) -> str:
    """An sbatch script running one `dvc exp run --temp` per override set (array task)."""
    if not sets:
        raise ConfigError("overrides: the sweep is empty")
    limit = f"%{parallel}" if parallel else ""
    minutes = max(1, round(hours * 60))
    lines = [
        "#!/bin/bash",
        f"#SBATCH --job-name={job_name}",
        f"#SBATCH --array=0-{len(sets) - 1}{limit}",
        f"#SBATCH --gpus={gpus} --cpus-per-task={cpus}",
        f"#SBATCH --time={minutes // 60}:{minutes % 60:02d}:00",
        "#SBATCH --output=slurm-%A_%a.out",
        "set -euo pipefail",
        "# One experiment per array task; DVC records each (dvc exp show), MLflow logs its runs.",
        "SETS=(",
        *(f"  {shlex.quote(shlex.join(overrides))}" for overrides in sets),
        ")",
        'cd "${SLURM_SUBMIT_DIR:-.}"',
        "# Each entry is shell-quoted (shlex.join): eval splits it back into its overrides.",
        'eval "OVERRIDES=(${SETS[$SLURM_ARRAY_TASK_ID]})"',
        "ARGS=()",
        'for override in "${OVERRIDES[@]}"; do ARGS+=(-S "$override"); done',
        'exec dvc exp run --temp "${ARGS[@]}"',
    ]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m charaforge.distributed.slurm [--gpus N ...] OVERRIDES... > sweep.sbatch`."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("overrides", nargs="+", help="Hydra overrides, e.g. seed=1,2,3")
    parser.add_argument("--gpus", type=int, default=1)
    parser.add_argument("--cpus", type=int, default=8)
    parser.add_argument("--hours", type=float, default=4.0)
    parser.add_argument("--parallel", type=int, default=None, help="array tasks at once")
    args = parser.parse_args(argv)
    try:
        sets = expand_sweep(args.overrides)
        sys.stdout.write(sbatch_script(sets, args.gpus, args.cpus, args.hours, args.parallel))
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
