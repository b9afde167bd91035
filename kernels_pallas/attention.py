"""Public flash attention: input checks, padding, backend choice and the custom VJP.

`flash_attention` pads the sequence to a block multiple (and, for Triton, head_dim to a power of
two), runs the forward kernel, and saves (q, k, v, out, lse) for the backward pass, which runs the
dQ kernel and the dK/dV kernel, each with its own tiles (or, on the GPU with tuning
"fused_backward", one kernel for all three gradients). The padding is masked inside the kernels
and sliced off here, so any sequence length works. With `rope_theta`, q and k are rotated inside
the GPU kernels (see flash_gpu) instead of before the call.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib
import math
import os
from typing import Optional
from unittest import mock

import jax
import jax.numpy as jnp
from jax.experimental.pallas import tpu as pltpu

from kernels_pallas import flash_gpu, flash_tpu
from kernels_pallas._common import AttnStatic
from kernels_pallas.reference import attention_reference, rope_inv_freq, rope_reference

BACKENDS = ("auto", "gpu", "tpu", "interpret", "tpu_interpret", "xla")
CPU_BACKEND_ENV = "KERNELS_PALLAS_CPU_BACKEND"

# (block_q, block_k) per kernel kind. GPU: tuned on an H100 at seq 4096, head_dim 128, bf16
# (benchmarks/attention.py --tune; docs/kernels.md): 128 x 128 forward tiles; 64 x 64 in the
# backward, which keeps dQ or dK/dV accumulators in registers and fits shared memory (128-row
# backward tiles with 3 stages exceed the 227 KB limit). TPU: 128-multiple tiles so every block
# fills the 128-lane vector unit and the MXU.
DEFAULT_BLOCKS = {
    "gpu": {"fwd": (128, 128), "bwd": (64, 64)},
    "tpu": {"fwd": (256, 512), "bwd": (256, 256)},
}
PHASES = ("fwd", "dq", "dkdv")  # the three kernels; tuning key "bwd" sets both backward kernels


def default_blocks(kind: str, head_dim: int, seq_len: int, rope: bool = False) -> dict:
  """(block_q, block_k) per kernel ("fwd", "dq", "dkdv") for a head_dim and sequence length.

  With `rope` (RoPE inside the GPU kernels) at head_dim >= 128 the forward takes 128 x 64 tiles:
  its key tiles then come with fp32 cos/sin tiles, and 128 x 128 with 3 stages would need
  352 KiB of shared memory, beyond the 227 KiB of an sm_90 block (benchmarks/triton_sm90.py;
  128 x 64, 8 warps, 3 stages: 192 KiB, no spills).

  GPU: the forward keeps the H100-tuned 128 x 128 tiles. The backward is tiled per kernel: dQ
  keeps a tall query block (its accumulator is [block_q, head_dim]) and walks narrow key blocks;
  dK/dV the transpose (accumulators [block_k, head_dim] x 2). At head_dim 128 both stay at the
  H100-measured 64 x 64 (larger accumulators spill registers); at head_dim <= 64 the accumulators
  are half as large, so the long side doubles to 128 for sequences >= 1024. On an H200
  (2026-12-04, benchmarks/gpu_suite.py) the head_dim-128 defaults were the fastest of six
  backward tilings at seq 4096 (277 TFLOP/s fwd+bwd). TPU: DEFAULT_BLOCKS.
  """
  table = DEFAULT_BLOCKS[kind]
  if kind != "gpu":
    return {"fwd": table["fwd"], "dq": table["bwd"], "dkdv": table["bwd"]}
  out = {"fwd": table["fwd"], "dq": table["bwd"], "dkdv": table["bwd"]}
  if head_dim <= 64 and seq_len >= 1024:
    out["dq"], out["dkdv"] = (128, 64), (64, 128)
  if rope and head_dim >= 128:
    out["fwd"] = (128, 64)
  return out
# Triton launch settings per phase (GPU only), from the same sweep: forward 8 warps and 3 pipeline
# stages (4 warps for head_dim <= 64, where a row block needs fewer registers); backward 4 warps,
# 2 stages. None = that default.
DEFAULT_LAUNCH = {"fwd": {"num_warps": None, "num_stages": 3},
                  "bwd": {"num_warps": 4, "num_stages": 2}}
DEFAULT_LAUNCH["dq"] = DEFAULT_LAUNCH["dkdv"] = DEFAULT_LAUNCH["bwd"]
# With RoPE inside the kernels at head_dim >= 128 the backward kernels hold the rotated halves
# too: with 4 warps both spill on sm_90 (dQ 144 bytes, dK/dV 488); with 8 warps neither does.
ROPE_LAUNCH = {"dq": {"num_warps": 8}, "dkdv": {"num_warps": 8}}
# The fused backward (tuning "fused_backward") at head_dim >= 128 also holds its dQ tile: with 4
# warps every tiling but 32 x 64 spills on sm_90 (28 bytes at the default 64 x 64, 2 stages);
# with 8 warps 64 x 64 takes 220 registers and spills nothing (benchmarks/triton_sm90.py).
FUSED_LAUNCH = {"dkdv": {"num_warps": 8}}


def default_launch(head_dim: int, rope: bool = False, fused: bool = False) -> dict:
  """Triton launch settings per kernel (PHASES): DEFAULT_LAUNCH, with ROPE_LAUNCH on top for
  in-kernel RoPE and FUSED_LAUNCH for the fused backward, at head_dim >= 128."""
  launch = {ph: dict(DEFAULT_LAUNCH[ph]) for ph in PHASES}
  for on, table in ((rope, ROPE_LAUNCH), (fused, FUSED_LAUNCH)):
    if on and head_dim >= 128:
      for ph, extra in table.items():
        launch[ph].update(extra)
  return launch


# Tilings measured fastest on Hopper (sm_90) by benchmarks/gpu_suite.py's `tiles` section (fwd+bwd
# at seq 4096, causal, bf16), per kernel path ("plain": without in-kernel RoPE, the attention
# benchmarks' and the model's training path, RoPE applied first; "rope": RoPE inside the kernels,
# `layers.ROPE_IN_KERNEL = True`) and head_dim: {path: {head_dim: {"tuning": ..., "min_seq": ..., ...}}}. Used by
# `flash_attention` calls that pass no `tuning` (and run outside `default_tuning`) for the GPU
# kernels at seq_len >= "min_seq" (the suite also ran it at 2k to 8k). Written by
# `benchmarks/gpu_apply.py --write` from a run's gpu_suite.json, only when a tiling beat the
# defaults above by the apply's margin; empty: the defaults above hold everywhere.
# BEGIN MEASURED_TUNING (benchmarks/gpu_apply.py rewrites this block)
MEASURED_TUNING = {'rope': {128: {'measured': 'NVIDIA H200, 2026-12-04 18:16:28 UTC, git '
                                              'f1cd73b2b4c44a753e573a4c60f708388cdf42df',
                                  'min_seq': 2048,
                                  'speedup_over_default': 1.261,
                                  'tuning': {'blocks': {'dq': (128, 32)},
                                             'launch': {'dkdv': {'num_stages': 3}}},
                                  'variant': 'dq 128x32 8w2s / dkdv 64x64 8w3s'}}}
# END MEASURED_TUNING


def measured_tuning(kind: str, head_dim: int, seq_len: int, rope: bool = False) -> Optional[dict]:
  """The MEASURED_TUNING tiling for a call of these kernels ("gpu" kind; `rope`: RoPE inside
  them; a measured head_dim; seq_len >= its "min_seq"), else None (the defaults)."""
  table = MEASURED_TUNING.get("rope" if rope else "plain", {}) if kind == "gpu" else {}
  entry = table.get(head_dim)
  if entry is None or seq_len < entry.get("min_seq", 0):
    return None
  return entry["tuning"]


_LOWERING_PLATFORM = contextvars.ContextVar("kernels_pallas_lowering_platform", default=None)


@contextlib.contextmanager
def lowering_platform(platform: str):
  """Within this context "auto" resolves to the kernels of `platform` ("cuda" or "tpu") whatever
  the default JAX platform is: for tracing a program on a CPU machine and exporting it for that
  platform (`jax.export.export(..., platforms=[platform])`), e.g. benchmarks/gpu_suite.py
  --preflight, which lowers every device program of the suite before a GPU is used. For "cuda"
  on a machine without a GPU the Triton kernels are lowered for an H100 / H200
  (`triton_target`).
  """
  if platform not in ("cuda", "tpu"):
    raise ValueError(f"platform={platform!r} is invalid: must be 'cuda' or 'tpu'")
  token = _LOWERING_PLATFORM.set(platform)
  try:
    with triton_target() if platform == "cuda" else contextlib.nullcontext():
      yield
  finally:
    _LOWERING_PLATFORM.reset(token)


@contextlib.contextmanager
def triton_target(gpu: str = "NVIDIA H200"):
  """Within this context, on a machine without a GPU, Pallas lowers its Triton kernels for `gpu`
  (a device kind jax knows; compute capability 9.0 for the H100 and H200). Since jax 0.11 that
  lowering asks the local GPU for its compute capability and raises "No supported GPU devices
  found" where there is none (jax 0.10 took 9.0; `triton_gpu_info` finds the lookup, which
  jax 0.12.1 moved). jax's own answer, an `AbstractDevice` in
  `jax.sharding.use_abstract_mesh`, is replaced by the concrete mesh of a program lowered under
  one (the training step), so here jax's lookup itself answers for `gpu`. A no-op on a machine
  with a GPU and on a jax without the lookup. Not thread-safe (it patches a module attribute).
  """
  gpu_info = triton_gpu_info()
  if gpu_info is None or jax.default_backend() == "gpu":
    yield
    return
  target = gpu_info.get_gpu_info_from_version(gpu_info.GpuVersion(gpu))
  with mock.patch.object(gpu_info, "get_gpu_info", lambda: target):
    yield


def triton_gpu_info():
  """The module whose `get_gpu_info()` the Pallas Triton lowering asks for the GPU's compute
  capability (private: no public hook yet), or None where it asks nothing (jax 0.10). jax 0.11
  to 0.12.0 have it as `jax._src.pallas.triton.gpu_info`, 0.12.1 as `jax._src.gpu_info`."""
  for name in ("jax._src.gpu_info", "jax._src.pallas.triton.gpu_info"):
    try:
      return importlib.import_module(name)
    except ImportError:
      continue
  return None


_DEFAULT_TUNING = contextvars.ContextVar("kernels_pallas_default_tuning", default=None)


@contextlib.contextmanager
def default_tuning(tuning: Optional[dict]):
  """Within this context `flash_attention` calls that pass no `tuning` use this one (same format,
  validated on entry), e.g. the tiling benchmarks/gpu_suite.py measured fastest, applied to the
  model's attention in the training step without a config field. Read when a call is traced.
  """
  _check_tuning(tuning)
  token = _DEFAULT_TUNING.set(tuning)
  try:
    yield
  finally:
    _DEFAULT_TUNING.reset(token)


def resolve_backend(backend: str) -> str:
  """Maps "auto" to the kernels of the default JAX platform (or of `lowering_platform`).

  On CPU, "auto" runs the GPU-style kernels in Pallas interpret mode (so `attention_impl="pallas"`
  really exercises the kernels); set KERNELS_PALLAS_CPU_BACKEND=xla (or tpu_interpret) to change it.
  """
  if backend not in BACKENDS:
    raise ValueError(f"backend={backend!r} is invalid: must be one of {BACKENDS}")
  if backend != "auto":
    return backend
  platform = _LOWERING_PLATFORM.get() or jax.default_backend()
  if platform in ("gpu", "cuda", "rocm"):
    return "gpu"
  if platform == "tpu":
    return "tpu"
  choice = os.environ.get(CPU_BACKEND_ENV, "interpret")
  if choice not in BACKENDS[1:] or choice in ("gpu", "tpu"):
    raise ValueError(f"{CPU_BACKEND_ENV}={choice!r} is invalid: must be interpret, "
                     "tpu_interpret or xla on a CPU-only machine")
  return choice


def _round_up(x: int, m: int) -> int:
  return -(-x // m) * m


def _check_block(name: str, value: int, kind: str, seq_pad: int) -> None:
  if kind == "gpu":
    if value < 16 or value & (value - 1):
      raise ValueError(f"{name}={value} is invalid for the GPU kernels: must be a power of two "
                       ">= 16 (Triton tiles)")
  elif value % 8 or (value % 128 and value != seq_pad):
    raise ValueError(f"{name}={value} is invalid for the TPU kernels: must be a multiple of 128 "
                     "(or of 8 when it covers the whole padded sequence)")


def _blocks(kind: str, seq_len: int, block_q: Optional[int], block_k: Optional[int],
            phase_blocks: Optional[dict] = None, head_dim: int = 128, rope: bool = False):
  """(block_q, block_k) per kernel (PHASES) and the padded sequence length they all divide.

  Blocks are capped at the (rounded-up) sequence length and then shrunk to divide the padded
  length, so padding never exceeds one largest block.
  """
  for name, value in (("block_q", block_q), ("block_k", block_k)):
    if value is not None:
      _check_block(name, value, kind, -1)
  chosen = {}
  defaults = default_blocks(kind, head_dim, seq_len, rope)
  for phase in PHASES:
    dq, dk = (phase_blocks or {}).get(phase, defaults[phase])
    chosen[phase] = [block_q or dq, block_k or dk]
  if kind == "gpu":
    cap = max(16, 1 << (seq_len - 1).bit_length())  # next power of two
  else:
    cap = _round_up(seq_len, 8) if seq_len <= 128 else _round_up(seq_len, 128)
  for phase in chosen:  # short sequences: one block covers everything
    chosen[phase] = [min(b, cap) for b in chosen[phase]]
  seq_pad = _round_up(seq_len, max(max(p) for p in chosen.values()))
  for phase in chosen:  # e.g. TPU seq 300: pad to 384 and use 128-row tiles, not 768 for lcm
    chosen[phase] = [math.gcd(b, seq_pad) for b in chosen[phase]]
  for phase, (bq, bk) in chosen.items():
    _check_block("block_q", bq, kind, seq_pad)
    _check_block("block_k", bk, kind, seq_pad)
  return {phase: tuple(v) for phase, v in chosen.items()}, seq_pad


def _validate(q, k, v, alibi_slopes, segment_ids, positions, rope_theta=None):
  if q.ndim != 4:
    raise ValueError(f"q.shape={q.shape} is invalid: must be [batch, seq, heads, head_dim]")
  b, s, h, d = q.shape
  if k.shape != v.shape or k.ndim != 4 or k.shape[0] != b or k.shape[1] != s or k.shape[3] != d:
    raise ValueError(f"k.shape={k.shape}, v.shape={v.shape} are invalid: both must be "
                     f"[batch={b}, seq={s}, kv_heads, head_dim={d}] to match q.shape={q.shape}")
  if h % k.shape[2]:
    raise ValueError(f"kv_heads={k.shape[2]} is invalid: must divide heads={h}")
  if not (q.dtype == k.dtype == v.dtype):
    raise ValueError(f"dtypes q={q.dtype}, k={k.dtype}, v={v.dtype} are invalid: must be equal")
  if alibi_slopes is not None and alibi_slopes.shape != (h,):
    raise ValueError(f"alibi_slopes.shape={alibi_slopes.shape} is invalid: must be [heads={h}]")
  for name, arr in (("segment_ids", segment_ids), ("positions", positions)):
    if arr is not None and arr.shape != (b, s):
      raise ValueError(f"{name}.shape={arr.shape} is invalid: must be [batch={b}, seq={s}]")
    if arr is not None and not jnp.issubdtype(arr.dtype, jnp.integer):
      raise ValueError(f"{name}.dtype={arr.dtype} is invalid: must be an integer type")
  if rope_theta is not None:
    if not rope_theta > 0:
      raise ValueError(f"rope_theta={rope_theta!r} is invalid: must be > 0")
    if d < 32 or d & (d - 1):
      raise ValueError(f"head_dim={d} is invalid with rope_theta: in-kernel RoPE needs a power "
                       "of two >= 32 (apply RoPE before the call instead)")


def _check_tuning(tuning: Optional[dict], head_dim: int = 128, rope: bool = False):
  """Validates `tuning` -> (per-phase blocks or None, per-phase launch settings over
  `default_launch(head_dim, rope, fused)`)."""
  tuning = dict(tuning or {})
  unknown = set(tuning) - {"blocks", "launch", "fused_backward"}
  if unknown:
    raise ValueError(f"tuning keys {sorted(unknown)} are invalid: allowed are 'blocks', "
                     "'launch', 'fused_backward'")
  fused = fused_backward(tuning, rope)
  blocks = tuning.get("blocks")
  launch = default_launch(head_dim, rope, fused)
  for name, table in (("blocks", blocks or {}), ("launch", tuning.get("launch") or {})):
    for phase, value in table.items():
      if phase not in ("fwd", "bwd", "dq", "dkdv"):
        raise ValueError(f"tuning[{name!r}] key {phase!r} is invalid: must be 'fwd', 'bwd', "
                         "'dq' or 'dkdv'")
      if name == "blocks" and (len(tuple(value)) != 2):
        raise ValueError(f"tuning['blocks'][{phase!r}]={value!r} is invalid: must be "
                         "(block_q, block_k)")
      if name == "launch":
        bad = set(value) - {"num_warps", "num_stages"}
        if bad:
          raise ValueError(f"tuning['launch'][{phase!r}] keys {sorted(bad)} are invalid: "
                           "allowed are num_warps, num_stages")
    if name == "launch":  # "bwd" first, then the per-kernel keys win
      for phase in ("fwd", "bwd", "dq", "dkdv"):
        if phase in table:
          for target in (("dq", "dkdv") if phase == "bwd" else (phase,)):
            launch[target].update(table[phase])
  if blocks:
    given = {ph: tuple(int(x) for x in v) for ph, v in blocks.items()}
    blocks = {}
    for phase in ("fwd", "bwd", "dq", "dkdv"):
      if phase in given:
        for target in (("dq", "dkdv") if phase == "bwd" else (phase,)):
          blocks[target] = given[phase]
  return blocks, launch


def fused_backward(tuning: Optional[dict], rope: bool = False) -> bool:
  """`tuning["fused_backward"]` (default False), checked: True runs the GPU backward as one
  kernel (`flash_gpu.backward_fused`: dK/dV plus dQ by atomic adds) instead of the dQ and dK/dV
  kernels; its tiles and launch settings are the "dkdv" phase's. Not with in-kernel RoPE. The
  TPU kernels ignore it."""
  value = (tuning or {}).get("fused_backward", False)
  if not isinstance(value, bool):
    raise ValueError(f"tuning['fused_backward']={value!r} is invalid: must be True or False")
  if value and rope:
    raise ValueError("tuning['fused_backward']=True is invalid with in-kernel RoPE (rope_theta "
                     "on the GPU kernels): the fused backward takes rotated q and k; apply RoPE "
                     "before the call or leave fused_backward False")
  return value


def _kernel_kind(backend: str) -> tuple[str, bool]:
  return {"gpu": ("gpu", False), "interpret": ("gpu", True),
          "tpu": ("tpu", False), "tpu_interpret": ("tpu", True)}[backend]


def _tpu_context(st: AttnStatic):
  return pltpu.force_tpu_interpret_mode() if st.interpret else _null_context()


class _null_context:  # pylint: disable=invalid-name
  def __enter__(self):
    return self

  def __exit__(self, *exc):
    return False


def _fwd_impl(kind, st, q, k, v, slopes, seg, pos, rope=None):
  """Runs the forward kernel on padded [batch, seq, heads, head_dim] inputs -> (out, lse)."""
  if kind == "gpu":
    out, lse = flash_gpu.forward(q, k, v, slopes, seg, pos, st, rope)
    return out, lse  # lse: [batch, heads, seq]
  t = lambda x: jnp.swapaxes(x, 1, 2)  # [b, s, h, d] <-> [b, h, s, d]
  with _tpu_context(st):
    out, lse = flash_tpu.forward(t(q), t(k), t(v), slopes, seg, pos, st)
  return t(out), lse[..., 0]


def _bwd_impl(kind, st_dq, st_dkdv, q, k, v, out, lse, do, slopes, seg, pos, rope=None):
  # delta_i = rowsum(dO_i * O_i): the softmax-Jacobian term, one fp32 per query row.
  delta = jnp.einsum("bshd,bshd->bhs", do.astype(jnp.float32), out.astype(jnp.float32))
  if kind == "gpu" and st_dkdv.fused_dq:
    return flash_gpu.backward_fused(q, k, v, do, lse, delta, slopes, seg, pos, st_dkdv)
  if kind == "gpu":
    dq = flash_gpu.backward_dq(q, k, v, do, lse, delta, slopes, seg, pos, st_dq, rope)
    dk, dv = flash_gpu.backward_dkdv(q, k, v, do, lse, delta, slopes, seg, pos, st_dkdv, rope)
    return dq, dk, dv
  t = lambda x: jnp.swapaxes(x, 1, 2)
  args = (t(q), t(k), t(v), t(do), lse[..., None], delta[..., None], slopes, seg, pos)
  with _tpu_context(st_dq):
    dq = flash_tpu.backward_dq(*args, st_dq)
    dk, dv = flash_tpu.backward_dkdv(*args, st_dkdv)
  return t(dq), t(dk), t(dv)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _flash(kind, statics, q, k, v, slopes, seg, pos, cos, sin):
  rope = None if cos is None else (cos, sin)
  return _fwd_impl(kind, statics[0], q, k, v, slopes, seg, pos, rope)[0]


def _flash_fwd(kind, statics, q, k, v, slopes, seg, pos, cos, sin):
  rope = None if cos is None else (cos, sin)
  out, lse = _fwd_impl(kind, statics[0], q, k, v, slopes, seg, pos, rope)
  return out, (q, k, v, out, lse, slopes, seg, pos, cos, sin)


def _flash_bwd(kind, statics, res, do):
  q, k, v, out, lse, slopes, seg, pos, cos, sin = res
  rope = None if cos is None else (cos, sin)
  dq, dk, dv = _bwd_impl(kind, statics[1], statics[2], q, k, v, out, lse, do, slopes, seg, pos,
                         rope)
  # ALiBi slopes, segment ids, positions and the RoPE tables are constants: no cotangent.
  return dq, dk, dv, None, None, None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def flash_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool = True,
                    alibi_slopes: Optional[jax.Array] = None,
                    segment_ids: Optional[jax.Array] = None,
                    positions: Optional[jax.Array] = None,
                    sm_scale: Optional[float] = None, backend: str = "auto",
                    block_q: Optional[int] = None, block_k: Optional[int] = None,
                    tuning: Optional[dict] = None,
                    rope_theta: Optional[float] = None) -> jax.Array:
  """Memory-efficient softmax attention with in-kernel ALiBi, packed segments and GQA.

  Args:
    q: [batch, seq, heads, head_dim] (fp32 or bf16).
    k, v: [batch, seq, kv_heads, head_dim], same dtype; kv_heads divides heads and query head h
      reads kv head h // (heads // kv_heads).
    causal: query i attends to keys j <= i (fully masked blocks are skipped).
    alibi_slopes: [heads] fp32 or None; adds -slope_h * (pos_i - pos_j) to the scores, computed in
      the kernel (no [seq, seq] bias in memory). Gets no gradient.
    segment_ids: [batch, seq] int or None; queries only see keys with the same id (packing).
    positions: [batch, seq] int or None; positions for the ALiBi distance (default 0..seq-1).
    sm_scale: score scale, default head_dim ** -0.5.
    backend: "auto" (the platform's kernels; on CPU see `resolve_backend`), "gpu" (Triton),
      "tpu" (Mosaic), "interpret" (GPU kernels in Pallas interpret mode), "tpu_interpret" (TPU
      kernels in interpret mode) or "xla" (the plain jnp reference).
    block_q, block_k: tile sizes for every kernel (defaults per backend in DEFAULT_BLOCKS).
    tuning: per-kernel settings, e.g. {"blocks": {"fwd": (128, 64), "bwd": (64, 64)},
      "launch": {"fwd": {"num_warps": 8, "num_stages": 3}}}; kernels are "fwd", "dq" and "dkdv",
      and "bwd" sets both backward kernels (a "dq"/"dkdv" entry wins over it). "launch" applies
      to the GPU kernels. block_q/block_k, when given, win over "blocks".
      "fused_backward": True runs the GPU backward as one kernel (dK/dV, with dQ added by
      fp32 atomics: 5 matmuls per tile instead of 7, a run-to-run varying dQ summation order;
      `fused_backward`), tiled and launched as "dkdv". Defaults:
      the `default_tuning` context's when one is set, else the Hopper-measured MEASURED_TUNING
      where it applies (`measured_tuning`), else `default_blocks` / `default_launch` (other
      tiles and warps with in-kernel RoPE).
    rope_theta: if given, q and k are unrotated and RoPE (rotate-half, base rope_theta, angles
      from `positions`, default 0..seq-1) is applied inside the kernels; gradients flow to the
      unrotated q and k. Equal to applying RoPE before the call. On the TPU and XLA backends RoPE
      is applied in jnp before the kernels. head_dim must be a power of two >= 32.
  Returns:
    [batch, seq, heads, head_dim] in q's dtype.
  """
  _validate(q, k, v, alibi_slopes, segment_ids, positions, rope_theta)
  b, s, h, d = q.shape
  scale = float(d ** -0.5 if sm_scale is None else sm_scale)
  backend = resolve_backend(backend)
  rope_pos = None
  if rope_theta is not None:
    rope_pos = (jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s)) if positions is None
                else positions.astype(jnp.int32))
    if backend not in ("gpu", "interpret"):
      q = rope_reference(q, rope_pos, rope_theta)
      k = rope_reference(k, rope_pos, rope_theta)
      rope_pos = None
  if backend == "xla":
    return attention_reference(q, k, v, causal=causal, alibi_slopes=alibi_slopes,
                               segment_ids=segment_ids, positions=positions, sm_scale=scale)
  kind, interpret = _kernel_kind(backend)
  in_kernel_rope = rope_pos is not None and kind == "gpu"
  if tuning is None:
    tuning = _DEFAULT_TUNING.get() or measured_tuning(kind, d, s, in_kernel_rope)
  phase_blocks, launch = _check_tuning(tuning, head_dim=d, rope=in_kernel_rope)
  fused = kind == "gpu" and fused_backward(tuning, in_kernel_rope)
  blocks, seq_pad = _blocks(kind, s, block_q, block_k, phase_blocks, head_dim=d,
                            rope=in_kernel_rope)
  has_alibi = alibi_slopes is not None
  statics = tuple(AttnStatic(causal=causal, sm_scale=scale, seq_len=s, seq_pad=seq_pad,
                             groups=h // k.shape[2], block_q=blocks[phase][0],
                             block_k=blocks[phase][1], has_alibi=has_alibi,
                             has_segments=segment_ids is not None,
                             has_positions=has_alibi and positions is not None,
                             interpret=interpret, has_rope=rope_pos is not None,
                             fused_dq=fused and phase == "dkdv", **launch[phase])
                  for phase in PHASES)
  d_pad = max(16, 1 << (d - 1).bit_length()) if kind == "gpu" else d
  pad = lambda x: jnp.pad(x, ((0, 0), (0, seq_pad - s), (0, 0), (0, d_pad - d)))
  seg = None if segment_ids is None else jnp.pad(segment_ids.astype(jnp.int32),
                                                 ((0, 0), (0, seq_pad - s)))
  pos = None if not statics[0].has_positions else jnp.pad(positions.astype(jnp.int32),
                                                          ((0, 0), (0, seq_pad - s)))
  slopes = None
  if has_alibi:
    slopes = alibi_slopes.astype(jnp.float32)
    if kind == "gpu":  # Triton values need power-of-two sizes
      slopes = jnp.pad(slopes, (0, max(2, 1 << (h - 1).bit_length()) - h))
  cos = sin = None
  if rope_pos is not None:  # [batch, seq_pad, head_dim / 2] fp32 tables, shared by all heads
    angles = jnp.pad(rope_pos, ((0, 0), (0, seq_pad - s))).astype(jnp.float32)[..., None] * (
        rope_inv_freq(d, rope_theta))
    cos, sin = jnp.cos(angles), jnp.sin(angles)
  out = _flash(kind, statics, pad(q), pad(k), pad(v), slopes, seg, pos, cos, sin)
  return out[:, :s, :, :d]
