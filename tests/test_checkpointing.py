"""Named checkpoints: restore by name and shape onto the live shardings; renamed, missing, extra, mis-shaped
and older positional checkpoints refused naming what is wrong; a step killed mid-save is never restored."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from typing import NamedTuple

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from etils import epath
from jax.sharding import NamedSharding, PartitionSpec

from prime_jax.checkpointing import Checkpointer, named_leaves

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Moments(NamedTuple):
    mu: jax.Array
    nu: jax.Array


class SwappedMoments(NamedTuple):  # the same names, declared (and so flattened) in the other order
    nu: jax.Array
    mu: jax.Array


def state(seed: int, moments=Moments, gate: str = "gate") -> dict:
    """A small stand-in of the trainer's {"policy", "prm"} state: same-shaped gate/up and Adam moments,
    sharded over the 8 test devices."""
    mesh = jax.make_mesh((8,), ("fsdp",))
    sharded = NamedSharding(mesh, PartitionSpec("fsdp"))
    rng = np.random.default_rng(seed)

    def arr(*shape):
        return jax.device_put(rng.standard_normal(shape).astype(np.float32), sharded)

    params = {gate: arr(8, 4), "up": arr(8, 4)}
    return {"policy": {"params": params, "opt": moments(mu=arr(8, 4), nu=arr(8, 4))},
            "prm": {"params": {"gate": arr(8, 4), "up": arr(8, 4)}, "step": jax.numpy.asarray(seed)}}


def save(workdir: str, step: int, tree) -> None:
    ckpt = Checkpointer(workdir, keep=3)
    ckpt.save(step, tree, {"step": step})
    ckpt.close()


@pytest.mark.parametrize("where", ["local", "gcs"])
def test_roundtrip_by_name_onto_the_live_shardings(where, tmp_path, request) -> None:
    workdir = str(tmp_path) if where == "local" else f"{request.getfixturevalue('gcs_bucket')}/roundtrip"
    saved = state(0)
    save(workdir, 1, saved)
    like = state(1)
    ckpt = Checkpointer(workdir, keep=3)
    restored, host = ckpt.restore(ckpt.latest_step(), like)
    assert host == {"step": 1}
    for name, value in named_leaves(saved).items():
        np.testing.assert_array_equal(named_leaves(restored)[name], value)
        assert named_leaves(restored)[name].sharding == named_leaves(like)[name].sharding


def test_same_shaped_leaves_in_another_order_restore_by_name(tmp_path) -> None:
    """Positionally, mu and nu (same shape) would trade places; by name each gets its own array."""
    saved = state(0)
    save(str(tmp_path), 1, saved)
    restored, _ = Checkpointer(str(tmp_path), keep=3).restore(1, state(1, moments=SwappedMoments))
    assert isinstance(restored["policy"]["opt"], SwappedMoments)
    np.testing.assert_array_equal(restored["policy"]["opt"].mu, saved["policy"]["opt"].mu)
    np.testing.assert_array_equal(restored["policy"]["opt"].nu, saved["policy"]["opt"].nu)


def test_renamed_parameter_is_refused_naming_it(tmp_path) -> None:
    save(str(tmp_path), 1, state(0))
    with pytest.raises(ValueError, match="lacks entry 'policy/params/gate_proj' of the run and has entry "
                                         "'policy/params/gate' the run does not") as err:
        Checkpointer(str(tmp_path), keep=3).restore(1, state(1, gate="gate_proj"))
    assert "\n" not in str(err.value)


def test_missing_and_mis_shaped_entries_are_refused_naming_them(tmp_path) -> None:
    save(str(tmp_path), 1, state(0))
    bigger = state(1)
    bigger["prm"]["params"]["extra"] = bigger["prm"]["params"]["up"]
    with pytest.raises(ValueError, match="lacks entry 'prm/params/extra' of the run$"):
        Checkpointer(str(tmp_path), keep=3).restore(1, bigger)
    reshaped = state(1)
    reshaped["policy"]["params"]["up"] = jax.numpy.zeros((4, 8))
    with pytest.raises(ValueError, match=r"entry 'policy/params/up' has shape \(8, 4\), the run's \(4, 8\)"):
        Checkpointer(str(tmp_path), keep=3).restore(1, reshaped)


def test_older_positional_checkpoint_is_refused(tmp_path) -> None:
    """A checkpoint as the previous format wrote it (the flat leaf list) is not loaded, whatever its shapes."""
    tree = state(0)
    manager = ocp.CheckpointManager(str(tmp_path / "checkpoints"), options=ocp.CheckpointManagerOptions(create=True),
                                    item_names=("device", "host"))
    manager.save(4, args=ocp.args.Composite(device=ocp.args.StandardSave(jax.tree.leaves(tree)),
                                            host=ocp.args.JsonSave({"step": 4})))
    manager.close()
    ckpt = Checkpointer(str(tmp_path), keep=3)
    assert ckpt.latest_step() == 4
    with pytest.raises(ValueError, match="older positional format"):
        ckpt.restore(4, state(1))


# A process that saves step 1, then starts saving step 2 and SIGKILLs itself as soon as step 2's files
# appear, i.e. while orbax is writing them.
KILLED_MID_SAVE = """
import os, signal, sys, threading, time
import fsspec, jax, numpy as np
from prime_jax.checkpointing import Checkpointer

workdir = sys.argv[1]
ckpt = Checkpointer(workdir, keep=3)
tree = {"policy": {"w": jax.numpy.asarray(np.ones((1024, 1024), np.float32))}}
ckpt.save(1, tree, {"step": 1})
ckpt.wait()
fs, root = fsspec.core.url_to_fs(workdir + "/checkpoints")

def kill_when_step_2_appears():  # listed afresh each time (gcsfs caches listings)
    while not any(os.path.basename(p.rstrip("/")).startswith("2") for p in fs.ls(root, detail=False, refresh=True)):
        time.sleep(0.001)
    os.kill(os.getpid(), signal.SIGKILL)

threading.Thread(target=kill_when_step_2_appears, daemon=True).start()
ckpt.save(2, {"policy": {"w": tree["policy"]["w"] * 2}}, {"step": 2})
time.sleep(60)
"""


def kill_mid_save(workdir: str, env: dict | None = None) -> None:
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(KILLED_MID_SAVE), workdir], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr[-2000:]


@pytest.mark.parametrize("where", ["local", "gcs"])
def test_a_step_killed_mid_save_is_never_restored(where, tmp_path, request) -> None:
    """Locally orbax finalises a step by renaming its temporary directory; on GCS (the local emulator)
    by a commit marker written last. Either way the half-written step 2 is skipped."""
    workdir = str(tmp_path) if where == "local" else f"{request.getfixturevalue('gcs_bucket')}/killed_{tmp_path.name}"
    kill_mid_save(workdir)
    assert any(p.name.startswith("2") for p in (epath.Path(workdir) / "checkpoints").iterdir())  # being written
    ckpt = Checkpointer(workdir, keep=3)
    assert ckpt.latest_step() == 1
    like = {"policy": {"w": jax.numpy.zeros((1024, 1024))}}
    restored, host = ckpt.restore(ckpt.latest_step(), like)
    assert host == {"step": 1} and float(restored["policy"]["w"].sum()) == 1024 * 1024
