"""Bad checkpoints get errors that name the file, key or tensor."""

import json
import os
import shutil

import pytest

from prime_jax.models import ModelConfig, load_pretrained
from prime_jax.models.hf_io import SafetensorsDir, write_safetensors


def _copy(src, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(src, dst)
    return dst


def test_missing_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_pretrained(tmp_path)


def test_missing_weights(qwen2_dir, tmp_path):
    d = _copy(qwen2_dir, tmp_path)
    os.remove(d / "model.safetensors")
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        load_pretrained(d)


def test_unsupported_model_type(qwen2_dir, tmp_path):
    d = _copy(qwen2_dir, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"config.json: model_type 'gpt2' is not supported"):
        load_pretrained(d)


def test_missing_config_key(qwen2_dir, tmp_path):
    d = _copy(qwen2_dir, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    del cfg["hidden_size"]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="missing required key 'hidden_size'"):
        load_pretrained(d)


def _rewrite(d, edit):
    st = SafetensorsDir(d)
    tensors = {k: st.get(k).copy() for k in st.entries}
    edit(tensors)
    write_safetensors(str(d / "model.safetensors"), tensors)


def test_wrong_shape_names_the_tensor(qwen2_dir, tmp_path):
    d = _copy(qwen2_dir, tmp_path)
    _rewrite(d, lambda t: t.__setitem__("model.layers.1.mlp.up_proj.weight", t["model.layers.1.mlp.up_proj.weight"][:-1]))
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj\.weight.*shape \(63, 32\), expected \(64, 32\)"):
        load_pretrained(d)


def test_missing_tensor_names_the_tensor(qwen2_dir, tmp_path):
    d = _copy(qwen2_dir, tmp_path)
    _rewrite(d, lambda t: t.pop("model.layers.0.self_attn.k_proj.bias"))
    with pytest.raises(KeyError, match=r"model\.layers\.0\.self_attn\.k_proj\.bias"):
        load_pretrained(d)


def test_invalid_config_values():
    with pytest.raises(ValueError, match="num_heads"):
        ModelConfig(model_type="qwen2", vocab_size=8, hidden_size=8, intermediate_size=8, num_layers=1,
                    num_heads=3, num_kv_heads=2, head_dim=4)
