"""Decode attention (ragged KV cache), the fused top-k / greedy pick, and in-kernel RoPE.

Decode attention runs both kernel families in Pallas interpret mode (GPU-style `interpret`, TPU-style
`tpu_interpret`) against two independent expectations: the jnp reference
(`decode_attention_reference`, which reads every slot and masks) and a naive per-row softmax written
here in numpy over exactly the filled slots. The top-k kernel is checked against `jax.lax.top_k` and
`jnp.argmax` on integer-valued logits (many ties: the lowest index must win) and with the HF
repetition penalty of `baichuan_jax.infer.sampling`. In-kernel RoPE is checked against applying the
model's own `apply_rope` first. Lowering tests compile nothing but lower the kernels for CUDA
(Triton) / TPU (Mosaic) on this CPU machine.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

from baichuan_jax.infer.sampling import apply_repetition_penalty
from baichuan_jax.model.positions import alibi_slopes, apply_rope
from kernels_pallas import (decode_attention, decode_attention_reference, flash_attention,
                            topk_argmax, top_k)

TOL = {jnp.float32: 2e-5, jnp.bfloat16: 2e-2}


pytestmark = pytest.mark.usefixtures("lower_triton_for_an_h200")  # tests/conftest.py


def _cache(b, h, kvh, max_len, d, dtype, seed=0):
  kq, kk, kv = jax.random.split(jax.random.PRNGKey(seed), 3)
  q = jax.random.normal(kq, (b, h, d), jnp.float32).astype(dtype)
  k = jax.random.normal(kk, (b, kvh, max_len, d), jnp.float32).astype(dtype)
  v = jax.random.normal(kv, (b, kvh, max_len, d), jnp.float32).astype(dtype)
  return q, k, v


def _naive(q, k, v, lengths, starts, slopes):
  """Per row and head: softmax over the slots [start, length) only, in float64 numpy."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  b, h, d = q.shape
  g = h // k.shape[1]
  out = np.zeros((b, h, d))
  for r in range(b):
    lo, hi = int(starts[r]), int(lengths[r])
    if hi <= lo:
      continue
    for head in range(h):
      kk, vv = k[r, head // g, lo:hi], v[r, head // g, lo:hi]
      s = kk @ q[r, head] / np.sqrt(d)
      if slopes is not None:
        s = s - float(slopes[head]) * ((hi - 1) - np.arange(lo, hi))
      p = np.exp(s - s.max())
      out[r, head] = (p / p.sum()) @ vv
  return out


def _check_decode(backend, *, b, h, kvh, max_len, d, dtype, lengths, starts=None, alibi=False,
                  poison=False, **kw):
  q, k, v = _cache(b, h, kvh, max_len, d, dtype)
  lengths = jnp.asarray(lengths, jnp.int32)
  starts_arr = None if starts is None else jnp.asarray(starts, jnp.int32)
  if poison:  # unfilled slots hold garbage (NaN / huge values): they must never matter
    j = jnp.arange(max_len)[None, None, :, None]
    lo = 0 if starts is None else starts_arr[:, None, None, None]
    bad = (j >= lengths[:, None, None, None]) | (j < lo)
    k = jnp.where(bad, jnp.asarray(jnp.nan, dtype), k)
    v = jnp.where(bad, jnp.asarray(1e30, jnp.float32).astype(dtype), v)
  slopes = jnp.asarray(alibi_slopes(h)) if alibi else None
  fn = jax.jit(lambda q, k, v, l, s: decode_attention(q, k, v, l, starts=s, alibi_slopes=slopes,
                                                      backend=backend, **kw))
  out = fn(q, k, v, lengths, starts_arr)
  assert out.shape == q.shape and out.dtype == q.dtype
  got = np.asarray(out, np.float32)
  assert np.all(np.isfinite(got))
  f32 = lambda x: x.astype(jnp.float32)
  if not poison:  # the reference reads every slot (0 * NaN would poison it): clean caches only
    ref = decode_attention_reference(f32(q), f32(k), f32(v), lengths, starts=starts_arr,
                                     alibi_slopes=slopes)
    np.testing.assert_allclose(got, np.asarray(ref), atol=TOL[dtype], rtol=TOL[dtype])
  starts_np = np.zeros(b, int) if starts is None else np.asarray(starts)
  naive = _naive(f32(q), f32(k), f32(v), np.asarray(lengths), starts_np,
                 None if slopes is None else np.asarray(slopes))
  np.testing.assert_allclose(got, naive, atol=TOL[dtype], rtol=TOL[dtype])
  return got


# Ragged lengths: 1 slot, mid-block, exactly a block boundary, the full cache, and (with starts)
# left padding with a start inside a block; a row whose length is 0 must come back as zeros.
def test_gpu_decode_ragged_gqa_alibi_starts_splits():
  got = _check_decode("interpret", b=5, h=8, kvh=2, max_len=256, d=64, dtype=jnp.float32,
                      lengths=[1, 77, 128, 256, 0], starts=[0, 5, 40, 130, 0], alibi=True,
                      block_k=32, num_splits=3)
  assert np.all(got[4] == 0)


def test_gpu_decode_mha_bf16_poisoned_unfilled_slots():
  # MHA (groups 1, padded to 16 rows inside), bf16, NaN keys / 1e30 values in every unfilled slot:
  # blocks past the length are not read and masked slots inside a block contribute nothing.
  _check_decode("interpret", b=3, h=4, kvh=4, max_len=192, d=128, dtype=jnp.bfloat16,
                lengths=[3, 100, 192], starts=[0, 17, 0], poison=True, block_k=64)


def test_gpu_decode_mqa_40_heads_default_blocks_no_alibi():
  # Baichuan-13B head count as MQA (40 query heads on one kv head: 40 -> 64 padded rows).
  _check_decode("interpret", b=2, h=40, kvh=1, max_len=128, d=32, dtype=jnp.float32,
                lengths=[128, 9])


def test_tpu_decode_ragged_gqa_alibi_poisoned():
  _check_decode("tpu_interpret", b=4, h=8, kvh=2, max_len=256, d=64, dtype=jnp.float32,
                lengths=[1, 77, 256, 0], starts=[0, 3, 129, 0], alibi=True, block_k=64,
                poison=True)


def test_tpu_decode_bf16_mha():
  _check_decode("tpu_interpret", b=2, h=2, kvh=2, max_len=128, d=128, dtype=jnp.bfloat16,
                lengths=[50, 128], alibi=True, block_k=32)


def test_decode_row_starting_at_the_cache_end_gets_zeros():
  # starts == max_len (and beyond: clipped) fills nothing: zeros, as lengths <= starts, on both
  # kernels; the TPU kernel's block map once pointed one block past the cache for such a row.
  for backend in ("interpret", "tpu_interpret"):
    _check_decode(backend, b=3, h=4, kvh=2, max_len=64, d=32, dtype=jnp.float32,
                  lengths=[64, 64, 30], starts=[64, 0, 70], block_k=16, poison=True)


def test_decode_matches_model_cache_attention():
  """The kernel agrees with the model's own cached-decode attention (xla_attention, "bhsd")."""
  from baichuan_jax.model.attention import AttnContext, xla_attention
  b, h, kvh, L, d = 2, 4, 2, 64, 32
  q, k, v = _cache(b, h, kvh, L, d, jnp.float32, seed=3)
  lengths = jnp.asarray([20, 64], jnp.int32)
  slots = jnp.arange(L)
  k_seg = (slots[None, :] < lengths[:, None]).astype(jnp.int32)
  k_pos = jnp.broadcast_to(slots, (b, L)).astype(jnp.int32)
  q_pos = (lengths - 1)[:, None]
  ctx = AttnContext(q_pos, jnp.ones((b, 1), jnp.int32), jnp.asarray([L - 1], jnp.int32), k_pos,
                    k_seg, slots.astype(jnp.int32))
  slopes = jnp.asarray(alibi_slopes(h))
  want = xla_attention(q[:, None], k, v, ctx, slopes, kv_layout="bhsd")
  got = decode_attention(q[:, None], k, v, lengths, alibi_slopes=slopes, backend="interpret",
                         block_k=16)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=2e-5)


def test_decode_bad_inputs_raise_clear_errors():
  q, k, v = _cache(2, 4, 2, 64, 32, jnp.float32)
  lengths = jnp.asarray([1, 2], jnp.int32)
  with pytest.raises(ValueError, match="kv_heads=3 is invalid"):
    decode_attention(jnp.ones((2, 4, 32)), jnp.ones((2, 3, 64, 32)), jnp.ones((2, 3, 64, 32)),
                     lengths)
  with pytest.raises(ValueError, match=r"lengths \(shape \(3,\)"):
    decode_attention(q, k, v, jnp.ones((3,), jnp.int32))
  with pytest.raises(ValueError, match="one query token per row"):
    decode_attention(jnp.ones((2, 2, 4, 32)), k, v, lengths)
  with pytest.raises(ValueError, match="max_len=60"):
    decode_attention(q, k[:, :, :60], v[:, :, :60], lengths, backend="interpret")
  with pytest.raises(ValueError, match="head_dim=24 is invalid for the GPU decode kernel"):
    decode_attention(q[..., :24], k[..., :24], v[..., :24], lengths, backend="interpret")
  with pytest.raises(ValueError, match=r"alibi_slopes.shape=\(3,\)"):
    decode_attention(q, k, v, lengths, alibi_slopes=jnp.ones(3))
  with pytest.raises(ValueError, match=r"lengths \(shape \(2,\), dtype float32\) is invalid"):
    decode_attention(q, k, v, [1.0, 2.0])
  # lengths and starts as lists or NumPy arrays: the same as jax arrays
  np.testing.assert_array_equal(
      np.asarray(decode_attention(q, k, v, [1, 2], starts=np.array([0, 1]), backend="interpret")),
      np.asarray(decode_attention(q, k, v, lengths, starts=jnp.asarray([0, 1]),
                                  backend="interpret")))
  # The xla backend takes any cache length and is the reference.
  out = decode_attention(q, k[:, :, :60], v[:, :, :60], lengths, backend="xla")
  np.testing.assert_array_equal(
      np.asarray(out), np.asarray(decode_attention_reference(q, k[:, :, :60], v[:, :, :60],
                                                             lengths)))


# ----------------------------------------------------------------------------------------------
# top-k / greedy pick


def _tied_logits(b, vocab, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.integers(-4, 5, size=(b, vocab)).astype(np.float32)  # 9 values: ties everywhere
  x[0, :] = -np.inf  # a fully masked row: indices 0.. in order
  x[0, vocab - 1] = 2.0
  return jnp.asarray(x)


@pytest.mark.parametrize("vocab,block_v", [(1024, 128), (1000, 128)])  # divisible / padded tail
def test_top_k_matches_lax_top_k_with_ties(vocab, block_v):
  x = _tied_logits(3, vocab)
  for k in (1, 5, 16):
    vals, idx = jax.jit(lambda x: top_k(x, k, backend="interpret", block_v=block_v))(x)
    want_v, want_i = jax.lax.top_k(x, k)
    np.testing.assert_array_equal(np.asarray(vals), np.asarray(want_v), err_msg=f"k={k}")
    np.testing.assert_array_equal(np.asarray(idx), np.asarray(want_i), err_msg=f"k={k}")
  np.testing.assert_array_equal(
      np.asarray(topk_argmax(x, backend="interpret", block_v=block_v)),
      np.asarray(jnp.argmax(x, axis=-1)))


@pytest.mark.parametrize("backend", ["interpret", "xla"])
def test_top_k_reads_negative_zero_as_zero(backend):
  # lax.top_k ranks +0.0 above -0.0 (it would give 1, 3, 0); jnp.argmax and the HF greedy pick
  # take them as equal (first maximum: 0). Every backend reads -0.0 as +0.0: zeros tie and
  # resolve by index, the same token whichever path runs.
  row = np.array([-0.0, 0.0, -1.0, 0.0, -0.0, -2.0, -3.0] + [-5.0] * 25, np.float32)
  x = jnp.asarray(np.stack([row, row[::-1]]))
  vals, idx = top_k(x, 3, backend=backend, block_v=16)
  assert np.asarray(idx).tolist() == [[0, 1, 3], [27, 28, 30]]
  assert not np.signbit(np.asarray(vals)).any()  # the zeros come back as +0.0
  greedy = topk_argmax(x, backend=backend, block_v=16)
  np.testing.assert_array_equal(np.asarray(greedy), np.asarray(jnp.argmax(x, axis=-1)))
  assert np.asarray(jax.lax.top_k(x, 3)[1])[0].tolist() == [1, 3, 0]  # why: the raw order


def test_top_k_fused_repetition_penalty_bf16():
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.integers(-6, 7, size=(4, 2048)) / 2.0, jnp.bfloat16)
  present = jnp.asarray(rng.random((4, 2048)) < 0.2)
  penalty = jnp.asarray([1.0, 1.3, 2.0, 0.7], jnp.float32)
  want = apply_repetition_penalty(x.astype(jnp.float32), present, penalty)
  vals, idx = top_k(x, 8, present=present, penalty=penalty, backend="interpret", block_v=256)
  want_v, want_i = jax.lax.top_k(want, 8)
  np.testing.assert_array_equal(np.asarray(vals), np.asarray(want_v))
  np.testing.assert_array_equal(np.asarray(idx), np.asarray(want_i))
  greedy = topk_argmax(x, present=present, penalty=penalty, backend="interpret", block_v=512)
  np.testing.assert_array_equal(np.asarray(greedy), np.asarray(jnp.argmax(want, axis=-1)))


def test_top_k_penalty_bit_identical_to_the_jnp_path_over_30_seeds():
  # The GPU suite's check, on normal (untied) fp32 logits and HF-like penalties: the kernel's
  # penalised values must be the jitted jnp path's bit for bit, or the pallas decode step can
  # pick other tokens than the XLA one. (With a division in the kernel, XLA rewriting the jnp
  # x / p as x * (1 / p) made some seeds differ by 1 ulp.)
  pen = jnp.asarray([1.05, 1.3, 1.1, 2.0], jnp.float32)
  kernel = jax.jit(lambda y, present: top_k(y, 16, present=present, penalty=pen,
                                            backend="interpret", block_v=256))
  greedy = jax.jit(lambda y, present: topk_argmax(y, present=present, penalty=pen,
                                                  backend="interpret", block_v=256))
  ref = jax.jit(lambda y, present: jax.lax.top_k(apply_repetition_penalty(y, present, pen), 16))
  for seed in range(30):
    rng = np.random.default_rng(seed)
    y = jnp.asarray(rng.normal(size=(4, 2048)).astype(np.float32)) * 3
    present = jnp.asarray(rng.random((4, 2048)) < 0.05)
    (vals, idx), (want_v, want_i) = kernel(y, present), ref(y, present)
    np.testing.assert_array_equal(np.asarray(vals), np.asarray(want_v), err_msg=f"seed {seed}")
    np.testing.assert_array_equal(np.asarray(idx), np.asarray(want_i), err_msg=f"seed {seed}")
    np.testing.assert_array_equal(np.asarray(greedy(y, present)), np.asarray(want_i[:, 0]))


def test_top_k_bad_inputs():
  x = jnp.ones((2, 64))
  with pytest.raises(ValueError, match="k=0 is invalid"):
    top_k(x, 0)
  with pytest.raises(ValueError, match="give both"):
    top_k(x, 2, present=jnp.ones((2, 64), bool))
  with pytest.raises(ValueError, match=r"logits.shape=\(64,\)"):
    top_k(jnp.ones(64), 1)
  with pytest.raises(ValueError, match="k=2.0 is invalid: must be an int"):
    top_k(x, 2.0)
  # a NumPy integer k is an int
  assert top_k(x, np.int64(3), backend="interpret")[1].shape == (2, 3)


# ----------------------------------------------------------------------------------------------
# RoPE inside the training kernel


def test_in_kernel_rope_equals_rope_first_fwd_bwd():
  b, s, h, hkv, d = 1, 64, 4, 2, 64
  keys = jax.random.split(jax.random.PRNGKey(5), 4)
  q = jax.random.normal(keys[0], (b, s, h, d))
  k = jax.random.normal(keys[1], (b, s, hkv, d))
  v = jax.random.normal(keys[2], (b, s, hkv, d))
  ct = jax.random.normal(keys[3], (b, s, h, d))
  seg = jnp.asarray(np.repeat([[1, 2]], s // 2, axis=1), jnp.int32)
  pos = jnp.asarray(np.concatenate([np.arange(s // 2), np.arange(s // 2)])[None] + 3, jnp.int32)

  def both(fn):
    o, vjp = jax.vjp(fn, q, k, v)
    return (o,) + vjp(ct)

  fused = jax.jit(lambda: both(lambda q, k, v: flash_attention(
      q, k, v, segment_ids=seg, positions=pos, rope_theta=1e4, backend="interpret",
      block_q=32, block_k=32)))()
  first = both(lambda q, k, v: flash_attention(apply_rope(q, pos, 1e4), apply_rope(k, pos, 1e4),
                                               v, segment_ids=seg, backend="xla"))
  for name, a, r in zip(("out", "dq", "dk", "dv"), fused, first):
    np.testing.assert_allclose(np.asarray(a), np.asarray(r), atol=2e-5, rtol=2e-5, err_msg=name)


def test_in_kernel_rope_rejects_odd_head_dim():
  x = jnp.ones((1, 16, 2, 48))
  with pytest.raises(ValueError, match="head_dim=48 is invalid with rope_theta"):
    flash_attention(x, x, x, rope_theta=1e4, backend="interpret")


# ----------------------------------------------------------------------------------------------
# Lowering for the real compilers (no device needed)


_CHECKS = [export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton"),
           export.DisabledSafetyCheck.custom_call("tpu_custom_call")]


@pytest.mark.parametrize("platform,backend,target", [("cuda", "gpu", "__gpu$xla.gpu.triton"),
                                                     ("tpu", "tpu", "tpu_custom_call")])
def test_decode_kernel_lowers(platform, backend, target):
  # 7B-like head_dim 128, 40:8 GQA, ALiBi, a 2,176-slot cache, ragged starts/lengths.
  slopes = jnp.asarray(alibi_slopes(40))
  q = jax.ShapeDtypeStruct((2, 40, 128), jnp.bfloat16)
  kv = jax.ShapeDtypeStruct((2, 8, 2176, 128), jnp.bfloat16)
  lengths = jax.ShapeDtypeStruct((2,), jnp.int32)
  f = lambda q, k, v, l: decode_attention(q, k, v, l, starts=l // 4, alibi_slopes=slopes,
                                          backend=backend)
  module = export.export(jax.jit(f), platforms=[platform], disabled_checks=_CHECKS)(
      q, kv, kv, lengths).mlir_module()
  assert target in module


def test_topk_and_rope_kernels_lower_for_cuda():
  x = jax.ShapeDtypeStruct((4, 125696), jnp.float32)  # Baichuan 2 vocabulary
  pres = jax.ShapeDtypeStruct((4, 125696), jnp.bool_)
  pen = jax.ShapeDtypeStruct((4,), jnp.float32)
  f = lambda x, p, r: top_k(x, 8, present=p, penalty=r, backend="gpu")
  module = export.export(jax.jit(f), platforms=["cuda"], disabled_checks=_CHECKS)(
      x, pres, pen).mlir_module()
  assert "__gpu$xla.gpu.triton" in module
  q = jax.ShapeDtypeStruct((2, 1000, 8, 128), jnp.bfloat16)
  kv = jax.ShapeDtypeStruct((2, 1000, 2, 128), jnp.bfloat16)

  def g(q, k, v):
    loss = lambda *a: jnp.sum(flash_attention(*a, rope_theta=1e4, backend="gpu")
                              .astype(jnp.float32))
    return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

  module = export.export(jax.jit(g), platforms=["cuda"], disabled_checks=_CHECKS)(
      q, kv, kv).mlir_module()
  assert module.count("__gpu$xla.gpu.triton") >= 3


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs an NVIDIA GPU (JAX_PLATFORMS=cuda)")
def test_compiled_gpu_decode_and_topk():
  _check_decode("gpu", b=4, h=32, kvh=8, max_len=2176, d=128, dtype=jnp.bfloat16,
                lengths=[1, 700, 2048, 2176], starts=[0, 13, 0, 500], alibi=True, poison=True)
  x = _tied_logits(4, 125696)
  vals, idx = top_k(x, 8, backend="gpu")
  want_v, want_i = jax.lax.top_k(x, 8)
  np.testing.assert_array_equal(np.asarray(idx), np.asarray(want_i))
  np.testing.assert_array_equal(np.asarray(vals), np.asarray(want_v))
