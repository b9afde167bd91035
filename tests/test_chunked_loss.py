"""The split output layer + loss equals `losses.lm_loss` on full logits, values and gradients,
and never holds the whole [tokens, vocab] fp32 logits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from baichuan_jax import losses
from baichuan_jax.model import head_logits
from baichuan_jax.train import chunked_lm_loss


def _inputs(b=2, s=37, e=16, v=96, seed=0, dtype=jnp.float32):
  k = jax.random.split(jax.random.PRNGKey(seed), 4)
  hidden = jax.random.normal(k[0], (b, s, e), jnp.float32).astype(dtype)
  kernel = jax.random.normal(k[1], (e, v), jnp.float32) * 0.5
  targets = jax.random.randint(k[2], (b, s), 0, v)
  mask = (jax.random.uniform(k[3], (b, s)) > 0.3).astype(jnp.int32)
  return hidden, kernel, targets, mask


def _full(hidden, kernel, targets, mask, norm_head, zw):
  out = losses.lm_loss(head_logits(hidden, kernel, norm_head), targets, mask, zw)
  return out["loss"], out


@pytest.mark.parametrize("norm_head", [True, False])
@pytest.mark.parametrize("chunk,vchunks,vshards", [(8, 1, 1), (5, 3, 2), (64, 1, 4)])
def test_matches_full_logits_loss_and_grads(norm_head, chunk, vchunks, vshards):
  hidden, kernel, targets, mask = _inputs()
  zw = 0.01  # larger than Baichuan's 2e-4 so the z-loss gradient is visible at fp32 precision
  full = jax.value_and_grad(lambda h, w: _full(h, w, targets, mask, norm_head, zw),
                            argnums=(0, 1), has_aux=True)
  (want, want_parts), want_g = jax.jit(full)(hidden, kernel)

  def split(h, w):
    out = chunked_lm_loss(h, w, targets, mask, norm_head=norm_head, z_loss_weight=zw,
                          chunk_size=chunk, vocab_chunks=vchunks, vocab_shards=vshards)
    return out["loss"], out

  (got, got_parts), got_g = jax.jit(jax.value_and_grad(split, argnums=(0, 1), has_aux=True))(
      hidden, kernel)
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
  for k in ("ce", "z_loss", "tokens"):
    np.testing.assert_allclose(got_parts[k], want_parts[k], rtol=1e-6, atol=1e-5)
  for g, w in zip(got_g, want_g):
    np.testing.assert_allclose(g, w, rtol=0, atol=1e-5)
    assert float(jnp.max(jnp.abs(w))) > 1e-3  # the gradients compared are not all ~0


def test_tied_maxima_share_the_z_gradient_like_jnp_max():
  hidden, kernel, targets, mask = _inputs(v=64)
  # Duplicate vocabulary columns, one in each of two vocab chunks: every row whose max is one of
  # them has a tie, which jnp.max's gradient splits equally.
  kernel = kernel.at[:, 40].set(kernel[:, 3]).at[:, 41].set(kernel[:, 3] * 100.0)
  kernel = kernel.at[:, 50].set(kernel[:, 41])
  args = (targets, mask)
  want_g = jax.jit(jax.grad(lambda h, w: _full(h, w, *args, False, 0.5)[0], argnums=(0, 1)))(
      hidden, kernel)
  got_g = jax.jit(jax.grad(lambda h, w: chunked_lm_loss(h, w, *args, norm_head=False, z_loss_weight=0.5,
                                                chunk_size=8, vocab_chunks=2)["loss"],
                   argnums=(0, 1)))(hidden, kernel)
  for g, w in zip(got_g, want_g):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
  # Column 41 and 50 tie for the max at some positions; both get half the z gradient.
  logits = hidden @ kernel
  assert bool(jnp.any(jnp.argmax(logits, -1) == 41))


def test_bf16_hidden_close_to_full():
  hidden, kernel, targets, mask = _inputs(dtype=jnp.bfloat16)
  want = jax.jit(_full, static_argnums=(4, 5))(hidden, kernel, targets, mask, True, 2e-4)[0]
  got = jax.jit(chunked_lm_loss, static_argnames=("norm_head", "z_loss_weight", "chunk_size",
                                                  "vocab_chunks"))(hidden, kernel, targets, mask, norm_head=True, z_loss_weight=2e-4,
                        chunk_size=8, vocab_chunks=2)["loss"]
  # Same bf16 matmul with fp32 accumulation per block; only summation order differs.
  np.testing.assert_allclose(got, want, rtol=1e-5)


def test_backward_never_holds_full_logits():
  b, s, e, v = 1, 1024, 64, 8192
  hidden = jax.ShapeDtypeStruct((b, s, e), jnp.float32)
  kernel = jax.ShapeDtypeStruct((e, v), jnp.float32)
  targets = jax.ShapeDtypeStruct((b, s), jnp.int32)
  logits_bytes = b * s * v * 4  # 32 MiB

  def temp_bytes(fn):
    grad = jax.jit(jax.grad(lambda h, w, t: fn(h, w, t)["loss"], argnums=(0, 1)))
    return grad.lower(hidden, kernel, targets).compile().memory_analysis().temp_size_in_bytes

  full = temp_bytes(lambda h, w, t: losses.lm_loss(head_logits(h, w, True), t, None, 2e-4))
  split = temp_bytes(lambda h, w, t: chunked_lm_loss(h, w, t, None, norm_head=True,
                                                     z_loss_weight=2e-4, chunk_size=128,
                                                     vocab_chunks=4))
  assert full >= logits_bytes
  # A few [128, 2048] fp32 blocks (1 MiB each) plus kernel-sized buffers (2 MiB each: the
  # normalised and re-laid-out head, d(kernel)): far below one copy of the logits.
  assert split < logits_bytes / 3 and split * 10 < full, (split, full)


def test_rejects_vocab_split_that_does_not_divide():
  hidden, kernel, targets, mask = _inputs(v=96)
  with pytest.raises(ValueError, match="vocab_shards\\*vocab_chunks=2\\*5 must divide"):
    chunked_lm_loss(hidden, kernel, targets, mask, norm_head=True, chunk_size=8,
                    vocab_chunks=5, vocab_shards=2)


def test_chunk_size_zero_is_the_plain_loss():
  hidden, kernel, targets, mask = _inputs()
  got = chunked_lm_loss(hidden, kernel, targets, mask, norm_head=True, z_loss_weight=2e-4,
                        chunk_size=0)
  want = _full(hidden, kernel, targets, mask, True, 2e-4)[1]
  for k in want:
    np.testing.assert_array_equal(got[k], want[k])
