"""The jitted PPO step vs a plain mini-batch loop; packed, padded and shared-prompt slots, micro-batching, sharding, learning
direction, errors."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from prime_jax.mesh import make_mesh
from prime_jax.models import response_logprobs
from prime_jax.rl.optim import OptimConfig, init_train_state, make_lr_schedule, make_optimizer, shard_train_state
from prime_jax.rl.ppo import PpoStepConfig, aggregate, make_ppo_step, policy_loss, ppo_minibatches
from tests.fixtures import (assert_trees_close, copy_tree, layout, logp_fn, make_batch, one_device_mesh,
                                tiny_model)

B, MINI = 16, 8
# Adam eps 1e-6 instead of 1e-8: with 1e-8 a gradient entry at rounding-noise level (~1e-9) gets a
# sign-like update of size ~lr, so two exact-in-maths orders of summation could differ by ~lr there.
OPTIM = OptimConfig(lr=1e-3, weight_decay=0.01, grad_clip=1.0, eps=1e-6)
FULL = dict(agg="token", entropy_coef=0.01, kl_coef=0.1)       # every loss term switched on


@pytest.fixture(scope="module")
def model():
    graphdef, params = tiny_model(0)
    return graphdef, params, logp_fn(graphdef)


@functools.cache
def compiled(cfg: PpoStepConfig, mesh_axes: tuple = ()):
    """One compiled step per (config, mesh), shared by the tests of this module."""
    graphdef, params = tiny_model(0)
    mesh = make_mesh(dict(mesh_axes)) if mesh_axes else one_device_mesh()
    updates = cfg.updates_per_iteration(B)
    tx = make_optimizer(OPTIM, updates)
    step = make_ppo_step(graphdef, tx, cfg, mesh=mesh, state=init_train_state(params, tx),
                         lr_schedule=make_lr_schedule(OPTIM, updates))
    return step, tx, mesh


def ppo_batch(seed, logps, params, group=4):
    """A batch whose old log-probs are near the current policy's and advantages are random; runs of `group` rows
    share a prompt."""
    batch = make_batch(seed, B, group=group)
    rng = np.random.default_rng(seed)
    logp, _ = logps(params, batch)
    batch["old_logp"] = np.asarray(logp) + rng.normal(0, 0.1, logp.shape).astype(np.float32)
    batch["ref_logp"] = np.asarray(logp) + rng.normal(0, 0.1, logp.shape).astype(np.float32)
    batch["advantages"] = rng.normal(size=logp.shape).astype(np.float32)
    return batch


def run_step(cfg, params, batch, seed, mesh_axes=(), kind="packed"):
    step, tx, mesh = compiled(cfg, mesh_axes)
    state = shard_train_state(init_train_state(copy_tree(params), tx), mesh)
    slots = layout(batch, ppo_minibatches(B, cfg, seed), cfg.micro_batch_size, kind, dp=len(mesh.devices.flat))
    state, metrics = step(state, batch, slots.arrays)
    return state, metrics, tx


def reference_grad(graphdef, cfg: PpoStepConfig):
    """jitted (params, mini-batch) -> ((loss, metrics), grads) on a whole mini-batch."""
    return _reference_grad(graphdef, cfg.clip, cfg.agg, cfg.entropy_coef, cfg.kl_coef)


@functools.cache
def _reference_grad(graphdef, clip, agg, entropy_coef, kl_coef):
    @jax.jit
    def fn(params, mb):
        def loss(p):
            lp, ent = response_logprobs(nnx.merge(graphdef, p), mb["prompt_tokens"], mb["prompt_mask"], mb["tokens"],
                                        mb["mask"], with_entropy=True)
            pg, clipfrac = policy_loss(lp, mb["old_logp"], mb["advantages"], mb["mask"], clip=clip, agg=agg)
            d = mb["ref_logp"] - lp
            kl = aggregate(jnp.exp(d) - d - 1.0, mb["mask"], agg)
            entropy = aggregate(ent, mb["mask"], agg)
            ppo_kl = aggregate(mb["old_logp"] - lp, mb["mask"], agg)
            total = pg - entropy_coef * entropy + kl_coef * kl
            return total, {"actor/pg_loss": pg, "actor/pg_clipfrac": clipfrac, "actor/entropy": entropy,
                           "actor/ppo_kl": ppo_kl, "actor/kl_loss": kl}
        return jax.value_and_grad(loss, has_aux=True)(params)
    return fn


def reference_iteration(graphdef, cfg, tx, params, batch, seed):
    """docs/prime_spec.md §1.7 as a plain loop over whole mini-batches, in the order `ppo_minibatches` gives."""
    grad = reference_grad(graphdef, cfg)
    opt_state = tx.init(params)
    history = []
    for rows in ppo_minibatches(B, cfg, seed):
        mb = {k: v[rows] for k, v in batch.items()}
        (_, metrics), grads = grad(params, mb)
        metrics["actor/grad_norm"] = optax.tree.norm(grads)
        history.append({k: float(v) for k, v in metrics.items()})
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
    return params, {k: np.mean([h[k] for h in history]) for k in history[0]}


@pytest.mark.parametrize("micro, kind", [(8, "packed"), (4, "packed"), (2, "packed"), (4, "padded"),
                                         (4, "shared_prompt")])
def test_step_matches_loop_reference_for_1_2_4_micro_batches(model, micro, kind):
    graphdef, params, logps = model
    batch = ppo_batch(0, logps, params)
    cfg = PpoStepConfig(mini_batch_size=MINI, micro_batch_size=micro, **FULL)
    state, metrics, tx = run_step(cfg, params, batch, 7, kind=kind)
    want_params, want = reference_iteration(graphdef, cfg, tx, params, batch, 7)
    assert int(state.step) == B // MINI
    for k, v in want.items():
        np.testing.assert_allclose(float(metrics[k]), v, rtol=1e-5, atol=1e-6, err_msg=k)
    assert 0 < float(metrics["actor/pg_clipfrac"]) < 1 and float(metrics["actor/kl_loss"]) > 0
    np.testing.assert_allclose(float(metrics["actor/lr"]), OPTIM.lr, rtol=1e-6)
    assert_trees_close(state.params, want_params)


def test_layouts_agree_on_one_device(model):
    _, params, logps = model
    batch = ppo_batch(4, logps, params)
    cfg = PpoStepConfig(mini_batch_size=MINI, micro_batch_size=4, **FULL)   # every layout compiled above
    padded_state, padded, _ = run_step(cfg, params, batch, 5, kind="padded")
    for kind in ("packed", "shared_prompt"):
        state, metrics, _ = run_step(cfg, params, batch, 5, kind=kind)
        for k in padded:
            np.testing.assert_allclose(float(metrics[k]), float(padded[k]), rtol=1e-5, atol=1e-6, err_msg=f"{kind} {k}")
        assert_trees_close(state.params, padded_state.params)


def test_sharded_two_axis_mesh_packed_matches_one_device_padded_and_params_stay_sharded(model):
    _, params, logps = model
    batch = ppo_batch(1, logps, params)
    cfg = PpoStepConfig(mini_batch_size=MINI, micro_batch_size=8, **FULL)
    one_state, one_metrics, _ = run_step(cfg, params, batch, 3, kind="padded")
    state, metrics, _ = run_step(cfg, params, batch, 3, mesh_axes=(("data", 2), ("fsdp", 4)))
    for k in one_metrics:
        np.testing.assert_allclose(float(metrics[k]), float(one_metrics[k]), rtol=1e-5, atol=1e-6, err_msg=k)
    assert_trees_close(state.params, one_state.params)
    up = state.params["layers"]["up"][...]
    assert up.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", None)
    assert len({repr(s.index) for s in up.addressable_shards}) == 4
    assert state.opt_state.inner_state[1][0].nu["layers"]["up"][...].sharding.spec == up.sharding.spec


def test_steps_raise_positive_and_lower_negative_advantage_responses(model):
    _, params, logps = model
    batch = make_batch(2, B)
    sign = np.where(batch["acc"] > 0, 1.0, -1.0).astype(np.float32)
    batch["advantages"] = (sign[:, None] * batch["mask"]).astype(np.float32)
    cfg = PpoStepConfig(mini_batch_size=MINI, micro_batch_size=8, **FULL)   # the step compiled above
    step, tx, mesh = compiled(cfg)
    state = shard_train_state(init_train_state(copy_tree(params), tx), mesh)
    seq_logp = lambda p: np.sum(np.asarray(logps(p, batch)[0]) * batch["mask"], axis=1)  # noqa: E731
    start = seq_logp(params)
    for i in range(3):
        batch["old_logp"] = batch["ref_logp"] = np.asarray(logps(state.params, batch)[0])   # on-policy rollout
        state, metrics = step(state, batch, layout(batch, ppo_minibatches(B, cfg, i), 8, kind="packed").arrays)
        assert float(metrics["actor/pg_clipfrac"]) == 0.0     # ratio 1 on the first mini-batch, within 1 +- 0.2 after it
    delta = seq_logp(state.params) - start
    assert np.all(delta[sign > 0] > 0) and np.all(delta[sign < 0] < 0), delta


def test_kl_needs_reference_log_probs(model):
    _, params, logps = model
    batch = ppo_batch(0, logps, params)
    del batch["ref_logp"]
    cfg = PpoStepConfig(mini_batch_size=MINI, micro_batch_size=8, **FULL)
    with pytest.raises(ValueError, match="missing \\['ref_logp'\\]"):
        run_step(cfg, params, batch, 0)


def host_leaves(tree):
    """Host copies of a tree's leaves (steps donate their state)."""
    return [np.array(x) for x in jax.tree.leaves(tree)]


def assert_bitwise_equal(got, want):
    for i, (x, y) in enumerate(zip(got, want, strict=True)):
        assert x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes(), f"leaf {i} differs"


def nan_advantage(batch, row):
    """The batch with a NaN advantage on the first (always valid) response token of `row`."""
    bad = {k: v.copy() for k, v in batch.items()}
    bad["advantages"][row, 0] = np.nan
    return bad


def test_step_whose_only_minibatch_has_a_nan_changes_nothing_and_the_next_clean_step_is_exact(model):
    """A non-finite mini-batch update is skipped: params, Adam moments and counts bit-identical, weight decay not
    applied, counted in actor/skipped_nonfinite; a clean step after it is bit for bit the clean step from the start."""
    _, params, logps = model
    cfg = PpoStepConfig(mini_batch_size=B, micro_batch_size=8, shuffle=False, **FULL)  # one mini-batch, two micro
    step, tx, mesh = compiled(cfg)
    clean = ppo_batch(6, logps, params)
    bad = nan_advantage(clean, 11)                                # in the second micro-batch
    slots = layout(clean, ppo_minibatches(B, cfg, 0), 8, kind="packed").arrays

    state = shard_train_state(init_train_state(copy_tree(params), tx), mesh)
    start = host_leaves((state.params, state.opt_state.inner_state, state.step))
    state, metrics = step(state, bad, slots)
    assert float(metrics["actor/skipped_nonfinite"]) == 1.0
    assert not np.isfinite(float(metrics["actor/grad_norm"]))     # the gradients were NaN indeed
    assert_bitwise_equal(host_leaves((state.params, state.opt_state.inner_state, state.step)), start)
    assert int(state.opt_state.total_notfinite) == 1 and int(state.step) == 0
    after_skip, metrics = step(state, clean, slots)
    assert float(metrics["actor/skipped_nonfinite"]) == 0.0 and int(after_skip.step) == 1

    fresh_state = shard_train_state(init_train_state(copy_tree(params), tx), mesh)
    want, want_metrics = step(fresh_state, clean, slots)
    assert_bitwise_equal(host_leaves((after_skip.params, after_skip.opt_state.inner_state)),
                         host_leaves((want.params, want.opt_state.inner_state)))
    assert float(metrics["actor/pg_loss"]) == float(want_metrics["actor/pg_loss"])
    assert not all(np.array_equal(a, b) for a, b in zip(host_leaves(want.params), start))   # a clean step moves


def test_nan_in_one_of_two_minibatches_skips_only_that_update(model):
    """Two mini-batches, a NaN advantage in the first: the step equals the reference loop that applies only the
    second mini-batch (from the original params and a fresh optimiser), and counts one skipped update."""
    graphdef, params, logps = model
    cfg = PpoStepConfig(mini_batch_size=MINI, micro_batch_size=4, **FULL)
    order = ppo_minibatches(B, cfg, 9)
    batch = nan_advantage(ppo_batch(7, logps, params), order[0][5])
    state, metrics, tx = run_step(cfg, params, batch, 9)
    assert float(metrics["actor/skipped_nonfinite"]) == 1.0 and int(state.step) == 1

    grad = reference_grad(graphdef, cfg)
    (_, _), grads = grad(params, {k: v[order[1]] for k, v in batch.items()})
    inner = tx.init(params).inner_state           # the plain clip + AdamW, one update
    plain = optax.chain(optax.clip_by_global_norm(OPTIM.grad_clip),
                        optax.adamw(make_lr_schedule(OPTIM, 2), b1=OPTIM.b1, b2=OPTIM.b2, eps=OPTIM.eps,
                                    weight_decay=OPTIM.weight_decay))
    updates, _ = plain.update(grads, inner, params)
    assert_trees_close(state.params, optax.apply_updates(params, updates))
