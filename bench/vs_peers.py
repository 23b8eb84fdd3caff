"""prime_jax against its peers on one RL workload: TRL's GRPOTrainer, Tunix's GRPO learner and prime_jax's own
trainer (outcome-only RLOO and PRIME), one after another in one run; prints step-time ratios with a breakdown.

    python bench/vs_peers.py [--steps 5] [--warmup 2] [--peers trl,tunix] [--arms rloo,prime]
                             [--prime-src DIR ...] [--prime-python PY ...] [--json out.json]

The workload (issue 27), the same on every side as far as each allows:
- policy: a 3.1M-parameter Qwen2 (hidden 256, 4 layers, intermediate 688, 4 heads of 64, 2 KV heads, untied
  embeddings, vocabulary 400), random init from a fixed seed (transformers `Qwen2ForCausalLM`, torch seed 0), saved
  once with `save_pretrained` and loaded by all three sides, so the weights are identical; fp32 everywhere;
- tokenizer: a byte-level BPE of 400 tokens (256 bytes + 3 ChatML specials + merges) trained with `tokenizers` on
  the MATH-500 prompts, saved as a transformers `PreTrainedTokenizerFast` with a ChatML chat template;
  EOS `<|im_end|>`, pad `<|endoftext|>`;
- prompts: the first 16 MATH-500 problems (`../shared/data/benchmarks/math500.json`, id order) whose chat-templated
  prompt (one user turn: the problem + PRIME's math suffix, no system prompt) has at most 128 tokens; the SAME 16
  prompts every step on every side (the sides shuffle and order prompts differently, so a fixed set keeps the
  prompt lengths of each step identical);
- per step: 16 prompts x 4 samples x up to 128 new tokens at temperature 1 (top-p 1, no top-k); the policy is
  untrained, so responses are near-uniform random tokens and stop only where `<|im_end|>` is drawn;
- grading: math-verify against the ground truth on every side (TRL and Tunix: `bench/peers/peer_common.math_reward`,
  the comparison of TRL's `accuracy_reward`; prime_jax: its own math verifier, answer extraction then math-verify,
  in its verifier worker pool);
- no accuracy filter; one PPO/GRPO epoch and one optimiser step over all 64 responses per step; no KL term; AdamW,
  lr 1e-6 (constant), weight decay 0.01, gradient clip 1.0, clip ratio 0.2;
- timing excludes compilation: `--warmup` steps first, then the median of `--steps` timed steps.

Where the sides differ (they are each framework's own algorithm and machinery, not made identical):
- estimator: TRL and Tunix run GRPO (group-normalised advantages, sequence-mean-token-mean loss: TRL
  `loss_type="grpo"`, Tunix's default); prime_jax runs RLOO (its `rloo_outcome` arm of
  prime_jax/experiments/compare.py: `algorithm.process_coef=0`, `prm.update_mode=none`) and PRIME (implicit PRM
  forward + update and the frozen reference forward every step, process + outcome rewards);
- generation: TRL calls transformers `generate` on all 64 rows (padded batch, stops when every row has stopped);
  Tunix's vanilla sampler pads every prompt to 128 tokens and decodes in one `while_loop` until all rows stop;
  prime_jax's sampler decodes with continuous batching and streams finished rows to its verifiers;
- grading overlap: TRL and Tunix grade after generation (all of it exposed); prime_jax grades while decoding and
  reports the exposed part (`timing/verify_exposed`) beside the whole span (`timing/verify`);
- Tunix masks any `<|endoftext|>` (its pad id) that the random policy samples inside a response out of the loss;
  the other sides train on it (about 1 sampled token in 400);
- runtimes: TRL on PyTorch (CPU, its default thread count), Tunix and prime_jax on JAX (CPU); each side in its own
  process and virtualenv (`bench/peers/requirements-*.txt`; prime_jax from its checkout's `.venv`).

Step time per side: TRL from one optimiser step's `on_step_begin` to the next; Tunix from one global step's start
to the next (`RLLearner._run_global_step`); prime_jax from one step's progress line to the next (its trainer's own
`timing/step`, the sum of its phases, is in the JSON too). gen / grade / train: TRL and Tunix time their generate
call and the reward function; prime_jax's `timing/gen`, `timing/verify`, `timing/verify_exposed`; train = step -
gen - exposed grading on every side (the policy update and everything else in the step: log-probs, advantages,
PRM and reference forwards for PRIME). tokens/s = response tokens generated per second of step.

Peers' virtualenvs are made on first use under `--venv-dir` (default ~/.cache/prime_jax/peers/<name>) from the
pinned requirements, with the interpreter running this script unless `--peer-python` names another (>= 3.11);
they are remade when their requirements file changes. The workload (model, tokenizer, data) is built once under
`--work-dir` (default ~/.cache/prime_jax/peers/work).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import inspect
import json
import os
import pprint
import shutil
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PEERS_DIR = os.path.join(REPO, "bench", "peers")
DEFAULT_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "prime_jax", "peers")
RESULT_PREFIX = "PEER_RESULT "

SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
MATH_SUFFIX = "\n\nPresent the answer in LaTex format: \\boxed{Your answer}"  # prime_jax/data/prompts.py


@dataclasses.dataclass(frozen=True)
class Workload:
    prompts: int = 16
    n: int = 4
    max_new_tokens: int = 128
    max_prompt_tokens: int = 128
    vocab: int = 400
    hidden: int = 256
    layers: int = 4
    intermediate: int = 688
    heads: int = 4
    kv_heads: int = 2
    lr: float = 1e-6
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    clip_ratio: float = 0.2
    temperature: float = 1.0
    seed: int = 0


# --- the workload: tokenizer, model, prompts ----------------------------------------------------------------------


def math500_rows(path: str) -> list[tuple[str, str, str]]:
    """(id, problem, expected answer) of MATH-500 in id order (the column-dict JSON of ../shared/data/benchmarks)."""
    with open(path, encoding="utf-8") as f:
        cols = json.load(f)
    return [(cols["id"][k], cols["problem"][k], cols["expected_answer"][k]) for k in sorted(cols["problem"], key=int)]


def build_workload(wl: Workload, math500: str, out: str) -> dict:
    """Trains the tokenizer, initialises and saves the model, picks the prompts, writes the prime_jax data file;
    returns the workload dict the runners read (also `out/workload.json`). Deterministic from `wl`."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GenerationConfig, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    rows = math500_rows(math500)
    model_dir = os.path.join(out, "model")
    os.makedirs(model_dir, exist_ok=True)
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=wl.vocab, special_tokens=list(SPECIALS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator([problem + MATH_SUFFIX for _, problem, _ in rows], trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                  chat_template=CHATML_TEMPLATE)
    tok.save_pretrained(model_dir)
    # Readable by transformers 4.x too (the Tunix virtualenv's): the class by its 4.x name, the template inline.
    cfg_path = os.path.join(model_dir, "tokenizer_config.json")
    with open(cfg_path) as f:
        tok_cfg = json.load(f)
    tok_cfg.update(tokenizer_class="PreTrainedTokenizerFast", chat_template=CHATML_TEMPLATE)
    with open(cfg_path, "w") as f:
        json.dump(tok_cfg, f, indent=2)

    picked = []
    for row_id, problem, answer in rows:
        messages = [{"role": "user", "content": problem + MATH_SUFFIX}]
        text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        length = len(tok.encode(text, add_special_tokens=False))
        if length <= wl.max_prompt_tokens:
            picked.append({"id": row_id, "messages": messages, "text": text, "tokens": length, "answer": answer})
        if len(picked) == wl.prompts:
            break

    eos, pad = tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")
    config = Qwen2Config(vocab_size=len(tok), hidden_size=wl.hidden, intermediate_size=wl.intermediate,
                         num_hidden_layers=wl.layers, num_attention_heads=wl.heads, num_key_value_heads=wl.kv_heads,
                         max_position_embeddings=1024, rope_theta=10000.0, rms_norm_eps=1e-6,
                         tie_word_embeddings=False, bos_token_id=None, eos_token_id=eos, pad_token_id=pad,
                         use_sliding_window=False)
    torch.manual_seed(wl.seed)
    model = Qwen2ForCausalLM(config).to(torch.float32)
    model.generation_config = GenerationConfig(eos_token_id=eos, pad_token_id=pad, bos_token_id=None)
    model.save_pretrained(model_dir)
    params = sum(p.numel() for p in model.parameters())

    # prime_jax reads Eurus-2-RL-Data rows (prime_jax/data/eurus.py).
    data = os.path.join(out, "train.jsonl")
    with open(data, "w", encoding="utf-8") as f:
        for i, p in enumerate(picked):
            f.write(json.dumps({"data_source": "math500", "prompt": p["messages"], "ability": "math",
                                "reward_model": {"style": "rule", "ground_truth": p["answer"]},
                                "extra_info": {"split": "train", "index": i}}) + "\n")
    workload = {**dataclasses.asdict(wl), "model_dir": model_dir, "train_file": data, "params": params,
                "eos_id": eos, "pad_id": pad, "prompts": picked,
                "prompt_tokens": [p["tokens"] for p in picked]}
    with open(os.path.join(out, "workload.json"), "w") as f:
        json.dump(workload, f, indent=1)
    return workload


def workload_dir(wl: Workload, math500: str, work_dir: str) -> str:
    key = json.dumps([dataclasses.asdict(wl), os.path.getsize(math500), inspect.getsource(build_workload)], sort_keys=True)
    return os.path.join(work_dir, "workload-" + hashlib.sha256(key.encode()).hexdigest()[:12])


def _file_hash(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def ensure_workload(wl: Workload, math500: str, work_dir: str) -> dict:
    out = workload_dir(wl, math500, work_dir)
    path = os.path.join(out, "workload.json")
    if not os.path.isfile(path):
        shutil.rmtree(out, ignore_errors=True)
        print(f"building the workload in {out}", flush=True)
        build_workload(wl, math500, out)
    with open(path) as f:
        return json.load(f)
