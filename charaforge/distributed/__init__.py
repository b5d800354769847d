"""Executors for the work that scales out: the candidate grid and the evaluation sweep.

In-process and sequential is the default (nothing to install or start). `ray_grid`: Ray tasks
(one per candidate); `ray_sweep`: engine actors (one per worker); both on an embedded local Ray
or a cluster (`cluster`). `accelerate_sweep`: the sweep's work items split over the processes
of an `accelerate launch`.
Either gives the sequential run's bytes: work items are keyed by content, written atomically,
skipped when already on disk, and merged in plan order.
"""
