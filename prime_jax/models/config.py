"""Architecture config of the Qwen2 / Qwen2.5 / Llama-3 decoder family, read from and written to HF `config.json`."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

SUPPORTED_MODEL_TYPES = ("qwen2", "llama")
CONFIG_ATTENTION = ("xla", "cudnn", "splash")  # config.model.attention values besides "auto"
# attention.causal_attention implementations; splash_interpret: the splash kernel in Pallas interpret mode (tests)
ATTENTION_IMPLEMENTATIONS = (*CONFIG_ATTENTION, "splash_interpret")
LAYER_LOOPS = ("auto", "scan", "unroll")  # config.model.layers values
# config.model.remat_saves: what a rematerialised layer keeps for the backward pass besides its input; "dots" keeps
# the outputs of its weight matmuls (q, k, v, o, gate, up), so the backward recomputes only the attention and the
# elementwise ops: 13-16% fewer FLOPs in the 7B training steps for (layers x tokens x those widths) of activations
REMAT_SAVES = ("nothing", "dots")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama-3 style frequency-dependent RoPE scaling (`rope_type: llama3`)."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Everything the decoder needs to know; hashable, so it can sit in a static jit argument.

    `param_dtype` is the storage dtype of the weights (fp32 for trainable copies), `dtype` the
    compute dtype of matmuls (bf16 on accelerators). Log-probs are always fp32.
    """

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    attention_bias: bool = False
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 32768
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    param_dtype: str = "float32"
    dtype: str = "float32"
    remat: bool = False
    remat_saves: str = "nothing"  # with remat, what a layer keeps for the backward: one of REMAT_SAVES
    scan_layers: bool = True   # full-sequence forward: lax.scan over the stacked layers, or unrolled
    logits_chunk: int = 1024
    attention: str = "xla"     # full-sequence attention: one of ATTENTION_IMPLEMENTATIONS (attention.causal_attention)

    def __post_init__(self) -> None:
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"model_type {self.model_type!r} is not supported (supported: {SUPPORTED_MODEL_TYPES})")
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "head_dim", "logits_chunk"):
            if getattr(self, key) < 1:
                raise ValueError(f"model config: {key} must be >= 1, got {getattr(self, key)}")
        if self.remat_saves not in REMAT_SAVES:
            raise ValueError(f"model config: remat_saves {self.remat_saves!r} is not one of {REMAT_SAVES}")
        if self.attention not in ATTENTION_IMPLEMENTATIONS:
            raise ValueError(f"model config: attention {self.attention!r} is not one of {ATTENTION_IMPLEMENTATIONS}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"model config: num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    @property
    def layer_params(self) -> int:
        """Parameters of the transformer blocks: everything but the embedding, LM head and final norm."""
        d, f, h, kv, hd = self.hidden_size, self.intermediate_size, self.num_heads, self.num_kv_heads, self.head_dim
        attn = d * hd * (h + 2 * kv) + h * hd * d + (hd * (h + 2 * kv) if self.attention_bias else 0)
        return self.num_layers * (attn + 3 * d * f + 2 * d)

    @property
    def num_params(self) -> int:
        d = self.hidden_size
        head = 0 if self.tie_word_embeddings else self.vocab_size * d
        return self.layer_params + self.vocab_size * d + head + d

    @classmethod
    def from_hf(cls, hf: dict[str, Any], **overrides: Any) -> ModelConfig:
        """Builds a config from a parsed HF `config.json` (transformers 4.x and 5.x layouts)."""
        model_type = hf.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"config.json: model_type {model_type!r} is not supported (supported: {SUPPORTED_MODEL_TYPES})")
        if hf.get("hidden_act", "silu") != "silu":
            raise ValueError(f"config.json: hidden_act {hf['hidden_act']!r} is not supported (only 'silu')")
        if hf.get("use_sliding_window"):
            raise ValueError("config.json: use_sliding_window=true is not supported")
        rope = dict(hf.get("rope_parameters") or {})
        legacy = hf.get("rope_scaling") or {}
        rope.update({k: v for k, v in legacy.items() if k not in rope})
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "llama3"):
            raise ValueError(f"config.json: rope type {rope_type!r} is not supported (supported: default, llama3)")
        scaling = None
        if rope_type == "llama3":
            scaling = RopeScaling(
                factor=float(rope["factor"]),
                low_freq_factor=float(rope["low_freq_factor"]),
                high_freq_factor=float(rope["high_freq_factor"]),
                original_max_position_embeddings=int(rope["original_max_position_embeddings"]),
            )
        try:
            heads = int(hf["num_attention_heads"])
            eos = hf.get("eos_token_id")
            fields = dict(
                model_type=model_type,
                vocab_size=int(hf["vocab_size"]),
                hidden_size=int(hf["hidden_size"]),
                intermediate_size=int(hf["intermediate_size"]),
                num_layers=int(hf["num_hidden_layers"]),
                num_heads=heads,
                num_kv_heads=int(hf.get("num_key_value_heads") or heads),
                head_dim=int(hf.get("head_dim") or hf["hidden_size"] // heads),
                rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
                rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
                rope_scaling=scaling,
                # Qwen2 always has q/k/v biases and no flag for it; Llama has `attention_bias`.
                attention_bias=True if model_type == "qwen2" else bool(hf.get("attention_bias", False)),
                tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
                max_position_embeddings=int(hf.get("max_position_embeddings", 32768)),
                bos_token_id=hf.get("bos_token_id"),
                eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
            )
        except KeyError as e:
            raise ValueError(f"config.json: missing required key {e.args[0]!r}") from None
        fields.update(overrides)
        return cls(**fields)

    def to_hf(self, torch_dtype: str = "float32") -> dict[str, Any]:
        """The HF `config.json` dict that `transformers.AutoConfig` reads back to this architecture."""
        rope: dict[str, Any] = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.rope_scaling is not None:
            rope = {"rope_type": "llama3", "rope_theta": self.rope_theta, **dataclasses.asdict(self.rope_scaling)}
        arch = {"qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM"}[self.model_type]
        eos = list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id
        hf = {
            "architectures": [arch],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_parameters": rope,
            "rope_theta": self.rope_theta,
            "rope_scaling": None if self.rope_scaling is None else rope,
            "tie_word_embeddings": self.tie_word_embeddings,
            "max_position_embeddings": self.max_position_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": eos,
            "torch_dtype": torch_dtype,
        }
        if self.model_type == "llama":
            hf["attention_bias"] = self.attention_bias
            hf["mlp_bias"] = False
        elif not self.attention_bias:
            raise ValueError("Qwen2 checkpoints always carry q/k/v biases; attention_bias=False cannot be exported as qwen2")
        return hf


def read_hf_config(path: str | os.PathLike, **overrides: Any) -> ModelConfig:
    """Reads `<path>/config.json` (a local path or gs://) into a ModelConfig; errors name the file."""
    from prime_jax import paths

    file = paths.path(path) / "config.json"
    if not file.is_file():
        raise FileNotFoundError(f"no config.json in {path!s} (expected a Hugging Face model directory)")
    try:
        hf = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{file}: not valid JSON ({e})") from None
    try:
        return ModelConfig.from_hf(hf, **overrides)
    except ValueError as e:
        raise ValueError(f"{file}: {e}") from None


def scan_layers_for(layers: str, platform: str) -> bool:
    """`ModelConfig.scan_layers` for config value `model.layers` on `platform`: "auto" scans everywhere but on CPU,
    where XLA copies each sliced weight and, differentiated, zero-fills and copies into the scan's stacked residuals
    (docs/benchmarks.md); "scan" / "unroll" force either."""
    if layers not in LAYER_LOOPS:
        raise ValueError(f"model.layers={layers!r}: expected one of {LAYER_LOOPS}")
    return layers == "scan" or (layers == "auto" and platform != "cpu")
