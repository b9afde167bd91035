"""Flash attention kernels for GPUs, written for Pallas' Triton lowering (A100 / H100).

Layout is the model's own [batch, seq, heads, head_dim]: Triton addresses memory through strides, so
no transposes are needed. Each program owns one block of rows and walks the other sequence axis with
a `fori_loop`, keeping the running max / sum / accumulator in registers (FlashAttention-2):

- forward, grid (batch, heads, q_blocks): online softmax over key blocks; writes the output and the
  logsumexp `lse` [batch, heads, seq] (fp32) for the backward pass. Under causal masking the loop
  stops at the diagonal, and blocks wholly below it skip the mask compare (they are walked after
  the blocks that straddle the diagonal: see `_fwd_kernel`).
- dq, grid (batch, heads, q_blocks): recomputes P = exp(S - lse) per key block; dS = P * (dP - delta)
  with delta = rowsum(dO * O); dQ = scale * dS K.
- dk/dv, grid (batch, kv_heads, k_blocks): loops over the query heads of its group and the query
  blocks at or after the diagonal, so GQA/MQA gradients are summed in-kernel (no [.., heads, ..]
  temporary for dK/dV).
- fused backward (`backward_fused`, tuning "fused_backward"): the dK/dV kernel alone, which also
  adds each tile's share of dQ, dS K, into an fp32 [batch, seq, heads, head_dim] buffer with
  atomic adds, as FlashAttention-2 and -3 do. The backward then computes Q K^T, exp and dO V^T
  once per tile instead of twice (5 matmuls per tile, not 7); the price is the atomics and a
  summation order for dQ that varies from run to run (dK and dV stay deterministic). Without
  in-kernel RoPE only.

ALiBi is computed from the per-head slope and the query/key positions inside the kernel; segment
ids and positions are [batch, seq] vectors. With `has_rope`, q and k arrive unrotated and every
kernel rotates its tiles (rotate-half RoPE, fp32 arithmetic, rounded to the input dtype as applying
RoPE first would) from cos/sin tables [batch, seq, head_dim / 2]: each tile is loaded as its two
halves and the products run as two half-width dots (Triton has no in-register concatenate). The
backward kernels rotate dQ and dK back (the transpose of the rotation). Inputs arrive padded (seq to
a block multiple, head_dim to a power of two, slopes to a power of two) by
`kernels_pallas.attention`; Triton needs power-of-two value shapes. The same kernels run on CPU with
`interpret=True`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from kernels_pallas._common import (AttnStatic, dot_nn, dot_nt, dot_tn, online_softmax_step,
                                    scores_bias_mask)


def _compiler_params(head_dim: int, st: AttnStatic):
  # Fallback when no setting is given: 4 warps for head_dim 64, 8 for 128 (more registers per row
  # block), two pipeline stages. `attention.DEFAULT_LAUNCH` and the `tuning` argument set them
  # per phase (benchmarks/attention.py --tune sweeps them).
  warps = st.num_warps or (4 if head_dim <= 64 else 8)
  return plgpu.CompilerParams(num_warps=warps, num_stages=st.num_stages or 2)


def _slope(slopes_ref, head):
  """This head's ALiBi slope; a masked sum keeps every value a power-of-two shape for Triton."""
  slopes = slopes_ref[...]
  return jnp.sum(jnp.where(jnp.arange(slopes.shape[0]) == head, slopes, 0.0))


def _split_refs(refs, st: AttnStatic, n_main: int):
  """Splits the flat ref list into main refs, (slopes, segments, positions, rope) and outputs."""
  main, rest = list(refs[:n_main]), list(refs[n_main:])
  slopes = rest.pop(0) if st.has_alibi else None
  seg = rest.pop(0) if st.has_segments else None
  pos = rest.pop(0) if st.has_positions else None
  rope = (rest.pop(0), rest.pop(0)) if st.has_rope else None
  return main, slopes, seg, pos, rope, rest


def _rotate(x1, x2, c, s):
  """Rotate-half RoPE of a tile given as halves: (x1 c - x2 s, x2 c + x1 s), fp32 math."""
  x1f, x2f = x1.astype(jnp.float32), x2.astype(jnp.float32)
  return (x1f * c - x2f * s).astype(x1.dtype), (x2f * c + x1f * s).astype(x1.dtype)


def _unrotate(g1, g2, c, s):
  """Transpose of `_rotate` on fp32 gradients."""
  return g1 * c + g2 * s, g2 * c - g1 * s


def _rope_rows(rope, start, size):
  cos_ref, sin_ref = rope
  return cos_ref[pl.ds(start, size), :], sin_ref[pl.ds(start, size), :]


def _halves(ref, rows, *lead):
  """The two head_dim halves of ref[rows, *lead, :]."""
  d2 = ref.shape[-1] // 2
  return ref[(rows,) + lead + (pl.ds(0, d2),)], ref[(rows,) + lead + (pl.ds(d2, d2),)]


def _store_halves(ref, a, b):
  d2 = ref.shape[-1] // 2
  ref[:, pl.ds(0, d2)] = a.astype(ref.dtype)
  ref[:, pl.ds(d2, d2)] = b.astype(ref.dtype)


def _vec(ref, start, size):
  return None if ref is None else ref[pl.ds(start, size)]


def _fwd_kernel(*refs, st: AttnStatic):
  (q_ref, k_ref, v_ref), slopes_ref, seg_ref, pos_ref, rope, (o_ref, lse_ref) = (
      _split_refs(refs, st, 3))
  h, i = pl.program_id(1), pl.program_id(2)
  bq, bk = st.block_q, st.block_k
  q_start = i * bq
  d = q_ref.shape[-1]
  if rope is None:
    q = q_ref[...]  # [block_q, head_dim]
  else:
    q1, q2 = _rotate(*_halves(q_ref, slice(None)), *_rope_rows(rope, q_start, bq))
  q_idx = (q_start + jnp.arange(bq))[:, None]
  q_seg = None if seg_ref is None else _vec(seg_ref, q_start, bq)[:, None]
  q_pos = None if pos_ref is None else _vec(pos_ref, q_start, bq)[:, None]
  slope = _slope(slopes_ref, h) if st.has_alibi else None

  def body(j, carry, causal_mask):
    acc, m, l = carry
    k_start = j * bk
    v = v_ref[pl.ds(k_start, bk), :]
    if rope is None:
      s = dot_nt(q, k_ref[pl.ds(k_start, bk), :])  # [block_q, block_k]
    else:
      k1, k2 = _rotate(*_halves(k_ref, pl.ds(k_start, bk)), *_rope_rows(rope, k_start, bk))
      s = dot_nt(q1, k1) + dot_nt(q2, k2)
    s = s * st.sm_scale
    k_seg = None if seg_ref is None else _vec(seg_ref, k_start, bk)[None, :]
    k_pos = None if pos_ref is None else _vec(pos_ref, k_start, bk)[None, :]
    s = scores_bias_mask(s, q_idx, (k_start + jnp.arange(bk))[None, :], st, slope=slope,
                         q_seg=q_seg, k_seg=k_seg, q_pos=q_pos, k_pos=k_pos,
                         causal_mask=causal_mask)
    return online_softmax_step(acc, m, l, s, v)

  carry = (jnp.zeros((bq, d), jnp.float32),
           jnp.full((bq,), -jnp.inf, jnp.float32), jnp.zeros((bq,), jnp.float32))
  num_k = st.seq_pad // bk
  if st.causal:
    # Key blocks [0, n_full) lie wholly at or below the diagonal; [n_full, n_end) straddle it.
    # The straddling blocks go first: that loop always runs (n_end > n_full), so the output
    # accumulator reaching the unmasked loop, which runs no step for the first query blocks, is
    # always a wgmma's result. With the unmasked loop first, its zero-trip path fed the
    # accumulator's zeros straight to the masked loop's pending wgmma, and ptxas serialized every
    # wgmma of the kernel ("C7515: non wgmma instructions defining accumulator registers of a
    # wgmma between start and end of the pipeline stage"; benchmarks/gpu_aot.py). The online
    # softmax gives the same result in any block order (up to rounding); each row meets its own
    # key in the straddling blocks, and masked scores are finite (MASK_VALUE), so no row's
    # running max is ever -inf.
    n_full = jax.lax.div(q_start + 1, bk)
    n_end = jax.lax.div(q_start + bq + bk - 1, bk)
    carry = jax.lax.fori_loop(n_full, n_end, functools.partial(body, causal_mask=True), carry)
    carry = jax.lax.fori_loop(0, n_full, functools.partial(body, causal_mask=False), carry)
  else:
    carry = jax.lax.fori_loop(0, num_k, functools.partial(body, causal_mask=True), carry)
  acc, m, l = carry
  o_ref[...] = (acc / l[:, None]).astype(o_ref.dtype)
  lse_ref[...] = m + jnp.log(l)


def _common_inputs(slopes, seg, pos, st: AttnStatic, rope=None):
  """Extra inputs and their BlockSpecs (whole [seq] rows; the kernels slice them)."""
  args, specs = [], []
  if st.has_alibi:
    args.append(slopes)
    specs.append(pl.BlockSpec((slopes.shape[0],), lambda b, h, i: (0,)))
  for arr, flag in ((seg, st.has_segments), (pos, st.has_positions)):
    if flag:
      args.append(arr)
      specs.append(pl.BlockSpec((None, st.seq_pad), lambda b, h, i: (b, 0)))
  if st.has_rope:
    for table in rope:  # cos, sin: [batch, seq_pad, head_dim / 2] fp32
      args.append(table)
      specs.append(pl.BlockSpec((None, st.seq_pad, table.shape[-1]), lambda b, h, i: (b, 0, 0)))
  return args, specs


def forward(q, k, v, slopes, seg, pos, st: AttnStatic, rope=None):
  """Forward kernel.

  Args:
    q: [batch, seq_pad, heads, head_dim]; k, v: [batch, seq_pad, kv_heads, head_dim].
    slopes: [heads_pow2] fp32 or None; seg, pos: [batch, seq_pad] int32 or None.
    st: static settings.
    rope: (cos, sin) [batch, seq_pad, head_dim / 2] fp32 when st.has_rope.
  Returns:
    (out [batch, seq_pad, heads, head_dim] in q's dtype, lse [batch, heads, seq_pad] fp32).
  """
  b, sp, h, d = q.shape
  g, bq = st.groups, st.block_q
  extra, extra_specs = _common_inputs(slopes, seg, pos, st, rope)
  q_spec = pl.BlockSpec((None, bq, None, d), lambda bi, hi, i: (bi, i, hi, 0))
  kv_spec = pl.BlockSpec((None, sp, None, d), lambda bi, hi, i: (bi, 0, hi // g, 0))
  return pl.pallas_call(
      functools.partial(_fwd_kernel, st=st),
      grid=(b, h, sp // bq),
      in_specs=[q_spec, kv_spec, kv_spec] + extra_specs,
      out_specs=[q_spec, pl.BlockSpec((None, None, bq), lambda bi, hi, i: (bi, hi, i))],
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct((b, h, sp), jnp.float32)],
      compiler_params=_compiler_params(d, st),
      interpret=st.interpret,
      name="baichuan_flash_fwd",
  )(q, k, v, *extra)


def _dq_kernel(*refs, st: AttnStatic):
  (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref), slopes_ref, seg_ref, pos_ref, rope, (
      dq_ref,) = _split_refs(refs, st, 6)
  h, i = pl.program_id(1), pl.program_id(2)
  bq, bk = st.block_q, st.block_k
  q_start = i * bq
  do = do_ref[...]  # [block_q, head_dim]
  d = do.shape[-1]
  if rope is None:
    q = q_ref[...]
  else:
    cq, sq = _rope_rows(rope, q_start, bq)
    q1, q2 = _rotate(*_halves(q_ref, slice(None)), cq, sq)
  lse, delta = lse_ref[...][:, None], delta_ref[...][:, None]  # [block_q, 1]
  q_idx = (q_start + jnp.arange(bq))[:, None]
  q_seg = None if seg_ref is None else _vec(seg_ref, q_start, bq)[:, None]
  q_pos = None if pos_ref is None else _vec(pos_ref, q_start, bq)[:, None]
  slope = _slope(slopes_ref, h) if st.has_alibi else None

  def body(j, dq):
    k_start = j * bk
    v = v_ref[pl.ds(k_start, bk), :]
    if rope is None:
      k = k_ref[pl.ds(k_start, bk), :]
      s = dot_nt(q, k)
    else:
      k1, k2 = _rotate(*_halves(k_ref, pl.ds(k_start, bk)), *_rope_rows(rope, k_start, bk))
      s = dot_nt(q1, k1) + dot_nt(q2, k2)
    s = s * st.sm_scale
    k_seg = None if seg_ref is None else _vec(seg_ref, k_start, bk)[None, :]
    k_pos = None if pos_ref is None else _vec(pos_ref, k_start, bk)[None, :]
    s = scores_bias_mask(s, q_idx, (k_start + jnp.arange(bk))[None, :], st, slope=slope,
                         q_seg=q_seg, k_seg=k_seg, q_pos=q_pos, k_pos=k_pos)
    p = jnp.exp(s - lse)  # [block_q, block_k]
    ds = p * (dot_nt(do, v) - delta)
    if rope is None:
      return dq + dot_nn(ds.astype(k.dtype), k)
    dq1, dq2 = dq
    return dq1 + dot_nn(ds.astype(k1.dtype), k1), dq2 + dot_nn(ds.astype(k2.dtype), k2)

  n_end = jax.lax.div(q_start + bq + bk - 1, bk) if st.causal else st.seq_pad // bk
  if rope is None:
    dq = jax.lax.fori_loop(0, n_end, body, jnp.zeros((bq, d), jnp.float32))
    dq_ref[...] = (dq * st.sm_scale).astype(dq_ref.dtype)
  else:
    zeros = jnp.zeros((bq, d // 2), jnp.float32)
    dq1, dq2 = jax.lax.fori_loop(0, n_end, body, (zeros, zeros))
    dq1, dq2 = _unrotate(dq1, dq2, cq, sq)
    _store_halves(dq_ref, dq1 * st.sm_scale, dq2 * st.sm_scale)


def backward_dq(q, k, v, do, lse, delta, slopes, seg, pos, st: AttnStatic, rope=None):
  """dQ kernel. lse, delta: [batch, heads, seq_pad] fp32. Returns dq like q."""
  b, sp, h, d = q.shape
  g, bq = st.groups, st.block_q
  extra, extra_specs = _common_inputs(slopes, seg, pos, st, rope)
  q_spec = pl.BlockSpec((None, bq, None, d), lambda bi, hi, i: (bi, i, hi, 0))
  kv_spec = pl.BlockSpec((None, sp, None, d), lambda bi, hi, i: (bi, 0, hi // g, 0))
  row_spec = pl.BlockSpec((None, None, bq), lambda bi, hi, i: (bi, hi, i))
  return pl.pallas_call(
      functools.partial(_dq_kernel, st=st),
      grid=(b, h, sp // bq),
      in_specs=[q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec] + extra_specs,
      out_specs=q_spec,
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      compiler_params=_compiler_params(d, st),
      interpret=st.interpret,
      name="baichuan_flash_dq",
  )(q, k, v, do, lse, delta, *extra)


def _dkdv_kernel(*refs, st: AttnStatic):
  # With st.fused_dq the main inputs end with the fp32 dQ buffer (aliased to the third output).
  main, slopes_ref, seg_ref, pos_ref, rope, outs = _split_refs(refs, st, 7 if st.fused_dq else 6)
  q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref = main[:6]
  dk_ref, dv_ref = outs[:2]
  dq_ref = outs[2] if st.fused_dq else None  # [seq_pad, groups, head_dim] fp32
  hk, j = pl.program_id(1), pl.program_id(2)
  bq, bk = st.block_q, st.block_k
  k_start = j * bk
  v = v_ref[...]  # [block_k, head_dim]
  d = v.shape[-1]
  if rope is None:
    k = k_ref[...]
  else:
    ck, sk = _rope_rows(rope, k_start, bk)
    k1, k2 = _rotate(*_halves(k_ref, slice(None)), ck, sk)
  # Transposed scores [block_k, block_q] (keys as rows): P^T and dS^T are then the left operands
  # of dV += P^T dO and dK += dS^T Q as they stand, with no transpose of a score block (which
  # costs Triton a layout conversion through shared memory and registers: on sm_90 the
  # [block_q, block_k] form used all 255 registers and spilled, benchmarks/triton_sm90.py).
  k_idx = (k_start + jnp.arange(bk))[:, None]
  k_seg = None if seg_ref is None else _vec(seg_ref, k_start, bk)[:, None]
  k_pos = None if pos_ref is None else _vec(pos_ref, k_start, bk)[:, None]
  # Under causal masking, query blocks before this key block's diagonal see none of its keys.
  first_q = jax.lax.div(k_start, bq) if st.causal else 0

  def head_body(g, carry):
    slope = _slope(slopes_ref, hk * st.groups + g) if st.has_alibi else None

    def q_body(i, carry):
      dk, dv = carry
      q_start = i * bq
      do = do_ref[pl.ds(q_start, bq), g, :]
      lse = lse_ref[g, pl.ds(q_start, bq)][None, :]
      delta = delta_ref[g, pl.ds(q_start, bq)][None, :]
      if rope is None:
        q = q_ref[pl.ds(q_start, bq), g, :]  # [block_q, head_dim]
        s_t = dot_nt(k, q)  # [block_k, block_q]
      else:
        q1, q2 = _rotate(*_halves(q_ref, pl.ds(q_start, bq), g), *_rope_rows(rope, q_start, bq))
        s_t = dot_nt(k1, q1) + dot_nt(k2, q2)
      s_t = s_t * st.sm_scale
      q_seg = None if seg_ref is None else _vec(seg_ref, q_start, bq)[None, :]
      q_pos = None if pos_ref is None else _vec(pos_ref, q_start, bq)[None, :]
      s_t = scores_bias_mask(s_t, (q_start + jnp.arange(bq))[None, :], k_idx, st, slope=slope,
                             q_seg=q_seg, k_seg=k_seg, q_pos=q_pos, k_pos=k_pos)
      p_t = jnp.exp(s_t - lse)
      dv = dv + dot_nn(p_t.astype(do.dtype), do)
      ds_t = p_t * (dot_nt(v, do) - delta)
      if dq_ref is not None:  # this tile's dQ share, dS K (scaled after the kernel)
        plgpu.atomic_add(dq_ref, (pl.ds(q_start, bq), g, slice(None)),
                         dot_tn(ds_t.astype(k.dtype), k))
      if rope is None:
        dk = dk + dot_nn(ds_t.astype(q.dtype), q)
      else:
        dk = (dk[0] + dot_nn(ds_t.astype(q1.dtype), q1), dk[1] + dot_nn(ds_t.astype(q2.dtype), q2))
      return dk, dv

    # seq_pad // bq > first_q always (this key block's diagonal query block exists), so the
    # loop always runs; the max tells the compiler so. Otherwise its zero-trip path hands the
    # zero accumulators on past the loop's pending wgmmas, as in the forward above (here it
    # cost register spills: the in-kernel-RoPE dK/dV spilled 4-24 bytes, and none with this).
    end = jnp.maximum(st.seq_pad // bq, first_q + 1)
    return jax.lax.fori_loop(first_q, end, q_body, carry)

  zeros = jnp.zeros((bk, d), jnp.float32)
  dk0 = zeros if rope is None else (jnp.zeros((bk, d // 2), jnp.float32),) * 2
  dk, dv = jax.lax.fori_loop(0, st.groups, head_body, (dk0, zeros))
  if rope is None:
    dk_ref[...] = (dk * st.sm_scale).astype(dk_ref.dtype)
  else:
    dk1, dk2 = _unrotate(dk[0], dk[1], ck, sk)
    _store_halves(dk_ref, dk1 * st.sm_scale, dk2 * st.sm_scale)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def backward_dkdv(q, k, v, do, lse, delta, slopes, seg, pos, st: AttnStatic, rope=None):
  """dK/dV kernel (sums over the query heads of each kv head). Returns (dk, dv) like k, v."""
  if st.fused_dq:
    raise ValueError("backward_dkdv takes a split-backward AttnStatic (fused_dq=False); use "
                     "backward_fused")
  return tuple(_dkdv_call(q, k, v, do, lse, delta, slopes, seg, pos, st, rope))


def backward_fused(q, k, v, do, lse, delta, slopes, seg, pos, st: AttnStatic):
  """The whole backward in one kernel (`st.fused_dq`): the dK/dV kernel, which also adds each
  tile's dQ share into an fp32 buffer with atomic adds. Returns (dq, dk, dv) like q, k, v."""
  if not st.fused_dq or st.has_rope:
    raise ValueError("backward_fused needs an AttnStatic with fused_dq=True and has_rope=False "
                     "(the fused backward takes q and k already rotated)")
  dk, dv, dq = _dkdv_call(q, k, v, do, lse, delta, slopes, seg, pos, st)
  return (dq * st.sm_scale).astype(q.dtype).reshape(q.shape), dk, dv


def _dkdv_call(q, k, v, do, lse, delta, slopes, seg, pos, st: AttnStatic, rope=None):
  """The dK/dV pallas_call -> [dk, dv] (+ the fp32 dQ sum, unscaled, [batch, seq_pad, kv_heads,
  groups, head_dim], with st.fused_dq)."""
  b, sp, h, d = q.shape
  hkv, g, bk = k.shape[2], st.groups, st.block_k
  extra, extra_specs = _common_inputs(slopes, seg, pos, st, rope)
  # Query-side tensors viewed per kv head: [batch, seq, kv_heads, groups, head_dim].
  q5, do5 = q.reshape(b, sp, hkv, g, d), do.reshape(b, sp, hkv, g, d)
  lse4, delta4 = lse.reshape(b, hkv, g, sp), delta.reshape(b, hkv, g, sp)
  q_spec = pl.BlockSpec((None, sp, None, g, d), lambda bi, hk, j: (bi, 0, hk, 0, 0))
  row_spec = pl.BlockSpec((None, None, g, sp), lambda bi, hk, j: (bi, hk, 0, 0))
  kv_spec = pl.BlockSpec((None, bk, None, d), lambda bi, hk, j: (bi, j, hk, 0))
  main, main_specs = [q5, k, v, do5, lse4, delta4], [q_spec, kv_spec, kv_spec, q_spec, row_spec,
                                                    row_spec]
  out_specs = [kv_spec, kv_spec]
  out_shape = [jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)]
  if st.fused_dq:  # every k-block program of a (batch, kv head) adds into its whole dQ rows
    main.append(jnp.zeros(q5.shape, jnp.float32))
    main_specs.append(q_spec)
    out_specs.append(q_spec)
    out_shape.append(jax.ShapeDtypeStruct(q5.shape, jnp.float32))
  return pl.pallas_call(
      functools.partial(_dkdv_kernel, st=st),
      grid=(b, hkv, sp // bk),
      in_specs=main_specs + extra_specs,
      out_specs=out_specs,
      out_shape=out_shape,
      input_output_aliases={6: 2} if st.fused_dq else {},
      compiler_params=_compiler_params(d, st),
      interpret=st.interpret,
      name="baichuan_flash_bwd_fused" if st.fused_dq else "baichuan_flash_dkdv",
  )(*main, *extra)
