"""One prepared GPU run: kernel checks, then training MFU, attention vs cuDNN and decode vs bandwidth.

Meant for one short lease of one GPU (an H200 here): everything the GPU docs report comes out of
one command that stays under a time budget (default 480 s, wall clock from the start of the
script), so that a rerun still fits a 15-minute device allowance:

  JAX_PLATFORMS=cuda XLA_PYTHON_CLIENT_MEM_FRACTION=.92 python3 benchmarks/gpu_suite.py --out $OUT

writes `$OUT/gpu_suite.json` (every row, the environment, the command) and `$OUT/gpu_suite.md`
(the tables, headed by the issue's four aims judged: `summary.aims`, "not measured" where a
section was skipped or failed) after every section, so a run cut short still leaves what it
measured. Sections, in
order (each is skipped, with a note, when its estimated cost, scaled by how the finished
sections' times compared with their estimates (`Suite.guard_scale`), no longer fits the
remaining budget;
a watchdog thread ends the process at the hard limit, budget + 30 s, after writing the files):

1. `env`: device, driver (nvidia-smi), Python / jax / jaxlib / flax / triton versions, argv.
2. `ceilings`: a bf16 n x n x n matmul on random data (FLOP/s) and a device-to-device copy
   (bytes read + written per second). These are the measured peaks the ratios below use, next to
   the datasheet's (989 TFLOP/s dense bf16 and 4.8 TB/s for the H200 SXM).
3. `check`: the compiled kernels against their references on fresh random inputs: flash attention
   fwd + bwd (bf16; ALiBi; in-kernel RoPE vs RoPE applied first; the fused backward with ALiBi
   and packed segments), decode attention (ragged
   lengths, left padding, GQA, ALiBi, NaN in unfilled slots) by relative L2 error, and the top-k /
   greedy pick exactly against `jax.lax.top_k` on a tied 125,696-entry vocabulary.
4. `attention`: our flash kernel fwd+bwd vs `jax.nn.dot_product_attention(
   implementation="cudnn")` at seq 2k/4k/8k, head_dim 128, causal, bf16, 16,384 tokens per batch,
   32 heads, with and without ALiBi (cuDNN with ALiBi takes a dense bias); ratios ours / cuDNN and
   the ALiBi overhead.
5. `train`: the ~1B (1.17B) Baichuan-7B-shaped training step (benchmarks/gpu_train_mfu.py,
   attention_impl=pallas, no remat, batch 4 x 4096) MFU against the datasheet and the measured
   matmul peak; its device-time profile by kernel bucket; and the optimizer update alone on the
   step's own state (`gpu_train_mfu.optimizer_update_timing`: as the step runs it, with the
   NaN/inf guard, with the guard's other form, `train.step.GUARD_RECOMPUTE` flipped, and as
   plain optax) against its least traffic at the measured copy rate.
6. `decode`: 7B-shaped (Baichuan2-7B, random bf16 weights) single-token decode step with 2,048
   filled cache slots per row (cache of 2,176): `infer.generate`'s own greedy step (its host-loop
   step: `BaichuanLM(unroll_layers=True)` on the KV cache, then `sampling.next_token`) with
   (a) attention_impl="xla" (XLA attention over every slot, `jnp.argmax`) at batch 1, and
   (b) attention_impl="pallas", the kernels wired into the model (fused RMSNorm,
   `kernels_pallas.decode_attention` over each row's filled slots, `topk_argmax` with the
   repetition penalty inside) at batch 1, 8 and 32, whose logits are first checked against (a);
   at batch 1 also (c) = (b) without the per-layer span check (`layers.DECODE_SPAN_CHECK`, a
   `lax.cond` per layer), to see what the conditional costs (`decode no-check`, the run's last
   section: it decides nothing, so it yields to everything else). The limit is the measured copy
   bandwidth over the bytes a step must read (matmul weights + the filled K/V slots).
7. `decode_kernel`: `decode_attention` alone on one layer's cache (batch 1/8/32, 2,048 filled
   slots; block / split / warp variants at batch 1; ragged lengths at batch 32) against the jnp
   reference, as GB/s of the filled K/V bytes and a fraction of the copy bandwidth.
8. `tiles` (run right after `check`) and `tiles rope` (after it, when `train` runs): backward
   tilings at seq 4096 (per-kernel dQ / dK/dV blocks, warps, stages; TILE_VARIANTS for the
   plain kernels, TILE_VARIANTS_ROPE for those with RoPE inside, the training step's; chosen
   with benchmarks/triton_sm90.py: every one fits sm_90's shared memory and spills no
   registers under the triton wheel), among them the fused backward (`fused_backward`: one
   kernel, dQ by atomic adds) at four tilings (under XLA's own Triton these spill or have
   their wgmmas serialized: benchmarks/gpu_aot.py). Each path's fastest (fwd+bwd) is set in
   `kernels_pallas.attention.MEASURED_TUNING` for the rest of the run (this process only), so the `attention` section
   and the RoPE-first train steps run the plain winner, the in-kernel-RoPE ones the rope winner;
   recorded as `tuning_used` / `tuning_used_rope` with their gain over the defaults.
9. `train` variants (`TRAIN_VARIANTS`), each the `train` step with one change and only if the
   budget still has room: `batch x2` (8 x 4096, after `decode`: it bears on the MFU aim), then,
   last, the RoPE A/B's other arm: `rope-first` (RoPE applied to q and k before the kernels,
   `layers.ROPE_IN_KERNEL = False`) or `rope in kernel` (True), whichever the defaults do not
   already run (the default since the H200's first run: RoPE first), likewise `swiglu
   autodiff` or `swiglu vjp` (the SwiGLU product's backward: jax's autodiff of the formula or
   `layers.swiglu`'s own, `layers.SWIGLU_VJP`; the default is the latter), `unrolled layers` (the
   decoder stack unrolled instead of scanned: `layers.SCAN_LAYERS = False`), `xla RMSNorm` (the
   jnp norm, which XLA fuses with the residual add, instead of the Pallas kernel:
   `layers.FUSED_RMS_NORM = False`) and `whole-logit loss` (loss_chunk_size=0
   instead of the split loss; last, as it decides no default). The summary's `train_variants`
   gives each one's tokens/s over the default step's, `train_best` the fastest,
   `train_rope_in_kernel_speedup` the RoPE-first step time over the in-kernel step's and
   `train_fused_rms_norm_speedup` the xla-RMSNorm step time over the kernel step's and
   `train_swiglu_vjp_speedup` the autodiff-SwiGLU step time over the `swiglu` step's.

10. `attention mosaic` (after `decode no-check`), `attention mosaic blocks`, `train mosaic
   attention`, `attention mosaic extra` (last): the Hopper kernels of `kernels_pallas.flash_mgpu`
   (Mosaic GPU: TMA + wgmma), which no GPU has run before, so they come last: checked against
   the fp32 reference (plain causal GQA; packed segments, positions and ALiBi), then, only if
   both checks pass, fwd+bwd at the `attention` section's seqs (`impl` "mosaic" rows beside its
   cuDNN and Triton ones); the other block settings (`MOSAIC_VARIANTS`: two compute
   warpgroups, the fused backward, the ping-pong forward among them) at 4k, the fastest
   checked and set as this process's `flash_mgpu.DEFAULT_BLOCKS` (`mosaic_blocks_used`); the
   ~1B step with
   `layers.FLASH_MOSAIC = True`; last the forward alone by each of `MOSAIC_FWD_IMPLS`.

After a device run, `benchmarks/gpu_apply.py gpu_suite.json --write` turns the tiles and train
A/Bs into the project's defaults by rule (each path's fastest tiling into
`kernels_pallas.attention.MEASURED_TUNING`, `layers.ROPE_IN_KERNEL`, `layers.FUSED_RMS_NORM`,
`layers.SCAN_LAYERS`, `layers.SWIGLU_VJP`, `layers.FLASH_MOSAIC`, `flash_mgpu.DEFAULT_BLOCKS`);
every train row records the `layers_switches` it ran with, which is what that tool compares.

`--small` runs the same code on tiny shapes, with the kernels in Pallas interpret mode, on a CPU
(tests/test_kernels_gpu_suite.py runs it); its numbers are meaningless, its purpose is that the
device run has no surprises. `--preflight` (also on a CPU, ~20 s) exports every program of the
full run at the device shapes for CUDA (`jax.export`, platforms=["cuda"]): each kernel's Pallas ->
Triton lowering, the ~1B step and the 7B decode steps, so a lowering error cannot cost GPU time.
`benchmarks/gpu_aot.py` then compiles those same programs for the H200 (sm_90a) with XLA's
deviceless compiler, Triton's and Mosaic GPU's compilation to cubin and ptxas included.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import gc
import json
import math
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import kernels_pallas  # noqa: E402
from timing import median_seconds  # noqa: E402  (benchmarks/timing.py)
from kernels_pallas import (attention_reference, decode_attention,  # noqa: E402
                            decode_attention_reference, flash_attention, top_k, topk_argmax)

DATASHEET = {"H200": (989e12, 4.8e12), "H100": (989e12, 3.35e12), "A100": (312e12, 2.0e12)}

# Shapes per mode. "full" is the device run; "small" a CPU smoke run of the same code.
FULL = dict(
    matmul_n=8192, copy_gib=4.0,
    check=dict(b=2, s=1000, h=8, hkv=2, d=128, dec_b=4, dec_h=32, dec_kvh=8, dec_len=2176,
               vocab=125696),
    attn=dict(seqs=(2048, 4096, 8192), tokens=16384, heads=32, head_dim=128, iters=10,
              modes=("fwdbwd",)),
    train=dict(batch=4, seq=4096, layers=18, hidden=2048, heads=16, steps=6, warmup=2,
               impl="pallas"),
    decode=dict(preset="baichuan2-7b", overrides={}, context=2048, max_len=2176,
                batches=(1, 8, 32), model_batches=(1,), steps=10),
    decode_kernel=dict(heads=32, kv_heads=32, head_dim=128, context=2048, max_len=2176,
                       batches=(1, 8, 32), iters=20),
    tiles=dict(seq=4096, tokens=16384, heads=32, head_dim=128, iters=6),
    mosaic=dict(seqs=(2048, 4096, 8192), tokens=16384, heads=32, head_dim=128, iters=10,
                variant_seq=4096, check=dict(b=2, s=1024, h=8, hkv=2, d=128)),
)
SMALL = dict(
    matmul_n=256, copy_gib=1 / 64,
    check=dict(b=1, s=64, h=2, hkv=1, d=32, dec_b=3, dec_h=4, dec_kvh=2, dec_len=128, vocab=1000),
    attn=dict(seqs=(64,), tokens=64, heads=2, head_dim=32, iters=2, modes=("fwd",)),
    train=dict(batch=2, seq=64, layers=1, hidden=128, heads=2, steps=2, warmup=1, impl="pallas"),
    decode=dict(preset="tiny", overrides=dict(num_layers=1), context=20, max_len=32,
                batches=(1,), model_batches=(1,), steps=2),
    decode_kernel=dict(heads=4, kv_heads=2, head_dim=32, context=40, max_len=64, batches=(3,),
                       iters=1, variants=2),
    tiles=dict(seq=64, tokens=64, heads=2, head_dim=32, iters=1, variants=(1,)),
    mosaic=dict(seqs=(128,), tokens=128, heads=2, head_dim=64, iters=1, variant_seq=128,
                variants=1, fwd_impls=("mosaic", "cudnn"), check=dict(b=1, s=128, h=2, hkv=1,
                                                                      d=64)),
)
# Estimated device seconds (compile + timing) of each section, or of each item of the sections
# that run items ("... item", "decode_step": one step program of `decode`), used by the budget
# guard. Guesses until a device run: the H100 run compiled the ~1B step in ~15 s and ran it at
# 0.32 s per step. `benchmarks/gpu_apply.py --write` rescales them from a run's section_times
# (the block below is what it edits).
# BEGIN COST
COST = {'attention item': 2,
        'attention mosaic check': 12,
        'attention mosaic item': 3,
        'ceilings': 6,
        'check': 36,
        'decode first step': 8,
        'decode_kernel item': 2,
        'decode_step': 27,
        'env': 1,
        'tiles item': 2,
        'train': 26,
        'train batch x2': 20,
        'train mosaic attention': 30,
        'train rope-first': 9,
        'train rope in kernel': 9,
        'train swiglu autodiff': 9,
        'train swiglu vjp': 9,
        'train triton attention': 9,
        'train unrolled layers': 30,
        'train whole-logit loss': 16,
        'train xla RMSNorm': 10}
# END COST


class Suite:
  """Results, the budget guard and the writers."""

  def __init__(self, args, shapes):
    self.args, self.shapes = args, shapes
    self.t0 = time.perf_counter()
    self.out = Path(args.out)
    self.out.mkdir(parents=True, exist_ok=True)
    self.result = dict(env={}, ceilings={}, check=[], attention=[], train=[], decode=[],
                       decode_kernel=[], tiles=[], attention_mosaic=[], skipped=[], errors=[],
                       summary={},
                       tuning_used=None, tuning_used_rope=None, section_times=[],
                       cost=dict(COST))  # the estimates this run's guard used
    self.lock = threading.Lock()
    self.estimated = 0.0  # the estimates of the items the current section ran (fits() True)
    self.mosaic_blocks_saved = None  # flash_mgpu.DEFAULT_BLOCKS before this run changed them

  def elapsed(self) -> float:
    return time.perf_counter() - self.t0

  def guard_scale(self) -> float:
    """How the estimates compare with this run so far: the finished sections' seconds over
    their estimates (once those add up to >= 30 s; 1 before), clamped to [0.4, 1.5]. Estimates
    are guesses until a device run calibrates COST, so the guard learns them within the run:
    a faster device fits more of the plan, a slower one skips sooner rather than meet the
    watchdog mid-section. 0 with --small (on a CPU the device estimates mean nothing)."""
    if self.args.small:
      return 0.0
    done = [t for t in self.result["section_times"] if t["estimate_s"] > 0]
    est = sum(t["estimate_s"] for t in done)
    if est < 30:
      return 1.0
    return min(1.5, max(0.4, sum(t["seconds"] for t in done) / est))

  def fits(self, name: str, cost: float) -> bool:
    """True if `cost` seconds (scaled by `guard_scale`) still fit the budget; otherwise records
    the skip."""
    scale = self.guard_scale()
    left = self.args.budget_s - self.elapsed()
    if cost * scale > left:
      note = (f"{name}: skipped at {self.elapsed():.0f} s (needs ~{cost * scale:.0f} s: "
              f"estimate {cost:.0f} s x {scale:.2f}; {left:.0f} s left)")
      self.result["skipped"].append(note)
      print(note, flush=True)
      return False
    self.estimated += cost
    return True

  def error(self, name: str, exc: BaseException):
    msg = f"{name}: {type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
    self.result["errors"].append(msg)
    print("ERROR", msg, flush=True)

  def _report_failure(self, what: str, exc: BaseException):
    """A failure of the report itself, recorded once: it must not end the run."""
    import traceback
    where = traceback.extract_tb(exc.__traceback__)[-1]
    msg = (f"{what}: {type(exc).__name__}: {str(exc)[:200]} (at {Path(where.filename).name}:"
           f"{where.lineno})")
    if msg not in self.result["errors"]:
      self.result["errors"].append(msg)
      print("ERROR", msg, flush=True)

  def write(self, summary: bool = False):
    """Writes gpu_suite.json and .md (`summary`: recomputes the summary first). A summary or
    markdown that fails on some unforeseen row is an error in the file, not the end of the run:
    the JSON keeps every row, and the sections still to come still run."""
    with self.lock:
      if summary:
        try:
          self.result["summary"] = summarise(self.result)
        except Exception as e:  # pylint: disable=broad-except
          self._report_failure("summary", e)
      self.result["elapsed_s"] = self.elapsed()
      (self.out / "gpu_suite.json").write_text(json.dumps(self.result, indent=1, default=str))
      try:
        self.markdown_text = markdown(self.result)
      except Exception as e:  # pylint: disable=broad-except
        self._report_failure("markdown", e)
        self.markdown_text = ("# gpu_suite results\n\nThe markdown report failed ("
                              + self.result["errors"][-1] + "); gpu_suite.json beside this file "
                              "holds every result.\n")
        (self.out / "gpu_suite.json").write_text(json.dumps(self.result, indent=1, default=str))
      (self.out / "gpu_suite.md").write_text(self.markdown_text)


# ----------------------------------------------------------------------------------------------
# sections


def section_env(suite):
  dev = jax.devices()[0]
  env = dict(device=dev.device_kind, platform=dev.platform, device_count=jax.device_count(),
             python=platform.python_version(), jax=jax.__version__,
             argv=[sys.executable] + sys.argv, small=suite.args.small,
             budget_s=suite.args.budget_s, cwd=os.getcwd(),
             date_utc=time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()))
  for mod in ("jaxlib", "flax", "optax", "triton", "numpy"):
    try:
      env[mod] = __import__(mod).__version__
    except Exception:  # pylint: disable=broad-except
      env[mod] = None
  for key in ("JAX_PLATFORMS", "XLA_PYTHON_CLIENT_MEM_FRACTION", "XLA_FLAGS"):
    env[key] = os.environ.get(key)
  try:
    env["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                                       text=True, timeout=10).stdout.strip() or None
  except Exception:  # pylint: disable=broad-except
    env["git_commit"] = None
  try:
    env["nvidia_smi"] = subprocess.run(
        ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
         "--format=csv,noheader"], capture_output=True, text=True, timeout=20).stdout.strip()
  except Exception:  # pylint: disable=broad-except
    env["nvidia_smi"] = None
  peaks = next((v for k, v in DATASHEET.items() if k in dev.device_kind), None)
  env["datasheet_bf16_flops"], env["datasheet_bandwidth"] = peaks if peaks else (None, None)
  suite.result["env"] = env


def section_ceilings(suite):
  n = suite.shapes["matmul_n"]
  ka, kb = jax.random.split(jax.random.PRNGKey(0))
  a = jax.random.normal(ka, (n, n), jnp.bfloat16)
  b = jax.random.normal(kb, (n, n), jnp.bfloat16)
  mm = jax.jit(lambda a, b: a @ b)
  sec = median_seconds(mm, a, b, iters=20)
  elems = int(suite.shapes["copy_gib"] * 2 ** 30 / 2)
  x = jax.random.normal(jax.random.PRNGKey(2), (elems,), jnp.bfloat16)
  cp = jax.jit(lambda x: x * 2)  # one read and one write per element
  csec = median_seconds(cp, x, iters=20)
  suite.result["ceilings"] = dict(matmul_n=n, matmul_s=sec, matmul_flops=2 * n ** 3 / sec,
                                  copy_bytes=2 * x.nbytes, copy_s=csec,
                                  copy_bandwidth=2 * x.nbytes / csec)
  del a, b, x


def _rel_l2(got, want):
  g = np.asarray(jnp.asarray(got, jnp.float32), np.float64)
  w = np.asarray(jnp.asarray(want, jnp.float32), np.float64)
  if not np.all(np.isfinite(g)):
    return float("nan")
  return float(np.linalg.norm(g - w) / max(np.linalg.norm(w), 1e-30))


def fwd_bwd_errors(fn, ref, q, k, v, ct) -> dict:
  """Relative L2 errors of out, dq, dk, dv: `fn` on bf16 q, k, v against `ref` on the fp32 ones
  (highest matmul precision), both with cotangent `ct`."""
  def both(f, q, k, v):
    o, vjp = jax.vjp(f, q, k, v)
    return (o,) + vjp(ct.astype(o.dtype))

  with jax.default_matmul_precision("highest"):
    want = jax.jit(functools.partial(both, ref))(q, k, v)
  bf = lambda x: x.astype(jnp.bfloat16)
  got = jax.jit(functools.partial(both, fn))(bf(q), bf(k), bf(v))
  return {n: _rel_l2(g, w) for n, g, w in zip(("out", "dq", "dk", "dv"), got, want)}


FUSED_CHECK = "flash fused backward (alibi, segments)"


def fused_check_kwargs(b, s, slopes) -> dict:
  """flash_attention keywords of the fused-backward check: ALiBi, two packed documents per row
  (the first third, then the rest), tuning fused_backward."""
  seg = jnp.where(jnp.arange(s)[None] < s // 3, 1, 2) * jnp.ones((b, 1), jnp.int32)
  return dict(alibi_slopes=slopes, segment_ids=seg, tuning={"fused_backward": True})


def section_check(suite, backend):
  from baichuan_jax.model.positions import alibi_slopes, apply_rope
  c = suite.shapes["check"]
  rows = suite.result["check"]
  limit = 1.5e-2  # bf16 operands (the H100 runs gave 3e-3 - 4.4e-3)
  keys = jax.random.split(jax.random.PRNGKey(int(time.time()) % 10000), 8)
  b, s, h, hkv, d = c["b"], c["s"], c["h"], c["hkv"], c["d"]
  q = jax.random.normal(keys[0], (b, s, h, d), jnp.float32)
  k = jax.random.normal(keys[1], (b, s, hkv, d), jnp.float32)
  v = jax.random.normal(keys[2], (b, s, hkv, d), jnp.float32)
  ct = jax.random.normal(keys[3], (b, s, h, d), jnp.float32)
  pos = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
  slopes = jnp.asarray(alibi_slopes(h))
  bf = lambda x: x.astype(jnp.bfloat16)
  cases = {
      "flash alibi": (lambda q, k, v: flash_attention(q, k, v, alibi_slopes=slopes,
                                                      backend=backend),
                      lambda q, k, v: attention_reference(q, k, v, alibi_slopes=slopes)),
      "flash in-kernel rope": (
          lambda q, k, v: flash_attention(q, k, v, positions=pos, rope_theta=1e4,
                                          backend=backend),
          lambda q, k, v: attention_reference(apply_rope(q, pos, 1e4), apply_rope(k, pos, 1e4),
                                              v)),
  }
  # The fused backward (dQ by atomic adds from many programs at once): GQA, ALiBi, packed
  # segments, as a tiles variant would run it for the training step.
  fused_kw = fused_check_kwargs(b, s, slopes)
  fused = (lambda q, k, v: flash_attention(q, k, v, backend=backend, **fused_kw),
           lambda q, k, v: attention_reference(q, k, v, alibi_slopes=slopes,
                                               segment_ids=fused_kw["segment_ids"]))
  cases[FUSED_CHECK] = fused
  if suite.args.small:  # two compiles: both features in one call, and the fused backward
    cases = {"flash alibi + in-kernel rope": (
        lambda q, k, v: flash_attention(q, k, v, alibi_slopes=slopes, positions=pos,
                                        rope_theta=1e4, backend=backend),
        lambda q, k, v: attention_reference(apply_rope(q, pos, 1e4), apply_rope(k, pos, 1e4), v,
                                            alibi_slopes=slopes, positions=pos)),
        FUSED_CHECK: fused}
  for name, (fn, ref) in cases.items():
    errs = fwd_bwd_errors(fn, ref, q, k, v, ct)
    rows.append(dict(kernel=name, shape=[b, s, h, hkv, d], dtype="bfloat16", rel_l2=errs,
                     limit=limit, ok=all(e <= limit for e in errs.values())))
  # Decode attention: ragged lengths, left padding, NaN in every unfilled slot.
  db, dh, dkvh, L = c["dec_b"], c["dec_h"], c["dec_kvh"], c["dec_len"]
  qd = jax.random.normal(keys[4], (db, dh, d), jnp.float32)
  kc = jax.random.normal(keys[5], (db, dkvh, L, d), jnp.float32)
  vc = jax.random.normal(keys[6], (db, dkvh, L, d), jnp.float32)
  lengths = jnp.asarray(np.linspace(1, L, db).astype(np.int32))
  starts = jnp.asarray((np.arange(db) * 7) % np.maximum(np.asarray(lengths) // 2, 1), jnp.int32)
  dslopes = jnp.asarray(alibi_slopes(dh))
  with jax.default_matmul_precision("highest"):
    want = decode_attention_reference(qd, kc, vc, lengths, starts=starts, alibi_slopes=dslopes)
  j = jnp.arange(L)[None, None, :, None]
  bad = (j >= lengths[:, None, None, None]) | (j < starts[:, None, None, None])
  got = jax.jit(lambda q, k, v: decode_attention(q, k, v, lengths, starts=starts,
                                                 alibi_slopes=dslopes, backend=backend))(
      bf(qd), jnp.where(bad, jnp.nan, bf(kc)).astype(jnp.bfloat16),
      jnp.where(bad, jnp.nan, bf(vc)).astype(jnp.bfloat16))
  err = _rel_l2(got, want)
  rows.append(dict(kernel="decode attention (ragged, GQA, ALiBi, NaN in unfilled slots)",
                   shape=[db, dh, dkvh, L, d], lengths=np.asarray(lengths).tolist(),
                   starts=np.asarray(starts).tolist(), dtype="bfloat16", rel_l2={"out": err},
                   limit=limit, ok=err <= limit))
  # Top-k / greedy: exact, on integer logits (ties everywhere; lowest index must win).
  rng = np.random.default_rng(int(time.time()) % 10000)
  x = jnp.asarray(rng.integers(-8, 9, size=(4, c["vocab"])).astype(np.float32))
  ok = True
  for kk in (1, 8):
    vals, idx = jax.jit(lambda x: top_k(x, kk, backend=backend))(x)
    wv, wi = jax.lax.top_k(x, kk)
    ok &= bool(np.array_equal(np.asarray(idx), np.asarray(wi)) and
               np.array_equal(np.asarray(vals), np.asarray(wv)))
  am = jax.jit(lambda x: topk_argmax(x, backend=backend))(x)
  ok &= bool(np.array_equal(np.asarray(am), np.asarray(jnp.argmax(x, -1))))
  # With the repetition penalty inside the kernel, as the pallas decode step picks
  # (infer.sampling: k = KERNEL_TOP_K = 16 when sampling, argmax when greedy), on normal logits:
  # the kernel's fp32 division must round as XLA's for the tokens to be the XLA path's.
  from baichuan_jax.infer.sampling import apply_repetition_penalty
  y = jnp.asarray(rng.normal(size=(4, c["vocab"])).astype(np.float32)) * 3
  present = jnp.asarray(rng.random((4, c["vocab"])) < 0.05)
  pen = jnp.asarray([1.05, 1.3, 1.1, 2.0], jnp.float32)
  want_y = apply_repetition_penalty(y, present, pen)
  vals, idx = jax.jit(lambda y: top_k(y, 16, present=present, penalty=pen, backend=backend))(y)
  wv, wi = jax.lax.top_k(want_y, 16)
  pen_ok = bool(np.array_equal(np.asarray(idx), np.asarray(wi)) and
                np.array_equal(np.asarray(vals), np.asarray(wv)))
  am = jax.jit(lambda y: topk_argmax(y, present=present, penalty=pen, backend=backend))(y)
  pen_ok &= bool(np.array_equal(np.asarray(am), np.asarray(jnp.argmax(want_y, -1))))
  rows.append(dict(kernel="top_k k=1,8 + argmax (exact, ties); k=16 + argmax with the "
                   "repetition penalty (exact)", shape=[4, c["vocab"]], ok=ok and pen_ok,
                   ties_ok=ok, penalty_ok=pen_ok))


def section_attention(suite, backend, cfg):
  import attention as attn_bench  # benchmarks/attention.py
  attn_bench.BACKEND = backend
  rows = suite.result["attention"]
  for s in cfg["seqs"]:
    b = max(1, cfg["tokens"] // s)
    for mode in cfg["modes"]:
      for impl, alibi in (("ours", False), ("ours", True), ("cudnn", False), ("cudnn", True)):
        if mode == "fwd" and alibi and impl == "cudnn":
          continue
        if not suite.fits(f"attention {mode} seq {s} {impl}", COST["attention item"]):
          return
        row = attn_bench.bench_one(impl, mode, b=b, s=s, h=cfg["heads"], d=cfg["head_dim"],
                                   dtype=jnp.bfloat16, causal=True, alibi=alibi,
                                   iters=cfg["iters"])
        if impl == "ours":
          row["tiling"] = _tiling(suite.result)
        rows.append(row)
        print(f"attention {mode} seq={s} {impl}{'+alibi' if alibi else ''}: "
              + (f"{row['tflops']:.1f} TFLOP/s {row['ms']:.3f} ms" if "tflops" in row
                 else row.get("error", "")[:120]), flush=True)
      suite.write()


# The Mosaic GPU kernels' (kernels_pallas.flash_mgpu) blocks, per kernel (block_q, block_k,
# stages), timed fwd+bwd at `variant_seq` after the default at every seq. Each keeps the wgmma
# accumulators within a warpgroup's registers (dK/dV: two 64 x 128 fp32 tiles) and the tiles
# within an SM's 227 KiB of shared memory. The fused backward ("fused" after dK/dV's blocks)
# is one kernel: dQ by fp32 TMA reduce-adds, 5 tile matmuls instead of 7 (with two warpgroups
# its shared memory is ~208 KiB at head_dim 128: each warpgroup's K, V, dS and fp32 dQ tiles,
# and the streamed Q and dO in 2 stages). "pingpong" after the forward's blocks: its two compute
# warpgroups take turns on the tensor cores (FlashAttention-3's schedule).
MOSAIC_VARIANTS = (
    ("default", None),
    ("2 warpgroups", {"fwd": (64, 64, 2, 2), "dq": (64, 64, 2, 2), "dkdv": (64, 64, 2, 2)}),
    ("2 warpgroups, fwd keys 128", {"fwd": (64, 128, 2, 2), "dq": (64, 64, 2, 2),
                                    "dkdv": (64, 64, 2, 2)}),
    ("fwd keys 128", {"fwd": (64, 128, 2)}),
    ("3 stages", {"fwd": (64, 64, 3), "dq": (64, 64, 3), "dkdv": (64, 64, 3)}),
    ("fused backward", {"dkdv": (64, 64, 2, 1, "fused")}),
    ("2 warpgroups, fused backward", {"fwd": (64, 64, 2, 2), "dkdv": (64, 64, 2, 2, "fused")}),
    ("2 warpgroups, ping-pong", {"fwd": (64, 64, 2, 2, "pingpong"), "dq": (64, 64, 2, 2),
                                 "dkdv": (64, 64, 2, 2)}),
    ("ping-pong, fused backward", {"fwd": (64, 64, 2, 2, "pingpong"),
                                   "dkdv": (64, 64, 2, 2, "fused")}),
)
MOSAIC_CHECK = "flash mosaic (Hopper kernels: fwd, dQ, dK/dV; causal, GQA)"
MOSAIC_CHECK_PACKED = "flash mosaic packed (segments, positions, ALiBi; causal, GQA)"


# The forward alone at `variant_seq`, after the fwd+bwd rows: ours on Mosaic GPU and on Triton,
# cuDNN's, and jax's own Mosaic GPU forward (jax.experimental.pallas.ops.gpu.attention_mgpu: two
# compute warpgroups and a TMA warpgroup, float16), to see how far the forward is from the
# warp-specialised design (the `attention` section times fwd+bwd only).
MOSAIC_FWD_IMPLS = ("mosaic", "ours", "cudnn", "jax_mgpu")
MOSAIC_STAGES = ("main", "blocks", "extra")


def mosaic_plan(cfg, stage=None) -> list:
  """[(mode, seq, impl, variant name, blocks)] of one stage of the Mosaic sections (None: all):
  "main", the default blocks fwd+bwd at every seq; "blocks", the other variants (the first
  `cfg["variants"]` of them with --small) at `variant_seq`; "extra", the forward alone there by
  each of `MOSAIC_FWD_IMPLS` (those of `cfg["fwd_impls"]` if given)."""
  others = MOSAIC_VARIANTS[1:][:cfg.get("variants", len(MOSAIC_VARIANTS))]
  plans = dict(
      main=[("fwdbwd", s, "mosaic", "default", None) for s in cfg["seqs"]],
      blocks=[("fwdbwd", cfg["variant_seq"], "mosaic", name, blocks) for name, blocks in others],
      extra=[("fwd", cfg["variant_seq"], impl, "default", None)
             for impl in cfg.get("fwd_impls", MOSAIC_FWD_IMPLS)])
  return plans[stage] if stage else [item for st in MOSAIC_STAGES for item in plans[st]]


def _mosaic_checks(suite, backend, cfg, blocks=None, variant="default") -> bool:
  """The Mosaic kernels (with `blocks`) against the fp32 reference, out / dQ / dK / dV: plain
  causal GQA, and packed (two documents per row, positions restarting, ALiBi). Rows of kind
  "check" for the default blocks (what `mosaic_check_passed` reads), "variant check" for
  others. True if both pass."""
  from baichuan_jax.model.positions import alibi_slopes
  from kernels_pallas.flash_mgpu import flash_attention_mgpu
  c = cfg["check"]
  keys = jax.random.split(jax.random.PRNGKey(int(time.time()) % 10000), 4)
  q = jax.random.normal(keys[0], (c["b"], c["s"], c["h"], c["d"]), jnp.float32)
  k, v = (jax.random.normal(key, (c["b"], c["s"], c["hkv"], c["d"]), jnp.float32)
          for key in keys[1:3])
  ct = jax.random.normal(keys[3], q.shape, jnp.float32)
  cut = c["s"] // 3
  seg = jnp.where(jnp.arange(c["s"])[None] < cut, 1, 2) * jnp.ones((c["b"], 1), jnp.int32)
  pos = jnp.where(seg == 1, jnp.arange(c["s"])[None], jnp.arange(c["s"])[None] - cut)
  packed = dict(alibi_slopes=jnp.asarray(alibi_slopes(c["h"])), segment_ids=seg, positions=pos)
  limit, ok = 1.5e-2, True  # as the Triton kernels' checks
  for name, kw in ((MOSAIC_CHECK, {}), (MOSAIC_CHECK_PACKED, packed)):
    ours = functools.partial(flash_attention_mgpu, interpret=backend == "interpret",
                             blocks=blocks, **kw)
    errs = fwd_bwd_errors(ours, functools.partial(attention_reference, **kw), q, k, v, ct)
    row = dict(kind="check" if blocks is None else "variant check", kernel=name,
               variant=variant, shape=[c["b"], c["s"], c["h"], c["hkv"], c["d"]], rel_l2=errs,
               limit=limit, ok=all(e <= limit for e in errs.values()))
    ok &= row["ok"]
    suite.result["attention_mosaic"].append(row)
    print(f"check {name} ({variant}): " + ", ".join(f"{n} {e:.2e}" for n, e in errs.items()),
          flush=True)
    suite.write()
  return ok


def section_attention_mosaic(suite, backend, cfg, stage="main"):
  """The Mosaic GPU flash attention (kernels_pallas.flash_mgpu) in three stages, each its own
  section (`mosaic_plan`), last in the run: new kernels that no GPU has run yet, so a fault or
  a hang here (the watchdog ends the process at the hard limit) costs no other section's
  figures. "main": the checks (`_mosaic_checks`), then, only if they pass, fwd+bwd at the
  `attention` section's seqs (rows `impl` "mosaic" beside its cuDNN and Triton ones). "blocks":
  the other block settings at `variant_seq`; the fastest, if it also passes the checks, becomes
  this process's `flash_mgpu.DEFAULT_BLOCKS` (`mosaic_blocks_used`), which the ~1B step on these
  kernels then runs. "extra": the forward alone by them and by the other kernels."""
  import attention as attn_bench  # benchmarks/attention.py
  attn_bench.BACKEND = backend
  if stage != "main" and not mosaic_check_passed(suite.result):
    suite.result["skipped"].append(f"attention mosaic {stage}: the Mosaic kernels' checks did "
                                   "not run or did not pass")
    return
  if stage == "main":
    if not suite.fits("attention mosaic check", COST["attention mosaic check"]):
      return
    if not _mosaic_checks(suite, backend, cfg):
      suite.result["skipped"].append("attention mosaic timing: its check failed")
      return
  _time_mosaic(suite, attn_bench, cfg, mosaic_plan(cfg, stage))
  if stage == "blocks":
    _pick_mosaic_blocks(suite, backend, cfg)


def _pick_mosaic_blocks(suite, backend, cfg):
  """The fastest block setting at `variant_seq` (the default's row there from the "main"
  stage), checked, set as this process's `flash_mgpu.DEFAULT_BLOCKS`."""
  from kernels_pallas import flash_mgpu
  rows = [r for r in suite.result["attention_mosaic"] if r.get("kind") == "time"
          and r["mode"] == "fwdbwd" and r["seq"] == cfg["variant_seq"] and "ms" in r]
  default = next((r for r in rows if r["variant"] == "default"), None)
  if default is None or len(rows) < 2:
    return
  best = min(rows, key=lambda r: r["ms"])
  used = dict(variant=best["variant"], ms=best["ms"], default_ms=default["ms"],
              seq=best["seq"], blocks=None)
  if best["variant"] != "default":
    blocks = dict(MOSAIC_VARIANTS)[best["variant"]]
    used["checked"] = _mosaic_checks(suite, backend, cfg, blocks, best["variant"])
    if used["checked"]:
      resolved = flash_mgpu.resolve_blocks(blocks)
      used["blocks"] = {ph: list(v) for ph, v in resolved.items()}
      suite.mosaic_blocks_saved = dict(flash_mgpu.DEFAULT_BLOCKS)  # main restores it
      flash_mgpu.DEFAULT_BLOCKS.update(resolved)
  suite.result["mosaic_blocks_used"] = used
  print(f"mosaic blocks used: {used}", flush=True)


def _time_mosaic(suite, attn_bench, cfg, plan):
  rows = suite.result["attention_mosaic"]
  for mode, s, impl, name, blocks in plan:
    if not suite.fits(f"attention mosaic {mode} seq {s} {impl} {name}",
                      COST["attention mosaic item"]):
      return
    row = attn_bench.bench_one(impl, mode, b=max(1, cfg["tokens"] // s), s=s,
                               h=cfg["heads"], d=cfg["head_dim"], dtype=jnp.bfloat16,
                               causal=True, alibi=False, iters=cfg["iters"], tuning=blocks)
    row.update(kind="time", variant=name)
    rows.append(row)
    print(f"attention mosaic {mode} seq={s} {impl} {name}: "
          + (f"{row['tflops']:.1f} TFLOP/s {row['ms']:.3f} ms" if "tflops" in row
             else row.get("error", "")[:160]), flush=True)
    suite.write()


def mosaic_summary(result) -> dict:
  """The Mosaic kernels' speed (default blocks) over cuDNN's, over ours (Triton) and over jax's
  Mosaic forward, per mode and seq (the `attention` section's rows and this section's own of
  the same shape); the fastest block setting is `mosaic_blocks_used`, added by `summarise`."""
  rows = result.get("attention_mosaic", [])
  timed = [r for r in rows if r.get("kind") == "time" and "ms" in r]
  checks = [r for r in rows if r.get("kind") == "check"]
  # the other kernels' rows of the same shape: the attention section's, and this section's own
  # forward-only rows
  by = {(r["mode"], r["seq"], r["impl"]): r for r in result["attention"]
        if not r["alibi"] and "ms" in r}
  by.update({(r["mode"], r["seq"], r["impl"]): r for r in timed if r["impl"] != "mosaic"})
  out = dict(check_ok=mosaic_check_passed(result) if checks else None, over_cudnn={},
             over_ours={}, over_jax_mgpu={})
  for r in timed:
    if r["variant"] != "default" or r["impl"] != "mosaic":
      continue
    for other, key in (("cudnn", "over_cudnn"), ("ours", "over_ours"),
                       ("jax_mgpu", "over_jax_mgpu")):
      ref = by.get((r["mode"], r["seq"], other))
      if ref:
        out[key][f"{r['mode']} {r['seq']}"] = ref["ms"] / r["ms"]
  return out


# The ~1B step's A/Bs: each is the `train` step with one change, run after the aims' sections
# (each only if the budget still has room, in this order of priority), reported against the
# default step in `summary.train_variants`.
TRAIN_VARIANTS = {
    "default": {},
    # Twice the H100 run's batch, no remat: expected (not yet seen) to fit the H200's 139 GiB
    # (that run peaked at 47 GiB); the optimizer update and other per-step costs are spread
    # over twice the tokens. The row reports the peak memory (or the error, if it did not fit).
    "batch x2": dict(batch_mult=2),
    # RoPE applied to q and k before the kernels (`layers.ROPE_IN_KERNEL = False`): the H100
    # rows' path, so the run says whether the rotation inside the kernels pays.
    "rope-first": dict(flags=dict(ROPE_IN_KERNEL=False)),
    # RoPE rotated inside the flash kernels (`layers.ROPE_IN_KERNEL = True`): the other arm of
    # the same A/B, for when RoPE first is the default (it is since the H200's first run, where
    # it was 1.23x faster). Of the two arms, the one the defaults already run is left out of the
    # plan (`redundant_variant`).
    "rope in kernel": dict(flags=dict(ROPE_IN_KERNEL=True)),
    # The decoder stack unrolled over static slices of the stacked weights instead of the layer
    # scan (`layers.SCAN_LAYERS = False`; the step has no remat): the H200's profile of the
    # scanned step held 15 ms of memcpy and 11.5 ms of dynamic-update-slice fusions, which the
    # scan's per-layer weight slices and stacked gradient writes may account for.
    "unrolled layers": dict(flags=dict(SCAN_LAYERS=False)),
    # The output layer and loss on whole [batch, seq, vocab] fp32 logits (loss_chunk_size=0)
    # instead of the split loss's 1024-position chunks, which recompute the head matmul in the
    # backward pass: what the split costs in time (it exists to save memory).
    "whole-logit loss": dict(loss_chunk_size=0),
    # RMSNorm as the jnp formula instead of the Pallas kernel (`layers.FUSED_RMS_NORM = False`):
    # XLA can then fuse each norm with the residual add before it and the casts around it, which
    # a kernel call prevents; on the H100 the kernel's backward alone was 1.25x slower than XLA's
    # fusion (docs/kernels.md). Says whether the step keeps the kernel.
    "xla RMSNorm": dict(flags=dict(FUSED_RMS_NORM=False)),
    # The SwiGLU product's backward (`layers.SWIGLU_VJP`): `swiglu`'s own, which keeps only gate
    # and up and recomputes the sigmoid (True, the default since 2026-12-04), or jax's autodiff
    # of the formula, which keeps 6 [batch, seq, ffn] arrays per layer instead of 3 (False): on
    # this step 30.98 GB of saved activations against 21.25 GB, each byte of them zeroed, written
    # and read again (benchmarks/swiglu_residuals.py). Of the pair, the suite runs the arm the
    # defaults do not (`redundant_variant`).
    "swiglu vjp": dict(flags=dict(SWIGLU_VJP=True)),
    "swiglu autodiff": dict(flags=dict(SWIGLU_VJP=False)),
    # The step's attention on the Hopper kernels (`layers.FLASH_MOSAIC`, kernels_pallas.flash_mgpu:
    # TMA + wgmma through Mosaic GPU) or on the Triton ones. Run after the `attention mosaic`
    # section and only when its check passed (`mosaic_check_passed`); of the pair, the arm the
    # defaults do not run.
    "mosaic attention": dict(flags=dict(FLASH_MOSAIC=True)),
    "triton attention": dict(flags=dict(FLASH_MOSAIC=False)),
}
MOSAIC_TRAIN_VARIANTS = ("mosaic attention", "triton attention")


# The `baichuan_jax.model.layers` switches the train A/Bs flip, recorded in every train row.
TRAIN_SWITCHES = ("ROPE_IN_KERNEL", "FUSED_RMS_NORM", "SCAN_LAYERS", "SWIGLU_VJP",
                  "FLASH_MOSAIC")


def redundant_variant(variant) -> bool:
  """True for a train variant whose only change is switches the defaults already have (the
  arm of an A/B that is the default step itself): it is not run."""
  from baichuan_jax.model import layers
  change = TRAIN_VARIANTS[variant]
  flags = change.get("flags", {})
  return (bool(flags) and set(change) == {"flags"}
          and all(getattr(layers, k) == v for k, v in flags.items()))


def switch_speedup(steps, switch, variants):
  """The step's time with `layers.<switch>` False over its time with it True (> 1: True is
  faster), from the default row and whichever of `variants` (the switch's A/B arms) ran
  against it (`steps`: {variant: row}); None without both arms."""
  base = steps.get("default")
  other = next((steps[v] for v in variants if steps.get(v)), None)
  if not base or not other:
    return None
  arms = {r.get("layers_switches", {}).get(switch): r["step_s"] for r in (base, other)}
  return arms[False] / arms[True] if set(arms) == {False, True} else None


def rope_in_kernel_speedup(steps):
  """The RoPE-first step's time over the in-kernel-RoPE step's (> 1: rotating inside the
  kernels is faster); None without both arms."""
  return switch_speedup(steps, "ROPE_IN_KERNEL", ("rope-first", "rope in kernel"))


def train_variant(cfg, variant):
  """(flags, batch, loss_chunk_size or None for the default) of `TRAIN_VARIANTS[variant]` applied
  to the shapes `cfg`; flags: the `baichuan_jax.model.layers` trace-time switches it changes,
  {name: value} (empty for the default)."""
  change = TRAIN_VARIANTS[variant]
  return (dict(change.get("flags", {})), cfg["batch"] * change.get("batch_mult", 1),
          change.get("loss_chunk_size"))


def mosaic_check_passed(result) -> bool:
  """True when the Mosaic kernels' checks ran and every one passed."""
  checks = [r for r in result.get("attention_mosaic", []) if r.get("kind") == "check"]
  return bool(checks) and all(r.get("ok") for r in checks)


def section_train(suite, cfg, variant="default"):
  """The ~1B step's MFU (`TRAIN_VARIANTS[variant]` applied); the default step also records its
  profile."""
  import gpu_train_mfu  # benchmarks/gpu_train_mfu.py
  from baichuan_jax.model import layers
  if variant in MOSAIC_TRAIN_VARIANTS and not mosaic_check_passed(suite.result):
    suite.result["skipped"].append(f"train {variant}: the Mosaic kernels' check did not run "
                                   "or did not pass")
    return
  flags, batch, chunk = train_variant(cfg, variant)
  mosaic_unfit = "not switched on"
  if flags.get("FLASH_MOSAIC", layers.FLASH_MOSAIC):
    # imported only here: every other step runs without the Mosaic GPU module
    from kernels_pallas import flash_mgpu
    head_dim = cfg["hidden"] // cfg["heads"]
    shape = (batch, cfg["seq"], cfg["heads"], head_dim)
    mosaic_unfit = flash_mgpu.check_shapes(shape, shape, jnp.bfloat16, flash_mgpu.DEFAULT_BLOCKS)
    if mosaic_unfit:  # it would run the Triton kernels unsaid
      suite.result["skipped"].append(f"train {variant}: the Hopper kernels do not take the "
                                     f"step's attention ({mosaic_unfit})")
      return
  ceil = suite.result["ceilings"]
  peaks = {}
  if ceil.get("matmul_flops"):
    peaks["measured_matmul"] = ceil["matmul_flops"]
  if suite.result["env"].get("datasheet_bf16_flops"):
    peaks["datasheet"] = suite.result["env"]["datasheet_bf16_flops"]
  trace_dir = suite.out / "_train_trace"
  profile = variant == "default"
  with layers_flags(flags):
    # the switches this arm runs with (the module's defaults where the variant sets none), so
    # an A/B row says what it compared even after benchmarks/gpu_apply.py changed a default
    switches = {name: getattr(layers, name) for name in TRAIN_SWITCHES}
    row = gpu_train_mfu.run_one(cfg["impl"], "none", batch, cfg["seq"], cfg["steps"],
                                cfg["warmup"], cfg["layers"], cfg["hidden"], cfg["heads"], peaks,
                                profile_dir=str(trace_dir) if profile else None,
                                loss_chunk_size=chunk, optimizer_probe=profile)
  # Each path's kernels run with the `tiles` section's fastest for that path (in-kernel RoPE or
  # plain); with xla attention no kernel runs.
  rope_in_kernel = switches["ROPE_IN_KERNEL"]
  row.update(variant=variant, layers_switches=switches,
             attention_kernels=("Mosaic GPU (kernels_pallas.flash_mgpu)" if cfg["impl"] == "pallas"
                                and switches["FLASH_MOSAIC"] and not mosaic_unfit else
                                "Triton (kernels_pallas.flash_attention)" if cfg["impl"] == "pallas"
                                else "XLA"),
             rope="in kernel" if rope_in_kernel else "applied first",
             tiling=(_tiling(suite.result, rope_in_kernel)
                     + (" (in-kernel RoPE)" if rope_in_kernel else "")
                     if cfg["impl"] == "pallas" else "n/a (xla attention)"),
             loss_path="whole logits" if row.get("loss_chunk_size") == 0
             else f"split ({row.get('loss_chunk_size')}-position chunks)",
             rms_norm="Pallas kernel" if cfg["impl"] == "pallas" and switches[
                 "FUSED_RMS_NORM"] else "XLA (jnp formula)")
  row["command_equivalent"] = (
      f"python3 benchmarks/gpu_train_mfu.py --runs {cfg['impl']}:none:{batch} "
      f"--seq {cfg['seq']} --layers {cfg['layers']} --hidden {cfg['hidden']} "
      f"--heads {cfg['heads']} --steps {cfg['steps']} --warmup {cfg['warmup']}"
      + ("" if chunk is None else f" --loss-chunk {chunk}")
      + "".join(f" (with baichuan_jax.model.layers.{k} = {v})" for k, v in flags.items()))
  if profile:
    _keep_train_profile(suite, row, trace_dir)
    if "optimizer_error" in row:
      suite.result["errors"].append(f"train optimizer update: {row['optimizer_error']}")
    if row.get("optimizer_min_bytes") and ceil.get("copy_bandwidth"):
      # the update's least traffic at the copy rate measured in this run: its time floor
      row["optimizer_bound_ms"] = row["optimizer_min_bytes"] / ceil["copy_bandwidth"] * 1e3
  suite.result["train"].append(row)
  print(f"train ({variant})", json.dumps(row, default=str)[:400], flush=True)


def _keep_train_profile(suite, row, trace_dir):
  """Where the step's time goes: device op time by kernel name over the 2 traced steps, into
  `row`; the raw trace copied to $OUT when small enough (`row["profile_trace_file"]`); the
  profiler's folder removed."""
  try:
    prof = trace_top_ops(trace_dir, steps=2)
    row.update(profile_top_ops_ms_per_step=prof["top"], profile_total_ms_per_step=prof["total_ms"],
               profile_buckets_ms_per_step=prof["buckets"], profile_source=prof["source"],
               profile_lines_ms_per_step=prof["lines_ms"])
    files = _trace_files(trace_dir)
    if files and files[0].stat().st_size < 15 * 2 ** 20:  # what comes back from $OUT: <= 16 MB
      (suite.out / "train_trace.json.gz").write_bytes(files[0].read_bytes())
      row["profile_trace_file"] = "train_trace.json.gz"
  except Exception as e:  # pylint: disable=broad-except
    suite.error("train profile", e)
  finally:
    import shutil
    shutil.rmtree(trace_dir, ignore_errors=True)  # keep $OUT to a few plain files


@contextlib.contextmanager
def layers_flags(flags: dict):
  """Sets each `baichuan_jax.model.layers.<name>` of `flags` ({name: value}; switches read when
  a step is traced) for the block and restores the values they had."""
  from baichuan_jax.model import layers
  saved = {name: getattr(layers, name) for name in flags}
  for name, value in flags.items():
    setattr(layers, name, value)
  try:
    yield
  finally:
    for name, value in saved.items():
      setattr(layers, name, value)


_PATHS = {"plain": "plain", "rope": "in-kernel RoPE"}


def _tiling(result, rope=False) -> str:
  """The tiling the attention kernels of one path (`rope`: RoPE inside) run with now: the
  `tiles` section's fastest for it, "default" when the defaults won or it was not timed."""
  return (result.get("tuning_used_rope" if rope else "tuning_used") or {}).get(
      "variant", "default")


def _trace_files(trace_dir):
  """The profiler's <host>.trace.json.gz files, else its perfetto_trace.json.gz."""
  files = sorted(Path(trace_dir).glob("**/*.trace.json.gz"))
  return files or sorted(Path(trace_dir).glob("**/perfetto_trace.json.gz"))


# Kernel-name buckets of the step's profile, tried in order (case-insensitive search); what
# matches none counts as "other". cuBLAS / CUTLASS kernels are named sm90_xmma_*, nvjet_*,
# cutlass_*, *gemm*; XLA names its generated kernels after their fusions (loop_*_fusion,
# input_reduce_fusion, ...); the Pallas kernels carry the names given to pallas_call.
PROFILE_BUCKETS = (
    ("matmul (cuBLAS / CUTLASS / XLA gemm)", r"gemm|xmma|nvjet|cutlass|cublas|wgmma|^dot"),
    ("flash attention (Pallas)", r"baichuan_flash"),
    ("RMSNorm (Pallas)", r"baichuan_rms_norm"),
    ("other Pallas kernels", r"baichuan_"),
    ("memcpy / memset", r"memcpy|memset"),
    ("copies / transposes", r"copy|transpose"),
    ("reductions (XLA input fusions)", r"reduce|input_"),
    ("elementwise (XLA loop fusions)", r"loop_|fusion"),
)


def trace_top_ops(trace_dir, steps, top=25):
  """Device time per step by op kind and by bucket, from a jax.profiler perfetto trace.

  On a GPU the device process ("/device:GPU:0") has kernel lines ("Stream #N ...") and derived
  lines ("XLA Modules", "XLA Ops") that cover the same time again, so only one kind of line is
  summed: the kernel lines when there are any, else "XLA Ops", else every device line but
  "XLA Modules" (on a CPU: every non-runtime host event). Op names are stripped of numeric
  suffixes (fusion.12 -> fusion). Returns a dict: `top` (the `top` largest kinds, ms per step),
  `total_ms` (of the summed line kind), `buckets` (ms per step per PROFILE_BUCKETS entry, and
  "other"; they add up to total_ms), `source` (which lines were summed) and `lines_ms` (every
  device line's total, for cross-checks: the "XLA Modules" line is the step's wall time on the
  device).
  """
  import gzip
  import re
  files = _trace_files(trace_dir)
  if not files:
    raise FileNotFoundError(f"no *.trace.json.gz under {trace_dir}")
  with gzip.open(files[0]) as f:
    trace = json.load(f)
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  procs = {e["pid"]: e.get("args", {}).get("name", "") for e in events
           if e.get("ph") == "M" and e.get("name") == "process_name"}
  threads = {(e["pid"], e.get("tid")): e.get("args", {}).get("name", "") for e in events
             if e.get("ph") == "M" and e.get("name") == "thread_name"}
  device = {pid for pid, n in procs.items() if "GPU" in n or "/device:" in n}
  spans = [e for e in events if e.get("ph") == "X" and (not device or e.get("pid") in device)]
  line = lambda e: threads.get((e.get("pid"), e.get("tid")), str(e.get("tid")))  # noqa: E731
  lines_ms = {}
  for e in spans:
    ln = line(e)
    lines_ms[ln] = lines_ms.get(ln, 0.0) + e.get("dur", 0) / 1e3 / steps
  if device:
    streams = {n for n in lines_ms if n.startswith("Stream")}
    use = (streams, "kernel lines (Stream #...)") if streams else (
        ({"XLA Ops"}, "XLA Ops line") if "XLA Ops" in lines_ms else
        (set(lines_ms) - {"XLA Modules"}, "every device line but XLA Modules"))
    spans = [e for e in spans if line(e) in use[0]]
    source = use[1]
  else:
    host_noise = re.compile(r"^\$|Thunk|Pjit|Execute|copy_to_host|^end: |PjRt|TfrtCpu")
    spans = [e for e in spans if not host_noise.search(e.get("name", ""))]
    source = "host events (no device process: a CPU run)"
  kinds = {}
  for e in spans:
    kind = re.sub(r"[._]?\d+$", "", e.get("name", ""))
    kinds[kind] = kinds.get(kind, 0.0) + e.get("dur", 0) / 1e3 / steps
  buckets = {name: 0.0 for name, _ in PROFILE_BUCKETS}
  buckets["other"] = 0.0
  for kind, ms in kinds.items():
    name = next((n for n, pat in PROFILE_BUCKETS if re.search(pat, kind, re.IGNORECASE)),
                "other")
    buckets[name] += ms
  return dict(top=dict(sorted(kinds.items(), key=lambda kv: -kv[1])[:top]),
              total_ms=float(sum(kinds.values())), buckets=buckets, source=source,
              lines_ms=lines_ms)


# --- decode ------------------------------------------------------------------------------------


def model_decode_step(cfg):
  """`infer.generate`'s own greedy decode step (the host loop's jitted step) that also returns
  the logits: `BaichuanLM(unroll_layers=True)` on the KV cache, then `sampling.next_token`.

  With cfg.attention_impl == "pallas" the model takes the wired-in kernels: the fused RMSNorm,
  `kernels_pallas.decode_attention` over each row's filled slots (the span read from the cache's
  segment ids and index) and the `topk_argmax` pick with the repetition penalty inside; with
  "xla", attention over every cache slot and `jnp.argmax`. Returns (state, logits).
  """
  import importlib
  # The module (the package re-exports its `generate` function under the same name).
  gen_lib = importlib.import_module("baichuan_jax.infer.generate")

  def step(params, state, rows):
    seg = jnp.ones_like(state.last)[:, None]
    logits, cache = gen_lib._forward_last(  # pylint: disable=protected-access
        cfg, params, state.last[:, None], state.pos[:, None], seg, state.cache, unroll=True)
    state = state.replace(cache=cache)
    tok = gen_lib._pick(cfg, logits, state.present, state.step, rows, False)  # pylint: disable=protected-access
    return gen_lib._advance(cfg, state, tok, rows), logits  # pylint: disable=protected-access

  return step, gen_lib


def decode_configs(dcfg) -> dict:
  """{"xla": cfg, "pallas": cfg}: the decode model (bf16 weights) with each attention_impl."""
  from baichuan_jax import configs
  return {impl: configs.get(dcfg["preset"], dtype="bfloat16", param_dtype="bfloat16",
                            attention_impl=impl, **dcfg["overrides"])
          for impl in ("xla", "pallas")}


def decode_step_check(dcfg, params, out, state_rows, batch) -> dict:
  """The pallas and xla bf16 decode steps' logits (`out`: {impl: (greedy tokens, logits)}) each
  against an fp32 reference: the xla step in fp32 with fp32 matmuls, on the same (bf16) weights
  and cache. Through the 7B's 32 layers bf16 rounding alone puts either path a few percent from
  the other (the H200's first run: 5.6e-2 rel. L2 between them, same greedy token), so what
  tells a wrong kernel from rounding is whether the pallas path is as close to the fp32 result
  as the xla path is: ok when its error is at most 1.5x the xla step's (+ 1e-3)."""
  from baichuan_jax import configs
  cfg32 = configs.get(dcfg["preset"], dtype="float32", param_dtype="float32",
                      attention_impl="xla", **dcfg["overrides"])
  fn, _ = model_decode_step(cfg32)
  p32 = jax.tree.map(lambda a: a.astype(jnp.float32), params)
  with jax.default_matmul_precision("highest"):
    _, ref = jax.jit(fn)(p32, *state_rows)
  ref = np.asarray(ref)
  del p32
  errs = {impl: _rel_l2(logits, ref) for impl, (_, logits) in out.items()}
  limit = 1.5 * errs["xla"] + 1e-3
  return dict(
      kernel="decode step attention_impl=pallas vs the model's cached step in fp32 (logits), next to xla's",
      batch=batch, rel_l2={"logits": errs["pallas"], "xla_logits": errs["xla"],
                           "pallas_vs_xla": _rel_l2(out["pallas"][1], out["xla"][1])},
      limit=limit, ok=bool(errs["pallas"] <= limit),
      same_greedy_token=bool(np.array_equal(out["pallas"][0], out["xla"][0])))


def decode_state(cfg, gen_lib, batch: int, seed: int, *, ctx: int, max_len: int):
  """A generate decode state with `ctx` filled slots per row (random bf16 K/V), next slot ctx,
  and greedy row parameters (penalty 1, still applied as generate does; no stop token)."""
  from baichuan_jax.model import init_cache
  d = cfg.hidden_size // cfg.num_heads
  shape = (batch, cfg.num_kv_heads, max_len, d)
  fill = jax.jit(lambda key: jax.random.normal(key, shape, jnp.bfloat16))
  keys = jax.random.split(jax.random.PRNGKey(seed), 2 * cfg.num_layers)
  slot = jnp.arange(max_len, dtype=jnp.int32)
  cache = init_cache(cfg, batch, max_len, dtype="bfloat16").replace(
      k=tuple(fill(keys[i]) for i in range(cfg.num_layers)),
      v=tuple(fill(keys[cfg.num_layers + i]) for i in range(cfg.num_layers)),
      positions=jnp.broadcast_to(jnp.where(slot < ctx, slot, 0), (batch, max_len)),
      segment_ids=jnp.broadcast_to((slot < ctx).astype(jnp.int32), (batch, max_len)),
      index=jnp.asarray(ctx, jnp.int32))
  tok = jnp.asarray(np.random.default_rng(seed).integers(3, cfg.vocab_size, size=(batch,)),
                    jnp.int32)
  state = gen_lib.DecodeState(
      cache=cache, out=jnp.zeros((batch, 16), jnp.int32), last=tok,
      pos=jnp.full((batch,), ctx, jnp.int32), lengths=jnp.ones((batch,), jnp.int32),
      present=jnp.zeros((batch, cfg.vocab_size), bool).at[jnp.arange(batch), tok].set(True),
      done=jnp.zeros((batch,), bool), finish=jnp.zeros((batch,), jnp.int32),
      step=jnp.ones((), jnp.int32))
  z = lambda dt: jnp.zeros((batch,), dt)
  rows_p = gen_lib.RowParams(
      temperature=z(jnp.float32), top_k=z(jnp.int32), top_p=jnp.ones((batch,), jnp.float32),
      repetition_penalty=jnp.ones((batch,), jnp.float32),
      max_new=jnp.full((batch,), 1 << 30, jnp.int32),
      stop_ids=jnp.full((batch, 1), -1, jnp.int32), seeds=z(jnp.uint32))
  return state, rows_p


def section_decode(suite, backend, dcfg, span_check_ab=False):
  """The 7B decode step, xla and pallas, at each batch (`span_check_ab`: instead, the pallas
  step at the first batch without the per-layer span check, a late section of its own)."""
  from baichuan_jax import configs
  import gpu_decode  # benchmarks/gpu_decode.py
  del backend  # the model resolves attention_impl="pallas" to the platform's kernels itself
  cfgs = decode_configs(dcfg)
  cfg = cfgs["xla"]
  params = gpu_decode.random_params(cfg)
  ctx, L = dcfg["context"], dcfg["max_len"]
  counts = configs.param_counts(cfg)
  d = cfg.hidden_size // cfg.num_heads
  weight_bytes = 2 * (counts["total"] - counts["embedding"])
  bw = suite.result["ceilings"].get("copy_bandwidth")
  steps, gen_lib = {}, None
  for impl, c in cfgs.items():
    fn, gen_lib = model_decode_step(c)
    steps[impl] = jax.jit(fn, donate_argnums=(1,))
  fresh_state = functools.partial(decode_state, cfg, gen_lib, ctx=ctx, max_len=L)
  rows = suite.result["decode"]
  names = {"xla": "model (attention_impl=xla: XLA attention over all slots, jnp.argmax)",
           "pallas": "kernels (the model's step with attention_impl=pallas: decode_attention "
                     "over filled slots, topk_argmax)"}

  def row_for(path, batch, sec, slots_read):
    kv_bytes = 2 * cfg.num_layers * batch * cfg.num_kv_heads * slots_read * d * 2
    filled = 2 * cfg.num_layers * batch * cfg.num_kv_heads * (ctx + 1) * d * 2
    row = dict(path=path, batch=batch, context=ctx, cache_len=L, step_ms=sec * 1e3,
               tokens_per_s=batch / sec, weight_bytes=weight_bytes, kv_bytes_read=kv_bytes,
               kv_bytes_filled=filled, params=counts["total"])
    if bw:
      limit = batch * bw / (weight_bytes + filled)
      row.update(limit_tokens_per_s=limit, fraction_of_limit=row["tokens_per_s"] / limit,
                 limit_weights_only=batch * bw / weight_bytes)
    return row

  def timed(fn, state, rows_p, n):
    """Per-step seconds over `n` asynchronously dispatched steps (the state threaded through)."""
    state, _ = fn(params, state, rows_p)  # compile + one warm-up
    jax.block_until_ready(state)
    t0 = time.perf_counter()
    for _ in range(n):
      state, _ = fn(params, state, rows_p)
    jax.block_until_ready(state)
    return (time.perf_counter() - t0) / n

  if span_check_ab:
    # The pallas step without the per-layer span check (`layers.DECODE_SPAN_CHECK`, a lax.cond
    # per layer): what the conditional costs on the device.
    batch = min(dcfg["batches"])
    if not suite.fits(f"decode pallas no-check batch {batch}", COST["decode_step"]):
      return
    try:
      with layers_flags({"DECODE_SPAN_CHECK": False}):  # read when the step is traced (1st call)
        fn, _ = model_decode_step(cfgs["pallas"])
        state, rows_p = fresh_state(batch, 2)
        sec = timed(jax.jit(fn, donate_argnums=(1,)), state, rows_p, dcfg["steps"])
      rows.append(row_for("kernels without the span check (no lax.cond; generate's cache is "
                          "one span per row)", batch, sec, ctx + 1))
      rows[-1].update(attention_impl="pallas", label="pallas_no_span_check")
    except Exception as e:  # pylint: disable=broad-except
      suite.error(f"decode pallas no-check batch {batch}", e)
    suite.write()
    return
  checked = False
  for batch in sorted(set(dcfg["batches"]) | set(dcfg["model_batches"])):
    if not checked:  # the two paths on the same cache contents (the timed executables)
      if not suite.fits("decode check", COST["decode_step"] * 2):
        return
      out = {}
      for impl in ("xla", "pallas"):
        state, rows_p = fresh_state(batch, 1)  # a copy each: the step donates its state
        new, logits = steps[impl](params, state, rows_p)
        out[impl] = (np.asarray(new.out[:, 1]), logits)
      suite.result["check"].append(decode_step_check(
          dcfg, params, out, fresh_state(batch, 1), batch))
      del out, state, new, logits
      checked = True
      suite.write()
    first = batch == min(set(dcfg["batches"]) | set(dcfg["model_batches"]))
    # the check compiled the first batch's steps
    cost = COST["decode first step"] if first else COST["decode_step"]
    for impl, wanted, slots_read in (("xla", dcfg["model_batches"], L),
                                     ("pallas", dcfg["batches"], ctx + 1)):
      if batch not in wanted:
        continue
      if not suite.fits(f"decode {impl} batch {batch}", cost):
        return
      try:
        state, rows_p = fresh_state(batch, 2)
        sec = timed(steps[impl], state, rows_p, dcfg["steps"])
        rows.append(row_for(names[impl], batch, sec, slots_read))
        rows[-1].update(attention_impl=impl, label=impl)
      except Exception as e:  # pylint: disable=broad-except
        suite.error(f"decode {impl} batch {batch}", e)
      state = None
      suite.write()
    print("decode", json.dumps(rows[-3:], default=str)[:700], flush=True)


# decode_attention settings timed at batch 1 besides the defaults ("splits_scale": twice the
# default number of key splits).
DECODE_KERNEL_VARIANTS = [("default", {}), ("block_k 64", {"block_k": 64}),
                          ("splits x2", {"splits_scale": 2}), ("splits 1", {"num_splits": 1}),
                          ("8 warps, 3 stages", {"num_warps": 8, "num_stages": 3})]


def decode_kernel_settings(variant: dict, batch: int, kv_heads: int) -> dict:
  """A DECODE_KERNEL_VARIANTS entry as decode_attention keyword arguments."""
  kw = dict(variant)
  if kw.pop("splits_scale", None):
    target = kernels_pallas.decode.GPU_DEFAULTS["target_programs"]
    kw["num_splits"] = 2 * -(-target // (batch * kv_heads))
  return kw


# The variant also timed at every other batch: the fastest at batch 1 on the H200's first run
# (1.40x the defaults there), so the next run says whether it wins at batch 8 and 32 too.
DECODE_KERNEL_EVERY_BATCH = "block_k 64"


def decode_kernel_plan(cfg) -> list:
  """(batch, "full" | "ragged", (variant name, settings)) in the order section_decode_kernel
  times them: the defaults at every batch, the variants at the first, DECODE_KERNEL_EVERY_BATCH
  at the others, ragged at the last."""
  variants = DECODE_KERNEL_VARIANTS
  plan = [(b, "full", variants[0]) for b in cfg["batches"]]
  chosen = variants[1:cfg.get("variants", 5)]
  plan += [(cfg["batches"][0], "full", v) for v in chosen]
  plan += [(b, "full", v) for b in cfg["batches"][1:] for v in chosen
           if v[0] == DECODE_KERNEL_EVERY_BATCH]
  return plan + [(cfg["batches"][-1], "ragged", variants[0])]


def section_decode_kernel(suite, backend, cfg):
  """decode_attention alone (one layer's cache) vs the jnp reference: GB/s of filled K/V slots.

  Batch 1/8/32 at 2,048 filled slots of a 2,176-slot cache (default settings, plus a few block /
  split / warp variants at batch 1), and batch 32 with ragged lengths (uniform in [1, 2048]),
  whose time should follow the filled bytes, not the allocated ones.
  """
  from baichuan_jax.model.positions import alibi_slopes
  h, kvh, d, L, ctx = cfg["heads"], cfg["kv_heads"], cfg["head_dim"], cfg["max_len"], cfg["context"]
  rows = suite.result["decode_kernel"]
  rng = np.random.default_rng(0)
  for b, fill, (vname, kw) in decode_kernel_plan(cfg):
    if not suite.fits(f"decode_kernel b{b} {fill} {vname}", COST["decode_kernel item"]):
      return
    keys = jax.random.split(jax.random.PRNGKey(b), 3)
    q = jax.random.normal(keys[0], (b, h, d), jnp.bfloat16)
    kc = jax.random.normal(keys[1], (b, kvh, L, d), jnp.bfloat16)
    vc = jax.random.normal(keys[2], (b, kvh, L, d), jnp.bfloat16)
    lengths = (np.full(b, ctx + 1) if fill == "full"
               else rng.integers(1, ctx + 1, size=b)).astype(np.int32)
    lengths = jnp.asarray(lengths)
    kw = decode_kernel_settings(kw, b, kvh)
    slopes = jnp.asarray(alibi_slopes(h))
    filled = 2 * int(np.sum(np.asarray(lengths))) * kvh * d * 2
    row = dict(batch=b, fill=fill, variant=vname, heads=h, kv_heads=kvh, head_dim=d, cache_len=L,
               filled_bytes=filled, settings=kw)
    for impl, fn in (("kernel", lambda q, k, v, l: decode_attention(
        q, k, v, l, alibi_slopes=slopes, backend=backend, **kw)),
                     ("xla", lambda q, k, v, l: decode_attention(q, k, v, l, alibi_slopes=slopes,
                                                                 backend="xla"))):
      if impl == "xla" and vname != "default":
        continue
      try:
        sec = median_seconds(jax.jit(fn), q, kc, vc, lengths, iters=cfg["iters"])
        row[f"{impl}_us"] = sec * 1e6
        row[f"{impl}_filled_gb_s"] = filled / sec / 1e9
      except Exception as e:  # pylint: disable=broad-except
        row[f"{impl}_error"] = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
    bw = suite.result["ceilings"].get("copy_bandwidth")
    if bw and "kernel_us" in row:
      row["kernel_fraction_of_copy_bw"] = row["kernel_filled_gb_s"] * 1e9 / bw
    rows.append(row)
    print("decode_kernel", json.dumps(row, default=str)[:300], flush=True)
    del q, kc, vc
  suite.write()


# Backward tilings timed against the defaults (flash_attention's `tuning` argument). Compiled for
# sm_90a with benchmarks/triton_sm90.py (docs/kernels.md, "Backward tiles for Hopper"): each fits
# the shared memory and spills no register in either backward kernel (without RoPE; with the
# in-kernel RoPE of the training step the 4-warp dK/dV default spills, its 8-warp variants do
# not). Index 1 is the --small run's.
TILE_VARIANTS = [
    ("default", None),
    ("dq 128x32 8w2s / dkdv 32x128 8w1s", {
        "blocks": {"dq": (128, 32), "dkdv": (32, 128)},
        "launch": {"dq": {"num_warps": 8, "num_stages": 2},
                   "dkdv": {"num_warps": 8, "num_stages": 1}}}),
    ("dq 64x64 4w2s / dkdv 64x64 8w2s", {
        "launch": {"dq": {"num_warps": 4, "num_stages": 2},
                   "dkdv": {"num_warps": 8, "num_stages": 2}}}),
    ("dq 128x64 8w2s / dkdv 64x64 8w2s", {
        "blocks": {"dq": (128, 64), "dkdv": (64, 64)},
        "launch": {"bwd": {"num_warps": 8, "num_stages": 2}}}),
    ("dq 128x64 8w2s / dkdv 64x128 8w2s", {
        "blocks": {"dq": (128, 64), "dkdv": (64, 128)},
        "launch": {"bwd": {"num_warps": 8, "num_stages": 2}}}),
    ("dq 128x128 8w1s / dkdv 64x128 8w2s", {
        "blocks": {"dq": (128, 128), "dkdv": (64, 128)},
        "launch": {"dq": {"num_warps": 8, "num_stages": 1},
                   "dkdv": {"num_warps": 8, "num_stages": 2}}}),
    # The fused backward (one kernel: dK/dV plus dQ by fp32 atomic adds, FlashAttention-2/3's
    # form; 5 matmuls per tile instead of 7), at tilings that compile for sm_90a without a spill
    # under the triton wheel (benchmarks/triton_sm90.py --sweep, "fused" rows; its 4-warp
    # tilings spill). Under XLA's own Triton, which the device runs (benchmarks/gpu_aot.py,
    # jax 0.11.2), none is clean: the 64 x 64 ones keep their wgmmas in flight but spill (64 /
    # 84 bytes stored at 2 / 3 stages); 64 x 128 spills 184 and ptxas serializes its wgmmas
    # (C7515); 32 x 128 spills nothing, but its dQ share, 32 rows, is mma.sync, not wgmma, and
    # its wgmmas are serialized too. The device is to say which costs least.
    *[(f"fused bwd {bq}x{bk} {w}w{st}s", {
        "fused_backward": True, "blocks": {"dkdv": (bq, bk)},
        "launch": {"dkdv": {"num_warps": w, "num_stages": st}}})
      for bq, bk, w, st in ((64, 64, 8, 2), (64, 64, 8, 3), (64, 128, 8, 2), (32, 128, 8, 2))],
]


# The same for the kernels with RoPE inside (the model's training path, `layers.ROPE_IN_KERNEL`),
# whose defaults are 8 warps (`ROPE_LAUNCH`). Every one compiles for sm_90a within the shared
# memory and spills nothing (docs/results/triton_sm90.md, "rope" rows; tests/test_triton_sm90.py
# with positions and segment ids, as the training step runs them); every wider dK/dV block
# spills with RoPE there, so dK/dV stays 64 x 64.
TILE_VARIANTS_ROPE = [
    ("default", None),
    ("dq 128x64 8w1s / dkdv 64x64 8w2s", {"blocks": {"dq": (128, 64)},
                                          "launch": {"dq": {"num_stages": 1}}}),
    ("dq 128x32 8w2s / dkdv 64x64 8w3s", {"blocks": {"dq": (128, 32)},
                                          "launch": {"dkdv": {"num_stages": 3}}}),
    ("dq 64x64 8w3s / dkdv 64x64 8w1s", {"launch": {"dq": {"num_stages": 3},
                                                    "dkdv": {"num_stages": 1}}}),
]


def tile_variants(rope: bool) -> list:
  return TILE_VARIANTS_ROPE if rope else TILE_VARIANTS


def section_tiles(suite, backend, cfg, rope=False):
  """Times the backward tilings (`rope`: with RoPE inside the kernels) and makes the fastest
  the tiling of that kernel path for the rest of the run (MEASURED_TUNING, in this process)."""
  import attention as attn_bench
  attn_bench.BACKEND = backend
  s, b = cfg["seq"], max(1, cfg["tokens"] // cfg["seq"])
  variants = tile_variants(rope)
  path = "rope" if rope else "plain"
  rows = []
  for name, tuning in [variants[i] for i in cfg.get("variants", range(len(variants)))]:
    if not suite.fits(f"tiles {path} {name}", COST["tiles item"]):
      break
    row = attn_bench.bench_one("ours", "fwdbwd", b=b, s=s, h=cfg["heads"], d=cfg["head_dim"],
                               dtype=jnp.bfloat16, causal=True, alibi=False, iters=cfg["iters"],
                               tuning=tuning, rope=rope)
    row.update(variant=name, path=path)
    rows.append(row)
    suite.result["tiles"].append(row)
    print("tiles", path, name, row.get("tflops", row.get("error")), flush=True)
    suite.write()
  timed = [r for r in rows if "ms" in r]
  default = next((r for r in timed if r["variant"] == "default"), None)
  if timed:
    best = min(timed, key=lambda r: r["ms"])
    suite.result["tuning_used_rope" if rope else "tuning_used"] = dict(
        variant=best["variant"], tuning=best.get("tuning"), ms=best["ms"],
        speedup_over_default=(default["ms"] / best["ms"]) if default else None)
    if best["variant"] != "default":  # the later sections run with it (min_seq 0: every length)
      table = kernels_pallas.attention.MEASURED_TUNING.setdefault(path, {})
      table[cfg["head_dim"]] = dict(tuning=best["tuning"], min_seq=0, variant=best["variant"])


# ----------------------------------------------------------------------------------------------
# preflight: every device program of the full run, lowered for CUDA on this (CPU) machine


def preflight_programs(shapes) -> list:
  """[(section, name, jitted fn, abstract args[, layers flags])]: the programs the full run
  compiles, at its shapes, built by the same functions the sections use (the kernels' backend
  "gpu", the model's attention_impl resolved under `kernels_pallas.lowering_platform("cuda")`).
  A train variant's `baichuan_jax.model.layers` switches, read when the program is traced, come
  fifth."""
  import attention as attn_bench  # benchmarks/attention.py
  import gpu_train_mfu
  from baichuan_jax import train
  from baichuan_jax.model import init_params
  from baichuan_jax.model.positions import alibi_slopes
  S, bf, f32, i32 = jax.ShapeDtypeStruct, jnp.bfloat16, jnp.float32, jnp.int32
  progs = []
  c = shapes["check"]
  b, s, h, hkv, d = c["b"], c["s"], c["h"], c["hkv"], c["d"]
  slopes, pos = jnp.asarray(alibi_slopes(h)), jnp.broadcast_to(jnp.arange(s, dtype=i32), (b, s))
  for name, kw in (("flash alibi", dict(alibi_slopes=slopes)),
                   ("flash in-kernel rope", dict(positions=pos, rope_theta=1e4)),
                   (FUSED_CHECK, fused_check_kwargs(b, s, slopes))):
    fn = functools.partial(flash_attention, backend="gpu", **kw)

    def fwd_bwd(q, k, v, ct, fn=fn):
      o, vjp = jax.vjp(fn, q, k, v)
      return (o,) + vjp(ct)
    progs.append(("check", name, jax.jit(fwd_bwd), (S((b, s, h, d), bf), S((b, s, hkv, d), bf),
                                                    S((b, s, hkv, d), bf), S((b, s, h, d), bf))))
  db, dh, dkvh, L = c["dec_b"], c["dec_h"], c["dec_kvh"], c["dec_len"]
  dslopes = jnp.asarray(alibi_slopes(dh))
  progs.append(("check", "decode attention (starts, ALiBi, GQA)", jax.jit(
      lambda q, k, v, n, st: decode_attention(q, k, v, n, starts=st, alibi_slopes=dslopes,
                                              backend="gpu")),
                (S((db, dh, d), bf), S((db, dkvh, L, d), bf), S((db, dkvh, L, d), bf),
                 S((db,), i32), S((db,), i32))))
  logits, present, pen = S((4, c["vocab"]), f32), S((4, c["vocab"]), bool), S((4,), f32)
  for kk in (1, 8):
    progs.append(("check", f"top_k k={kk}", jax.jit(
        functools.partial(top_k, k=kk, backend="gpu")), (logits,)))
  progs.append(("check", "topk_argmax", jax.jit(functools.partial(topk_argmax, backend="gpu")),
                (logits,)))
  progs.append(("check", "top_k k=16 + penalty", jax.jit(
      lambda x, p, r: top_k(x, 16, present=p, penalty=r, backend="gpu")), (logits, present, pen)))
  progs.append(("check", "topk_argmax + penalty", jax.jit(
      lambda x, p, r: topk_argmax(x, present=p, penalty=r, backend="gpu")),
                (logits, present, pen)))

  attn_bench.BACKEND = "gpu"

  def attention_prog(section, name, cfg, s, alibi, tuning=None, rope=False):
    b = max(1, cfg["tokens"] // s)
    f = attn_bench.make_fn("ours", causal=True, alibi=alibi, s=s, h=cfg["heads"],
                           d=cfg["head_dim"], dtype=bf, tuning=tuning, rope=rope)
    x = S((b, s, cfg["heads"], cfg["head_dim"]), bf)
    grad = attn_bench._grad_fn(f)  # pylint: disable=protected-access
    return (section, name, jax.jit(grad), (x, x, x, S(x.shape, f32)))

  a = shapes["attn"]
  for s in a["seqs"]:
    for alibi in (False, True):
      progs.append(attention_prog("attention", f"ours fwd+bwd seq {s}{' alibi' if alibi else ''}",
                                  a, s, alibi))
  t = shapes["train"]
  cfg = gpu_train_mfu.model_config(t["impl"], "none", t["seq"], t["layers"], t["hidden"],
                                   t["heads"])
  # The default step and every variant, each lowered with its own trace-time switches set (a
  # variant's kernel count shows the switch took effect in the program the run compiles).
  for name in (n for n in TRAIN_VARIANTS if not redundant_variant(n)):  # what the run runs
    flags, batch, chunk = train_variant(t, name)
    tcfg, mesh = gpu_train_mfu.train_setup(batch, t["seq"], chunk)
    step = train.make_train_step(cfg, tcfg, mesh)
    suffix = "" if name == "default" else f" {name}"
    progs.append(("train", f"~1B step ({t['impl']}, {batch}x{t['seq']}){suffix}", step,
                  (train.abstract_train_state(cfg, tcfg, mesh),
                   train.abstract_batch(tcfg, mesh)), flags))
  # the optimizer update alone on the default step's state (XLA only: no kernel)
  tcfg, mesh = gpu_train_mfu.train_setup(t["batch"], t["seq"])
  abstract = train.abstract_train_state(cfg, tcfg, mesh)
  for name, fn in zip(("guarded", "plain"), gpu_train_mfu.optimizer_programs(tcfg)):
    progs.append(("train", f"optimizer update ({name})", fn, (abstract, abstract.params)))
  from baichuan_jax.train import step as step_lib  # the guard's other form, timed beside it
  other, _ = gpu_train_mfu.optimizer_programs(tcfg, recompute=not step_lib.GUARD_RECOMPUTE)
  progs.append(("train", "optimizer update (guarded, other form)", other,
                (abstract, abstract.params)))
  dcfg = shapes["decode"]
  cfgs = decode_configs(dcfg)
  params = jax.eval_shape(lambda: init_params(cfgs["xla"], jax.random.PRNGKey(0)))
  for impl, batches in (("xla", dcfg["model_batches"]), ("pallas", dcfg["batches"])):
    fn, gen_lib = model_decode_step(cfgs[impl])
    for batch in batches:
      state = jax.eval_shape(functools.partial(decode_state, cfgs[impl], gen_lib, batch, 0,
                                               ctx=dcfg["context"], max_len=dcfg["max_len"]))
      progs.append(("decode", f"model step {impl} batch {batch}",
                    jax.jit(fn, donate_argnums=(1,)), (params,) + tuple(state)))
  k = shapes["decode_kernel"]
  kslopes = jnp.asarray(alibi_slopes(k["heads"]))
  for batch, fill, (vname, kw) in decode_kernel_plan(k):
    kw = decode_kernel_settings(kw, batch, k["kv_heads"])
    cache = S((batch, k["kv_heads"], k["max_len"], k["head_dim"]), bf)
    progs.append(("decode_kernel", f"batch {batch} {fill} {vname}", jax.jit(
        lambda q, kc, vc, n, kw=kw: decode_attention(q, kc, vc, n, alibi_slopes=kslopes,
                                                     backend="gpu", **kw)),
                  (S((batch, k["heads"], k["head_dim"]), bf), cache, cache, S((batch,), i32))))
  tl = shapes["tiles"]
  for rope in (False, True):
    for name, tuning in tile_variants(rope):
      progs.append(attention_prog("tiles", f"{_PATHS['rope' if rope else 'plain']} {name}", tl,
                                  tl["seq"], False, tuning, rope))
  m = shapes["mosaic"]
  for mode, s, impl, name, blocks in mosaic_plan(m):
    if impl not in ("mosaic", "ours"):  # cuDNN's and jax's Mosaic forward ask the device
      continue
    f = attn_bench.make_fn(impl, causal=True, alibi=False, s=s, h=m["heads"],
                           d=m["head_dim"], dtype=bf, tuning=blocks)
    x = S((max(1, m["tokens"] // s), s, m["heads"], m["head_dim"]), bf)
    if mode == "fwd":
      progs.append(("attention mosaic", f"{impl} fwd seq {s}", jax.jit(f), (x, x, x)))
      continue
    progs.append(("attention mosaic", f"{impl} fwd+bwd seq {s} {name}",
                  jax.jit(attn_bench._grad_fn(f)),  # pylint: disable=protected-access
                  (x, x, x, S(x.shape, f32))))
  return progs


TRITON_CALL, MOSAIC_CALL = "__gpu$xla.gpu.triton", "mosaic_gpu_v2"  # the kernels' custom calls


def export_program(fn, args, flags: dict):
  """`jax.export` of one preflight program for CUDA, with its train-variant `flags` set while it
  is traced (a `train.MeshJit` step lowered under its own mesh and axis rules). Call it inside
  `kernels_pallas.lowering_platform("cuda")`."""
  from jax import export
  import flax.linen as nn
  checks = [export.DisabledSafetyCheck.custom_call(TRITON_CALL),
            export.DisabledSafetyCheck.custom_call(MOSAIC_CALL)]
  with layers_flags(flags), contextlib.ExitStack() as ctx:
    if hasattr(fn, "jitted"):  # train.MeshJit: lowered with its mesh and axis rules
      ctx.enter_context(jax.set_mesh(fn.mesh))
      ctx.enter_context(nn.logical_axis_rules(fn.rules))
      fn = fn.jitted
    return export.export(fn, platforms=["cuda"], disabled_checks=checks)(*args)


def preflight(out: Path, shapes=None) -> dict:
  """Lowers every device program of the full run for CUDA (jax.export, platforms=["cuda"]) on a
  machine without a GPU: the Pallas -> Triton lowering of every kernel at the device shapes, the
  ~1B training step and the 7B decode steps. What it cannot see: Triton's and Mosaic GPU's own
  compilation (shared memory, registers, spills), which happens when XLA compiles, and cuDNN
  attention, whose lowering asks the installed cuDNN. `benchmarks/gpu_aot.py` goes on from here
  with XLA's deviceless compiler for the H200. Writes gpu_suite_preflight.json / .md; ok only if
  all lower.
  """
  rows = []
  with kernels_pallas.lowering_platform("cuda"):
    progs = preflight_programs(shapes or FULL)
    for section, name, fn, args, *flags in progs:
      t0 = time.perf_counter()
      row = dict(section=section, program=name)
      try:
        exp = export_program(fn, args, flags[0] if flags else {})
        text = exp.mlir_module()
        row.update(ok=True, triton_kernels=text.count(f"stablehlo.custom_call @{TRITON_CALL}("),
                   mosaic_kernels=text.count(f"stablehlo.custom_call @{MOSAIC_CALL}("))
      except Exception as e:  # pylint: disable=broad-except
        row.update(ok=False, error=f"{type(e).__name__}: {str(e)[:2000]}")
      row["seconds"] = time.perf_counter() - t0
      rows.append(row)
      print(f"preflight {'ok  ' if row['ok'] else 'FAIL'} {section}: {name} "
            f"({row.get('triton_kernels', '-')} Triton kernels"
            + (f", {row['mosaic_kernels']} Mosaic GPU kernels" if row.get("mosaic_kernels") else "")
            + f", {row['seconds']:.1f} s)"
            + ("" if row["ok"] else "\n  " + row["error"][:600]), flush=True)
  result = dict(ok=all(r["ok"] for r in rows), programs=rows, jax=jax.__version__,
                not_checked=["cuDNN attention (its lowering asks the installed cuDNN)",
                             "Mosaic GPU's compilation of its MLIR to PTX (in XLA's custom call; "
                             "benchmarks/gpu_aot.py reaches it)",
                             "Triton compilation (shared memory, registers; "
                             "benchmarks/gpu_aot.py reaches it)"])
  out.mkdir(parents=True, exist_ok=True)
  (out / "gpu_suite_preflight.json").write_text(json.dumps(result, indent=1))
  md = ["# gpu_suite preflight (lowered for CUDA on a CPU machine)", "",
        f"jax {jax.__version__}; {sum(r['ok'] for r in rows)} of {len(rows)} programs lower.", "",
        "| section | program | Triton kernels | Mosaic GPU kernels | ok |", "|---|---|---|---|---|"]
  md += [f"| {r['section']} | {r['program']} | {r.get('triton_kernels', '-')} | "
         f"{r.get('mosaic_kernels', '-')} | "
         f"{'yes' if r['ok'] else 'NO: ' + r['error'][:120]} |" for r in rows]
  (out / "gpu_suite_preflight.md").write_text("\n".join(md) + "\n")
  return result


# ----------------------------------------------------------------------------------------------
# summary and markdown


def summarise(result):
  s = {}
  env, ceil = result["env"], result["ceilings"]
  steps = {r.get("variant"): r for r in result["train"] if "model_tflops" in r}
  base = steps.get("default")
  if base:
    s["train_mfu_datasheet"] = base.get("mfu_datasheet")
    s["train_mfu_measured_matmul"] = base.get("mfu_measured_matmul")
    rope_speedup = rope_in_kernel_speedup(steps)
    if rope_speedup is not None:  # > 1: the in-kernel rotation is faster
      s["train_rope_in_kernel_speedup"] = rope_speedup
    swiglu_speedup = switch_speedup(steps, "SWIGLU_VJP", ("swiglu vjp", "swiglu autodiff"))
    if swiglu_speedup is not None:  # > 1: swiglu's own backward (fewer saved arrays) is faster
      s["train_swiglu_vjp_speedup"] = swiglu_speedup
    mosaic_speedup = switch_speedup(steps, "FLASH_MOSAIC", MOSAIC_TRAIN_VARIANTS)
    if mosaic_speedup is not None:  # > 1: the step is faster on the Hopper (Mosaic) kernels
      s["train_flash_mosaic_speedup"] = mosaic_speedup
    if steps.get("xla RMSNorm"):  # > 1: the Pallas RMSNorm kernel makes the step faster
      s["train_fused_rms_norm_speedup"] = steps["xla RMSNorm"]["step_s"] / base["step_s"]
    # tokens/s of each variant over the default's (> 1: the variant is faster)
    if "optimizer_guarded_ms" in base:  # the AdamW update alone, on the default step's state
      s["train_optimizer"] = dict(
          guarded_ms=base["optimizer_guarded_ms"], plain_ms=base["optimizer_plain_ms"],
          guard_ms=base["optimizer_guard_ms"], bound_ms=base.get("optimizer_bound_ms"),
          share_of_step=base["optimizer_share_of_step"],
          guarded_over_bound=(base["optimizer_guarded_ms"] / base["optimizer_bound_ms"]
                              if base.get("optimizer_bound_ms") else None),
          # the guard's two forms (train.step.GUARD_RECOMPUTE): the step's and the other one
          guard_recompute=base.get("optimizer_guard_recompute"),
          other_form_ms=base.get("optimizer_guarded_other_ms"),
          forms_equal=base.get("optimizer_guard_forms_equal"))
    s["train_variants"] = {
        name: dict(tokens_per_s_over_default=r["tokens_per_s"] / base["tokens_per_s"],
                   mfu_datasheet=r.get("mfu_datasheet"), peak_gib=r.get("peak_gib"),
                   peak_gib_at_most=r.get("peak_gib_at_most"))
        for name, r in steps.items() if name != "default"}
  if steps:
    best = max(steps, key=lambda n: steps[n]["tokens_per_s"])
    s["train_best"] = dict(variant=best, mfu_datasheet=steps[best].get("mfu_datasheet"),
                           mfu_measured_matmul=steps[best].get("mfu_measured_matmul"))
  by = {(r["mode"], r["seq"], r["impl"], r["alibi"]): r for r in result["attention"]}
  ratios, alibi = {}, {}
  for (mode, seq, impl, al), r in by.items():
    if impl != "ours" or al or "ms" not in r:
      continue
    c = by.get((mode, seq, "cudnn", False))
    if c and "ms" in c:
      ratios[f"{mode} {seq}"] = c["ms"] / r["ms"]
    a = by.get((mode, seq, "ours", True))
    if a and "ms" in a:
      alibi[f"{mode} {seq}"] = a["ms"] / r["ms"] - 1
  s["attention_ours_over_cudnn_speed"] = ratios
  s["alibi_overhead"] = alibi
  s["decode_fraction_of_limit"] = {f"{r.get('label', r['path'].split(' ')[0])} b{r['batch']}":
                                   r.get("fraction_of_limit") for r in result["decode"]}
  s["decode_kernel_fraction_of_copy_bw"] = {
      f"b{r['batch']} {r['fill']} {r['variant']}": r.get("kernel_fraction_of_copy_bw")
      for r in result["decode_kernel"]}
  if result.get("attention_mosaic"):
    s["attention_mosaic"] = mosaic_summary(result)
    s["attention_mosaic"]["blocks_used"] = result.get("mosaic_blocks_used")
  s["checks_ok"] = all(r.get("ok") for r in result["check"]) if result["check"] else None
  s["tuning_used"] = result.get("tuning_used")
  s["tuning_used_rope"] = result.get("tuning_used_rope")
  s["aims"] = aim_verdicts(result, s)
  del env, ceil
  return s


def aim_verdicts(result, s) -> list:
  """The issue's four aims, each as {aim, limit, value, met, detail}: `met` is None when the run
  did not measure it (a section skipped or failed, cuDNN absent, or no fwd+bwd rows as in
  --small), never a guess. Attention aims take the worst sequence length of the fwd+bwd rows."""
  def verdict(aim, limit, value, ok, detail):
    return dict(aim=aim, limit=limit, value=value,
                met=None if value is None else bool(ok(value)), detail=detail)

  best = s.get("train_best") or {}
  out = [verdict("~1B training step MFU (datasheet peak), default step", ">= 0.55",
                 s.get("train_mfu_datasheet"), lambda v: v >= 0.55,
                 f"vs measured matmul {_f(s.get('train_mfu_measured_matmul'), '{:.1%}')}; "
                 f"fastest variant {best.get('variant')}: "
                 f"{_f(best.get('mfu_datasheet'), '{:.1%}')} of the datasheet")]
  seqs = sorted({r["seq"] for r in result["attention"] if r["mode"] == "fwdbwd"})
  ratios = s.get("attention_ours_over_cudnn_speed") or {}
  alibi = s.get("alibi_overhead") or {}
  keys = [f"fwdbwd {q}" for q in seqs]
  have = lambda d: bool(keys) and all(k in d for k in keys)  # noqa: E731
  out.append(verdict("flash attention fwd+bwd speed / cuDNN's (causal, hd 128), worst seq",
                     ">= 0.9", min(ratios[k] for k in keys) if have(ratios) else None,
                     lambda v: v >= 0.9, ", ".join(f"{k}: {ratios[k]:.2f}" for k in keys
                                                   if k in ratios) or "not measured"))
  out.append(verdict("ALiBi overhead over no bias (ours, fwd+bwd), worst seq", "<= 0.10",
                     max(alibi[k] for k in keys) if have(alibi) else None, lambda v: v <= 0.10,
                     ", ".join(f"{k}: {alibi[k]:+.1%}" for k in keys if k in alibi)
                     or "not measured"))
  dec = s.get("decode_fraction_of_limit") or {}
  out.append(verdict("7B decode, batch 1, 2k context: fraction of the weight + cache bandwidth "
                     "limit (attention_impl=pallas)", ">= 0.70", dec.get("pallas b1"),
                     lambda v: v >= 0.70,
                     ", ".join(f"{k}: {v:.1%}" for k, v in dec.items() if v is not None)))
  return out


def _f(x, fmt="{:.1f}"):
  return "-" if x is None else fmt.format(x)


def mosaic_markdown(result) -> list:
  rows = result["attention_mosaic"]
  summ = mosaic_summary(result)
  out = ["## Attention on the Mosaic GPU kernels (kernels_pallas.flash_mgpu; causal, bf16, "
         "no bias)", ""]
  for r in rows:
    if r.get("kind") in ("check", "variant check"):
      errs = ", ".join(f"{k} {v:.2e}" for k, v in r["rel_l2"].items())
      out += [f"Check {r['kernel']} (blocks: {r.get('variant', 'default')}) against the fp32 "
              f"reference, shape {r['shape']} (b, s, h, kv heads, d): {errs} (limit "
              f"{r['limit']}): {'ok' if r['ok'] else 'FAILED'}.", ""]
  used = result.get("mosaic_blocks_used")
  if used:
    out += [f"Blocks the rest of the run used: {used['variant']} ({used['ms']:.3f} ms fwd+bwd at "
            f"seq {used['seq']} against the default's {used['default_ms']:.3f} ms"
            + ("" if used["variant"] == "default" else
               f"; {'checked' if used.get('checked') else 'its check FAILED: default kept'}")
            + ").", ""]
  times = [r for r in rows if r.get("kind") == "time"]
  if times:
    out += ["| mode | seq | batch | kernels | blocks | TFLOP/s | ms | Mosaic over cuDNN | "
            "Mosaic over ours (Triton) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in times:
      key = f"{r['mode']} {r['seq']}"
      ours = r["variant"] == "default" and r["impl"] == "mosaic"
      cells = [f"{r['tflops']:.0f}", f"{r['ms']:.3f}"] if "tflops" in r else [
          "failed: " + str(r.get("error", ""))[:60], "-"]
      out.append(f"| {r['mode']} | {r['seq']} | {r['batch']} | {r['impl']} | {r['variant']} | "
                 + " | ".join(cells) + " | "
                 + " | ".join(_f(summ[k].get(key) if ours else None, "{:.2f}")
                              for k in ("over_cudnn", "over_ours")) + " |")
    out.append("")
  return out


def markdown(result):
  import gpu_train_mfu  # benchmarks/gpu_train_mfu.py: the train rows' peak-memory text
  env, ceil = result["env"], result["ceilings"]
  out = ["# gpu_suite results", "",
         f"Device: {env.get('device')} ({env.get('nvidia_smi') or 'nvidia-smi n/a'}); "
         f"jax {env.get('jax')}, jaxlib {env.get('jaxlib')}, flax {env.get('flax')}, "
         f"triton {env.get('triton')}, Python {env.get('python')}; {env.get('date_utc')} UTC; "
         f"git {env.get('git_commit')}; small={env.get('small')}.", "",
         f"Command: `{' '.join(env.get('argv', []))}` "
         f"(JAX_PLATFORMS={env.get('JAX_PLATFORMS')}, "
         f"XLA_PYTHON_CLIENT_MEM_FRACTION={env.get('XLA_PYTHON_CLIENT_MEM_FRACTION')}); "
         f"elapsed {result.get('elapsed_s', 0):.0f} s.", ""]
  if ceil:
    out += [f"Ceilings: bf16 {ceil['matmul_n']}^3 matmul **{ceil['matmul_flops'] / 1e12:.0f} "
            f"TFLOP/s** (datasheet {_f((env.get('datasheet_bf16_flops') or 0) / 1e12, '{:.0f}')}"
            f"); copy **{ceil['copy_bandwidth'] / 1e12:.2f} TB/s** read+write (datasheet "
            f"{_f((env.get('datasheet_bandwidth') or 0) / 1e12, '{:.2f}')}).", ""]
  aims = (result.get("summary") or {}).get("aims")
  if aims:  # the issue's four aims first; the tables below are their evidence
    out += ["## Aims", "", "| aim | limit | measured | met | detail |", "|---|---|---|---|---|"]
    for a in aims:
      met = {True: "**yes**", False: "**no**", None: "not measured"}[a["met"]]
      out.append(f"| {a['aim']} | {a['limit']} | {_f(a['value'], '{:.3f}')} | {met} | "
                 f"{a['detail']} |")
    out.append("")
  if result["check"]:
    out += ["## Kernel checks", "", "| kernel | errors (rel. L2) | limit | ok |", "|---|---|---|---|"]
    for r in result["check"]:
      errs = ", ".join(f"{k} {v:.2e}" for k, v in (r.get("rel_l2") or {}).items()) or "exact"
      out.append(f"| {r['kernel']} | {errs} | {r.get('limit', '-')} | {r['ok']} |")
    out.append("")
  if result["attention"]:
    tiling = _tiling(result)
    out += ["## Attention (causal, bf16, TFLOP/s; FlashAttention FLOP convention)", "",
            f"Ours with the backward tiling: {tiling}.", "",
            "| mode | seq | batch | ours | ours+alibi | cudnn | cudnn+alibi (dense bias) |",
            "|---|---|---|---|---|---|---|"]
    keys = sorted({(r["mode"], r["seq"], r["batch"]) for r in result["attention"]})
    for mode, seq, b in keys:
      cells = []
      for impl, al in (("ours", False), ("ours", True), ("cudnn", False), ("cudnn", True)):
        r = [r for r in result["attention"] if (r["mode"], r["seq"], r["impl"], r["alibi"]) ==
             (mode, seq, impl, al)]
        cells.append(f"{r[0]['tflops']:.0f}" if r and "tflops" in r[0] else
                     (r[0].get("error", "-")[:40] if r else "-"))
      out.append(f"| {mode} | {seq} | {b} | " + " | ".join(cells) + " |")
    out.append("")
  if result.get("attention_mosaic"):
    out += mosaic_markdown(result)
  if result["train"]:
    out += ["## ~1B training step", "",
            "| variant | attention | RoPE | loss | batch x seq | step s | tokens/s | "
            "model TFLOP/s | MFU (datasheet) | MFU (measured matmul) | peak GiB | RMSNorm | "
            "attention kernels |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["train"]:
      if "error" in r or "step_s" not in r:
        out.append(f"| {r.get('variant', '-')} | {r.get('attention_impl')} | "
                   f"{r.get('rope', '-')} | {r.get('loss_path', '-')} | {r.get('batch')}x"
                   f"{r.get('seq')} | failed: {str(r.get('error'))[:80]} |")
        continue
      out.append(f"| {r.get('variant', '-')} | {r['attention_impl']} | {r.get('rope', '-')} | "
                 f"{r.get('loss_path', '-')} | {r['batch']}x{r['seq']} | "
                 f"{r['step_s']:.3f} | "
                 f"{r['tokens_per_s']:.0f} | {r['model_tflops']:.0f} | "
                 f"{_f(r.get('mfu_datasheet'), '{:.1%}')} | "
                 f"{_f(r.get('mfu_measured_matmul'), '{:.1%}')} | {gpu_train_mfu.peak_text(r)} | "
                 f"{r.get('rms_norm', '-')} | {r.get('attention_kernels', '-')} |")
    out.append("")
    for r in result["train"]:
      if "optimizer_guarded_ms" in r:
        out += [f"Optimizer update alone on the {r.get('variant', 'default')} step's state "
                f"(1e-3 gradients): **{r['optimizer_guarded_ms']:.2f} ms** as the step runs it "
                f"(clip, AdamW, NaN/inf guard and select; "
                f"{r['optimizer_share_of_step']:.1%} of the step), "
                f"{r['optimizer_plain_ms']:.2f} ms as plain optax (the guard: "
                f"{r['optimizer_guard_ms']:.2f} ms); least traffic "
                f"{r['optimizer_min_bytes'] / 1e9:.2f} GB = "
                f"{_f(r.get('optimizer_bound_ms'), '{:.2f}')} ms at the measured copy rate."
                + (f" The guard's other form (GUARD_RECOMPUTE="
                   f"{not r.get('optimizer_guard_recompute')}): "
                   f"{r['optimizer_guarded_other_ms']:.2f} ms, "
                   f"{'the same' if r.get('optimizer_guard_forms_equal') else 'NOT the same'}"
                   " new state bit for bit." if "optimizer_guarded_other_ms" in r else ""), ""]
      elif "optimizer_error" in r:
        out += [f"Optimizer update alone: failed: {r['optimizer_error'][:120]}", ""]
    for r in result["train"]:
      top = r.get("profile_top_ops_ms_per_step")
      if top:
        total = r["profile_total_ms_per_step"]
        out += [f"Profile of the {r.get('variant', 'default')} step (2 traced steps; "
                f"{r.get('profile_source', 'device events')} summed: {total:.1f} ms per step "
                f"against a {r['step_s'] * 1e3:.1f} ms step; raw trace "
                f"{r.get('profile_trace_file', 'not kept')}):",
                "", "| bucket | ms per step | share |", "|---|---|---|"]
        out += [f"| {k} | {v:.2f} | {v / total if total else 0:.1%} |"
                for k, v in (r.get("profile_buckets_ms_per_step") or {}).items()]
        out += ["", "| op kind | ms per step |", "|---|---|"]
        out += [f"| `{k[:90]}` | {v:.2f} |" for k, v in top.items()]
        lines = r.get("profile_lines_ms_per_step") or {}
        if lines:
          out += ["", "Device time per trace line (ms per step): " + ", ".join(
              f"{k[:40]} {v:.1f}" for k, v in sorted(lines.items(), key=lambda kv: -kv[1])[:8])]
        out.append("")
  if result["decode"]:
    out += [f"## Decode step (one token per row, {result['decode'][0]['context']} filled slots "
            f"of {result['decode'][0]['cache_len']})", "",
            "| path | batch | ms/step | tokens/s | limit tokens/s (weights + filled KV, copy bw) | "
            "fraction |", "|---|---|---|---|---|---|"]
    for r in result["decode"]:
      out.append(f"| {r['path']} | {r['batch']} | {r['step_ms']:.2f} | {r['tokens_per_s']:.1f} | "
                 f"{_f(r.get('limit_tokens_per_s'))} | {_f(r.get('fraction_of_limit'), '{:.1%}')} |")
    out.append("")
  if result["decode_kernel"]:
    out += ["## Decode attention alone (one layer's cache; GB/s of the filled K/V bytes)", "",
            "| batch | lengths | variant | kernel us | kernel GB/s | fraction of copy bw | "
            "xla (all slots) us | xla GB/s |", "|---|---|---|---|---|---|---|---|"]
    for r in result["decode_kernel"]:
      out.append(f"| {r['batch']} | {r['fill']} | {r['variant']} | {_f(r.get('kernel_us'))} | "
                 f"{_f(r.get('kernel_filled_gb_s'))} | "
                 f"{_f(r.get('kernel_fraction_of_copy_bw'), '{:.1%}')} | "
                 f"{_f(r.get('xla_us'))} | {_f(r.get('xla_filled_gb_s'))} |")
    out.append("")
  if result["tiles"]:
    out += ["## Backward tilings (fwd+bwd TFLOP/s)", "", "| kernels | variant | TFLOP/s | ms |",
            "|---|---|---|---|"]
    for r in result["tiles"]:
      out.append(f"| {_PATHS[r.get('path', 'plain')]} | {r['variant']} | "
                 f"{_f(r.get('tflops'), '{:.0f}')} | {_f(r.get('ms'), '{:.3f}')} |")
    for key, path, who in (("tuning_used", "plain",
                            "the attention section and the RoPE-first train steps"),
                           ("tuning_used_rope", "rope", "the in-kernel-RoPE train steps")):
      used = result.get(key)
      if used:
        gain = used.get("speedup_over_default")
        out += ["", f"Fastest {_PATHS[path]}: **{used['variant']}** "
                + ("(the default was not timed)" if gain is None else f"({gain:.2f}x the default)")
                + f"; {who} ran with it."]
    out.append("")
  if result.get("section_times"):
    out += ["## Section times (the budget guard's estimates, COST, against this run)", "",
            "| section | seconds | estimate s |", "|---|---|---|"]
    out += [f"| {t['section']} | {t['seconds']:.1f} | {t['estimate_s']:.0f} |"
            for t in result["section_times"]]
    out.append("")
  s = result.get("summary") or {}
  if s:
    out += ["## Summary", "", "```", json.dumps(s, indent=1, default=str), "```", ""]
  if result["skipped"] or result["errors"]:
    out += ["## Skipped / errors", ""] + [f"- {x}" for x in result["skipped"] + result["errors"]]
  return "\n".join(out) + "\n"


# ----------------------------------------------------------------------------------------------


WATCHDOG_GRACE_S = 30.0  # past the budget before the watchdog ends the process


def start_watchdog(suite, seconds):
  """The hard stop: a compile can outlast any estimate. After `seconds` the watchdog records
  the stop, writes the files and ends the process with status 3 -- unless the returned event
  is set first (main sets it when the plan is done, so an in-process caller lives on)."""
  finished = threading.Event()

  def watchdog():
    if finished.wait(seconds):
      return
    suite.result["errors"].append(f"watchdog: stopped at {suite.elapsed():.0f} s")
    suite.write(summary=True)
    print("watchdog: budget exceeded, results written, exiting", flush=True)
    os._exit(3)

  threading.Thread(target=watchdog, daemon=True, name="gpu_suite watchdog").start()
  return finished


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--out", required=True, help="folder for gpu_suite.json and gpu_suite.md")
  p.add_argument("--small", action="store_true",
                 help="tiny shapes, kernels in interpret mode (CPU smoke run of this script)")
  p.add_argument("--budget-s", type=float, default=480.0,
                 help="wall-clock budget in seconds; sections that no longer fit are skipped")
  p.add_argument("--sections",
                 default="ceilings,check,tiles,attention,train,decode,decode_kernel,"
                         "attention_mosaic",
                 help="comma-separated subset, run in this fixed order")
  p.add_argument("--preflight", action="store_true",
                 help="on a machine without a GPU: lower every program of the full run for CUDA "
                      "(writes gpu_suite_preflight.json/.md; exit status 1 if one fails)")
  args = p.parse_args(argv)
  if args.preflight:
    result = preflight(Path(args.out))
    if not result["ok"]:
      sys.exit(1)
    return result
  if not (math.isfinite(args.budget_s) and args.budget_s > 0):
    p.error(f"--budget-s {args.budget_s}: must be a positive number of seconds")
  sections = args.sections.split(",")
  allowed = ("ceilings", "check", "tiles", "attention", "train", "decode", "decode_kernel",
             "attention_mosaic")
  for s in sections:
    if s not in allowed:
      p.error(f"--sections: {s!r} is not one of {allowed}")
  shapes = SMALL if args.small else FULL
  backend = "interpret" if args.small else "gpu"
  if not args.small and jax.default_backend() != "gpu":
    p.error("no GPU: this suite measures a GPU (JAX_PLATFORMS=cuda); use --small on a CPU")
  suite = Suite(args, shapes)

  plan = [("env", lambda: section_env(suite), COST["env"])]
  if "ceilings" in sections:
    plan.append(("ceilings", lambda: section_ceilings(suite), COST["ceilings"]))
  if "check" in sections:
    plan.append(("check", lambda: section_check(suite, backend), COST["check"]))
  if "tiles" in sections:  # first: the fastest tilings are what attention and train run with
    plan.append(("tiles", lambda: section_tiles(suite, backend, shapes["tiles"]),
                 COST["tiles item"]))
    if "train" in sections:  # the training path's kernels (RoPE inside)
      plan.append(("tiles rope", lambda: section_tiles(suite, backend, shapes["tiles"], True),
                   COST["tiles item"]))
  if "attention" in sections:
    plan.append(("attention", lambda: section_attention(suite, backend, shapes["attn"]),
                 COST["attention item"]))
  if "train" in sections:
    plan.append(("train", lambda: section_train(suite, shapes["train"]), COST["train"]))
  if "decode" in sections:
    plan.append(("decode", lambda: section_decode(suite, backend, shapes["decode"]),
                 COST["decode_step"] * 2))
  variant = lambda name: (f"train {name}",  # noqa: E731
                           lambda: section_train(suite, shapes["train"], name),
                           COST[f"train {name}"])
  if "train" in sections:  # the larger batch bears on the MFU aim: before the kernel tuning
    plan.append(variant("batch x2"))
  if "decode_kernel" in sections:
    plan.append(("decode_kernel",
                 lambda: section_decode_kernel(suite, backend, shapes["decode_kernel"]),
                 COST["decode_kernel item"]))
  if "train" in sections:  # last, the A/Bs that decide defaults: only if the budget has room
    plan += [variant(name) for name in ("rope-first", "rope in kernel", "swiglu vjp",
                                        "swiglu autodiff", "unrolled layers", "xla RMSNorm",
                                        "whole-logit loss")
             if not redundant_variant(name)]
  if "decode" in sections:  # what the decode span check costs: reported, decides nothing
    plan.append(("decode no-check", lambda: section_decode(suite, backend, shapes["decode"],
                                                           span_check_ab=True),
                 COST["decode_step"]))
  if "attention_mosaic" in sections:  # last: new kernels no GPU has run yet
    mosaic = lambda stage: (  # noqa: E731
        "attention mosaic" + ("" if stage == "main" else f" {stage}"),
        lambda: section_attention_mosaic(suite, backend, shapes["mosaic"], stage),
        COST["attention mosaic check" if stage == "main" else "attention mosaic item"])
    plan += [mosaic("main"), mosaic("blocks")]
    if "train" in sections:  # the step on them (the fastest blocks), once they passed the checks
      plan += [variant(name) for name in MOSAIC_TRAIN_VARIANTS if not redundant_variant(name)]
    plan.append(mosaic("extra"))
  # the `tiles` sections set this run's fastest tilings in MEASURED_TUNING, the Mosaic "blocks"
  # stage its fastest blocks in flash_mgpu.DEFAULT_BLOCKS (this process only)
  measured = copy.deepcopy(kernels_pallas.attention.MEASURED_TUNING)
  finished = start_watchdog(suite, args.budget_s + WATCHDOG_GRACE_S)  # stood down in finally
  try:
    for name, fn, cost in plan:
      if not suite.fits(name, cost):
        continue
      t0, suite.estimated = time.perf_counter(), 0.0
      errors_before = len(suite.result["errors"])
      try:
        fn()
      except Exception as e:  # pylint: disable=broad-except
        suite.error(name, e)
      # what it took against the budget guard's estimate (its items' where it has items), so
      # COST can be set from a device run (gpu_apply leaves out sections with errors)
      suite.result["section_times"].append(dict(
          section=name, seconds=round(time.perf_counter() - t0, 1),
          estimate_s=suite.estimated or cost, guard_scale=round(suite.guard_scale(), 3),
          errors=len(suite.result["errors"]) - errors_before))
      print(f"section {name}: {time.perf_counter() - t0:.1f} s (elapsed {suite.elapsed():.0f} s, "
            f"process CPU {time.process_time():.0f} s)", flush=True)
      suite.write(summary=True)
      gc.collect()  # free the section's device buffers before the next one allocates
  finally:
    finished.set()  # the watchdog must not end a caller that goes on (a test, a notebook)
    kernels_pallas.attention.MEASURED_TUNING.clear()
    kernels_pallas.attention.MEASURED_TUNING.update(measured)
    if suite.mosaic_blocks_saved is not None:  # what `_pick_mosaic_blocks` replaced
      from kernels_pallas import flash_mgpu
      flash_mgpu.DEFAULT_BLOCKS.update(suite.mosaic_blocks_saved)
  suite.write(summary=True)  # also when every section was skipped: the file says so
  print(suite.markdown_text, flush=True)
  return suite.result


if __name__ == "__main__":
  main()
