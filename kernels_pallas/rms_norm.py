"""Fused RMSNorm, forward and backward, for GPU (Triton) and TPU (Mosaic), with a custom VJP.

One program normalises `block_rows` rows. The forward pass reads x once for the mean square and once
to write y = x * rstd * scale, and saves rstd [rows] (fp32) for the backward pass, which computes

  dx = rstd * g - x * rstd^3 * mean(g * x),   g = dy * scale,
  dscale = sum over rows of dy * x * rstd   (per-program partial sums, added up outside),

all in fp32. On GPU the hidden axis is walked in power-of-two column chunks (Triton value shapes
must be powers of two; 5120 = 5 x 1024); on TPU each block holds whole rows.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as plgpu

from kernels_pallas.attention import resolve_backend
from kernels_pallas.reference import rms_norm_reference

# GPU: 2 rows x 8 warps was fastest forward and forward+backward on an H100 at 16384 x 4096 bf16
# (benchmarks/rms_norm.py --sweep; docs/kernels.md).
DEFAULT_BLOCK_ROWS = {"gpu": 2, "tpu": 64}
# Triton launch settings of the GPU kernels (read when a call is traced).
GPU_LAUNCH = {"num_warps": 8, "num_stages": 1}


def _col_chunk(hidden: int, kind: str) -> int:
  """Column chunk width: TPU takes whole rows; GPU the largest power of two <= 1024 dividing it."""
  if kind == "tpu":
    return hidden
  return min(1024, hidden & -hidden)


def _chunks(fn, init, hidden: int, chunk: int):
  """Folds fn(column_slice, carry) over the column chunks (a static call when there is one)."""
  if chunk == hidden:
    return fn(pl.ds(0, hidden), init)
  return jax.lax.fori_loop(0, hidden // chunk, lambda c, a: fn(pl.ds(c * chunk, chunk), a), init)


def _fwd_kernel(x_ref, w_ref, o_ref, rstd_ref, *, eps: float, chunk: int):
  rows, hidden = x_ref.shape

  def sumsq(cols, acc):
    x = x_ref[:, cols].astype(jnp.float32)
    return acc + jnp.sum(x * x, axis=1, keepdims=True)

  ss = _chunks(sumsq, jnp.zeros((rows, 1), jnp.float32), hidden, chunk)
  rstd = jax.lax.rsqrt(ss / hidden + eps)  # [rows, 1]

  def write(cols, carry):
    x = x_ref[:, cols].astype(jnp.float32)
    o_ref[:, cols] = (x * rstd * w_ref[:, cols].astype(jnp.float32)).astype(o_ref.dtype)
    return carry

  _chunks(write, 0, hidden, chunk)
  rstd_ref[...] = rstd


def _bwd_kernel(x_ref, w_ref, dy_ref, rstd_ref, dx_ref, dw_ref, *, chunk: int):
  rows, hidden = x_ref.shape
  rstd = rstd_ref[...]  # [rows, 1]

  def load(cols):
    x = x_ref[:, cols].astype(jnp.float32)
    dy = dy_ref[:, cols].astype(jnp.float32)
    return x, dy, dy * w_ref[:, cols].astype(jnp.float32)

  def dot_gx(cols, acc):
    x, _, g = load(cols)
    return acc + jnp.sum(g * x, axis=1, keepdims=True)

  mean_gx = _chunks(dot_gx, jnp.zeros((rows, 1), jnp.float32), hidden, chunk) / hidden

  def write(cols, carry):
    x, dy, g = load(cols)
    dx_ref[:, cols] = (rstd * g - x * (rstd * rstd * rstd) * mean_gx).astype(dx_ref.dtype)
    dw_ref[:, cols] = jnp.sum(dy * x * rstd, axis=0, keepdims=True)
    return carry

  _chunks(write, 0, hidden, chunk)


def _launch(kernel, kind: str, interpret: bool, grid, in_specs, out_specs, out_shape, name):
  if kind == "gpu":
    return pl.pallas_call(kernel, grid=grid, in_specs=in_specs, out_specs=out_specs,
                          out_shape=out_shape, interpret=interpret, name=name,
                          compiler_params=plgpu.CompilerParams(**GPU_LAUNCH))
  def call(*args):
    return pl.pallas_call(
        kernel, grid=grid, in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
        name=name, compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel",)))(*args)

  if interpret:
    def run(*args):
      # The interpret flag is read when pallas_call is built, so build it inside the context.
      with pltpu.force_tpu_interpret_mode():
        return call(*args)
    return run
  return call


def _specs(rows: int, hidden: int):
  row_spec = pl.BlockSpec((rows, hidden), lambda i: (i, 0))
  w_spec = pl.BlockSpec((1, hidden), lambda i: (0, 0))
  rstd_spec = pl.BlockSpec((rows, 1), lambda i: (i, 0))
  return row_spec, w_spec, rstd_spec


def _forward(kind, interpret, rows, eps, x2, w2):
  n, hidden = x2.shape
  row_spec, w_spec, rstd_spec = _specs(rows, hidden)
  return _launch(functools.partial(_fwd_kernel, eps=eps, chunk=_col_chunk(hidden, kind)),
                 kind, interpret, (n // rows,), [row_spec, w_spec], [row_spec, rstd_spec],
                 [jax.ShapeDtypeStruct(x2.shape, x2.dtype),
                  jax.ShapeDtypeStruct((n, 1), jnp.float32)], "baichuan_rms_norm_fwd")(x2, w2)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3))
def _rms(kind, interpret, rows, eps, x2, w2):
  return _forward(kind, interpret, rows, eps, x2, w2)[0]


def _rms_fwd(kind, interpret, rows, eps, x2, w2):
  y, rstd = _forward(kind, interpret, rows, eps, x2, w2)
  return y, (x2, w2, rstd)


def _rms_bwd(kind, interpret, rows, eps, res, dy):
  del eps
  x2, w2, rstd = res
  n, hidden = x2.shape
  row_spec, w_spec, rstd_spec = _specs(rows, hidden)
  part_spec = pl.BlockSpec((None, 1, hidden), lambda i: (i, 0, 0))
  dx, dw_parts = _launch(
      functools.partial(_bwd_kernel, chunk=_col_chunk(hidden, kind)), kind, interpret,
      (n // rows,), [row_spec, w_spec, row_spec, rstd_spec], [row_spec, part_spec],
      [jax.ShapeDtypeStruct(x2.shape, x2.dtype),
       jax.ShapeDtypeStruct((n // rows, 1, hidden), jnp.float32)],
      "baichuan_rms_norm_bwd")(x2, w2, dy, rstd)
  return dx, jnp.sum(dw_parts, axis=0).astype(w2.dtype)


_rms.defvjp(_rms_fwd, _rms_bwd)


def rms_norm_kernel_fits(hidden: int, backend: str = "auto") -> bool:
  """Whether `rms_norm` runs a kernel for rows of `hidden` values: the GPU kernel walks the row
  in power-of-two column chunks of at least 16, so hidden must be a multiple of 16 there (the
  TPU kernel takes whole rows of any size). The model uses the jnp formula where it does not."""
  backend = resolve_backend(backend)
  return backend not in ("gpu", "interpret") or (hidden > 0 and hidden % 16 == 0)


def rms_norm(x: jax.Array, scale: jax.Array, *, eps: float = 1e-6, backend: str = "auto",
             block_rows: int | None = None) -> jax.Array:
  """Fused RMSNorm: x / sqrt(mean(x^2) + eps) * scale, statistics in fp32.

  Args:
    x: [..., hidden] (fp32 or bf16).
    scale: [hidden].
    eps: added to the mean square (Baichuan: 1e-6).
    backend: as for `flash_attention` ("auto", "gpu", "tpu", "interpret", "tpu_interpret", "xla").
    block_rows: rows per program (default DEFAULT_BLOCK_ROWS: 2 on GPU, 64 on TPU; a power of
      two on GPU, a multiple of 8 on TPU).
  Returns:
    Same shape and dtype as x; differentiable in x and scale. On GPU (and "interpret") hidden
    must be a multiple of 16 (`rms_norm_kernel_fits`). An x with no rows returns the empty
    result of the jnp formula.
  """
  if x.ndim < 1 or scale.shape != (x.shape[-1],):
    raise ValueError(f"scale.shape={scale.shape} is invalid: must be [hidden={x.shape[-1:]}] "
                     f"for x.shape={x.shape}")
  backend = resolve_backend(backend)
  if backend == "xla":
    return rms_norm_reference(x, scale, eps)
  kind = "gpu" if backend in ("gpu", "interpret") else "tpu"
  interpret = backend in ("interpret", "tpu_interpret")
  hidden = x.shape[-1]
  x2 = x.reshape(-1, hidden)
  n = x2.shape[0]
  rows = DEFAULT_BLOCK_ROWS[kind] if block_rows is None else block_rows
  if not isinstance(rows, int) or rows <= 0 or (kind == "gpu" and rows & (rows - 1)) or (
      kind == "tpu" and rows % 8):
    raise ValueError(f"block_rows={rows!r} is invalid for the {kind.upper()} kernel: must be "
                     + ("a power of two" if kind == "gpu" else "a positive multiple of 8"))
  if not rms_norm_kernel_fits(hidden, backend):
    raise ValueError(f"hidden={hidden} (x.shape[-1]) is invalid for the GPU kernel: must be a "
                     "multiple of 16 (or use backend='xla')")
  if n == 0:  # no rows: nothing to launch
    return rms_norm_reference(x, scale, eps)
  rows = min(rows, -(-n // 8) * 8)  # tiny inputs: one block
  if kind == "gpu":
    rows = 1 << (rows - 1).bit_length()
  n_pad = -(-n // rows) * rows
  # Padding rows are zeros: finite rstd, zero dy, so they add nothing to dscale.
  x2 = jnp.pad(x2, ((0, n_pad - n), (0, 0)))
  y = _rms(kind, interpret, rows, float(eps), x2, scale.reshape(1, hidden))
  return y[:n].reshape(x.shape)
