"""AOT compilation for real TPU topologies on this CPU host (libtpu): topology names, loop-aware FLOPs,
and the qwen7b config's four programs, shrunk, compiled for a v5p-8 (2x2x1) with the compiler's figures
checked against hand-computed sizes."""

import dataclasses
import math
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from prime_jax import aot
from prime_jax.aot.compile import _oom_temp_bytes
from prime_jax.models.attention import causal_attention
from prime_jax.aot.compile import mix_shape
from prime_jax.aot.step import decode_steps, published_bytes, step_seconds, transfer_seconds
from prime_jax.preflight import aot_memory_check
from prime_jax.rl.packing import PackSpec
from prime_jax.settings import LengthMix

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QWEN7B = os.path.join(ROOT, "configs", "qwen7b.py")
TINY = os.path.join(ROOT, "configs", "tiny.py")
QWEN7B_ASYNC = os.path.join(ROOT, "configs", "qwen7b_async.py")

# qwen7b's code path with the model and sequences shrunk: 2 layers, 8 prompts x 4 samples, 32 + 32 tokens.
# 16 heads of 128 and hidden 512 make each param's per-device shard whole TPU tiles (minor dim 128,
# second-minor 16), so the compiler's byte counts carry no layout padding and match the plain sizes.
SHRINK = {"model.arch.vocab_size": 1024, "model.arch.hidden_size": 512, "model.arch.intermediate_size": 512,
          "model.arch.num_hidden_layers": 2, "model.arch.num_attention_heads": 16, "model.arch.num_key_value_heads": 16,
          "model.arch.head_dim": 128, "train.batch_size": 8, "rollout.max_response_length": 32,
          "data.max_prompt_length": 32, "actor.mini_batch_size": 16, "prm.mini_batch_size": 16}
SUMMARY = re.compile(r"^AOT (\S+): fits=(yes|no) peak_bytes_per_device=(\d+) hbm_bytes=(\d+)( step_s=[\d.]+)?$")


@pytest.fixture(autouse=True, scope="module")
def tpu_matmul_precision():
    """The TPU programs compile at the default matmul precision, as a run does: Mosaic rejects conftest's "highest"
    (for exact CPU numerics) in the splash kernel's bfloat16 matmuls."""
    with jax.default_matmul_precision("default"):
        yield


# --- topologies ------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, name, slice_name, chips", [
    ("v5p:2x2x2", "v5p:2x2x2", "v5p-16", 8), ("v5p-8", "v5p:2x2x1", "v5p-8", 4), ("v5p-32", "v5p:2x2x4", "v5p-32", 16),
    ("v5p-64", "v5p:2x4x4", "v5p-64", 32), ("v4-64", "v4:2x4x4", "v4-64", 32), ("v4:2x2x1", "v4:2x2x1", "v4-8", 4),
    ("v5litepod-8", "v5e:2x4", "v5litepod-8", 8), ("v6e-16", "v6e:4x4", "v6e-16", 16), ("v5e:8x8", "v5e:8x8", "v5litepod-64", 64),
])
def test_topology_names(text, name, slice_name, chips):
    t = aot.parse_topology(text)
    assert (t.name, t.slice_name, t.num_chips) == (name, slice_name, chips)


@pytest.mark.parametrize("bad", ["v9:2x2x2", "v5p:2x2", "v5e:2x2x2", "v5p-12", "v5p-15", "tpu", "v4-2"])
def test_bad_topology_is_named(bad):
    with pytest.raises(ValueError, match="topology"):
        aot.parse_topology(bad)


def test_libtpu_gives_one_device_per_chip_with_jax_platforms_cpu():
    assert os.environ["JAX_PLATFORMS"] == "cpu" and jax.default_backend() == "cpu"
    for text, kind in (("v5p:2x2x2", "TPU v5"), ("v4:2x2x1", "TPU v4"), ("v5e:2x2", "TPU v5 lite")):
        devices = aot.parse_topology(text).devices()
        assert len(devices) == aot.parse_topology(text).num_chips
        assert {d.device_kind for d in devices} == {kind} and {d.platform for d in devices} == {"tpu"}


# --- loop-aware cost of compiled programs ----------------------------------------------------------

V5P = aot.CHIPS["v5p"]


def _tpu_hlo(f, *shapes) -> str:
    """Compiled HLO of f for one v5p chip."""
    device = aot.parse_topology("v5p:2x2x1").devices()[0]
    sharding = jax.sharding.make_single_device_sharding(device)
    args = [jax.ShapeDtypeStruct(s, jnp.bfloat16, sharding=sharding) for s in shapes]
    return jax.jit(f).lower(*args).compile().as_text()


def test_program_cost_counts_each_loop_at_its_trip_count():
    """Nested scans (3 x 5) around a [256, 1024] @ [1024, 1024] matmul, plus one outside: hand-counted FLOPs;
    the once-per-loop count is what XLA's cost_analysis() reports."""
    def f(w, x):
        def inner(y, _):
            return jnp.tanh(y @ w), None

        def outer(y, _):
            return jax.lax.scan(inner, y, None, length=5)[0], None

        return jax.lax.scan(outer, x, None, length=3)[0] @ w

    mm = 2 * 256 * 1024 * 1024
    cost = aot.program_cost(_tpu_hlo(f, (1024, 1024), (256, 1024)), V5P.peak_flops, V5P.hbm_bandwidth)
    assert (cost.flops_once, cost.flops, cost.unknown_loops) == (2 * mm, 16 * mm, 0)
    assert cost.seconds >= 16 * mm / V5P.peak_flops and cost.seconds > 5 * cost.seconds_once


def test_program_cost_data_dependent_loop_runs_the_given_bound():
    """A while_loop that stops on data has no static trip count: it runs `unknown_trip_count` times; a
    fori_loop inside it (7 steps) its own count."""
    def f(w, x):
        def body(c):
            i, y = c
            y = jax.lax.fori_loop(0, 7, lambda _, z: jnp.tanh(z @ w), y)
            return i + 1, y

        return jax.lax.while_loop(lambda c: jnp.all(c[1] < 0.5) & (c[0] < 100), body, (0, x))[1]

    mm = 2 * 256 * 1024 * 1024
    cost = aot.program_cost(_tpu_hlo(f, (1024, 1024), (256, 1024)), V5P.peak_flops, V5P.hbm_bandwidth,
                            unknown_trip_count=11)
    assert (cost.flops_once, cost.flops, cost.unknown_loops) == (mm, 77 * mm, 1)


def test_program_cost_windowed_matmul_loops():
    """Over 8 chips XLA splits a layer's FSDP matmul into a loop over weight shards that overlaps the
    all-gather with compute and advances 2 shards per step (bidirectional): still the plain matmul FLOPs."""
    devices = aot.parse_topology("v5p:2x2x2").devices()
    mesh = jax.sharding.Mesh(np.array(devices), ("fsdp",))
    rows, hidden, mlp, layers = 8192, 4096, 8192, 3
    split = lambda *spec: jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*spec))  # noqa: E731

    def model(x, w):
        def layer(h, wl):
            return jax.lax.with_sharding_constraint(jnp.tanh(h @ wl)[:, :hidden], split("fsdp")), None

        return jax.lax.scan(layer, x, w)[0]

    x = jax.ShapeDtypeStruct((rows, hidden), jnp.bfloat16, sharding=split("fsdp"))
    w = jax.ShapeDtypeStruct((layers, hidden, mlp), jnp.bfloat16, sharding=split(None, "fsdp"))
    text = jax.jit(model, out_shardings=split("fsdp")).lower(x, w).compile().as_text()
    assert "windowed_dot_general" in text
    cost = aot.program_cost(text, V5P.peak_flops, V5P.hbm_bandwidth)
    assert cost.flops == layers * 2 * rows * hidden * mlp / len(devices) and cost.unknown_loops == 0


def test_program_cost_in_place_update_moves_only_the_slice():
    """A loop writing one row per step into a 64 MiB buffer (as the decode loop writes the KV cache) costs
    the rows it reads and writes, not the buffer per step."""
    def f(buf, rows):
        def body(i, b):
            return jax.lax.dynamic_update_slice_in_dim(b, jax.lax.dynamic_slice_in_dim(rows, i, 1) * 2, i, axis=0)

        return jax.lax.fori_loop(0, 100, body, buf)

    cost = aot.program_cost(_tpu_hlo(f, (8192, 4096), (100, 4096)), V5P.peak_flops, V5P.hbm_bandwidth)
    whole_buffer_per_step = 100 * 2 * 8192 * 4096 * 2 / V5P.hbm_bandwidth
    assert cost.seconds < 0.1 * whole_buffer_per_step


def test_program_cost_counts_splash_attention_kernels():
    """The splash kernels (forward, dq, dkv) are custom calls in which XLA sees no FLOPs: per query head and
    visited causal block pair they run 2, 3 and 4 matmuls of 2 x 512 x 512 x Dh (3 of the 4 pairs of 1024 slots
    in 512-slot blocks). Each kernel's HLO spans several lines: the instructions after it are still costed. No
    [T, T] scores."""
    t, h, kv, dh = 1024, 4, 2, 128

    def f(q, k, v):
        out, vjp = jax.vjp(causal_attention("splash", None, t), q, k, v)
        return vjp(out)

    text = _tpu_hlo(f, (1, t, h, dh), (1, kv, t, dh), (1, kv, t, dh))
    cost = aot.program_cost(text, V5P.peak_flops, V5P.hbm_bandwidth)
    assert cost.kernel_flops_once == cost.flops_once == (2 + 3 + 4) * 3 * h * 2 * 512 * 512 * dh
    assert not re.search(rf"\[[\d,]*{t},{t}\]", text)


def test_oom_message_is_read():
    msg = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO temporaries (130.08G) "
           "exceeds available HBM (95.74G).")
    assert _oom_temp_bytes(msg) == int(130.08 * 2**30)
    assert _oom_temp_bytes("RESOURCE_EXHAUSTED: Ran out of memory in memory space hbm. Used 120.5G of 95.74G hbm.") == int(120.5 * 2**30)
    assert _oom_temp_bytes("RESOURCE_EXHAUSTED: something else") == 0


def test_plans_and_program_names_are_checked():
    base, plans = aot.load_config_file(QWEN7B)
    assert {"v5p-16", "v5p-32", "v4-64"} <= set(plans)
    c = aot.config_for(base, plans["v5p-32"], {"actor.micro_batch_size": 32})
    assert (c.mesh.data, c.mesh.fsdp, c.prm.micro_batch_size, c.actor.micro_batch_size) == (2, 8, 16, 32)  # flags win
    with pytest.raises(ValueError, match="'mesh.nope'"):
        aot.config_for(base, {"mesh.nope": 2}, {})
    v5p8 = aot.parse_topology("v5p-8")
    with pytest.raises(ValueError, match="--programs: unknown"):
        aot.compile_run(aot.topology_settings(aot.config_for(base, plans["v5p-8"], {}), v5p8), v5p8, ["sampler"])


def test_prompts_per_sampler_call_follow_the_plan_and_never_exceed_the_batch():
    base, plans = aot.load_config_file(QWEN7B)
    v5p8 = aot.parse_topology("v5p-8")
    plan = plans["v5p-8"]
    assert aot.topology_settings(aot.config_for(base, {**plan, "rollout.prompts_per_call": 0}, {}), v5p8
                                 ).prompts_per_call == base.train.batch_size == 256
    assert aot.topology_settings(aot.config_for(base, plan, {}), v5p8).prompts_per_call == 64
    assert aot.topology_settings(aot.config_for(base, plan, {"rollout.prompts_per_call": 1024}), v5p8
                                 ).prompts_per_call == 256


# --- the shrunk qwen7b programs on a v5p-8 -----------------------------------------------------------

def _shrunk_qwen7b() -> ml_collections.ConfigDict:
    base, plans = aot.load_config_file(QWEN7B)
    base.model.arch.head_dim = 128  # Qwen2.5's config.json has no head_dim (hidden / heads); this one needs it
    return aot.config_for(base, plans.get("v5p-8", {}), SHRINK)


def _shrunk_settings(overrides=None):
    c = _shrunk_qwen7b()
    c.update_from_flattened_dict(overrides or {})
    return aot.topology_settings(c, aot.parse_topology("v5p:2x2x1"))


def _compiled_on_v5p8(s):
    """(settings, the v5p-8 topology, program name -> its compiled report)."""
    topology = aot.parse_topology("v5p:2x2x1")
    return s, topology, {r.name: r for r in aot.compile_run(s, topology)}


@pytest.fixture(scope="module")
def compiled_shrunk():
    return _compiled_on_v5p8(_shrunk_settings())


def test_shrunk_qwen7b_compiles_and_fits(compiled_shrunk):
    c, topology, reports = compiled_shrunk
    assert list(reports) == list(aot.PROGRAMS)
    assert all(not r.error for r in reports.values())
    line = aot.summary_line(topology, list(reports.values()))
    m = SUMMARY.match(line)
    assert m and m.group(1) == "v5p:2x2x1" and m.group(2) == "yes"
    assert int(m.group(3)) == max(r.peak_bytes for r in reports.values())
    assert int(m.group(4)) == 95 * 2**30


def test_step_seconds_add_the_programs_at_the_length_mix(compiled_shrunk):
    c, topology, reports = compiled_shrunk
    step = step_seconds(c, list(reports.values()), topology.chip)
    r = {name: report.seconds for name, report in reports.items()}
    # 8 prompts x 4 rows all in flight; qwen7b's mix capped at the shrunk limits: every response at its limit.
    # One mesh (rollout.devices=0): the programs' sum, no transfer, whatever rollout.max_staleness says.
    assert c.rollout_mesh is c.mesh
    assert step == pytest.approx({**r, "step": sum(r.values())})
    assert step_seconds(dataclasses.replace(c, max_staleness=1), list(reports.values()), topology.chip) == step
    line = aot.summary_line(topology, list(reports.values()), step["step"])
    assert SUMMARY.match(line) and line.endswith(f" step_s={step['step']:.1f}")
    assert step_seconds(c, [reports["prm_step"]], topology.chip) is None  # not a whole step


@pytest.mark.parametrize("overrides, steps", [
    ({"length_mix.response_tokens": 8, "length_mix.clipped_fraction": 0.0}, 8),   # all 32 rows in flight: the mean
    ({"length_mix.response_tokens": 8, "length_mix.clipped_fraction": 1.0}, 31),  # a clipped row: the limit - 1
    ({"length_mix.response_tokens": 8, "length_mix.clipped_fraction": 0.0, "rollout.prompts_per_call": 2}, 32),
])  # 8 rows in flight: 32 rows x 8 tokens / 8
def test_decode_steps_of_the_continuous_batching_sampler(overrides, steps):
    s = _shrunk_settings(overrides)
    assert decode_steps(s, s.length_mix) == pytest.approx(steps)


def test_training_steps_at_the_length_mix_take_the_packed_shape_of_its_tokens():
    # qwen7b's mini-batch of 256 sequences of 256 + 1435 tokens fills 105.7 rows of 4096 slots: 106 rows, in
    # micro-batches of 8 rows -> 14, a static count (of 2, 3, 4, 5, 6, 7, 8, 10, 12, 14, 16, 20, 24, 28, 32).
    spec = PackSpec("prm", mini_batch_size=256, micro_batch_size=8, data_parallel=1, row_length=4096,
                    micro_batch_tokens=8 * 4096)
    assert mix_shape(spec, LengthMix(256, 1435, 0.05)) == (14, 8)
    assert mix_shape(spec, LengthMix(1024, 3072, 1.0)) == spec.shapes()[-1] == (32, 8)  # at the limits: the largest


def test_preflight_memory_line_is_the_worst_program_against_hbm(compiled_shrunk):
    c, topology, reports = compiled_shrunk
    check = aot_memory_check(topology, list(reports.values()))
    worst = max(reports.values(), key=lambda r: r.peak_bytes)
    assert check.ok and check.detail == f"AOT v5p:2x2x1: peak {worst.peak_bytes / 2**30:.2f} GiB/device ({worst.name}) of 95 GiB HBM"
    over = dataclasses.replace(worst, resident_bytes=worst.resident_bytes + topology.chip.hbm_bytes)
    assert not aot_memory_check(topology, [*reports.values(), over]).ok


def test_markdown_rows_fill_the_table_header(compiled_shrunk):
    c, topology, reports = compiled_shrunk
    rows = aot.markdown_rows(c, topology, list(reports.values()))
    columns = [h.strip() for h in aot.TABLE_HEADER.splitlines()[0].strip("|").split("|")]
    assert len(rows) == 4
    for row, r in zip(rows, reports.values()):
        cells = dict(zip(columns, (x.strip() for x in row.strip("|").split("|")), strict=True))
        assert (cells["slice"], cells["program"], cells["fits"], cells["HBM GiB"]) == ("v5p-8", r.name, "yes", "95")
        assert float(cells["peak GiB/chip"]) == pytest.approx(r.peak_bytes / 2**30, abs=0.01)


def test_compiler_bytes_match_hand_computed_sizes(compiled_shrunk):
    """Argument, output and alias bytes per device against the architecture's parameter count and the
    batch / KV-cache shapes (4 devices, params fsdp-sharded, batch split over the devices)."""
    c, topology, r = compiled_shrunk
    cfg = c.model.arch
    devices = topology.num_chips
    n_params = cfg.num_params
    rows, p_len, r_len = c.rows_per_step, c.data.max_prompt_length, c.sampler.max_new_tokens
    fp32_params = 4 * n_params / devices
    train_state = 3 * fp32_params  # params + Adam mu, nu
    ref = 2 * n_params / devices
    # Slots: 5 int32 arrays [M, k, r, L] at the largest packed shape, every sequence in a row of its own
    # (M * k * r = rows, as the mini-batches split into whole micro-batches), L = prompt + response.
    slots = 5 * 4 * rows * (p_len + r_len) / devices
    small = 64 * 1024  # norms and other vectors too small to split, counters, keys

    def near(measured, expected):
        return expected <= measured <= expected * 1.05 + small

    assert near(r["prm_step"].argument_bytes, train_state + ref + rows * (2 * r_len * 4 + 4) / devices + slots)  # mask, unpack, acc
    assert near(r["ppo_step"].argument_bytes, train_state + 3 * rows * r_len * 4 / devices + slots)  # mask, old_logp, adv
    # Donated train states come back in place.
    assert near(r["prm_step"].alias_bytes, train_state) and near(r["ppo_step"].alias_bytes, train_state)
    # Sampler: the KV cache of every layer for all B*n rows in flight over prompt + response slots, bf16, plus
    # tokens and log-probs, and the held prompt's cache and logits (replicated); insert (prefill) and decode take it
    # donated and give it back in place.
    per_slot = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 2
    held = p_len * per_slot + cfg.vocab_size * 4
    state = rows * (p_len + r_len) * per_slot / devices + rows * r_len * 8 / devices + held
    prefill_prompts = -(-(rows // c.collect.n) // devices) * devices  # max_prefill
    for name in ("sampler_prefill", "sampler_decode"):
        assert near(r[name].alias_bytes, state) and near(r[name].output_bytes, state), name
    assert near(r["sampler_decode"].argument_bytes, fp32_params + state)
    assert near(r["sampler_prefill"].argument_bytes, fp32_params + state + prefill_prompts * p_len * 4 / devices)
    # Resident while sampling: the PRM (params + Adam), the bf16 reference, the policy's Adam moments.
    assert near(r["sampler_decode"].resident_bytes, train_state + ref + 2 * fp32_params)
    assert near(r["prm_step"].resident_bytes, train_state) and near(r["ppo_step"].resident_bytes, train_state + ref)


def test_prefill_flops_match_the_hand_count(compiled_shrunk):
    """Prefill matmuls: every prompt token of the largest prefill batch through each layer's projections and
    MLP, causal attention over the prompt, the LM head on each prompt's last position only."""
    c, topology, r = compiled_shrunk
    cfg = c.model.arch
    devices = topology.num_chips
    b = -(-c.collect.batch_size // devices) * devices  # max_prefill: every slot's prompt
    t = c.data.max_prompt_length
    d, f, h, k, dh, v = cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.vocab_size
    per_token_layer = 2 * (d * (h + 2 * k) * dh + h * dh * d + 3 * d * f)
    # The splash kernel (model.attention=auto on TPU): the prompt padded to one causal block of 128 slots.
    attention = 2 * 2 * b * 128 * 128 * h * dh
    total = cfg.num_layers * (b * t * per_token_layer + attention) + 2 * b * d * v
    assert r["sampler_prefill"].flops == pytest.approx(total / devices, rel=1e-6)


def test_costs_agree_with_the_compiler_once_per_loop(compiled_shrunk):
    """With every loop body once, our matmul FLOPs outside the Pallas (splash attention) kernels are the compiler's
    per-device FLOPs less its element-wise work (< 20% in so small a model; it does not see the kernels'), and our
    roofline seconds are at most the compiler's optimal_seconds
    (+25%) and at least a quarter of them (it adds per-op overheads that dominate programs this small; on
    the 7B programs the two agree within 20%, docs/aot.md). At the loops' trip counts both grow."""
    _, topology, reports = compiled_shrunk
    for r in reports.values():
        assert 0.8 * r.compiler_flops <= r.cost.flops_once - r.cost.kernel_flops_once <= r.compiler_flops, r.name
        assert r.compiler_seconds / 4 <= r.cost.seconds_once <= 1.25 * r.compiler_seconds, r.name
        assert r.flops > 1.5 * r.cost.flops_once and r.seconds > r.cost.seconds_once, r.name
        assert 0 < r.mfu(topology.chip) < 1, r.name


# --- a sampler mesh of its own: the tiny config on a v5p-8, 2 chips sampling (fsdp) and 2 training (data) ----

# configs/tiny.py's policy: 4 layers of hidden 128, MLP 384, 4 query / 2 KV heads of 32 with qkv bias, vocabulary 512
# (untied head): embed + layers + final norm + head.
TINY_PARAMS = 512 * 128 + 4 * (128 * 32 * (4 + 2 * 2) + 32 * (4 + 2 * 2) + 4 * 32 * 128 + 3 * 128 * 384 + 2 * 128) \
    + 128 + 512 * 128


def _split_settings(overrides=None):
    base, _ = aot.load_config_file(TINY)
    c = aot.config_for(base, {}, {"rollout.devices": 2, "rollout.max_staleness": 1, "mesh.data": 2, "mesh.fsdp": 1,
                                  **(overrides or {})})
    return aot.topology_settings(c, aot.parse_topology("v5p:2x2x1"))


@pytest.fixture(scope="module")
def compiled_split():
    return _compiled_on_v5p8(_split_settings())


def test_split_meshes_are_the_slices_first_and_last_chips():
    """rollout.devices=2 on 4 chips: the sampler mesh (one fsdp axis) on the first 2, the training mesh (`mesh.*`) on
    the other 2, as a run splits jax.devices() (`settings.meshes`); without it one mesh over all 4, the sampler's
    too."""
    s = _split_settings()
    ids = [d.id for d in aot.parse_topology("v5p:2x2x1").devices()]
    assert sorted(d.id for d in s.rollout_mesh.devices.flat) == ids[:2]
    assert sorted(d.id for d in s.mesh.devices.flat) == ids[2:]
    assert dict(s.rollout_mesh.shape) == {"data": 1, "fsdp": 2, "tensor": 1} and s.sampler.data_parallel == 2
    assert dict(s.mesh.shape) == {"data": 2, "fsdp": 1, "tensor": 1}
    one = _split_settings({"rollout.devices": 0, "mesh.data": 1, "mesh.fsdp": -1})
    assert one.rollout_mesh is one.mesh and sorted(d.id for d in one.mesh.devices.flat) == ids


def test_split_programs_hold_the_published_policy(compiled_split):
    """The sampler's programs take the policy copy on the sampler's 2 chips (in the compute dtype, as `Trainer.publish`
    copies it: fp32 in the tiny config; half the bytes at bf16 compute),
    with the next version beside it (rollouts ahead: resident) and no training state; the PRM step has the policy's
    train state beside it on the other 2 chips, whole on each (data-parallel)."""
    s, topology, r = compiled_split
    small = 64 * 1024  # norms and biases too small to split
    policy = 4 * TINY_PARAMS / 2
    assert published_bytes(s) == 4 * TINY_PARAMS
    bf16 = dataclasses.replace(s, model=dataclasses.replace(s.model, compute_dtype="bfloat16"))
    assert published_bytes(bf16) == 2 * TINY_PARAMS
    for name in ("sampler_prefill", "sampler_decode"):
        assert policy <= r[name].resident_bytes <= policy + small, name
        assert r[name].argument_bytes >= policy, name
    assert 3 * 4 * TINY_PARAMS <= r["prm_step"].resident_bytes <= 3 * 4 * TINY_PARAMS + small  # params, Adam mu, nu
    # Synchronous rollouts on the split mesh: the copy the sampler reads and nothing beside it.
    one = aot.compile_run(_split_settings({"rollout.max_staleness": 0}), topology, ["sampler_decode"])[0]
    assert one.resident_bytes == 0 and one.argument_bytes == r["sampler_decode"].argument_bytes


def test_split_step_is_the_slower_side_plus_the_copy(compiled_split):
    """step_s against the compiled programs' own seconds: sampler = one insert (32 prompts a call, 32 a step) + decode
    (48 steps: every response at tiny's 48-token limit, in calls of 4 steps: the decode report's 12 calls); trainer =
    PRM step + PPO step (the mix is the limits: the largest shapes); the copy = the fp32 policy over the ICI of 2
    chips at 600 GB/s each. Rollouts ahead: max(sampler, trainer + copy); synchronous: their sum."""
    s, topology, r = compiled_split
    sampler = r["sampler_prefill"].seconds + r["sampler_decode"].seconds * 48 / 48
    trainer = r["prm_step"].seconds + r["ppo_step"].seconds
    copy = 4 * TINY_PARAMS / (2 * 600e9)
    assert transfer_seconds(s, topology.chip) == pytest.approx(copy, rel=1e-12)
    step = step_seconds(s, list(r.values()), topology.chip)
    assert step == pytest.approx({"sampler_prefill": r["sampler_prefill"].seconds, "sampler_decode":
                                  r["sampler_decode"].seconds, "prm_step": r["prm_step"].seconds, "ppo_step":
                                  r["ppo_step"].seconds, "sampler": sampler, "trainer": trainer, "transfer": copy,
                                  "step": max(sampler, trainer + copy)}, rel=1e-12)
    sync = step_seconds(dataclasses.replace(s, max_staleness=0), list(r.values()), topology.chip)
    assert sync["step"] == pytest.approx(sampler + trainer + copy, rel=1e-12)
    assert sync["step"] > step["step"] > 0


def test_split_markdown_rows_name_each_programs_mesh(compiled_split):
    s, topology, r = compiled_split
    rows = aot.markdown_rows(s, topology, list(r.values()))
    meshes = [row.split("|")[3].strip() for row in rows]
    assert meshes == ["data=1, fsdp=2, tensor=1 (2 chips)"] * 2 + ["data=2, fsdp=1, tensor=1 (2 chips)"] * 2


def test_qwen7b_async_is_the_compiled_v5p16_split():
    """configs/qwen7b_async.py is qwen7b with the overrides docs/aot.md compiled for the v5p-16 split (no SHARDING
    plan of its own): 4 chips sample with one fsdp axis, the other 4 train with qwen7b's mesh keeping the matmul outputs
    for the backward, one version behind."""
    base, _ = aot.load_config_file(QWEN7B)
    c, plans = aot.load_config_file(QWEN7B_ASYNC)
    compiled = {"rollout.devices": 4, "rollout.max_staleness": 1, "rollout.gather_params": True,
                "rollout.prompts_per_call": 128, "model.remat_saves": "dots", "workdir": "runs/qwen7b_async"}
    assert plans == {} and c.to_dict() == aot.config_for(base, {}, compiled).to_dict()
    s = aot.topology_settings(c, aot.parse_topology("v5p-16"))
    assert dict(s.rollout_mesh.shape) == dict(s.mesh.shape) == {"data": 1, "fsdp": 4, "tensor": 1}
    assert s.prompts_per_call * s.collect.n == 512 and s.max_staleness == 1


def test_out_of_hbm_is_reported_not_raised():
    """4096 prompts x 4 of 1024 + 1024 tokens in flight on a v5e 2x2 (16 GiB a chip): the KV cache alone is 64
    GiB a chip; the compiler's message is kept, the inputs' shards are counted, and nothing fits."""
    c = aot.config_for(_shrunk_qwen7b(), {}, {"train.batch_size": 4096, "rollout.prompts_per_call": 4096,
                                               "data.max_prompt_length": 1024, "rollout.max_response_length": 1024})
    topology = aot.parse_topology("v5e:2x2")
    prefill, decode = aot.compile_run(aot.topology_settings(c, topology), topology, ["sampler_prefill", "sampler_decode"])
    cfg = aot.topology_settings(c, topology).model.arch
    params = 4 * cfg.num_params / 4
    kv = 2 * cfg.num_layers * 4096 * 4 * 2048 * cfg.num_kv_heads * cfg.head_dim * 2 / 4
    for report in (prefill, decode):
        assert "RESOURCE_EXHAUSTED" in report.error and not report.fits(topology.chip), report.name
        assert params + kv <= report.argument_bytes <= 1.2 * (params + kv), report.name
    line = aot.summary_line(topology, [prefill, decode])
    assert SUMMARY.match(line).group(2) == "no" and int(SUMMARY.match(line).group(3)) == max(prefill.peak_bytes,
                                                                                             decode.peak_bytes)


def test_cli_prints_the_summary_line_last():
    """`python -m prime_jax.aot` as a user runs it (one cheap program), last line exactly the summary."""
    shrink = {**SHRINK, "model.arch.num_attention_heads": 4, "model.arch.num_key_value_heads": 4}  # head_dim 512 / 4
    del shrink["model.arch.head_dim"]
    cmd = [sys.executable, "-m", "prime_jax.aot", f"--config={QWEN7B}", "--topology=v5p-8", "--programs=sampler_prefill",
           *(f"--config.{k}={v}" for k, v in shrink.items())]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    m = SUMMARY.match(lines[-1])
    assert m and m.groups()[:2] == ("v5p:2x2x1", "yes") and int(m.group(4)) == 95 * 2**30
    assert any(line.strip().startswith("sampler_prefill") and "fits=yes" in line for line in lines)
    assert math.isfinite(int(m.group(3))) and int(m.group(3)) > 0
