"""Fused RMSNorm kernel against XLA's fusion of the jnp reference: forward and forward+backward.

RMSNorm is memory-bound, so the figure of merit is effective bandwidth: bytes that must move
(forward: read x, write y; backward additionally read x and dy, write dx) over time, against the
device's copy bandwidth. Rows x hidden match the 7B/13B models at 4k-token batches.

Usage (GPU): python benchmarks/rms_norm.py --out docs/results/rms_norm_h100.json
CPU smoke test: python benchmarks/rms_norm.py --backend interpret --shapes 64x256
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import kernels_pallas.rms_norm  # noqa: E402,F401  (the module; the package re-exports the function)
from kernels_pallas import rms_norm, rms_norm_reference  # noqa: E402
from timing import median_seconds  # noqa: E402  (benchmarks/timing.py)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--shapes", default="16384x4096,16384x5120", help="rows x hidden, comma-separated")
  p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
  p.add_argument("--backend", default="gpu", help="kernel backend for the fused version")
  p.add_argument("--iters", type=int, default=20)
  p.add_argument("--sweep", action="store_true",
                 help="GPU: also time the fused kernel for block_rows x num_warps settings")
  p.add_argument("--out", default=None)
  args = p.parse_args(argv)
  dtype = jnp.dtype(args.dtype)
  dev = jax.devices()[0]
  rows_out = []
  for spec in args.shapes.split(","):
    n, h = (int(v) for v in spec.split("x"))
    x = jax.random.normal(jax.random.PRNGKey(0), (n, h), jnp.float32).astype(dtype)
    w = 1.0 + 0.1 * jax.random.normal(jax.random.PRNGKey(1), (h,), jnp.float32)
    dy = jax.random.normal(jax.random.PRNGKey(2), (n, h), jnp.float32).astype(dtype)
    impls = {"fused": (lambda x, w: rms_norm(x, w, eps=1e-6, backend=args.backend), None),
             "xla": (lambda x, w: rms_norm_reference(x, w, 1e-6), None)}
    if args.sweep:
      for rows in (1, 2, 4, 8, 16):
        for warps in (1, 2, 4, 8):
          impls[f"fused_r{rows}_w{warps}"] = (
              lambda x, w, rows=rows: rms_norm(x, w, eps=1e-6, backend=args.backend,
                                               block_rows=rows), warps)
    for name, (f, warps) in impls.items():
      sys.modules["kernels_pallas.rms_norm"].GPU_LAUNCH["num_warps"] = warps or 4
      fwd = jax.jit(f)
      both = jax.jit(lambda x, w, dy, f=f: jax.vjp(f, x, w)[1](dy))
      try:
        t_f = median_seconds(fwd, x, w, iters=args.iters, warmup=1)
        t_b = median_seconds(both, x, w, dy, iters=args.iters, warmup=1)
      except Exception as e:  # pylint: disable=broad-except
        print(f"{name} {n}x{h}: {str(e).splitlines()[0][:120]}", flush=True)
        continue
      itemsize = dtype.itemsize
      bytes_f = 2 * n * h * itemsize
      bytes_b = bytes_f + 3 * n * h * itemsize  # backward: read x and dy, write dx
      row = dict(impl=name, rows=n, hidden=h, dtype=dtype.name, fwd_ms=t_f * 1e3,
                 fwd_bwd_ms=t_b * 1e3, fwd_gb_s=bytes_f / t_f / 1e9, fwd_bwd_gb_s=bytes_b / t_b / 1e9)
      rows_out.append(row)
      print(json.dumps(row), flush=True)
  print("| rows x hidden | impl | fwd ms | fwd GB/s | fwd+bwd ms | fwd+bwd GB/s |")
  print("|---|---|---|---|---|---|")
  for r in rows_out:
    print(f"| {r['rows']}x{r['hidden']} | {r['impl']} | {r['fwd_ms']:.3f} | {r['fwd_gb_s']:.0f} | "
          f"{r['fwd_bwd_ms']:.3f} | {r['fwd_bwd_gb_s']:.0f} |")
  if args.out:
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(dict(device=dev.device_kind, jax=jax.__version__,
                                              rows=rows_out), indent=1))


if __name__ == "__main__":
  main()
