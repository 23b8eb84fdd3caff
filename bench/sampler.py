"""Rollout throughput on long-tailed response lengths: prime_jax's sampler (continuous batching) vs transformers
`generate` (PyTorch), same weights, same prompts, same stop rule, sampling at temperature 1, in one run.

The model has a small vocabulary (`--vocab`, one of its ids the stop token) and near-uniform next-token
probabilities, so a response stops at each step with probability ~1/vocab: lengths are geometric with mean
~vocab tokens, `--new` (the limit) ~4x that, and a few rows hit the limit. Both sides sample `--prompts` x
`--n` rows with at most R rows in flight for each R of `--in-flight`: prime_jax with prompts_per_call = R / n
(a row that stops hands its slot to the next waiting sample), transformers in calls of R / n prompts x n
return sequences (each call runs until its longest row stops). Prints, per R, each side's generated tokens
(up to and including the stop token) per second and the ratio. Compile time is excluded (prime_jax is run
once untimed with the timed shapes; transformers with a short call); figures are medians of `--repeats`
rounds, each of which times every variant once in turn (a slow spell of the machine hits both sides).
transformers is timed with each of `--torch-threads` and the ratio is taken against its fastest.
prime_jax is timed with its rows on one device and split over D devices for each D of `--data-parallel` (a
data-parallel mesh; on CPU the host is split into D XLA devices, each decoding its share of the rows on its own
core, which is how a multi-core host runs prime_jax's mesh; default: 1 and the core count).
On a GPU machine (JAX_PLATFORMS=cuda) transformers runs on the GPU too.
Run: `python bench/sampler.py [--in-flight 64 8 --prompts 64 --n 4 --new 256 --vocab 64 --data-parallel 1 2]`.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import tempfile


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser()
    ap.add_argument("--in-flight", type=int, nargs="+", default=[64, 8], help="most rows decoded at once")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--n", type=int, default=4, help="samples per prompt")
    ap.add_argument("--prompt", type=int, default=32, help="prompt tokens")
    ap.add_argument("--new", type=int, default=256, help="response length limit")
    ap.add_argument("--vocab", type=int, default=64, help="vocabulary size: mean response length ~ vocab")
    ap.add_argument("--steps-per-sync", type=int, default=8)
    ap.add_argument("--kv-block", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--data-parallel", type=int, nargs="+", default=None,
                    help="prime_jax is timed with its rows split over each of these numbers of devices (a data-parallel "
                         "mesh); on CPU the host is split into that many XLA devices. Default: 1 and, on a CPU with "
                         "several cores, the core count")
    ap.add_argument("--torch-threads", type=int, nargs="+", default=[os.cpu_count() or 1, 1],
                    help="transformers is timed at each; the ratio uses the fastest (OpenMP with all cores can be "
                         "10x slower than 1 thread when other processes load the CPU)")
    return ap.parse_args()


ARGS = parse_args() if __name__ == "__main__" else None
os.environ.setdefault("JAX_PLATFORMS", "cpu")
if ARGS is not None and os.environ["JAX_PLATFORMS"] == "cpu":  # one XLA device per core, before jax is imported
    ARGS.data_parallel = ARGS.data_parallel or sorted({1, os.cpu_count() or 1})
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={max(ARGS.data_parallel)}")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from bench.common import interleaved_rates, torch_device  # noqa: E402
from prime_jax.mesh import make_mesh  # noqa: E402
from prime_jax.models import load_pretrained  # noqa: E402
from prime_jax.sampling import generate  # noqa: E402
from tests.fixtures import tiny_config, write_hf_checkpoint  # noqa: E402

STOP = 1


def main(args: argparse.Namespace) -> None:
    args.data_parallel = args.data_parallel or [1]
    if max(args.data_parallel) > jax.device_count():
        raise SystemExit(f"--data-parallel {max(args.data_parallel)}: only {jax.device_count()} devices")
    cfg = tiny_config(vocab_size=args.vocab, hidden_size=256, intermediate_size=1024, num_layers=4, num_heads=4,
                      num_kv_heads=2, head_dim=64, max_position_embeddings=4096, logits_chunk=1024)
    with tempfile.TemporaryDirectory() as d:
        write_hf_checkpoint(cfg, d)
        hf = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).to(torch_device()).eval()
        meshes = {dp: make_mesh({"data": dp}, jax.devices()[:dp]) if dp > 1 else None for dp in args.data_parallel}
        models = {dp: load_pretrained(d, mesh=mesh) for dp, mesh in meshes.items()}
    rows = args.prompts * args.n
    prompts = np.random.default_rng(0).integers(2, cfg.vocab_size, (args.prompts, args.prompt))
    print(f"model: qwen2 d={cfg.hidden_size} L={cfg.num_layers} heads {cfg.num_heads}/{cfg.num_kv_heads} "
          f"ffn {cfg.intermediate_size} V={cfg.vocab_size} ({cfg.num_params / 1e6:.1f}M params), fp32; "
          f"{args.prompts} prompts of {args.prompt} tokens x {args.n} samples = {rows} rows, at most {args.new} new "
          f"tokens, stop id {STOP}, temperature 1.0; jax on {jax.devices()[0].platform}, transformers on {hf.device}, "
          f"{os.cpu_count()} CPUs; "
          f"steps_per_sync {args.steps_per_sync}, kv_block {args.kv_block}; prime_jax's rows split over "
          f"{' / '.join(map(str, args.data_parallel))} device(s)")
    print(f"compile and warm-up excluded; median of {args.repeats} rounds, each timing every variant once in turn")
    for in_flight in args.in_flight:
        if in_flight % args.n or args.prompts % (in_flight // args.n) or any(in_flight % dp for dp in args.data_parallel):
            raise SystemExit(f"--in-flight {in_flight}: must be a multiple of --n and of each --data-parallel, whose "
                             f"prompts divide --prompts")
        per_call = in_flight // args.n
        seeds = iter(range(1_000_000))
        lengths: list[float] = []

        def ours(dp: int) -> int:
            out = generate(models[dp], prompts.tolist(), mesh=meshes[dp], n=args.n, max_new_tokens=args.new, temperature=1.0, stop_ids=(STOP,),
                           seed=next(seeds), buckets=(args.prompt,), prompts_per_call=per_call,
                           steps_per_sync=args.steps_per_sync, kv_block=args.kv_block)
            lengths.append(float(out.lengths.mean()))
            return int(out.lengths.sum())

        def theirs(new: int, threads: int) -> int:
            torch.set_num_threads(threads)
            total = 0
            with torch.inference_mode():
                for i in range(0, args.prompts, per_call):
                    ids = torch.tensor(prompts[i:i + per_call], dtype=torch.long, device=hf.device)
                    out = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True,
                                      temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=new, eos_token_id=STOP,
                                      pad_token_id=0, num_return_sequences=args.n)[:, args.prompt:]
                    done = (out == STOP).cumsum(1) - (out == STOP).int() > 0  # after the first stop token
                    total += int((~done).sum())
            return total

        fns = {f"prime_jax ({dp} dev)": functools.partial(ours, dp) for dp in args.data_parallel}
        fns.update({f"transformers ({t} thr)": functools.partial(theirs, args.new, t) for t in args.torch_threads})
        warmups = {f"transformers ({t} thr)": functools.partial(theirs, 4, t) for t in args.torch_threads}
        rates = interleaved_rates(fns, args.repeats, warmups)
        line = f"{in_flight:3d} rows in flight | " + " | ".join(f"{k} {v:7.0f} tokens/s" for k, v in rates.items())
        line += f" | prime_jax mean length {np.mean(lengths):.0f} of {args.new}"
        best = max(v for k, v in rates.items() if k.startswith("transformers"))
        ratios = ", ".join(f"{rates[f'prime_jax ({dp} dev)'] / best:.2f}x ({dp} dev)" for dp in args.data_parallel)
        print(f"{line} | ratio vs the faster transformers {ratios}", flush=True)


if __name__ == "__main__":
    main(ARGS)
