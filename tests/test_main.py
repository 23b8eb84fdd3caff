"""`python -m prime_jax.main` as a user runs it: preemption (SIGTERM), a crash (SIGKILL) and exact resumption."""

import os
import shutil
import signal
import subprocess
import sys
import time

from prime_jax.metrics import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The built-in run, shrunk to seconds per step.
SMALL = ["--config.warm_start.steps=30", "--config.warm_start.num_examples=200", "--config.warm_start.arch.hidden_size=32",
         "--config.warm_start.arch.intermediate_size=64", "--config.warm_start.arch.num_layers=2",
         "--config.warm_start.arch.head_dim=16", "--config.synthetic.train_size=200", "--config.synthetic.val_size=16",
         "--config.rollout.max_response_length=16", "--config.train.batch_size=8", "--config.train.max_rounds=1",
         "--config.actor.mini_batch_size=16", "--config.actor.micro_batch_size=16", "--config.prm.mini_batch_size=32",
         "--config.prm.micro_batch_size=16", "--config.total_steps=5", "--config.checkpoint.freq=1",
         "--config.eval.freq=100", "--config.log.plot=False"]
VOLATILE = ("timing/", "throughput/")


def start(workdir):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device, as a user has
    cmd = [sys.executable, "-m", "prime_jax.main", "--config=configs/tiny.py", f"--config.workdir={workdir}", *SMALL]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc, timeout=600):
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-3000:]
    return out


def wait_for(predicate, proc, timeout=300):
    t0 = time.time()
    while not predicate():
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert time.time() - t0 < timeout, "timed out"
        time.sleep(0.2)


def steps_logged(workdir):
    path = os.path.join(workdir, "metrics.jsonl")
    return [r["step"] for r in read_metrics(workdir)] if os.path.exists(path) else []


def checkpoints(workdir):
    d = os.path.join(workdir, "checkpoints")
    return sorted(int(x) for x in os.listdir(d) if x.isdigit()) if os.path.isdir(d) else []


def stable(records):
    return [{k: v for k, v in r.items() if not k.startswith(VOLATILE)} for r in records]


def test_sigterm_then_sigkill_then_resume_matches_an_uninterrupted_run(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    finish(start(a))
    # B reuses A's warm-start model (deterministic anyway; this saves its minute).
    shutil.copytree(a / "sft", b / "sft")

    proc = start(b)  # 1) preemption: SIGTERM -> checkpoint of the step in hand, exit 0
    wait_for(lambda: 1 in steps_logged(b), proc)
    proc.send_signal(signal.SIGTERM)
    finish(proc)
    stopped_at = max(steps_logged(b))
    assert stopped_at < 5 and checkpoints(b)[-1] == stopped_at

    proc = start(b)  # 2) a crash: SIGKILL mid-run, after a further checkpoint
    wait_for(lambda: checkpoints(b) and checkpoints(b)[-1] >= stopped_at + 1, proc)
    proc.kill()
    proc.wait()

    out = finish(start(b))  # 3) the same command again resumes and completes
    assert "resumed from" in out
    assert stable(read_metrics(b)) == stable(read_metrics(a))
    assert [r["step"] for r in read_metrics(b)] == [0, 1, 2, 3, 4, 5]
