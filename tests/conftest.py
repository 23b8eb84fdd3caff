"""Shared test setup: 8 fake CPU devices for sharding tests, tiny model configs and checkpoints.

XLA_FLAGS must be set before jax is imported, so it is set here, at collection time.
Single-device tests simply use the default device; sharding tests build meshes over all 8.
"""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
