"""Multi-host: 2 CPU processes x 4 fake devices form one 8-device mesh (gloo collectives) and run two PRIME
iterations of the tiny config with exactly the numbers of one process with 8 devices."""

import os
import shutil
import socket
import subprocess
import sys

from prime_jax.metrics import read_metrics
from tests.test_main import SMALL, stable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TWO_STEPS = [a for a in SMALL if not a.startswith("--config.total_steps")] + [
    "--config.total_steps=2", "--config.checkpoint.export_hf=False"]


def command(workdir, *extra):
    return [sys.executable, "-m", "prime_jax.main", "--config=configs/tiny.py", f"--config.workdir={workdir}",
            *TWO_STEPS, *extra]


def env(devices, **extra):
    e = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    e.update(JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", **extra)
    return e


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_equal_one_process(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    out = subprocess.run(command(one), cwd=ROOT, env=env(8), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    shutil.copytree(one / "sft", two / "sft")  # the same warm-start model (process 0 would write the same)

    port = free_port()
    procs = [subprocess.Popen(command(two, "--config.distributed=True"), cwd=ROOT, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              env=env(4, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
                                      JAX_PROCESS_ID=str(i)))
             for i in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    for p, o in zip(procs, outs):
        assert p.returncode == 0, o[-3000:]
    assert [r["step"] for r in read_metrics(two)] == [0, 1, 2]
    assert stable(read_metrics(two)) == stable(read_metrics(one))
