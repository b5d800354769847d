"""The DVC stages, one thin module each (`python -m stages.<name>`).

Importing the package sets the quiet switches that other libraries read when they are imported
(tqdm's `TQDM_*` defaults, `DIFFUSERS_VERBOSITY`, ...): a stage module imports them at its top,
before `run_stage` sets up logging, which would be too late for them (a training bar would then
print a line per step into a DVC log instead of one every `LOG_PROGRESS_SECONDS`).
"""

from charaforge.core.logs import quiet_environment

quiet_environment()
