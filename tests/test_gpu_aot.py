"""benchmarks/gpu_aot.py: the GPU suite's programs compiled for the H200 (sm_90a) with no GPU.

The parsing and reporting are checked on hand-written inputs (ptxas's and XLA's own formats, as
they print them). The compile itself needs the CUDA plugin in `.aot-site/`
(`python benchmarks/gpu_aot.py --install`, which `.ci/run` does): with it, two of the suite's
programs are compiled in a subprocess and their buffer sizes checked against the byte counts of
their arguments, and a Triton kernel over the shared-memory limit must fail to compile.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_aot  # noqa: E402

# ptxas -v for sm_90a, as Mosaic's dump and the triton wheel's ptxas print it (two entries, the
# first with a wgmma warning and a spill warning before its entry line, the wgmma one again at
# the end, as ptxas 13.0 printed them for the two-warpgroup fused backward)
_C7512 = ("ptxas info    : (C7512) Potential Performance Loss: wgmma.mma_async instructions are "
          "serialized due to insufficient register resources for the function "
          "'body_mosaic_gpu_kernel'\n")
PTXAS_LOG = _C7512 + """\
ptxas info    : 0 bytes gmem
ptxas warning : Registers are spilled to local memory in function 'body_mosaic_gpu_kernel', \
84 bytes spill stores, 88 bytes spill loads
ptxas info    : Compiling entry function 'body_mosaic_gpu_kernel' for 'sm_90a'
ptxas info    : Function properties for body_mosaic_gpu_kernel
    88 bytes stack frame, 84 bytes spill stores, 88 bytes spill loads
ptxas info    : Used 168 registers, used 16 barriers, 88 bytes cumulative stack size, 1 bytes smem
ptxas info    : Compiling entry function 'baichuan_flash_dq' for 'sm_90a'
ptxas info    : Function properties for baichuan_flash_dq
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 231 registers
ptxas info    : Compile time = 135.626 ms
""" + _C7512


def test_parse_ptxas_reads_each_entry_function():
  assert gpu_aot.parse_ptxas(PTXAS_LOG) == [
      dict(function="body_mosaic_gpu_kernel", stack_bytes=88, spill_store_bytes=84,
           spill_load_bytes=88, registers=168, barriers=16,
           wgmma_serialized="C7512: insufficient register resources"),
      dict(function="baichuan_flash_dq", stack_bytes=0, spill_store_bytes=0,
           spill_load_bytes=0, registers=231)]
  assert gpu_aot.parse_ptxas("ptxas info    : 0 bytes gmem\n") == []


def test_a_kernel_is_flagged_for_spills_serialized_wgmma_or_an_error():
  rows = gpu_aot.parse_ptxas(PTXAS_LOG)
  assert gpu_aot.flagged(rows[0]) and not gpu_aot.flagged(rows[1])
  assert gpu_aot.flagged(dict(function="k", registers=90, wgmma_serialized="C7512: x"))
  assert gpu_aot.flagged(dict(function="k", spill_load_bytes=4))
  assert gpu_aot.flagged(dict(function="k", error="ptxas exit 1"))


def test_mma_counts_tells_hoppers_matmuls_from_the_older_form():
  # two k-steps of a wgmma and one warp-level mma, as XLA's Triton writes them for sm_90a
  ptx = textwrap.dedent("""\
      .visible .entry baichuan_flash_bwd_fused(
      \twgmma.fence.sync.aligned;
      \twgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%r1,%r2}, %rd1, %rd2, %p1, 1, 1, 0, 1;
      \twgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%r1,%r2}, %rd3, %rd4, %p2, 1, 1, 0, 1;
      \twgmma.commit_group.sync.aligned;
      \twgmma.wait_group.sync.aligned 0;
      \tmma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%f1,%f2,%f3,%f4}, {%r5,%r6}, {%r7}, {%f1};
      """)
  assert gpu_aot.mma_counts(ptx) == {"wgmma": 2, "mma.sync": 1}
  assert gpu_aot.mma_counts(".visible .entry baichuan_rms_norm_fwd(\n") == {"wgmma": 0,
                                                                           "mma.sync": 0}
  assert gpu_aot.flagged(dict(function="k", registers=90, mma={"wgmma": 2, "mma.sync": 1}))
  assert not gpu_aot.flagged(dict(function="k", registers=90, mma={"wgmma": 2, "mma.sync": 0}))
  # decode attention: a few query rows per program, mma.sync only, by design
  assert not gpu_aot.flagged(dict(function="k", registers=90, mma={"wgmma": 0, "mma.sync": 64}))


def test_worst_takes_the_most_registers_and_spill_bytes_over_kernels():
  rows = gpu_aot.parse_ptxas(PTXAS_LOG) + [dict(function="x", error="ptxas exit 1")]
  assert gpu_aot.worst(rows) == dict(registers=231, spill_bytes=84 + 88, wgmma_serialized=1)
  assert gpu_aot.worst([]) == {}


def test_kernel_counts_reads_an_optimized_gpu_program():
  hlo = textwrap.dedent("""\
      %fusion.1 = bf16[8]{0} fusion(bf16[8]{0} %p), kind=kLoop, calls=%fused_computation
      %custom-call.2 = (bf16[8]{0}) custom-call(%p), custom_call_target="__gpu$xla.gpu.triton"
      %custom-call.3 = (bf16[8]{0}) custom-call(%p), custom_call_target="__gpu$xla.gpu.triton"
      %custom-call.4 = (bf16[8]{0}) custom-call(%p), custom_call_target="mosaic_gpu_v2"
      %gemm = (bf16[8,8]{1,0}, s8[0]{0}) custom-call(%a, %b), custom_call_target="__cublas$lt$matmul"
      ROOT %input_fusion.5 = f32[] fusion(%q), kind=kInput, calls=%fused_reduce
      """)
  assert gpu_aot.kernel_counts(hlo) == dict(triton=2, mosaic=1, cublaslt=1, fusions=2)


def test_target_config_describes_the_h200_and_rejects_unknown_targets():
  text = gpu_aot.target_config("h200")
  assert f"device_memory_size: {143771 * 2**20}\n" in text  # nvidia-smi: 143,771 MiB
  assert "memory_bandwidth: 4800000000000\n" in text and '"NVIDIA H200"' in text
  assert "shared_memory_per_block_optin: 232448\n" in text and "major: 9\n" in text
  assert "84929347584" in gpu_aot.target_config("h100")
  with pytest.raises(ValueError, match=r"'b200'.*\['h100', 'h200'\]"):
    gpu_aot.target_config("b200")


def test_markdown_lists_failures_and_the_kernels_that_spill():
  ok = dict(section="check", program="flash alibi", ok=True, seconds=2.0,
            memory=dict(peak_bytes=3 * 2**30), kernels=dict(triton=3, fusions=8),
            triton_ptxas=gpu_aot.parse_ptxas(PTXAS_LOG))
  bad = dict(section="tiles", program="fused bwd 128x128", ok=False, seconds=1.0,
             error="JaxRuntimeError: RESOURCE_EXHAUSTED: Shared memory size limit exceeded")
  md = "\n".join(gpu_aot.markdown(dict(
      programs=[ok, bad], target_description="NVIDIA H200", jax="0.10.2", jaxlib="0.10.2",
      plugin="0.10.2", seconds=3.0, not_checked=["cuDNN"])))
  assert "1 of 2 programs compile" in md
  assert "| check | flash alibi | yes | 3.00 | triton 3, fusions 8 | 231 | 172 |" in md
  assert "| tiles | fused bwd 128x128 | NO: JaxRuntimeError: RESOURCE_EXHAUSTED" in md
  assert "| flash alibi | body_mosaic_gpu_kernel | 168 | 84 | 88 | 88 |" in md
  assert "| 231 | 172 | 1 |" in md  # one kernel of the program with its wgmma serialized
  assert "| 88 | serialized (C7512: insufficient register resources) | - |" in md


def test_main_explains_a_missing_plugin(tmp_path, capsys):
  with pytest.raises(SystemExit):
    gpu_aot.main(["--out", str(tmp_path), "--site", str(tmp_path / "none")])
  assert "no CUDA plugin there" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# the compile itself (needs the CUDA plugin of this jaxlib in .aot-site/)

needs_plugin = pytest.mark.skipif(
    not (gpu_aot.DEFAULT_SITE / "jax_plugins" / "xla_cuda13").is_dir()
    or gpu_aot.cuda_ptxas() is None,
    reason="no CUDA plugin in .aot-site/ (python benchmarks/gpu_aot.py --install), or no CUDA "
           "ptxas to compile with")


def _env():
  return {**os.environ, "JAX_PLATFORMS": "cpu",
          "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "benchmarks")])}


@needs_plugin
def test_suite_programs_compile_for_sm90a_with_their_buffer_sizes(tmp_path):
  proc = subprocess.run(
      [sys.executable, str(ROOT / "benchmarks" / "gpu_aot.py"), "--out", str(tmp_path),
       "--programs", "check: flash alibi", "mosaic fwd seq 4096"],
      capture_output=True, text=True, timeout=900, env=_env(), check=False)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  result = json.loads((tmp_path / "gpu_aot.json").read_text())
  rows = {r["program"]: r for r in result["programs"]}
  assert set(rows) == {"flash alibi", "mosaic fwd seq 4096"} and result["ok"]
  # check shapes: q, ct (2, 1000, 8, 128) and k, v (2, 1000, 2, 128) in bf16 -> (o, dq, dk, dv)
  q, kv = 2 * 1000 * 8 * 128 * 2, 2 * 1000 * 2 * 128 * 2
  flash = rows["flash alibi"]
  # + the 8 heads' fp32 ALiBi slopes where the export passes the closed-over constant as an
  # argument (jax 0.10 does)
  assert flash["memory"]["argument_bytes"] - (2 * q + 2 * kv) in (0, 8 * 4)
  # (o, dq, dk, dv) + the output tuple's table of 4 device pointers (8 bytes each)
  assert flash["memory"]["output_bytes"] == 2 * q + 2 * kv + 4 * 8
  assert flash["kernels"]["triton"] == 3  # forward, dQ, dK/dV
  names = sorted(r["function"] for r in flash["triton_ptxas"])
  assert names == ["baichuan_flash_dkdv", "baichuan_flash_dq", "baichuan_flash_fwd"], names
  assert all(0 < r["registers"] <= 255 for r in flash["triton_ptxas"])
  # ptxas keeps each kernel's wgmma instructions in flight: before the forward ran its
  # straddling key blocks first, ptxas serialized all of its wgmmas (C7515)
  assert [r["function"] for r in flash["triton_ptxas"] if "wgmma_serialized" in r] == []
  # ... and every matmul of the three is a wgmma (each kernel's PTX has some, none mma.sync)
  assert all(r["mma"]["wgmma"] > 0 and r["mma"]["mma.sync"] == 0 for r in flash["triton_ptxas"])
  # the Mosaic forward: (4, 4096, 32, 128) bf16 in (q, k, v) and out, compiled to sm_90a by ptxas
  x = 4 * 4096 * 32 * 128 * 2
  mosaic = rows["mosaic fwd seq 4096"]
  assert mosaic["memory"]["argument_bytes"] == 3 * x and mosaic["kernels"]["mosaic"] == 1
  assert mosaic["memory"]["output_bytes"] == x  # one array out: no tuple
  [kernel] = mosaic["mosaic_ptxas"]
  assert kernel["function"] == "baichuan_flash_mgpu_fwd_mosaic_gpu_kernel"
  assert 0 < kernel["registers"] <= 255 and "spill_store_bytes" in kernel
  assert kernel["mma"]["wgmma"] > 0 and kernel["mma"]["mma.sync"] == 0
  assert "| attention mosaic | mosaic fwd seq 4096 | yes |" in (tmp_path / "gpu_aot.md").read_text()


@needs_plugin
def test_a_triton_kernel_over_the_shared_memory_limit_does_not_compile():
  # A 1024 x 1024 x 1024 dot in one block needs 4 MiB of shared memory; sm_90 has 227 KiB.
  script = textwrap.dedent(f"""\
      import sys
      sys.path.insert(0, {str(gpu_aot.DEFAULT_SITE)!r})
      import jax, jax.numpy as jnp
      from jax.experimental import pallas as pl
      from jax.experimental.pallas import triton as plgpu
      import gpu_aot
      devices = gpu_aot.compile_only_devices("h200")
      s = jax.sharding.NamedSharding(jax.sharding.Mesh(devices, ("d",)), jax.sharding.PartitionSpec())
      def kernel(x, y, o):
        o[...] = jnp.dot(x[...], y[...], preferred_element_type=jnp.float32)
      def f(n):
        return jax.jit(lambda x, y: pl.pallas_call(
            kernel, out_shape=jax.ShapeDtypeStruct((n, n), jnp.float32),
            compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=2))(x, y)).lower(
                *[jax.ShapeDtypeStruct((n, n), jnp.bfloat16, sharding=s)] * 2).compile()
      f(64)
      print("64 compiled")
      try:
        f(1024)
      except Exception as e:
        print("1024 failed:", e)
      """)
  proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                        timeout=600, env=_env(), check=False)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  assert "64 compiled" in proc.stdout
  assert "1024 failed:" in proc.stdout and "Shared memory size limit exceeded" in proc.stdout
