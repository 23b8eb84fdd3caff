"""prime_jax against its peers on one RL workload: TRL's GRPOTrainer, Tunix's GRPO learner and prime_jax's own
trainer (outcome-only RLOO and PRIME), one after another in one run; prints step-time ratios with a breakdown.

    python bench/vs_peers.py [--steps 5] [--warmup 2] [--peers trl,tunix] [--arms rloo,rloo_shared,prime,prime_shared]
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
- Tunix treats any `<|endoftext|>` (its pad id) that the random policy samples inside a response as padding (left
  out of attention and of the loss); the other sides keep it as a token (about 1 sampled token in 400);
- graders' verdicts on random text: the peers' reward looks for a LaTeX answer only and finds none, so every reward
  is 0 and their GRPO advantages and gradients are 0 (the same compute runs regardless); prime_jax's verifier
  falls back to the reference's text rules ("answer is", a trailing "=" ...) and scores a stray response 1 now and
  then (`acc` in its progress lines), and spends longer per item doing so;
- runtimes: TRL on PyTorch (CPU, its default thread count), Tunix and prime_jax on JAX (CPU); each side in its own
  process and virtualenv (`bench/peers/requirements-*.txt`; prime_jax from its checkout's `.venv`), prime_jax with
  min(cores, 8) verifier workers;
- the sides run one after another, not interleaved: on a shared machine a change of load between them shifts the
  ratios, so compare rows of one run only.

The three sides compute the same logits from the saved weights (checked once by hand, 2026-12-07: max difference
8e-7 between transformers, prime_jax's `load_pretrained` and `tunix.models.qwen2` on a workload prompt).

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
import re
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from prime_jax.data.prompts import MATH_SUFFIX, build_messages  # noqa: E402  (the trainer's own prompt format)
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
    from transformers import (
        GenerationConfig,
        PreTrainedTokenizerFast,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

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
        messages = build_messages(problem, "math", system_prompt=None)
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
        f.writelines(json.dumps({"data_source": "math500", "prompt": p["messages"], "ability": "math",
                                 "reward_model": {"style": "rule", "ground_truth": p["answer"]},
                                 "extra_info": {"split": "train", "index": i}}) + "\n" for i, p in enumerate(picked))
    workload = {**dataclasses.asdict(wl), "model_dir": model_dir, "train_file": data, "params": params,
                "eos_id": eos, "pad_id": pad, "prompts": picked,
                "prompt_tokens": [p["tokens"] for p in picked]}
    with open(os.path.join(out, "workload.json"), "w") as f:
        json.dump(workload, f, indent=1)
    return workload


def workload_dir(wl: Workload, math500: str, work_dir: str) -> str:
    key = json.dumps([dataclasses.asdict(wl), os.path.getsize(math500), inspect.getsource(build_workload), SPECIALS,
                      CHATML_TEMPLATE, MATH_SUFFIX], sort_keys=True)
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


# --- prime_jax: its real trainer, `python -m prime_jax.main` on a generated config ------------------------------

# name -> (label, config overrides): the arms of prime_jax/experiments/compare.py ARMS, and each with its rollouts
# collected one step ahead of training (rollout.max_staleness=1: generation and grading overlap the update), and each
# with its training passes in the shared-prompt layout (train.layout=shared_prompt: each prompt's layers run once for
# its 4 samples; the default packed layout runs them once per sample)
OUTCOME_ONLY = {"algorithm.process_coef": 0.0, "prm.update_mode": "none"}
PRIME_ARMS = {
    "rloo": ("RLOO", OUTCOME_ONLY),
    "prime": ("PRIME", {}),
    "rloo_ahead": ("RLOO, rollouts ahead", {**OUTCOME_ONLY, "rollout.max_staleness": 1}),
    "prime_ahead": ("PRIME, rollouts ahead", {"rollout.max_staleness": 1}),
    "rloo_shared": ("RLOO, shared prompts", {**OUTCOME_ONLY, "train.layout": "shared_prompt"}),
    "prime_shared": ("PRIME, shared prompts", {"train.layout": "shared_prompt"}),
    "rloo_shared_ahead": ("RLOO, shared prompts, rollouts ahead",
                          {**OUTCOME_ONLY, "train.layout": "shared_prompt", "rollout.max_staleness": 1}),
    "prime_shared_ahead": ("PRIME, shared prompts, rollouts ahead",
                           {"train.layout": "shared_prompt", "rollout.max_staleness": 1}),
}


def prime_overrides(w: dict, workdir: str, total_steps: int) -> dict:
    """The run config of prime_jax on the workload, as flattened overrides of `base_config()`."""
    rows = len(w["prompts"]) * w["n"]
    return {
        "seed": w["seed"], "workdir": workdir, "total_steps": total_steps,
        "model.path": w["model_dir"], "model.param_dtype": "float32", "model.ref_dtype": "float32",
        "model.compute_dtype": "float32", "model.remat": False,
        "mesh.data": 1, "mesh.fsdp": -1, "mesh.tensor": 1,
        "data.source": "files", "data.train_files": w["train_file"], "data.val_files": "",
        "data.max_prompt_length": w["max_prompt_tokens"],
        "rollout.n_samples": w["n"], "rollout.temperature": w["temperature"], "rollout.top_p": 1.0,
        "rollout.top_k": 0, "rollout.max_response_length": w["max_new_tokens"],
        "train.batch_size": len(w["prompts"]), "train.filter_accuracy": False, "train.max_rounds": 1,
        "actor.lr": w["lr"], "actor.weight_decay": w["weight_decay"], "actor.grad_clip": w["grad_clip"],
        "actor.clip_ratio": w["clip_ratio"], "actor.ppo_epochs": 1, "actor.warmup_steps": 0,
        "actor.mini_batch_size": rows, "actor.micro_batch_size": rows,
        "prm.mini_batch_size": rows, "prm.micro_batch_size": rows,
        "verifier.num_workers": max(1, min(os.cpu_count() or 1, 8)),
        "eval.freq": 10**9, "eval.before_train": False,
        "checkpoint.freq": 10**9, "checkpoint.keep": 1, "checkpoint.export_hf": False,
        "log.tensorboard": False, "log.plot": False,
    }


CONFIG_TEMPLATE = '''"""Generated by bench/vs_peers.py: prime_jax ({arm}) on the vs_peers workload."""

from prime_jax.config import base_config

OVERRIDES = {overrides}


def get_config():
    c = base_config()
    for key, value in OVERRIDES.items():
        *parents, leaf = key.split(".")
        node = c
        for name in parents:
            node = node[name]
        node[leaf] = value
    return c
'''


def write_prime_config(w: dict, arm: str, run_dir: str, total_steps: int) -> str:
    overrides = {**prime_overrides(w, os.path.join(run_dir, "run"), total_steps), **PRIME_ARMS[arm][1]}
    path = os.path.join(run_dir, "config.py")
    os.makedirs(run_dir, exist_ok=True)
    with open(path, "w") as f:
        f.write(CONFIG_TEMPLATE.format(arm=arm, overrides=pprint.pformat(overrides, indent=4, sort_dicts=False)))
    return path


def prime_result(run_dir: str, line_times: dict[int, float], warmup: int) -> dict:
    """Medians over the timed steps of a prime_jax run: wall step time from its progress lines, the phases from
    `metrics.jsonl` (`timing/gen`, `timing/verify`, `timing/verify_exposed`; train = step - gen - exposed, or with
    rollouts ahead, step - `timing/rollout_wait`, the part of generation and grading the update did not hide)."""
    with open(os.path.join(run_dir, "run", "metrics.jsonl")) as f:
        records = {r["step"]: r for r in map(json.loads, filter(str.strip, f))}
    steps = []
    for k in sorted(s for s in records if s >= 1):
        r = records[k]
        wall = line_times[k] - line_times[k - 1] if k in line_times and k - 1 in line_times else r["timing/step"]
        exposed = r.get("timing/verify_exposed", 0.0)
        gen = r.get("timing/gen", r.get("timing/collect", 0.0) - exposed)  # older checkouts: collect only
        waited = r.get("timing/rollout_wait", gen + exposed)  # rollouts ahead: what the step waited for
        steps.append({"step": wall, "trainer_step": r["timing/step"], "gen": gen,
                      "grade": r.get("timing/verify", 0.0), "grade_exposed": exposed,
                      "update_actor": r.get("timing/update_actor", 0.0), "reward_model": r.get("timing/reward_model", 0.0),
                      "gen_tokens": float(r.get("train/gen_tokens", 0.0)), "train": wall - waited})
    timed = steps[warmup:]
    if not timed:
        raise RuntimeError(f"no timed steps: {len(steps)} steps logged, {warmup} of them warm-up")

    def med(key: str) -> float:
        return float(statistics.median(s[key] for s in timed))

    return {"step_s": med("step"), "gen_s": med("gen"), "grade_s": med("grade"), "grade_exposed_s": med("grade_exposed"),
            "train_s": med("train"), "gen_tokens": med("gen_tokens"), "trainer_step_s": med("trainer_step"),
            "update_actor_s": med("update_actor"), "reward_model_s": med("reward_model"), "timed_steps": len(timed),
            "per_step": steps}


# --- running the sides --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Side:
    name: str     # trl | tunix | prime_jax
    arm: str      # grpo | rloo | prime
    label: str
    python: str
    argv: list[str]
    cwd: str
    run_dir: str
    env: dict[str, str] = dataclasses.field(default_factory=dict)


def run_side(side: Side, timeout: float, warmup: int) -> dict:
    """Runs one side as a subprocess (its output to `run_dir/log.txt`); returns its result dict (or an error)."""
    os.makedirs(side.run_dir, exist_ok=True)
    log_path = os.path.join(side.run_dir, "log.txt")
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1",
           **side.env}
    for key in ("PYTHONPATH", "VIRTUAL_ENV"):
        env.pop(key, None)
    print(f"\n== {side.label}: {side.python} {' '.join(side.argv)}  (log: {log_path})", flush=True)
    t0 = time.perf_counter()
    result, line_times = None, {}
    step_line = re.compile(r"\] step\s+(\d+)/\d+")
    with open(log_path, "w") as log:
        proc = subprocess.Popen([side.python, *side.argv], cwd=side.cwd, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, bufsize=1, start_new_session=True)
        # A side that hangs, silent or not, is killed at its limit with its children (verifier pools, workers).
        watchdog = threading.Timer(timeout, os.killpg, (proc.pid, signal.SIGKILL))
        watchdog.start()
        try:
            for line in proc.stdout:
                now = time.perf_counter()
                log.write(line)
                if line.startswith(RESULT_PREFIX):
                    result = json.loads(line[len(RESULT_PREFIX):])
                elif (m := step_line.search(line)) is not None:
                    line_times[int(m.group(1))] = now
                    print(f"   {line.strip()}", flush=True)
            proc.wait()
        finally:
            watchdog.cancel()
            if proc.poll() is None:  # interrupted (Ctrl-C): the side and its children go too
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    wall = time.perf_counter() - t0
    if wall >= timeout and proc.returncode != 0:
        return {"error": f"killed after {timeout:.0f} s (--timeout; log: {log_path})", "wall_s": wall}
    if proc.returncode != 0:
        return {"error": f"exit status {proc.returncode} (log: {log_path}): {_tail(log_path)}", "wall_s": wall}
    if side.name == "prime_jax":
        try:
            result = prime_result(side.run_dir, line_times, warmup)
        except (OSError, KeyError, RuntimeError) as e:
            return {"error": f"{type(e).__name__}: {e} (log: {log_path})", "wall_s": wall}
    if result is None:
        return {"error": f"no {RESULT_PREFIX.strip()} line (log: {log_path})", "wall_s": wall}
    result["wall_s"] = wall
    print(f"   done in {wall:.0f} s: step {result['step_s']:.2f} s (median of {result['timed_steps']})", flush=True)
    return result


def _tail(path: str, lines: int = 3) -> str:
    with open(path, errors="replace") as f:
        return " | ".join(line.strip() for line in f.readlines()[-lines:])


# --- peers' virtualenvs -------------------------------------------------------------------------------------------


def python_version(python: str) -> tuple[int, int] | None:
    """(major, minor) of an interpreter that runs, else None."""
    try:
        out = subprocess.run([python, "-c", "import sys; print(*sys.version_info[:2])"], capture_output=True,
                             text=True, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    major, minor = out.stdout.split()
    return int(major), int(minor)


def find_python(preferred: str | None, minimum: tuple[int, int]) -> str:
    """The first interpreter that runs and is at least `minimum`: `preferred`, this one, then python3.11,
    python3.12, python3 (3.11 first: torch 2.13 has a local CPU wheel for it here)."""
    candidates = [preferred] if preferred else []
    candidates += [sys.executable, shutil.which("python3.11"), shutil.which("python3.12"), shutil.which("python3")]
    for python in filter(None, candidates):
        version = python_version(python)
        if version is not None and version >= minimum:
            return python
        if python == preferred:
            raise SystemExit(f"--peer-python {preferred}: does not run or is older than {minimum}")
    raise SystemExit(f"no Python >= {'.'.join(map(str, minimum))} found; name one with --peer-python")


def ensure_venv(name: str, venv_root: str, python: str) -> str:
    """`venv_root/name`, made (or remade, when its requirements changed) from bench/peers/requirements-<name>.txt;
    returns its interpreter."""
    requirements = os.path.join(PEERS_DIR, f"requirements-{name}.txt")
    digest = _file_hash(requirements)
    venv = os.path.join(venv_root, name)
    marker = os.path.join(venv, ".requirements.sha256")
    venv_python = os.path.join(venv, "bin", "python")
    if os.path.isfile(marker) and os.path.isfile(venv_python):
        with open(marker) as f:
            if f.read().strip() == digest:
                return venv_python
    print(f"making the {name} virtualenv in {venv} ({python}, {requirements}); once, this takes minutes", flush=True)
    shutil.rmtree(venv, ignore_errors=True)
    subprocess.run([python, "-m", "venv", venv], check=True)
    log = venv + ".pip.log"
    with open(log, "w") as f:
        pip = subprocess.run([venv_python, "-m", "pip", "install", "-r", requirements], stdout=f,
                             stderr=subprocess.STDOUT, check=False)
    if pip.returncode != 0:
        raise SystemExit(f"pip install -r {requirements} into {venv} failed (exit {pip.returncode}): {_tail(log)}")
    with open(marker, "w") as f:
        f.write(digest + "\n")
    return venv_python


# --- the table ----------------------------------------------------------------------------------------------------


def git_describe(src: str) -> str:
    """Short commit of a checkout, `-dirty` with uncommitted changes to tracked files; "" outside git."""
    try:
        rev = subprocess.run(["git", "-C", src, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", src, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""
    return rev + ("-dirty" if dirty else "")


def table(rows: list[dict]) -> str:
    """One line per side/arm: medians and ratios of step time against TRL and Tunix."""
    ok = [r for r in rows if "error" not in r["result"]]
    refs = {name: next((r for r in ok if r["side"] == name), None) for name in ("trl", "tunix")}
    head = (f"{'side / arm':<34} {'step s':>7} {'gen s':>7} {'grade s (exposed)':>18} {'train s':>8} "
            f"{'tokens/s':>9} {'vs TRL':>7} {'vs Tunix':>8}")
    lines = [head, "-" * len(head)]
    for r in rows:
        res = r["result"]
        if "error" in res:
            lines.append(f"{r['label']:<34} failed: {res['error']}")
            continue
        ratios = [f"{res['step_s'] / refs[n]['result']['step_s']:.2f}" if refs[n] else "-" for n in ("trl", "tunix")]
        grade = f"{res['grade_s']:.2f} ({res['grade_exposed_s']:.2f})"
        lines.append(f"{r['label']:<34} {res['step_s']:>7.2f} {res['gen_s']:>7.2f} {grade:>18} {res['train_s']:>8.2f} "
                     f"{res['gen_tokens'] / res['step_s']:>9.0f} {ratios[0]:>7} {ratios[1]:>8}")
    lines.append("")
    for ref in refs.values():
        if ref is None:
            continue
        for r in ok:
            if r["side"] == "prime_jax":
                lines.append(f"{r['label']} / {ref['label']} step time = "
                             f"{r['result']['step_s'] / ref['result']['step_s']:.2f}")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--steps", type=int, default=5, help="timed steps per side (their median is reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (compilation, caches)")
    p.add_argument("--peers", default="trl,tunix", help="comma-separated: trl, tunix (empty: none)")
    p.add_argument("--arms", default="rloo,rloo_shared,prime,prime_shared", help=f"prime_jax arms: {', '.join(PRIME_ARMS)} (empty: none)")
    p.add_argument("--prime-src", action="append", default=None,
                   help="a prime_jax checkout to measure (repeatable: before/after in one run; default: this repo)")
    p.add_argument("--prime-python", action="append", default=None,
                   help="its interpreter, one per --prime-src or one for all (default: <src>/.venv/bin/python if "
                        "present, else this interpreter)")
    p.add_argument("--peer-python", default=None, help="interpreter for the peers' virtualenvs (>= 3.11)")
    p.add_argument("--venv-dir", default=DEFAULT_CACHE, help="where the peers' virtualenvs live (default %(default)s)")
    p.add_argument("--work-dir", default=os.path.join(DEFAULT_CACHE, "work"),
                   help="workload and run directories (default %(default)s)")
    p.add_argument("--math500", default=os.path.join(REPO, "..", "shared", "data", "benchmarks", "math500.json"))
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds per side")
    p.add_argument("--json", default="", help="write the numbers here too")
    args = p.parse_args()

    t_start = time.perf_counter()
    peers = [x for x in args.peers.split(",") if x]
    arms = [x for x in args.arms.split(",") if x]
    for name in peers:
        if name not in ("trl", "tunix"):
            p.error(f"--peers: unknown peer {name!r}")
    for arm in arms:
        if arm not in PRIME_ARMS:
            p.error(f"--arms: unknown arm {arm!r}")
    srcs = [os.path.abspath(s) for s in (args.prime_src or [REPO])]
    pythons = args.prime_python or []
    if len(pythons) not in (0, 1, len(srcs)):
        p.error("--prime-python: give one, or one per --prime-src")

    wl = Workload()
    w = ensure_workload(wl, os.path.abspath(args.math500), args.work_dir)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    runs = os.path.join(args.work_dir, "runs", stamp)
    spec = {**w, "steps": args.steps, "warmup": args.warmup}
    os.makedirs(runs, exist_ok=True)
    spec_path = os.path.join(runs, "workload.json")
    with open(spec_path, "w") as f:
        json.dump(spec, f, indent=1)
    print(f"workload: {w['params'] / 1e6:.2f}M-parameter Qwen2, vocabulary {w['vocab']}, {len(w['prompts'])} prompts "
          f"({min(w['prompt_tokens'])}-{max(w['prompt_tokens'])} tokens) x {w['n']} x {w['max_new_tokens']} new tokens; "
          f"{args.warmup} warm-up + {args.steps} timed steps per side; runs in {runs}", flush=True)

    sides: list[Side] = []
    total = args.warmup + args.steps
    if peers:
        peer_python = find_python(args.peer_python, (3, 11))
    for name in peers:
        python = ensure_venv(name, args.venv_dir, peer_python)
        run_dir = os.path.join(runs, name)
        script = os.path.join(PEERS_DIR, "trl_grpo.py" if name == "trl" else "tunix_grpo.py")
        label = "TRL GRPO" if name == "trl" else "Tunix GRPO"
        sides.append(Side(name, "grpo", label, python, [script, spec_path, os.path.join(run_dir, "out")], PEERS_DIR,
                          run_dir))
    for i, src in enumerate(srcs):
        python = pythons[i] if len(pythons) == len(srcs) else pythons[0] if pythons else (
            os.path.join(src, ".venv", "bin", "python") if os.path.isfile(os.path.join(src, ".venv", "bin", "python"))
            else sys.executable)
        tag = git_describe(src) if len(srcs) > 1 else ""
        for arm in arms:
            run_dir = os.path.join(runs, f"prime_jax{i}-{arm}" if len(srcs) > 1 else f"prime_jax-{arm}")
            config = write_prime_config(w, arm, run_dir, total)
            label = f"prime_jax{'@' + tag if tag else ''} {PRIME_ARMS[arm][0]}"
            sides.append(Side("prime_jax", arm, label, python, ["-u", "-m", "prime_jax.main", f"--config={config}"],
                              src, run_dir))

    rows = []
    for side in sides:
        result = run_side(side, args.timeout, args.warmup)
        if "error" not in result and "label" in result and side.name != "prime_jax":
            side.label = result["label"]
        rows.append({"side": side.name, "arm": side.arm, "label": side.label, "python": side.python,
                     "cwd": side.cwd, "result": result})
    wall = time.perf_counter() - t_start
    print("\n" + table(rows))
    print(f"\nbench wall time {wall / 60:.1f} min (workload build, virtualenvs, every side's start-up, warm-up and "
          f"timed steps)")
    if args.json:
        out = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": {"cpus": os.cpu_count()},
               "workload": {k: v for k, v in spec.items() if k != "prompts"}, "prompt_ids": [q["id"] for q in w["prompts"]],
               "bench_wall_s": wall, "rows": rows}
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
