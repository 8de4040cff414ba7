"""Multi-process (multi-host) setup: `jax.distributed.initialize` from flags or environment.

Every process runs the same `flaxlm train` command; JAX's own runtime connects
them (the project has no communication layer of its own). The coordinator
address, the process count and this process's id come from, in order:
the `--coordinator`, `--num-processes`, `--process-id` flags; the environment
variables `JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES`, `JAX_PROCESS_ID`;
or JAX's cluster auto-detection (Cloud TPU pod slices, SLURM, Open MPI, ...),
which needs none of them. After it, `jax.devices()` lists the devices of all
processes, each process reads its own shard of the data (`data.process_shard`)
and only process 0 writes logs, metrics and plots.
"""

from __future__ import annotations

import os

import jax


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    return int(value) if value not in (None, "") else None


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> None:
    """Join the multi-process run (call before anything touches a device)."""
    coordinator = coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS") or None
    num_processes = num_processes if num_processes is not None else _env_int("JAX_NUM_PROCESSES")
    process_id = process_id if process_id is not None else _env_int("JAX_PROCESS_ID")
    # CPU processes need a cross-process collectives library (no effect on GPU/TPU devices).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                               process_id=process_id)
