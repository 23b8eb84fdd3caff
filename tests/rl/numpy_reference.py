"""Independent numpy reference of docs/prime_spec.md §1.4-1.7 and §5, written from the spec with plain loops.

Deliberately naive (per row, per token, per pair) so it shares no structure with prime_jax.
float64 throughout.
"""
import math

import numpy as np


def random_batch(rng: np.random.Generator, groups: int, n: int, length: int):
    """Random right-padded batch: (mask [B, R] with lengths in [1, R], acc [B] in {0, .25, .5, .75, 1})."""
    b = groups * n
    lengths = rng.integers(1, length + 1, size=b)
    lengths[0] = length                      # at least one full-length row
    mask = (np.arange(length)[None, :] < lengths[:, None]).astype(np.float64)
    acc = rng.integers(0, 5, size=b) / 4.0
    return mask, acc


def valid_length(mask_row) -> int:
    """Number of valid tokens of one row (mask is a prefix of ones)."""
    return int(sum(1 for v in mask_row if v > 0))


def token_rewards(logp_prm, logp_ref, mask, include_eos=True, granularity="token"):
    """§1.4 step 3: q on valid tokens (EOS optional); "whole": sum placed on the last valid token."""
    b, r = mask.shape
    out = np.zeros((b, r))
    for i in range(b):
        length = valid_length(mask[i])
        upto = length if include_eos else length - 1
        for t in range(upto):
            out[i, t] = logp_prm[i, t] - logp_ref[i, t]
        if granularity == "whole" and length > 0:
            total = out[i].sum()
            out[i] = 0.0
            out[i, length - 1] = total
    return out


def prm_loss_and_grad(logp_prm, logp_ref, mask, acc, beta=0.05):
    """§1.4 step 4 in the reference's probability form: BCE(sigmoid(beta * sum q), acc), mean over rows.

    Returns (loss, d loss / d logp_prm [B, R]).
    """
    b, r = mask.shape
    loss = 0.0
    grad = np.zeros((b, r))
    for i in range(b):
        z = beta * sum((logp_prm[i, t] - logp_ref[i, t]) * mask[i, t] for t in range(r))
        p = 1.0 / (1.0 + math.exp(-z))
        loss += -(acc[i] * max(math.log(p), -100.0) + (1 - acc[i]) * max(math.log(1 - p), -100.0))
        for t in range(r):
            grad[i, t] = (p - acc[i]) * beta * mask[i, t] / b
    return loss / b, grad


def batch_norm(rewards, mask, shards=1):
    """§1.4 prime_norm: divide each shard of contiguous rows by max |reverse cumsum| + 1e-6."""
    b, r = rewards.shape
    out = np.zeros((b, r))
    rows = b // shards
    for s in range(shards):
        block = range(s * rows, (s + 1) * rows)
        biggest = 0.0
        for i in block:
            for t in range(r):
                to_go = sum(rewards[i, u] * mask[i, u] for u in range(t, r))
                biggest = max(biggest, abs(to_go))
        for i in block:
            for t in range(r):
                out[i, t] = rewards[i, t] * mask[i, t] / (biggest + 1e-6)
    return out


def dpo_acc(seq_scores, acc, n, tie=None):
    """§5 compute_dpo_accuracy: weighted pairwise sign agreement per group, 0.5 for flat groups. A score tie counts
    as "not above" (the reference), or `tie` when given (0.5: tie-neutral)."""
    values = []
    for g in range(len(acc) // n):
        num = den = 0.0
        for i in range(g * n, g * n + n):
            for j in range(i + 1, g * n + n):
                da = acc[i] - acc[j]
                ds = seq_scores[i] - seq_scores[j]
                den += abs(da)
                num += abs(da) * (tie if tie is not None and ds == 0 else float((ds > 0) == (da > 0)))
        values.append(0.5 if den == 0 else num / den)
    return float(np.mean(values))


def _returns(shaped, gamma):
    b, r = shaped.shape
    out = np.zeros((b, r))
    for i in range(b):
        for t in range(r):
            out[i, t] = sum(gamma ** (s - t) * shaped[i, s] for s in range(t, r))
    return out


def _row_mean(rewards, mask, i):
    vals = [rewards[i, t] for t in range(mask.shape[1]) if mask[i, t] > 0]
    return sum(vals) / len(vals) if vals else 0.0


def rloo_returns(rewards, mask, n, gamma=1.0, formula="reference"):
    """§1.6 per source; "paper" = Eq. 5 leave-one-out mean of the others' per-response means."""
    b, r = rewards.shape
    shaped = np.zeros((b, r))
    for g in range(b // n):
        rows = list(range(g * n, g * n + n))
        means = {i: _row_mean(rewards, mask, i) for i in rows}
        for i in rows:
            others = sum(means[j] for j in rows if j != i) / (n - 1)
            for t in range(r):
                if mask[i, t] > 0:
                    if formula == "reference":
                        shaped[i, t] = rewards[i, t] * n / (n - 1) - sum(means.values()) / (n - 1)
                    else:
                        shaped[i, t] = rewards[i, t] - others
    return _returns(shaped, gamma)


def grpo_returns(rewards, mask, n, gamma=1.0, eps=1e-6):
    """Each masked reward standardised by mean / Bessel std of all masked rewards of its group."""
    b, r = rewards.shape
    shaped = np.zeros((b, r))
    for g in range(b // n):
        rows = range(g * n, g * n + n)
        vals = [rewards[i, t] for i in rows for t in range(r) if mask[i, t] > 0]
        mu = sum(vals) / len(vals)
        sd = math.sqrt(sum((v - mu) ** 2 for v in vals) / max(len(vals) - 1, 1))
        for i in rows:
            for t in range(r):
                if mask[i, t] > 0:
                    shaped[i, t] = (rewards[i, t] - mu) / (sd + eps)
    return _returns(shaped, gamma)


def reinforce_returns(rewards, mask, gamma=1.0):
    """Batch-mean baseline of the per-response means, subtracted on every masked token."""
    b, r = rewards.shape
    baseline = sum(_row_mean(rewards, mask, i) for i in range(b)) / b
    shaped = np.zeros((b, r))
    for i in range(b):
        for t in range(r):
            if mask[i, t] > 0:
                shaped[i, t] = rewards[i, t] - baseline
    return _returns(shaped, gamma)


def min_form_rewards(rewards, mask):
    """PURE min-form credit: per-token rewards whose return-to-go is min_{s>=t} r_s over valid tokens."""
    b, r = rewards.shape
    out = np.zeros((b, r))
    for i in range(b):
        length = valid_length(mask[i])
        future_min = [min(rewards[i, s] for s in range(t, length)) for t in range(length)] + [0.0]
        for t in range(length):
            out[i, t] = future_min[t] - future_min[t + 1]
    return out


def outcome_source(acc, mask):
    """§1.5 gt_scores and its one-token mask."""
    b, r = mask.shape
    gt = np.zeros((b, r))
    last = np.zeros((b, r))
    for i in range(b):
        length = valid_length(mask[i])
        gt[i, length - 1] = acc[i]
        last[i, length - 1] = 1.0
    return gt, last


def whiten(x, mask):
    """§1.6 masked whitening, Bessel-corrected variance, eps 1e-8; 0 on padding."""
    vals = [x[i, t] for i in range(x.shape[0]) for t in range(x.shape[1]) if mask[i, t] > 0]
    mu = sum(vals) / len(vals)
    var = sum((v - mu) ** 2 for v in vals) / (len(vals) - 1)
    return np.where(mask > 0, (x - mu) / math.sqrt(var + 1e-8), 0.0)


def advantages(process, acc, mask, n, estimator="rloo", gamma=1.0, formula="reference"):
    """§1.6: returns = G(process) + G(outcome on last token); advantages = whiten(returns)."""
    gt, last = outcome_source(acc, mask)
    if estimator == "rloo":
        ret = rloo_returns(process, mask, n, gamma, formula) + rloo_returns(gt, last, n, gamma, formula)
    elif estimator == "grpo":
        ret = grpo_returns(process, mask, n, gamma) + grpo_returns(gt, last, n, gamma)
    else:
        ret = reinforce_returns(process, mask, gamma) + reinforce_returns(gt, last, gamma)
    ret = ret * mask
    return whiten(ret, mask), ret


def ppo_loss(logp, old_logp, adv, mask, clip=0.2, clip_high=None, agg="token"):
    """§1.7 per-token PPO-clip loss and clipped-branch fraction, aggregated per `agg`."""
    high = clip if clip_high is None else clip_high
    b, r = mask.shape
    loss = np.zeros((b, r))
    clipped = np.zeros((b, r))
    for i in range(b):
        for t in range(r):
            ratio = math.exp(logp[i, t] - old_logp[i, t])
            a = -adv[i, t] * ratio
            c = -adv[i, t] * min(max(ratio, 1 - clip), 1 + high)
            loss[i, t] = max(a, c)
            clipped[i, t] = 1.0 if c > a else 0.0

    def reduce(x):
        if agg == "token":
            return (x * mask).sum() / mask.sum()
        return float(np.mean([(x[i] * mask[i]).sum() / mask[i].sum() for i in range(b)]))

    return reduce(loss), reduce(clipped)
