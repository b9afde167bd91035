"""RoPE and ALiBi against independently written formulas."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from baichuan_jax.model import alibi_bias, alibi_slopes, apply_rope


def test_alibi_slopes_power_of_two():
  # 8 heads: 2^(-8k/8) = 1/2, 1/4, ..., 1/256.
  np.testing.assert_allclose(alibi_slopes(8), [2.0 ** -k for k in range(1, 9)], rtol=0)


def test_alibi_slopes_12_heads():
  # 8 slopes of the 8-head set, then every other slope of the 16-head set: 2^(-k/2), k = 1,3,5,7.
  expected = [2.0 ** -k for k in range(1, 9)] + [2.0 ** (-k / 2) for k in (1, 3, 5, 7)]
  np.testing.assert_allclose(alibi_slopes(12), expected, rtol=1e-7)


def test_alibi_slopes_40_heads_spec():
  # Not a power of two: the 32-head slopes 2^(-k/4), then every other slope of the 64-head set,
  # 2^(-k/8) for k = 1, 3, ..., 15.
  expected = [2.0 ** (-k / 4) for k in range(1, 33)] + [2.0 ** (-k / 8) for k in range(1, 16, 2)]
  got = alibi_slopes(40)
  assert got.shape == (40,)
  np.testing.assert_allclose(got, expected, rtol=1e-7)


def test_alibi_bias_values():
  slopes = jnp.array([0.5, 0.25])
  pos = jnp.arange(3)[None]
  bias = np.asarray(alibi_bias(slopes, pos, pos))
  assert bias.shape == (1, 2, 3, 3)
  assert bias[0, 0, 2, 0] == -1.0 and bias[0, 1, 2, 1] == -0.25 and bias[0, 0, 1, 1] == 0.0


def test_rope_matches_complex_rotation():
  # Independent formula: pair dimension i with i + d/2 as a complex number and multiply by
  # exp(i * pos * theta^(-2i/d)).
  rng = np.random.default_rng(0)
  b, s, h, d, theta = 2, 7, 3, 16, 10000.0
  x = rng.standard_normal((b, s, h, d)).astype(np.float32)
  pos = rng.integers(0, 500, size=(b, s))
  got = np.asarray(apply_rope(jnp.asarray(x), jnp.asarray(pos), theta))
  expected = np.empty_like(x)
  for bi in range(b):
    for si in range(s):
      for i in range(d // 2):
        ang = pos[bi, si] * theta ** (-2 * i / d)
        z = complex(x[bi, si, 0, i], x[bi, si, 0, i + d // 2]) * complex(math.cos(ang), math.sin(ang))
        expected[bi, si, 0, i], expected[bi, si, 0, i + d // 2] = z.real, z.imag
  np.testing.assert_allclose(got[:, :, 0], expected[:, :, 0], atol=2e-5)


def test_rope_relative_property():
  # <R(m) q, R(n) k> depends only on m - n.
  rng = np.random.default_rng(1)
  q = jnp.asarray(rng.standard_normal((1, 1, 1, 32)), jnp.float32)
  k = jnp.asarray(rng.standard_normal((1, 1, 1, 32)), jnp.float32)
  def dot(m, n):
    return float(jnp.sum(apply_rope(q, jnp.array([[m]]), 1e4) * apply_rope(k, jnp.array([[n]]), 1e4)))
  assert dot(10, 3) == pytest.approx(dot(107, 100), abs=1e-4)


def test_bad_head_count():
  with pytest.raises(ValueError, match="num_heads=0"):
    alibi_slopes(0)
