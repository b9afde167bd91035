"""PPO math for RLHF as pure functions: KL-shaped rewards, GAE, clipped losses, schedules.

Conventions: per-token arrays are over the response only, [batch, resp_len], right-padded with
`mask` = 1 on generated tokens (a contiguous prefix of each row). `logp[b, t]` is the log-probability
of response token t under a policy given everything before it; `values[b, t]` is the critic's value
of the state in which token t is chosen. Baichuan 2 publishes clip 0.1 and a KL coefficient from 0.2
down to 0.005; the shape of that decay, the discount (1.0), GAE lambda (0.95) and the value clip (0.2)
are not published and follow common RLHF practice (Ziegler et al. 2019; InstructGPT).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

KL_SCHEDULES = ("exponential", "linear", "cosine", "constant")


def kl_coefficient(step, total_steps: int, start: float = 0.2, end: float = 0.005,
                   schedule: str = "exponential"):
  """KL-penalty coefficient at `step` of `total_steps` (start at step 0, end at the last step).

  `exponential` decays geometrically (equal ratios per step: 0.2 -> 0.005 is a 40x fall, which a
  linear decay would spend almost entirely above 0.02); `linear` and `cosine` interpolate directly.
  Works on Python numbers and traced scalars.
  """
  if schedule not in KL_SCHEDULES:
    raise ValueError(f"kl schedule={schedule!r} is invalid; allowed: {', '.join(KL_SCHEDULES)}")
  if schedule == "constant" or total_steps <= 1:
    return start + 0.0 * step
  frac = jnp.clip(jnp.asarray(step, jnp.float32) / (total_steps - 1), 0.0, 1.0)
  if schedule == "exponential":
    return start * (end / start) ** frac
  if schedule == "linear":
    return start + (end - start) * frac
  return end + 0.5 * (start - end) * (1.0 + jnp.cos(math.pi * frac))


def masked_mean(x: jax.Array, mask: jax.Array, axis=None) -> jax.Array:
  """Mean of x over positions where mask is 1 (0 when there are none)."""
  m = mask.astype(jnp.float32)
  return jnp.sum(x * m, axis=axis) / jnp.maximum(jnp.sum(m, axis=axis), 1.0)


def whiten(x: jax.Array, mask: jax.Array, shift_mean: bool = True) -> jax.Array:
  """(x - mean) / std over masked positions; with shift_mean=False the mean is added back."""
  mean = masked_mean(x, mask)
  var = masked_mean((x - mean) ** 2, mask)
  out = (x - mean) * jax.lax.rsqrt(var + 1e-8)
  return out if shift_mean else out + mean


def token_logprobs(logits: jax.Array, tokens: jax.Array) -> jax.Array:
  """log p(tokens) under logits in fp32. logits [..., V], tokens [...] -> [...]."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return jnp.take_along_axis(logp, tokens[..., None].astype(jnp.int32), axis=-1)[..., 0]


def entropy(logits: jax.Array) -> jax.Array:
  """Entropy of the categorical distribution in fp32. logits [..., V] -> [...]."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return -jnp.sum(jnp.exp(logp) * logp, axis=-1)


def shaped_rewards(score: jax.Array, logp: jax.Array, ref_logp: jax.Array, mask: jax.Array,
                   kl_coef) -> tuple[jax.Array, jax.Array]:
  """Per-token rewards: -kl_coef * KL estimate at every token, plus the score at the last token.

  Args:
    score: [batch] reward-model score of each full response.
    logp, ref_logp: [batch, resp] log-probabilities of the response under actor / reference.
    mask: [batch, resp] 1 on response tokens.
    kl_coef: scalar.
  Returns:
    (rewards [batch, resp], per-token KL estimate logp - ref_logp [batch, resp]), both 0 off-mask.
  """
  m = mask.astype(jnp.float32)
  kl = (logp - ref_logp) * m
  last = jnp.maximum(jnp.sum(mask, axis=1) - 1, 0)  # [batch]
  at_last = jax.nn.one_hot(last, mask.shape[1], dtype=jnp.float32) * m
  return -kl_coef * kl + score[:, None] * at_last, kl


def gae(rewards: jax.Array, values: jax.Array, mask: jax.Array, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[jax.Array, jax.Array]:
  """Generalised advantage estimation (Schulman et al., 2016) over each row's response.

  delta_t = r_t + gamma * V_{t+1} - V_t, A_t = delta_t + gamma * lam * A_{t+1}, with V and A taken as
  0 past the last response token (the episode ends there).

  Args:
    rewards, values: [batch, resp] fp32.
    mask: [batch, resp] 1 on response tokens (a contiguous prefix per row).
  Returns:
    (advantages, returns = advantages + values), [batch, resp], 0 off-mask.
  """
  m = mask.astype(jnp.float32)
  r, v = rewards * m, values * m
  next_v = jnp.concatenate([v[:, 1:], jnp.zeros_like(v[:, :1])], axis=1)
  next_m = jnp.concatenate([m[:, 1:], jnp.zeros_like(m[:, :1])], axis=1)
  deltas = r + gamma * next_v * next_m - v

  def step(carry, xs):
    delta, nm = xs
    adv = delta + gamma * lam * nm * carry
    return adv, adv

  _, adv_rev = jax.lax.scan(step, jnp.zeros(r.shape[0], jnp.float32),
                            (deltas.T[::-1], next_m.T[::-1]))
  adv = adv_rev[::-1].T * m
  return adv, (adv + v) * m


def policy_loss(logp: jax.Array, old_logp: jax.Array, advantages: jax.Array, mask: jax.Array,
                clip: float = 0.1) -> dict[str, jax.Array]:
  """PPO clipped surrogate objective (to minimise).

  Args:
    logp: [batch, resp] current policy log-probs; old_logp: the same at rollout time.
    advantages: [batch, resp] (usually whitened).
    mask: [batch, resp].
    clip: ratio clip epsilon (Baichuan 2: 0.1).
  Returns:
    dict: `policy_loss`, `clip_fraction` (share of tokens where the clipped term is the active one),
    `approx_kl` (mean 0.5 * (logp - old_logp)^2).
  """
  log_ratio = logp - old_logp
  ratio = jnp.exp(log_ratio)
  unclipped = -advantages * ratio
  clipped = -advantages * jnp.clip(ratio, 1.0 - clip, 1.0 + clip)
  loss = masked_mean(jnp.maximum(unclipped, clipped), mask)
  clip_frac = masked_mean((clipped > unclipped).astype(jnp.float32), mask)
  return {"policy_loss": loss, "clip_fraction": clip_frac,
          "approx_kl": masked_mean(0.5 * log_ratio ** 2, mask)}


def value_loss(values: jax.Array, old_values: jax.Array, returns: jax.Array, mask: jax.Array,
               clip: float = 0.2) -> dict[str, jax.Array]:
  """Clipped value loss 0.5 * max((V - R)^2, (V_clipped - R)^2), V_clipped within old +- clip.

  Returns:
    dict: `value_loss`, `value_clip_fraction`.
  """
  v_clipped = old_values + jnp.clip(values - old_values, -clip, clip)
  l1 = (values - returns) ** 2
  l2 = (v_clipped - returns) ** 2
  return {"value_loss": 0.5 * masked_mean(jnp.maximum(l1, l2), mask),
          "value_clip_fraction": masked_mean((l2 > l1).astype(jnp.float32), mask)}
