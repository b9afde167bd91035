"""Shared memory, registers and spills of the Pallas GPU kernels, compiled for Hopper on a CPU.

A Triton kernel that needs more shared memory than an SM has fails to launch, and one that spills
registers to local memory runs slower; both are decided by the compiler, not by the GPU, so they
can be read off before a GPU run. This script takes the kernels of every program that
benchmarks/gpu_suite.py runs (its `preflight_programs`, at the device shapes), exported for CUDA
on this machine, pulls each Triton kernel out of the exported module (the Triton IR that Pallas
serialises into the `__gpu$xla.gpu.triton` custom call, with its num_warps / num_stages), and
compiles it for sm_90a with the `triton` package (TTIR -> TTGIR -> LLVM IR -> PTX, then ptxas -v),
reporting per kernel: shared memory (limit 232,448 bytes = 227 KiB per block on H100/H200),
registers per thread (limit 255), spill stores, and the atomic instructions in the PTX by form
(`atomics`, where there are any).

`--sweep` does the same for candidate backward tilings of flash attention (dQ and dK/dV blocks,
warps, pipeline stages) at seq 4096, head_dim 128, bf16, without and with the in-kernel RoPE of
the training step, and for the fused one-kernel backward (tuning "fused_backward") at each dK/dV
tile, so that the GPU run only times tilings that fit and do not spill
(benchmarks/gpu_suite.py, section `tiles`).

Caveat: XLA compiles these kernels with the Triton that is built into jaxlib's CUDA plugin, not
with the `triton` package; the passes are the same project's, but the versions differ, so the
numbers are a close estimate, not the device's own (docs/kernels.md compares them with the H100
run where it can).

Usage (no GPU, no driver; the triton wheel brings its own ptxas):
  pip install triton==3.9.0
  JAX_PLATFORMS=cpu python benchmarks/triton_sm90.py --out docs/results/triton_sm90.json --sweep
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TRITON_TARGET = "__gpu$xla.gpu.triton"
SMEM_LIMIT = 232448  # bytes of shared memory one block may use on sm_90 (227 KiB)
REG_LIMIT = 255


# ----------------------------------------------------------------------------------------------
# kernels out of exported programs (this part imports jax; the compile worker does not)


def _walk(op):
  yield op
  for region in op.regions:
    for block in region:
      for child in block:
        yield from _walk(child)


def triton_kernels(fn, args) -> list:
  """[{name, ttir (text), num_warps, num_stages, grid}] of the Triton kernels in `fn(*args)`,
  exported for CUDA (call it inside `kernels_pallas.lowering_platform("cuda")`)."""
  from jax import export
  from jax._src.interpreters import mlir
  from jax._src.lib import triton as jaxlib_triton
  from jaxlib.mlir import ir
  exp = export.export(fn, platforms=["cuda"],
                      disabled_checks=[export.DisabledSafetyCheck.custom_call(TRITON_TARGET)])
  text = exp(*args).mlir_module()
  ctx = mlir.make_ir_context()
  kernels = []
  with ctx:
    module = ir.Module.parse(text)
    for op in _walk(module.operation):
      if op.name != "stablehlo.custom_call":
        continue
      if ir.StringAttr(op.attributes["call_target_name"]).value != TRITON_TARGET:
        continue
      config = ir.DictAttr(op.attributes["mhlo.backend_config"])
      ttir = ir.StringAttr(config["ir"]).value_bytes
      kernels.append(dict(
          name=ir.StringAttr(config["name"]).value,
          ttir_bytecode=ttir,
          num_warps=ir.IntegerAttr(config["num_warps"]).value,
          num_stages=ir.IntegerAttr(config["num_stages"]).value,
          grid=[ir.IntegerAttr(config[f"grid_{a}"]).value for a in "xyz"]))
  tctx = ir.Context()
  jaxlib_triton.dialect.register_dialect(tctx)
  for k in kernels:  # bytecode -> text, which the triton package parses whatever its version
    with tctx:
      k["ttir"] = ir.Module.parse(k.pop("ttir_bytecode")).operation.get_asm()
  return kernels


def suite_kernels() -> list:
  """(section, program, kernel) for every Triton kernel of gpu_suite's full run."""
  sys.path.insert(0, str(ROOT / "benchmarks"))
  import flax.linen as nn
  import jax
  import gpu_suite
  import kernels_pallas
  out = []
  with kernels_pallas.lowering_platform("cuda"):
    for section, name, fn, args, *flags in gpu_suite.preflight_programs(gpu_suite.FULL):
      with gpu_suite.layers_flags(flags[0] if flags else {}):  # a train variant's switches
        if hasattr(fn, "jitted"):  # train.MeshJit
          with jax.set_mesh(fn.mesh), nn.logical_axis_rules(fn.rules):
            kernels = triton_kernels(fn.jitted, args)
        else:
          kernels = triton_kernels(fn, args)
      out += [(section, name, k) for k in kernels]
  return out


# Backward tilings tried by --sweep: (dq blocks, dkdv blocks) x warps x stages.
SWEEP_BLOCKS = [((64, 64), (64, 64)), ((128, 32), (32, 128)), ((128, 64), (64, 128)),
                ((64, 32), (32, 64)), ((128, 128), (128, 128))]
SWEEP_LAUNCH = [(4, 1), (4, 2), (4, 3), (8, 1), (8, 2), (8, 3)]


def sweep_kernels(seq=4096, heads=32, head_dim=128, tokens=16384, rope=False,
                  fused=False) -> list:
  """(tiling label, kernel) for the dQ and dK/dV kernels of every SWEEP_* combination; with
  `rope`, the kernels as the model's training step runs them (RoPE inside, positions and
  segment ids: benchmarks/attention.py make_fn); with `fused`, the one fused backward kernel
  (tuning "fused_backward") at each SWEEP_BLOCKS dK/dV tile."""
  sys.path.insert(0, str(ROOT / "benchmarks"))
  import jax
  import jax.numpy as jnp
  import attention as attn_bench
  import kernels_pallas
  attn_bench.BACKEND = "gpu"
  b = max(1, tokens // seq)
  x = jax.ShapeDtypeStruct((b, seq, heads, head_dim), jnp.bfloat16)
  ct = jax.ShapeDtypeStruct(x.shape, jnp.float32)
  out = []
  with kernels_pallas.lowering_platform("cuda"):
    for dq, dkdv in SWEEP_BLOCKS:
      for warps, stages in SWEEP_LAUNCH:
        tuning = {"blocks": {"dq": dq, "dkdv": dkdv},
                  "launch": {"bwd": {"num_warps": warps, "num_stages": stages}}}
        if fused:
          tuning["fused_backward"] = True
        f = attn_bench.make_fn("ours", causal=True, alibi=False, s=seq, h=heads, d=head_dim,
                               dtype=jnp.bfloat16, tuning=tuning, rope=rope)
        grad = attn_bench._grad_fn(f)  # pylint: disable=protected-access
        for k in triton_kernels(jax.jit(grad), (x, x, x, ct)):
          blocks = {"baichuan_flash_dq": dq, "baichuan_flash_dkdv": dkdv,
                    "baichuan_flash_bwd_fused": dkdv}.get(k["name"])
          if blocks is not None:
            tag = "rope, " if rope else "fused, " if fused else ""
            out.append((f"{tag}{blocks[0]}x{blocks[1]}, {warps} warps, {stages} stages", k))
  return out


# ----------------------------------------------------------------------------------------------
# compile (a subprocess that imports triton, not jax)


def compile_ttir(path: str, num_warps: int, num_stages: int) -> dict:
  """Compiles one TTIR file for sm_90a -> {shared, registers, spill_stores, ...}."""
  os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # XLA's Triton fuses multiply-adds
  import triton
  from triton._C.libtriton import ir
  from triton.backends.compiler import GPUTarget
  from triton.backends.nvidia.compiler import get_ptxas
  from triton.compiler.compiler import IRSource, make_backend
  target = GPUTarget("cuda", 90, 32)
  backend = make_backend(target)
  ctx = ir.context()
  ir.load_dialects(ctx)
  backend.load_dialects(ctx)
  src = IRSource(path, ctx, backend)
  options = backend.parse_options(dict(num_warps=num_warps, num_stages=num_stages))
  stages = {}
  backend.add_stages(stages, options, src.language)
  module = src.make_ir(target, options, backend.get_codegen_implementation(options),
                       backend.get_module_map(), ctx)
  metadata = {"target": target, **options.__dict__}
  for ext, step in stages.items():  # every stage from the TTIR passes on, up to PTX
    if ext == "cubin":
      break
    module = step(module, metadata)
  # atomic instructions in the PTX, by form (e.g. the fused backward's dQ adds): {op: count}
  atomics = dict(sorted(collections.Counter(
      re.findall(r"\b((?:atom|red)\.[\w.]+)", module)).items()))
  from gpu_aot import ptxas_ptx  # benchmarks/gpu_aot.py (imports no jax at module level)
  with tempfile.TemporaryDirectory() as d:
    Path(d, "k.ptx").write_text(module)
    entry = ptxas_ptx(Path(d, "k.ptx"), get_ptxas(target.arch).path)[0]  # one entry function
  if "error" in entry:
    raise RuntimeError(f"ptxas failed: {entry['error']}")
  return dict(shared_bytes=int(metadata["shared"]), registers=entry["registers"],
              spill_store_bytes=entry.get("spill_store_bytes", 0),
              triton=triton.__version__, **({"atomics": atomics} if atomics else {}))


def _worker(job_json: str) -> dict:
  job = json.loads(job_json)
  try:
    return compile_ttir(job["path"], job["num_warps"], job["num_stages"])
  except Exception as e:  # pylint: disable=broad-except
    return {"error": f"{type(e).__name__}: {str(e)[:500]}"}


def compile_all(kernels: list, jobs: int = 2) -> list:
  """Compiles each distinct (TTIR, warps, stages) once, in `jobs` worker processes."""
  with tempfile.TemporaryDirectory() as d:
    unique = {}
    for k in kernels:
      key = hashlib.sha1(f"{k['ttir']}|{k['num_warps']}|{k['num_stages']}".encode()).hexdigest()
      if key not in unique:
        path = Path(d, f"{key}.ttir")
        path.write_text(k["ttir"])
        unique[key] = json.dumps(dict(path=str(path), num_warps=k["num_warps"],
                                      num_stages=k["num_stages"]))
      k["key"] = key
    cmd = [sys.executable, str(Path(__file__).resolve()), "--compile-worker"]
    results = {}

    def run(item):
      key, job = item
      proc = subprocess.run(cmd, input=job, capture_output=True, text=True, timeout=600,
                            check=False)
      try:
        return key, json.loads(proc.stdout.strip().splitlines()[-1])
      except (IndexError, json.JSONDecodeError):
        return key, {"error": f"worker exited {proc.returncode}: {proc.stderr[-500:]}"}

    with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
      for key, res in pool.map(run, unique.items()):
        results[key] = res
  rows = []
  for k in kernels:
    res = results[k.pop("key")]
    row = {kk: v for kk, v in k.items() if kk != "ttir"} | res
    if "error" not in res:
      row["fits"] = res["shared_bytes"] <= SMEM_LIMIT and res["registers"] <= REG_LIMIT
      row["spills"] = res["spill_store_bytes"] > 0
    rows.append(row)
  return rows


# ----------------------------------------------------------------------------------------------


def markdown(result: dict) -> str:
  out = [f"# Pallas GPU kernels compiled for sm_90a (triton {result.get('triton')}, on a CPU)", "",
         f"Shared memory limit {SMEM_LIMIT:,} bytes per block; registers {REG_LIMIT} per thread.",
         "", "| section | program | kernel | warps | stages | shared KiB | registers | "
         "spill bytes |", "|---|---|---|---|---|---|---|---|"]
  for r in result["suite"]:
    out.append(f"| {r['section']} | {r['program']} | {r['name']} | {r['num_warps']} | "
               f"{r['num_stages']} | " + _cells(r) + " |")
  if result.get("sweep"):
    out += ["", "## Backward tilings (seq 4096, head_dim 128, bf16; without and with in-kernel "
            "RoPE, and the fused backward)", "",
            "| kernel | tiling | shared KiB | registers | spill bytes |", "|---|---|---|---|---|"]
    for r in result["sweep"]:
      out.append(f"| {r['name']} | {r['tiling']} | " + _cells(r) + " |")
  return "\n".join(out) + "\n"


def _cells(r: dict) -> str:
  if "error" in r:
    return f"error: {r['error'][:60]} | - | -"
  return f"{r['shared_bytes'] / 1024:.0f} | {r['registers']} | {r['spill_store_bytes']}"


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--out", help="write the rows as JSON here (and a .md beside it)")
  p.add_argument("--sweep", action="store_true", help="also the candidate backward tilings")
  p.add_argument("--jobs", type=int, default=2, help="compile processes (default 2)")
  p.add_argument("--compile-worker", action="store_true", help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.compile_worker:  # one job as JSON on stdin, its result as JSON on stdout
    print(json.dumps(_worker(sys.stdin.read())))
    return None
  try:
    import importlib.metadata
    version = importlib.metadata.version("triton")
  except importlib.metadata.PackageNotFoundError:
    p.error("the triton package is not installed: pip install triton==3.9.0 (no GPU needed)")
  sys.path.insert(0, str(ROOT))
  seen, suite = set(), []
  for section, program, k in suite_kernels():
    key = (k["name"], k["ttir"], k["num_warps"], k["num_stages"])
    if key not in seen:  # the same kernel in several programs: reported at its first
      seen.add(key)
      suite.append(dict(k, section=section, program=program))
  result = dict(triton=version, smem_limit=SMEM_LIMIT, suite=compile_all(suite, args.jobs))
  if args.sweep:
    sweep = [dict(k, tiling=label) for rope, fused in ((False, False), (True, False),
                                                       (False, True))
             for label, k in sweep_kernels(rope=rope, fused=fused)]
    result["sweep"] = compile_all(sweep, args.jobs)
  md = markdown(result)
  print(md)
  if args.out:
    Path(args.out).write_text(json.dumps(result, indent=1))
    Path(args.out).with_suffix(".md").write_text(md)
  return result


if __name__ == "__main__":
  main()
