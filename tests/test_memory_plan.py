"""The analytic memory plan (`prime_jax.memory_plan`) at Qwen2.5-0.5B dimensions, against numbers from outside it:
the parameter count transformers reports for that architecture, and XLA's own memory analysis of the update steps."""

import pytest

from prime_jax import settings
from prime_jax.memory_plan import GIB, plan
from tests.fixtures import load_config, one_device_mesh

QWEN25_0_5B_PARAMS = 494_032_768  # sum(p.numel()) of transformers' Qwen2ForCausalLM at configs/qwen0_5b.py's dims
EMBED = 151_936 * 896             # tied: one [vocab, hidden] matrix


def resolve(**overrides):
    c = load_config("qwen0_5b")
    c.rollout.prompts_per_call = 2
    for key, value in overrides.items():
        section, leaf = key.split(".")
        c[section][leaf] = value
    return settings.resolve(c, one_device_mesh())


def test_phases_at_qwen2_5_0_5b_dimensions():
    s = resolve()
    assert s.model.arch.num_params == QWEN25_0_5B_PARAMS
    p = plan(s)
    # fp32 params + two fp32 Adam moments (12 bytes a param), the bf16 reference (2)
    assert p.resident == pytest.approx({"policy (params + adam)": QWEN25_0_5B_PARAMS * 12 / GIB,
                                        "prm (params + adam)": QWEN25_0_5B_PARAMS * 12 / GIB,
                                        "reference": QWEN25_0_5B_PARAMS * 2 / GIB})
    # XLA:CPU's memory analysis of the PRM and the PPO step at these dims (2 x 8 rows of 96 + 32 tokens): 3.68 GiB
    # of temporaries each
    assert p.update == pytest.approx({"update temporaries (2 x params)": 3.68}, abs=0.005)
    # the CPU sampler's per-layer copy in bf16: everything but the embedding and the final norm, 2 bytes a weight
    assert p.sampling["sampler layer weights (copy)"] == pytest.approx((QWEN25_0_5B_PARAMS - EMBED - 896) * 2 / GIB)
    assert p.peak == pytest.approx(sum(p.resident.values()) + max(sum(p.sampling.values()), sum(p.update.values())))


def test_outcome_only_rl_plans_the_policy_alone():
    p = plan(resolve(**{"algorithm.process_coef": 0.0, "prm.update_mode": "none"}))
    assert list(p.resident) == ["policy (params + adam)"]
