"""Tunix's GRPO learner on the vs_peers workload; prints one `PEER_RESULT {json}` line of step timings.

    <venv>/bin/python bench/peers/tunix_grpo.py WORKLOAD.json OUT_DIR

Runs in its own virtualenv (bench/peers/requirements-tunix.txt, CPU JAX), made by bench/vs_peers.py. The policy is
Tunix's own Qwen2 (`tunix.models.qwen2`) with the saved weights loaded from the workload's safetensors
(`params.create_model_from_safe_tensors`, fp32), on a 1 x 1 (fsdp, tp) mesh of the CPU device; actor and rollout
share one model (same mesh), no reference model (beta 0). The vanilla rollout engine samples at temperature 1
(top-p 1: plain categorical sampling) with every prompt left-padded to the workload's max prompt length; the
rollout seed changes every step. Prompts are the chat-templated texts (the tokenizer's ChatML template); the
reward is `peer_common.math_reward` (math-verify against the ground truth). One GRPO iteration, one mini-batch
(all prompts) per step, one forward/backward over all completions (train_micro_batch_size = prompts);
optax clip-by-global-norm + AdamW at a constant lr.

Timing (wall clock, `peer_common.StepClock`): a step runs from one `RLLearner._run_global_step` start to the next
(the last one to the end of `train`); `gen` = `RLCluster.generate`, `grade` = the reward function, train = the rest
(advantages, the actor update and Tunix's bookkeeping).
"""

from __future__ import annotations

import json
import os
import sys
import time

import peer_common


def model_config(hf: dict):
    """Tunix's Qwen2 ModelConfig of an HF Qwen2 config.json."""
    import jax.numpy as jnp
    from tunix.models.qwen2 import model as qwen2

    heads = hf["num_attention_heads"]
    rope = (hf.get("rope_parameters") or {}).get("rope_theta", hf.get("rope_theta", 10000.0))
    return qwen2.ModelConfig(
        num_layers=hf["num_hidden_layers"], vocab_size=hf["vocab_size"], embed_dim=hf["hidden_size"],
        hidden_dim=hf["intermediate_size"], num_heads=heads, head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
        num_kv_heads=hf["num_key_value_heads"], rope_theta=int(rope), norm_eps=hf["rms_norm_eps"],
        use_tied_embedding=hf.get("tie_word_embeddings", False), dtype=jnp.float32, param_dtype=jnp.float32)


def main(workload_path: str, out_dir: str) -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    import transformers
    from tunix.models.qwen2 import params as qwen2_params
    from tunix.rl import rl_cluster as rl_cluster_lib
    from tunix.rl.grpo import grpo_learner
    from tunix.rl.rollout import base_rollout

    w = peer_common.load_workload(workload_path)
    with open(os.path.join(w["model_dir"], "config.json")) as f:
        cfg = model_config(json.load(f))
    # Auto axes: newer JAX makes Explicit-sharding meshes by default, which Tunix 0.1.7's models do not expect.
    mesh = jax.make_mesh((1, 1), ("fsdp", "tp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    model = qwen2_params.create_model_from_safe_tensors(w["model_dir"], cfg, mesh, dtype=jnp.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(w["model_dir"])
    total = w["warmup"] + w["steps"]
    clock = peer_common.StepClock(total)
    prompts = len(w["prompts"])

    optimizer = optax.chain(optax.clip_by_global_norm(w["grad_clip"]),
                            optax.adamw(w["lr"], b1=0.9, b2=0.999, eps=1e-8, weight_decay=w["weight_decay"]))
    rollout_config = base_rollout.RolloutConfig(
        max_tokens_to_generate=w["max_new_tokens"], max_prompt_length=w["max_prompt_tokens"],
        kv_cache_size=w["max_prompt_tokens"] + w["max_new_tokens"], temperature=w["temperature"], top_p=1.0,
        top_k=None, eos_tokens=[w["eos_id"]], seed=w["seed"])
    cluster_config = rl_cluster_lib.ClusterConfig(
        role_to_mesh={rl_cluster_lib.Role.ACTOR: mesh, rl_cluster_lib.Role.REFERENCE: mesh,
                      rl_cluster_lib.Role.ROLLOUT: mesh},
        rollout_engine="vanilla", offload_to_cpu=False, rollout_config=rollout_config,
        training_config=rl_cluster_lib.RLTrainingConfig(
            actor_optimizer=optimizer, eval_every_n_steps=10**9, max_steps=total, mini_batch_size=prompts,
            train_micro_batch_size=prompts, metrics_logging_options=None, checkpoint_root_directory=None))
    cluster = rl_cluster_lib.RLCluster(actor=model, reference=None, tokenizer=tokenizer, cluster_config=cluster_config)
    algo = grpo_learner.GRPOConfig(num_generations=w["n"], num_iterations=1, beta=0.0, epsilon=w["clip_ratio"])

    def reward(prompts, completions, answer, **_):
        t0 = time.perf_counter()
        out = peer_common.math_reward(list(completions), [str(a) for a in answer])
        clock.add("grade", time.perf_counter() - t0)
        return out

    reward.__name__ = "math_verify"
    learner = grpo_learner.GRPOLearner(rl_cluster=cluster, algo_config=algo, reward_fns=[reward])

    generate, update_actor, global_step = cluster.generate, cluster.update_actor, learner._run_global_step

    def timed_generate(*args, **kwargs):
        rollout_config.seed = w["seed"] + len(clock.steps)  # a fresh sampling key each step (default: the same key)
        t0 = time.perf_counter()
        out = generate(*args, **kwargs)
        clock.add("gen", time.perf_counter() - t0)
        clock.add("gen_tokens", float(sum(len(t) for t in out.tokens)))
        return out

    def timed_global_step(*args, **kwargs):
        clock.begin_step()
        return global_step(*args, **kwargs)

    cluster.generate = timed_generate
    cluster.update_actor = clock.timed("update", update_actor)
    learner._run_global_step = timed_global_step

    batch = {"prompts": np.array([p["text"] for p in w["prompts"]]),
             "answer": np.array([p["answer"] for p in w["prompts"]])}
    learner.train([batch] * total)
    clock.end()
    result = peer_common.summarize(clock.steps, w["warmup"])
    import flax
    import tunix

    versions = {"google-tunix": getattr(tunix, "__version__", "0.1.7"), "jax": jax.__version__,
                "flax": flax.__version__, "python": sys.version.split()[0]}
    result.update(side="tunix", arm="grpo", label=f"Tunix {versions['google-tunix']} GRPO", versions=versions,
                  devices=str(jax.devices()), pid=os.getpid())
    peer_common.emit(result)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
