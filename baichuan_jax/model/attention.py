"""Attention math as pure functions: masks and the plain XLA (jnp) scaled-dot-product attention."""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from baichuan_jax.model.positions import alibi_bias


class AttnContext(NamedTuple):
  """Everything attention needs besides q/k/v, shared by all layers of one forward pass.

  Queries and keys carry three per-token coordinates: `idx` (slot in the row, for causality),
  `seg` (segment id; attention never crosses segments; 0 marks padding / empty cache slots) and
  `pos` (position inside the document, for RoPE and ALiBi distances).
  """
  q_pos: jax.Array  # [batch, q_len] int32
  q_seg: jax.Array  # [batch, q_len] int32
  q_idx: jax.Array  # [q_len] int32
  k_pos: jax.Array  # [batch, k_len] int32
  k_seg: jax.Array  # [batch, k_len] int32
  k_idx: jax.Array  # [k_len] int32
  cache_index: Optional[jax.Array] = None  # scalar int32 where new keys are written, or None


def attention_mask(ctx: AttnContext) -> jax.Array:
  """Boolean [batch, 1, q_len, k_len]: causal within the same segment."""
  causal = ctx.k_idx[None, :] <= ctx.q_idx[:, None]  # [q, k]
  same_seg = ctx.q_seg[:, :, None] == ctx.k_seg[:, None, :]  # [b, q, k]
  return (causal[None] & same_seg)[:, None]


def xla_attention(q: jax.Array, k: jax.Array, v: jax.Array, ctx: AttnContext,
                  alibi_slopes: Optional[jax.Array] = None, kv_layout: str = "bshd") -> jax.Array:
  """Plain softmax attention with GQA, masks from `ctx` and optional ALiBi; softmax in fp32.

  Args:
    q: [batch, q_len, heads, head_dim].
    k, v: [batch, k_len, kv_heads, head_dim] ("bshd"), or [batch, kv_heads, k_len, head_dim]
      ("bhsd", the KV cache's layout, read without a transpose).
    ctx: coordinates of queries and keys.
    alibi_slopes: [heads] or None.
    kv_layout: "bshd" or "bhsd".
  Returns:
    [batch, q_len, heads, head_dim] in q's dtype.
  """
  if kv_layout not in ("bshd", "bhsd"):
    raise ValueError(f"kv_layout={kv_layout!r} is invalid: allowed 'bshd', 'bhsd'")
  kv_spec = "bkhd" if kv_layout == "bshd" else "bhkd"
  b, sq, h, d = q.shape
  kvh = k.shape[2] if kv_layout == "bshd" else k.shape[1]
  g = h // kvh
  qg = q.reshape(b, sq, kvh, g, d)
  # [batch, kv_heads, groups, q_len, k_len]
  scores = jnp.einsum(f"bqhgd,{kv_spec}->bhgqk", qg, k, preferred_element_type=jnp.float32)
  scores = scores * (d ** -0.5)
  if alibi_slopes is not None:
    bias = alibi_bias(alibi_slopes, ctx.q_pos, ctx.k_pos)  # [b, h, q, k]
    scores = scores + bias.reshape(b, kvh, g, sq, -1)
  mask = attention_mask(ctx)[:, :, None]  # [b, 1, 1, q, k]
  scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  # [batch, q_len, kv_heads, groups, head_dim]
  out = jnp.einsum(f"bhgqk,{kv_spec}->bqhgd", probs, v)
  return out.reshape(b, sq, h, d)
