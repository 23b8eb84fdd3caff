"""Advantage estimators for PRIME: RLOO (reference), GRPO and REINFORCE over process + outcome rewards.

PRIME computes a return for each reward source separately and sums them (docs/prime_spec.md §1.6):
the process source is the implicit-PRM token reward on every valid token, the outcome source
is the verifier accuracy placed on the last valid token with a mask of that one token. The sum
of returns is whitened over all valid tokens of the batch to give the advantages.

All arrays are [B, R] over response tokens; rows of one prompt are contiguous (n per group);
masks are contiguous prefixes (1 up to and including the first EOS).
"""
from typing import Literal

import jax
import jax.numpy as jnp

Estimator = Literal["rloo", "grpo", "reinforce"]
RlooFormula = Literal["reference", "paper"]
ProcessCredit = Literal["sum", "min"]

ESTIMATORS = ("rloo", "grpo", "reinforce")
RLOO_FORMULAS = ("reference", "paper")
PROCESS_CREDITS = ("sum", "min")
WHITEN_EPS = 1e-8
GRPO_EPS = 1e-6


def last_token_mask(mask: jax.Array) -> jax.Array:
    """One-hot of the last valid token per row: mask [B, R] -> [B, R] float32 (all 0 for empty rows)."""
    lengths = jnp.sum(mask.astype(jnp.int32), axis=-1)
    return jax.nn.one_hot(lengths - 1, mask.shape[-1], dtype=jnp.float32)


def discounted_returns(rewards: jax.Array, gamma: float) -> jax.Array:
    """G[i, t] = sum_{s >= t} gamma^(s-t) rewards[i, s] over the full padded length: [B, R] -> [B, R].

    Solved as the linear recurrence G_t = r_t + gamma * G_{t+1} with an associative scan
    (log-depth, no Python loop over R). Each element (a, b) is the map x -> b + a * x.
    """
    def compose(later, earlier):
        a_late, b_late = later
        a_early, b_early = earlier
        return a_early * a_late, b_early + a_early * b_late

    decay = jnp.full_like(rewards, gamma)
    _, returns = jax.lax.associative_scan(compose, (decay, rewards), reverse=True, axis=rewards.ndim - 1)
    return returns


def min_form_rewards(rewards: jax.Array, mask: jax.Array) -> jax.Array:
    """PURE's min-form credit (arXiv 2504.15275): rewards, mask [B, R] -> [B, R] float32 whose
    undiscounted return-to-go is the MINIMUM of the future process rewards, not their sum.

    With m_t = min_{s >= t, valid} r_s, the new reward is m_t - m_{t+1} (m = 0 past the last valid
    token), so sum_{s >= t} of it = m_t. Feeding these to an estimator in place of the raw process
    rewards gives it min-form returns (gamma 1) with its own baseline: a response is credited by its
    worst step, which the paper finds keeps a PRM-trained policy from farming easy steps.
    """
    valid = mask > 0
    running_min = jax.lax.cummin(jnp.where(valid, rewards.astype(jnp.float32), jnp.inf), axis=rewards.ndim - 1,
                                 reverse=True)
    m = jnp.where(valid, running_min, 0.0)
    later = jnp.concatenate([m[..., 1:], jnp.zeros_like(m[..., :1])], axis=-1)
    return (m - later) * valid


def _group(x: jax.Array, n: int) -> jax.Array:
    """[B, ...] -> [B/n, n, ...] (rows of one prompt contiguous)."""
    if x.shape[0] % n:
        raise ValueError(f"batch of {x.shape[0]} rows is not a multiple of n={n}")
    return x.reshape(x.shape[0] // n, n, *x.shape[1:])


def _row_means(rewards: jax.Array, mask: jax.Array) -> jax.Array:
    """Per-response mean of rewards over its masked tokens: [B, R] -> [B] (0 for empty rows)."""
    count = jnp.sum(mask, axis=-1)
    return jnp.sum(rewards * mask, axis=-1) / jnp.maximum(count, 1.0)


def rloo_returns(rewards: jax.Array, mask: jax.Array, *, n: int, gamma: float = 1.0,
                 formula: RlooFormula = "reference") -> jax.Array:
    """RLOO returns of one reward source: rewards, mask [B, R] -> returns [B, R] float32.

    With m_i the mean of response i's masked rewards and g its group of n:
    - "reference" (reference `compute_rloo_returns`, default): r~ = r * n/(n-1) - sum_{j in g} m_j / (n-1)
      on masked tokens. Equals the paper's term plus (r - m_i)/(n-1), which sums to 0 over a
      response's tokens but changes intermediate returns.
    - "paper" (the paper's Eq. 5): r~ = r - sum_{j in g, j != i} m_j / (n-1).
    Unmasked tokens get r~ = 0; G_t = sum_{s>=t} gamma^(s-t) r~_s. For the outcome source pass
    acc on the last valid token and `last_token_mask(mask)` as the mask (plain RLOO).
    """
    if n < 2:
        raise ValueError(f"n={n}: RLOO needs at least 2 samples per prompt")
    if formula not in RLOO_FORMULAS:
        raise ValueError(f"formula={formula!r}: expected one of {RLOO_FORMULAS}")
    mask = mask.astype(jnp.float32)
    r = rewards.astype(jnp.float32) * mask
    means = _group(_row_means(r, mask), n)                       # [G, n]
    group_sum = jnp.sum(means, axis=1, keepdims=True)            # [G, 1]
    if formula == "reference":
        scale = n / (n - 1)
        baseline = group_sum / (n - 1)                           # [G, 1]
    else:
        scale = 1.0
        baseline = (group_sum - means) / (n - 1)                 # [G, n]
    baseline = jnp.broadcast_to(baseline, means.shape).reshape(-1)[:, None]
    shaped = (r * scale - baseline) * mask
    return discounted_returns(shaped, gamma)


def grpo_returns(rewards: jax.Array, mask: jax.Array, *, n: int, gamma: float = 1.0) -> jax.Array:
    """GRPO returns of one reward source: rewards, mask [B, R] -> [B, R] float32.

    Each masked reward is normalised by the mean and (Bessel-corrected) std of all masked
    rewards of its group, r~ = (r - mean_g) / (std_g + 1e-6), then G_t = sum gamma^(s-t) r~_s.
    For the outcome source (one masked token per row) this is GRPO's (acc - mean)/std; for
    the process source it is DeepSeekMath's process supervision with tokens as steps.
    """
    if n < 2:
        raise ValueError(f"n={n}: GRPO needs at least 2 samples per prompt")
    mask = mask.astype(jnp.float32)
    r = rewards.astype(jnp.float32) * mask
    rg, mg = _group(r, n), _group(mask, n)                       # [G, n, R]
    count = jnp.sum(mg, axis=(1, 2), keepdims=True)
    mean = jnp.sum(rg, axis=(1, 2), keepdims=True) / jnp.maximum(count, 1.0)
    var = jnp.sum(((rg - mean) * mg) ** 2, axis=(1, 2), keepdims=True) / jnp.maximum(count - 1.0, 1.0)
    shaped = ((rg - mean) / (jnp.sqrt(var) + GRPO_EPS) * mg).reshape(r.shape)
    return discounted_returns(shaped, gamma)


def reinforce_returns(rewards: jax.Array, mask: jax.Array, *, gamma: float = 1.0) -> jax.Array:
    """REINFORCE returns with a batch-mean baseline: rewards, mask [B, R] -> [B, R] float32.

    b = mean over the batch of the per-response means m_i; r~ = r - b on masked tokens
    (outcome source: acc - mean acc), then G_t = sum gamma^(s-t) r~_s.
    """
    mask = mask.astype(jnp.float32)
    r = rewards.astype(jnp.float32) * mask
    baseline = jnp.mean(_row_means(r, mask))
    return discounted_returns((r - baseline) * mask, gamma)


def whiten(x: jax.Array, mask: jax.Array) -> jax.Array:
    """(x - mu) / sqrt(var + 1e-8) with mu, Bessel-corrected var over all valid tokens: [B, R] -> [B, R].

    Padding positions are returned as 0 (reference leaves them unmasked; the loss masks them anyway).
    """
    mask = mask.astype(jnp.float32)
    x = x.astype(jnp.float32)
    count = jnp.sum(mask)
    mean = jnp.sum(x * mask) / jnp.maximum(count, 1.0)
    var = jnp.sum(((x - mean) * mask) ** 2) / jnp.maximum(count - 1.0, 1.0)
    return (x - mean) * jax.lax.rsqrt(var + WHITEN_EPS) * mask


def _source_returns(rewards: jax.Array, mask: jax.Array, *, n: int, estimator: str,
                    gamma: float, rloo_formula: RlooFormula) -> jax.Array:
    """Returns of one reward source under the chosen estimator: [B, R] -> [B, R]."""
    if estimator == "rloo":
        return rloo_returns(rewards, mask, n=n, gamma=gamma, formula=rloo_formula)
    if estimator == "grpo":
        return grpo_returns(rewards, mask, n=n, gamma=gamma)
    return reinforce_returns(rewards, mask, gamma=gamma)


def check_advantage_args(*, n: int, estimator: str, rloo_formula: str = "reference",
                         process_credit: str = "sum", gamma_process: float = 1.0) -> None:
    """The estimator settings' rules (settings.resolve names the config key): ValueError('<arg>=<value>: ...')."""
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator={estimator!r}: is not one of {', '.join(ESTIMATORS)}")
    if estimator in ("rloo", "grpo") and n < 2:
        raise ValueError(f"n={n}: {estimator} needs at least 2 samples per prompt")
    if rloo_formula not in RLOO_FORMULAS:
        raise ValueError(f"rloo_formula={rloo_formula!r}: is not one of {', '.join(RLOO_FORMULAS)}")
    if process_credit not in PROCESS_CREDITS:
        raise ValueError(f"process_credit={process_credit!r}: is not one of {', '.join(PROCESS_CREDITS)}")
    if process_credit == "min" and gamma_process != 1.0:
        raise ValueError(f"gamma_process={gamma_process}: min-form process credit needs gamma_process=1")


def compute_advantages(process_rewards: jax.Array, acc: jax.Array, mask: jax.Array, *, n: int,
                       estimator: Estimator = "rloo", gamma_process: float = 1.0,
                       gamma_outcome: float = 1.0, process_coef: float = 1.0,
                       outcome_coef: float = 1.0, rloo_formula: RlooFormula = "reference",
                       process_credit: ProcessCredit = "sum",
                       whiten_advantages: bool = True) -> tuple[jax.Array, jax.Array]:
    """PRIME advantages: process_rewards [B, R], acc [B], mask [B, R] -> (advantages, returns) [B, R].

    returns = process_coef * G(process_rewards, mask) + outcome_coef * G(acc on last token,
    last-token mask), each G from `estimator` with its own gamma; advantages = whiten(returns)
    over all valid tokens (or returns * mask if `whiten_advantages` is False).
    The reference applies no coefficients (1, 1); VERL uses 5, 5 (same after whitening); process_coef=0
    gives the paper's "RLOO w/ outcome verifier only" baseline. process_credit "min" replaces the
    process rewards by `min_form_rewards` (PURE: a token's process return is the min of the future
    process rewards instead of their sum).
    """
    check_advantage_args(n=n, estimator=estimator, rloo_formula=rloo_formula, process_credit=process_credit,
                         gamma_process=gamma_process)
    mask = mask.astype(jnp.float32)
    if process_credit == "min":
        process_rewards = min_form_rewards(process_rewards, mask)
    last = last_token_mask(mask)
    outcome = last * acc.astype(jnp.float32)[:, None]
    returns = (
        process_coef * _source_returns(process_rewards, mask, n=n, estimator=estimator,
                                       gamma=gamma_process, rloo_formula=rloo_formula)
        + outcome_coef * _source_returns(outcome, last, n=n, estimator=estimator,
                                         gamma=gamma_outcome, rloo_formula=rloo_formula)
    ) * mask
    advantages = whiten(returns, mask) if whiten_advantages else returns
    return advantages, returns
