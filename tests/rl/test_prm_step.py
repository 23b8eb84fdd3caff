"""The jitted PRM step vs a plain mini-batch loop; packed, padded and shared-prompt slots, micro-batching, update modes, sharding,
learning."""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from prime_jax.mesh import make_mesh
from prime_jax.models import response_logprobs
from prime_jax.rl.prm import (PrmStepConfig, make_prm_step, prm_loss, prm_minibatches, same_weights,
                              shuffled_labels)
from prime_jax.rl.optim import OptimConfig, init_train_state, make_optimizer, shard_train_state
from tests.rl import numpy_reference as ref
from tests.fixtures import (assert_trees_close, copy_tree, layout, logp_fn, make_batch, one_device_mesh,
                                tiny_model)

B, MINI, N, SHARDS = 16, 8, 4, 2
# Adam eps 1e-6 instead of 1e-8: with 1e-8 a gradient entry at rounding-noise level (~1e-9) gets a
# sign-like update of size ~lr, so two exact-in-maths orders of summation could differ by ~lr there.
OPTIM = OptimConfig(lr=1e-3, grad_clip=10.0, eps=1e-6)


@pytest.fixture(scope="module")
def model():
    graphdef, params = tiny_model(0)
    return graphdef, params, logp_fn(graphdef)


@functools.cache
def compiled(cfg: PrmStepConfig, mesh_axes: tuple = (), scan_layers: bool = True):
    """One compiled step per (config, mesh, layer loop), shared by the tests of this module."""
    graphdef, params = tiny_model(0, scan_layers=scan_layers)
    mesh = make_mesh(dict(mesh_axes)) if mesh_axes else one_device_mesh()
    tx = make_optimizer(OPTIM, cfg.updates_per_iteration(B) or 1)
    state = init_train_state(params, tx)
    return make_prm_step(graphdef, tx, cfg, mesh=mesh, state=state, ref_params=params), tx, mesh


def fresh(cfg, params, mesh_axes=(), kind="packed", scan_layers=True):
    """(step with its slots bound, tx, placed PRM state, placed reference params) for one run; steps donate
    their state."""
    step, tx, mesh = compiled(cfg, mesh_axes, scan_layers)
    state = shard_train_state(init_train_state(copy_tree(params), tx), mesh)

    def run(state, ref_params, batch):
        slots = layout(batch, prm_minibatches(len(batch["acc"]), cfg), cfg.micro_batch_size, kind,
                       dp=len(mesh.devices.flat))
        return step(state, ref_params, {**batch, "unpack": slots.unpack}, slots.arrays)

    return run, tx, state, shard_train_state(copy_tree(params), mesh)


def run_step(cfg, params, batch, mesh_axes=(), kind="packed", scan_layers=True):
    step, tx, state, ref_params = fresh(cfg, params, mesh_axes, kind, scan_layers)
    state, out = step(state, ref_params, batch)
    return state, out, tx


@functools.cache
def prm_loss_and_grad(graphdef, beta):
    """jitted (params, logp_ref, mini-batch) -> (PRM loss, grads) on a whole mini-batch."""
    @jax.jit
    def fn(p, logp_ref, mb):
        def loss(p):
            lp = response_logprobs(nnx.merge(graphdef, p), mb["prompt_tokens"], mb["prompt_mask"], mb["tokens"], mb["mask"])
            return prm_loss(lp, logp_ref, mb["mask"], mb["acc"], beta=beta)
        return jax.value_and_grad(loss)(p)
    return fn


def reference_iteration(graphdef, logps, tx, params, batch, *, mini, shards, update, beta=0.05):
    """docs/prime_spec.md §1.4 as a plain loop: whole mini-batches (no micro-batching), in order per chunk."""
    b = len(batch["acc"])
    chunk, per = b // shards, mini // shards
    minibatches = [[s * chunk + m * per + j for s in range(shards) for j in range(per)] for m in range(b // mini)]

    loss_and_grad = prm_loss_and_grad(graphdef, beta)
    ref_params, opt_state = params, tx.init(params)
    raw = np.zeros(batch["mask"].shape)
    losses, norms = [], []
    for rows in minibatches:
        mb = {k: v[rows] for k, v in batch.items()}
        logp_ref = np.asarray(logps(ref_params, mb)[0], np.float64)
        raw[rows] = ref.token_rewards(np.asarray(logps(params, mb)[0], np.float64), logp_ref, mb["mask"])
        loss, grads = loss_and_grad(params, logp_ref.astype(np.float32), mb)
        losses.append(float(loss))
        if update != "none":
            norms.append(float(optax.tree.norm(grads)))
            updates, opt_state = tx.update(grads, opt_state, params)
            params = optax.apply_updates(params, updates)
    before = raw.copy()
    if update == "before":
        raw = ref.token_rewards(np.asarray(logps(params, batch)[0], np.float64),
                                np.asarray(logps(ref_params, batch)[0], np.float64), batch["mask"])
    return params, before, raw, np.mean(losses), norms


@pytest.mark.parametrize("micro, kind", [(8, "packed"), (4, "packed"), (2, "packed"), (4, "padded"),
                                         (4, "shared_prompt")])
def test_step_matches_loop_reference_for_1_2_4_micro_batches(model, micro, kind):
    graphdef, params, logps = model
    batch = make_batch(1, B, group=N)
    cfg = PrmStepConfig(n=N, mini_batch_size=MINI, micro_batch_size=micro, num_shards=SHARDS, norm_scope="shard")
    state, out, tx = run_step(cfg, params, batch, kind=kind)
    want_params, before, raw, loss, norms = reference_iteration(graphdef, logps, tx, params, batch, mini=MINI,
                                                                shards=SHARDS, update="after")
    assert int(state.step) == B // MINI
    # log-probs are O(5) in fp32 and one Adam step amplifies rounding, so rewards agree to 1e-5 absolute
    np.testing.assert_allclose(np.asarray(out.raw), raw, rtol=0, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(out.before), np.asarray(out.raw))   # "after": the rewards are pre-update
    assert np.abs(raw).max() > 1e-3                           # the second mini-batch saw an updated PRM
    np.testing.assert_allclose(np.asarray(out.rm_scores), ref.batch_norm(np.asarray(out.raw), batch["mask"], SHARDS),
                               rtol=1e-5, atol=1e-6)
    m = out.metrics
    np.testing.assert_allclose(float(m["reward_model/prm_loss"]), loss, rtol=1e-5)
    np.testing.assert_allclose(float(m["reward_model/grad_norm"]), np.mean(norms), rtol=1e-5)
    np.testing.assert_allclose(float(m["reward_model/dpo_acc_before"]), ref.dpo_acc(raw.sum(1), batch["acc"], N))
    np.testing.assert_allclose(float(m["reward_model/dpo_acc_before_tie_neutral"]),
                               ref.dpo_acc(raw.sum(1), batch["acc"], N, tie=0.5))
    assert_trees_close(state.params, want_params)


# From about 4096 tokens per device XLA:CPU hands the norms and the softmax to its library fusions, and only from there
# did a differentiated PRM forward (activations kept) round differently from the reference's: checked at that size.
SANITY_ROWS_PER_DEVICE, SANITY_PROMPT, SANITY_RESPONSE = 128, 16, 16


@pytest.mark.parametrize("update, kind, mesh_axes, scan_layers", [
    ("after", "packed", (), True), ("after", "padded", (), True), ("before", "packed", (), True),
    ("none", "padded", (), True), ("after", "packed", (("data", 2), ("fsdp", 4)), True),
    ("after", "padded", (("fsdp", 8),), True),
    ("after", "packed", (), False),   # layers unrolled (model.layers=auto on CPU)
    ("after", "shared_prompt", (), False), ("after", "shared_prompt", (("data", 2), ("fsdp", 4)), True),
])
def test_prm_equal_to_reference_scores_exactly_zero_with_ln2_loss_and_half_dpo_acc(model, update, kind, mesh_axes,
                                                                                   scan_layers):
    """The step-1 sanity point (docs/prime_spec.md §1.4): PRM == reference gives q = 0 bit for bit, so batch_norm has no
    noise to scale up, the loss is exactly ln 2 and dpo_acc exactly 0.5 (acc listed symmetrically in each group)."""
    _, params, _ = model
    rows = SANITY_ROWS_PER_DEVICE * math.prod(dict(mesh_axes).values())
    batch = make_batch(6, rows, prompt_len=SANITY_PROMPT, response_len=SANITY_RESPONSE, group=N)
    cfg = PrmStepConfig(n=N, mini_batch_size=rows, micro_batch_size=rows, update=update)
    state, out, _ = run_step(cfg, params, batch, mesh_axes, kind, scan_layers)
    m = out.metrics
    assert float(m["reward_model/prm_loss"]) == np.float32(np.log(2.0))
    assert float(m["reward_model/dpo_acc_before"]) == 0.5
    assert float(m["reward_model/dpo_acc_before_tie_neutral"]) == 0.5
    np.testing.assert_array_equal(np.asarray(out.before), 0.0)
    if update != "before":   # "before" returns the rewards of the updated PRM
        np.testing.assert_array_equal(np.asarray(out.raw), 0.0)
        np.testing.assert_array_equal(np.asarray(out.rm_scores), 0.0)
    if update == "none":
        assert "reward_model/grad_norm" not in m and int(state.step) == 0
        assert_trees_close(state.params, params, rtol=0, atol=0)


def test_update_before_is_double_forward(model):
    graphdef, params, logps = model
    batch = make_batch(3, B)
    cfg = PrmStepConfig(n=N, mini_batch_size=MINI, micro_batch_size=4, update="before")
    state, out, tx = run_step(cfg, params, batch)
    want_params, before, raw, _, _ = reference_iteration(graphdef, logps, tx, params, batch, mini=MINI, shards=1,
                                                         update="before")
    np.testing.assert_allclose(np.asarray(out.raw), raw, rtol=0, atol=1e-5)
    np.testing.assert_allclose(np.asarray(out.before), before, rtol=0, atol=1e-5)   # the pre-update rewards
    assert np.abs(raw - before).max() > 1e-3
    np.testing.assert_allclose(np.asarray(out.rm_scores), ref.batch_norm(np.asarray(out.raw), batch["mask"]),
                               rtol=1e-5, atol=1e-6)
    m = out.metrics
    np.testing.assert_allclose(float(m["reward_model/dpo_acc_before"]), ref.dpo_acc(before.sum(1), batch["acc"], N))
    np.testing.assert_allclose(float(m["reward_model/dpo_acc_after"]), ref.dpo_acc(raw.sum(1), batch["acc"], N))
    assert_trees_close(state.params, want_params)


def test_layouts_agree_on_one_device(model):
    _, params, _ = model
    batch = make_batch(5, B, group=N)
    cfg = PrmStepConfig(n=N, mini_batch_size=MINI, micro_batch_size=4, num_shards=SHARDS, norm_scope="shard")
    padded_state, padded, _ = run_step(cfg, params, batch, kind="padded")     # every layout compiled above
    for kind in ("packed", "shared_prompt"):
        state, out, _ = run_step(cfg, params, batch, kind=kind)
        np.testing.assert_allclose(np.asarray(out.raw), np.asarray(padded.raw), rtol=0, atol=1e-5, err_msg=kind)
        for k in padded.metrics:
            np.testing.assert_allclose(float(out.metrics[k]), float(padded.metrics[k]), rtol=1e-5, err_msg=f"{kind} {k}")
        assert_trees_close(state.params, padded_state.params)


def test_sharded_two_axis_mesh_packed_matches_one_device_padded_and_params_stay_sharded(model):
    _, params, _ = model
    batch = make_batch(1, B)
    cfg = PrmStepConfig(n=N, mini_batch_size=MINI, micro_batch_size=8, num_shards=SHARDS, norm_scope="shard")
    one_state, one_out, _ = run_step(cfg, params, batch, kind="padded")
    state, out, _ = run_step(cfg, params, batch, mesh_axes=(("data", 2), ("fsdp", 4)))
    np.testing.assert_allclose(np.asarray(out.raw), np.asarray(one_out.raw), rtol=0, atol=1e-5)
    np.testing.assert_allclose(np.asarray(out.rm_scores), ref.batch_norm(np.asarray(out.raw), batch["mask"], SHARDS),
                               rtol=1e-5, atol=1e-6)
    for k in one_out.metrics:
        np.testing.assert_allclose(float(out.metrics[k]), float(one_out.metrics[k]), rtol=1e-5)
    assert_trees_close(state.params, one_state.params)
    gate = state.params["layers"]["gate"][...]
    assert gate.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", None)
    assert len({repr(s.index) for s in gate.addressable_shards}) == 4   # four distinct pieces
    mu = state.opt_state.inner_state[1][0].mu["layers"]["gate"][...]
    assert mu.sharding.spec == gate.sharding.spec


def test_dpo_acc_rises_when_correct_and_wrong_responses_differ(model):
    _, params, _ = model
    batch = make_batch(4, B)
    correct = batch["acc"] > 0
    rng = np.random.default_rng(0)
    # correct answers are written with tokens 1..20, wrong ones with 60..80
    batch["tokens"] = np.where(correct[:, None], rng.integers(1, 21, batch["tokens"].shape),
                               rng.integers(60, 81, batch["tokens"].shape)).astype(np.int32) * (batch["mask"] > 0)
    cfg = PrmStepConfig(n=N, mini_batch_size=MINI, micro_batch_size=8, num_shards=SHARDS, norm_scope="shard")
    step, _, state, ref_params = fresh(cfg, params)
    history = []
    for _ in range(6):
        state, out = step(state, ref_params, batch)
        history.append(float(out.metrics["reward_model/dpo_acc_before"]))
    assert history[-1] > 0.9, history
    assert float(out.metrics["reward_model/prm_loss"]) < math.log(2.0)


def test_bad_batch_raises_at_trace_time(model):
    _, params, _ = model
    cfg = PrmStepConfig(n=N, mini_batch_size=MINI, micro_batch_size=8, num_shards=SHARDS, norm_scope="shard")
    step = compiled(cfg)[0]
    _, _, state, ref_params = fresh(cfg, params)
    batch = make_batch(1, B)
    lay = layout(batch, prm_minibatches(B, cfg), 8, kind="packed")
    batch["unpack"], slots = lay.unpack, lay.arrays
    with pytest.raises(ValueError, match="not a whole number of prm.mini_batch_size=8"):
        step(state, ref_params, {**make_batch(1, 12), "unpack": lay.unpack[:12]}, slots)
    with pytest.raises(ValueError, match="layout has 1 mini-batches, the batch 2"):
        step(state, ref_params, batch, {k: v[:1] for k, v in slots.items()})
    del batch["acc"]
    with pytest.raises(ValueError, match="missing \\['acc'\\]"):
        step(state, ref_params, batch, slots)


def host_leaves(tree):
    """Host copies of a tree's leaves (steps donate their state)."""
    return [np.array(x) for x in jax.tree.leaves(tree)]


def assert_bitwise_equal(got, want):
    for i, (x, y) in enumerate(zip(got, want, strict=True)):
        assert x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes(), f"leaf {i} differs"


@pytest.mark.parametrize("update", ["after", "before"])
def test_step_whose_only_minibatch_has_a_nan_changes_nothing_and_the_next_clean_step_is_exact(model, update):
    """A NaN outcome in one row makes the PRM loss and gradients NaN: the update is skipped (params, Adam moments and
    counts bit-identical, counted in reward_model/skipped_nonfinite) and a clean step after it is bit for bit the
    clean step from the start."""
    _, params, _ = model
    cfg = PrmStepConfig(n=N, mini_batch_size=B, micro_batch_size=8, update=update)   # one mini-batch, two micro
    clean = make_batch(8, B)
    bad = {**clean, "acc": clean["acc"].copy()}
    bad["acc"][13] = np.nan                                                         # in the second micro-batch
    step, _, state, ref_params = fresh(cfg, params)
    start = host_leaves((state.params, state.opt_state.inner_state, state.step))
    state, out = step(state, ref_params, bad)
    assert float(out.metrics["reward_model/skipped_nonfinite"]) == 1.0
    assert not np.isfinite(float(out.metrics["reward_model/grad_norm"]))         # the gradients were NaN indeed
    assert_bitwise_equal(host_leaves((state.params, state.opt_state.inner_state, state.step)), start)
    assert int(state.opt_state.total_notfinite) == 1 and int(state.step) == 0
    after_skip, out = step(state, ref_params, clean)
    assert float(out.metrics["reward_model/skipped_nonfinite"]) == 0.0 and int(after_skip.step) == 1

    _, _, fresh_state, _ = fresh(cfg, params)
    want, want_out = step(fresh_state, ref_params, clean)
    assert_bitwise_equal(host_leaves((after_skip.params, after_skip.opt_state.inner_state)),
                         host_leaves((want.params, want.opt_state.inner_state)))
    assert_bitwise_equal(host_leaves(out.raw), host_leaves(want_out.raw))
    assert not all(np.array_equal(a, b) for a, b in zip(host_leaves(want.params), start))   # a clean step moves


def test_update_none_reports_no_skip_count(model):
    _, params, _ = model
    cfg = PrmStepConfig(n=N, mini_batch_size=MINI, micro_batch_size=8, update="none")
    _, out, _ = run_step(cfg, params, make_batch(2, B))
    assert "reward_model/skipped_nonfinite" not in out.metrics


def test_shuffled_labels_permute_the_trained_rows_only_from_the_seed_and_step():
    acc = np.array([1, 0, 0, 1, 1, 0, 1, 1], np.float32)
    trained = np.array([1, 1, 1, 1, 1, 1, 0, 0], bool)
    got = shuffled_labels(acc, trained, seed=0, step=3)
    assert got.dtype == np.float32 and got[6:].tolist() == [1.0, 1.0]           # padding rows keep theirs
    assert sorted(got[:6].tolist()) == sorted(acc[:6].tolist())                 # the same labels, permuted
    np.testing.assert_array_equal(got, shuffled_labels(acc, trained, seed=0, step=3))
    draws = {tuple(shuffled_labels(acc, trained, seed=s, step=k)[:6]) for s in range(3) for k in range(3)}
    assert len(draws) > 1                                                       # another seed or step, another order


def test_labels_key_trains_on_the_given_labels_and_the_metrics_read_acc(model):
    """The label-shuffled control: the step trains exactly as on a batch whose acc were the labels, while dpo_acc
    still ranks against the true acc."""
    graphdef, params, logps = model
    batch = make_batch(1, B)
    labels = shuffled_labels(batch["acc"], np.ones(B, bool), seed=1, step=1)
    assert not np.array_equal(labels, batch["acc"])
    cfg = PrmStepConfig(n=N, mini_batch_size=MINI, micro_batch_size=4, num_shards=SHARDS, norm_scope="shard")
    state, out, tx = run_step(cfg, params, {**batch, "labels": labels})
    want_params, before, raw, loss, _ = reference_iteration(graphdef, logps, tx, params, {**batch, "acc": labels},
                                                            mini=MINI, shards=SHARDS, update="after")
    assert_trees_close(state.params, want_params)
    np.testing.assert_allclose(np.asarray(out.raw), raw, rtol=0, atol=1e-5)
    np.testing.assert_allclose(float(out.metrics["reward_model/prm_loss"]), loss, rtol=1e-5)
    np.testing.assert_allclose(float(out.metrics["reward_model/dpo_acc_before"]), ref.dpo_acc(raw.sum(1), batch["acc"], N))


def test_same_weights_compares_the_weights_each_model_computes_with():
    params = tiny_model(0)[1]
    bf16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    assert bool(same_weights(params, bf16, jnp.bfloat16))                   # fp32 PRM, bf16 reference copy
    assert not bool(same_weights(params, bf16, jnp.float32))                # fp32 compute reads the lost bits
    leaves, treedef = jax.tree.flatten(params)
    leaves[0] = leaves[0].at[(0,) * leaves[0].ndim].set(jnp.nextafter(leaves[0].ravel()[0], jnp.inf))
    nudged = jax.tree.unflatten(treedef, leaves)                            # one weight one ulp up
    assert bool(same_weights(params, params, jnp.float32)) and not bool(same_weights(params, nudged, jnp.float32))
