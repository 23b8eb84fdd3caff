"""A newcomer's first minute (`prime_jax.cli`): every mistake before the first compile is one line on stderr that
names what to fix, exit status 1, no traceback and no TPU-runtime noise."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_main(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}  # as a user runs it
    return subprocess.run([sys.executable, "-m", "prime_jax.main", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.parametrize("args, line", [
    (["--config=configs/nonexistent.py"], "error: --config: no such file 'configs/nonexistent.py'"),
    (["--config=configs/tiny.py", "--config.rollout.nope=1"], "no such config key 'nope'"),
    (["--config=configs/tiny.py", "--config.rollout.top_p=2.0"],
     "error: config.rollout.top_p: must be a finite number > 0 and <= 1, got 2.0"),
    (["--config=configs/qwen7b.py", "--config.model.path=/nonexistent"],
     "error: config.model.path: no config.json in '/nonexistent'"),
    (["--config=configs/qwen7b.py", "--config.data.train_files="], "error: config.data.train_files: empty"),
])
def test_a_mistake_is_one_line_naming_what_to_fix(tmp_path, args, line):
    out = run_main(*args, f"--config.workdir={tmp_path}") if "nonexistent.py" not in args[0] else run_main(*args)
    assert out.returncode == 1, out.stdout + out.stderr
    lines = [x for x in out.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and line in lines[0], out.stderr
    assert "Traceback" not in out.stderr and "E0000" not in out.stderr and not out.stdout.strip()


def test_quiet_backends_leaves_tpu_vms_and_explicit_platforms_alone(monkeypatch):
    from prime_jax import cli

    monkeypatch.delenv("JAX_PLATFORMS", raising=False)
    monkeypatch.setattr(cli.glob, "glob", lambda pattern: [])
    cli.quiet_backends()
    assert os.environ["JAX_PLATFORMS"] in ("cpu", "cuda,cpu")
    monkeypatch.setenv("JAX_PLATFORMS", "tpu")
    cli.quiet_backends()
    assert os.environ["JAX_PLATFORMS"] == "tpu"
    monkeypatch.delenv("JAX_PLATFORMS")
    monkeypatch.setattr(cli.glob, "glob", lambda pattern: ["/dev/accel0"] if "accel" in pattern else [])
    cli.quiet_backends()
    assert "JAX_PLATFORMS" not in os.environ
