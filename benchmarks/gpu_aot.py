"""Compiles every program of the GPU suite for an H200 (sm_90a) on a machine with no GPU.

`gpu_suite.py --preflight` stops at the StableHLO: it lowers each program for CUDA but cannot see
what happens when XLA compiles it on the device. This script goes on from there with XLA's own
deviceless GPU compiler, the one in the CUDA PJRT plugin (`jax-cuda13-pjrt`,
`jax-cuda13-plugin`), given a description of the target GPU instead of a GPU
(`jax.experimental.topologies.get_topology_desc("cuda", target_config=...)`). For each program
of the full run, at the device shapes, that means:

- XLA's GPU pipeline for sm_90: fusion, layout, scheduling, buffer assignment (autotuning is off
  without a device, so XLA's tiling heuristics stand in for it);
- every Pallas Triton kernel through Triton to PTX and cubin (shared memory over the 227 KiB
  limit, for example, is a compile error here, as on the device);
- every Mosaic GPU kernel through Mosaic's own MLIR pipeline to PTX and ptxas, which happens in
  XLA's custom call and which nothing else reaches without a GPU;
- the program's memory (arguments, outputs, temporaries) against the target's device memory.

It records, per program: whether it compiled (or the error), the compile time, the memory, the
kernels in the optimized program, and each kernel's ptxas figures for sm_90a (registers, spill
bytes, stack): the Mosaic kernels' from Mosaic's own ptxas run (`MOSAIC_GPU_DUMP_PTXAS`), the
Triton kernels' by running ptxas (the `triton` wheel's) on the PTX that XLA wrote
(`--xla_dump_to`). Spills are what a kernel pays for in local memory traffic: the figures say
which variants the device run should expect to be slow before it starts.

What it cannot see: cuDNN (its graphs are built by the installed cuDNN on the device, so the
cuDNN programs are left out), timings, and the autotuned choices XLA makes on the device. XLA
and Mosaic GPU compile their PTX with the CUDA toolkit's ptxas, which must be on the machine
($CUDA_ROOT/bin, PATH or /usr/local/cuda/bin).

The plugin must be the same version as jaxlib and must not be importable by the process that
runs the tests (it would make jax look for a GPU); `--install` puts it in a folder of its own:

  python benchmarks/gpu_aot.py --install      # pip into .aot-site/ (130 MB down, 400 MB there)
  python benchmarks/gpu_aot.py --out /tmp/aot # all 67 programs: 5 min on 2 cores (7.5 on jax 0.11)
  python benchmarks/gpu_aot.py --out /tmp/aot --programs "mosaic fwd+bwd" "flash alibi"

Writes `gpu_aot.json` and `gpu_aot.md`; exit status 1 if a program does not compile.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SITE = ROOT / ".aot-site"

# What XLA's deviceless compiler is told about the GPU (a GpuTargetConfigProto). Common to the
# H100 SXM and the H200 (the same GH100 die): 132 SMs, 1.98 GHz boost, 227 KiB of shared memory
# per block (232,448 bytes opt-in; 228 KiB per SM), 64 Ki 32-bit registers per SM and per
# block, 50 MiB of L2. They differ in memory: the H200 has 141 GB of HBM3e at 4.8 TB/s
# (nvidia-smi: 143,771 MiB), the H100 80 GB of HBM3 at 3.35 TB/s (84,929,347,584 bytes).
TARGETS = {
    "h200": dict(description="NVIDIA H200", memory_bytes=143771 * 2**20,
                 bandwidth=4_800_000_000_000),
    "h100": dict(description="NVIDIA H100 80GB HBM3", memory_bytes=84_929_347_584,
                 bandwidth=3_352_320_000_000),
}


def target_config(target: str) -> str:
  """The GpuTargetConfigProto (text format) of one of `TARGETS`."""
  if target not in TARGETS:
    raise ValueError(f"target {target!r}: must be one of {sorted(TARGETS)}")
  t = TARGETS[target]
  return f"""gpu_device_info {{
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: 233472
  threads_per_core_limit: 2048
  core_count: 132
  fpus_per_core: 128
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: {t['bandwidth']}
  l2_cache_size: 52428800
  clock_rate_ghz: 1.98
  device_memory_size: {t['memory_bytes']}
  shared_memory_per_block_optin: 232448
  cuda_compute_capability {{
    major: 9
  }}
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}}
platform_name: "CUDA"
dnn_version_info {{
  major: 9
  minor: 10
}}
device_description_str: "{t['description']}"
"""


# ----------------------------------------------------------------------------------------------
# ptxas -v output


_ENTRY = re.compile(r"Compiling entry function '([^']+)'")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers(?:, used (\d+) barriers)?")
# ptxas's "(C75xx) Potential Performance Loss" warnings: it could not keep a kernel's wgmma
# instructions in flight together and waits for each one before the next (a Hopper kernel's
# matmuls then lose their overlap: the register-file form, C7512, is what a kernel holding more
# accumulators than the registers allow gets).
_SERIAL = re.compile(r"\((C75\d\d)\) Potential Performance Loss: wgmma\.mma_async instructions are "
                     r"serialized due to (.+?),? (?:for|in) the function '([^']+)'")


def parse_ptxas(log: str) -> list:
  """`ptxas -v` output -> one dict per entry function, in order: {function, registers,
  barriers, stack_bytes, spill_store_bytes, spill_load_bytes} (a figure ptxas did not print is
  left out), and `wgmma_serialized` ("C7512: insufficient register resources") where ptxas
  warned that it serialized the function's wgmma instructions."""
  out, serial = [], {}
  for line in log.splitlines():
    if m := _SERIAL.search(line):
      serial[m.group(3)] = f"{m.group(1)}: {m.group(2)}"
    elif m := _ENTRY.search(line):
      out.append(dict(function=m.group(1)))
    elif out and (m := _FRAME.search(line)):
      out[-1].update(stack_bytes=int(m.group(1)), spill_store_bytes=int(m.group(2)),
                     spill_load_bytes=int(m.group(3)))
    elif out and (m := _USED.search(line)):
      out[-1]["registers"] = int(m.group(1))
      if m.group(2) is not None:
        out[-1]["barriers"] = int(m.group(2))
  for row in out:
    if row["function"] in serial:
      row["wgmma_serialized"] = serial[row["function"]]
  return out


def mma_counts(ptx: str) -> dict:
  """The tensor-core instructions in a kernel's PTX, by form: {"wgmma": Hopper's asynchronous
  warpgroup matmuls, "mma.sync": the synchronous warp-level form of earlier GPUs, which sm_90
  runs at a fraction of wgmma's rate}. Triton picks per dot: a dot whose tile the wgmma shapes
  do not fit (fewer than 64 rows per warpgroup, say) falls back to mma.sync."""
  return {"wgmma": len(re.findall(r"\bwgmma\.mma_async\.", ptx)),
          "mma.sync": len(re.findall(r"\bmma\.sync\.aligned\.", ptx))}


def ptxas_path() -> str:
  """The ptxas of the `triton` wheel (the one benchmarks/triton_sm90.py uses)."""
  from triton.backends.nvidia.compiler import get_ptxas
  return get_ptxas(90).path


def ptxas_ptx(path: Path, ptxas: str) -> list:
  """ptxas -v for sm_90a on one PTX file -> parse_ptxas rows, or one {function, error} row
  (benchmarks/triton_sm90.py runs its PTX through this too)."""
  with tempfile.TemporaryDirectory() as d:
    proc = subprocess.run([ptxas, "-v", "--gpu-name=sm_90a", str(path), "-o",
                           str(Path(d, "k.cubin"))], capture_output=True, text=True, check=False)
  log = proc.stderr + proc.stdout
  if proc.returncode:
    return [dict(function=path.name, error=f"ptxas exit {proc.returncode}: {log[-500:]}")]
  return parse_ptxas(log)


def with_mma(rows: list, ptx: str) -> list:
  """`rows` of one PTX file's kernels, the one kernel's given its tensor-core instructions
  (`mma_counts`) when the file holds one, as XLA's Triton and Mosaic write them."""
  if len(rows) == 1 and "error" not in rows[0]:
    rows[0]["mma"] = mma_counts(ptx)
  return rows


# ----------------------------------------------------------------------------------------------
# the compiled program


KERNEL_KINDS = (("triton", 'custom_call_target="__gpu$xla.gpu.triton"'),
                ("mosaic", 'custom_call_target="mosaic_gpu_v2"'),
                ("cublas", 'custom_call_target="__cublas$gemm"'),
                ("cublaslt", 'custom_call_target="__cublas$lt$matmul"'),
                ("cudnn", 'custom_call_target="__cudnn$'))


def kernel_counts(hlo_text: str) -> dict:
  """Kernels in an optimized GPU program's HLO text (its entry computation and what it calls):
  custom calls by kind and fusions (each fusion is one kernel launch, bar the ones XLA turns
  into library calls)."""
  counts = {kind: hlo_text.count(pattern) for kind, pattern in KERNEL_KINDS}
  counts["fusions"] = len(re.findall(r"= [^=\n]*\bfusion\(", hlo_text))
  return {k: v for k, v in counts.items() if v}


def memory_row(compiled, device_bytes: int) -> dict:
  """The compiled program's buffer sizes (bytes) and its peak against the device memory."""
  ma = compiled.memory_analysis()
  row = dict(argument_bytes=ma.argument_size_in_bytes, output_bytes=ma.output_size_in_bytes,
             alias_bytes=ma.alias_size_in_bytes, temp_bytes=ma.temp_size_in_bytes,
             code_bytes=ma.generated_code_size_in_bytes)
  row["peak_bytes"] = (row["argument_bytes"] + row["output_bytes"] - row["alias_bytes"]
                       + row["temp_bytes"])
  row["peak_fraction"] = round(row["peak_bytes"] / device_bytes, 4)
  return row


def compile_only_devices(target: str):
  import jax
  from jax.experimental import topologies
  try:
    topo = topologies.get_topology_desc("aot", "cuda", target_config=target_config(target),
                                        topology="1x1x1")
  except Exception as e:  # pylint: disable=broad-except
    raise RuntimeError(
        f"no deviceless CUDA compiler ({type(e).__name__}: {str(e)[:300]}): install the CUDA "
        f"plugin of jax {jax.__version__} with `python benchmarks/gpu_aot.py --install` and pass "
        f"--site (default {DEFAULT_SITE})") from e
  return topo.devices


def aot_compile(exp, devices):
  """Compiles an `jax.export.Exported` (single-device) for the compile-only `devices`."""
  import jax
  sharding = jax.sharding.NamedSharding(jax.sharding.Mesh(devices, ("d",)),
                                        jax.sharding.PartitionSpec())
  leaves = [jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding) for a in exp.in_avals]
  args, kwargs = jax.tree.unflatten(exp.in_tree, leaves)
  return jax.jit(exp.call).trace(*args, **kwargs).lower().compile()


def _new_files(folder: Path, seen: set, suffix: str) -> list:
  new = sorted(p for p in folder.rglob(f"*{suffix}") if p not in seen)
  seen.update(new)
  return new


def compile_program(exp, devices, device_bytes, dumps, ptxas) -> dict:
  """One program: compiled, then its memory, kernels and the ptxas figures of the kernels
  compiled for it (a Mosaic kernel compiled earlier in this process is not compiled again)."""
  mosaic_dir, xla_dir, seen = dumps
  os.environ["MOSAIC_GPU_DUMP_TO"] = str(mosaic_dir)
  compiled = aot_compile(exp, devices)
  row = dict(ok=True, memory=memory_row(compiled, device_bytes),
             kernels=kernel_counts(compiled.as_text()))
  mosaic = []  # Mosaic's dumps are <kernel name>_<n>.ptxas, n counting up in compile order
  for f in sorted(_new_files(mosaic_dir, seen, ".ptxas"), key=lambda f: _counter(f.stem)):
    rows = [dict(r, kernel=f.stem) for r in parse_ptxas(f.read_text())]
    ptx = f.with_suffix(".ptx")
    mosaic += with_mma(rows, ptx.read_text()) if ptx.is_file() else rows
  triton = []
  if ptxas:
    for f in _new_files(xla_dir, seen, ".ptx"):
      # XLA's own fusions are not the project's: the Pallas kernels' entries carry their names
      if re.search(r"\.entry (baichuan_|pallas_)", text := f.read_text()):
        triton += [r for r in with_mma(ptxas_ptx(f, ptxas), text)
                   if r.get("error") or r["function"].startswith(("baichuan_", "pallas_"))]
  if mosaic:
    row["mosaic_ptxas"] = mosaic
  if triton:
    row["triton_ptxas"] = triton
  return row


def _counter(stem: str) -> int:
  tail = stem.rsplit("_", 1)[-1]
  return int(tail) if tail.isdigit() else -1


def worst(rows: list) -> dict:
  """The most registers and spill bytes over a program's kernels, and how many of them had
  their wgmma instructions serialized."""
  rows = [r for r in rows if "registers" in r]
  if not rows:
    return {}
  return dict(registers=max(r["registers"] for r in rows),
              spill_bytes=max(r.get("spill_store_bytes", 0) + r.get("spill_load_bytes", 0)
                              for r in rows),
              wgmma_serialized=sum("wgmma_serialized" in r for r in rows))


def flagged(row: dict) -> bool:
  """A kernel to look at: it spills, ptxas serialized its wgmma instructions, some of its
  matmuls fell back to mma.sync beside wgmma ones, or ptxas failed. A kernel with mma.sync
  alone is not flagged: its tiles are below wgmma's 64 rows by design (decode attention's few
  query rows per program, a memory-bound kernel)."""
  mma = row.get("mma", {})
  return bool(row.get("spill_store_bytes") or row.get("spill_load_bytes") or row.get("error")
              or row.get("wgmma_serialized") or (mma.get("mma.sync") and mma.get("wgmma")))


def _mma_text(row: dict) -> str:
  if "mma" not in row:
    return "-"
  return ", ".join(f"{k} {v}" for k, v in row["mma"].items() if v) or "none"


def run(out: Path, target="h200", programs=(), ptxas=True) -> dict:
  """Compiles the preflight programs (those whose name holds one of `programs`, all if empty)
  for `target`; writes gpu_aot.json / .md under `out`."""
  import jax
  import gpu_suite  # benchmarks/gpu_suite.py
  import kernels_pallas
  out.mkdir(parents=True, exist_ok=True)
  devices = compile_only_devices(target)
  device_bytes = TARGETS[target]["memory_bytes"]
  ptxas_bin = ptxas_path() if ptxas else None
  dump = Path(os.environ["BAICHUAN_AOT_DUMP"])
  mosaic_dir, xla_dir = dump / "mosaic", dump / "xla"
  mosaic_dir.mkdir(parents=True, exist_ok=True)  # else Mosaic prints its dumps to stdout
  rows, seen, t_start = [], set(), time.perf_counter()
  with kernels_pallas.lowering_platform("cuda"):
    progs = gpu_suite.preflight_programs(gpu_suite.FULL)
    for section, name, fn, args, *flags in progs:
      if programs and not any(p in f"{section}: {name}" for p in programs):
        continue
      t0 = time.perf_counter()
      row = dict(section=section, program=name)
      try:
        exp = gpu_suite.export_program(fn, args, flags[0] if flags else {})
        row.update(compile_program(exp, devices, device_bytes, (mosaic_dir, xla_dir, seen),
                                   ptxas_bin))
      except Exception as e:  # pylint: disable=broad-except
        row.update(ok=False, error=f"{type(e).__name__}: {str(e)[:2000]}")
      row["seconds"] = round(time.perf_counter() - t0, 2)
      rows.append(row)
      print(progress_line(row), flush=True)
  if not rows:
    raise ValueError(f"--programs {list(programs)}: no program of the suite matches")
  import jaxlib
  result = dict(ok=all(r["ok"] for r in rows), target=target,
                target_description=TARGETS[target]["description"], jax=jax.__version__,
                jaxlib=jaxlib.__version__, plugin=plugin_version(),
                seconds=round(time.perf_counter() - t_start, 1), programs=rows,
                not_checked=["cuDNN attention (built by the installed cuDNN on the device)",
                             "timings, and XLA's autotuned choices (no autotuning without a GPU)"])
  (out / "gpu_aot.json").write_text(json.dumps(result, indent=1))
  (out / "gpu_aot.md").write_text("\n".join(markdown(result)) + "\n")
  return result


def progress_line(row: dict) -> str:
  if not row["ok"]:
    return f"aot FAIL {row['section']}: {row['program']} ({row['seconds']:.1f} s)\n  " \
           + row["error"][:600]
  m, w = row["memory"], worst(row.get("mosaic_ptxas", []) + row.get("triton_ptxas", []))
  extra = (f", max {w['registers']} registers, {w['spill_bytes']} spill bytes"
           + (f", {w['wgmma_serialized']} with wgmma serialized" if w["wgmma_serialized"] else "")
           if w else "")
  return (f"aot ok   {row['section']}: {row['program']} ({row['seconds']:.1f} s, peak "
          f"{m['peak_bytes'] / 2**30:.2f} GiB, kernels {row['kernels']}{extra})")


def plugin_version() -> str | None:
  """The installed CUDA PJRT plugin's version, from its dist-info (its module's own version
  string takes the git commit of the working directory)."""
  import importlib.metadata
  try:
    return importlib.metadata.version("jax-cuda13-pjrt")
  except importlib.metadata.PackageNotFoundError:
    return None


def markdown(result: dict) -> list:
  rows = result["programs"]
  md = [f"# gpu_aot: the suite's programs compiled for the {result['target_description']} "
        "(sm_90a) on a CPU machine", "",
        f"jax {result['jax']}, jaxlib {result['jaxlib']}, CUDA plugin {result['plugin']}; "
        f"{sum(r['ok'] for r in rows)} of {len(rows)} programs compile "
        f"({result['seconds']:.0f} s). Not checked: {'; '.join(result['not_checked'])}.", "",
        "| section | program | compiles | peak GiB | kernels | max registers | spill bytes | "
        "wgmma serialized |",
        "|---|---|---|---|---|---|---|---|"]
  for r in rows:
    if not r["ok"]:
      md.append(f"| {r['section']} | {r['program']} | NO: {r['error'][:160]} | | | | | |")
      continue
    w = worst(r.get("mosaic_ptxas", []) + r.get("triton_ptxas", []))
    kernels = ", ".join(f"{k} {v}" for k, v in r["kernels"].items())
    md.append(f"| {r['section']} | {r['program']} | yes | {r['memory']['peak_bytes'] / 2**30:.2f}"
              f" | {kernels} | {w.get('registers', '-')} | {w.get('spill_bytes', '-')} | "
              f"{w.get('wgmma_serialized', '-')} |")
  to_look_at = [(r["program"], k) for r in rows for k in
                r.get("mosaic_ptxas", []) + r.get("triton_ptxas", []) if flagged(k)]
  if to_look_at:
    md += ["", "Kernels that spill registers, have their wgmma instructions serialized (ptxas -v, "
           "sm_90a) or mix mma.sync with wgmma (their PTX):", "",
           "| program | kernel | registers | spill stores | spill loads | stack | wgmma | "
           "matmul instructions in the PTX |",
           "|---|---|---|---|---|---|---|---|"]
    md += [f"| {p} | {k.get('kernel', k['function'])} | {k.get('registers', '-')} | "
           f"{k.get('spill_store_bytes', '-')} | {k.get('spill_load_bytes', '-')} | "
           f"{k.get('stack_bytes', k.get('error', '-'))} | "
           f"{'serialized (' + k['wgmma_serialized'] + ')' if k.get('wgmma_serialized') else '-'}"
           f" | {_mma_text(k)} |" for p, k in to_look_at]
  return md


# ----------------------------------------------------------------------------------------------
# command line


def cuda_ptxas() -> str | None:
  """The CUDA toolkit's ptxas that XLA and Mosaic GPU compile with ($CUDA_ROOT/bin, then PATH,
  then /usr/local/cuda/bin), or None."""
  root = os.environ.get("CUDA_ROOT")
  candidates = ([Path(root, "bin", "ptxas")] if root else []) + [shutil.which("ptxas"),
                                                                   "/usr/local/cuda/bin/ptxas"]
  return next((str(c) for c in candidates if c and Path(c).is_file()), None)


def install(site: Path) -> None:
  """pip-installs the CUDA plugin of the installed jaxlib's version into `site`."""
  import jaxlib
  v = jaxlib.__version__
  cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--upgrade", "--target",
         str(site), f"jax-cuda13-plugin=={v}", f"jax-cuda13-pjrt=={v}"]
  print(" ".join(cmd), flush=True)
  subprocess.run(cmd, check=True)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--out", help="folder for gpu_aot.json / gpu_aot.md")
  p.add_argument("--target", default="h200", choices=sorted(TARGETS),
                 help="the GPU described to the compiler (default h200)")
  p.add_argument("--programs", nargs="*", default=[],
                 help="only programs whose 'section: name' holds one of these strings")
  p.add_argument("--site", default=str(DEFAULT_SITE),
                 help=f"folder holding the CUDA plugin (default {DEFAULT_SITE})")
  p.add_argument("--no-ptxas", action="store_true",
                 help="skip ptxas on the Triton kernels' PTX (Mosaic's figures stay)")
  p.add_argument("--install", action="store_true",
                 help="pip-install the CUDA plugin matching jaxlib into --site, then exit")
  args = p.parse_args(argv)
  site = Path(args.site)
  if args.install:
    install(site)
    return None
  if not args.out:
    p.error("--out is required (unless --install)")
  if not (site / "jax_plugins" / "xla_cuda13").is_dir():
    p.error(f"--site {site}: no CUDA plugin there (jax_plugins/xla_cuda13); run "
            f"`python benchmarks/gpu_aot.py --install --site {site}` first")
  if cuda_ptxas() is None:
    p.error("no CUDA ptxas ($CUDA_ROOT/bin, PATH or /usr/local/cuda/bin): XLA and Mosaic GPU "
            "compile their PTX with it (the CUDA toolkit, or pip's nvidia-cuda-nvcc with "
            "CUDA_ROOT set to its folder)")
  if "jax" in sys.modules:
    p.error("gpu_aot.main must run before jax is imported (it sets XLA_FLAGS and the plugin "
            "path): run it as a script")
  # Before jax starts: the plugin on the path, no GPU client, XLA writing each module's PTX.
  sys.path.insert(0, str(site))
  # XLA's and Mosaic's dumps (~1 GB for the whole suite): a temporary folder unless one is set
  keep_dump = "BAICHUAN_AOT_DUMP" in os.environ
  dump = os.environ.setdefault("BAICHUAN_AOT_DUMP", tempfile.mkdtemp(prefix="aot_dump_"))
  os.environ["JAX_PLATFORMS"] = "cpu"
  os.environ["MOSAIC_GPU_DUMP_PTXAS"] = "1"
  # jax >= 0.11's XLA writes a module's PTX only for the emitters this matches (0.10's always)
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" --xla_dump_to={dump}/xla"
                             " --xla_dump_emitter_re=ptx").strip()
  sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]
  try:
    result = run(Path(args.out), args.target, args.programs, ptxas=not args.no_ptxas)
  finally:
    if not keep_dump:
      shutil.rmtree(dump, ignore_errors=True)
  print("\n".join(markdown(result)))
  if not result["ok"]:
    sys.exit(1)
  return result


if __name__ == "__main__":
  main()
