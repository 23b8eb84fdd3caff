"""The reused sandbox (zygote) wherever the interpreter lives: a process whose virtualenv lies in a fresh directory
under /tmp (a fresh clone's .venv there, say) runs its code items in one reused sandbox, which shows that
interpreter read-only and alone (not the rest of the host's /tmp, not the caller's PYTHONPATH there), and a run
still leaves the next one nothing: no file in the private /tmp, no process, nothing written next to the venv."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from prime_jax.verifiers import sandbox

REPO = Path(__file__).resolve().parents[2]

# Run twice in one process: reports which sandbox ran it (its parent: a waiting zygote's pid, or 1 for a fresh
# sandbox's init; the start time of the sandbox's init), what it can see and write, and what an earlier run left.
PROBE = """
import os, time
def f(root, name):
    out = {"parent": os.getppid(), "init_started": open("/proc/1/stat").read().split()[21]}
    import prime_jax_probe_module
    out["module"] = prime_jax_probe_module.WHERE
    out["beside_venv"] = sorted(os.listdir(root))
    out["tmp"] = sorted(os.listdir("/tmp"))
    out["processes"] = [p for p in os.listdir("/proc") if p.isdigit() and int(p) not in (1, os.getpid(), os.getppid())
                        and "Z" not in open(f"/proc/{p}/stat").read().split()[2]]
    out["written"] = []
    for path in (root + "/" + name, root + "/venv/" + name, "/tmp/" + name):
        try:
            with open(path, "w") as file:
                file.write("left")
            out["written"].append(path)
        except OSError:
            pass
    if os.fork() == 0:  # left running, in a session of its own
        os.setsid()
        time.sleep(60)
        os._exit(0)
    return out
"""
CHILD = """
import json, sys
from prime_jax.verifiers.sandbox import Limits, Program, run_tests
program = Program("call", sys.argv[1], [[sys.argv[2], sys.argv[3]]], fn_name="f")
print(json.dumps([run_tests(program, Limits(timeout_s=20.0))[0].__dict__ for _ in range(2)]))
"""


@pytest.fixture(scope="module")
def venv_in_tmp():
    """(root, python): a virtualenv at <root>/venv, root a fresh directory in /tmp that also holds a file of the
    host's; its site-packages has a module of its own."""
    assert sandbox.bwrap_available(), "these tests need a working bubblewrap"
    root = Path(tempfile.mkdtemp(prefix="prime_jax_venv_", dir="/tmp"))
    try:
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root / "venv")], check=True, timeout=300)
        python = root / "venv" / "bin" / "python"
        site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], check=True,
                              capture_output=True, text=True, timeout=60).stdout.strip()
        Path(site, "prime_jax_probe_module.py").write_text("WHERE = __file__\n")
        (root / "secret").write_text("a file of the host's /tmp")
        yield root, python
    finally:
        shutil.rmtree(root)


def test_an_interpreter_under_tmp_runs_in_the_reused_sandbox_and_sees_only_itself(venv_in_tmp) -> None:
    root, python = venv_in_tmp
    name = f"left_{secrets.token_hex(4)}"
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": f"{REPO}{os.pathsep}{root}"}
    child = subprocess.run([python, "-c", CHILD, PROBE, str(root), name], cwd=root, env=env, capture_output=True,
                           text=True, timeout=300)
    assert child.returncode == 0, child.stderr[-3000:]
    first, second = json.loads(child.stdout)
    assert first["status"] == second["status"] == "output", (first, second)
    first, second = json.loads(first["output"]), json.loads(second["output"])
    # Both runs forked from one waiting sandbox (a fresh sandbox per run: the program's parent is its init, pid 1).
    assert first["parent"] != 1
    assert (first["parent"], first["init_started"]) == (second["parent"], second["init_started"])
    # The interpreter's files under /tmp are there, read-only; the rest of the host's /tmp is not.
    assert Path(first["module"]).resolve().is_relative_to(root / "venv")
    assert first["beside_venv"] == second["beside_venv"] == ["venv"]
    assert first["tmp"] == second["tmp"] == [root.name]
    assert first["written"] == second["written"] == [f"/tmp/{name}"]
    # The first run's file in the private /tmp and its process were gone when the second ran.
    assert first["processes"] == second["processes"] == []
    assert not any(p.exists() for p in (root / name, root / "venv" / name, Path("/tmp") / name))
