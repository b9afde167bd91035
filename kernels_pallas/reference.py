"""Plain `jnp` references for the Pallas kernels: attention (with ALiBi, segments, GQA) and RMSNorm.

These materialise the full [batch, heads, q_len, k_len] score matrix, so they are only for tests,
for short sequences and as the `backend="xla"` fallback. Softmax and norms run in fp32.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp


def attention_reference(q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool = True,
                        alibi_slopes: Optional[jax.Array] = None,
                        segment_ids: Optional[jax.Array] = None,
                        positions: Optional[jax.Array] = None,
                        sm_scale: Optional[float] = None) -> jax.Array:
  """Softmax attention computed the obvious way.

  Args:
    q: [batch, seq, heads, head_dim].
    k, v: [batch, seq, kv_heads, head_dim]; kv_heads divides heads (query head h reads kv head
      h // (heads // kv_heads)).
    causal: query i sees keys j <= i.
    alibi_slopes: [heads] fp32; adds -slope_h * (pos_i - pos_j) to the scores.
    segment_ids: [batch, seq] int; a query sees only keys with the same id.
    positions: [batch, seq] int positions for the ALiBi distance (default 0..seq-1).
    sm_scale: score scale (default head_dim ** -0.5).
  Returns:
    [batch, seq, heads, head_dim] in q's dtype.
  """
  b, s = q.shape[:2]
  bias = None
  if alibi_slopes is not None:
    pos = jnp.broadcast_to(jnp.arange(s), (b, s)) if positions is None else positions
    dist = (pos[:, :, None] - pos[:, None, :]).astype(jnp.float32)  # [b, q, k]
    bias = -alibi_slopes.astype(jnp.float32)[None, :, None, None] * dist[:, None]  # [b, h, q, k]
  mask = jnp.ones((b, s, s), bool)
  if causal:
    mask = mask & jnp.tril(jnp.ones((s, s), bool))[None]
  if segment_ids is not None:
    mask = mask & (segment_ids[:, :, None] == segment_ids[:, None, :])
  out = softmax_attention(q, k, v.astype(jnp.float32), mask, bias, sm_scale=sm_scale,
                          masked_value=-jnp.inf)
  return out.astype(q.dtype)


def softmax_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array,
                      bias: Optional[jax.Array] = None, *, kv_layout: str = "bshd",
                      sm_scale: Optional[float] = None,
                      masked_value: float = float(jnp.finfo(jnp.float32).min)) -> jax.Array:
  """The one jnp attention formula: GQA scores in fp32, bias, mask, softmax, weighted values.

  The model's XLA path (`baichuan_jax.model.attention.xla_attention`, with its cache layout and
  masks) and `attention_reference` (the kernels' test oracle) both call it.

  Args:
    q: [batch, q_len, heads, head_dim].
    k, v: [batch, k_len, kv_heads, head_dim] ("bshd"), or [batch, kv_heads, k_len, head_dim]
      ("bhsd", the KV cache's layout, read without a transpose); query head h reads kv head
      h // (heads // kv_heads).
    mask: bool [batch, q_len, k_len], true where a query may see a key.
    bias: fp32 [batch, heads, q_len, k_len] added to the scaled scores (ALiBi), or None.
    sm_scale: score scale (default head_dim ** -0.5).
    masked_value: score of a masked key (the model uses the fp32 minimum, so a row with no visible
      key, e.g. an empty cache slot's query, gives finite garbage instead of NaN).
  Returns:
    [batch, q_len, heads, head_dim] in v's dtype (the probabilities are cast to it).
  """
  kv_spec = "bkhd" if kv_layout == "bshd" else "bhkd"
  b, sq, h, d = q.shape
  kvh = k.shape[2] if kv_layout == "bshd" else k.shape[1]
  g = h // kvh
  scale = d ** -0.5 if sm_scale is None else sm_scale
  qg = q.reshape(b, sq, kvh, g, d)
  # [batch, kv_heads, groups, q_len, k_len]
  scores = jnp.einsum(f"bqhgd,{kv_spec}->bhgqk", qg, k, preferred_element_type=jnp.float32)
  scores = scores * scale
  if bias is not None:
    scores = scores + bias.reshape(b, kvh, g, sq, -1)
  scores = jnp.where(mask[:, None, None], scores, masked_value)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  # [batch, q_len, kv_heads, groups, head_dim]
  out = jnp.einsum(f"bhgqk,{kv_spec}->bqhgd", probs, v)
  return out.reshape(b, sq, h, d)


def rms_norm_reference(x: jax.Array, scale: jax.Array, eps: float = 1e-6) -> jax.Array:
  """RMSNorm in fp32: x / sqrt(mean(x^2) + eps) * scale.

  Args:
    x: [..., hidden].
    scale: [hidden].
    eps: added to the mean square.
  Returns:
    Same shape and dtype as x.
  """
  xf = x.astype(jnp.float32)
  y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
  return (y * scale.astype(jnp.float32)).astype(x.dtype)


def decode_attention_reference(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array,
                               lengths: jax.Array, *, starts: Optional[jax.Array] = None,
                               alibi_slopes: Optional[jax.Array] = None,
                               sm_scale: Optional[float] = None) -> jax.Array:
  """One query token per row against every slot of a KV cache, masked to [starts, lengths).

  Args:
    q: [batch, heads, head_dim].
    k_cache, v_cache: [batch, kv_heads, max_len, head_dim]; query head h reads kv head
      h // (heads // kv_heads).
    lengths: [batch] int: slots j < lengths[b] are filled.
    starts: [batch] int or None (0): slots j < starts[b] are left padding.
    alibi_slopes: [heads] fp32: adds -slope_h * ((lengths[b] - 1) - j).
    sm_scale: score scale (default head_dim ** -0.5).
  Returns:
    [batch, heads, head_dim] in q's dtype; rows with no filled slot are zeros.
  """
  b, h, d = q.shape
  kvh, max_len = k_cache.shape[1], k_cache.shape[2]
  g = h // kvh
  scale = d ** -0.5 if sm_scale is None else sm_scale
  starts = jnp.zeros((b,), jnp.int32) if starts is None else starts
  qg = q.reshape(b, kvh, g, d)
  scores = jnp.einsum("bhgd,bhkd->bhgk", qg, k_cache, preferred_element_type=jnp.float32) * scale
  j = jnp.arange(max_len)
  if alibi_slopes is not None:
    dist = (lengths[:, None] - 1 - j[None, :]).astype(jnp.float32)  # [b, k]
    slopes = alibi_slopes.astype(jnp.float32).reshape(kvh, g)
    scores = scores - slopes[None, :, :, None] * dist[:, None, None, :]
  valid = (j[None, :] >= starts[:, None]) & (j[None, :] < lengths[:, None])  # [b, k]
  scores = jnp.where(valid[:, None, None], scores, -jnp.inf)
  any_valid = jnp.any(valid, axis=1)[:, None, None, None]
  probs = jax.nn.softmax(jnp.where(any_valid, scores, 0.0), axis=-1)
  probs = jnp.where(valid[:, None, None], probs, 0.0)
  v = jnp.where(valid[:, None, :, None], v_cache.astype(jnp.float32), 0.0)
  out = jnp.einsum("bhgk,bhkd->bhgd", probs, v)
  out = jnp.where(any_valid, out, 0.0)
  return out.reshape(b, h, d).astype(q.dtype)


def rope_inv_freq(head_dim: int, theta: float) -> jax.Array:
  """RoPE inverse frequencies theta^(-2i/d), i = 0..d/2-1, [head_dim // 2] fp32."""
  return 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))


def rope_reference(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
  """Rotate-half RoPE (the HF LLaMA / Baichuan convention) in fp32, returned in x's dtype.

  Args:
    x: [batch, seq, heads, head_dim]; positions: [batch, seq] int; theta: the base.
  """
  d = x.shape[-1]
  angles = positions.astype(jnp.float32)[..., None] * rope_inv_freq(d, theta)  # [b, s, d/2]
  c, s = jnp.cos(angles)[:, :, None], jnp.sin(angles)[:, :, None]
  xf = x.astype(jnp.float32)
  x1, x2 = xf[..., : d // 2], xf[..., d // 2:]
  return jnp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1).astype(x.dtype)
