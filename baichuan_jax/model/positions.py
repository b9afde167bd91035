"""Position encodings as pure functions: RoPE (rotate-half) and ALiBi, always in fp32.

RoPE is the one plain-jnp formula kept beside the Pallas kernels (`kernels_pallas.reference`),
re-exported here as `rope_frequencies` / `apply_rope` (x: [batch, seq, heads, head_dim],
positions: [batch, seq] int; returned in x's dtype).
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from kernels_pallas.reference import rope_inv_freq as rope_frequencies  # noqa: F401
from kernels_pallas.reference import rope_reference as apply_rope  # noqa: F401


def alibi_slopes(num_heads: int) -> np.ndarray:
  """ALiBi slopes [num_heads] by the rule of Press et al. (2022) used by Baichuan-13B.

  For a power of two n: 2^(-8k/n), k = 1..n. Otherwise take the n' = 2^floor(log2 n) slopes, then
  append every other slope of the 2n'-head set until there are n.
  """
  if num_heads <= 0:
    raise ValueError(f"num_heads={num_heads} is invalid: must be a positive integer")

  def pow2(n: int) -> list[float]:
    return [2.0 ** (-8.0 * k / n) for k in range(1, n + 1)]

  closest = 2 ** int(math.floor(math.log2(num_heads)))
  slopes = pow2(closest)
  if closest != num_heads:
    slopes += pow2(2 * closest)[0::2][: num_heads - closest]
  return np.asarray(slopes, dtype=np.float32)


def alibi_bias(slopes: jnp.ndarray, q_pos: jnp.ndarray, k_pos: jnp.ndarray) -> jnp.ndarray:
  """Additive ALiBi bias -slope_h * (i - j).

  Args:
    slopes: [heads] fp32.
    q_pos: [batch, q_len] positions of the queries.
    k_pos: [batch, k_len] positions of the keys.
  Returns:
    [batch, heads, q_len, k_len] fp32.
  """
  dist = (q_pos[:, :, None] - k_pos[:, None, :]).astype(jnp.float32)  # [b, q, k]
  return -slopes.astype(jnp.float32)[None, :, None, None] * dist[:, None, :, :]
