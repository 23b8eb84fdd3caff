"""Optimiser factory vs torch (clip_grad_norm_ + AdamW) and hand-computed lr schedules."""
import jax.numpy as jnp
import numpy as np
import torch

from prime_jax.rl.optim import OptimConfig, apply_gradients, init_train_state, make_lr_schedule, make_optimizer


def test_matches_torch_clip_and_adamw():
    rng = np.random.default_rng(0)
    w0 = {"a": rng.normal(size=(3, 4)), "b": rng.normal(size=5)}
    grads = [{k: rng.normal(size=v.shape) * s for k, v in w0.items()} for s in (5.0, 0.1, 3.0)]
    cfg = OptimConfig(lr=1e-2, weight_decay=0.01, grad_clip=1.0)
    tx = make_optimizer(cfg, updates_per_iteration=1)
    state = init_train_state({k: jnp.asarray(v, jnp.float32) for k, v in w0.items()}, tx)
    tw = {k: torch.tensor(v, dtype=torch.float64, requires_grad=True) for k, v in w0.items()}
    opt = torch.optim.AdamW(list(tw.values()), lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    for g in grads:
        state = apply_gradients(state, {k: jnp.asarray(v, jnp.float32) for k, v in g.items()}, tx)
        for k in tw:
            tw[k].grad = torch.tensor(g[k], dtype=torch.float64)
        torch.nn.utils.clip_grad_norm_(list(tw.values()), 1.0)
        opt.step()
    assert int(state.step) == 3
    for k in tw:
        np.testing.assert_allclose(np.asarray(state.params[k]), tw[k].detach().numpy(), rtol=1e-5, atol=1e-6)


def test_schedules():
    steps = jnp.arange(12)
    constant = make_lr_schedule(OptimConfig(lr=2.0), updates_per_iteration=4)
    np.testing.assert_allclose(np.asarray(constant(steps)), np.full(12, 2.0))
    quirk = make_lr_schedule(OptimConfig(lr=2.0, zero_lr_first_iteration=True), updates_per_iteration=4)
    np.testing.assert_allclose(np.asarray(quirk(steps)), [0.0] * 4 + [2.0] * 8)
    warm = make_lr_schedule(OptimConfig(lr=1.0, warmup_iterations=2), updates_per_iteration=2)
    np.testing.assert_allclose(np.asarray(warm(jnp.arange(6))), [0.5, 0.5, 1, 1, 1, 1])
    cos = make_lr_schedule(OptimConfig(lr=1.0, schedule="cosine", total_iterations=3), updates_per_iteration=1)
    np.testing.assert_allclose(np.asarray(cos(jnp.arange(4))), [1.0, 0.75, 0.25, 0.0], atol=1e-6)
