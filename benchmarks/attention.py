"""Attention speed and memory: our Pallas flash kernel against the alternatives a JAX user has.

Measures forward and forward+backward TFLOP/s at head_dim 128, bf16, causal, with and without
ALiBi, for sequence lengths 1k..16k at a fixed number of tokens per batch, against:

- `xla`: the plain jnp reference (`kernels_pallas.attention_reference`, S x S scores in memory),
- `cudnn`: `jax.nn.dot_product_attention(..., implementation="cudnn")` (ALiBi as a dense
  [batch, heads, S, S] bias, the only way to give it one),
- `jax_mha`: JAX's bundled Triton-lowered Pallas kernel (`jax.experimental.pallas.ops.gpu.attention
  .mha`; no bias, so no ALiBi row; jax 0.12.1 removed it, and its rows then say n/a),
- `jax_mgpu`: JAX's bundled Hopper (Mosaic GPU) kernel (float16 only: inputs are cast),
- `ours`: `kernels_pallas.flash_attention` (ALiBi computed in the kernel).

FLOPs follow FlashAttention's convention: forward = 4 * batch * heads * seq^2 * head_dim (two
matmuls), halved under causal masking; backward = 2.5x forward, so forward+backward = 3.5x.
Peak memory is the compiled executable's temporary + output bytes (XLA's memory analysis), which
excludes the inputs every implementation shares.

Usage (on a GPU machine):
  python benchmarks/attention.py --out docs/results/attention_h100.json
  python benchmarks/attention.py --tune --seq 4096          # sweep block sizes / warps / stages
  python benchmarks/attention.py --check                   # correctness vs the fp32 reference
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import platform
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import kernels_pallas  # noqa: E402
from timing import median_seconds  # noqa: E402  (benchmarks/timing.py)
from kernels_pallas import attention_reference, flash_attention, flash_gpu  # noqa: E402
from baichuan_jax.model.positions import alibi_slopes  # noqa: E402

IMPLS = ("ours", "mosaic", "xla", "cudnn", "jax_mha", "jax_mgpu")


def attn_flops(b, s, h, d, causal, mode):
  fwd = 4.0 * b * h * s * s * d / (2 if causal else 1)
  return fwd if mode == "fwd" else 3.5 * fwd


def _dense_alibi(slopes, s, dtype):
  """[1, heads, S, S] ALiBi bias with the causal distance (what cuDNN needs as a tensor)."""
  i = jnp.arange(s)
  dist = (i[:, None] - i[None, :]).astype(jnp.float32)
  return (-slopes[:, None, None] * dist[None]).astype(dtype)[None]


BACKEND = "gpu"  # --backend; "interpret" runs a tiny smoke test of this script on CPU


def make_fn(impl, *, causal, alibi, s, h, d, dtype, tuning=None, rope=False, segments=False):
  """Returns f(q, k, v) -> out for one implementation, or raises NotImplementedError.
  `rope` (ours only): as the model's training step runs the kernels: q and k unrotated, RoPE
  (base 10,000) inside them, with positions 0..s-1 and segment ids (one segment per row).
  `segments` (ours only): the plain kernels with those segment ids, as the training step runs
  them with RoPE applied first (`layers.ROPE_IN_KERNEL = False`)."""
  slopes = jnp.asarray(alibi_slopes(h)) if alibi else None
  scale = d ** -0.5
  if (rope or segments) and impl != "ours":
    raise NotImplementedError("RoPE inside the kernels and segment ids are ours only")
  if impl == "ours" and rope:
    def f(q, k, v):
      ids = jnp.broadcast_to(jnp.arange(q.shape[1], dtype=jnp.int32), q.shape[:2])
      return flash_attention(q, k, v, causal=causal, alibi_slopes=slopes, backend=BACKEND,
                             tuning=tuning, rope_theta=1e4, positions=ids,
                             segment_ids=jnp.ones_like(ids))
    return f
  if impl == "ours" and segments:
    return lambda q, k, v: flash_attention(q, k, v, causal=causal, alibi_slopes=slopes,
                                           backend=BACKEND, tuning=tuning,
                                           segment_ids=jnp.ones(q.shape[:2], jnp.int32))
  if impl == "ours":
    return lambda q, k, v: flash_attention(q, k, v, causal=causal, alibi_slopes=slopes,
                                           backend=BACKEND, tuning=tuning)
  if impl == "xla":
    return lambda q, k, v: attention_reference(q, k, v, causal=causal, alibi_slopes=slopes)
  if impl == "cudnn":
    def f(q, k, v):
      bias = None if slopes is None else _dense_alibi(slopes, s, q.dtype)
      return jax.nn.dot_product_attention(q, k, v, bias=bias, is_causal=causal, scale=scale,
                                          implementation="cudnn")
    return f
  if alibi:
    raise NotImplementedError("takes no bias")
  if impl == "mosaic":  # ours for Hopper (kernels_pallas.flash_mgpu); `tuning`: its blocks
    from kernels_pallas.flash_mgpu import flash_attention_mgpu
    return lambda q, k, v: flash_attention_mgpu(q, k, v, causal=causal, sm_scale=scale,
                                                blocks=tuning,
                                                interpret=BACKEND == "interpret")
  if impl == "jax_mha":
    try:
      from jax.experimental.pallas.ops.gpu import attention as mha_lib
    except ImportError:  # jax 0.12.1 removed the bundled Pallas Triton ops
      raise NotImplementedError(f"jax {jax.__version__} has no jax.experimental.pallas.ops."
                                "gpu.attention (removed in 0.12.1)") from None
    bs = mha_lib.BlockSizes(block_q=128, block_k=64, block_q_dkv=64, block_kv_dkv=64,
                            block_q_dq=64, block_kv_dq=64)
    return lambda q, k, v: mha_lib.mha(q, k, v, None, sm_scale=scale, causal=causal,
                                       block_sizes=bs, num_warps=8 if d >= 128 else 4)
  if impl == "jax_mgpu":
    from jax.experimental.pallas.ops.gpu import attention_mgpu as mgpu
    cfg = mgpu.TuningConfig(block_q=64, block_kv=128, max_concurrent_steps=2, causal=causal)
    # This kernel takes float16 only; the cast is outside the timed kernel's cost class.
    f16 = lambda x: x.astype(jnp.float16)
    return lambda q, k, v: mgpu.attention(f16(q), f16(k), f16(v), cfg).astype(q.dtype)
  raise ValueError(impl)


def _grad_fn(f):
  def loss(q, k, v, ct):
    return jnp.sum(f(q, k, v).astype(jnp.float32) * ct)
  return jax.grad(loss, argnums=(0, 1, 2))


def _peak_bytes(jitted, args):
  try:
    ma = jitted.lower(*args).compile().memory_analysis()
    return int(ma.temp_size_in_bytes + ma.output_size_in_bytes)
  except Exception:  # pylint: disable=broad-except
    return None


def inputs(b, s, h, d, dtype, seed):
  kq, kk, kv, kc = jax.random.split(jax.random.PRNGKey(seed), 4)
  shape = (b, s, h, d)
  return [jax.random.normal(key, shape, jnp.float32).astype(dtype) for key in (kq, kk, kv)] + [
      jax.random.normal(kc, shape, jnp.float32)]


def bench_one(impl, mode, *, b, s, h, d, dtype, causal, alibi, iters, tuning=None, rope=False):
  """One row of results (TFLOP/s, ms, peak bytes) or an error string (`rope`: see make_fn)."""
  row = dict(impl=impl, mode=mode, batch=b, seq=s, heads=h, head_dim=d, causal=causal,
             alibi=alibi, dtype=jnp.dtype(dtype).name)
  if rope:
    row["rope"] = "in kernel"
  if tuning:
    row["tuning"] = json.loads(json.dumps(tuning))  # tuples -> lists
  try:
    f = make_fn(impl, causal=causal, alibi=alibi, s=s, h=h, d=d, dtype=dtype, tuning=tuning,
                rope=rope)
  except NotImplementedError as e:
    row["error"] = f"n/a ({e})"
    return row
  q, k, v, ct = inputs(b, s, h, d, dtype, seed=s)
  if mode == "fwd":
    jitted, args = jax.jit(f), (q, k, v)
  else:
    jitted, args = jax.jit(_grad_fn(f)), (q, k, v, ct)
  try:
    sec = median_seconds(jitted, *args, iters=iters)
  except Exception as e:  # pylint: disable=broad-except
    msg = str(e).split("\n")[0][:200]
    row["error"] = ("OOM: " if "RESOURCE_EXHAUSTED" in msg or "memory" in msg.lower() else "") + msg
    return row
  row["ms"] = sec * 1e3
  row["tflops"] = attn_flops(b, s, h, d, causal, mode) / sec / 1e12
  row["peak_bytes"] = _peak_bytes(jitted, args)
  return row


def check(seqs=(1000, 2048), h=8, hkv=2, d=128):
  # Ragged 1000 (internal padding) and 2048; GQA 8:2; head_dim 128; every feature combination.
  """Compiled-kernel correctness against the fp32 reference: out and dq/dk/dv, relative L2."""
  rows = []
  for s, alibi, seg, dtype in itertools.product(seqs, (False, True), (False, True),
                                                (jnp.bfloat16, jnp.float32)):
    keys = jax.random.split(jax.random.PRNGKey(s + 7 * alibi + 3 * seg), 5)
    q = jax.random.normal(keys[0], (2, s, h, d), jnp.float32)
    k = jax.random.normal(keys[1], (2, s, hkv, d), jnp.float32)
    v = jax.random.normal(keys[2], (2, s, hkv, d), jnp.float32)
    ct = jax.random.normal(keys[3], (2, s, h, d), jnp.float32)
    kw = {}
    if alibi:
      kw["alibi_slopes"] = jnp.asarray(alibi_slopes(h))
    if seg:
      cuts = jnp.sort(jax.random.randint(keys[4], (2, 3), 1, s), axis=1)
      kw["segment_ids"] = (jnp.sum(jnp.arange(s)[None, :, None] >= cuts[:, None, :], -1)
                           + 1).astype(jnp.int32)
    ours = lambda q, k, v: flash_attention(q, k, v, backend=BACKEND, **kw)
    ref = lambda q, k, v: attention_reference(q, k, v, **kw)

    def both(fn, q, k, v):
      o, vjp = jax.vjp(fn, q, k, v)
      return (o,) + vjp(ct.astype(o.dtype))

    with jax.default_matmul_precision("highest"):
      want = jax.jit(functools.partial(both, ref))(q, k, v)
    got = jax.jit(functools.partial(both, ours))(q.astype(dtype), k.astype(dtype),
                                                 v.astype(dtype))
    errs = {}
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
      g = np.asarray(g.astype(jnp.float32), np.float64)
      w = np.asarray(w, np.float64)
      errs[name] = float(np.linalg.norm(g - w) / np.linalg.norm(w)) if np.all(
          np.isfinite(g)) else float("nan")
    limit = 1.5e-2 if dtype == jnp.bfloat16 else 2e-3
    ok = all(e <= limit for e in errs.values())  # NaN fails this too
    rows.append(dict(seq=s, alibi=alibi, segments=seg, dtype=jnp.dtype(dtype).name,
                     rel_l2=errs, limit=limit, ok=ok))
    print(f"check seq={s:5d} alibi={alibi!s:5} seg={seg!s:5} {jnp.dtype(dtype).name:8} "
          + " ".join(f"{n}={e:.2e}" for n, e in errs.items()) + ("  ok" if ok else "  FAIL"),
          flush=True)
  return rows


def tune(s, b, h, d, dtype, iters):
  """Sweeps block sizes, warps and stages per kernel at one shape; returns rows and the best."""
  rows, best = [], {}
  blocks = [(64, 64), (128, 64), (128, 128)]
  for phase in ("fwd", "bwd"):
    for (bq, bk), warps, stages in itertools.product(blocks, (4, 8), (2, 3)):
      tuning = {"blocks": {phase: (bq, bk)}, "launch": {phase: dict(num_warps=warps,
                                                                    num_stages=stages)}}
      if phase == "bwd" and "fwd" not in best:
        break
      if phase == "bwd":  # time the backward with the best forward found so far
        tuning["blocks"]["fwd"] = best["fwd"][0]
        tuning["launch"]["fwd"] = best["fwd"][1]
      row = bench_one("ours", "fwd" if phase == "fwd" else "fwdbwd", b=b, s=s, h=h, d=d,
                      dtype=dtype, causal=True, alibi=False, iters=iters,
                      tuning=tuning)
      row.update(phase=phase, block_q=bq, block_k=bk, num_warps=warps, num_stages=stages)
      rows.append(row)
      print(f"tune {phase} bq={bq:3d} bk={bk:3d} warps={warps} stages={stages}: "
            + (f"{row['tflops']:.1f} TFLOP/s" if "tflops" in row else row["error"][:80]),
            flush=True)
      if "tflops" in row and (phase not in best or row["tflops"] > best[phase][2]):
        best[phase] = ((bq, bk), dict(num_warps=warps, num_stages=stages), row["tflops"])
  return rows, best


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--seq", default="1024,2048,4096,8192,16384",
                 help="comma-separated sequence lengths")
  p.add_argument("--tokens", type=int, default=16384,
                 help="tokens per batch; batch = tokens // seq (at least 1)")
  p.add_argument("--heads", type=int, default=32, help="query heads (= kv heads here)")
  p.add_argument("--head-dim", type=int, default=128)
  p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
  p.add_argument("--impls", default=",".join(IMPLS), help=f"subset of {IMPLS}")
  p.add_argument("--modes", default="fwd,fwdbwd")
  p.add_argument("--no-causal", action="store_true", help="full (bidirectional) attention")
  p.add_argument("--iters", type=int, default=10, help="timed calls per point (median)")
  p.add_argument("--check", action="store_true", help="run the correctness check first")
  p.add_argument("--tune", action="store_true",
                 help="sweep block sizes / num_warps / num_stages at the first --seq, then "
                      "benchmark with the best setting")
  p.add_argument("--check-seqs", default="1000,2048", help="sequence lengths for --check")
  p.add_argument("--backend", default="gpu", choices=["gpu", "interpret"],
                 help="kernels for 'ours' (interpret: CPU smoke test of this script)")
  p.add_argument("--out", default=None, help="write all rows as JSON here")
  args = p.parse_args(argv)
  global BACKEND
  BACKEND = args.backend
  dtype = jnp.dtype(args.dtype)
  seqs = [int(x) for x in args.seq.split(",")]
  impls = args.impls.split(",")
  for impl in impls:
    if impl not in IMPLS:
      p.error(f"--impls: {impl!r} is not one of {IMPLS}")
  dev = jax.devices()[0]
  env = dict(device=dev.device_kind, platform=dev.platform, jax=jax.__version__,
             jaxlib=jax.lib.__version__ if hasattr(jax.lib, "__version__") else None,
             python=platform.python_version(), argv=sys.argv)
  print(json.dumps(env), flush=True)
  result = dict(env=env, check=None, tune=None, rows=[])
  if args.check:
    result["check"] = check(tuple(int(x) for x in args.check_seqs.split(",")))
  tuning = None
  if args.tune:
    b = max(1, args.tokens // seqs[0])
    rows, best = tune(seqs[0], b, args.heads, args.head_dim, dtype, args.iters)
    result["tune"] = dict(rows=rows, best={k: [list(v[0]), v[1], v[2]] for k, v in best.items()})
    tuning = {"blocks": {ph: best[ph][0] for ph in best},
              "launch": {ph: best[ph][1] for ph in best}}
    print("best:", result["tune"]["best"], flush=True)
  causal = not args.no_causal
  for s in seqs:
    b = max(1, args.tokens // s)
    for mode in args.modes.split(","):
      for impl in impls:
        for alibi in (False, True):
          row = bench_one(impl, mode, b=b, s=s, h=args.heads, d=args.head_dim, dtype=dtype,
                          causal=causal, alibi=alibi, iters=args.iters,
                          tuning=tuning if impl == "ours" else None)
          result["rows"].append(row)
          mem = row.get("peak_bytes")
          print(f"{mode:6} seq={s:6d} b={b:2d} {impl:8} alibi={alibi!s:5} "
                + (f"{row['tflops']:7.1f} TFLOP/s {row['ms']:8.3f} ms"
                   + (f" peak {mem / 2**30:6.2f} GiB" if mem else "")
                   if "tflops" in row else row["error"][:100]), flush=True)
      if args.out:  # keep partial results if a later point dies
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))
  print_table(result["rows"])
  if args.out:
    Path(args.out).write_text(json.dumps(result, indent=1))


def print_table(rows):
  """Markdown table: TFLOP/s per (mode, seq) and implementation."""
  cols = sorted({(r["impl"], r["alibi"]) for r in rows}, key=lambda c: (IMPLS.index(c[0]), c[1]))
  keys = sorted({(r["mode"], r["seq"]) for r in rows}, key=lambda k: (k[0] != "fwd", k[1]))
  name = lambda c: c[0] + ("+alibi" if c[1] else "")
  print("| mode | seq | " + " | ".join(name(c) for c in cols) + " |")
  print("|---|---|" + "---|" * len(cols))
  for mode, s in keys:
    cells = []
    for c in cols:
      r = [r for r in rows if (r["mode"], r["seq"], r["impl"], r["alibi"]) == (mode, s) + c]
      cells.append(f"{r[0]['tflops']:.0f}" if r and "tflops" in r[0] else
                   ("OOM" if r and r[0].get("error", "").startswith("OOM") else "-"))
    print(f"| {mode} | {s} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
  main()
