"""Training losses as pure functions: masked token cross-entropy and Baichuan 2's max-z loss."""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp


def cross_entropy(logits: jax.Array, targets: jax.Array,
                  mask: Optional[jax.Array] = None) -> tuple[jax.Array, jax.Array]:
  """Summed token cross-entropy and the number of counted tokens.

  Args:
    logits: [batch, seq, vocab] (any float dtype; computed in fp32).
    targets: [batch, seq] int token ids.
    mask: [batch, seq] 1 where the token counts, or None for all.
  Returns:
    (sum of -log p(target) over counted tokens, count), both fp32 scalars.
  """
  logits = logits.astype(jnp.float32)
  lse = jax.nn.logsumexp(logits, axis=-1)
  target_logit = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
  nll = lse - target_logit
  m = jnp.ones_like(nll) if mask is None else mask.astype(jnp.float32)
  return jnp.sum(nll * m), jnp.sum(m)


def max_z_loss(logits: jax.Array, mask: Optional[jax.Array] = None) -> tuple[jax.Array, jax.Array]:
  """Summed squared max logit (Baichuan 2's max-z term, before weighting) and the count.

  z = max over the vocabulary of the logits at each position; the loss term is
  z_loss_weight * mean(z^2) over counted positions.
  """
  z = jnp.max(logits.astype(jnp.float32), axis=-1)
  m = jnp.ones_like(z) if mask is None else mask.astype(jnp.float32)
  return jnp.sum(z * z * m), jnp.sum(m)


def lm_loss(logits: jax.Array, targets: jax.Array, mask: Optional[jax.Array] = None,
            z_loss_weight: float = 0.0) -> dict[str, jax.Array]:
  """Mean next-token loss with its parts for logging.

  Returns:
    dict with `loss` (ce + z_loss_weight * z_loss, what is differentiated), `ce` (mean cross-entropy),
    `z_loss` (mean max-logit^2, unweighted) and `tokens` (count).
  """
  ce_sum, n = cross_entropy(logits, targets, mask)
  z_sum, _ = max_z_loss(logits, mask)
  denom = jnp.maximum(n, 1.0)
  ce, z = ce_sum / denom, z_sum / denom
  return {"loss": ce + z_loss_weight * z, "ce": ce, "z_loss": z, "tokens": n}
