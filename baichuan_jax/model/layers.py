"""Parameter-holding layers: RMSNorm, fused-QKV attention, SwiGLU MLP and the (Norm)Head."""

from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from baichuan_jax.model.attention import AttnContext, decode_span, write_cache, xla_attention
from baichuan_jax.model.positions import alibi_slopes, apply_rope
from kernels_pallas.reference import rms_norm_reference


def dtype_of(name: str) -> jnp.dtype:
  return jnp.dtype(name)


def _init(cfg: ml_collections.ConfigDict, axes: tuple):
  # rules=() keeps the names (for param_logical_axes) but applies no constraint when the kernel
  # is unboxed: DenseGeneral initialises multi-axis kernels flat, and under an active
  # logical_axis_rules context the N-d constraint on the 2-d value would fail. Parameter
  # shardings come from the train step's explicit shardings instead.
  return nn.with_logical_partitioning(nn.initializers.normal(cfg.init_std), axes, rules=())


# RMSNorm in fp32 (x / sqrt(mean(x^2) + eps) * scale, in x's dtype): the one formula, kept beside
# the fused kernel; the model's XLA path calls it.
rms_norm = rms_norm_reference


class RMSNorm(nn.Module):
  """Root-mean-square norm with a learned scale (no bias, no mean subtraction)."""
  config: ml_collections.ConfigDict

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cfg = self.config
    scale = self.param("weight", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                       (x.shape[-1],), dtype_of(cfg.param_dtype))
    if cfg.attention_impl == "pallas" and FUSED_RMS_NORM:
      # pylint: disable-next=import-outside-toplevel
      from kernels_pallas import rms_norm as fused_rms_norm, rms_norm_kernel_fits
      if rms_norm_kernel_fits(x.shape[-1]):  # else (hidden not a multiple of 16 on GPU): jnp
        return fused_rms_norm(x, scale, eps=cfg.rms_norm_eps)
    return rms_norm(x, scale, cfg.rms_norm_eps)


class _Dense(nn.DenseGeneral):
  """DenseGeneral that also accepts a weight-only quantized kernel (`infer.quant.QuantizedTensor`)."""

  def __call__(self, inputs: jax.Array) -> jax.Array:
    kernel = self.get_variable("params", "kernel") if self.has_variable("params", "kernel") else None
    if hasattr(kernel, "contract"):  # dequantized here, at the point of use inside the jit
      axes = (self.axis,) if isinstance(self.axis, int) else tuple(self.axis)
      return kernel.contract(inputs, len(axes), self.dtype)
    return super().__call__(inputs)


def _dense(cfg, features, axes, name, axis=-1):
  return _Dense(features=features, axis=axis, use_bias=False, name=name,
                dtype=dtype_of(cfg.dtype), param_dtype=dtype_of(cfg.param_dtype),
                kernel_init=_init(cfg, axes))


class Attention(nn.Module):
  """Multi-head attention with the fused `W_pack` projection, RoPE or ALiBi, and a KV cache."""
  config: ml_collections.ConfigDict

  @nn.compact
  def __call__(self, x: jax.Array, ctx: AttnContext,
               kv: Optional[tuple[jax.Array, jax.Array]] = None):
    cfg = self.config
    h, kvh = cfg.num_heads, cfg.num_kv_heads
    d = cfg.hidden_size // h
    if kvh == h:
      # [batch, seq, 3, heads, head_dim]; one matmul as in HF Baichuan's W_pack.
      qkv = _dense(cfg, (3, h, d), ("embed", None, "heads", "kv"), "W_pack")(x)
      q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    else:  # GQA/MQA: queries and key/values cannot share one head axis.
      q = _dense(cfg, (h, d), ("embed", "heads", "kv"), "q_proj")(x)
      kv_new = _dense(cfg, (2, kvh, d), ("embed", None, "kv_heads", "kv"), "kv_proj")(x)
      k, v = kv_new[:, :, 0], kv_new[:, :, 1]
    # Training / scoring with the Pallas kernels and ROPE_IN_KERNEL: q and k go in unrotated and
    # the flash kernels rotate each tile (no RoPE pass over q and k in HBM, forward or backward).
    # A KV cache holds rotated keys, so cached calls rotate first.
    rope_in_kernel = (cfg.position_embedding == "rope" and cfg.attention_impl == "pallas"
                      and kv is None and ROPE_IN_KERNEL and d >= 32 and d & (d - 1) == 0)
    if cfg.position_embedding == "rope" and not rope_in_kernel:
      q = apply_rope(q, ctx.q_pos, cfg.rope_theta)
      k = apply_rope(k, ctx.q_pos, cfg.rope_theta)
    slopes = jnp.asarray(alibi_slopes(h)) if cfg.position_embedding == "alibi" else None
    if kv is not None:  # write this step's keys/values into the [batch, kv_heads, max_len, d] slots
      k = write_cache(kv[0], k.swapaxes(1, 2), ctx.cache_index, 2)
      v = write_cache(kv[1], v.swapaxes(1, 2), ctx.cache_index, 2)
    q = nn.with_logical_constraint(q, ("activation_batch", "activation_length", "activation_heads", "kv"))
    if (cfg.attention_impl == "pallas" and kv is None and not rope_in_kernel
        and _mosaic_attention_applies(q, k)):
      from kernels_pallas import flash_mgpu  # pylint: disable=import-outside-toplevel
      from kernels_pallas import resolve_backend  # pylint: disable=import-outside-toplevel
      out = flash_mgpu.flash_attention_mgpu(q, k, v, causal=True, alibi_slopes=slopes,
                                            segment_ids=ctx.q_seg, positions=ctx.q_pos,
                                            interpret=resolve_backend("auto") == "interpret")
    elif cfg.attention_impl == "pallas" and kv is None:
      from kernels_pallas import flash_attention  # pylint: disable=import-outside-toplevel
      out = flash_attention(q, k, v, causal=True, alibi_slopes=slopes, segment_ids=ctx.q_seg,
                            positions=ctx.q_pos,
                            rope_theta=cfg.rope_theta if rope_in_kernel else None)
    elif (kv is not None and q.shape[1] == 1 and ctx.decode_span != ()
          and _decode_kernel_applies(cfg, k)):
      out = _decode_step_attention(q, k, v, ctx, slopes)
    else:
      out = xla_attention(q, k.astype(q.dtype), v.astype(q.dtype), ctx, slopes,
                          kv_layout="bshd" if kv is None else "bhsd")
    # [batch, seq, heads, head_dim] -> [batch, seq, hidden]
    out = _dense(cfg, cfg.hidden_size, ("heads", "kv", "embed"), "o_proj", axis=(-2, -1))(out)
    return out, (None if kv is None else (k, v))


# True: with attention_impl="pallas" and RoPE, calls without a KV cache (training, scoring) pass
# unrotated q, k and rope_theta to `flash_attention`, which rotates inside the kernels (needs a
# power-of-two head_dim >= 32; otherwise, and when False, RoPE is applied first). Read at trace.
# False since the H200 run of benchmarks/gpu_suite.py (2026-12-04): the ~1B training step took
# 0.307 s with RoPE first and 0.377 s with it inside the kernels (docs/kernels.md).
ROPE_IN_KERNEL = False

# True: with attention_impl="pallas", RMSNorm runs as the fused Pallas kernel (where it takes the
# hidden size: `kernels_pallas.rms_norm_kernel_fits`); False: as the jnp formula, which XLA
# fuses with its neighbours (the residual add, the casts). Read at trace;
# benchmarks/gpu_suite.py times the ~1B training step both ways.
FUSED_RMS_NORM = True

# True: the decoder stack runs as the layer `nn.scan` wherever the model is not told to unroll
# (`BaichuanLM(unroll_layers=True)`, the decode step). False: with remat_policy "none" (the scan
# is what applies remat), training and scoring run it as the same unrolled loop over static
# slices of the stacked layer parameters: the same parameter tree and results, no per-layer
# slice copies or stacked gradient writes inside a scan, but a longer compile. Read at trace by
# `transformer.BaichuanLM`; benchmarks/gpu_suite.py times the ~1B step both ways (on the H200
# the scanned step's profile held 15 ms of memcpy and 11.5 ms of dynamic-update-slice fusions,
# of 377 ms; what share of that the scan causes is what the A/B tells).
SCAN_LAYERS = True

# True: with attention_impl="pallas", calls without a KV cache (training, scoring) whose shapes
# the Hopper kernels take (`kernels_pallas.flash_mgpu.check_shapes`: seq a multiple of 64,
# head_dim 64 or 128, bf16 / fp16) and whose RoPE is applied first run attention on those Mosaic
# GPU kernels (TMA + wgmma) instead of the Triton ones, on a CUDA GPU (and in Mosaic GPU's
# interpret mode on a CPU); other calls keep `flash_attention`. Read at trace. False until a GPU
# has run them: benchmarks/gpu_suite.py checks them and times the ~1B step both ways
# (`mosaic attention`), and `gpu_apply.py --write` sets this when they win by 3%.
FLASH_MOSAIC = False


def _mosaic_attention_applies(q: jax.Array, k: jax.Array) -> bool:
  if not FLASH_MOSAIC:
    return False
  from kernels_pallas import resolve_backend  # pylint: disable=import-outside-toplevel
  if resolve_backend("auto") not in ("gpu", "interpret"):
    return False
  from kernels_pallas import flash_mgpu  # pylint: disable=import-outside-toplevel
  return flash_mgpu.check_shapes(q.shape, k.shape, q.dtype, flash_mgpu.DEFAULT_BLOCKS) is None


# True: every pallas decode step checks that each row's keys are one span (`decode_span`) and
# takes the XLA path when not: one `lax.cond` around the whole unrolled stack
# (`checked_decode_stack`; the layer scan, which decode steps do not use, keeps one per layer).
# False skips the check and always runs the kernel on the span; only for caches built as
# `infer.generate` and `infer.engine` build them (benchmarks/gpu_suite.py times both, to measure
# what the conditional costs on a GPU: 0.84 ms of a 6.96 ms 7B step on an H200 with a cond per
# layer, 32 of them, each of which makes the device wait on the host).
DECODE_SPAN_CHECK = True


def _decode_kernel_applies(cfg, k_cache: jax.Array) -> bool:
  """Static part of the decode-kernel choice: attention_impl="pallas", a cache shape the kernel
  takes, and no multi-device mesh (a sharded cache stays on the XLA path, which GSPMD
  partitions; the kernel is not wrapped in a shard_map)."""
  if cfg.attention_impl != "pallas":
    return False
  from kernels_pallas.decode import decode_kernel_fits  # pylint: disable=import-outside-toplevel
  mesh = jax.sharding.get_abstract_mesh()
  if not mesh.empty and mesh.size > 1:
    return False
  return decode_kernel_fits(k_cache.shape[2], k_cache.shape[3])


def checked_decode_stack(cfg, ctx: AttnContext, k_cache: jax.Array, q_len: int, run):
  """`run(ctx)` (the unrolled decoder stack on that context) under one span check.

  For a pallas decode step (one query per row, a cache the kernel takes) with DECODE_SPAN_CHECK,
  the span is checked once (`decode_span`: every layer sees the same context) and one
  `lax.cond` runs the stack with each layer's kernel on that span, or with every layer on the
  XLA path when some row fails, the same choice each layer would make. Anything else: `run(ctx)`
  as it is.
  """
  if not (DECODE_SPAN_CHECK and q_len == 1 and ctx.decode_span is None
          and _decode_kernel_applies(cfg, k_cache)):
    return run(ctx)
  starts, lengths, ok = decode_span(ctx, cfg.position_embedding == "alibi")
  return jax.lax.cond(ok, lambda: run(ctx._replace(decode_span=(starts, lengths))),
                      lambda: run(ctx._replace(decode_span=())))


def _decode_step_attention(q, k_cache, v_cache, ctx: AttnContext, slopes):
  """One decode token per row with `kernels_pallas.decode_attention` over each row's filled span.

  The span comes from the cache's segment ids and index (`decode_span`); when some row's keys are
  not one contiguous span ending at its query (or, with ALiBi, positions do not advance by one
  per slot), the whole batch takes the XLA path instead (`lax.cond`: only one branch runs), so
  the result is the XLA path's wherever the kernel could differ.
  """
  from kernels_pallas import decode_attention  # pylint: disable=import-outside-toplevel
  kernel = lambda starts, lengths: decode_attention(  # noqa: E731
      q, k_cache, v_cache, lengths, starts=starts, alibi_slopes=slopes).astype(q.dtype)
  if ctx.decode_span:  # the stack checked the span once (`checked_decode_stack`)
    return kernel(*ctx.decode_span)
  starts, lengths, ok = decode_span(ctx, slopes is not None)
  if not DECODE_SPAN_CHECK:
    return kernel(starts, lengths)
  xla = lambda: xla_attention(q, k_cache.astype(q.dtype), v_cache.astype(q.dtype), ctx, slopes,
                              kv_layout="bhsd")
  return jax.lax.cond(ok, lambda: kernel(starts, lengths), xla)


# True: the SwiGLU product silu(gate) * up differentiates through `swiglu`'s own backward,
# which keeps only gate and up for the backward pass and recomputes the sigmoid there, in fp32.
# False: through jax's autodiff of the formula, which keeps its intermediates too (6 arrays of
# [batch, seq, ffn] per layer in all, against 3 with the switch: gate, up and the product, which
# the down projection's weight gradient needs). On the ~1B benchmark step (18 layers, 4 x 4096
# tokens, no remat) the backward keeps 30.98 GB of activations in the layer scan with False and
# 21.25 GB with True (benchmarks/swiglu_residuals.py). The forward is the same formula either
# way (same bits); the gradients differ by rounding, and True's are the nearer to the exact
# derivative (tests/test_model.py). True since 2026-12-04, from the CPU measurements in
# docs/gpu.md; benchmarks/gpu_suite.py times the ~1B step both ways. Read at trace.
SWIGLU_VJP = True


def _swiglu_formula(gate: jax.Array, up: jax.Array) -> jax.Array:
  return nn.silu(gate) * up


@jax.custom_vjp
def swiglu(gate: jax.Array, up: jax.Array) -> jax.Array:
  """silu(gate) * up (the same formula as the model's), with a backward pass that keeps only
  its two inputs: d gate = d * up * s * (1 + gate * (1 - s)) and d up = d * gate * s, where
  s = sigmoid(gate), computed in fp32 and rounded once to each input's dtype."""
  return _swiglu_formula(gate, up)


def _swiglu_fwd(gate, up):
  return _swiglu_formula(gate, up), (gate, up)


def _swiglu_bwd(res, d):
  gate, up = res
  g, u, d32 = (a.astype(jnp.float32) for a in (gate, up, d))
  s = jax.nn.sigmoid(g)
  dg = d32 * u * s * (1.0 + g * (1.0 - s))
  return dg.astype(gate.dtype), (d32 * g * s).astype(up.dtype)


swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)


class MLP(nn.Module):
  """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""
  config: ml_collections.ConfigDict

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cfg = self.config
    gate = _dense(cfg, cfg.intermediate_size, ("embed", "mlp"), "gate_proj")(x)
    up = _dense(cfg, cfg.intermediate_size, ("embed", "mlp"), "up_proj")(x)
    product = swiglu if SWIGLU_VJP else _swiglu_formula
    act = nn.with_logical_constraint(product(gate, up),
                                     ("activation_batch", "activation_length", "activation_mlp"))
    return _dense(cfg, cfg.hidden_size, ("mlp", "embed"), "down_proj")(act)


def head_column_norms(kernel: jax.Array) -> jax.Array:
  """[vocab] fp32 NormHead divisors: max(||column||, 1e-12) of the [hidden, vocab] head kernel
  (F.normalize semantics)."""
  k32 = kernel.astype(jnp.float32)
  return jnp.maximum(jnp.sqrt(jnp.sum(k32 * k32, axis=0)), 1e-12)


def head_logits(hidden: jax.Array, kernel: jax.Array, norm_head: bool) -> jax.Array:
  """Output-layer logits in fp32.

  Args:
    hidden: [..., hidden] final-norm activations (compute dtype).
    kernel: [hidden, vocab] head weight (torch lm_head.weight transposed).
    norm_head: Baichuan 2 NormHead: each vocabulary column L2-normalised over hidden. Applied as
      a division of the fp32 logits by the column norms, h.(w/|w|) = (h.w)/|w|, so no normalised
      [hidden, vocab] copy is built (and XLA on the CPU cannot fuse the normalisation into the
      matmul, which made a [4, 256] x [256, 125696] head 80x slower).
  Returns:
    [..., vocab] fp32.
  """
  logits = jnp.einsum("...e,ev->...v", hidden, kernel.astype(hidden.dtype),
                      preferred_element_type=jnp.float32)
  return logits / head_column_norms(kernel) if norm_head else logits
