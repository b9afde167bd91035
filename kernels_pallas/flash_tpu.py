"""Flash attention kernels for TPUs, written for Pallas' Mosaic lowering.

Layout is head-major [batch, heads, seq, head_dim] so every block is a (rows, head_dim) VMEM tile.
The key loop is the last ("arbitrary") grid axis and the running max / sum / accumulator live in
VMEM scratch, the Mosaic-native pipelining pattern:

- forward, grid (batch, heads, q_blocks, k_blocks): online softmax; writes out and lse
  [batch, heads, seq, 1] fp32.
- dq, grid (batch, heads, q_blocks, k_blocks): accumulates dQ in scratch.
- dk/dv, grid (batch, kv_heads, k_blocks, groups * q_blocks): the reduction axis walks every query
  head of the kv head's group and every query block, so GQA/MQA gradients are summed in-kernel.

Under causal masking, blocks above the diagonal are skipped twice over: `pl.when` skips the compute
and the index maps clamp to the last useful block, so the pipeline issues no DMA for them.
Segment ids and positions travel as [batch, seq, 1] (query side) and [batch, 1, seq] (key side)
so each block is a column or a row that broadcasts against the [block_q, block_k] scores. ALiBi
slopes sit in SMEM and are read as one scalar per head. Run on CPU inside
`pltpu.force_tpu_interpret_mode()`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels_pallas._common import (AttnStatic, dot_nn, dot_nt, dot_tn, online_softmax_step,
                                    scores_bias_mask)


def _params(n_parallel: int):
  return pltpu.CompilerParams(
      dimension_semantics=("parallel",) * n_parallel + ("arbitrary",))


def _last_k_block(i, st: AttnStatic):
  """Last key block that query block i can see under causal masking."""
  return jax.lax.div((i + 1) * st.block_q - 1, st.block_k)


def _first_q_block(j, st: AttnStatic):
  """First query block that can see key block j under causal masking."""
  return jax.lax.div(j * st.block_k, st.block_q)


def _extras(refs, st: AttnStatic, n_main: int):
  main, rest = list(refs[:n_main]), list(refs[n_main:])
  slopes = rest.pop(0) if st.has_alibi else None
  q_seg, k_seg = (rest.pop(0), rest.pop(0)) if st.has_segments else (None, None)
  q_pos, k_pos = (rest.pop(0), rest.pop(0)) if st.has_positions else (None, None)
  return main, slopes, q_seg, k_seg, q_pos, k_pos, rest


def _masked_scores(q, k, i, j, head, slopes_ref, q_seg_ref, k_seg_ref, q_pos_ref, k_pos_ref,
                   st: AttnStatic, causal_mask: bool = True):
  """[block_q, block_k] fp32 scores of query block i against key block j, biased and masked."""
  bq, bk = st.block_q, st.block_k
  s = dot_nt(q, k) * st.sm_scale
  q_idx = i * bq + jax.lax.broadcasted_iota(jnp.int32, (bq, bk), 0)
  k_idx = j * bk + jax.lax.broadcasted_iota(jnp.int32, (bq, bk), 1)
  return scores_bias_mask(
      s, q_idx, k_idx, st,
      slope=slopes_ref[head] if st.has_alibi else None,
      q_seg=None if q_seg_ref is None else q_seg_ref[...],
      k_seg=None if k_seg_ref is None else k_seg_ref[...],
      q_pos=None if q_pos_ref is None else q_pos_ref[...],
      k_pos=None if k_pos_ref is None else k_pos_ref[...],
      causal_mask=causal_mask)


def _fwd_kernel(*refs, st: AttnStatic):
  (q_ref, k_ref, v_ref), slopes, q_seg, k_seg, q_pos, k_pos, rest = _extras(refs, st, 3)
  o_ref, lse_ref, m_sc, l_sc, acc_sc = rest
  h, i, j = pl.program_id(1), pl.program_id(2), pl.program_id(3)
  bq, bk = st.block_q, st.block_k

  @pl.when(j == 0)
  def _init():
    m_sc[...] = jnp.full(m_sc.shape, -jnp.inf, jnp.float32)
    l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
    acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

  def step(causal_mask):
    v = v_ref[...]
    s = _masked_scores(q_ref[...], k_ref[...], i, j, h, slopes, q_seg, k_seg, q_pos, k_pos, st,
                       causal_mask)
    # statistics [block_q, 1]
    acc_sc[...], m_sc[...], l_sc[...] = online_softmax_step(acc_sc[...], m_sc[...], l_sc[...], s, v)

  if st.causal:
    below = (j + 1) * bk - 1 <= i * bq  # every key of the block precedes every query
    on_diag = jnp.logical_and(jnp.logical_not(below), j * bk <= (i + 1) * bq - 1)
    pl.when(below)(functools.partial(step, False))
    pl.when(on_diag)(functools.partial(step, True))
  else:
    step(True)

  @pl.when(j == pl.num_programs(3) - 1)
  def _finish():
    l = l_sc[...]
    o_ref[...] = (acc_sc[...] / l).astype(o_ref.dtype)
    lse_ref[...] = m_sc[...] + jnp.log(l)


def _extra_inputs(slopes, seg, pos, st: AttnStatic, q_block_of, k_block_of):
  """Slopes (SMEM) plus query-column / key-row views of segment ids and positions."""
  args, specs = [], []
  if st.has_alibi:
    args.append(slopes)
    specs.append(pl.BlockSpec(memory_space=pltpu.SMEM))
  for arr, flag in ((seg, st.has_segments), (pos, st.has_positions)):
    if flag:
      args += [arr[:, :, None], arr[:, None, :]]
      specs += [pl.BlockSpec((None, st.block_q, 1), lambda *g: (g[0], q_block_of(*g), 0)),
                pl.BlockSpec((None, 1, st.block_k), lambda *g: (g[0], 0, k_block_of(*g)))]
  return args, specs


def forward(q, k, v, slopes, seg, pos, st: AttnStatic):
  """Forward kernel.

  Args:
    q: [batch, heads, seq_pad, head_dim]; k, v: [batch, kv_heads, seq_pad, head_dim].
    slopes: [heads] fp32 or None; seg, pos: [batch, seq_pad] int32 or None.
    st: static settings.
  Returns:
    (out [batch, heads, seq_pad, head_dim] in q's dtype, lse [batch, heads, seq_pad, 1] fp32).
  """
  b, h, sp, d = q.shape
  g, bq, bk = st.groups, st.block_q, st.block_k

  def kb(bi, hi, i, j):
    return jnp.minimum(j, _last_k_block(i, st)) if st.causal else j

  extra, extra_specs = _extra_inputs(slopes, seg, pos, st, lambda bi, hi, i, j: i, kb)
  q_spec = pl.BlockSpec((None, None, bq, d), lambda bi, hi, i, j: (bi, hi, i, 0))
  kv_spec = pl.BlockSpec((None, None, bk, d), lambda bi, hi, i, j: (bi, jax.lax.div(hi, g), kb(bi, hi, i, j), 0))
  lse_spec = pl.BlockSpec((None, None, bq, 1), lambda bi, hi, i, j: (bi, hi, i, 0))
  return pl.pallas_call(
      functools.partial(_fwd_kernel, st=st),
      grid=(b, h, sp // bq, sp // bk),
      in_specs=[q_spec, kv_spec, kv_spec] + extra_specs,
      out_specs=[q_spec, lse_spec],
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct((b, h, sp, 1), jnp.float32)],
      scratch_shapes=[pltpu.VMEM((bq, 1), jnp.float32), pltpu.VMEM((bq, 1), jnp.float32),
                      pltpu.VMEM((bq, d), jnp.float32)],
      compiler_params=_params(3),
      name="baichuan_flash_fwd_tpu",
  )(q, k, v, *extra)


def _dq_kernel(*refs, st: AttnStatic):
  (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref), slopes, q_seg, k_seg, q_pos, k_pos, rest = (
      _extras(refs, st, 6))
  dq_ref, dq_sc = rest
  h, i, j = pl.program_id(1), pl.program_id(2), pl.program_id(3)

  @pl.when(j == 0)
  def _init():
    dq_sc[...] = jnp.zeros(dq_sc.shape, jnp.float32)

  def step():
    k, v, do = k_ref[...], v_ref[...], do_ref[...]
    s = _masked_scores(q_ref[...], k, i, j, h, slopes, q_seg, k_seg, q_pos, k_pos, st)
    p = jnp.exp(s - lse_ref[...])
    ds = p * (dot_nt(do, v) - delta_ref[...])
    dq_sc[...] += dot_nn(ds.astype(k.dtype), k)

  if st.causal:
    pl.when(j * st.block_k <= (i + 1) * st.block_q - 1)(step)
  else:
    step()

  @pl.when(j == pl.num_programs(3) - 1)
  def _finish():
    dq_ref[...] = (dq_sc[...] * st.sm_scale).astype(dq_ref.dtype)


def backward_dq(q, k, v, do, lse, delta, slopes, seg, pos, st: AttnStatic):
  """dQ kernel. lse, delta: [batch, heads, seq_pad, 1] fp32. Returns dq like q."""
  b, h, sp, d = q.shape
  g, bq, bk = st.groups, st.block_q, st.block_k

  def kb(bi, hi, i, j):
    return jnp.minimum(j, _last_k_block(i, st)) if st.causal else j

  extra, extra_specs = _extra_inputs(slopes, seg, pos, st, lambda bi, hi, i, j: i, kb)
  q_spec = pl.BlockSpec((None, None, bq, d), lambda bi, hi, i, j: (bi, hi, i, 0))
  kv_spec = pl.BlockSpec((None, None, bk, d), lambda bi, hi, i, j: (bi, jax.lax.div(hi, g), kb(bi, hi, i, j), 0))
  row_spec = pl.BlockSpec((None, None, bq, 1), lambda bi, hi, i, j: (bi, hi, i, 0))
  return pl.pallas_call(
      functools.partial(_dq_kernel, st=st),
      grid=(b, h, sp // bq, sp // bk),
      in_specs=[q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec] + extra_specs,
      out_specs=q_spec,
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      scratch_shapes=[pltpu.VMEM((bq, d), jnp.float32)],
      compiler_params=_params(3),
      name="baichuan_flash_dq_tpu",
  )(q, k, v, do, lse, delta, *extra)


def _dkdv_kernel(*refs, st: AttnStatic):
  (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref), slopes, q_seg, k_seg, q_pos, k_pos, rest = (
      _extras(refs, st, 6))
  dk_ref, dv_ref, dk_sc, dv_sc = rest
  hk, j, r = pl.program_id(1), pl.program_id(2), pl.program_id(3)
  nq = st.seq_pad // st.block_q
  head, i = hk * st.groups + jax.lax.div(r, nq), jax.lax.rem(r, nq)

  @pl.when(r == 0)
  def _init():
    dk_sc[...] = jnp.zeros(dk_sc.shape, jnp.float32)
    dv_sc[...] = jnp.zeros(dv_sc.shape, jnp.float32)

  def step():
    q, k, v, do = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
    s = _masked_scores(q, k, i, j, head, slopes, q_seg, k_seg, q_pos, k_pos, st)
    p = jnp.exp(s - lse_ref[...])  # [block_q, block_k]
    dv_sc[...] += dot_tn(p.astype(do.dtype), do)
    ds = p * (dot_nt(do, v) - delta_ref[...])
    dk_sc[...] += dot_tn(ds.astype(q.dtype), q)

  if st.causal:
    pl.when((i + 1) * st.block_q - 1 >= j * st.block_k)(step)
  else:
    step()

  @pl.when(r == pl.num_programs(3) - 1)
  def _finish():
    dk_ref[...] = (dk_sc[...] * st.sm_scale).astype(dk_ref.dtype)
    dv_ref[...] = dv_sc[...].astype(dv_ref.dtype)


def backward_dkdv(q, k, v, do, lse, delta, slopes, seg, pos, st: AttnStatic):
  """dK/dV kernel (sums over the query heads of each kv head). Returns (dk, dv) like k, v."""
  b, h, sp, d = q.shape
  hkv, g, bq, bk = k.shape[1], st.groups, st.block_q, st.block_k
  nq = sp // bq

  def qb(bi, hk, j, r):
    i = jax.lax.rem(r, nq)
    return jnp.maximum(i, _first_q_block(j, st)) if st.causal else i

  def qh(hk, r):
    return hk * g + jax.lax.div(r, nq)

  extra, extra_specs = _extra_inputs(slopes, seg, pos, st, qb, lambda bi, hk, j, r: j)
  q_spec = pl.BlockSpec((None, None, bq, d), lambda bi, hk, j, r: (bi, qh(hk, r), qb(bi, hk, j, r), 0))
  row_spec = pl.BlockSpec((None, None, bq, 1),
                          lambda bi, hk, j, r: (bi, qh(hk, r), qb(bi, hk, j, r), 0))
  kv_spec = pl.BlockSpec((None, None, bk, d), lambda bi, hk, j, r: (bi, hk, j, 0))
  return pl.pallas_call(
      functools.partial(_dkdv_kernel, st=st),
      grid=(b, hkv, sp // bk, g * nq),
      in_specs=[q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec] + extra_specs,
      out_specs=[kv_spec, kv_spec],
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
      scratch_shapes=[pltpu.VMEM((bk, d), jnp.float32), pltpu.VMEM((bk, d), jnp.float32)],
      compiler_params=_params(3),
      name="baichuan_flash_dkdv_tpu",
  )(q, k, v, do, lse, delta, *extra)
