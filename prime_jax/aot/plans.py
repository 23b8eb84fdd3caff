"""A config file's TPU plans: `get_config()` plus its `SHARDING` dict (slice name -> config overrides)."""

from __future__ import annotations

from typing import Any

import ml_collections

from prime_jax.aot.topology import parse_topology
from prime_jax.config import config_module


def load_config_file(path: str) -> tuple[ml_collections.ConfigDict, dict[str, dict[str, Any]]]:
    """A configs/*.py file's `get_config()` and its `SHARDING` plans: slice name -> flattened config overrides
    (e.g. {"mesh.fsdp": 8, "actor.micro_batch_size": 16})."""
    try:
        module = config_module(path)
    except ValueError as e:
        raise ValueError(f"--config: {e}") from None
    plans = getattr(module, "SHARDING", {})
    for name, plan in plans.items():
        parse_topology(name)
        if not isinstance(plan, dict):
            raise ValueError(f"{path}: SHARDING[{name!r}] must be a dict of config overrides, got {plan!r}")
    return module.get_config(), plans


def config_for(base: ml_collections.ConfigDict, plan: dict[str, Any],
               overrides: dict[str, Any]) -> ml_collections.ConfigDict:
    """`base` with a sharding plan applied, then the command line's overrides again (they win)."""
    c = ml_collections.ConfigDict(base.to_dict())
    for key in plan:
        section, _, name = key.rpartition(".")
        node = c[section] if section else c
        if name not in node:
            raise ValueError(f"SHARDING plan: config key {key!r} does not exist")
    c.update_from_flattened_dict(dict(plan))
    c.update_from_flattened_dict(dict(overrides))
    return c
