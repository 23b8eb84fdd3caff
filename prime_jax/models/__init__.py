"""The decoder shared by policy, implicit PRM and reference (Qwen2 / Qwen2.5 / Llama 3), its attention, HF I/O and
log-probs. (The sampler's KV cache and its decode step are `prime_jax.sampling`'s: this package does not import it.)"""

from prime_jax.models.attention import causal_attention, resolve_attention
from prime_jax.models.config import ModelConfig, RopeScaling, read_hf_config, scan_layers_for
from prime_jax.models.decoder import Decoder, in_compute_dtype, positions_from_mask
from prime_jax.models.hf_io import abstract_model, hf_state_dict, load_pretrained, save_pretrained
from prime_jax.models.logprobs import (logprobs_from_hidden, packed_logprobs, response_logprobs, slot_logprobs,
                                      token_logprobs)

__all__ = [
    "Decoder", "ModelConfig", "RopeScaling", "abstract_model", "causal_attention", "hf_state_dict", "in_compute_dtype",
    "load_pretrained", "logprobs_from_hidden", "packed_logprobs", "positions_from_mask", "read_hf_config",
    "resolve_attention", "response_logprobs", "save_pretrained", "scan_layers_for", "slot_logprobs", "token_logprobs",
]
