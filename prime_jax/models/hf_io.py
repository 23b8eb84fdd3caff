"""Hugging Face checkpoint I/O: safetensors <-> the stacked NNX decoder, straight onto the mesh.

`load_pretrained` builds the model abstractly (no weights), then creates every param with
`jax.make_array_from_callback`, so each device reads only its own shard from the memory-mapped
safetensors files: no replicated host or device copy of the model ever exists. A gs:// model
directory is first staged to a local copy on each host (prime_jax.paths.stage); `save_pretrained`
writes local paths and gs:// alike.
"""

from __future__ import annotations

import functools
import json
import os
import struct
from collections.abc import Callable
from typing import Any

import jax
import ml_dtypes
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from prime_jax import paths
from prime_jax.mesh import state_shardings
from prime_jax.models.config import ModelConfig, read_hf_config
from prime_jax.models.decoder import Decoder

_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16, "F64": np.float64,
           "I64": np.int64, "I32": np.int32}
_NAMES = {np.dtype(v): k for k, v in _DTYPES.items()}


# --- the name and layout map between HF tensors and our params -----------------------------------

def _layer_map(cfg: ModelConfig) -> dict[str, tuple[str, Callable, Callable]]:
    """Our stacked param -> (HF per-layer name, hf->ours converter, ours->hf converter)."""
    D, H, K, Dh = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    ident = (lambda w: w, lambda w: w)
    proj = lambda n: (lambda w: w.T.reshape(D, n, Dh), lambda w: w.reshape(D, n * Dh).T)  # noqa: E731
    bias = lambda n: (lambda w: w.reshape(n, Dh), lambda w: w.reshape(n * Dh))  # noqa: E731
    transpose = (lambda w: w.T, lambda w: w.T)
    m = {
        "attn_norm": ("input_layernorm.weight", *ident),
        "mlp_norm": ("post_attention_layernorm.weight", *ident),
        "q": ("self_attn.q_proj.weight", *proj(H)),
        "k": ("self_attn.k_proj.weight", *proj(K)),
        "v": ("self_attn.v_proj.weight", *proj(K)),
        "o": ("self_attn.o_proj.weight", lambda w: w.T.reshape(H, Dh, D), lambda w: w.reshape(H * Dh, D).T),
        "gate": ("mlp.gate_proj.weight", *transpose),
        "up": ("mlp.up_proj.weight", *transpose),
        "down": ("mlp.down_proj.weight", *transpose),
    }
    if cfg.attention_bias:
        m.update({"q_bias": ("self_attn.q_proj.bias", *bias(H)), "k_bias": ("self_attn.k_proj.bias", *bias(K)),
                  "v_bias": ("self_attn.v_proj.bias", *bias(K))})
    return m


def _top_map(cfg: ModelConfig) -> dict[str, tuple[str, Callable, Callable]]:
    m = {"embed": ("model.embed_tokens.weight", lambda w: w, lambda w: w),
         "final_norm": ("model.norm.weight", lambda w: w, lambda w: w)}
    if not cfg.tie_word_embeddings:
        m["lm_head"] = ("lm_head.weight", lambda w: w.T, lambda w: w.T)
    return m


# --- safetensors, memory-mapped -------------------------------------------------------------------

class SafetensorsDir:
    """Lazy, memory-mapped view of the tensors of an HF directory (single file or sharded index)."""

    def __init__(self, path: str | os.PathLike):
        self.path = str(path)
        index = os.path.join(self.path, "model.safetensors.index.json")
        single = os.path.join(self.path, "model.safetensors")
        if os.path.isfile(index):
            with open(index) as f:
                weight_map = json.load(f).get("weight_map")
            if not isinstance(weight_map, dict):
                raise ValueError(f"{index}: no 'weight_map' object")
            files = sorted(set(weight_map.values()))
        elif os.path.isfile(single):
            files = ["model.safetensors"]
        else:
            raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {self.path}")
        self.entries: dict[str, tuple[str, dict[str, Any], int]] = {}
        for name in files:
            file = os.path.join(self.path, name)
            if not os.path.isfile(file):
                raise FileNotFoundError(f"{file}: listed in the index but missing")
            with open(file, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(n))
            header.pop("__metadata__", None)
            for key, meta in header.items():
                self.entries[key] = (file, meta, 8 + n)

    @functools.lru_cache(maxsize=8)
    def get(self, key: str) -> np.ndarray:
        if key not in self.entries:
            raise KeyError(f"tensor {key!r} is missing from the checkpoint in {self.path}")
        file, meta, offset = self.entries[key]
        if meta["dtype"] not in _DTYPES:
            raise ValueError(f"tensor {key!r} in {file}: unsupported dtype {meta['dtype']}")
        start, end = meta["data_offsets"]
        dtype = np.dtype(_DTYPES[meta["dtype"]])
        count = (end - start) // dtype.itemsize
        arr = np.memmap(file, dtype=dtype, mode="r", offset=offset + start, shape=(count,))
        return arr.reshape(meta["shape"])


def write_safetensors(file: str | os.PathLike, tensors: dict[str, np.ndarray],
                      metadata: dict[str, str] | None = None) -> None:
    """Writes one safetensors file (supports bf16 via ml_dtypes)."""
    header: dict[str, Any] = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for key, t in tensors.items():
        header[key] = {"dtype": _NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with paths.path(file).open("wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for t in tensors.values():
            f.write(np.ascontiguousarray(t).tobytes())


# --- load / save -----------------------------------------------------------------------------------

def load_pretrained(path: str | os.PathLike, *, mesh: Mesh | None = None, dtype: str | None = None,
                    **config_overrides: Any) -> Decoder:
    """Loads an HF Qwen2/Llama directory (local, or gs:// staged to a local copy) onto `mesh` (or the default device).

    dtype: param dtype (default float32); other ModelConfig fields (compute `dtype` is
    `compute_dtype` here, `remat`, ...) may be overridden by keyword.
    """
    overrides = dict(config_overrides)
    if "compute_dtype" in overrides:
        overrides["dtype"] = overrides.pop("compute_dtype")
    if dtype is not None:
        overrides["param_dtype"] = dtype
    path = paths.stage(path)
    cfg = read_hf_config(path, **overrides)
    st = SafetensorsDir(path)
    abstract = nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0)))
    graphdef, abs_state = nnx.split(abstract)
    if mesh is None:
        single = jax.sharding.make_single_device_sharding(jax.devices()[0])
        shardings = jax.tree.map(lambda _: single, abs_state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    else:
        shardings = state_shardings(abs_state, mesh)
    layer_map, top_map = _layer_map(cfg), _top_map(cfg)

    def check(key: str, arr: np.ndarray, expected: tuple[int, ...]) -> np.ndarray:
        if tuple(arr.shape) != tuple(expected):
            raise ValueError(f"tensor {key!r} in {path}: shape {tuple(arr.shape)}, expected {tuple(expected)} from config.json")
        return arr

    def load_param(keypath: tuple[str, ...], var: nnx.Variable, sharding) -> jax.Array:
        shape, pdt = var.get_value().shape, var.get_value().dtype
        if keypath[0] == "layers":
            name, to_ours, to_hf = layer_map[keypath[1]]
            hf_shape = to_hf(np.empty(shape[1:], np.int8)).shape

            def cb(index):
                layer_idx = range(cfg.num_layers)[index[0]]
                out = []
                for i in layer_idx:
                    key = f"model.layers.{i}.{name}"
                    out.append(to_ours(check(key, st.get(key), hf_shape))[index[1:]])
                return np.stack(out).astype(pdt)
        else:
            name, to_ours, to_hf = top_map[keypath[0]]
            hf_shape = to_hf(np.empty(shape, np.int8)).shape

            def cb(index):
                return np.asarray(to_ours(check(name, st.get(name), hf_shape))[index]).astype(pdt)

        return jax.make_array_from_callback(shape, sharding, cb)

    flat_shardings = dict(nnx.to_flat_state(shardings))
    flat_vars = {k: v.replace(load_param(tuple(map(str, k)), v, flat_shardings[k]))
                 for k, v in nnx.to_flat_state(abs_state)}
    return nnx.merge(graphdef, nnx.from_flat_state(flat_vars))


def _gather(x: jax.Array) -> np.ndarray:
    """A fully addressable host copy of a (possibly multi-host sharded) array."""
    if x.is_fully_addressable:
        return np.asarray(jax.device_get(x))
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def hf_state_dict(model: Decoder, dtype: str | None = None) -> dict[str, np.ndarray]:
    """The model's weights under HF names and layouts (host numpy), optionally cast (e.g. 'bfloat16')."""
    cfg = model.cfg
    out_dtype = None if dtype is None else np.dtype(ml_dtypes.bfloat16 if dtype == "bfloat16" else dtype)
    cast = (lambda a: a) if out_dtype is None else (lambda a: a.astype(out_dtype))  # noqa: E731
    tensors: dict[str, np.ndarray] = {}
    for name, (hf_name, _, to_hf) in _top_map(cfg).items():
        tensors[hf_name] = cast(np.ascontiguousarray(to_hf(_gather(getattr(model, name)[...]))))
    for name, (hf_name, _, to_hf) in _layer_map(cfg).items():
        stacked = _gather(getattr(model.layers, name)[...])
        for i in range(cfg.num_layers):
            tensors[f"model.layers.{i}.{hf_name}"] = cast(np.ascontiguousarray(to_hf(stacked[i])))
    return tensors


def save_pretrained(model: Decoder, path: str | os.PathLike, *, dtype: str | None = None,
                    max_shard_bytes: int = 5 * 2**30) -> None:
    """Writes an HF directory (config.json + safetensors, sharded with an index past `max_shard_bytes`)
    that `transformers.AutoModelForCausalLM.from_pretrained` loads. Multi-host: every process gathers,
    process 0 writes."""
    tensors = hf_state_dict(model, dtype)
    if jax.process_index() != 0:
        return
    out = paths.path(path)
    out.mkdir(parents=True, exist_ok=True)
    torch_dtype = dtype or model.cfg.param_dtype
    (out / "config.json").write_text(json.dumps(model.cfg.to_hf(torch_dtype=torch_dtype), indent=2))
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for key, t in tensors.items():
        if size and size + t.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = t
        size += t.nbytes
    if len(shards) == 1:
        write_safetensors(out / "model.safetensors", shards[0])
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(out / name, shard)
        weight_map.update({k: name for k in shard})
    total = sum(t.nbytes for t in tensors.values())
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


def abstract_model(cfg: ModelConfig) -> Decoder:
    """The model with ShapeDtypeStructs instead of weights (for AOT compilation and memory plans)."""
    return nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0)))

