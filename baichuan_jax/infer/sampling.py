"""Next-token selection as pure functions: repetition penalty, temperature, top-k, top-p, sampling.

The order and semantics follow Hugging Face `generate` with the Baichuan generation config
(`RepetitionPenaltyLogitsProcessor`, then the `Temperature`, `TopK` and `TopP` warpers):

* repetition penalty p: for every token already present in the sequence, a positive logit is
  divided by p (computed as a multiply by 1 / p: within 1 ulp of HF, and bit-identical in the
  Pallas pick and the XLA path; `kernels_pallas.topk.penalise`) and a negative one multiplied by p;
* temperature T: logits / T; T == 0 means greedy (argmax of the penalised logits);
* top-k: keep the logits >= the k-th largest (ties at the boundary are kept); k == 0 disables it;
* top-p: sort ascending, drop the tokens whose cumulative probability is <= 1 - p (the most likely
  token always stays); p == 1 disables it.

Every parameter is per row ([batch] arrays), so requests with different settings share one batch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

NEG_INF = -jnp.inf


def apply_repetition_penalty(logits: jax.Array, present: jax.Array, penalty: jax.Array) -> jax.Array:
  """HF repetition penalty.

  Args:
    logits: [batch, vocab] fp32.
    present: [batch, vocab] bool, tokens already in the row (prompt and generated).
    penalty: [batch] fp32 (1.0 = off).
  Returns:
    [batch, vocab] fp32.
  """
  from kernels_pallas.topk import penalise  # pylint: disable=import-outside-toplevel
  return penalise(logits, present, penalty[:, None])


def top_k_top_p_filter(logits: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
  """Sets the logits outside the top-k / nucleus of each row to -inf.

  Args:
    logits: [batch, vocab] fp32 (already divided by the temperature).
    top_k: [batch] int32, 0 = off.
    top_p: [batch] fp32 in (0, 1], 1 = off.
  Returns:
    [batch, vocab] fp32.
  """
  vocab = logits.shape[-1]
  desc = -jnp.sort(-logits, axis=-1)  # [batch, vocab] largest first
  k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
  kth = jnp.take_along_axis(desc, (k - 1)[:, None], axis=-1)  # [batch, 1]
  logits = jnp.where(logits < kth, NEG_INF, logits)
  # Nucleus on the top-k-filtered distribution, as HF applies TopP after TopK.
  asc = jnp.sort(logits, axis=-1)  # [batch, vocab] smallest first
  cum = jnp.cumsum(jax.nn.softmax(asc, axis=-1), axis=-1)
  drop = cum <= (1.0 - top_p)[:, None]
  drop = drop.at[:, -1].set(False)  # keep at least the most likely token
  # The largest dropped logit is the threshold: everything at or below it goes.
  n_drop = jnp.sum(drop, axis=-1)  # [batch]
  threshold = jnp.take_along_axis(asc, jnp.maximum(n_drop - 1, 0)[:, None], axis=-1)
  nucleus_off = (top_p >= 1.0) | (n_drop == 0)
  return jnp.where(nucleus_off[:, None] | (logits > threshold), logits, NEG_INF)


# Candidates the kernel pick takes per row (static): rows sampling with 1 <= top_k < this (and no
# top-p) are drawn from them; Baichuan 2's generation config uses top_k = 5.
KERNEL_TOP_K = 16


def next_token(logits: jax.Array, present: jax.Array, keys: jax.Array, temperature: jax.Array,
               top_k: jax.Array, top_p: jax.Array, repetition_penalty: jax.Array,
               do_sample: bool, use_kernels: bool = False) -> jax.Array:
  """Chooses one token per row.

  Args:
    logits: [batch, vocab] fp32 next-token logits.
    present: [batch, vocab] bool tokens seen so far (for the repetition penalty).
    keys: [batch] PRNG keys (one per row, so a row's samples do not depend on its batch mates).
    temperature: [batch] fp32; 0 = greedy.
    top_k, top_p, repetition_penalty: [batch] (see module doc).
    do_sample: static; False compiles the greedy path only.
    use_kernels: static; True picks with the Pallas one-pass kernels (`kernels_pallas.top_k`,
      the repetition penalty applied inside), with the same tokens (see `_next_token_kernels`).
  Returns:
    [batch] int32 token ids.
  """
  if use_kernels:
    return _next_token_kernels(logits, present, keys, temperature, top_k, top_p,
                               repetition_penalty, do_sample)
  logits = apply_repetition_penalty(logits, present, repetition_penalty)
  greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  if not do_sample:
    return greedy
  t = jnp.where(temperature > 0, temperature, 1.0)[:, None]
  filtered = top_k_top_p_filter(logits / t, top_k, top_p)
  sampled = jax.vmap(jax.random.categorical)(keys, filtered).astype(jnp.int32)
  return jnp.where(temperature > 0, sampled, greedy)


def _next_token_kernels(logits, present, keys, temperature, top_k, top_p, repetition_penalty,
                        do_sample):
  """`next_token` through `kernels_pallas.top_k`: one pass over the logits, no [batch, vocab]
  penalised copy and no full-vocabulary sort.

  Greedy: the first maximum of the penalised logits (`topk_argmax`, as `jnp.argmax`). Sampling:
  the kernel returns each row's top KERNEL_TOP_K penalised logits and their indices. A row with
  temperature T > 0, 1 <= top_k < KERNEL_TOP_K and top_p == 1 keeps the candidates c / T >= the
  k-th largest, the set the full path keeps, whenever the last candidate is strictly below that
  threshold (all ties at the boundary are then among the candidates), and draws
  argmax(kept + Gumbel noise) with the noise the full path's `jax.random.categorical` draws at
  those vocabulary indices (lowest index among equal maxima, as `jnp.argmax`): the same token.
  If any sampling row falls outside that (top-p, top_k off or >= KERNEL_TOP_K, boundary ties
  past the candidates), the batch takes the full-vocabulary path (`lax.cond`, one branch runs).
  """
  from kernels_pallas import top_k as kernel_top_k  # pylint: disable=import-outside-toplevel
  from kernels_pallas import topk_argmax  # pylint: disable=import-outside-toplevel
  if not do_sample:
    return topk_argmax(logits, present=present, penalty=repetition_penalty)
  b, vocab = logits.shape
  kc = min(KERNEL_TOP_K, vocab)
  vals, idx = kernel_top_k(logits, kc, present=present, penalty=repetition_penalty)
  greedy = idx[:, 0]
  t = jnp.where(temperature > 0, temperature, 1.0)[:, None]
  cand = vals / t  # [batch, kc], largest first
  kth = jnp.take_along_axis(cand, jnp.clip(top_k - 1, 0, kc - 1)[:, None], axis=1)  # [batch, 1]
  covered = (top_k >= 1) & (top_k < kc) & (cand[:, -1] < kth[:, 0]) & (top_p >= 1.0)
  exact = jnp.all(covered | (temperature <= 0))

  def from_candidates():
    kept = jnp.where(cand >= kth, cand, NEG_INF)
    noise = jax.vmap(lambda key, i: jax.random.gumbel(key, (vocab,), jnp.float32)[i])(keys, idx)
    z = kept + noise
    top = jnp.max(z, axis=1, keepdims=True)
    tok = jnp.min(jnp.where(z == top, idx, vocab), axis=1).astype(jnp.int32)
    return jnp.where(temperature > 0, tok, greedy)

  def full_vocabulary():
    return next_token(logits, present, keys, temperature, top_k, top_p, repetition_penalty,
                      True)

  return jax.lax.cond(exact, from_candidates, full_vocabulary)
