"""Training-step throughput: the jitted PPO and PRM steps, packed and padded, vs the same loss and update in
plain PyTorch.

All sides train the same weights (a transformers Qwen2ForCausalLM written from the config, loaded into
prime_jax) on the same batch with the same batching: PPO = shuffled mini-batches x micro-batches with
gradient accumulation, seq-mean-token-mean PPO-clip loss, clip 1.0, AdamW; PRM = in-order mini-batches,
frozen-reference forward + PRM forward, CE on beta * sum_t q, clip 10, AdamW, batch_norm'd rewards.
The batch has long-tailed lengths (prompts uniform, responses log-normal with 5% at the limit) and is cut
to its longest prompt and response, as TRL pads a batch. PyTorch runs micro-batches of `--micro` padded
rows; prime_jax padded the same (one sequence per row); prime_jax packed a token budget of `--micro` full
rows per micro-batch, several sequences per row (`prime_jax.rl.packing`).
Prints tokens/s (real prompt + response tokens of the batch per second) for each and the ratios.
Compile time is excluded (one warm-up iteration each) and reported; figures are medians of `--repeats`.
PyTorch runs on the GPU when it sees one (JAX then too, with JAX_PLATFORMS=cuda); `--dtype bfloat16` computes in
bf16 on both sides (fp32 weights; PyTorch under autocast), which on a GPU makes `model.attention=auto` cuDNN's fused
attention; the line names the attention kernel found in the compiled packed PPO step.
Run: `python bench/train_step.py [--rows 32 --prompt 64 --response 192 --dtype float32]`.
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
import torch.nn.functional as F  # noqa: E402
from flax import nnx  # noqa: E402

from prime_jax.mesh import make_mesh  # noqa: E402
from prime_jax.models import load_pretrained, scan_layers_for  # noqa: E402
from prime_jax.models.attention import resolve_attention  # noqa: E402
from prime_jax.rl.packing import PackSpec, lay_out  # noqa: E402
from prime_jax.rl.prm import PrmStepConfig, make_prm_step, prm_minibatches  # noqa: E402
from prime_jax.rl.optim import (OptimConfig, init_train_state, make_lr_schedule, make_optimizer,  # noqa: E402
                                shard_train_state)
from prime_jax.rl.ppo import PpoStepConfig, make_ppo_step, ppo_minibatches  # noqa: E402
from bench.common import attention_kernels, bench_model_config, first_and_median, torch_device  # noqa: E402
from tests.fixtures import write_hf_checkpoint  # noqa: E402

POLICY_OPTIM = OptimConfig(lr=5e-7, weight_decay=0.01, grad_clip=1.0)
PRM_OPTIM = OptimConfig(lr=1e-6, weight_decay=0.0, grad_clip=10.0)
CLIP, BETA = 0.2, 0.05


def make_batch(rows: int, prompt: int, response: int, vocab: int) -> dict[str, np.ndarray]:
    """Left-padded prompts, right-padded responses, acc, old log-probs, advantages. Long-tailed lengths: prompts
    uniform in [prompt / 4, prompt], responses log-normal (median response / 6) with 5% at the limit; the
    arrays are cut to the longest of each, as TRL pads a batch."""
    rng = np.random.default_rng(0)
    plen = rng.integers(prompt // 4, prompt + 1, rows)
    rlen = np.clip(rng.lognormal(np.log(response / 6), 0.7, rows).astype(int), 1, response)
    rlen[rng.permutation(rows)[:max(1, rows // 20)]] = response
    prompt, response = int(plen.max()), int(rlen.max())
    prompt_mask = (np.arange(prompt)[None] >= prompt - plen[:, None]).astype(np.int32)
    mask = (np.arange(response)[None] < rlen[:, None]).astype(np.float32)
    return dict(
        prompt_tokens=(rng.integers(1, vocab, (rows, prompt)) * prompt_mask).astype(np.int32),
        prompt_mask=prompt_mask,
        tokens=(rng.integers(1, vocab, (rows, response)) * mask).astype(np.int32),
        mask=mask,
        acc=np.tile(np.array([1.0, 0.0], np.float32), rows // 2),
        old_logp=(rng.normal(-8.0, 0.5, (rows, response)) * mask).astype(np.float32),
        advantages=(rng.normal(size=(rows, response)) * mask).astype(np.float32),
    )


# ----------------------------------------------------------------------------------------- prime_jax


def jax_steps(path: str, batch: dict[str, np.ndarray], args,
              packed: bool) -> tuple[dict[str, tuple[float, float]], dict[str, float], str]:
    """(first call s, median s) of the PPO and PRM steps, the host layout included; their token efficiency; and
    the attention kernel the compiled PPO step calls. Every PPO call uses the same mini-batch order, so the timed
    calls reuse the first call's compile."""
    rows = len(batch["acc"])
    length = batch["prompt_tokens"].shape[1] + batch["tokens"].shape[1]
    spec = PackSpec("bench", mini_batch_size=args.mini, micro_batch_size=args.micro, data_parallel=1,
                    layout="packed" if packed else "padded", row_length=length, micro_batch_tokens=args.micro * length)
    mesh = make_mesh({"data": 1, "fsdp": -1, "tensor": 1})
    graphdef, params = nnx.split(load_pretrained(path, compute_dtype=args.dtype, attention=args.attention,
                                                 scan_layers=args.scan_layers))
    ppo_cfg = PpoStepConfig(mini_batch_size=args.mini, micro_batch_size=args.micro)
    prm_cfg = PrmStepConfig(n=2, mini_batch_size=args.mini, micro_batch_size=args.micro)
    ppo_tx = make_optimizer(POLICY_OPTIM, ppo_cfg.updates_per_iteration(rows))
    prm_tx = make_optimizer(PRM_OPTIM, prm_cfg.updates_per_iteration(rows))
    policy = shard_train_state(init_train_state(params, ppo_tx), mesh)
    prm = shard_train_state(init_train_state(jax.tree.map(np.array, params), prm_tx), mesh)
    ref = shard_train_state(jax.tree.map(np.array, params), mesh)
    ppo_step = make_ppo_step(graphdef, ppo_tx, ppo_cfg, mesh=mesh, state=policy,
                             lr_schedule=make_lr_schedule(POLICY_OPTIM, ppo_cfg.updates_per_iteration(rows)))
    prm_step = make_prm_step(graphdef, prm_tx, prm_cfg, mesh=mesh, state=prm, ref_params=ref)
    holder = {"policy": policy, "prm": prm, "efficiency": {}}
    ppo_batch = {k: batch[k] for k in ("mask", "old_logp", "advantages")}

    def run_ppo():
        layout = lay_out(batch, ppo_minibatches(rows, ppo_cfg, 0), spec)
        holder["policy"], metrics = ppo_step(holder["policy"], ppo_batch, layout.arrays)
        jax.block_until_ready(metrics)
        holder["efficiency"]["ppo"] = layout.efficiency

    def run_prm():
        layout = lay_out(batch, prm_minibatches(rows, prm_cfg), spec)
        holder["prm"], out = prm_step(holder["prm"], ref, {"mask": batch["mask"], "acc": batch["acc"],
                                                           "unpack": layout.unpack}, layout.arrays)
        jax.block_until_ready(out)
        holder["efficiency"]["prm"] = layout.efficiency

    times = {"ppo": first_and_median(run_ppo, args.repeats), "prm": first_and_median(run_prm, args.repeats)}
    layout = lay_out(batch, ppo_minibatches(rows, ppo_cfg, 0), spec)
    kernel = attention_kernels(ppo_step.lower(holder["policy"], ppo_batch, layout.arrays).compile().as_text())
    return times, holder["efficiency"], kernel


# ----------------------------------------------------------------------------------------- PyTorch


def torch_logprobs(model, b: dict[str, torch.Tensor], rows: torch.Tensor, with_entropy: bool = False):
    """Response-token log-probs (and entropy) of the selected rows: [b, R] float32."""
    prompt, tokens = b["prompt_tokens"][rows], b["tokens"][rows]
    attn = torch.cat([b["prompt_mask"][rows], b["mask"][rows].long()], dim=1)
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=torch.cat([prompt, tokens], dim=1), attention_mask=attn, position_ids=pos).logits
    logp_all = torch.log_softmax(logits[:, prompt.shape[1] - 1:-1].float(), dim=-1)
    logp = logp_all.gather(-1, tokens[..., None])[..., 0]
    if not with_entropy:
        return logp
    with torch.no_grad():
        entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, entropy


def adamw(model, cfg: OptimConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(cfg.b1, cfg.b2), eps=cfg.eps,
                             weight_decay=cfg.weight_decay)


def torch_ppo_iteration(model, opt, b: dict[str, torch.Tensor], mini: int, micro: int) -> None:
    """Shuffled mini-batches, micro-batch accumulation, PPO-clip seq-mean-token-mean, clip 1.0, AdamW."""
    order = torch.randperm(len(b["acc"]))
    for start in range(0, len(order), mini):
        opt.zero_grad(set_to_none=True)
        for m in range(start, start + mini, micro):
            rows = order[m:m + micro]
            logp, _ = torch_logprobs(model, b, rows, with_entropy=True)
            mask, adv = b["mask"][rows], b["advantages"][rows]
            ratio = torch.exp(logp - b["old_logp"][rows])
            loss_t = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - CLIP, 1 + CLIP))
            per_row = (loss_t * mask).sum(-1) / mask.sum(-1).clamp(min=1)
            (per_row.sum() / mini).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), POLICY_OPTIM.grad_clip)
        opt.step()


def torch_prm_iteration(prm, ref, opt, b: dict[str, torch.Tensor], mini: int, micro: int) -> torch.Tensor:
    """In-order mini-batches: rewards from the pre-update PRM, CE loss, clip 10, AdamW; batch_norm'd rewards."""
    rewards = []
    for start in range(0, len(b["acc"]), mini):
        opt.zero_grad(set_to_none=True)
        for m in range(start, start + mini, micro):
            rows = torch.arange(m, m + micro)
            with torch.no_grad():
                logp_ref = torch_logprobs(ref, b, rows)
            q = (torch_logprobs(prm, b, rows) - logp_ref) * b["mask"][rows]
            rewards.append(q.detach())
            z = BETA * q.sum(-1)
            ((F.softplus(z) - b["acc"][rows] * z).sum() / mini).backward()
        torch.nn.utils.clip_grad_norm_(prm.parameters(), PRM_OPTIM.grad_clip)
        opt.step()
    r = torch.cat(rewards)
    to_go = r.flip(-1).cumsum(-1).flip(-1)
    return r / (to_go.abs().max() + 1e-6)


def torch_steps(path: str, batch: dict[str, np.ndarray], args) -> dict[str, tuple[float, float]]:
    """(first call s, median s) of the PyTorch PPO and PRM iterations on `torch_device()`: fp32 weights, the
    forward and backward under autocast to `--dtype` when it is 16-bit (as prime_jax computes)."""
    import contextlib

    import transformers

    device = torch_device()
    load = lambda: transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device)  # noqa: E731
    policy, prm, ref = load().train(), load().train(), load().eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    b = {k: torch.tensor(v, device=device) for k, v in batch.items()}
    b["prompt_tokens"], b["tokens"] = b["prompt_tokens"].long(), b["tokens"].long()
    ppo_opt, prm_opt = adamw(policy, POLICY_OPTIM), adamw(prm, PRM_OPTIM)
    autocast = (torch.autocast(device, dtype=getattr(torch, args.dtype)) if args.dtype != "float32"
                else contextlib.nullcontext())

    def timed(iteration):
        def run():
            with autocast:
                iteration()
            if device == "cuda":
                torch.cuda.synchronize()
        return first_and_median(run, args.repeats)

    return {"ppo": timed(lambda: torch_ppo_iteration(policy, ppo_opt, b, args.mini, args.micro)),
            "prm": timed(lambda: torch_prm_iteration(prm, ref, prm_opt, b, args.mini, args.micro))}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=32, help="responses per step (B)")
    ap.add_argument("--mini", type=int, default=16, help="rows per optimiser step")
    ap.add_argument("--micro", type=int, default=4, help="rows per forward/backward (packed: a budget of this many full rows)")
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--response", type=int, default=192)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="compute dtype (weights fp32)")
    ap.add_argument("--attention", default="auto", help="prime_jax model.attention: auto | xla | cudnn")
    ap.add_argument("--layers", default="auto", help="prime_jax model.layers: auto (as a run resolves it) | scan | unroll")
    args = ap.parse_args()
    args.attention = resolve_attention(args.attention, jax.default_backend(), args.dtype)
    args.scan_layers = scan_layers_for(args.layers, jax.default_backend())
    cfg = bench_model_config()
    batch = make_batch(args.rows, args.prompt, args.response, cfg.vocab_size)
    tokens = int(batch["prompt_mask"].sum() + batch["mask"].sum())
    width = batch["prompt_tokens"].shape[1] + batch["tokens"].shape[1]
    with tempfile.TemporaryDirectory() as d:
        write_hf_checkpoint(cfg, d)
        packed, packed_eff, kernel = jax_steps(d, batch, args, packed=True)
        padded, padded_eff, _ = jax_steps(d, batch, args, packed=False)
        theirs = torch_steps(d, batch, args)
    lengths = batch["prompt_mask"].sum(1) + batch["mask"].sum(1)
    print(f"model: qwen2 d={cfg.hidden_size} L={cfg.num_layers} V={cfg.vocab_size}, fp32 weights, {args.dtype} "
          f"compute, layers {'scanned' if args.scan_layers else 'unrolled'}; batch {args.rows} rows, "
          f"{tokens} real tokens in {args.rows} x {width} padded slots (sequence length median {np.median(lengths):.0f}, "
          f"max {lengths.max()}), mini {args.mini}, micro {args.micro}; {jax.devices()[0].platform} "
          f"x{len(jax.devices())}, torch on {torch_device()} (threads {torch.get_num_threads()}); packed PPO step "
          f"attention: {kernel}")
    for name in ("ppo", "prm"):
        (k_first, k), (d_first, d), (_, t) = packed[name], padded[name], theirs[name]
        print(f"{name}_step: prime_jax packed {tokens / k:,.0f} tok/s (token efficiency {packed_eff[name]:.2f}, first "
              f"call {k_first:.1f} s) | prime_jax padded {tokens / d:,.0f} tok/s (efficiency {padded_eff[name]:.2f}, "
              f"first call {d_first:.1f} s) | torch {tokens / t:,.0f} tok/s | packed/torch {t / k:.2f}x, "
              f"padded/torch {t / d:.2f}x, packed/padded {d / k:.2f}x")


if __name__ == "__main__":
    main()
