"""Pallas kernels for Baichuan (GPU via Triton, TPU via Mosaic, CPU via interpret mode).

- `flash_attention(q, k, v, *, causal, alibi_slopes, segment_ids, ...)`: fused attention with
  in-kernel ALiBi, packed segments, GQA/MQA, any sequence length, and a custom VJP.
- `rms_norm(x, scale, *, eps)`: fused RMSNorm, forward and backward.
Each kernel has a plain-jnp reference in `kernels_pallas.reference`.
"""

from kernels_pallas.attention import BACKENDS, DEFAULT_BLOCKS, flash_attention, resolve_backend
from kernels_pallas.reference import attention_reference, rms_norm_reference
from kernels_pallas.rms_norm import rms_norm

__all__ = ["BACKENDS", "DEFAULT_BLOCKS", "attention_reference", "flash_attention",
           "resolve_backend", "rms_norm", "rms_norm_reference"]
