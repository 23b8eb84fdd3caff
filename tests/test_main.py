"""`python -m prime_jax.main` as a user runs it: preemption (SIGTERM), a crash (SIGKILL) and exact resumption."""

import os
import shutil
import signal
import subprocess
import sys
import time

from prime_jax.metrics import read_metrics
from tests.fixtures import SMALL, env, stable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
def start(workdir, *overrides, devices=None):
    """The built-in run at SMALL sizes; one CPU device as a user has, unless `devices`."""
    e = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"} if devices is None else env(devices)
    cmd = [sys.executable, "-m", "prime_jax.main", "--config=configs/tiny.py", f"--config.workdir={workdir}", *SMALL,
           *overrides]
    return subprocess.Popen(cmd, cwd=ROOT, env=e, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


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

    out = finish(start(b))  # 4) once more: the run says it is complete and which key extends it; nothing changes
    assert "is complete: step 5 of total_steps=5" in out and "--config.total_steps=6" in out
    assert [r["step"] for r in read_metrics(b)] == [0, 1, 2, 3, 4, 5]


AHEAD = ("--config.rollout.max_staleness=1", "--config.rollout.devices=1", "--config.total_steps=6",
         "--config.checkpoint.freq=2")


def test_rollouts_ahead_on_a_sampler_device_resume_exactly_after_a_kill(tmp_path):
    """Rollouts one step ahead on a device of their own (2 CPU devices: 1 samples, 1 trains): every step but the
    sync steps (0 and the checkpoints at 2 and 4) trains on rollouts of the previous policy; a SIGKILL after the
    checkpoint at step 2 and a resume end exactly where the uninterrupted run ends."""
    a, b = tmp_path / "a", tmp_path / "b"
    finish(start(a, *AHEAD, devices=2))
    records = read_metrics(a)
    assert [r.get("rollout/staleness") for r in records] == [None, 0, 1, 0, 1, 0, 1]
    assert all(r["timing/rollout_wait"] >= 0 and r["timing/publish"] >= 0 for r in records[1:])

    shutil.copytree(a / "sft", b / "sft")
    proc = start(b, *AHEAD, devices=2)
    wait_for(lambda: 2 in checkpoints(b), proc)
    proc.kill()
    proc.wait()
    assert max(steps_logged(b)) < 6  # killed mid-run: the resume below has steps to take
    out = finish(start(b, *AHEAD, devices=2))
    assert "resumed from" in out
    assert stable(read_metrics(b)) == stable(records)


def test_built_in_run_on_a_gs_workdir_stores_and_resumes_in_the_bucket(gcs_bucket, tmp_path):
    """configs/tiny.py with --config.workdir=gs://... against the local GCS emulator: checkpoints, metrics,
    TensorBoard events, the exports, the curves and the warm-start model all land in the bucket, nothing in
    a local `gs:` folder. The run then resumes from the bucket, reading the model and the data from gs://."""
    from prime_jax import paths
    from prime_jax.data.eurus import write_eurus
    from prime_jax.data.synthetic import make_tasks

    run = f"{gcs_bucket}/run"
    small = [a for a in SMALL if not a.startswith(("--config.total_steps", "--config.log.plot"))]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PYTHONPATH"] = ROOT

    def main(*extra):  # from an empty directory, where a misread gs:// path would become a local folder
        cmd = [sys.executable, "-m", "prime_jax.main", f"--config={ROOT}/configs/tiny.py", f"--config.workdir={run}",
               *small, *extra]
        out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        return out.stdout + out.stderr

    main("--config.total_steps=2")
    names = {p[len(run) + 1:] for p in paths.glob(f"{run}/**")}
    for expected in ("checkpoints/2/_CHECKPOINT_METADATA", "metrics.jsonl", "curves.png", "sft/config.json",
                     "sft/tokenizer.model", "export/policy/model.safetensors", "export/prm/config.json"):
        assert expected in names, sorted(names)
    assert any(n.startswith("tensorboard/events.out.tfevents.") for n in names)
    assert [r["step"] for r in read_metrics(run)] == [0, 1, 2]

    # Resume in the bucket, the model and the same synthetic prompts now read from gs:// as a user's would be.
    tasks = make_tasks(200, 1, math_frac=0.5, difficulty=1)  # what data.source=synthetic trains on (seed + 1)
    write_eurus(tasks, f"{gcs_bucket}/data/train-0.parquet")
    write_eurus(make_tasks(16, 2, math_frac=0.5, difficulty=1), f"{gcs_bucket}/data/val.jsonl", split="validation")
    out = main("--config.total_steps=3", f"--config.model.path={run}/sft",
               f"--config.model.tokenizer={run}/sft/tokenizer.model", "--config.data.source=files",
               f"--config.data.train_files={gcs_bucket}/data/train-*.parquet",
               f"--config.data.val_files={gcs_bucket}/data/val.jsonl")
    assert f"resumed from {run}/checkpoints at step 2" in out
    assert [r["step"] for r in read_metrics(run)] == [0, 1, 2, 3]
    assert "checkpoints/3/_CHECKPOINT_METADATA" in {p[len(run) + 1:] for p in paths.glob(f"{run}/**")}
    assert not any("gs:" in d for d in os.listdir(tmp_path)) and not os.path.exists(os.path.join(ROOT, "gs:"))


def test_without_bwrap_the_run_logs_one_error_scores_code_0_and_finishes(tmp_path):
    """PATH without bubblewrap: the run starts, says once how to install it, never runs model-written code
    (code rows score 0, counted as verifier/unsandboxed) and finishes."""
    empty_bin = tmp_path / "bin"
    empty_bin.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PATH"] = str(empty_bin)
    small = [a for a in SMALL if not a.startswith("--config.total_steps")]
    cmd = [sys.executable, "-m", "prime_jax.main", "--config=configs/tiny.py", f"--config.workdir={tmp_path / 'run'}",
           *small, "--config.total_steps=1"]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    errors = [line for line in (out.stdout + out.stderr).splitlines() if "apt-get install -y bubblewrap" in line]
    assert len(errors) == 1 and "verifier/unsandboxed" in errors[0]
    records = read_metrics(tmp_path / "run")
    assert records[-1]["step"] == 1 and records[-1]["verifier/unsandboxed"] > 0
    assert records[-1].get("train_verify_score/code", 0.0) == 0.0
