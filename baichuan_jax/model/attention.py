"""Attention math as pure functions: masks and the plain XLA (jnp) scaled-dot-product attention."""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from baichuan_jax.model.positions import alibi_bias
from kernels_pallas.reference import softmax_attention


class AttnContext(NamedTuple):
  """Everything attention needs besides q/k/v, shared by all layers of one forward pass.

  Queries and keys carry three per-token coordinates: `idx` (slot in the row, for causality),
  `seg` (segment id; attention never crosses segments; 0 marks padding / empty cache slots) and
  `pos` (position inside the document, for RoPE and ALiBi distances).
  """
  q_pos: jax.Array  # [batch, q_len] int32
  q_seg: jax.Array  # [batch, q_len] int32
  q_idx: jax.Array  # [q_len] int32, or [batch, q_len] when the cache has one index per row
  k_pos: jax.Array  # [batch, k_len] int32
  k_seg: jax.Array  # [batch, k_len] int32
  k_idx: jax.Array  # [k_len] int32
  # Where new keys are written: a scalar int32 (every row at the same slot), a [batch] int32
  # (one slot per row: continuous batching, where each row holds a request of its own length),
  # or None without a cache.
  cache_index: Optional[jax.Array] = None
  # Decode steps of the unrolled stack only (`layers.checked_decode_stack`): the span check ran
  # once for the whole stack, so each layer skips its own. (starts, lengths): every row passed,
  # the kernel reads these spans; (): some row failed, every layer takes the XLA path; None
  # (everything else): each layer decides for itself.
  decode_span: Optional[tuple] = None


def attention_mask(ctx: AttnContext) -> jax.Array:
  """Boolean [batch, 1, q_len, k_len]: causal within the same segment."""
  q_idx = ctx.q_idx if ctx.q_idx.ndim == 2 else ctx.q_idx[None]  # [b or 1, q]
  causal = ctx.k_idx[None, None, :] <= q_idx[:, :, None]  # [b or 1, q, k]
  same_seg = ctx.q_seg[:, :, None] == ctx.k_seg[:, None, :]  # [b, q, k]
  return (causal & same_seg)[:, None]


def write_cache(cache: jax.Array, new: jax.Array, index: jax.Array, axis: int) -> jax.Array:
  """Writes `new` into `cache` starting at `index` along `axis` (axis >= 1; axis 0 is the batch).

  Args:
    cache: [batch, ...] e.g. [batch, kv_heads, max_len, head_dim] keys or [batch, max_len] ids.
    new: like `cache` with `axis` of length q_len (cast to the cache's dtype).
    index: scalar int32 (the same slot for every row: one dynamic-update-slice) or [batch] int32
      (row b written at index[b]: a per-row update, batched by vmap into one scatter).
  Returns:
    The updated cache.
  """
  new = new.astype(cache.dtype)
  if index.ndim == 0:
    return jax.lax.dynamic_update_slice_in_dim(cache, new, index, axis)
  row = lambda c, n, i: jax.lax.dynamic_update_slice_in_dim(c, n, i, axis - 1)
  return jax.vmap(row)(cache, new, index)


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
  bias = None if alibi_slopes is None else alibi_bias(alibi_slopes, ctx.q_pos, ctx.k_pos)
  mask = attention_mask(ctx)[:, 0]  # [b, q, k]
  return softmax_attention(q, k, v, mask, bias, kv_layout=kv_layout)


def decode_span(ctx: AttnContext, alibi: bool) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The filled cache slots each row's single decode query attends to, as one span per row.

  For one query token per row (q_len == 1) the XLA mask attends, in row b, to the slots
  j <= index[b] whose segment id equals the query's. `kernels_pallas.decode_attention` attends
  to the span [starts[b], lengths[b]) instead, with ALiBi distance (lengths[b] - 1) - j. The two
  agree exactly when those slots are contiguous and end at the query's slot (left padding before
  them is fine: `infer.generate` writes segment 0 there, `infer.engine` segment 0 after a row's
  request), and, with ALiBi, when positions advance by one per slot over the span.

  Returns:
    starts, lengths: [batch] int32. A row whose query has segment 0 (an idle engine slot, whose
      output nobody reads) gets the empty span [0, 0) and reads no slot.
    ok: scalar bool, True when every other row satisfies the conditions above (else the caller
      keeps the XLA path for the whole batch).
  """
  b, L = ctx.k_seg.shape
  q_seg = ctx.q_seg[:, 0]
  index = jnp.broadcast_to(ctx.cache_index, (b,)).astype(jnp.int32)
  slot = jnp.arange(L, dtype=jnp.int32)
  live = (ctx.k_seg == q_seg[:, None]) & (slot[None] <= index[:, None])  # the XLA mask's keys
  starts = jnp.argmax(live, axis=1).astype(jnp.int32)
  lengths = index + 1
  ok = (jnp.sum(live, axis=1) == lengths - starts) & (lengths <= L) & live[jnp.arange(b), starts]
  if alibi:
    offset = (ctx.q_pos[:, 0] - index)[:, None]
    ok &= jnp.all(~live | (ctx.k_pos - slot[None] == offset), axis=1)
  idle = q_seg == 0
  return (jnp.where(idle, 0, starts), jnp.where(idle, 0, lengths), jnp.all(ok | idle))
