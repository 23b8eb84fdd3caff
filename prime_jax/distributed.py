"""Joining the multi-host runtime (TPU pod workers, GPU hosts, CPU test processes)."""

from __future__ import annotations

import os


def init_distributed() -> None:
    """Joins the multi-host runtime (`distributed=True`): TPU pods auto-detect; GPU hosts read
    JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID (set by launch/gpu.sh)."""
    import jax

    if os.environ.get("JAX_PLATFORMS", "") == "cpu":  # CPU processes (tests) talk over gloo
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    addr = os.environ.get("JAX_COORDINATOR_ADDRESS")
    if addr:
        jax.distributed.initialize(coordinator_address=addr, num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
                                   process_id=int(os.environ["JAX_PROCESS_ID"]))
    else:
        jax.distributed.initialize()
