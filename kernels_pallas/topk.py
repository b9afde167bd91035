"""Greedy / top-k pick over the vocabulary in one pass over the logits (two-stage reduction).

`top_k(logits, k)` returns what `jax.lax.top_k` returns (values largest first, ties in index order,
so the lowest index wins), and `argmax(logits)` what `jnp.argmax` returns (the first maximum), but
reads each logit once. Every backend reads -0.0 as +0.0 (`_unsigned_zero`): `lax.top_k` ranks
+0.0 above -0.0, while `jnp.argmax` and torch's argmax (the HF greedy pick) take them as equal,
so without this the kernel and the jnp path could pick different tokens on a row whose maximum
is a zero:

1. a Pallas kernel, grid (batch, vocab_blocks), loads one block of a row's logits, optionally
   applies the HF repetition penalty there (`present` mask and per-row `penalty`: `penalise`,
   which `baichuan_jax.infer.sampling.apply_repetition_penalty` also calls), and extracts the block's
   top `k_pad` (k rounded up to a power of two) by repeated max + lowest-index selection;
2. the `[batch, blocks * k_pad]` candidates (about 2k entries at vocab 125,696 and k = 4) are
   merged by a small sort on (value descending, index ascending).

Every element of the row is a candidate of its own block, so the merge sees each of the true top k
with its original index: ties resolve exactly as `lax.top_k` does. Temperature does not change the
order (T > 0), so a sampler can take the top k of the raw (penalised) logits and scale only those.
No penalised or sorted `[batch, vocab]` array is written.

Backends: "gpu" (Triton) and "interpret" run the kernel; "tpu", "tpu_interpret" and "xla" use the
jnp path (`jax.lax.top_k` after the penalty), which is also the reference in the tests. NaN logits
are not supported (their order is unspecified here).
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from kernels_pallas.attention import resolve_backend

MAX_K = 64  # larger k: the jnp path (the unrolled selection costs k reductions per block)
BLOCK_V = 2048
_BIG = 2 ** 30


def penalise(x, present, penalty, inv_penalty=None):
  """HF repetition penalty on fp32 x: where `present`, a positive logit times 1 / penalty, a
  negative one times penalty (`infer.sampling.apply_repetition_penalty` calls this).

  HF divides by the penalty; a multiply by the reciprocal (computed once per row, outside any
  kernel) is within 1 ulp of that and, unlike a division, rounds the same everywhere: XLA
  rewrites x / broadcast(p) into x * (1 / p) on its own, and Triton's fp32 division is the
  approximate `div.full.f32`. So the kernel below and the jnp path give bit-identical logits.
  """
  if inv_penalty is None:
    inv_penalty = 1.0 / penalty
  return jnp.where(present, jnp.where(x > 0, x * inv_penalty, x * penalty), x)


def _unsigned_zero(x):
  """x with -0.0 as +0.0, so equal values tie (and resolve by index) on every backend."""
  return jnp.where(x == 0, jnp.zeros_like(x), x)


def _kernel(x_ref, *rest, bv: int, kp: int, has_penalty: bool):
  if has_penalty:
    present_ref, penalty_ref, inv_ref, val_ref, idx_ref = rest
  else:
    val_ref, idx_ref = rest
  j = pl.program_id(1)
  x = x_ref[...].astype(jnp.float32)  # [block_v]
  if has_penalty:  # [1] blocks -> scalars; 1 / penalty comes from outside (see `penalise`)
    x = penalise(x, present_ref[...] != 0, jnp.sum(penalty_ref[...]), jnp.sum(inv_ref[...]))
  x = _unsigned_zero(x)
  local = jnp.arange(bv)
  slot = jnp.arange(kp)
  vals = jnp.full((kp,), -jnp.inf, jnp.float32)
  idxs = jnp.zeros((kp,), jnp.int32)
  taken = jnp.zeros((bv,), jnp.bool_)
  for r in range(kp):  # static: kp <= MAX_K selections of (max, lowest index among the maxima)
    live = jnp.where(taken, -jnp.inf, x)
    m = jnp.max(live)
    cand = jnp.logical_and(live == m, jnp.logical_not(taken))
    i = jnp.min(jnp.where(cand, local, _BIG))
    taken = jnp.logical_or(taken, local == i)
    vals = jnp.where(slot == r, m, vals)
    idxs = jnp.where(slot == r, i + j * bv, idxs)
  val_ref[...] = vals
  idx_ref[...] = idxs


def _pick_block(vocab: int, want: int) -> int:
  b = want
  while b >= 16:
    if vocab % b == 0:
      return b
    b //= 2
  return 0


def _reference(logits, k, present, penalty):
  x = logits.astype(jnp.float32)
  if present is not None:
    x = penalise(x, present, penalty[:, None].astype(jnp.float32))
  vals, idx = jax.lax.top_k(_unsigned_zero(x), k)
  return vals, idx.astype(jnp.int32)


def top_k(logits: jax.Array, k: int, *, present: Optional[jax.Array] = None,
          penalty: Optional[jax.Array] = None, backend: str = "auto",
          block_v: Optional[int] = None) -> tuple[jax.Array, jax.Array]:
  """The k largest (optionally repetition-penalised) logits of each row and their indices.

  Args:
    logits: [batch, vocab] (fp32 or bf16).
    k: static, 1 <= k <= vocab.
    present: [batch, vocab] bool (tokens already in the row) or None; with `penalty`, applies
      the HF repetition penalty before the pick (inside the kernel).
    penalty: [batch] fp32 (1.0 = off); needed with `present`.
    backend: "auto", "gpu", "interpret" run the kernel (on CPU "auto" means interpret mode, or
      the jnp path with KERNELS_PALLAS_CPU_BACKEND=xla); "tpu", "tpu_interpret", "xla" the jnp
      path.
    block_v: vocabulary entries per program (a power of two >= 16 dividing vocab; default
      BLOCK_V, halved until it divides vocab).
  Returns:
    (values [batch, k] fp32, indices [batch, k] int32), as `jax.lax.top_k` of the fp32
    (penalised) logits with -0.0 read as +0.0: largest first, equal values in increasing index
    order.
  """
  if logits.ndim != 2:
    raise ValueError(f"logits.shape={logits.shape} is invalid: must be [batch, vocab]")
  b, vocab = logits.shape
  if isinstance(k, (int, np.integer)) and not isinstance(k, bool):
    k = int(k)  # a NumPy integer is as good as an int (it must be static)
  if not isinstance(k, int) or not 1 <= k <= vocab:
    raise ValueError(f"k={k!r} is invalid: must be an int in [1, vocab={vocab}]")
  if (present is None) != (penalty is None):
    raise ValueError("present and penalty are invalid: give both (repetition penalty) or neither")
  if present is not None and present.shape != logits.shape:
    raise ValueError(f"present.shape={present.shape} is invalid: must be {logits.shape}")
  if penalty is not None and penalty.shape != (b,):
    raise ValueError(f"penalty.shape={penalty.shape} is invalid: must be [batch={b}]")
  backend = resolve_backend(backend)
  kp = 1 << (k - 1).bit_length()
  if backend not in ("gpu", "interpret") or kp > MAX_K:
    return _reference(logits, k, present, penalty)
  want = block_v or BLOCK_V
  if want < 16 or want & (want - 1):
    raise ValueError(f"block_v={want} is invalid: must be a power of two >= 16")
  bv = _pick_block(vocab, want)
  x = logits
  has_penalty = present is not None
  pres = None if present is None else present.astype(jnp.int8)
  if not bv or bv < kp:  # no power-of-two block divides vocab: pad (one copy of the logits)
    bv = max(min(want, 1 << (vocab - 1).bit_length()), kp)
    vp = -(-vocab // bv) * bv
    x = jnp.pad(x, ((0, 0), (0, vp - vocab)), constant_values=-jnp.inf)
    if pres is not None:
      pres = jnp.pad(pres, ((0, 0), (0, vp - vocab)))
  nb = x.shape[1] // bv
  row = pl.BlockSpec((None, bv), lambda bi, j: (bi, j))
  in_specs, args = [row], [x]
  if has_penalty:
    scalar = pl.BlockSpec((None, 1), lambda bi, j: (bi, 0))
    pen = penalty.astype(jnp.float32)[:, None]
    in_specs += [row, scalar, scalar]
    args += [pres, pen, 1.0 / pen]
  out_spec = pl.BlockSpec((None, None, kp), lambda bi, j: (bi, j, 0))
  vals, idx = pl.pallas_call(
      functools.partial(_kernel, bv=bv, kp=kp, has_penalty=has_penalty),
      grid=(b, nb), in_specs=in_specs, out_specs=[out_spec, out_spec],
      out_shape=[jax.ShapeDtypeStruct((b, nb, kp), jnp.float32),
                 jax.ShapeDtypeStruct((b, nb, kp), jnp.int32)],
      compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=1),
      interpret=backend == "interpret", name="baichuan_topk_blocks",
  )(*args)
  vals, idx = vals.reshape(b, nb * kp), idx.reshape(b, nb * kp)
  if k == 1:  # argmax: candidates are in index order per value, so the first maximum wins
    pos = jnp.argmax(vals, axis=1)[:, None]
    return jnp.take_along_axis(vals, pos, 1), jnp.take_along_axis(idx, pos, 1)
  neg, sidx = jax.lax.sort((-vals, idx), dimension=1, num_keys=2)
  return -neg[:, :k], sidx[:, :k]


def argmax(logits: jax.Array, *, present: Optional[jax.Array] = None,
           penalty: Optional[jax.Array] = None, backend: str = "auto",
           block_v: Optional[int] = None) -> jax.Array:
  """Greedy pick: [batch] int32 index of each row's first maximum (as `jnp.argmax`), after the
  optional repetition penalty, reading the logits once. See `top_k`."""
  return top_k(logits, 1, present=present, penalty=penalty, backend=backend,
               block_v=block_v)[1][:, 0]
