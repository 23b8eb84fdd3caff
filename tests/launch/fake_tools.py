"""Stand-ins for gcloud, ssh, scp, uv and a venv's python, used by tests/launch.

Run as `fake_tools.py TOOL ARGS...` through the small wrappers `install` writes. Every call
appends {tool, argv, cwd, env} to $FAKE_STATE/calls.jsonl, so a test sees the whole sequence.

gcloud and ssh also play the remote hosts: a host is the directory $FAKE_STATE/hosts/<name>
(TPU workers are worker0, worker1, ...); a remote command runs there under /bin/sh with that
directory as $HOME and $FAKE_STATE/hostbin first on PATH, as a login shell would run it. So the
launchers' remote snippets really unpack, create pid files and logs; only uv and the venv's
python are fakes (uv makes a fake venv; python records and, for main, prints and may sleep).

Environment: FAKE_STATE (state dir), FAKE_TPU_WORKERS (workers in the slice, default 2),
FAKE_QR_STATES (comma list answered by successive `describe --format` calls, the last one
repeating), FAKE_MAIN_SECONDS (how long fake main sleeps, default 0), FAKE_PREFLIGHT_FAIL (comma
list of hosts whose fake `python -m prime_jax.preflight` reports a FAIL and exits 1).
"""
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ENV_KEYS = (
    "HOME", "JAX_PLATFORMS", "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID",
    "PYTHONUNBUFFERED", "WANDB_MODE",
)
GCLOUD_VALUE_FLAGS = {"--command", "--worker", "--zone", "--project", "--format"}


def install(bin_dir: Path, tool: str) -> Path:
    """Write an executable `bin_dir/tool` that runs this file as TOOL; returns its path."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    path = bin_dir / tool
    path.write_text(f"#!/bin/sh\nexec '{sys.executable}' '{Path(__file__).resolve()}' {tool} \"$@\"\n")
    path.chmod(0o755)
    return path


def read_calls(state: Path) -> list[dict]:
    """All recorded calls, in order."""
    log = state / "calls.jsonl"
    if not log.exists():
        return []
    return [json.loads(line) for line in log.read_text().splitlines()]


def _state() -> Path:
    return Path(os.environ["FAKE_STATE"])


def _record(tool: str, argv: list[str]) -> None:
    entry = {"tool": tool, "argv": argv, "cwd": os.getcwd(),
             "env": {k: os.environ.get(k) for k in ENV_KEYS}}
    with open(_state() / "calls.jsonl", "a") as f:
        f.write(json.dumps(entry) + "\n")


def _host(name: str) -> Path:
    home = _state() / "hosts" / name
    home.mkdir(parents=True, exist_ok=True)
    return home


def _run_remote(home: Path, command: str) -> int:
    env = dict(os.environ, HOME=str(home), PATH=f"{_state() / 'hostbin'}:{os.environ['PATH']}")
    return subprocess.run(["/bin/sh", "-c", command], cwd=home, env=env).returncode


def _split_gcloud(argv: list[str]) -> tuple[list[str], dict[str, str]]:
    positional, flags, i = [], {}, 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--") and "=" in arg:
            key, value = arg.split("=", 1)
            flags[key] = value
        elif arg in GCLOUD_VALUE_FLAGS:
            flags[arg] = argv[i + 1]
            i += 1
        elif arg.startswith("--"):
            flags[arg] = ""
        else:
            positional.append(arg)
        i += 1
    return positional, flags


def _workers(selector: str) -> list[Path]:
    count = int(os.environ.get("FAKE_TPU_WORKERS", "2"))
    indices = range(count) if selector == "all" else [int(selector)]
    return [_host(f"worker{i}") for i in indices]


def _next_state() -> str:
    states = os.environ["FAKE_QR_STATES"].split(",")
    counter = _state() / "describe_count"
    n = int(counter.read_text()) if counter.exists() else 0
    counter.write_text(str(n + 1))
    return states[min(n, len(states) - 1)]


def gcloud(argv: list[str]) -> int:
    positional, flags = _split_gcloud(argv)
    group, verb = positional[2], positional[3]  # compute tpus <group> <verb> ...
    if group == "queued-resources" and verb == "describe":
        print(_next_state() if "--format" in flags else f"name: {positional[4]}")
    elif group == "tpu-vm" and verb == "scp":
        source, target = positional[4], positional[5].split(":", 1)[1]
        for home in _workers(flags["--worker"]):
            shutil.copy(source, home / target)
    elif group == "tpu-vm" and verb == "ssh":
        return max(_run_remote(home, flags["--command"]) for home in _workers(flags["--worker"]))
    return 0


def ssh_positional(argv: list[str]) -> list[str]:
    """Positional words of an ssh/scp command line (options and their values dropped)."""
    words, i = [], 0
    while i < len(argv):
        if argv[i] == "-o":
            i += 1
        elif not argv[i].startswith("-"):
            words.append(argv[i])
        i += 1
    return words


def ssh(argv: list[str]) -> int:
    words = ssh_positional(argv)
    return _run_remote(_host(words[0]), " ".join(words[1:]))


def scp(argv: list[str]) -> int:
    source, target = ssh_positional(argv)
    host, path = target.split(":", 1)
    shutil.copy(source, _host(host) / path)
    return 0


def uv(argv: list[str]) -> int:
    if argv[0] == "venv":
        install(Path(argv[-1]) / "bin", "python")
    return 0


def python(argv: list[str]) -> int:
    if argv[:2] == ["-m", "prime_jax.main"]:
        print("fake prime_jax.main", *argv[2:], flush=True)
        time.sleep(float(os.environ.get("FAKE_MAIN_SECONDS", "0")))
    if argv[:2] == ["-m", "prime_jax.preflight"]:
        host = Path(os.environ["HOME"]).name
        failing = host in os.environ.get("FAKE_PREFLIGHT_FAIL", "").split(",")
        print(f"preflight [{host}] PASS devices: fake")
        if failing:
            print(f"preflight [{host}] FAIL sandbox: no working bubblewrap -- fix: sudo apt-get install -y bubblewrap")
        print(f"preflight [{host}] {'FAILED' if failing else 'PASSED'}")
        return 1 if failing else 0
    return 0


TOOLS = {"gcloud": gcloud, "ssh": ssh, "scp": scp, "uv": uv, "python": python}

if __name__ == "__main__":
    tool, args = sys.argv[1], sys.argv[2:]
    _record(tool, args)
    sys.exit(TOOLS[tool](args))
