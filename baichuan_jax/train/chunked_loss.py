"""Operator-split output layer + loss: cross-entropy and max-z without whole fp32 logits.

At vocab 125,696 the fp32 logits of one 4096-token sequence take 2 GB, and autodiff of
`losses.lm_loss(head_logits(h, W))` keeps them (and their softmax) for the backward pass. Baichuan 2
split this operator to cut peak memory; here the final hidden states are cut into sequence chunks
and the head into vocabulary chunks. A `lax.scan` over sequence chunks, with an inner scan over
vocabulary chunks, keeps online log-sum-exp / max / target-logit statistics, so at most one
[batch, seq_chunk, vocab_chunk] fp32 block is alive. A `custom_vjp` saves only the per-token
log-sum-exp, max logit and tie count and recomputes each block in the backward pass, producing
d(hidden) and d(kernel) chunk by chunk. NormHead divides each block's fp32 logits by the
column norms of the fp32 master kernel (only the [vocab] norms are materialised) and d(kernel) accumulates in place in one
fp32 buffer, so at vocab 125,696 no normalised, cast or transposed copy of the 2 GB head exists.

Under tensor parallelism the head is split over `vocab_shards` devices in contiguous blocks; the
kernel is viewed as [hidden, vocab_shards, vocab_chunks, chunk] so the scanned axis is never the
sharded one and every device walks its own block.
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp

from baichuan_jax import losses
from baichuan_jax.model import head_logits
from baichuan_jax.model.layers import head_column_norms


def column_scale(kernel: jax.Array, norm_head: bool) -> jax.Array:
  """[vocab] fp32 divisor of each head column: NormHead's max(||column||, 1e-12), else 1.

  The same divisors as `baichuan_jax.model.head_logits` (F.normalize semantics); only this vector
  is materialised, never a normalised kernel copy.
  """
  if not norm_head:
    return jnp.ones((kernel.shape[1],), jnp.float32)
  return head_column_norms(kernel)


def _block_weight(k, scale, j, dtype):
  """Head block j and its NormHead divisors: ([embed, shards, vchunk] in the compute dtype,
  [shards, vchunk] fp32).

  k: [embed, shards, vocab_chunks, vchunk] fp32 master kernel (a free reshape of [embed, vocab]);
  scale: [shards, vocab_chunks, vchunk]. Slicing the unsharded chunk axis keeps every device on
  its own vocabulary block under tensor parallelism. As in `head_logits`, the divisors apply to
  the block's fp32 logits, not to the weights.
  """
  k_j = jax.lax.dynamic_index_in_dim(k, j, axis=2, keepdims=False)
  s_j = jax.lax.dynamic_index_in_dim(scale, j, axis=1, keepdims=False)
  return k_j.astype(dtype), s_j


def _block_logits(h, w, s):
  # [batch, chunk, embed] x [embed, shards, vchunk] -> [batch, chunk, shards, vchunk], fp32 accum,
  # divided by the [shards, vchunk] column divisors.
  return jnp.einsum("bce,esv->bcsv", h, w, preferred_element_type=jnp.float32) / s


def _vocab_ids(j, shards, vchunk, local_vocab):
  """Vocabulary ids [shards, vchunk] of vocab block j (block j of every device's shard)."""
  s = jnp.arange(shards, dtype=jnp.int32)[:, None] * local_vocab
  return s + j * vchunk + jnp.arange(vchunk, dtype=jnp.int32)[None, :]


def _forward_stats(h, k, scale, targets, local_vocab):
  """Per-token log-sum-exp, max logit, number of max ties and target logit.

  Args:
    h: [seq_chunks, batch, chunk, embed] hidden states (compute dtype).
    k: [embed, shards, vocab_chunks, vchunk] head kernel (fp32 master).
    scale: [shards, vocab_chunks, vchunk] column divisors (`column_scale`).
    targets: [seq_chunks, batch, chunk] int32.
    local_vocab: vocabulary ids per shard.
  Returns:
    lse, zmax, ties, target_logit: each [seq_chunks, batch, chunk] fp32.
  """
  _, shards, n_v, vchunk = k.shape

  def seq_chunk(_, xs):
    h_i, t_i = xs
    neg = jnp.full(t_i.shape, -jnp.inf, jnp.float32)
    zero = jnp.zeros(t_i.shape, jnp.float32)

    def vocab_chunk(carry, j):
      m, s, cnt, tgt = carry
      logits = _block_logits(h_i, *_block_weight(k, scale, j, h_i.dtype))
      m_j = jnp.max(logits, axis=(-2, -1))
      s_j = jnp.sum(jnp.exp(logits - m_j[..., None, None]), axis=(-2, -1))
      c_j = jnp.sum((logits == m_j[..., None, None]).astype(jnp.float32), axis=(-2, -1))
      hit = _vocab_ids(j, shards, vchunk, local_vocab) == t_i[..., None, None]
      tgt = tgt + jnp.sum(jnp.where(hit, logits, 0.0), axis=(-2, -1))
      m_new = jnp.maximum(m, m_j)
      # Online log-sum-exp rescaling (m starts at -inf: exp(-inf - finite) = 0, no NaN).
      s = s * jnp.exp(m - m_new) + s_j * jnp.exp(m_j - m_new)
      cnt = cnt * (m == m_new) + c_j * (m_j == m_new)
      return (m_new, s, cnt, tgt), None

    (m, s, cnt, tgt), _ = jax.lax.scan(vocab_chunk, (neg, zero, zero, zero),
                                       jnp.arange(n_v, dtype=jnp.int32))
    return None, (m + jnp.log(s), m, cnt, tgt)

  _, (lse, zmax, ties, tgt) = jax.lax.scan(seq_chunk, None, (h, targets))
  return lse, zmax, ties, tgt


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _split_loss_sums(h, k, scale, targets, mask, local_vocab):
  """(sum mask * (lse - target_logit), sum mask * zmax^2) over all tokens; see `_forward_stats`."""
  lse, zmax, _, tgt = _forward_stats(h, k, scale, targets, local_vocab)
  return jnp.sum(mask * (lse - tgt)), jnp.sum(mask * zmax * zmax)


def _split_loss_fwd(h, k, scale, targets, mask, local_vocab):
  lse, zmax, ties, tgt = _forward_stats(h, k, scale, targets, local_vocab)
  out = (jnp.sum(mask * (lse - tgt)), jnp.sum(mask * zmax * zmax))
  return out, (h, k, scale, targets, mask, lse, zmax, ties)


def _split_loss_bwd(local_vocab, res, cts):
  h, k, scale, targets, mask, lse, zmax, ties = res
  g_ce, g_z = cts
  _, shards, n_v, vchunk = k.shape

  def seq_chunk(dk_acc, xs):
    h_i, t_i, m_i, lse_i, z_i, ties_i = xs
    ce_scale = (g_ce * m_i)[..., None, None]
    # d(sum m z^2)/dz = 2 m z, shared equally between tied maxima (as jnp.max's gradient does).
    z_scale = (g_z * 2.0 * m_i * z_i / ties_i)[..., None, None]

    def vocab_chunk(carry, j):
      dh, dk_acc = carry
      w_j, s_j = _block_weight(k, scale, j, h_i.dtype)
      logits = _block_logits(h_i, w_j, s_j)
      hit = _vocab_ids(j, shards, vchunk, local_vocab) == t_i[..., None, None]
      probs = jnp.exp(logits - lse_i[..., None, None])
      # d(lse - target)/dlogits = softmax - onehot(target); d(max)/dlogits = onehot(argmax).
      dlogits = ce_scale * (probs - hit) + z_scale * (logits == z_i[..., None, None])
      # logits = (h . k) / s  =>  d(h . k) = dlogits / s.
      dl = (dlogits / s_j).astype(h_i.dtype)
      # [batch, chunk, shards, vchunk] x [embed, shards, vchunk] -> [batch, chunk, embed]
      dh = dh + jnp.einsum("bcsv,esv->bce", dl, w_j, preferred_element_type=jnp.float32)
      # [batch, chunk, embed] x [batch, chunk, shards, vchunk] -> [embed, shards, vchunk]
      dk_j = jnp.einsum("bce,bcsv->esv", h_i, dl, preferred_element_type=jnp.float32)
      # Accumulate dk in place into block j of the one fp32 gradient buffer, which is also the
      # returned d(kernel).
      old = jax.lax.dynamic_index_in_dim(dk_acc, j, axis=2, keepdims=True)
      dk_acc = jax.lax.dynamic_update_index_in_dim(dk_acc, old + dk_j[:, :, None], j, axis=2)
      return (dh, dk_acc), None

    (dh, dk_acc), _ = jax.lax.scan(vocab_chunk, (jnp.zeros(h_i.shape, jnp.float32), dk_acc),
                                   jnp.arange(n_v, dtype=jnp.int32))
    return dk_acc, dh.astype(h.dtype)

  # dk in fp32 (never rounded to the compute dtype).
  dk, dh = jax.lax.scan(seq_chunk, jnp.zeros(k.shape, jnp.float32),
                        (h, targets, mask, lse, zmax, ties))
  # ds = -sum_e(dw * k) / s^2 = -sum_e(dk * k) / s  (per vocabulary column).
  dscale = -jnp.sum(dk * k.astype(jnp.float32), axis=0) / scale
  return dh, dk.astype(k.dtype), dscale, None, None


_split_loss_sums.defvjp(_split_loss_fwd, _split_loss_bwd)


def chunked_lm_loss(hidden: jax.Array, kernel: jax.Array, targets: jax.Array,
                    mask: Optional[jax.Array] = None, *, norm_head: bool,
                    z_loss_weight: float = 0.0, chunk_size: int = 1024, vocab_chunks: int = 1,
                    vocab_shards: int = 1) -> dict[str, jax.Array]:
  """`losses.lm_loss(head_logits(hidden, kernel, norm_head), ...)` computed chunk by chunk.

  Args:
    hidden: [batch, seq, embed] final-norm hidden states (`model.apply(..., return_hidden=True)`).
    kernel: [embed, vocab] head weight (`params["lm_head"]`, fp32 master).
    targets: [batch, seq] int token ids.
    mask: [batch, seq] 1 where the token counts (None: all).
    norm_head: Baichuan 2 NormHead (normalise vocabulary columns first).
    z_loss_weight: max-z loss weight (Baichuan 2: 2e-4).
    chunk_size: sequence positions per chunk (a chunk covers batch x chunk_size tokens); the
      sequence is padded with masked positions to a multiple. 0 computes the whole logits.
    vocab_chunks: vocabulary blocks per shard, walked with an online log-sum-exp.
    vocab_shards: how many contiguous blocks the vocab is split into across devices (tensor
      parallel size); only changes the walk order, never the result.
  Returns:
    dict like `losses.lm_loss`: loss, ce, z_loss (unweighted mean max-logit^2), tokens.
  """
  b, s, e = hidden.shape
  vocab = kernel.shape[1]
  if mask is None:
    mask = jnp.ones((b, s), jnp.float32)
  if chunk_size <= 0:
    return losses.lm_loss(head_logits(hidden, kernel, norm_head), targets, mask, z_loss_weight)
  if vocab % (vocab_shards * vocab_chunks):
    raise ValueError(f"vocab_shards*vocab_chunks={vocab_shards}*{vocab_chunks} must divide the "
                     f"vocabulary size {vocab}")
  mask = mask.astype(jnp.float32)
  targets = targets.astype(jnp.int32)
  chunk = min(chunk_size, s)
  pad = -s % chunk
  if pad:
    hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
    targets = jnp.pad(targets, ((0, 0), (0, pad)))
    mask = jnp.pad(mask, ((0, 0), (0, pad)))
  n_s = (s + pad) // chunk

  def to_chunks(x):  # [batch, seq, ...] -> [seq_chunks, batch, chunk, ...]
    return jnp.moveaxis(x.reshape(b, n_s, chunk, *x.shape[2:]), 1, 0)

  local_vocab = vocab // vocab_shards
  vchunk = local_vocab // vocab_chunks
  # Free reshapes: id = shard * local_vocab + chunk * vchunk + k.
  view = (vocab_shards, vocab_chunks, vchunk)
  k = kernel.reshape(e, *view)
  scale = column_scale(kernel, norm_head).reshape(view)
  ce_sum, z_sum = _split_loss_sums(to_chunks(hidden), k, scale, to_chunks(targets),
                                   to_chunks(mask), local_vocab)
  n = jnp.sum(mask)
  denom = jnp.maximum(n, 1.0)
  ce, z = ce_sum / denom, z_sum / denom
  return {"loss": ce + z_loss_weight * z, "ce": ce, "z_loss": z, "tokens": n}
