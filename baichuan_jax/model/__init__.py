"""Public model API: `BaichuanLM`, its KV cache and the pure math it is built from."""

from baichuan_jax.model.attention import AttnContext, attention_mask, xla_attention
from baichuan_jax.model.layers import head_logits, rms_norm
from baichuan_jax.model.positions import alibi_bias, alibi_slopes, apply_rope, rope_frequencies
from baichuan_jax.model.transformer import (BaichuanLM, DecoderLayer, KVCache, init_cache,
                                            init_params, param_logical_axes)

__all__ = [
    "AttnContext", "BaichuanLM", "DecoderLayer", "KVCache", "alibi_bias", "alibi_slopes",
    "apply_rope", "attention_mask", "head_logits", "init_cache", "init_params", "param_logical_axes", "rms_norm", "rope_frequencies",
    "xla_attention",
]
