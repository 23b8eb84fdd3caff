"""PPO-clip loss and clip fraction vs the numpy reference and hand-computed values."""
import jax.numpy as jnp
import numpy as np
import pytest

from prime_jax.rl import ppo
from tests.rl import numpy_reference as ref


@pytest.mark.parametrize("agg", ["token", "seq-mean-token-mean"])
@pytest.mark.parametrize("clip_high", [None, 0.28])
def test_policy_loss_matches_reference(agg, clip_high):
    rng = np.random.default_rng(0)
    mask, _ = ref.random_batch(rng, groups=3, n=4, length=9)
    old = rng.normal(-2.0, 1.0, mask.shape)
    logp = old + rng.normal(0.0, 0.3, mask.shape)
    advantages = rng.normal(size=mask.shape)
    j = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
    loss, clipfrac = ppo.policy_loss(j(logp), j(old), j(advantages), j(mask), clip=0.2,
                                     clip_high=clip_high, agg=agg)
    want_loss, want_frac = ref.ppo_loss(logp, old, advantages, mask, 0.2, clip_high, agg)
    np.testing.assert_allclose(float(loss), want_loss, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(clipfrac), want_frac, rtol=1e-5, atol=1e-6)
    assert 0.0 < float(clipfrac) < 1.0


def test_ratio_one_has_no_clipping_and_loss_minus_mean_advantage():
    logp = jnp.full((2, 3), -1.3)
    advantages = jnp.array([[1.0, -2.0, 0.5], [3.0, 0.0, 0.0]])
    mask = jnp.array([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    loss, clipfrac = ppo.policy_loss(logp, logp, advantages, mask, agg="token")
    assert float(clipfrac) == 0.0
    np.testing.assert_allclose(float(loss), -(1.0 - 2.0 + 0.5 + 3.0) / 4, rtol=1e-6)
    loss, _ = ppo.policy_loss(logp, logp, advantages, mask, agg="seq-mean-token-mean")
    np.testing.assert_allclose(float(loss), -((1.0 - 2.0 + 0.5) / 3 + 3.0) / 2, rtol=1e-6)


def test_hand_computed_clipping():
    # ratio 1.5 with A=+1 -> clipped to 1.2 (active); ratio 0.5 with A=+1 -> unclipped branch wins
    logp = jnp.log(jnp.array([[1.5, 0.5]]))
    loss, clipfrac = ppo.policy_loss(logp, jnp.zeros((1, 2)), jnp.ones((1, 2)), jnp.ones((1, 2)))
    np.testing.assert_allclose(float(loss), (-1.2 - 0.5) / 2, rtol=1e-6)
    np.testing.assert_allclose(float(clipfrac), 0.5)


def test_unknown_aggregation_raises():
    with pytest.raises(ValueError, match="agg='sum'"):
        ppo.policy_loss(jnp.zeros((1, 1)), jnp.zeros((1, 1)), jnp.zeros((1, 1)), jnp.ones((1, 1)), agg="sum")
