"""Decode attention over a KV cache: one new query per row, ragged per-row cache lengths.

`decode_attention(q, k_cache, v_cache, lengths, ...)` attends one query token per row (every query
head of a GQA group at once) to the filled slots [starts[b], lengths[b]) of that row's cache, laid
out as the model keeps it, `[batch, kv_heads, max_len, head_dim]` per layer. Blocks of slots past a
row's length (or wholly before its start) are never read, so a step costs the filled slots, not
the allocated ones. ALiBi is computed in the kernel from the per-head slopes and the slot distance
`(lengths[b] - 1) - j` (the query sits in the last filled slot; with contiguous slots that is the
position difference, whatever the row's left padding). Keys are expected with RoPE already applied
(the model writes rotated keys into the cache), so RoPE needs nothing here.

Two kernel families, as for the flash kernels:

- GPU (Triton lowering), grid (batch, kv_heads, splits): "flash-decoding". Each row's filled blocks
  are divided evenly among `splits` programs (computed from the row's own length at run time, so
  short rows keep every program busy too); each program runs the online softmax over its blocks
  and writes an unnormalised partial (acc, max, sum); a small jnp step merges the partials. The
  group's query heads are padded to 16 rows so the two products run as tensor-core dots (decode is
  memory-bound: the padding costs arithmetic that is free, not bytes).
- TPU (Mosaic lowering), grid (batch, kv_heads, k_blocks) with the lengths as scalar-prefetch
  operands: the key-block index map clamps to the row's last filled block (no DMA for the rest)
  and `pl.when` skips their compute; running statistics live in VMEM scratch.

Both run on CPU in Pallas interpret mode. `kernels_pallas.reference.decode_attention_reference` is
the plain jnp version (reads every slot, masks by length).
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as plgpu

from kernels_pallas._common import MASK_VALUE, dot_nt, online_softmax_step
from kernels_pallas.attention import resolve_backend
from kernels_pallas.reference import decode_attention_reference

# GPU: block of cache slots per loop step, Triton warps / pipeline stages, and the number of
# programs the split count aims for (about 2 per SM of a 132-SM Hopper part). First guesses; on
# an H200 (2026-12-04, benchmarks/gpu_suite.py) block_k 64 was 1.40x faster than these at batch 1
# (one layer's 7B cache, 2,048 slots: 91.7 vs 128.4 us), but it was timed at batch 1 only, so the
# defaults stay until a run times it at batch 8 and 32 too (the suite now does).
GPU_DEFAULTS = {"block_k": 128, "num_warps": 4, "num_stages": 2, "target_programs": 256}
TPU_BLOCK_K = 512


def _pow2_at_least(x: int, lo: int) -> int:
  return max(lo, 1 << (max(1, x) - 1).bit_length())


def _pick_block(max_len: int, want: int, lo: int) -> int:
  """Largest power of two <= want that divides max_len (and is >= lo), or 0 if none."""
  b = want
  while b >= lo:
    if max_len % b == 0:
      return b
    b //= 2
  return 0


def _row_blocks(start, length, bk: int):
  """First block and end block (exclusive) of the filled slots [start, length) of one row."""
  first = jax.lax.div(start, bk)
  end = jax.lax.div(length + bk - 1, bk)
  return first, jnp.maximum(end, first)


# ----------------------------------------------------------------------------------------------
# GPU (Triton) kernel


def _gpu_kernel(q_ref, k_ref, v_ref, bounds_ref, *rest, bk: int, splits: int, sm_scale: float,
                has_alibi: bool):
  if has_alibi:
    slopes_ref, acc_ref, m_ref, l_ref = rest
  else:
    slopes_ref, (acc_ref, m_ref, l_ref) = None, rest
  s_id = pl.program_id(2)
  bounds = bounds_ref[...]  # [2] int32: (start, length)
  start = jnp.sum(jnp.where(jnp.arange(2) == 0, bounds, 0))
  length = jnp.sum(jnp.where(jnp.arange(2) == 1, bounds, 0))
  first, end = _row_blocks(start, length, bk)
  per = jax.lax.div(end - first + splits - 1, splits)
  j0 = first + s_id * per
  j1 = jnp.minimum(j0 + per, end)
  q = q_ref[...]  # [groups_pad, head_dim]
  slope = slopes_ref[...][:, None] if has_alibi else None  # [groups_pad, 1]

  def body(j, carry):
    acc, m, l = carry
    k_start = j * bk
    k = k_ref[pl.ds(k_start, bk), :]  # [block_k, head_dim]
    v = v_ref[pl.ds(k_start, bk), :]
    idx = k_start + jnp.arange(bk)
    valid = jnp.logical_and(idx >= start, idx < length)
    s = dot_nt(q, k) * sm_scale  # [groups_pad, block_k]
    if has_alibi:
      s = s - slope * (length - 1 - idx)[None, :].astype(jnp.float32)
    s = jnp.where(valid[None, :], s, MASK_VALUE)
    # Every block in [first, end) holds at least one filled slot, so m_new is a real score and
    # masked slots get exp(MASK_VALUE - m_new) = 0. Unwritten slots may hold anything: zero v.
    v = jnp.where(valid[:, None], v, jnp.zeros_like(v))
    return online_softmax_step(acc, m, l, s, v)

  gp, d = q.shape
  carry = (jnp.zeros((gp, d), jnp.float32), jnp.full((gp,), -jnp.inf, jnp.float32),
           jnp.zeros((gp,), jnp.float32))
  acc, m, l = jax.lax.fori_loop(j0, j1, body, carry)
  acc_ref[...] = acc
  m_ref[...] = m
  l_ref[...] = l


def _gpu_partials(q4, k_cache, v_cache, bounds, slopes, *, bk, splits, sm_scale, interpret,
                  num_warps, num_stages):
  b, kvh, gp, d = q4.shape
  L = k_cache.shape[2]
  has_alibi = slopes is not None
  grid = (b, kvh, splits)
  q_spec = pl.BlockSpec((None, None, gp, d), lambda bi, hk, s: (bi, hk, 0, 0))
  kv_spec = pl.BlockSpec((None, None, L, d), lambda bi, hk, s: (bi, hk, 0, 0))
  in_specs = [q_spec, kv_spec, kv_spec, pl.BlockSpec((None, 2), lambda bi, hk, s: (bi, 0))]
  args = [q4, k_cache, v_cache, bounds]
  if has_alibi:
    in_specs.append(pl.BlockSpec((None, gp), lambda bi, hk, s: (hk, 0)))
    args.append(slopes)
  out_specs = [pl.BlockSpec((None, None, None, gp, d), lambda bi, hk, s: (bi, hk, s, 0, 0)),
               pl.BlockSpec((None, None, None, gp), lambda bi, hk, s: (bi, hk, s, 0)),
               pl.BlockSpec((None, None, None, gp), lambda bi, hk, s: (bi, hk, s, 0))]
  out_shape = [jax.ShapeDtypeStruct((b, kvh, splits, gp, d), jnp.float32),
               jax.ShapeDtypeStruct((b, kvh, splits, gp), jnp.float32),
               jax.ShapeDtypeStruct((b, kvh, splits, gp), jnp.float32)]
  return pl.pallas_call(
      functools.partial(_gpu_kernel, bk=bk, splits=splits, sm_scale=sm_scale,
                        has_alibi=has_alibi),
      grid=grid, in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
      interpret=interpret, name="baichuan_decode_attention",
  )(*args)


def _merge(acc, m, l):
  """Merges split partials: acc [..., S, g, d], m/l [..., S, g] -> [..., g, d] fp32.

  A row with no filled slot (length <= start) has every partial empty and gets zeros.
  """
  m_max = jnp.max(m, axis=-2, keepdims=True)
  m_safe = jnp.where(jnp.isfinite(m_max), m_max, 0.0)
  w = jnp.where(jnp.isfinite(m), jnp.exp(m - m_safe), 0.0)  # [..., S, g]
  den = jnp.sum(w * l, axis=-2)  # [..., g]
  num = jnp.sum(w[..., None] * acc, axis=-3)  # [..., g, d]
  return jnp.where(den[..., None] > 0, num / jnp.where(den > 0, den, 1.0)[..., None], 0.0)


# ----------------------------------------------------------------------------------------------
# TPU (Mosaic) kernel


def _tpu_kernel(starts_ref, lengths_ref, q_ref, k_ref, v_ref, *rest, bk: int, sm_scale: float,
                has_alibi: bool):
  if has_alibi:
    slopes_ref, o_ref, m_sc, l_sc, acc_sc = rest
  else:
    slopes_ref, (o_ref, m_sc, l_sc, acc_sc) = None, rest
  bi, j = pl.program_id(0), pl.program_id(2)
  start, length = starts_ref[bi], lengths_ref[bi]
  first, end = _row_blocks(start, length, bk)

  @pl.when(j == 0)
  def _init():
    m_sc[...] = jnp.full(m_sc.shape, -jnp.inf, jnp.float32)
    l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
    acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

  @pl.when(jnp.logical_and(j >= first, j < end))
  def _step():
    q, k, v = q_ref[...], k_ref[...], v_ref[...]
    gp = q.shape[0]
    idx = j * bk + jax.lax.broadcasted_iota(jnp.int32, (gp, bk), 1)
    valid = jnp.logical_and(idx >= start, idx < length)
    s = dot_nt(q, k) * sm_scale
    if has_alibi:
      s = s - slopes_ref[...] * (length - 1 - idx).astype(jnp.float32)
    s = jnp.where(valid, s, MASK_VALUE)
    v_idx = j * bk + jax.lax.broadcasted_iota(jnp.int32, v.shape, 0)
    v = jnp.where(jnp.logical_and(v_idx >= start, v_idx < length), v, jnp.zeros_like(v))
    acc_sc[...], m_sc[...], l_sc[...] = online_softmax_step(acc_sc[...], m_sc[...], l_sc[...], s, v)

  @pl.when(j == pl.num_programs(2) - 1)
  def _finish():
    l = l_sc[...]
    o_ref[...] = jnp.where(l > 0, acc_sc[...] / jnp.where(l > 0, l, 1.0), 0.0).astype(o_ref.dtype)


def _tpu_call(q4, k_cache, v_cache, starts, lengths, slopes, *, bk, sm_scale):
  b, kvh, gp, d = q4.shape
  L = k_cache.shape[2]
  has_alibi = slopes is not None

  def kv_map(bi, hk, j, starts_ref, lengths_ref):
    first, end = _row_blocks(starts_ref[bi], lengths_ref[bi], bk)
    # Outside [first, end) re-point at a block already fetched: the pipeline skips the copy.
    # A row starting at max_len (nothing filled) has first == L // bk: kept inside the cache.
    return (bi, hk, jnp.minimum(jnp.clip(j, first, jnp.maximum(end - 1, first)), L // bk - 1), 0)

  q_spec = pl.BlockSpec((None, None, gp, d), lambda bi, hk, j, *_: (bi, hk, 0, 0))
  kv_spec = pl.BlockSpec((None, None, bk, d), kv_map)
  in_specs = [q_spec, kv_spec, kv_spec]
  args = [q4, k_cache, v_cache]
  if has_alibi:
    in_specs.append(pl.BlockSpec((None, gp, 1), lambda bi, hk, j, *_: (hk, 0, 0)))
    args.append(slopes[:, :, None])
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=2, grid=(b, kvh, L // bk), in_specs=in_specs, out_specs=q_spec,
      scratch_shapes=[pltpu.VMEM((gp, 1), jnp.float32), pltpu.VMEM((gp, 1), jnp.float32),
                      pltpu.VMEM((gp, d), jnp.float32)])
  return pl.pallas_call(
      functools.partial(_tpu_kernel, bk=bk, sm_scale=sm_scale, has_alibi=has_alibi),
      grid_spec=grid_spec, out_shape=jax.ShapeDtypeStruct(q4.shape, jnp.float32),
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "arbitrary")),
      name="baichuan_decode_attention_tpu",
  )(starts, lengths, *args)


# ----------------------------------------------------------------------------------------------
# Public API


def _validate(q, k_cache, v_cache, lengths, starts, alibi_slopes):
  if q.ndim not in (3, 4) or (q.ndim == 4 and q.shape[1] != 1):
    raise ValueError(f"q.shape={q.shape} is invalid: must be [batch, heads, head_dim] or "
                     "[batch, 1, heads, head_dim] (one query token per row)")
  b, h, d = (q.shape[0],) + q.shape[-2:]
  if (k_cache.ndim != 4 or k_cache.shape != v_cache.shape or k_cache.shape[0] != b
      or k_cache.shape[3] != d):
    raise ValueError(f"k_cache.shape={k_cache.shape}, v_cache.shape={v_cache.shape} are invalid: "
                     f"both must be [batch={b}, kv_heads, max_len, head_dim={d}]")
  if h % k_cache.shape[1]:
    raise ValueError(f"kv_heads={k_cache.shape[1]} is invalid: must divide heads={h}")
  if k_cache.dtype != v_cache.dtype:
    raise ValueError(f"cache dtypes k={k_cache.dtype}, v={v_cache.dtype} are invalid: must match")
  for name, arr in (("lengths", lengths), ("starts", starts)):
    if arr is None:
      continue
    if arr.shape != (b,) or not jnp.issubdtype(arr.dtype, jnp.integer):
      raise ValueError(f"{name} (shape {arr.shape}, dtype {arr.dtype}) is invalid: must be an "
                       f"integer array of shape [batch={b}]")
  if alibi_slopes is not None and alibi_slopes.shape != (h,):
    raise ValueError(f"alibi_slopes.shape={alibi_slopes.shape} is invalid: must be [heads={h}]")


def decode_kernel_fits(max_len: int, head_dim: int, backend: str = "auto") -> bool:
  """Whether `decode_attention` runs a kernel (not only the reference) for this cache shape.

  The kernels need max_len to be a multiple of 16 (GPU / interpret) or 8 (TPU), and on the GPU a
  power-of-two head_dim >= 16; the model keeps the XLA path for other shapes.
  """
  backend = resolve_backend(backend)
  if backend == "xla":
    return False
  if backend in ("gpu", "interpret"):
    return max_len % 16 == 0 and head_dim >= 16 and not head_dim & (head_dim - 1)
  return max_len % 8 == 0


def decode_attention(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, lengths: jax.Array, *,
                     starts: Optional[jax.Array] = None,
                     alibi_slopes: Optional[jax.Array] = None,
                     sm_scale: Optional[float] = None, backend: str = "auto",
                     block_k: Optional[int] = None, num_splits: Optional[int] = None,
                     num_warps: Optional[int] = None,
                     num_stages: Optional[int] = None) -> jax.Array:
  """Attention of one query token per row over the filled slots of a KV cache.

  Args:
    q: [batch, heads, head_dim] or [batch, 1, heads, head_dim]: this step's queries (RoPE
      applied, as in the model).
    k_cache, v_cache: [batch, kv_heads, max_len, head_dim] (the model's per-layer cache layout),
      keys already rotated; kv_heads divides heads, query head h reads kv head
      h // (heads // kv_heads). Slots outside [starts, lengths) may hold anything.
    lengths: [batch] int: row b attends to slots j < lengths[b] (this step's token included, so
      it is written before the call). Values are clipped to [0, max_len].
    starts: [batch] int or None (0): first filled slot of each row (left padding before it).
      A row with lengths <= starts gets zeros.
    alibi_slopes: [heads] fp32 or None: adds -slope_h * ((lengths[b] - 1) - j) to the scores.
    sm_scale: score scale, default head_dim ** -0.5.
    backend: as `flash_attention`: "auto", "gpu", "tpu", "interpret" (GPU kernel in interpret
      mode), "tpu_interpret" or "xla" (the jnp reference).
    block_k: cache slots per block (a power of two dividing max_len; default
      GPU_DEFAULTS["block_k"] or TPU_BLOCK_K, halved until it divides max_len).
    num_splits: GPU programs per (row, kv head) (default: enough for
      GPU_DEFAULTS["target_programs"] programs in all, at most the number of blocks).
    num_warps, num_stages: Triton launch settings (GPU only).
  Returns:
    Like q (same shape and dtype). The kernels multiply in the cache's dtype: an fp32 q over a
    bf16 cache is rounded to bf16 first (as the model's bf16 decode step has it), so it agrees
    with the fp32 reference to bf16 precision (~1e-3 relative), not to fp32.
  """
  lengths = jnp.asarray(lengths)  # a list or NumPy array is fine too
  starts = None if starts is None else jnp.asarray(starts)
  _validate(q, k_cache, v_cache, lengths, starts, alibi_slopes)
  shape4 = q.ndim == 4
  q3 = q[:, 0] if shape4 else q
  b, h, d = q3.shape
  kvh, L = k_cache.shape[1], k_cache.shape[2]
  g = h // kvh
  scale = float(d ** -0.5 if sm_scale is None else sm_scale)
  lengths = jnp.clip(lengths.astype(jnp.int32), 0, L)
  starts = (jnp.zeros((b,), jnp.int32) if starts is None
            else jnp.clip(starts.astype(jnp.int32), 0, L))
  backend = resolve_backend(backend)
  if backend == "xla":
    out = decode_attention_reference(q3, k_cache, v_cache, lengths, starts=starts,
                                     alibi_slopes=alibi_slopes, sm_scale=scale)
    return out[:, None] if shape4 else out
  kind = "gpu" if backend in ("gpu", "interpret") else "tpu"
  interpret = backend in ("interpret", "tpu_interpret")
  lo = 16 if kind == "gpu" else 8
  want = block_k or (GPU_DEFAULTS["block_k"] if kind == "gpu" else TPU_BLOCK_K)
  if want < lo or want & (want - 1):
    raise ValueError(f"block_k={want} is invalid: must be a power of two >= {lo}")
  bk = _pick_block(L, want, lo)
  if not bk:
    raise ValueError(f"max_len={L} (k_cache.shape[2]) is invalid for the {kind} decode kernel: "
                     f"must be a multiple of {lo} (allocate the cache in multiples of {lo}, or "
                     "use backend='xla')")
  if kind == "gpu" and (d < 16 or d & (d - 1)):
    raise ValueError(f"head_dim={d} is invalid for the GPU decode kernel: must be a power of two "
                     ">= 16 (Triton tiles; the cache is not padded per step)")
  gp = _pow2_at_least(g, 16) if kind == "gpu" else -(-g // 8) * 8
  q4 = jnp.pad(q3.reshape(b, kvh, g, d), ((0, 0), (0, 0), (0, gp - g), (0, 0)))
  q4 = q4.astype(k_cache.dtype)
  slopes = None
  if alibi_slopes is not None:
    slopes = jnp.pad(alibi_slopes.astype(jnp.float32).reshape(kvh, g), ((0, 0), (0, gp - g)))
  if kind == "gpu":
    n_blocks = L // bk
    if num_splits is None:
      num_splits = -(-GPU_DEFAULTS["target_programs"] // (b * kvh))
    splits = int(max(1, min(num_splits, n_blocks)))
    bounds = jnp.stack([starts, lengths], axis=1)
    acc, m, l = _gpu_partials(q4, k_cache, v_cache, bounds, slopes, bk=bk, splits=splits,
                              sm_scale=scale, interpret=interpret,
                              num_warps=num_warps or GPU_DEFAULTS["num_warps"],
                              num_stages=num_stages or GPU_DEFAULTS["num_stages"])
    out = _merge(acc, m, l)
  else:
    ctx = pltpu.force_tpu_interpret_mode() if interpret else _null()
    with ctx:
      out = _tpu_call(q4, k_cache, v_cache, starts, lengths, slopes, bk=bk, sm_scale=scale)
  out = out[:, :, :g].reshape(b, h, d).astype(q.dtype)
  return out[:, None] if shape4 else out


class _null:  # pylint: disable=invalid-name
  def __enter__(self):
    return self

  def __exit__(self, *exc):
    return False
