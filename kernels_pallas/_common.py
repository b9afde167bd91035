"""Pieces shared by the GPU (Triton) and TPU (Mosaic) attention kernels: score bias and masking."""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp

# Finite stand-in for -inf: a fully masked row then gives exp(0) = 1 weights instead of NaN
# (such rows only occur for internal padding queries, whose outputs are sliced away).
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


@dataclasses.dataclass(frozen=True)
class AttnStatic:
  """Static (hashable) settings of one attention call, shared by forward and backward kernels."""
  causal: bool
  sm_scale: float
  seq_len: int  # true sequence length; positions >= seq_len are internal padding
  seq_pad: int  # padded length the kernels see
  groups: int  # heads // kv_heads
  block_q: int
  block_k: int
  has_alibi: bool
  has_segments: bool
  has_positions: bool
  interpret: bool
  num_warps: Optional[int] = None  # GPU launch settings; None = the backend's default
  num_stages: Optional[int] = None
  has_rope: bool = False  # q and k rotated in the kernel from cos/sin tables (GPU kernels)
  # GPU backward as one kernel: the dK/dV kernel also adds each tile's dQ share into an fp32
  # buffer with atomic adds (flash_gpu.backward_fused), instead of a separate dQ kernel.
  fused_dq: bool = False

  @property
  def mask_padding(self) -> bool:
    # Causal masking already hides padded keys (index >= seq_len) from every real query.
    return self.seq_pad != self.seq_len and not self.causal


def scores_bias_mask(s: jax.Array, q_idx: jax.Array, k_idx: jax.Array, st: AttnStatic, *,
                     slope: Optional[jax.Array] = None,
                     q_seg: Optional[jax.Array] = None, k_seg: Optional[jax.Array] = None,
                     q_pos: Optional[jax.Array] = None, k_pos: Optional[jax.Array] = None,
                     causal_mask: bool = True) -> jax.Array:
  """Adds ALiBi and applies the causal / segment / padding masks to one block of scores.

  Args:
    s: [block_q, block_k] fp32 scaled scores.
    q_idx: [block_q, 1] (or broadcastable) int32 row indices of the queries.
    k_idx: [1, block_k] int32 indices of the keys.
    st: static settings.
    slope: fp32 scalar ALiBi slope of this head.
    q_seg, k_seg: [block_q, 1] and [1, block_k] segment ids.
    q_pos, k_pos: [block_q, 1] and [1, block_k] positions for the ALiBi distance.
    causal_mask: False for blocks known to lie wholly below the diagonal (saves the compare).
  The transposed block works the same way (every operation broadcasts): s [block_k, block_q]
  with the query-side arguments as rows [1, block_q] and the key-side ones as columns
  [block_k, 1] (the GPU dK/dV kernel).
  Returns:
    s's shape, fp32, ALiBi added and masked entries set to MASK_VALUE.
  """
  if st.has_alibi:
    if st.has_positions:
      dist = (q_pos - k_pos).astype(jnp.float32)
    else:
      dist = (q_idx - k_idx).astype(jnp.float32)
    s = s - slope * dist
  mask = None

  def _and(a, b):
    return b if a is None else jnp.logical_and(a, b)

  if st.causal and causal_mask:
    mask = _and(mask, q_idx >= k_idx)
  if st.mask_padding:
    mask = _and(mask, k_idx < st.seq_len)
  if st.has_segments:
    mask = _and(mask, q_seg == k_seg)
  if mask is not None:
    s = jnp.where(mask, s, MASK_VALUE)
  return s


def dot_nt(a: jax.Array, b: jax.Array) -> jax.Array:
  """a @ b.T with fp32 accumulation: [m, d] x [n, d] -> [m, n]."""
  return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def dot_nn(a: jax.Array, b: jax.Array) -> jax.Array:
  """a @ b with fp32 accumulation: [m, k] x [k, n] -> [m, n]."""
  return jax.lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def online_softmax_step(acc: jax.Array, m: jax.Array, l: jax.Array, s: jax.Array,
                        v: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """One key block of the online (flash) softmax: folds scores `s` [bq, bk] and values `v`
  [bk, d] into the running output `acc` [bq, d], row max `m` and row sum `l`.

  The statistics are `[bq]` vectors (the Triton kernels' layout) or `[bq, 1]` columns (the Mosaic
  kernels' scratch layout); the same ops either way. Returns the new (acc, m, l).
  """
  if m.ndim == 2:  # [bq, 1]
    m_new = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True))
    alpha = jnp.exp(m - m_new)
    p = jnp.exp(s - m_new)
    l = alpha * l + jnp.sum(p, axis=1, keepdims=True)
    return alpha * acc + dot_nn(p.astype(v.dtype), v), m_new, l
  m_new = jnp.maximum(m, jnp.max(s, axis=1))  # [bq]
  alpha = jnp.exp(m - m_new)
  p = jnp.exp(s - m_new[:, None])
  l = alpha * l + jnp.sum(p, axis=1)
  return alpha[:, None] * acc + dot_nn(p.astype(v.dtype), v), m_new, l


def dot_tn(a: jax.Array, b: jax.Array) -> jax.Array:
  """a.T @ b with fp32 accumulation: [k, m] x [k, n] -> [m, n]."""
  return jax.lax.dot_general(a, b, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)
