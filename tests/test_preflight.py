"""`python -m prime_jax.preflight`: the tiny config passes; each broken prerequisite FAILs on its own line with
its fix and a non-zero exit code; two processes (jax.distributed on CPU) each report."""

import os
import subprocess
import sys

import jax

from prime_jax import aot
from prime_jax.preflight import tpu_topology

from tests.fixtures import env, free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def preflight(*args: str, devices: int = 1, path: str | None = None, **extra: str) -> subprocess.CompletedProcess:
    e = env(devices, **extra)
    if path is not None:
        e["PATH"] = path
    return subprocess.run([sys.executable, "-m", "prime_jax.preflight", "--config=configs/tiny.py", *args], cwd=ROOT,
                          env=e, capture_output=True, text=True, timeout=300)


def lines(out: subprocess.CompletedProcess, status: str) -> dict[str, str]:
    """{check name: its line} of the PASS or FAIL lines."""
    found = {}
    for line in out.stdout.splitlines():
        head, _, rest = line.partition(f"] {status} ")
        if rest:
            found[rest.split(":", 1)[0]] = rest
    return found


def test_tiny_config_passes(tmp_path):
    out = preflight(f"--config.workdir={tmp_path / 'run'}")
    assert out.returncode == 0, out.stdout + out.stderr[-3000:]
    passed = lines(out, "PASS")
    assert {"config", "devices", "workdir", "model", "data", "verifier math right", "verifier code wrong", "sandbox",
            "sandbox kill-parent", "sandbox write-outside-tmp", "memory"} <= set(passed)
    assert not lines(out, "FAIL")
    assert list((tmp_path / "run" / "preflight").iterdir()) == []  # its probe file cleaned up


def test_each_broken_prerequisite_fails_with_its_fix(tmp_path):
    (tmp_path / "not_a_dir").write_text("")
    # PATH without bwrap: a directory holding only what the run needs to exec (nothing: python is absolute).
    out = preflight(f"--config.workdir={tmp_path / 'not_a_dir' / 'run'}", f"--config.model.path={tmp_path / 'missing'}",
                    path=str(tmp_path / "empty_bin"))
    assert out.returncode == 1
    failed = lines(out, "FAIL")
    assert set(failed) == {"workdir", "model.path", "model.prm_path", "model.ref_path", "model.tokenizer", "sandbox",
                           "verifier code right", "verifier code wrong", "memory"}, out.stdout
    assert "fix: make" in failed["workdir"] and str(tmp_path / "not_a_dir") in failed["workdir"]
    assert "fix: point --config.model.path" in failed["model.path"]
    for name in ("sandbox", "verifier code right", "verifier code wrong"):  # fails closed: code is not run
        assert "sudo apt-get install -y bubblewrap" in failed[name]
    assert "verifier math right" in lines(out, "PASS")
    assert out.stdout.rstrip().endswith("FAILED")


def test_mesh_bigger_than_the_devices_fails(tmp_path):
    out = preflight(f"--config.workdir={tmp_path}", "--config.mesh.data=16", devices=8)
    assert out.returncode == 1
    failed = lines(out, "FAIL")
    assert list(failed) == ["devices"]
    assert "8 cpu devices" in failed["devices"] and "fix: set --config.mesh" in failed["devices"]


def test_bad_config_value_fails_before_anything_else(tmp_path):
    out = preflight(f"--config.workdir={tmp_path}", "--config.rollout.n_samples=0")
    assert out.returncode == 1
    assert list(lines(out, "FAIL")) == ["config"] and "n_samples" in lines(out, "FAIL")["config"]


def test_two_processes_each_report(tmp_path):
    port = free_port()
    procs = [subprocess.Popen([sys.executable, "-m", "prime_jax.preflight", "--config=configs/tiny.py",
                               f"--config.workdir={tmp_path}", "--config.distributed=True"], cwd=ROOT, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              env=env(2, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
                                      JAX_PROCESS_ID=str(i)))
             for i in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    for i, (p, (out, err)) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, out + err[-3000:]
        assert f"preflight [process {i}/2] PASS devices: 4 cpu devices (2 local), 2 processes" in out
        assert out.rstrip().endswith(f"preflight [process {i}/2] PASSED")



def test_tpu_slice_is_recognised_from_its_devices():
    assert tpu_topology(aot.parse_topology("v5p:2x2x1").devices()) == aot.parse_topology("v5p-8")
    assert tpu_topology(aot.parse_topology("v5e:2x4").devices()) == aot.parse_topology("v5litepod-8")
    assert tpu_topology(jax.devices()) is None  # CPU: the analytic plan
