"""Orbax checkpoints of a PRIME run: device state (policy + PRM params and optimiser states) and host state.

Device arrays are saved as a named tree: every leaf under its path in the live state
(`policy/params/layers/gate/value`, `prm/opt_state/inner_state/1/0/mu/...`). Restore matches entries by name
and shape, so a renamed, missing, extra or mis-shaped entry is a one-line error naming it and two
same-shaped leaves can never trade places; checkpoints of the older positional format (a flat leaf
list) are refused as such. Arrays are restored straight onto the shardings of the live state (a
resumed run needs no host copy), saved asynchronously, keeping the last N. Host state (step, data
position, prompt buffer) is JSON beside them. Resuming from the latest step continues the run exactly.

The directory may be local or `gs://` (orbax writes through tensorstore and epath). Every process
takes part in every save and restore (each writes its own shards; orbax writes the JSON and the
metadata from process 0); a step becomes visible only once orbax has finalised it (an atomic rename
locally, a commit marker on GCS), so `latest_step` never returns a half-written step.
"""

from __future__ import annotations

import signal
from typing import Any

import jax
import orbax.checkpoint as ocp

from prime_jax import paths


class Checkpointer:
    """Saves/restores {"device": pytree of jax.Arrays, "host": JSON dict} under `<workdir>/checkpoints`."""

    def __init__(self, workdir: str, *, keep: int, async_save: bool = True):
        self.directory = paths.path(workdir) / "checkpoints"
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save, create=True)
        handlers = {"device": ocp.StandardCheckpointHandler(), "host": ocp.JsonCheckpointHandler()}
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("device", "host"),
                                             item_handlers=handlers)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, device_state: Any, host_state: dict[str, Any]) -> None:
        """Starts an (async) save; returns once the device arrays are safe to donate/modify."""
        self.manager.save(step, args=ocp.args.Composite(
            device=ocp.args.StandardSave(_nest(named_leaves(device_state))), host=ocp.args.JsonSave(host_state)))

    def restore(self, step: int, like: Any) -> tuple[Any, dict[str, Any]]:
        """Restores step `step` onto the names, shardings, shapes and structure of `like` (a live state);
        ValueError naming the first entry that does not match."""
        where = f"checkpoint {self.directory}/{step}"
        saved = self.manager.item_metadata(step)["device"]
        saved = getattr(saved, "tree", saved)
        if not isinstance(saved, dict):
            raise ValueError(f"{where} is in the older positional format (a flat list of arrays, matched by order "
                             "only); it cannot be restored safely: start from a fresh workdir")
        saved_shapes = {name: tuple(meta.shape) for name, meta in _flatten(saved).items()}
        live = named_leaves(like)
        check_entries(where, saved_shapes, {name: tuple(x.shape) for name, x in live.items()})
        target = {name: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding) for name, x in live.items()}
        out = self.manager.restore(step, args=ocp.args.Composite(
            device=ocp.args.StandardRestore(_nest(target)), host=ocp.args.JsonRestore()))
        restored = _flatten(out["device"])
        return jax.tree.unflatten(jax.tree.structure(like), [restored[name] for name in live]), dict(out["host"])

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def named_leaves(tree: Any) -> dict[str, Any]:
    """{path name: leaf} of a pytree, in leaf order; names join the path's keys with '/'."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {"/".join(_key_name(k) for k in key_path): leaf for key_path, leaf in flat}


def check_entries(where: str, saved: dict[str, tuple], live: dict[str, tuple]) -> None:
    """ValueError (one line, naming the entry) unless both {name: shape} maps hold the same names and shapes."""
    def more(names: list[str]) -> str:
        return f" (and {len(names) - 1} more)" if names[1:] else ""

    missing = [name for name in live if name not in saved]
    extra = [name for name in saved if name not in live]
    if missing or extra:
        parts = [f"lacks entry {missing[0]!r} of the run{more(missing)}"] if missing else []
        parts += [f"has entry {extra[0]!r} the run does not{more(extra)}"] if extra else []
        raise ValueError(f"{where} does not match the run: it {' and '.join(parts)}")
    for name, shape in live.items():
        if saved[name] != shape:
            raise ValueError(f"{where} does not match the run: entry {name!r} has shape {saved[name]}, "
                             f"the run's {shape}")


def _key_name(key: Any) -> str:
    for attr in ("name", "key", "idx"):  # GetAttrKey, DictKey / FlattenedIndexKey, SequenceKey
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def _nest(flat: dict[str, Any]) -> dict[str, Any]:
    """{'a/b': x} -> {'a': {'b': x}}: the tree orbax stores under the same names."""
    out: dict[str, Any] = {}
    for name, value in flat.items():
        *parents, leaf = name.split("/")
        node = out
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """The inverse of `_nest`."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, name + "/"))
        else:
            out[name] = value
    return out


class StopOnSignal:
    """Turns SIGTERM (spot/preemptible TPU shutdown) into a flag the loop checks after each step."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = True

    def restore(self) -> None:
        signal.signal(signal.SIGTERM, self._previous)
