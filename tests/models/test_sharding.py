"""The model on an 8-device mesh: params really sharded, logits equal to one device."""

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from prime_jax.mesh import logical_to_spec, make_mesh
from prime_jax.models import load_pretrained


def test_eight_fake_devices_present():
    assert len(jax.devices()) == 8


@pytest.mark.parametrize("axes", [{"data": 1, "fsdp": 4, "tensor": 2}, {"data": 2, "fsdp": 2, "tensor": 2}])
def test_sharded_logits_equal_single_device(qwen2_dir, left_padded_batch, axes):
    tokens, mask = left_padded_batch
    ref = np.asarray(load_pretrained(qwen2_dir)(tokens, attention_mask=mask))
    mesh = make_mesh(axes)
    model = load_pretrained(qwen2_dir, mesh=mesh)
    gate = model.layers.gate[...]
    assert gate.sharding.spec == P(None, "fsdp", "tensor")
    pieces = {tuple((sl.start, sl.stop) for sl in s.index) for s in gate.addressable_shards}
    assert len(pieces) == axes["fsdp"] * axes["tensor"]  # distinct pieces, not replicated copies
    assert model.embed[...].sharding.spec == P(None, "fsdp")  # vocab 97 is not divisible by tensor=2
    assert model.layers.q[...].sharding.spec == P(None, "fsdp", "tensor", None)
    graphdef, state = nnx.split(model)

    @jax.jit
    def forward(state, tokens, mask):
        return nnx.merge(graphdef, state)(tokens, attention_mask=mask)

    with jax.set_mesh(mesh):
        out = np.asarray(forward(state, tokens, mask))
    real = mask.astype(bool)
    assert np.max(np.abs(out[real] - ref[real])) < 1e-5


def test_rules_replicate_dims_a_mesh_axis_does_not_divide():
    mesh = make_mesh({"fsdp": 2, "tensor": 4})
    assert logical_to_spec(("embed", "kv_heads"), (32, 2), mesh) == P("fsdp", None)
    assert logical_to_spec(("embed", "heads"), (32, 8), mesh) == P("fsdp", "tensor")
    assert logical_to_spec(("batch", None), (8, 3), mesh) == P("fsdp", None)


def test_make_mesh_resolves_minus_one_and_rejects_bad_sizes():
    assert dict(make_mesh({"data": 2, "fsdp": -1, "tensor": 1}).shape) == {"data": 2, "fsdp": 4, "tensor": 1}
    with pytest.raises(ValueError, match="do not divide"):
        make_mesh({"data": 3, "fsdp": -1})
    with pytest.raises(ValueError, match="at most one axis"):
        make_mesh({"data": -1, "fsdp": -1})
