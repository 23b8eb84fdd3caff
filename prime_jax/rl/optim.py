"""Optimiser shared by the policy and the implicit PRM: global-norm clip + AdamW + per-iteration lr schedule.

PRIME_SPEC §1.4/§1.7/§3: policy AdamW lr 5e-7, betas (0.9, 0.999), weight_decay 0.01, clip 1.0;
PRM AdamW lr 1e-6, weight_decay 0.0, clip 10.0; both constant lr, no warmup. The schedule is
stepped once per RL iteration (ORIG), so it is a function of iteration = update // updates_per_iteration.
"""
import dataclasses
import math
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax

SCHEDULES = ("constant", "cosine")


class TrainState(NamedTuple):
    """Explicit trainable state of one network: params, optimiser state, number of updates applied."""
    params: Any
    opt_state: optax.OptState
    step: jax.Array


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW + clip + schedule hyper-parameters (all per PRIME_SPEC §3; no defaults for lr).

    zero_lr_first_iteration reproduces ORIG's `get_constant_schedule_with_warmup(0)`, whose
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

    def validate(self, name: str = "optim") -> None:
        """Raise ValueError naming the bad key."""
        if not (self.lr >= 0 and math.isfinite(self.lr)):
            raise ValueError(f"{name}.lr={self.lr}: must be a finite number >= 0")
        if not 0 <= self.b1 < 1 or not 0 <= self.b2 < 1:
            raise ValueError(f"{name}.b1/b2=({self.b1}, {self.b2}): must be in [0, 1)")
        if self.grad_clip <= 0:
            raise ValueError(f"{name}.grad_clip={self.grad_clip}: must be > 0")
        if self.weight_decay < 0:
            raise ValueError(f"{name}.weight_decay={self.weight_decay}: must be >= 0")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"{name}.schedule={self.schedule!r}: expected one of {SCHEDULES}")
        if self.warmup_iterations < 0:
            raise ValueError(f"{name}.warmup_iterations={self.warmup_iterations}: must be >= 0")
        if self.schedule == "cosine" and self.total_iterations <= self.warmup_iterations:
            raise ValueError(f"{name}.total_iterations={self.total_iterations}: cosine needs more "
                             f"iterations than warmup_iterations={self.warmup_iterations}")


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


def make_optimizer(cfg: OptimConfig, updates_per_iteration: int) -> optax.GradientTransformation:
    """clip_by_global_norm(grad_clip) then AdamW(schedule, b1, b2, eps, weight_decay) on every param."""
    cfg.validate()
    return optax.chain(
        optax.clip_by_global_norm(cfg.grad_clip),
        optax.adamw(make_lr_schedule(cfg, updates_per_iteration), b1=cfg.b1, b2=cfg.b2,
                    eps=cfg.eps, weight_decay=cfg.weight_decay),
    )


def init_train_state(params: Any, tx: optax.GradientTransformation) -> TrainState:
    """Fresh state: fp32 optimiser moments shaped like params, step 0."""
    return TrainState(params=params, opt_state=tx.init(params), step=jnp.zeros((), jnp.int32))


def apply_gradients(state: TrainState, grads: Any, tx: optax.GradientTransformation) -> TrainState:
    """One optimiser update of `state` with `grads` (same tree as params)."""
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    return TrainState(optax.apply_updates(state.params, updates), opt_state, state.step + 1)
