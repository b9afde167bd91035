"""Pallas kernels for Baichuan (GPU via Triton, TPU via Mosaic, CPU via interpret mode).

- `flash_attention(q, k, v, *, causal, alibi_slopes, segment_ids, rope_theta, ...)`: fused
  attention with in-kernel ALiBi (and optionally RoPE), packed segments, GQA/MQA, any sequence
  length, and a custom VJP.
- `decode_attention(q, k_cache, v_cache, lengths, *, starts, alibi_slopes, ...)`: one query token
  per row over the filled slots of a [batch, kv_heads, max_len, head_dim] KV cache (ragged
  lengths; blocks past a row's length are never read).
- `top_k(logits, k, *, present, penalty)` / `topk_argmax(logits)`: the top-k / greedy pick over the
  vocabulary in one pass over the logits (optionally with the repetition penalty fused in).
- `rms_norm(x, scale, *, eps)`: fused RMSNorm, forward and backward.
- `kernels_pallas.flash_mgpu.flash_attention_mgpu(q, k, v, *, causal, alibi_slopes,
  segment_ids, positions, blocks)`: the same attention (no in-kernel RoPE; seq a multiple of 64,
  head_dim 64 or 128) for Hopper GPUs through Mosaic GPU (TMA + wgmma), imported from its module
  (it loads the Mosaic GPU lowering).
Each kernel has a plain-jnp reference in `kernels_pallas.reference` (top-k: `jax.lax.top_k`).
"""

from kernels_pallas.attention import (BACKENDS, DEFAULT_BLOCKS, default_blocks, default_tuning,
                                      flash_attention, lowering_platform, resolve_backend,
                                      triton_target)
from kernels_pallas.decode import decode_attention
from kernels_pallas.reference import (attention_reference, decode_attention_reference,
                                      rms_norm_reference, rope_reference)
from kernels_pallas.rms_norm import rms_norm, rms_norm_kernel_fits
from kernels_pallas.topk import argmax as topk_argmax
from kernels_pallas.topk import top_k

__all__ = ["BACKENDS", "DEFAULT_BLOCKS", "attention_reference", "decode_attention",
           "decode_attention_reference", "default_blocks", "default_tuning", "flash_attention",
           "lowering_platform", "resolve_backend", "rms_norm", "rms_norm_reference",
           "rms_norm_kernel_fits", "rope_reference", "top_k", "topk_argmax", "triton_target"]
