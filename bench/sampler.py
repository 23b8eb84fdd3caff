"""Rollout throughput: prime_jax `generate` (jitted prefill + while_loop decode) vs transformers `generate`
(PyTorch), same weights, same prompts, same number of new tokens, sampling on (temperature 1, no top-k/top-p,
the PRIME rollout setting), in one run.

Prints generated tokens/s for both at each batch size and the ratio. Neither side can stop early (no stop ids,
no eos), so both generate exactly `--new` tokens per row. Compile time is excluded: prime_jax is warmed up
once with the timed shapes (transformers with a short call); the figure is the median of `--repeats` timed
calls. transformers is timed with each of `--torch-threads` and the ratio is taken against its fastest.
Run: `python bench/sampler.py [--batches 8 64 --prompt 32 --new 128]`.
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
import transformers  # noqa: E402

from prime_jax.models import load_pretrained  # noqa: E402
from prime_jax.sampling import generate  # noqa: E402
from bench.common import median_seconds  # noqa: E402
from tests.fixtures import tiny_config, write_hf_checkpoint  # noqa: E402




def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", type=int, nargs="+", default=[8, 64])
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--torch-threads", type=int, nargs="+", default=[torch.get_num_threads(), 1],
                    help="transformers is timed at each; the ratio uses the fastest (OpenMP with all cores can be "
                         "10x slower than 1 thread when other processes load the CPU)")
    args = ap.parse_args()
    cfg = tiny_config(vocab_size=4096, hidden_size=256, intermediate_size=1024, num_layers=4, num_heads=4,
                      num_kv_heads=2, head_dim=64, max_position_embeddings=4096, logits_chunk=1024)
    with tempfile.TemporaryDirectory() as d:
        write_hf_checkpoint(cfg, d)
        hf = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
        model = load_pretrained(d)
    print(f"model: qwen2 d={cfg.hidden_size} L={cfg.num_layers} heads {cfg.num_heads}/{cfg.num_kv_heads} "
          f"ffn {cfg.intermediate_size} V={cfg.vocab_size} ({cfg.num_params / 1e6:.1f}M params), fp32; "
          f"prompt {args.prompt} tokens, {args.new} new tokens per row, temperature 1.0, top_p 1.0, top_k off; "
          f"jax on {jax.devices()[0].platform}, {os.cpu_count()} CPUs")
    print(f"compile and warm-up excluded (one untimed call per side first); median of {args.repeats} timed calls")
    rng = np.random.default_rng(0)
    for batch in args.batches:
        prompts = rng.integers(1, cfg.vocab_size, (batch, args.prompt))
        ids = torch.tensor(prompts, dtype=torch.long)
        ones = torch.ones_like(ids)
        seeds = iter(range(1_000_000))

        def ours() -> None:
            out = generate(model, prompts.tolist(), max_new_tokens=args.new, temperature=1.0, stop_ids=(),
                           seed=next(seeds), buckets=(args.prompt,))
            assert out.tokens.shape == (batch, args.new) and (out.lengths == args.new).all()

        def theirs(new: int) -> None:
            with torch.inference_mode():
                out = hf.generate(input_ids=ids, attention_mask=ones, do_sample=True, temperature=1.0, top_p=1.0,
                                  top_k=0, max_new_tokens=new, min_new_tokens=new, eos_token_id=None, pad_token_id=0)
            assert out.shape == (batch, args.prompt + new)

        t_ours = median_seconds(ours, args.repeats)
        line = f"batch {batch:3d}: prime_jax {batch * args.new / t_ours:8.0f} tokens/s"
        best = np.inf
        for threads in args.torch_threads:
            torch.set_num_threads(threads)
            t = median_seconds(lambda: theirs(args.new), args.repeats, warmup=lambda: theirs(4))
            best = min(best, t)
            line += f" | transformers ({threads} thr) {batch * args.new / t:7.0f} tokens/s"
        print(f"{line} | ratio vs the faster transformers {best / t_ours:.2f}x", flush=True)


if __name__ == "__main__":
    main()
