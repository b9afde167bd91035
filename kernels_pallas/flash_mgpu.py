"""Flash attention for Hopper GPUs, written for Pallas' Mosaic GPU lowering (TMA + wgmma).

The Triton kernels (`flash_gpu`) reach 0.57-0.71x cuDNN fwd+bwd on an H200, mostly lost in the
backward. These kernels use what Triton's lowering does not give Pallas: TMA bulk copies into
swizzled shared memory, prefetched `stages` steps ahead, and asynchronous warpgroup matmuls
(`wgmma`) with operands read from shared memory (and, for the second matmul of each step, from
registers). Two forms per kernel (the `blocks` warpgroups): one warpgroup per program that
prefetches and computes (`plgpu.emit_pipeline`; the GPU overlaps one program's softmax with
another's matmuls when two share an SM), or two compute warpgroups, each with its own 64 rows,
that consume one stream of tiles a third warpgroup loads (`plgpu.emit_pipeline_warp_specialized`,
FlashAttention-3's split of roles), which in the forward may also take turns on the tensor cores
("pingpong": one's softmax under the other's matmuls, FlashAttention-3's schedule).

Layout is the model's [batch, seq, heads, head_dim]; GQA/MQA by kv head index. Causal or not,
ALiBi by position (positions may restart per document), packed segment ids; no in-kernel RoPE
(RoPE applied to q and k first, the training default). Three kernels, FlashAttention-2's split
(or two, the backward fused):

- forward, grid (heads, q blocks, batch): online softmax in base 2 over the key blocks up to the
  diagonal; writes the output and the log-sum-exp (base 2, fp32, [batch, heads, seq]).
- dQ, grid (heads, q blocks, batch): P = exp2(S - lse) per key block, dP = dO V^T,
  dS = P (dP - delta) with delta = rowsum(dO O) (one XLA reduction), dQ += dS K.
- dK/dV, grid (heads, k blocks, batch): the transposed products over the query blocks at or
  after the diagonal: dV += P^T dO, dK += dS^T Q. Gradients are per query head; GQA groups are
  summed after the kernel in fp32.
- or, with "fused" after the dK/dV blocks, one backward kernel (FlashAttention-3's form): the
  dK/dV kernel also writes each step's dS to shared memory and adds dS^T K (fp32, the scale
  applied) into a zero-initialised fp32 dQ buffer by a TMA reduce-add, so the backward does 5
  tile matmuls instead of 7 (no second pass to recompute S and dP for dQ), at the cost of the
  fp32 adds: 4 x head_dim bytes per query row per key block into L2.

Every sequence length must be a multiple of the blocks and head_dim 64 or 128 (`check_shapes`
says why a call does not fit; `kernels_pallas.flash_attention` stays the general path: any length,
in-kernel RoPE, TPU). Not measured on a GPU yet: benchmarks/gpu_suite.py's `attention mosaic`
section checks and times them beside cuDNN and the Triton kernels. The
kernels run on a CPU through Mosaic GPU's interpret mode (`interpret=True`), which simulates the
shared memory, the TMA copies and the barriers; tests/test_flash_mgpu.py checks them there against
`kernels_pallas.reference.attention_reference` and lowers them for CUDA.
"""

from __future__ import annotations

import functools
import inspect
import math
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

try:  # Mosaic GPU's interpret mode: public in some jax releases, private in others
  InterpretGPUParams = plgpu.InterpretParams
except AttributeError:
  try:
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
  except ImportError:  # a jax without it: the GPU path still works, `interpret=True` says why
    InterpretGPUParams = None

LOG2E = math.log2(math.e)

# Blocks, prefetch depth and compute warpgroups per kernel when the call gives none:
# (block_q, block_k, stages, warpgroups). wgmma tiles are 64 rows per warpgroup; at head_dim 128
# the forward's 64 x 64 key / value tiles in 2 stages hold 2 x 2 x 16 KiB of shared memory next
# to the 16 KiB query block (80 KiB: two programs per SM). One compute warpgroup until a GPU run
# says otherwise: benchmarks/gpu_suite.py times the other settings (MOSAIC_VARIANTS, among them
# two compute warpgroups and a memory one) and benchmarks/gpu_apply.py --write rewrites this
# block with the fastest when it wins by 3%.
# BEGIN MOSAIC_BLOCKS (benchmarks/gpu_apply.py rewrites this block)
DEFAULT_BLOCKS = {"fwd": (64, 64, 2, 1), "dq": (64, 64, 2, 1), "dkdv": (64, 64, 2, 1)}
# END MOSAIC_BLOCKS
_PHASES = ("fwd", "dq", "dkdv")
# A fifth element of the dK/dV kernel's blocks, (block_q, block_k, stages, warpgroups, FUSED):
# that kernel computes dQ too (one backward kernel; "dq"'s blocks are then unused). Of the
# forward's, PINGPONG (two compute warpgroups only): they take turns on the tensor cores, one's
# softmax under the other's matmuls (FlashAttention-3's schedule).
FUSED = "fused"
PINGPONG = "pingpong"
_OPTIONS = {"fwd": (PINGPONG, "two warpgroups taking turns on the tensor cores"),
            "dkdv": (FUSED, "dQ in that kernel too")}


def _transforms(dtype):
  """Shared-memory layout of a [rows, cols] tile for TMA and wgmma (and, fp32, the fused
  backward's dQ tile for the TMA reduce-add): (8, 128-byte) tiles with the 128-byte swizzle."""
  swizzle = 128
  return (plgpu.TilingTransform((8, swizzle // jnp.dtype(dtype).itemsize)),
          plgpu.SwizzleTransform(swizzle))


def check_shapes(q_shape, k_shape, dtype, blocks: dict) -> Optional[str]:
  """None when `flash_attention_mgpu` takes these shapes, else the reason it does not."""
  if len(q_shape) != 4 or len(k_shape) != 4:
    return f"q and k must be [batch, seq, heads, head_dim], got {q_shape} and {k_shape}"
  b, s, h, d = q_shape
  if k_shape[0] != b or k_shape[3] != d:
    return f"k's shape {k_shape} does not match q's {q_shape} (batch, head_dim)"
  if k_shape[1] != s:
    return f"q and k must have the same seq length (got {s} and {k_shape[1]})"
  if h % k_shape[2]:
    return f"heads={h} is not a multiple of kv heads={k_shape[2]}"
  if d not in (64, 128):
    return f"head_dim={d} is not 64 or 128"
  if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
    return f"dtype {jnp.dtype(dtype).name} is not bfloat16 or float16"
  for phase, (bq, bk, stages, wgs, *_) in blocks.items():
    if phase == "dq" and blocks.get("dkdv", ())[4:] == (FUSED,):
      continue  # dQ comes from the dK/dV kernel
    if bq % 64 or bk % 64 or bq > 128 or bk > 128:
      return f"{phase} blocks ({bq}, {bk}) must be 64 or 128"
    if stages < 1:
      return f"{phase} stages={stages} must be >= 1"
    if wgs not in (1, 2):
      return f"{phase} compute warpgroups={wgs} must be 1 or 2"
    if phase == "fwd" and blocks[phase][4:] == (PINGPONG,) and wgs != 2:
      return f"fwd {PINGPONG!r} needs 2 compute warpgroups (got {wgs})"
    own = bk if phase == "dkdv" else bq  # the rows a program owns: wgs blocks of them
    if s % (own * wgs) or s % bq or s % bk:
      return (f"seq={s} is not a multiple of the {phase} blocks ({bq}, {bk})"
              + (f" x {wgs} warpgroups" if wgs > 1 else ""))
  return None


def resolve_blocks(blocks: Optional[dict]) -> dict:
  """Every phase's (block_q, block_k, stages, compute warpgroups), from `blocks` (triples or
  quadruples; the warpgroups default to 1) and `DEFAULT_BLOCKS`; "fwd" may end in `PINGPONG`
  and "dkdv" in `FUSED` (a fifth element), kept there."""
  blocks = dict(blocks or {})
  unknown = set(blocks) - set(_PHASES)
  if unknown:
    raise ValueError(f"blocks has unknown phases {sorted(unknown)}: allowed {list(_PHASES)}")
  out = {}
  for phase in _PHASES:
    value = tuple(blocks.get(phase, DEFAULT_BLOCKS[phase]))
    option, meaning = _OPTIONS.get(phase, (None, None))
    has = option is not None and option in value
    if has and (len(value) != 5 or value[4] != option):
      raise ValueError(f"blocks[{phase!r}]={value!r}: {option!r} comes fifth, after the "
                       "compute warpgroups")
    ints = value[:4] if has else value
    if len(ints) not in (3, 4) or not all(isinstance(x, int) for x in ints):
      raise ValueError(
          f"blocks[{phase!r}]={value!r} is invalid: must be (block_q, block_k, stages) or "
          "(block_q, block_k, stages, compute warpgroups), ints"
          + (f"; {phase}'s may end in {option!r} ({meaning})" if option else ""))
    out[phase] = ints + (1,) * (4 - len(ints)) + ((option,) if has else ())
  return out


def _params(interpret):
  if interpret and InterpretGPUParams is None:
    raise NotImplementedError(f"interpret=True: jax {jax.__version__} has no Mosaic GPU "
                              "interpret mode")
  return dict(compiler_params=plgpu.CompilerParams(approx_math=True),
              interpret=InterpretGPUParams() if interpret else None)


def _layout(x, layout, interpret):
  """`x` laid out as `layout` in registers (no-op in interpret mode, which has no layouts)."""
  return x if interpret else plgpu.layout_cast(x, layout)


def _causal_keep(q0, k0, shape, interpret, queries_on_rows=True):
  """[rows, cols] True where the key is at or before the query: query q0 + row and key k0 + col
  (or, with `queries_on_rows=False`, key k0 + row and query q0 + col)."""
  if interpret:
    iota = functools.partial(lax.broadcasted_iota, jnp.int32, shape)
  else:
    iota = functools.partial(plgpu.broadcasted_iota, jnp.int32, shape, layout=plgpu.Layout.WGMMA)
  q_axis, k_axis = (0, 1) if queries_on_rows else (1, 0)
  return iota(q_axis) + q0 >= iota(k_axis) + k0


def _matmuls(products, interpret, between=None):
  """[acc + a @ b for each (a, b, shape, acc, transpose_a, transpose_b) of `products`] on the
  tensor cores, fp32: a from shared memory or registers (transposed: shared memory only), b from
  shared memory; acc None for a fresh product of `shape`.

  On the GPU the products of one call are `wgmma`s issued back to back and waited for once (one
  `pl.run_state` over their accumulators, each initialised from `acc` or zeros, updated in place),
  so independent products (S and dP; dV and dK) queue on the tensor cores without a wait between
  them; the transposes are views of the swizzled tiles. `between()`, if given, runs after they
  are issued and before the wait. Mosaic GPU's interpret mode takes neither
  `run_state` nor transposed views, so there each product is a jnp dot of the loaded tiles (fp32
  accumulation) added to `acc`; the pipeline, masks, softmax and copies around it run as on the
  GPU.
  """
  if interpret:
    outs = []
    for a, b, _, acc, transpose_a, transpose_b in products:
      a_val = a if isinstance(a, jax.Array) else a[...]
      dims = (((0 if transpose_a else 1,), (1 if transpose_b else 0,)), ((), ()))
      out = lax.dot_general(a_val, b[...], dims, preferred_element_type=jnp.float32)
      outs.append(out if acc is None else acc + out)
    if between is not None:
      between()
    return outs
  # `ref.transpose` is what `plgpu.transpose_ref` called up to jax 0.12.0 (removed in 0.12.1)
  view = lambda x, t: x.transpose((1, 0)) if t else x
  operands = [(view(a, ta), view(b, tb)) for a, b, _, _, ta, tb in products]
  if len(products) == 1 and products[0][3] is None:  # one fresh product: a scoped accumulator
    (a, b), shape = operands[0], products[0][2]

    def run(acc_ref):
      plgpu.wgmma(acc_ref, a, b)
      if between is not None:
        between()
      return acc_ref[...]
    return [pl.run_scoped(run, plgpu.ACC(shape, jnp.float32))]

  def issue(acc_refs):
    for ref, (a, b) in zip(acc_refs, operands):
      plgpu.wgmma(ref, a, b)
    if between is not None:
      between()
  init = tuple(plgpu.ACC.init(acc if acc is not None else
                              _layout(jnp.zeros(shape, jnp.float32), plgpu.Layout.WGMMA, False))
               for _, _, shape, acc, _, _ in products)
  return list(pl.run_state(issue)(init))


def _matmul(a, b, shape, acc=None, interpret=False, transpose_b=False, transpose_a=False,
            between=None):
  """One product of `_matmuls`: acc + a @ b (a^T, b^T with the transposes)."""
  return _matmuls([(a, b, shape, acc, transpose_a, transpose_b)], interpret, between)[0]


# Per-position side inputs, each optional: "seg", the segment ids [batch, seq] int32 (packed
# documents: a query sees only keys of its own segment), and "bias", ALiBi's per-position term
# [batch, heads, seq] fp32 = slope_h * position * log2(e). ALiBi adds slope * (k_pos - q_pos) to a
# score (in base 2: bias[k] - bias[q]), so one vector serves both sides. A program copies the
# vectors of its own block (queries in the forward and dQ kernels, keys in dK/dV) once, laid out
# along the rows of its tiles, and streams the other side's with each tile, along the columns.
_SIDES = ("seg", "bias")


def _side_index(name, bi, hi):
  return (bi,) if name == "seg" else (bi, hi)


def _scores(t, interpret, *, causal, q0, k0, own, streamed, queries_on_rows=True):
  """Scores (base 2) with the ALiBi term added and the masked ones at -inf. Rows are the
  program's own block: queries when `queries_on_rows`, else keys; `own` / `streamed`: the side
  vectors along the rows / columns, by name."""
  shape = t.shape
  q_vecs, k_vecs = (own, streamed) if queries_on_rows else (streamed, own)
  q_axis, k_axis = (0, 1) if queries_on_rows else (1, 0)
  along = lambda vec, axis: lax.broadcast_in_dim(vec, shape, [axis])
  if "bias" in own:
    t = t + (along(k_vecs["bias"], k_axis) - along(q_vecs["bias"], q_axis))
  if causal and "seg" not in own:  # only tiles that cross the diagonal need the mask
    rows, cols = shape
    q_first, k_last = (q0, k0 + cols - 1) if queries_on_rows else (q0, k0 + rows - 1)
    masked = lambda t: jnp.where(_causal_keep(q0, k0, shape, interpret, queries_on_rows), t,
                                 -jnp.inf)
    return lax.cond(k_last > q_first, masked, lambda t: t, t)
  keep = _causal_keep(q0, k0, shape, interpret, queries_on_rows) if causal else None
  if "seg" in own:
    same = along(q_vecs["seg"], q_axis) == along(k_vecs["seg"], k_axis)
    keep = same if keep is None else keep & same
  return t if keep is None else jnp.where(keep, t, -jnp.inf)


# The running max starts finite: a row whose keys in a block are all masked (a later segment's
# queries in the first key blocks) keeps m = -1e30, so exp2(m - m_new) = 1 and exp2(-inf - m) = 0
# instead of exp2(-inf + inf) = NaN.
_M_INIT = -1e30


def _copy_in(pairs, bars, wg):
  """TMA copies (GMEM view, SMEM ref), each arriving on its own barrier (warpgroup `wg`'s of
  it), then the waits."""
  for (src, dst), bar in zip(pairs, bars):
    plgpu.copy_gmem_to_smem(src, dst, bar.at[wg])
  for bar in bars[:len(pairs)]:
    plgpu.barrier_wait(bar.at[wg])


def _own_sides(names, refs, smems, bi, hi, start, size, interpret):
  """(copies of the program's own block of each side vector, then a loader of them as row
  vectors once the copies have landed)."""
  copies = [(ref.at[_side_index(n, bi, hi) + (pl.ds(start, size),)], sm)
            for n, ref, sm in zip(names, refs, smems)]
  load = lambda: {n: _load_vector(sm, 1, interpret) for n, sm in zip(names, smems)}
  return copies, load


def _streamed_sides(names, refs, bi, hi, size, index):
  """(BlockSpecs, GMEM views) streaming each side vector with the pipeline's tiles."""
  specs = [plgpu.BlockSpec((size,), lambda i: (index(i),)) for _ in names]
  views = [ref.at[_side_index(n, bi, hi)] for n, ref in zip(names, refs)]
  return specs, views


def _run_pipeline(step, *, wgs, steps, specs, views, stages, own):
  """Runs `step` over `steps` streamed tiles. wgs 1: one warpgroup issues the TMA prefetch
  (`stages` ahead) and computes (`plgpu.emit_pipeline`). wgs 2: two compute warpgroups, each with
  its own block of rows, consume one stream that a third, memory warpgroup fills
  (`plgpu.emit_pipeline_warp_specialized`: each tile is loaded once for both). `own(run)` is a
  compute warpgroup's prologue and epilogue around `run(init_carry) -> final carry`."""
  if wgs == 1:
    own(lambda carry: plgpu.emit_pipeline(step, grid=(steps,), in_specs=specs,
                                          max_concurrent_steps=stages, init_carry=carry)(*views))
    return
  plgpu.emit_pipeline_warp_specialized(
      step, grid=(steps,), in_specs=specs, max_concurrent_steps=stages, memory_registers=40,
      wg_axis="wg", num_compute_wgs=wgs, compute_context=own)(*views)


def _stream_keys(step, own, k_ref, v_ref, names, side_refs, *, bi, hi, group, bk, d, dtype,
                 steps, stages, wgs):
  """`_run_pipeline` over this (batch, head)'s key blocks 0..steps-1: K and V tiles of `bk`
  rows (the kv head of query head `hi`) and the keys' side vectors; the forward's and dQ's."""
  tile = plgpu.BlockSpec((bk, d), lambda j: (j, 0), transforms=_transforms(dtype))
  kvh = lax.div(hi, group)
  vec_specs, vec_views = _streamed_sides(names, side_refs, bi, hi, bk, lambda j: j)
  _run_pipeline(step, wgs=wgs, steps=steps, specs=[tile, tile] + vec_specs,
                views=[k_ref.at[bi, :, kvh], v_ref.at[bi, :, kvh]] + vec_views, stages=stages,
                own=own)


def _kernel_call(kernel, *, name, out_type, scratch, grid, grid_names, wgs, interpret, args,
                 accumulate=()):
  """`kernel(*args refs, *output refs, *scratch refs)` over `grid`; `accumulate`: arrays the
  programs add into (TMA reduce-add), passed after the outputs and returned after them. Those
  need their initial values, so such a call is a stateful kernel (`pl.kernel` on closed-over
  refs, or `pl.core_map` under jax 0.10, in a `pl.run_state` of the zero-initialised outputs
  and the accumulators) instead of `plgpu.kernel`, whose outputs start undefined."""
  call = functools.partial(_kernel_call_now, kernel, name=name, out_type=out_type,
                           scratch=scratch, grid=grid, grid_names=grid_names, wgs=wgs,
                           interpret=interpret, n_args=len(args))
  if not interpret:
    return call(*args, *accumulate)
  return _effect_free(call, *args, *accumulate)


def _effect_free(call, *args):
  """`call(*args)` as an effect-free op. Mosaic GPU's interpreter in jax >= 0.11 threads ordered
  IO callbacks through every interpreted kernel, and a scan refuses a body with such effects
  (flax's layer `nn.scan`: "broadcasted variable has a data dependency on the scan body"). A
  kernel is a pure function of its inputs, so where the interpreted call has effects it runs,
  compiled on its own, inside a `jax.pure_callback`; where it has none (jax 0.10) it is inlined
  as before. Compiled (GPU) kernels have no effects and never come here."""
  jaxpr, shapes = jax.make_jaxpr(call, return_shape=True)(*args)
  if not jaxpr.effects:
    return call(*args)
  return jax.pure_callback(jax.jit(call), shapes, *args)


def _kernel_call_now(kernel, *args, name, out_type, scratch, grid, grid_names, wgs, interpret,
                     n_args):
  """`name` (the mesh's `kernel_name`) names the compiled kernel: its PTX entry is
  `<name>_mosaic_gpu_kernel`, which is what a device profile and ptxas's report show."""
  accumulate, args = args[n_args:], args[:n_args]
  threads = dict(num_threads=wgs + 1, thread_name="wg") if wgs > 1 else {}
  params = _params(interpret)
  if not accumulate:
    return plgpu.kernel(kernel, out_type=out_type, scratch_types=tuple(scratch), grid=grid,
                        grid_names=grid_names, kernel_name=name, **threads, **params)(*args)
  mesh = plgpu.Mesh(grid=grid, grid_names=grid_names, kernel_name=name, **threads)
  kw = dict(compiler_params=params["compiler_params"], interpret=params["interpret"] or False)

  def stateful(refs):
    def body():
      pl.run_scoped(lambda *scratch_refs: kernel(*refs, *scratch_refs), *scratch,
                    collective_axes=threads.get("thread_name", ()))
    body.__name__ = name  # what `pl.core_map` names the kernel by
    # Since jax 0.11.0 `pl.kernel` aliases the closed-over refs it writes, and `pl.core_map`
    # (jax 0.10's way; its `pl.kernel` does not alias them) is a deprecated shim.
    if jax.__version_info__ < (0, 11, 0) and hasattr(pl, "core_map"):
      pl.core_map(mesh, **kw)(body)
    else:
      pl.kernel(body, out_type=(), mesh=mesh, name=name, **kw)()

  outs = [jnp.zeros(o.shape, o.dtype) for o in out_type] + list(accumulate)
  return tuple(pl.run_state(stateful)((*args, *outs))[n_args:])


def _per_warpgroup(wgs, shape, dtype, **kw):
  """Shared memory with one `shape` part per compute warpgroup: [wgs, *shape], or `shape` with
  one warpgroup (no warpgroup axis: see `_mine`)."""
  return plgpu.SMEM(((wgs,) if wgs > 1 else ()) + tuple(shape), dtype, **kw)


def _mine(ref, wg, wgs):
  """Warpgroup `wg`'s part of a `_per_warpgroup` ref. With one warpgroup there is no axis to
  index: a constant index (`ref.at[0]`) on a tile that a wgmma's `pl.run_state` closes over
  becomes a literal input of the run_state, which jax 0.11's lowering hands back as a Python
  int and then refuses ("Shaped arrays must be represented by ir.Values"): the one-warpgroup
  backward would not compile on the GPU."""
  return ref.at[wg] if wgs > 1 else ref


def _tile_scratch(wgs, rows, d, dtype, n):
  tr = _transforms(dtype)
  return [_per_warpgroup(wgs, (rows, d), dtype, transforms=tr) for _ in range(n)]


def _vector_scratch(wgs, rows, dtypes):
  return [_per_warpgroup(wgs, (rows,), dt) for dt in dtypes]


def _flash_fwd(q, k, v, sides, *, causal: bool, scale: float, blocks: tuple, interpret: bool):
  b, s, h, d = q.shape
  group = h // k.shape[2]
  bq, bk, stages, wgs = blocks[:4]
  pingpong = blocks[4:] == (PINGPONG,)
  nq = s // (bq * wgs)  # programs along the queries: wgs blocks of bq rows each
  c = scale * LOG2E
  names, ns = [n for n, _ in sides], len(sides)

  def kernel(q_ref, k_ref, v_ref, *refs):
    side_refs, (o_ref, lse_ref, q_smems, lse_smems) = refs[:ns], refs[ns:ns + 4]
    side_smems, bars = refs[ns + 4:2 * ns + 4], refs[2 * ns + 4:]
    turns = bars[-1] if pingpong else None  # both compute warpgroups arrive on it
    bars = bars[:-1] if pingpong else bars
    hi, bi = lax.axis_index("heads"), lax.axis_index("batch")
    wg = lax.axis_index("wg") if wgs > 1 else 0
    base = (nq - 1 - lax.axis_index("q_blocks")) * (bq * wgs)  # the longest causal rows first
    q0 = base + wg * bq
    q_smem, lse_smem = _mine(q_smems, wg, wgs), _mine(lse_smems, wg, wgs)
    side_smem = [_mine(sm, wg, wgs) for sm in side_smems]
    steps = lax.div(base + wgs * bq + bk - 1, bk) if causal else s // bk
    own = {}  # this warpgroup's side vectors, loaded in its prologue

    def turn():
      """Ping-pong: wait until the other compute warpgroup has arrived here too. Each one
      arrives after issuing S and after its softmax, so while one does its softmax the
      tensor cores run the other's P V and next S."""
      plgpu.barrier_arrive(turns)
      plgpu.barrier_wait(turns)

    def step(idx, k_smem, v_smem, *rest):
      *streamed_smem, (acc, m, l) = rest
      (j,) = idx
      streamed = {n: _load_vector(sm, 0, interpret) for n, sm in zip(names, streamed_smem)}
      t = _matmul(q_smem, k_smem, (bq, bk), interpret=interpret, transpose_b=True,
                  between=turn if pingpong else None) * c
      t = _scores(t, interpret, causal=causal, q0=q0, k0=j * bk, own=own, streamed=streamed)
      m_new = jnp.maximum(m, t.max(axis=1))
      alpha = jnp.exp2(m - m_new)
      p = jnp.exp2(t - lax.broadcast_in_dim(m_new, t.shape, [0]))
      l = l * alpha + p.sum(axis=1)
      acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
      if pingpong:
        turn()
      acc = _matmul(p.astype(q.dtype), v_smem, (bq, d), acc, interpret)
      return acc, m_new, l

    def prologue_epilogue(run):
      copies, load_own = _own_sides(names, side_refs, side_smem, bi, hi, q0, bq, interpret)
      _copy_in([(q_ref.at[bi, pl.ds(q0, bq), hi], q_smem)] + copies, bars, wg)
      own.update(load_own())
      rows = plgpu.Layout.WGMMA.reduce(1)
      if pingpong:  # the second warpgroup starts half a step behind the first
        pl.when(wg == 1)(turn)
      acc, m, l = run((_layout(jnp.zeros((bq, d), jnp.float32), plgpu.Layout.WGMMA, interpret),
                       _layout(jnp.full((bq,), _M_INIT, jnp.float32), rows, interpret),
                       _layout(jnp.zeros((bq,), jnp.float32), rows, interpret)))
      if pingpong:  # and the first matches its extra arrival
        pl.when(wg == 0)(turn)
      q_smem[...] = (acc / lax.broadcast_in_dim(l, acc.shape, [0])).astype(q.dtype)
      lse_smem[...] = m + jnp.log2(l)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(q_smem, o_ref.at[bi, pl.ds(q0, bq), hi])
      plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[bi, hi, pl.ds(q0, bq)])
      plgpu.wait_smem_to_gmem(0)

    _stream_keys(step, prologue_epilogue, k_ref, v_ref, names, side_refs, bi=bi, hi=hi,
                 group=group, bk=bk, d=d, dtype=q.dtype, steps=steps, stages=stages, wgs=wgs)

  return _kernel_call(
      kernel, name="baichuan_flash_mgpu_fwd",
      out_type=(jax.ShapeDtypeStruct(q.shape, q.dtype),
                jax.ShapeDtypeStruct((b, h, s), jnp.float32)),
      scratch=(_tile_scratch(wgs, bq, d, q.dtype, 1)
               + _vector_scratch(wgs, bq, [jnp.float32] + [a.dtype for _, a in sides])
               + [plgpu.Barrier(num_barriers=wgs) for _ in range(1 + ns)]
               + ([plgpu.Barrier(num_arrivals=2, num_barriers=1)] if pingpong else [])),
      grid=(h, nq, b), grid_names=("heads", "q_blocks", "batch"), wgs=wgs, interpret=interpret,
      args=(q, k, v, *(a for _, a in sides)))


def _load_vector(ref, axis, interpret):
  """A [block] vector from shared memory, laid out to broadcast along `axis` of a WGMMA tile
  (axis 1: one value per row; axis 0: one per column)."""
  if interpret:
    return ref[...]
  return plgpu.load(ref, *_LOAD_INDEX, layout=plgpu.Layout.WGMMA.reduce(axis))


# `plgpu.load`'s index: jax 0.10 requires it (`load(ref, idx, *, layout)`), 0.11 takes it but
# warns that it is deprecated, 0.12 refuses it (`load(ref, *, layout)`: index the ref first).
# So it is passed only where it is required. The whole ref is loaded either way.
_LOAD_IDX = inspect.signature(plgpu.load).parameters.get("idx")
_LOAD_INDEX = ((),) if _LOAD_IDX is not None and _LOAD_IDX.default is _LOAD_IDX.empty else ()


def _flash_dq(q, k, v, sides, do, lse, delta, *, causal, scale, blocks, interpret):
  b, s, h, d = q.shape
  group = h // k.shape[2]
  bq, bk, stages, wgs = blocks
  nq = s // (bq * wgs)
  c = scale * LOG2E
  names, ns = [n for n, _ in sides], len(sides)

  def kernel(q_ref, k_ref, v_ref, *refs):
    side_refs = refs[:ns]
    do_ref, lse_ref, delta_ref, dq_ref, q_smems, do_smems, lse_smems, delta_smems = (
        refs[ns:ns + 8])
    side_smems, bars = refs[ns + 8:2 * ns + 8], refs[2 * ns + 8:]
    hi, bi = lax.axis_index("heads"), lax.axis_index("batch")
    wg = lax.axis_index("wg") if wgs > 1 else 0
    base = (nq - 1 - lax.axis_index("q_blocks")) * (bq * wgs)
    q0 = base + wg * bq
    q_smem, do_smem, lse_smem, delta_smem = (
        _mine(sm, wg, wgs) for sm in (q_smems, do_smems, lse_smems, delta_smems))
    side_smem = [_mine(sm, wg, wgs) for sm in side_smems]
    rows = (bi, pl.ds(q0, bq), hi)
    steps = lax.div(base + wgs * bq + bk - 1, bk) if causal else s // bk
    own = {}

    def step(idx, k_smem, v_smem, *rest):
      *streamed_smem, dq = rest
      (j,) = idx
      streamed = {n: _load_vector(sm, 0, interpret) for n, sm in zip(names, streamed_smem)}
      t, dp = _matmuls([(q_smem, k_smem, (bq, bk), None, False, True),    # S = Q K^T
                        (do_smem, v_smem, (bq, bk), None, False, True)],  # dP = dO V^T
                       interpret)
      t = _scores(t * c, interpret, causal=causal, q0=q0, k0=j * bk, own=own, streamed=streamed)
      p = jnp.exp2(t - lax.broadcast_in_dim(own["lse"], t.shape, [0]))
      ds = p * (dp - lax.broadcast_in_dim(own["delta"], t.shape, [0]))
      return _matmul(ds.astype(q.dtype), k_smem, (bq, d), dq, interpret)

    def prologue_epilogue(run):
      copies, load_own = _own_sides(names, side_refs, side_smem, bi, hi, q0, bq, interpret)
      _copy_in([(q_ref.at[rows], q_smem), (do_ref.at[rows], do_smem),
                (lse_ref.at[bi, hi, pl.ds(q0, bq)], lse_smem),
                (delta_ref.at[bi, hi, pl.ds(q0, bq)], delta_smem)] + copies, bars, wg)
      own.update(load_own(), lse=_load_vector(lse_smem, 1, interpret),
                 delta=_load_vector(delta_smem, 1, interpret))
      dq = run(_layout(jnp.zeros((bq, d), jnp.float32), plgpu.Layout.WGMMA, interpret))
      q_smem[...] = (dq * scale).astype(q.dtype)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(q_smem, dq_ref.at[rows])
      plgpu.wait_smem_to_gmem(0)

    _stream_keys(step, prologue_epilogue, k_ref, v_ref, names, side_refs, bi=bi, hi=hi,
                 group=group, bk=bk, d=d, dtype=q.dtype, steps=steps, stages=stages, wgs=wgs)

  return _kernel_call(
      kernel, name="baichuan_flash_mgpu_dq",
      out_type=jax.ShapeDtypeStruct(q.shape, q.dtype),
      scratch=(_tile_scratch(wgs, bq, d, q.dtype, 2)
               + _vector_scratch(wgs, bq, [jnp.float32] * 2 + [a.dtype for _, a in sides])
               + [plgpu.Barrier(num_barriers=wgs) for _ in range(4 + ns)]),
      grid=(h, nq, b), grid_names=("heads", "q_blocks", "batch"), wgs=wgs, interpret=interpret,
      args=(q, k, v, *(a for _, a in sides), do, lse, delta))


def _flash_dkdv(q, k, v, sides, do, lse, delta, *, causal, scale, blocks, interpret):
  """dK and dV per query head, [batch, seq, heads, head_dim] each; with `blocks[4] == "fused"`
  also dQ, (dk, dv, dq) with dq fp32: each program adds its keys' share dS K of every query
  block it visits into a zero-initialised fp32 buffer (a TMA reduce-add, as FlashAttention-2
  and -3's atomic adds), so the backward is one kernel of 5 tile matmuls instead of the dQ and
  dK/dV kernels' 7."""
  b, s, h, d = q.shape
  group = h // k.shape[2]
  bq, bk, stages, wgs = blocks[:4]
  fused = blocks[4:] == (FUSED,)
  nq = s // bq
  tr = _transforms(q.dtype)
  c = scale * LOG2E
  names, ns = [n for n, _ in sides], len(sides)
  # the dQ buffer: one on the GPU (the reduce-adds are atomic); one per compute warpgroup in
  # interpret mode, where the add is a read-modify-write (the grid runs one program at a time
  # there, but a program's warpgroups run together), summed after the kernel
  dq_parts = wgs if interpret else 1

  def kernel(q_ref, k_ref, v_ref, *refs):
    # in the order `_kernel_call` passes them: inputs, outputs, then the scratch below
    refs = iter(refs)
    take = lambda n: [next(refs) for _ in range(n)]  # noqa: E731
    side_refs = take(ns)
    do_ref, lse_ref, delta_ref, dk_ref, dv_ref = take(5)
    dq_ref = next(refs) if fused else None
    k_smems, v_smems = take(2)
    ds_smems, dq_smems = take(2) if fused else (None, None)
    side_smems, bars = take(ns), list(refs)
    hi, bi = lax.axis_index("heads"), lax.axis_index("batch")
    wg = lax.axis_index("wg") if wgs > 1 else 0
    base = lax.axis_index("k_blocks") * (bk * wgs)  # the first blocks have the most queries
    k0 = base + wg * bk
    k_smem, v_smem = _mine(k_smems, wg, wgs), _mine(v_smems, wg, wgs)
    side_smem = [_mine(sm, wg, wgs) for sm in side_smems]
    kvh = lax.div(hi, group)
    first = lax.div(base, bq) if causal else 0  # query blocks before it see none of its keys
    own = {}  # along the rows: keys here

    def add_dq(i, part):
      """dQ[query block i] += part (this warpgroup's keys' share, fp32)."""
      dq_smem = _mine(dq_smems, wg, wgs)
      rows = dq_ref.at[wg if interpret else 0, bi, pl.ds(i * bq, bq), hi]
      if interpret:  # read, add, write back (no reduce-add there)
        _copy_in([(rows, dq_smem)], bars[-1:], wg)
        dq_smem[...] = part + dq_smem[...]
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(dq_smem, rows)
        plgpu.wait_smem_to_gmem(0)
      else:
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the last step's add has read dq_smem
        dq_smem[...] = part
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(dq_smem, rows, reduction_op="add")

    def step(idx, q_smem, do_smem, lse_smem, delta_smem, *rest):
      *streamed_smem, (dk, dv) = rest
      i = idx[0] + first
      streamed = {n: _load_vector(sm, 0, interpret) for n, sm in zip(names, streamed_smem)}
      t, dp = _matmuls([(k_smem, q_smem, (bk, bq), None, False, True),    # S^T = K Q^T
                        (v_smem, do_smem, (bk, bq), None, False, True)],  # dP^T = V dO^T
                       interpret)
      t = _scores(t * c, interpret, causal=causal, q0=i * bq, k0=k0, own=own, streamed=streamed,
                  queries_on_rows=False)
      p = jnp.exp2(t - lax.broadcast_in_dim(_load_vector(lse_smem, 0, interpret), t.shape, [1]))
      delta_cols = _load_vector(delta_smem, 0, interpret)
      ds = (p * (dp - lax.broadcast_in_dim(delta_cols, t.shape, [1]))).astype(q.dtype)
      products = [(p.astype(q.dtype), do_smem, (bk, d), dv, False, False),  # dV += P^T dO
                  (ds, q_smem, (bk, d), dk, False, False)]                   # dK += dS^T Q
      if not fused:
        dv, dk = _matmuls(products, interpret)
        return dk, dv
      ds_smem = _mine(ds_smems, wg, wgs)
      ds_smem[...] = ds
      plgpu.commit_smem()  # the registers' stores, visible to the wgmma
      dv, dk = _matmuls(products, interpret)
      [part] = _matmuls([(ds_smem, k_smem, (bq, d), None, True, False)],
                        interpret)  # dS K for this warpgroup's keys
      add_dq(i, part * scale)
      return dk, dv

    def prologue_epilogue(run):
      copies, load_own = _own_sides(names, side_refs, side_smem, bi, hi, k0, bk, interpret)
      _copy_in([(k_ref.at[bi, pl.ds(k0, bk), kvh], k_smem),
                (v_ref.at[bi, pl.ds(k0, bk), kvh], v_smem)] + copies, bars, wg)
      own.update(load_own())
      zeros = _layout(jnp.zeros((bk, d), jnp.float32), plgpu.Layout.WGMMA, interpret)
      dk, dv = run((zeros, zeros))
      k_smem[...] = (dk * scale).astype(q.dtype)
      v_smem[...] = dv.astype(q.dtype)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(k_smem, dk_ref.at[bi, pl.ds(k0, bk), hi])
      plgpu.copy_smem_to_gmem(v_smem, dv_ref.at[bi, pl.ds(k0, bk), hi])
      plgpu.wait_smem_to_gmem(0)

    tile = plgpu.BlockSpec((bq, d), lambda i: (i + first, 0), transforms=tr)
    vec = plgpu.BlockSpec((bq,), lambda i: (i + first,))
    vec_specs, vec_views = _streamed_sides(names, side_refs, bi, hi, bq, lambda i: i + first)
    _run_pipeline(
        step, wgs=wgs, steps=nq - first, specs=[tile, tile, vec, vec] + vec_specs,
        views=[q_ref.at[bi, :, hi], do_ref.at[bi, :, hi], lse_ref.at[bi, hi],
               delta_ref.at[bi, hi]] + vec_views, stages=stages, own=prologue_epilogue)

  per_head = jax.ShapeDtypeStruct(q.shape, q.dtype)
  fused_scratch = ([_per_warpgroup(wgs, (bk, bq), q.dtype, transforms=tr),
                    _per_warpgroup(wgs, (bq, d), jnp.float32, transforms=_transforms(jnp.float32))]
                   if fused else [])
  out = _kernel_call(
      kernel, name="baichuan_flash_mgpu_bwd_fused" if fused else "baichuan_flash_mgpu_dkdv",
      out_type=(per_head, per_head),
      scratch=(_tile_scratch(wgs, bk, d, q.dtype, 2) + fused_scratch
               + _vector_scratch(wgs, bk, [a.dtype for _, a in sides])
               + [plgpu.Barrier(num_barriers=wgs)
                  for _ in range(2 + ns + (fused and interpret))]),
      grid=(h, s // (bk * wgs), b), grid_names=("heads", "k_blocks", "batch"), wgs=wgs,
      interpret=interpret, args=(q, k, v, *(a for _, a in sides), do, lse, delta),
      accumulate=[jnp.zeros((dq_parts, b, s, h, d), jnp.float32)] if fused else [])
  if fused:
    dk, dv, dq = out
    return dk, dv, dq.sum(0)
  return out


def flash_attention_mgpu(q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool = True,
                         alibi_slopes: Optional[jax.Array] = None,
                         segment_ids: Optional[jax.Array] = None,
                         positions: Optional[jax.Array] = None,
                         sm_scale: Optional[float] = None, blocks: Optional[dict] = None,
                         interpret: bool = False) -> jax.Array:
  """Softmax attention by the Mosaic GPU kernels, differentiable (fwd + dQ + dK/dV kernels, or
  fwd + one backward kernel when "dkdv"'s blocks end in `FUSED`).

  The arguments mean what they mean for `kernels_pallas.flash_attention` (the same reference:
  `kernels_pallas.attention_reference`); no in-kernel RoPE.

  Args:
    q: [batch, seq, heads, head_dim], bfloat16 or float16; head_dim 64 or 128.
    k, v: [batch, seq, kv_heads, head_dim]; kv_heads divides heads.
    causal: query i sees keys j <= i.
    alibi_slopes: [heads] fp32 (constants: no gradient flows to them); adds
      -slope_h * (pos_i - pos_j) to the scores. The kernels add slope * pos * log2(e) of the key
      and subtract that of the query, each rounded to fp32 (at position 8,192 and slope 0.5 a
      score is within ~5e-4 of the exact distance term, under bf16's resolution).
    segment_ids: [batch, seq] int (packed documents): a query sees only keys with the same id;
      every query must see at least itself (causal) or one key of its segment.
    positions: [batch, seq] int positions for the ALiBi distance (default 0..seq-1).
    sm_scale: score scale (default head_dim ** -0.5).
    blocks: per kernel ("fwd", "dq", "dkdv") a (block_q, block_k, stages[, warpgroups]) tuple:
      each block 64 or 128 and dividing seq; stages, the prefetch depth; warpgroups 1 (one
      warpgroup prefetches and computes) or 2 (two compute warpgroups, each with its own block
      of rows, consume the tiles a third warpgroup loads; seq must then be a multiple of twice
      the owned block). "fwd" with two warpgroups may have a fifth element, `PINGPONG`
      ("pingpong"): they take turns on the tensor cores. "dkdv" may have one, `FUSED`
      ("fused"): its kernel then
      computes dQ too, adding each key block's share into a fp32 buffer (TMA reduce-adds), and
      "dq" is unused. Default `DEFAULT_BLOCKS` (read at each call).
    interpret: run in Mosaic GPU's interpret mode (CPU).
  Returns:
    [batch, seq, heads, head_dim] in q's dtype.
  Raises:
    ValueError naming what does not fit (`check_shapes`).
  """
  resolved = resolve_blocks(blocks)
  b, s, h = q.shape[:3] if q.ndim == 4 else (None, None, None)
  reason = check_shapes(q.shape, k.shape, q.dtype, resolved)
  if reason is None and (v.shape != k.shape or q.dtype != k.dtype or q.dtype != v.dtype):
    reason = f"v {v.shape} {v.dtype} must match k {k.shape} {k.dtype} and q's dtype {q.dtype}"
  for name, arr, want in (("segment_ids", segment_ids, (b, s)), ("positions", positions, (b, s)),
                          ("alibi_slopes", alibi_slopes, (h,))):
    if reason is None and arr is not None and tuple(arr.shape) != want:
      reason = f"{name} {tuple(arr.shape)} must be {want}"
  if reason is not None:
    raise ValueError(f"flash_attention_mgpu: {reason}")
  scale = float(q.shape[-1] ** -0.5 if sm_scale is None else sm_scale)
  seg = None if segment_ids is None else segment_ids.astype(jnp.int32)
  bias = None
  if alibi_slopes is not None:
    pos = (jnp.broadcast_to(jnp.arange(s, dtype=jnp.float32), (b, s)) if positions is None
           else positions.astype(jnp.float32))
    slopes = lax.stop_gradient(alibi_slopes.astype(jnp.float32)) * LOG2E
    bias = slopes[None, :, None] * pos[:, None, :]  # [batch, heads, seq]
  return _attention(q, k, v, seg, bias, bool(causal), scale,
                    tuple(resolved[p] for p in _PHASES), bool(interpret))


def _side_list(seg, bias):
  return tuple((n, a) for n, a in zip(_SIDES, (seg, bias)) if a is not None)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8))
def _attention(q, k, v, seg, bias, causal, scale, blocks, interpret):
  return _attention_fwd(q, k, v, seg, bias, causal, scale, blocks, interpret)[0]


def _attention_fwd(q, k, v, seg, bias, causal, scale, blocks, interpret):
  out, lse = _flash_fwd(q, k, v, _side_list(seg, bias), causal=causal, scale=scale,
                        blocks=blocks[0], interpret=interpret)
  return out, (q, k, v, seg, bias, out, lse)


def _attention_bwd(causal, scale, blocks, interpret, res, do):
  q, k, v, seg, bias, out, lse = res
  do = do.astype(q.dtype)
  delta = jnp.einsum("bshd,bshd->bhs", out.astype(jnp.float32), do.astype(jnp.float32))
  kw = dict(causal=causal, scale=scale, interpret=interpret)
  sides = _side_list(seg, bias)
  if blocks[2][4:] == (FUSED,):  # one kernel: dQ by reduce-adds into fp32
    dk, dv, dq = _flash_dkdv(q, k, v, sides, do, lse, delta, blocks=blocks[2], **kw)
    dq = dq.astype(q.dtype)
  else:
    dq = _flash_dq(q, k, v, sides, do, lse, delta, blocks=blocks[1], **kw)
    dk, dv = _flash_dkdv(q, k, v, sides, do, lse, delta, blocks=blocks[2], **kw)
  group = q.shape[2] // k.shape[2]
  if group > 1:  # per query head -> per kv head, summed in fp32
    grouped = lambda x: x.reshape(*k.shape[:3], group, k.shape[3]).astype(jnp.float32).sum(3)
    dk, dv = grouped(dk).astype(k.dtype), grouped(dv).astype(v.dtype)
  dseg = None if seg is None else np.zeros(seg.shape, jax.dtypes.float0)
  dbias = None if bias is None else jnp.zeros_like(bias)  # the slopes are constants
  return dq, dk, dv, dseg, dbias


_attention.defvjp(_attention_fwd, _attention_bwd)
