"""PPO rollouts: sampling responses with the KV-cache generator, and scoring them under the four models.

Layout: prompts are left-padded to [batch, prompt_len] (`prompt_mask` 1 on real tokens) so every
prompt ends at the same column and the response starts right after it; responses are right-padded
to [batch, resp_len] with `resp_mask` 1 on generated tokens up to and including the first `</s>`.
The joined sequence [batch, prompt_len + resp_len] uses segment id 1 for real tokens and 0 for
padding (never attended), and positions that count real tokens only, so padding changes nothing.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from baichuan_jax import infer
from baichuan_jax.align import ppo, reward
from baichuan_jax.model import BaichuanLM


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int = 0,
             length: Optional[int] = None) -> tuple[np.ndarray, np.ndarray]:
  """Left-padded prompts and their mask, int32 [batch, length or longest prompt]."""
  length = length or max(len(p) for p in prompts)
  toks = np.full((len(prompts), length), pad_id, np.int32)
  mask = np.zeros((len(prompts), length), np.int32)
  for i, p in enumerate(prompts):
    if not 0 < len(p) <= length:
      raise ValueError(f"prompt {i} has {len(p)} tokens; allowed 1..{length}")
    toks[i, length - len(p):] = p
    mask[i, length - len(p):] = 1
  return toks, mask


def joined(prompts: jax.Array, prompt_mask: jax.Array, response: jax.Array,
           resp_mask: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(tokens, segment_ids, positions) of prompt + response, each [batch, prompt_len + resp_len]."""
  tokens = jnp.concatenate([prompts, response], axis=1)
  seg = jnp.concatenate([prompt_mask, resp_mask], axis=1).astype(jnp.int32)
  positions = jnp.maximum(jnp.cumsum(seg, axis=1) - 1, 0).astype(jnp.int32)
  return tokens, seg, positions


def generate_responses(cfg: ml_collections.ConfigDict, params: Any,
                       prompts: Sequence[Sequence[int]], max_new_tokens: int, *,
                       temperature: float = 1.0, top_k: int = 0, seed: int = 0, eos_id: int = 2,
                       pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Samples one response per prompt with the KV-cache generator (`baichuan_jax.infer.generate`).

  Args:
    cfg: model config.
    params: policy parameters.
    prompts: token-id lists (unpadded).
    max_new_tokens: response length R.
    temperature, top_k: sampling; PPO samples from the policy itself (1.0 and 0 = no filter);
      temperature 0 is greedy.
    seed: row i samples with seed + i, so a batch is reproducible.
  Returns:
    (response [batch, R] int32, resp_mask [batch, R] int32), right-padded with `pad_id`. A response
    that ended by sampling `</s>` keeps that token (mask 1): it is an action of the policy, with its
    own log-probability and KL term.
  """
  outs = infer.generate(cfg, params, [list(map(int, p)) for p in prompts],
                        max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                        stop_token_ids=[eos_id], seed=[seed + i for i in range(len(prompts))])
  resp = np.full((len(prompts), max_new_tokens), pad_id, np.int32)
  mask = np.zeros((len(prompts), max_new_tokens), np.int32)
  for i, c in enumerate(outs):
    ids = list(c.tokens) + ([eos_id] if c.finish_reason == "stop" else [])
    ids = ids[:max_new_tokens]
    resp[i, :len(ids)] = ids
    mask[i, :len(ids)] = 1
  return resp, mask


def policy_outputs(cfg: ml_collections.ConfigDict, params: Any, tokens: jax.Array, seg: jax.Array,
                   positions: jax.Array, resp_len: int) -> tuple[jax.Array, jax.Array]:
  """Log-probabilities and entropies of the response tokens under a policy.

  Args:
    tokens, seg, positions: from `joined`, [batch, P + R].
    resp_len: R.
  Returns:
    (logp [batch, R], entropy [batch, R]) fp32; the logits at column P - 1 + t predict token t.
  """
  logits = BaichuanLM(cfg).apply({"params": params}, tokens, positions=positions, segment_ids=seg)
  p_len = tokens.shape[1] - resp_len
  lg = logits[:, p_len - 1:-1]  # [batch, R, vocab]
  return ppo.token_logprobs(lg, tokens[:, p_len:]), ppo.entropy(lg)


def critic_values(cfg: ml_collections.ConfigDict, params: Any, tokens: jax.Array, seg: jax.Array,
                  positions: jax.Array, resp_len: int) -> jax.Array:
  """Values [batch, R] of the states in which each response token is chosen."""
  v = reward.token_values(cfg, params, tokens, seg, positions)
  p_len = tokens.shape[1] - resp_len
  return v[:, p_len - 1:-1]


def reward_inputs(prompts: np.ndarray, prompt_mask: np.ndarray, response: np.ndarray,
                  resp_mask: np.ndarray, eos_id: int, pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Right-padded prompt + response (+ `</s>` when the response did not end with one), as the reward
  model was trained to score them; int32 [batch, P + R + 1] tokens and mask."""
  b = prompts.shape[0]
  width = prompts.shape[1] + response.shape[1] + 1
  toks = np.full((b, width), pad_id, np.int32)
  mask = np.zeros((b, width), np.int32)
  for i in range(b):
    seq = list(prompts[i][prompt_mask[i] > 0]) + list(response[i][resp_mask[i] > 0])
    if not seq or seq[-1] != eos_id:
      seq.append(eos_id)
    toks[i, :len(seq)] = seq
    mask[i, :len(seq)] = 1
  return toks, mask


def to_dtype(tree: Any, dtype: str) -> Any:
  """Casts floating leaves (frozen models are kept in bf16)."""
  dt = jnp.dtype(dtype)
  return jax.tree.map(lambda x: x.astype(dt) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)
