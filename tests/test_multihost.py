"""Multi-host: 2 CPU processes x 4 fake devices form one 8-device mesh (gloo collectives) and run PRIME iterations
of the tiny config with exactly the numbers of one process with 8 devices, killed and resumed on a gs:// workdir;
verification split over 2 processes gathers every score and sums every host's failure counts."""

import json
import os
import subprocess
import sys
import time

from prime_jax.metrics import read_metrics
from tests.fixtures import SMALL, env, free_port, stable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
THREE_STEPS = [a for a in SMALL if not a.startswith("--config.total_steps")] + [
    "--config.total_steps=3", "--config.checkpoint.export_hf=False"]


VERIFY_SCRIPT = r"""
import json, os
import jax
import numpy as np
from prime_jax.data.example import Example
from prime_jax.rl.collect import Prompt
from prime_jax.verifiers.pool import VerifierPool
from prime_jax.verifiers.streaming import verify
from prime_jax.sampling import Rollout

if __name__ == "__main__":
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"], num_processes=2,
                               process_id=int(os.environ["JAX_PROCESS_ID"]))
    abilities = ["math", "poetry", "math", "poetry", "poetry", "math"]  # rows 0, 2, 4 on process 0; 1, 3, 5 on 1
    prompts = [Prompt(Example([], a, "7", "test", str(i)), (1,)) for i, a in enumerate(abilities)]
    tokens = np.array([[7], [7], [7], [7], [7], [3]], np.int32)  # response text: \boxed{<token>}
    rollout = Rollout(prompt_tokens=tokens, prompt_mask=np.ones_like(tokens), tokens=tokens,
                      logprobs=np.zeros((6, 1), np.float32), mask=np.ones_like(tokens), lengths=np.ones(6, np.int32))
    with VerifierPool(1, item_timeout_s=30.0, batch_timeout_s=120.0) as pool:
        acc, counts = verify(rollout, prompts, 1, lambda ids: "\\boxed{%d}" % ids[0], pool)
    print(json.dumps({"acc": acc.tolist(), "counts": counts}))
"""


def test_verify_gathers_scores_and_sums_failure_counts_over_processes(tmp_path):
    script = tmp_path / "verify_two_hosts.py"
    script.write_text(VERIFY_SCRIPT)
    port = free_port()
    procs = [subprocess.Popen([sys.executable, str(script)], cwd=ROOT, text=True, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE,
                              env=env(1, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_PROCESS_ID=str(i),
                                      PYTHONPATH=ROOT))
             for i in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    for r in results:  # process 0 met 1 unknown ability, process 1 met 2: both hosts log 3
        assert r["acc"] == [1.0, 0.0, 1.0, 0.0, 0.0, 0.0]
        assert r["counts"]["unknown_ability"] == 3 and r["counts"]["errors"] == 0


def test_two_processes_on_a_gs_workdir_killed_and_restarted_equal_one_uninterrupted_process(tmp_path, gcs_bucket):
    """A pod run as README describes it, on the local GCS emulator: two processes of 4 devices each, both SIGKILLed
    once step 1's checkpoint is committed, started again with the same command: they resume from the bucket and end
    with exactly the metrics of one process with 8 devices run without a stop."""
    import fsspec

    from prime_jax import paths

    one, two = tmp_path / "one", f"{gcs_bucket}/multihost"
    cmd = [sys.executable, "-m", "prime_jax.main", "--config=configs/tiny.py", *THREE_STEPS]
    out = subprocess.run([*cmd, f"--config.workdir={one}"], cwd=ROOT, env=env(8), capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    paths.upload(one / "sft", f"{two}/sft")  # the same warm-start model (process 0 would write the same)
    fs, root = fsspec.core.url_to_fs(f"{two}/checkpoints")

    def start_both():
        port = free_port()
        return [subprocess.Popen([*cmd, f"--config.workdir={two}", "--config.distributed=True"], cwd=ROOT, text=True,
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                 env=env(4, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
                                         JAX_PROCESS_ID=str(i)))
                for i in range(2)]

    procs = start_both()
    deadline = time.monotonic() + 600
    while not fs.exists(f"{root}/1/commit_success.txt"):
        assert all(p.poll() is None for p in procs) and time.monotonic() < deadline
        time.sleep(0.2)
        fs.invalidate_cache()
    for p in procs:
        p.kill()
        p.wait()
    procs = start_both()
    outs = [p.communicate(timeout=600)[0] for p in procs]
    for p, o in zip(procs, outs):
        assert p.returncode == 0, o[-3000:]
    resumed = outs[0].split(f"resumed from {two}/checkpoints at step ", 1)[1].split()[0]
    assert resumed in ("1", "2")  # killed mid-run, not after the last step
    assert [r["step"] for r in read_metrics(two)] == [0, 1, 2, 3]
    assert stable(read_metrics(two)) == stable(read_metrics(one))
