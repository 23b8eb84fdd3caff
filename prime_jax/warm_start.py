"""Supervised warm start for the built-in run: the "SFT model" PRIME starts from (the paper's App. D, in miniature).

Trains a sentencepiece tokenizer on the synthetic task corpus, initialises a small Qwen2-architecture
decoder, fits it for a few hundred steps on reference solutions of synthetic tasks (prompt tokens
masked out of the loss), and writes an HF directory plus `tokenizer.model` (locally or to gs://).
Deliberately short: the warm-start model is right only part of the time, which leaves PRIME something
to learn.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from prime_jax import paths
from prime_jax.data.example import Example
from prime_jax.data.synthetic import make_tasks, reference_solution
from prime_jax.models import Decoder, ModelConfig, response_logprobs, save_pretrained
from prime_jax.models.tokenizer import train_sentencepiece
from prime_jax.settings import RunSettings


def sft_tasks(rs: RunSettings) -> list[Example]:
    """The warm start's supervised tasks: `warm_start.num_examples` synthetic tasks from seed + 3."""
    s = rs.data.synthetic
    return make_tasks(rs.warm_start.num_examples, rs.seed + 3, math_frac=s.math_frac, difficulty=s.difficulty,
                      max_operand=s.max_operand)


def warm_start(rs: RunSettings, out_dir: str, tasks: Sequence[Example] | None = None) -> str:
    """Writes the SFT model trained on `tasks` (default `sft_tasks(rs)`) to `out_dir`, local or gs:// (skipped
    when it already exists); returns `out_dir`."""
    if (paths.path(out_dir) / "config.json").exists():
        return out_dir
    w, s = rs.warm_start, rs.data.synthetic
    tasks = sft_tasks(rs) if tasks is None else tasks
    tmp = tempfile.mkdtemp(prefix="prime_jax_sft_") if paths.is_remote(out_dir) else out_dir + ".partial"
    os.makedirs(tmp, exist_ok=True)
    solutions = [reference_solution(t, code_steps=s.code_steps) for t in tasks]
    corpus = [m["content"] for t in tasks for m in t.prompt] + solutions
    tok = train_sentencepiece(corpus, os.path.join(tmp, "tokenizer"), vocab_size=s.vocab_size)
    prompts = [tok.encode(tok.apply_chat_template(t.prompt)) for t in tasks]
    responses = [tok.encode(solution) + [tok.eos_ids[0]] for solution in solutions]
    p_len, r_len = max(map(len, prompts)), max(map(len, responses))
    n = len(tasks)
    pt, pm = np.full((n, p_len), tok.pad_id, np.int32), np.zeros((n, p_len), np.int32)
    rt, rm = np.full((n, r_len), tok.pad_id, np.int32), np.zeros((n, r_len), np.float32)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        pt[i, p_len - len(p):], pm[i, p_len - len(p):] = p, 1
        rt[i, : len(r)], rm[i, : len(r)] = r, 1

    pt, pm, rt, rm = map(jnp.asarray, (pt, pm, rt, rm))
    cfg = ModelConfig(model_type="qwen2", vocab_size=tok.vocab_size, attention_bias=True,
                      eos_token_id=tok.eos_ids[0], **w.arch)
    model = Decoder(cfg, rngs=nnx.Rngs(rs.seed))
    graphdef, params = nnx.split(model)
    tx = optax.adamw(optax.warmup_cosine_decay_schedule(0.0, w.lr, max(1, w.steps // 10), w.steps), weight_decay=0.0)
    opt = tx.init(params)

    @jax.jit
    def step(params, opt, idx):
        def loss_fn(params):
            logp = response_logprobs(nnx.merge(graphdef, params), pt[idx], pm[idx], rt[idx], rm[idx])
            return -jnp.sum(logp * rm[idx]) / jnp.sum(rm[idx])

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt = tx.update(grads, opt, params)
        return optax.apply_updates(params, updates), opt, loss

    rng = np.random.default_rng(rs.seed)
    t0 = time.perf_counter()
    for i in range(w.steps):
        params, opt, loss = step(params, opt, rng.integers(0, n, w.batch_size))
        if (i + 1) % max(1, w.steps // 5) == 0:
            print(f"warm start: step {i + 1}/{w.steps} loss {float(loss):.3f} ({time.perf_counter() - t0:.0f}s)", flush=True)
    save_pretrained(nnx.merge(graphdef, params), tmp)
    if not paths.is_remote(out_dir):
        os.replace(tmp, out_dir)
        return out_dir
    config = os.path.join(tmp, "config.json")  # uploaded last: its presence marks a complete directory
    staged = tempfile.mkdtemp(prefix="prime_jax_sft_config_")
    shutil.move(config, staged)
    paths.upload(tmp, out_dir)
    paths.upload(os.path.join(staged, "config.json"), paths.join(out_dir, "config.json"))
    shutil.rmtree(tmp)
    shutil.rmtree(staged)
    return out_dir
