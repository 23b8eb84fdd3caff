"""Training-step plumbing shared by the policy and the implicit PRM.

Global-norm clip + AdamW + per-iteration lr schedule behind `optax.apply_if_finite` (an update whose loss or
gradients are not finite is skipped: params, Adam moments and counts unchanged), the explicit `TrainState`, its
shardings (optimiser moments sharded like the params), and exact gradient accumulation over micro-batches.

docs/prime_spec.md §1.4/§1.7/§3: policy AdamW lr 5e-7, betas (0.9, 0.999), weight_decay 0.01, clip 1.0;
PRM AdamW lr 1e-6, weight_decay 0.0, clip 10.0; both constant lr, no warmup. The schedule is
stepped once per RL iteration (the reference), so it is a function of iteration = update // updates_per_iteration.
"""
import dataclasses
from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from prime_jax.mesh import BATCH_AXES, state_shardings
from prime_jax.rl.packing import LAYOUT_KEYS



class TrainState(NamedTuple):
    """Explicit trainable state of one network: params, optimiser state, number of updates applied."""
    params: Any
    opt_state: optax.OptState
    step: jax.Array


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW + clip + schedule hyper-parameters (all per docs/prime_spec.md §3; no defaults for lr).

    zero_lr_first_iteration reproduces the reference's `get_constant_schedule_with_warmup(0)`, whose
    factor min(1, it / max(1, warmup)) is 0 on iteration 0 (the optimiser only accumulates
    Adam moments then); False gives the paper's constant lr from the first update.
    """
    lr: float
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    schedule: Literal["constant", "cosine"] = "constant"
    warmup_iterations: int = 0
    total_iterations: int = 0
    min_lr_ratio: float = 0.0
    zero_lr_first_iteration: bool = False



def make_lr_schedule(cfg: OptimConfig, updates_per_iteration: int) -> optax.Schedule:
    """lr as a function of the optimiser update count (count // updates_per_iteration = iteration)."""
    if updates_per_iteration < 1:
        raise ValueError(f"updates_per_iteration={updates_per_iteration}: must be >= 1")
    shift = 0.0 if cfg.zero_lr_first_iteration else 1.0
    warm = float(max(1, cfg.warmup_iterations))
    decay_len = float(max(1, cfg.total_iterations - cfg.warmup_iterations))

    def schedule(count: jax.Array) -> jax.Array:
        it = (jnp.asarray(count) // updates_per_iteration).astype(jnp.float32)
        factor = jnp.clip((it + shift) / warm, 0.0, 1.0)
        if cfg.schedule == "cosine":
            progress = jnp.clip((it - cfg.warmup_iterations) / decay_len, 0.0, 1.0)
            cosine = 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
            factor = factor * (cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * cosine)
        return cfg.lr * factor

    return schedule


# apply_if_finite gives up and applies a non-finite update after this many in a row; out of reach (its counter
# saturates at the int32 maximum), so an update is never applied unless finite and the trainer stops the run
# instead (train.max_nonfinite_steps).
NEVER_GIVE_UP = int(jnp.iinfo(jnp.int32).max)


def make_optimizer(cfg: OptimConfig, updates_per_iteration: int) -> optax.GradientTransformation:
    """clip_by_global_norm(grad_clip) then AdamW(schedule, b1, b2, eps, weight_decay) on every param, inside
    `optax.apply_if_finite`: gradients with a NaN/inf leave the inner state (moments, schedule count) unchanged
    and give a zero update (`apply_gradients` then keeps the params as they are). Its state
    (`optax.ApplyIfFiniteState`) counts the skipped updates: `skipped_updates`."""
    return optax.apply_if_finite(optax.chain(
        optax.clip_by_global_norm(cfg.grad_clip),
        optax.adamw(make_lr_schedule(cfg, updates_per_iteration), b1=cfg.b1, b2=cfg.b2,
                    eps=cfg.eps, weight_decay=cfg.weight_decay),
    ), max_consecutive_errors=NEVER_GIVE_UP)


def skipped_updates(opt_state: optax.OptState) -> jax.Array:
    """Non-finite updates skipped since the optimiser state was created (int32 scalar), from `make_optimizer`'s
    `optax.ApplyIfFiniteState`; a step's count is the difference of this before and after it."""
    if not isinstance(opt_state, optax.ApplyIfFiniteState):
        raise TypeError(f"optimiser state {type(opt_state).__name__} is not make_optimizer's (optax.apply_if_finite)")
    return opt_state.total_notfinite


def init_train_state(params: Any, tx: optax.GradientTransformation) -> TrainState:
    """Fresh state: fp32 optimiser moments shaped like params, step 0."""
    return TrainState(params=params, opt_state=tx.init(params), step=jnp.zeros((), jnp.int32))


def poison_if_not_finite(grads: Any, loss: jax.Array) -> Any:
    """`grads` with NaN in its smallest leaf when `loss` is not finite, so that `make_optimizer`'s apply_if_finite
    (which looks at the gradients only) skips an update whose loss is NaN/inf even where its gradients are finite.
    Bit-identical when the loss is finite; touches one leaf only."""
    leaves, treedef = jax.tree.flatten(grads)
    i = min(range(len(leaves)), key=lambda j: leaves[j].size)
    leaves[i] = jnp.where(jnp.isfinite(loss), leaves[i], jnp.nan)
    return jax.tree.unflatten(treedef, leaves)


def apply_gradients(state: TrainState, grads: Any, tx: optax.GradientTransformation,
                    loss: jax.Array | None = None) -> TrainState:
    """One optimiser update of `state` with `grads` (same tree as params); with `loss`, a non-finite loss counts
    as non-finite gradients. With `make_optimizer`'s tx an update whose gradients (or loss) are not finite is
    skipped: params bit-identical, optimiser state unchanged but for its non-finite counters, `step` (updates
    applied) not incremented."""
    if loss is not None:
        grads = poison_if_not_finite(grads, loss)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    step = state.step + 1
    if isinstance(opt_state, optax.ApplyIfFiniteState):
        # A skipped update is zeros; p + 0 is p except -0.0 -> +0.0, so select the old params to stay bit-identical.
        params = jax.tree.map(lambda new, old: jnp.where(opt_state.last_finite, new, old), params, state.params)
        step = state.step + opt_state.last_finite.astype(state.step.dtype)
    return TrainState(params, opt_state, step)


def train_state_shardings(state: Any, mesh: Mesh) -> Any:
    """NamedShardings for a (real or abstract) TrainState or bare params: every nnx Variable (params and the Adam
    moments, which keep the params' `axes` metadata) by its logical axes; counters replicated."""
    def one(x: Any) -> NamedSharding:
        if isinstance(x, nnx.Variable):
            return state_shardings(x, mesh)
        return NamedSharding(mesh, P())

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def shard_train_state(state: Any, mesh: Mesh) -> Any:
    """Places a TrainState (or bare params) on the mesh with `train_state_shardings`. Steps return
    their state placed this way, so placing the first input the same way avoids a second compile."""
    return jax.device_put(state, train_state_shardings(state, mesh))


def batch_prefix_sharding(mesh: Mesh) -> NamedSharding:
    """One sharding usable as a pytree prefix for a whole batch dict: dim 0 over the data axes."""
    return NamedSharding(mesh, P(tuple(a for a in BATCH_AXES if a in mesh.shape) or None))


def check_batch(prefix: str, batch: dict[str, jax.Array], keys: tuple[str, ...], mini_batch_size: int) -> int:
    """Trace-time check of a step's batch: required keys present, one leading size, whole mini-batches.
    Returns the batch size B."""
    missing = [k for k in keys if k not in batch]
    if missing:
        raise ValueError(f"{prefix} batch is missing {missing} (needs {list(keys)})")
    sizes = {k: batch[k].shape[0] for k in keys}
    if len(set(sizes.values())) != 1:
        raise ValueError(f"{prefix} batch arrays disagree on the batch size: {sizes}")
    b = next(iter(sizes.values()))
    if b % mini_batch_size:
        raise ValueError(f"{prefix} batch of {b} rows is not a whole number of "
                         f"{prefix}.mini_batch_size={mini_batch_size}")
    return b


def layout_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding of a pass's slots [M, k, r, L] (`prime_jax.rl.packing`): the rows r of each micro-batch over the
    data axes, so every device runs its share of every micro-batch."""
    return NamedSharding(mesh, P(None, None, tuple(a for a in BATCH_AXES if a in mesh.shape) or None, None))


def check_layout(prefix: str, layout: dict[str, jax.Array], num_minibatches: int) -> None:
    """Trace-time check of a step's slots: every `prime_jax.rl.packing.LAYOUT_KEYS` array, one [M, k, r, L] shape
    with M = the step's mini-batch count."""
    missing = [k for k in LAYOUT_KEYS if k not in layout]
    if missing:
        raise ValueError(f"{prefix} layout is missing {missing} (needs {list(LAYOUT_KEYS)})")
    shapes = {k: tuple(layout[k].shape) for k in LAYOUT_KEYS}
    if len(set(shapes.values())) != 1 or len(shapes["tokens"]) != 4:
        raise ValueError(f"{prefix} layout arrays must share one [M, k, r, L] shape: {shapes}")
    if shapes["tokens"][0] != num_minibatches:
        raise ValueError(f"{prefix} layout has {shapes['tokens'][0]} mini-batches, the batch {num_minibatches}")


def accumulate_gradients(loss_fn: Callable[[Any, dict[str, jax.Array]], tuple[jax.Array, Any]], params: Any,
                         micro_batches: dict[str, jax.Array]) -> tuple[jax.Array, Any, Any]:
    """Sum of loss and fp32 gradients over micro-batches [k, mu, ...] in one `lax.scan`.

    loss_fn(params, micro) -> (loss, aux) must already be normalised by the whole mini-batch
    (e.g. sum over rows / mini-batch rows), so the sum is the exact mini-batch gradient whatever k is.
    Returns (loss_sum, grads, aux stacked [k, ...]).
    """
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def body(carry, micro):
        loss_sum, grads = carry
        (loss, aux), g = grad_fn(params, micro)
        return (loss_sum + loss, jax.tree.map(jnp.add, grads, g)), aux

    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
    (loss_sum, grads), aux = jax.lax.scan(body, (jnp.zeros((), jnp.float32), zeros), micro_batches)
    return loss_sum, grads, aux
