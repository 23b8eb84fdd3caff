"""Orbax checkpoints of a PRIME run: device state (policy + PRM params and optimiser states) and host state.

Device arrays are saved as the flat leaf list of their pytree, restored straight onto the shardings
of the live state (so a resumed run needs no host copy), asynchronously, keeping the last N.
Host state (step, data position, prompt buffer, RNG seed) is JSON beside them. Resuming from the
latest step continues the run exactly.
"""

from __future__ import annotations

import os
import signal
from typing import Any

import jax
import orbax.checkpoint as ocp


class Checkpointer:
    """Saves/restores {"device": pytree of jax.Arrays, "host": JSON dict} under `<workdir>/checkpoints`."""

    def __init__(self, workdir: str, *, keep: int, async_save: bool = True):
        self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save, create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("device", "host"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, device_state: Any, host_state: dict[str, Any]) -> None:
        """Starts an (async) save; returns once the device arrays are safe to donate/modify."""
        self.manager.save(step, args=ocp.args.Composite(
            device=ocp.args.StandardSave(jax.tree.leaves(device_state)), host=ocp.args.JsonSave(host_state)))

    def restore(self, step: int, like: Any) -> tuple[Any, dict[str, Any]]:
        """Restores step `step` onto the shardings, shapes and structure of `like` (a live state)."""
        leaves, treedef = jax.tree.flatten(like)
        target = [jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding) for x in leaves]
        out = self.manager.restore(step, args=ocp.args.Composite(
            device=ocp.args.StandardRestore(target), host=ocp.args.JsonRestore()))
        if len(out["device"]) != len(leaves):
            raise ValueError(f"checkpoint {self.directory}/{step} holds {len(out['device'])} arrays, the run expects {len(leaves)}")
        return jax.tree.unflatten(treedef, out["device"]), dict(out["host"])

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


class StopOnSignal:
    """Turns SIGTERM (spot/preemptible TPU shutdown) into a flag the loop checks after each step."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = True

    def restore(self) -> None:
        signal.signal(signal.SIGTERM, self._previous)
