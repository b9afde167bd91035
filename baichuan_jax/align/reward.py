"""Reward model and critic: the Baichuan backbone plus a scalar head, and the pairwise ranking loss.

Parameters are `{"backbone": <model params without lm_head>, "head": {"kernel": [E], "bias": []}}`.
The reward of a sequence is the head applied to the final-norm hidden state of its last real token
(InstructGPT); the critic uses the same head at every position as a per-token value estimate. The
backbone's unused output head is dropped so that it gets no optimizer state; a zero placeholder is
passed to the model instead, and XLA removes it because nothing reads it.
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
import ml_collections

from baichuan_jax.model import BaichuanLM, init_params

Params = dict[str, Any]


def init_reward_params(cfg: ml_collections.ConfigDict, rng: jax.Array,
                       backbone: Optional[Params] = None) -> Params:
  """Reward-model / critic parameters, from a pretrained backbone when given.

  Args:
    cfg: model config.
    rng: PRNG key (backbone init when `backbone` is None, and the head).
    backbone: language-model parameters to start from (its lm_head is dropped).
  Returns:
    {"backbone": params without "lm_head", "head": {"kernel": [hidden] fp32, "bias": [] fp32}}.
  """
  k_body, k_head = jax.random.split(rng)
  if backbone is None:
    backbone = init_params(cfg, k_body)
  body = {k: v for k, v in backbone.items() if k != "lm_head"}
  # Small head init (std 1/sqrt(E) / 10) keeps initial rewards near 0 so the first losses are ~log 2.
  kernel = jax.random.normal(k_head, (cfg.hidden_size,), jnp.float32) / (10.0 * cfg.hidden_size ** 0.5)
  return {"backbone": body, "head": {"kernel": kernel, "bias": jnp.zeros((), jnp.float32)}}


def _hidden(cfg, params, tokens, mask, positions=None):
  body = dict(params["backbone"])
  if "lm_head" not in body:
    body["lm_head"] = jnp.zeros((cfg.hidden_size, cfg.vocab_size), body["embed_tokens"].dtype)
  # Padding gets segment 0, so real tokens never attend to it.
  return BaichuanLM(cfg).apply({"params": body}, tokens, positions=positions,
                               segment_ids=mask.astype(jnp.int32), return_hidden=True)


def token_values(cfg: ml_collections.ConfigDict, params: Params, tokens: jax.Array,
                 mask: jax.Array, positions: Optional[jax.Array] = None) -> jax.Array:
  """Scalar head at every position (the critic's values).

  Args:
    tokens: [batch, seq] int32 (padding anywhere, marked by mask).
    mask: [batch, seq] 1 on real tokens.
    positions: [batch, seq] token positions (default 0..seq-1; needed for left padding).
  Returns:
    [batch, seq] fp32.
  """
  h = _hidden(cfg, params, tokens, mask, positions).astype(jnp.float32)
  # [batch, seq, embed] x [embed] -> [batch, seq]
  return jnp.einsum("bse,e->bs", h, params["head"]["kernel"]) + params["head"]["bias"]


def sequence_rewards(cfg: ml_collections.ConfigDict, params: Params, tokens: jax.Array,
                     mask: jax.Array) -> jax.Array:
  """Reward of each sequence, read at its last real token.

  Args:
    tokens: [batch, seq] int32, right-padded.
    mask: [batch, seq] 1 on real tokens (each row has at least one).
  Returns:
    [batch] fp32.
  """
  h = _hidden(cfg, params, tokens, mask)
  last = jnp.maximum(jnp.sum(mask, axis=1) - 1, 0)  # [batch]
  h_last = jnp.take_along_axis(h, last[:, None, None], axis=1)[:, 0].astype(jnp.float32)
  # [batch, embed] x [embed] -> [batch]
  return jnp.einsum("be,e->b", h_last, params["head"]["kernel"]) + params["head"]["bias"]


def pairwise_loss(r_chosen: jax.Array, r_rejected: jax.Array) -> dict[str, jax.Array]:
  """InstructGPT ranking loss and metrics.

  Args:
    r_chosen, r_rejected: [batch] rewards.
  Returns:
    dict: `loss` = mean(-log sigmoid(r_c - r_r)), `accuracy` = fraction with r_c > r_r (a tie
    counts one half), `margin` = mean(r_c - r_r).
  """
  diff = r_chosen.astype(jnp.float32) - r_rejected.astype(jnp.float32)
  loss = jnp.mean(jax.nn.softplus(-diff))  # -log sigmoid(d) = softplus(-d), stable for large |d|
  acc = jnp.mean((diff > 0).astype(jnp.float32) + 0.5 * (diff == 0).astype(jnp.float32))
  return {"loss": loss, "accuracy": acc, "margin": jnp.mean(diff)}
