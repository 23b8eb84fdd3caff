"""The analytic memory plan (`prime_jax.memory_plan`) against numbers from outside it: the parameter count
transformers reports for Qwen2.5-0.5B, XLA's own memory analysis of the update steps (at those dimensions and at
43M parameters with the same 152k vocabulary), and the peak resident memory of a real run of that 43M model."""

import os
import re
import subprocess
import sys

import ml_collections
import pytest

from prime_jax import settings
from prime_jax.memory_plan import GIB, plan
from prime_jax.mesh import make_mesh
from tests.fixtures import env, load_config, one_device_mesh, tiny_config, write_hf_checkpoint, write_hf_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

QWEN25_0_5B_PARAMS = 494_032_768  # sum(p.numel()) of transformers' Qwen2ForCausalLM at configs/qwen0_5b.py's dims
EMBED = 151_936 * 896             # tied: one [vocab, hidden] matrix


def resolve(**overrides):
    c = load_config("qwen0_5b")
    c.rollout.prompts_per_call = 2
    c.update_from_flattened_dict(overrides)
    return settings.resolve(c, one_device_mesh())


def test_phases_at_qwen2_5_0_5b_dimensions():
    s = resolve()
    assert s.model.arch.num_params == QWEN25_0_5B_PARAMS
    p = plan(s)
    # fp32 params + two fp32 Adam moments (12 bytes a param), the bf16 reference (2)
    assert p.resident == pytest.approx({"policy (params + adam)": QWEN25_0_5B_PARAMS * 12 / GIB,
                                        "prm (params + adam)": QWEN25_0_5B_PARAMS * 12 / GIB,
                                        "reference": QWEN25_0_5B_PARAMS * 2 / GIB})
    # XLA:CPU's memory analysis of the PRM and the PPO step at these dims (2 x 8 rows of 96 + 32 tokens): 3.68 GiB
    # of temporaries each, the optimiser's two copies of the params (a backward pass there needs 3.62)
    at_xla_shapes = plan(resolve(**{"data.max_prompt_length": 96, "rollout.max_response_length": 32}))
    assert at_xla_shapes.update == pytest.approx({"update temporaries (2 x params)": 3.68}, abs=0.005)
    # at the config's 8 rows of 1536 the backward pass is larger: the gradients (1.84 GiB), 3 logits chunks of
    # 1024 x 151,936 fp32 (1.74) and 24 layers' remat inputs of 12,288 bf16 tokens (0.49)
    assert p.update == pytest.approx({"update temporaries (ppo: grads + logits chunks)": 4.07}, abs=0.005)
    # keeping the matmul outputs too (model.remat_saves=dots): per layer and token q (14 x 64), k and v (2 x 64 each),
    # the output projection (896), gate and up (4864 each): 11,776 bf16 values, 24 x 12,288 x 11,776 x 2 B = 6.47 GiB
    dots = plan(resolve(**{"model.remat_saves": "dots"}))
    assert dots.update == pytest.approx({"update temporaries (ppo: grads + logits chunks)": 4.07 + 6.47}, abs=0.01)
    # the CPU sampler's per-layer copy in bf16: everything but the embedding and the final norm, 2 bytes a weight
    assert p.sampling["sampler layer weights (copy)"] == pytest.approx((QWEN25_0_5B_PARAMS - EMBED - 896) * 2 / GIB)
    assert p.peak == pytest.approx(sum(p.resident.values()) + max(sum(p.sampling.values()), sum(p.update.values())))


def test_logits_chunks_are_per_device_on_a_mesh():
    """Split over 8 devices, the params, gradients and remat inputs divide by 8 but each device makes the logits of
    `logits_chunk` tokens of its own rows (`logprobs_from_hidden`): (1.84 + 0.49) / 8 + 1.74 GiB."""
    c = load_config("qwen0_5b")
    c.rollout.prompts_per_call = 8
    c.mesh.fsdp = 8
    s = settings.resolve(c, make_mesh({"data": 1, "fsdp": 8, "tensor": 1}))
    assert plan(s).update == pytest.approx({"update temporaries (ppo: grads + logits chunks)": (1.84 + 0.49) / 8 + 1.74},
                                           abs=0.005)


def test_outcome_only_rl_plans_the_policy_alone():
    p = plan(resolve(**{"algorithm.process_coef": 0.0, "prm.update_mode": "none"}))
    assert list(p.resident) == ["policy (params + adam)"]


# 43M parameters, 152k vocabulary (Qwen2.5's), tied: the logits, not the weights, set the update's temporaries.
VOCAB_BOUND = dict(vocab_size=151_936, hidden_size=256, intermediate_size=1024, num_layers=4, num_heads=4,
                   num_kv_heads=2, head_dim=64, tie_word_embeddings=True, logits_chunk=1024, max_position_embeddings=512)
# configs/tiny.py's run of that model, 2 prompts x 4 samples x 32 tokens, micro-batches of 8 rows of 96 + 32 slots
RUN = {"model.param_dtype": "float32", "model.ref_dtype": "bfloat16", "model.compute_dtype": "bfloat16",
       "model.remat": True, "train.batch_size": 2, "train.filter_accuracy": False, "train.max_rounds": 1,
       "rollout.max_response_length": 32, "actor.mini_batch_size": 8, "actor.micro_batch_size": 8,
       "prm.mini_batch_size": 8, "prm.micro_batch_size": 8, "total_steps": 1, "eval.before_train": False,
       "eval.freq": 100, "eval.k": 1, "data.max_val_prompts": 2, "synthetic.train_size": 16, "synthetic.val_size": 2,
       "checkpoint.freq": 100, "checkpoint.export_hf": False, "log.plot": False}


def test_logits_bound_update_at_43m_parameters_and_a_152k_vocabulary():
    c = load_config("tiny")
    c.update_from_flattened_dict(RUN)
    c.model.arch = ml_collections.ConfigDict(tiny_config(**VOCAB_BOUND).to_hf())
    s = settings.resolve(c, one_device_mesh())
    assert s.model.arch.num_params == 42_832_128  # what transformers' Qwen2ForCausalLM of these dims counts
    # XLA:CPU's memory analysis of this run's PPO step: 1.902 GiB of temporaries (its PRM step's: 1.322); the
    # optimiser's two copies of the params would be 0.32
    assert plan(s).update == pytest.approx({"update temporaries (ppo: grads + logits chunks)": 1.902}, abs=0.005)


PEAK_RSS = """
import atexit, resource, runpy, sys
atexit.register(lambda: print("ru_maxrss_kib", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, flush=True))
sys.argv = ["prime_jax.main", *sys.argv[1:]]
runpy.run_module("prime_jax.main", run_name="__main__", alter_sys=True)
"""


def test_a_43m_run_peaks_within_15_percent_of_the_plan_preflight_checks(tmp_path):
    """The plan `preflight` checks on CPU (resident + the larger phase, plus what its process holds) against the
    peak resident memory of `python -m prime_jax.main` running one PRIME step of the 43M model."""
    model = tmp_path / "model"
    write_hf_tokenizer(model, ["Let x = 3. What is x + 4?", "def f(x):\n    return x + 4", "The answer is 7."])
    write_hf_checkpoint(tiny_config(**VOCAB_BOUND), model)
    args = ["--config=configs/tiny.py", f"--config.model.path={model}", f"--config.model.tokenizer={model}",
            f"--config.workdir={tmp_path / 'run'}", *(f"--config.{k}={v}" for k, v in RUN.items())]
    e = env(1)
    pre = subprocess.run([sys.executable, "-m", "prime_jax.preflight", *args], cwd=ROOT, env=e, capture_output=True,
                         text=True, timeout=600)
    planned = re.search(r"PASS memory: peak plan ([\d.]+) GiB", pre.stdout + pre.stderr)
    assert planned, pre.stdout[-3000:] + pre.stderr[-3000:]
    run = subprocess.run([sys.executable, "-c", PEAK_RSS, *args], cwd=ROOT, env=dict(e, PYTHONPATH=ROOT),
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    peak = int(re.search(r"ru_maxrss_kib (\d+)", run.stdout).group(1)) / 2**20
    assert 0.85 <= float(planned.group(1)) / peak <= 1.15, (planned.group(1), peak)
