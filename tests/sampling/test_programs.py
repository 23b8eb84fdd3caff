"""The device programs (`prime_jax.sampling.programs`) compiled as the trainer and the AOT compiler see them: a
data-split decode step's collectives, and insert / decode lowered from abstract inputs, donating their state."""

import re

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from prime_jax.mesh import make_mesh
from prime_jax.models import abstract_model
from prime_jax.sampling import SamplerConfig, SamplingParams, decode, empty_state, insert, layer_weights
from tests.fixtures import tiny_config

PAD = 0


@pytest.mark.parametrize("per_layer", [False, True])
def test_a_data_split_decode_step_syncs_the_devices_once(qwen_model, per_layer):
    """On a batch split 4 ways, a decode step's only collective is the loop condition's one all-reduce: writing
    the new tokens gathers no indices across the devices (a scatter would all-gather them every step)."""
    mesh = make_mesh({"data": 4}, jax.devices()[:4])
    graphdef, params = nnx.split(qwen_model)
    params = jax.device_put(params, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
    cfg = SamplerConfig(n=2, max_new_tokens=8, sampling=SamplingParams(stop_ids=(3,)), rows=8, buckets=(8,),
                        data_parallel=4, per_layer=per_layer)
    with jax.set_mesh(mesh):
        state = empty_state(qwen_model.cfg, cfg, 8)
        layers = layer_weights(graphdef, params) if per_layer else None
        hlo = decode.lower(graphdef, params, state, jnp.int32(9), layers).compile().as_text()
    collectives = re.findall(r"= \S+ (all-reduce|all-gather|all-to-all|collective-permute|reduce-scatter)\(", hlo)
    assert collectives == ["all-reduce"], collectives


@pytest.mark.parametrize("per_layer", [False, True])
def test_programs_lower_from_abstract_inputs_and_donate_their_state(per_layer):
    """What the AOT compiler does: lower insert (with a prefill batch, and of the held prompt alone) and decode from
    shapes only, in either cache layout; all alias every state input they read."""
    graphdef, params = nnx.split(abstract_model(tiny_config()))
    cfg = SamplerConfig(n=2, max_new_tokens=8, sampling=SamplingParams(temperature=0.7, top_p=0.9, stop_ids=(3,)),
                        rows=8, buckets=(16,), kv_block=8, pad_id=PAD, per_layer=per_layer)
    state = jax.eval_shape(lambda: empty_state(tiny_config(), cfg, 16))
    kv = state.cache[1] if per_layer else state.cache
    # k [L, S, K, Dh, N], v [L, S, K, N, Dh], prompt 16 + ring 8 (Dh = N = 8); per layer: k [N, K, Dh, S], v [N, K, S, Dh],
    # no block padding
    assert state.tokens.shape == (8, 8) and (kv.k.shape, kv.v.shape) == (
        ((8, 2, 8, 24), (8, 2, 24, 8)) if per_layer else ((2, 24, 2, 8, 8),) * 2)
    layers = jax.eval_shape(layer_weights, graphdef, params) if per_layer else None
    scalar = jax.ShapeDtypeStruct((), jnp.int32)
    rng = jax.eval_shape(lambda: jax.random.key(0))
    texts = [decode.trace(graphdef, params, state, scalar, layers).lower().as_text()]
    for b in (cfg.max_prefill, 0):
        prompt, lens = jax.ShapeDtypeStruct((b, 16), jnp.int32), jax.ShapeDtypeStruct((b,), jnp.int32)
        slots = jax.ShapeDtypeStruct((2, b + 1), jnp.int32)
        lowered = insert.trace(graphdef, params, state, prompt, lens, slots, slots, scalar, rng, layers).lower()
        texts.append(lowered.as_text())
    # Every state input but one scalar that the program replaces unread: decode's fin_count, insert's rng.
    leaves = len(jax.tree.leaves(state))
    assert [text.count("tf.aliasing_output") for text in texts] == [leaves - 1] * 3
