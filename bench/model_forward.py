"""Forward-pass throughput: prime_jax (jitted, CPU) vs transformers (PyTorch, CPU), same weights and batch.

Prints tokens/s for both and the ratio. Run: `python bench/model_forward.py [--batch 8 --seq 256]`.
Compile time is excluded (one warm-up call each); the figure is the median of `--repeats` timed calls.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from flax import nnx  # noqa: E402

from prime_jax.models import load_pretrained  # noqa: E402
from bench.common import bench_model_config, median_seconds  # noqa: E402
from tests.fixtures import write_hf_checkpoint  # noqa: E402




def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    cfg = bench_model_config()
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (args.batch, args.seq)).astype(np.int32)
    mask = np.ones_like(tokens)
    with tempfile.TemporaryDirectory() as d:
        write_hf_checkpoint(cfg, d)
        import transformers
        hf = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
        model = load_pretrained(d)
    graphdef, state = nnx.split(model)
    fwd = jax.jit(lambda s, t, m: nnx.merge(graphdef, s)(t, attention_mask=m))
    t_jax = median_seconds(lambda: fwd(state, tokens, mask).block_until_ready(), args.repeats)
    tt, tm = torch.tensor(tokens, dtype=torch.long), torch.tensor(mask)
    with torch.inference_mode():
        t_torch = median_seconds(lambda: hf(input_ids=tt, attention_mask=tm).logits, args.repeats)
    n = args.batch * args.seq
    print(f"model: qwen2 d={cfg.hidden_size} L={cfg.num_layers} V={cfg.vocab_size}; batch {args.batch} x {args.seq} tokens, fp32, "
          f"{jax.devices()[0].platform}, torch threads {torch.get_num_threads()}")
    print(f"prime_jax    forward: {n / t_jax:12.0f} tokens/s")
    print(f"transformers forward: {n / t_torch:12.0f} tokens/s")
    print(f"ratio prime_jax / transformers: {t_torch / t_jax:.2f}x")


if __name__ == "__main__":
    main()
