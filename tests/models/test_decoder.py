"""Decoder parity with transformers (PyTorch) on left-padded batches, the HF round trip, and the package layering."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from flax import nnx

from prime_jax.models import load_pretrained, save_pretrained, scan_layers_for
from tests.fixtures import hf_logits


@pytest.mark.parametrize("scan_layers", [True, False], ids=["scan", "unroll"])
@pytest.mark.parametrize("ckpt", ["qwen2_dir", "llama_dir"])
def test_logits_match_transformers_with_left_padding(ckpt, scan_layers, request, left_padded_batch):
    path = request.getfixturevalue(ckpt)
    tokens, mask = left_padded_batch
    model = load_pretrained(path, scan_layers=scan_layers)
    ours = np.asarray(model(tokens, attention_mask=mask))
    ref = hf_logits(path, tokens, mask)
    real = mask.astype(bool)  # padded positions are undefined in both implementations
    assert np.max(np.abs(ours[real] - ref[real])) < 1e-4


def test_unrolled_layers_give_the_scanned_gradients(qwen2_dir, left_padded_batch):
    """model.layers=unroll (the CPU default) and scan differentiate to the same gradients (fp32, to rounding)."""
    tokens, mask = left_padded_batch

    def grads(scan_layers):
        graphdef, params = nnx.split(load_pretrained(qwen2_dir, scan_layers=scan_layers), nnx.Param)
        loss = lambda p: jnp.sum(jax.nn.log_softmax(nnx.merge(graphdef, p)(tokens, attention_mask=mask))[..., 5] * mask)  # noqa: E731
        return jax.tree.leaves(jax.grad(loss)(params))

    for a, b in zip(grads(True), grads(False), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


def test_model_layers_resolve_per_platform():
    assert [scan_layers_for(v, p) for v in ("auto", "scan", "unroll") for p in ("cpu", "tpu")] == [
        False, True, True, True, False, False]
    with pytest.raises(ValueError, match="model.layers='loop'"):
        scan_layers_for("loop", "cpu")


def test_config_read_from_hf(qwen2_dir, llama_dir):
    q = load_pretrained(qwen2_dir).cfg
    assert (q.model_type, q.num_kv_heads, q.attention_bias, q.tie_word_embeddings) == ("qwen2", 2, True, False)
    lm = load_pretrained(llama_dir).cfg
    assert (lm.model_type, lm.tie_word_embeddings, lm.attention_bias) == ("llama", True, False)
    assert lm.rope_scaling is not None and lm.rope_scaling.factor == 8.0


@pytest.mark.parametrize("ckpt", ["qwen2_dir", "llama_dir"])
def test_round_trip_through_transformers(ckpt, request, tmp_path, left_padded_batch):
    path = request.getfixturevalue(ckpt)
    tokens, mask = left_padded_batch
    model = load_pretrained(path)
    save_pretrained(model, tmp_path / "export")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "export")
    assert type(hf).__name__ in ("Qwen2ForCausalLM", "LlamaForCausalLM")
    np.testing.assert_array_equal(hf_logits(tmp_path / "export", tokens, mask), hf_logits(path, tokens, mask))
    again = load_pretrained(tmp_path / "export")
    np.testing.assert_array_equal(np.asarray(again(tokens, attention_mask=mask)), np.asarray(model(tokens, attention_mask=mask)))


def test_sharded_save_writes_an_index_that_loads(qwen2_dir, tmp_path, left_padded_batch):
    tokens, mask = left_padded_batch
    model = load_pretrained(qwen2_dir)
    save_pretrained(model, tmp_path / "sharded", max_shard_bytes=20_000)
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    assert len(list((tmp_path / "sharded").glob("model-*.safetensors"))) > 1
    np.testing.assert_array_equal(np.asarray(load_pretrained(tmp_path / "sharded")(tokens, attention_mask=mask)),
                                  np.asarray(model(tokens, attention_mask=mask)))


def test_bf16_export_loads_in_transformers(qwen2_dir, tmp_path, left_padded_batch):
    tokens, mask = left_padded_batch
    save_pretrained(load_pretrained(qwen2_dir), tmp_path / "bf16", dtype="bfloat16")
    back = load_pretrained(tmp_path / "bf16")
    ref = hf_logits(qwen2_dir, tokens, mask)
    real = mask.astype(bool)
    assert np.max(np.abs(np.asarray(back(tokens, attention_mask=mask))[real] - ref[real])) < 0.05


def test_the_model_package_does_not_import_the_sampler():
    """`prime_jax.models` sits below `prime_jax.sampling` (the sampler's KV cache and decode step build on the
    decoder's layer helpers, never the other way round): importing the models loads no sampler module."""
    code = "import sys, prime_jax.models; print(sorted(m for m in sys.modules if m.startswith('prime_jax.sampling')))"
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root,
                         env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert out.stdout.strip() == "[]", out.stdout
