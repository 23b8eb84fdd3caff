"""Optimiser factory vs torch (clip_grad_norm_ + AdamW), non-finite updates skipped, hand-computed lr schedules."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from prime_jax.rl.optim import (OptimConfig, apply_gradients, init_train_state, make_lr_schedule, make_optimizer,
                                skipped_updates)


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


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_gradients_are_skipped_as_torch_would_not_step(bad):
    """Clean, non-finite, clean, non-finite, clean gradients == torch stepping on the three clean ones only: a skipped
    update moves nothing (no weight decay, no Adam moment or bias-correction count), bit for bit."""
    rng = np.random.default_rng(1)
    w0 = {"a": rng.normal(size=(3, 4)), "b": rng.normal(size=5)}
    grads = [{k: rng.normal(size=v.shape) * s for k, v in w0.items()} for s in (5.0, 1.0, 0.1, 1.0, 3.0)]
    grads[1]["a"][2, 1] = bad
    grads[3]["b"][0] = bad
    cfg = OptimConfig(lr=1e-2, weight_decay=0.1, grad_clip=1.0)
    tx = make_optimizer(cfg, updates_per_iteration=1)
    state = init_train_state({k: jnp.asarray(v, jnp.float32) for k, v in w0.items()}, tx)
    tw = {k: torch.tensor(v, dtype=torch.float64, requires_grad=True) for k, v in w0.items()}
    opt = torch.optim.AdamW(list(tw.values()), lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1)
    for i, g in enumerate(grads):
        before = jax.tree.map(np.array, state)
        state = apply_gradients(state, {k: jnp.asarray(v, jnp.float32) for k, v in g.items()}, tx)
        if i in (1, 3):
            for x, y in zip(jax.tree.leaves((before.params, before.opt_state.inner_state, before.step)),
                            jax.tree.leaves((state.params, state.opt_state.inner_state, state.step)), strict=True):
                assert np.asarray(x).tobytes() == np.asarray(y).tobytes()
            continue
        for k in tw:
            tw[k].grad = torch.tensor(g[k], dtype=torch.float64)
        torch.nn.utils.clip_grad_norm_(list(tw.values()), 1.0)
        opt.step()
    assert int(state.step) == 3 and int(skipped_updates(state.opt_state)) == 2
    for k in tw:
        np.testing.assert_allclose(np.asarray(state.params[k]), tw[k].detach().numpy(), rtol=1e-5, atol=1e-6)


def test_finite_gradients_with_a_non_finite_loss_are_skipped_and_a_finite_loss_changes_nothing():
    tx = make_optimizer(OptimConfig(lr=1e-2, weight_decay=0.01), updates_per_iteration=1)
    params = {"a": jnp.ones((2, 3)), "b": jnp.full((4,), -2.0)}
    grads = {"a": jnp.full((2, 3), 0.5), "b": jnp.arange(4.0)}
    state = init_train_state(params, tx)
    skipped = apply_gradients(state, grads, tx, loss=jnp.float32(np.nan))
    assert int(skipped_updates(skipped.opt_state)) == 1 and int(skipped.step) == 0
    for x, y in zip(jax.tree.leaves((skipped.params, skipped.opt_state.inner_state)),
                    jax.tree.leaves((params, state.opt_state.inner_state)), strict=True):
        assert np.asarray(x).tobytes() == np.asarray(y).tobytes()
    with_loss = apply_gradients(state, grads, tx, loss=jnp.float32(1.5))
    without = apply_gradients(state, grads, tx)
    for x, y in zip(jax.tree.leaves(with_loss), jax.tree.leaves(without), strict=True):
        assert np.asarray(x).tobytes() == np.asarray(y).tobytes()
    assert not np.array_equal(with_loss.params["a"], params["a"])


def test_never_gives_up_on_skipping_non_finite_updates():
    """optax.apply_if_finite applies updates after max_consecutive_errors in a row; make_optimizer's bound is out of
    reach: even at the counter's saturation a NaN update is skipped (the trainer stops the run instead)."""
    tx = make_optimizer(OptimConfig(lr=1e-2), updates_per_iteration=1)
    params = {"a": jnp.ones(3)}
    state = init_train_state(params, tx)
    inner = jax.tree.map(np.array, state.opt_state.inner_state)
    top = jnp.iinfo(jnp.int32).max
    state = state._replace(opt_state=state.opt_state._replace(notfinite_count=jnp.asarray(top - 1, jnp.int32)))
    for _ in range(3):
        state = apply_gradients(state, {"a": jnp.array([1.0, np.nan, 0.0])}, tx)
        np.testing.assert_array_equal(state.params["a"], params["a"])
        for x, y in zip(jax.tree.leaves(state.opt_state.inner_state), jax.tree.leaves(inner), strict=True):
            np.testing.assert_array_equal(x, y)
    assert int(state.opt_state.notfinite_count) == top
