"""Flash attention kernels against the plain jnp reference: outputs and dq/dk/dv.

Both kernel families run on CPU in Pallas interpret mode: the Triton-style GPU kernels
(`backend="interpret"`) and the Mosaic-style TPU kernels (`backend="tpu_interpret"`). The lowering
tests lower forward+backward for CUDA (Triton) and TPU (Mosaic) on this CPU machine, which checks
the rules those compilers impose (power-of-two Triton shapes, Mosaic tiling) without hardware.
Tests marked gpu/tpu run the compiled kernels and are skipped without the device.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

import kernels_pallas
from baichuan_jax.model.positions import alibi_slopes
from kernels_pallas import attention_reference, flash_attention

TOL = {jnp.float32: 2e-5, jnp.bfloat16: 6e-2}


pytestmark = pytest.mark.usefixtures("lower_triton_for_an_h200")  # tests/conftest.py


def _inputs(b, s, h, hkv, d, dtype, seed=0):
  kq, kk, kv = jax.random.split(jax.random.PRNGKey(seed), 3)
  q = jax.random.normal(kq, (b, s, h, d), jnp.float32).astype(dtype)
  k = jax.random.normal(kk, (b, s, hkv, d), jnp.float32).astype(dtype)
  v = jax.random.normal(kv, (b, s, hkv, d), jnp.float32).astype(dtype)
  return q, k, v


def _packed_segments(b, s, seed=0):
  """Random document boundaries per row, ids 1.. with a zero-id padded tail on the last row."""
  rng = np.random.default_rng(seed)
  seg = np.zeros((b, s), np.int32)
  for r in range(b):
    cuts = np.sort(rng.choice(np.arange(1, s), size=3, replace=False))
    seg[r] = np.searchsorted(cuts, np.arange(s), side="right") + 1
  seg[-1, s - s // 5:] = 0
  return jnp.asarray(seg)


def _positions(seg):
  """Positions restarting at 0 in every segment (as the packed data loader produces)."""
  seg = np.asarray(seg)
  pos = np.zeros_like(seg)
  for r in range(seg.shape[0]):
    for i in range(1, seg.shape[1]):
      pos[r, i] = pos[r, i - 1] + 1 if seg[r, i] == seg[r, i - 1] else 0
  return jnp.asarray(pos)


def _check(backend, *, b=1, s=128, h=2, hkv=None, d=64, dtype=jnp.float32, causal=True,
           alibi=False, segments=False, positions=False, **blocks):
  """Kernel vs the fp32 jnp reference on fresh random inputs: output and dq/dk/dv."""
  hkv = hkv or h
  q, k, v = _inputs(b, s, h, hkv, d, dtype)
  kw = dict(causal=causal)
  if alibi:
    kw["alibi_slopes"] = jnp.asarray(alibi_slopes(h))
  if segments:
    kw["segment_ids"] = _packed_segments(b, s)
  if positions:
    kw["positions"] = _positions(kw["segment_ids"])
  # A fixed random cotangent so every output element matters to the gradients.
  ct = jax.random.normal(jax.random.PRNGKey(7), q.shape, jnp.float32)

  def loss(fn, q, k, v):
    return jnp.sum(fn(q, k, v).astype(jnp.float32) * ct)

  kern = lambda q, k, v: flash_attention(q, k, v, backend=backend, **kw, **blocks)
  ref = lambda q, k, v: attention_reference(q.astype(jnp.float32), k.astype(jnp.float32),
                                            v.astype(jnp.float32), **kw)

  @jax.jit
  def run(q, k, v):  # one compile for the forward and the backward kernels
    o, vjp = jax.vjp(kern, q, k, v)
    return o, vjp(ct.astype(o.dtype))

  o, grads = run(q, k, v)
  o_ref, vjp_ref = jax.vjp(ref, q, k, v)
  grads_ref = vjp_ref(ct)
  assert o.shape == q.shape and o.dtype == q.dtype
  tol = TOL[dtype]
  np.testing.assert_allclose(np.asarray(o, np.float32), np.asarray(o_ref), atol=tol, rtol=tol)
  for name, g, gr in zip("qkv", grads, grads_ref):
    assert g.shape == gr.shape and g.dtype == dtype, name
    scale = max(1.0, float(jnp.max(jnp.abs(gr))))
    np.testing.assert_allclose(np.asarray(g, np.float32) / scale, np.asarray(gr) / scale,
                               atol=tol, rtol=tol, err_msg=f"d{name}")


# Four interpret-mode cases per kernel family cover causal / non-causal, no bias / ALiBi (40 heads),
# packed segments with restarting positions, GQA / MQA, ragged lengths 300 and 1000, head_dim 64 /
# 128, fp32 (tight) / bf16 (loose). Each case costs mostly the compile of three kernels (forward,
# dQ, dK/dV), so features are combined rather than tested one per case.
def test_gpu_kernels_causal_no_bias_multi_block():
  # 4 x 4 blocks: online softmax across key blocks, skipped blocks above the diagonal.
  _check("interpret", s=128, h=1, block_q=32, block_k=32)


def test_gpu_kernels_alibi_40_heads_gqa_packed_ragged_300():
  # Baichuan-13B head count (32 slopes 2^(-k/4), then the interleaved 2^(-k/8) ones), 40:8 GQA,
  # packed documents whose ALiBi distances restart with their positions, 300 -> 320 padding.
  _check("interpret", s=300, h=40, hkv=8, d=64, alibi=True, segments=True, positions=True,
         block_q=64, block_k=64)


def test_gpu_kernels_bf16_non_causal_mqa_ragged_1000():
  # Non-causal over a padded tail (1000 -> 1024): padded keys must be masked explicitly.
  _check("interpret", s=1000, h=2, hkv=1, d=128, dtype=jnp.bfloat16, alibi=True, causal=False,
         block_q=128, block_k=128)


def test_tpu_kernels_causal_alibi_gqa_packed_ragged_300():
  _check("tpu_interpret", s=300, h=4, hkv=2, d=128, alibi=True, segments=True, positions=True)


def test_tpu_kernels_bf16_non_causal_mqa_multi_block():
  _check("tpu_interpret", b=2, s=256, h=2, hkv=1, d=64, dtype=jnp.bfloat16, causal=False,
         segments=True, block_q=128, block_k=128)


def test_tuning_overrides_blocks_and_launch():
  # Per-phase tiles and Triton launch settings reach the kernels; results do not change.
  _check("interpret", s=96, h=2, d=64, alibi=True,
         tuning={"blocks": {"fwd": (32, 16), "bwd": (16, 32)},
                 "launch": {"fwd": {"num_warps": 4, "num_stages": 3}}})


def test_per_kernel_backward_tiles():
  # "dq" / "dkdv" tiles differ from each other and from "bwd"; the specific key wins.
  from kernels_pallas.attention import _blocks, _check_tuning
  blocks, launch = _check_tuning({"blocks": {"bwd": (64, 64), "dq": (32, 16)},
                                  "launch": {"bwd": {"num_warps": 8}, "dkdv": {"num_stages": 3}}})
  assert blocks == {"dq": (32, 16), "dkdv": (64, 64)}
  assert launch["dq"] == {"num_warps": 8, "num_stages": 2}
  assert launch["dkdv"] == {"num_warps": 8, "num_stages": 3}
  chosen, seq_pad = _blocks("gpu", 4096, None, None, None, head_dim=64)
  assert chosen == {"fwd": (128, 128), "dq": (128, 64), "dkdv": (64, 128)} and seq_pad == 4096
  assert kernels_pallas.default_blocks("gpu", 128, 4096)["dq"] == (64, 64)
  _check("interpret", s=64, h=2, d=32, alibi=True,
         tuning={"blocks": {"fwd": (32, 32), "dq": (32, 16), "dkdv": (16, 32)}})


def test_fused_backward_gqa_alibi_packed_ragged():
  # One kernel for dQ, dK and dV (dQ summed by atomic adds into fp32): 40:8 GQA, ALiBi with
  # restarting positions, packed segments, 200 -> 256 padding, several key blocks per dQ row.
  _check("interpret", s=200, h=40, hkv=8, d=64, alibi=True, segments=True, positions=True,
         tuning={"blocks": {"fwd": (64, 64), "dkdv": (32, 64)}, "fused_backward": True})


def test_fused_backward_bf16_non_causal_equals_split_backward():
  # Non-causal over a padded tail (masked keys add nothing to dQ), bf16: within the reference's
  # tolerance, and equal to the two-kernel backward to fp32 rounding.
  _check("interpret", s=100, h=4, hkv=2, d=32, dtype=jnp.bfloat16, causal=False,
         tuning={"blocks": {"bwd": (32, 32)}, "fused_backward": True})
  q, k, v = _inputs(2, 96, 4, 1, 32, jnp.float32, seed=3)
  ct = jax.random.normal(jax.random.PRNGKey(4), q.shape, jnp.float32)
  seg = _packed_segments(2, 96, seed=5)

  def grads(tuning):
    f = lambda q, k, v: jnp.sum(flash_attention(q, k, v, segment_ids=seg, backend="interpret",
                                                tuning=tuning) * ct)
    return jax.jit(jax.grad(f, argnums=(0, 1, 2)))(q, k, v)

  split = grads({"blocks": {"bwd": (32, 32)}})
  fused = grads({"blocks": {"bwd": (32, 32)}, "fused_backward": True})
  for name, a, b in zip("qkv", split, fused):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-5,
                               err_msg=f"d{name}")
  # The program runs one backward kernel instead of the dQ and dK/dV pair.
  f = lambda q: jnp.sum(flash_attention(q, k, v, backend="interpret",
                                        tuning={"fused_backward": True}))
  text = str(jax.make_jaxpr(jax.grad(f))(q))
  assert "baichuan_flash_bwd_fused" in text
  assert "baichuan_flash_dq" not in text and "baichuan_flash_dkdv" not in text


def test_fused_backward_lowers_for_cuda_with_atomics():
  q = jax.ShapeDtypeStruct((2, 512, 8, 128), jnp.bfloat16)
  kv = jax.ShapeDtypeStruct((2, 512, 2, 128), jnp.bfloat16)

  def f(q, k, v):
    loss = lambda *a: jnp.sum(flash_attention(*a, backend="gpu", tuning={
        "fused_backward": True}).astype(jnp.float32))
    return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

  checks = [export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
  module = export.export(jax.jit(f), platforms=["cuda"], disabled_checks=checks)(
      q, kv, kv).mlir_module()
  # the forward and the one backward kernel (Triton IR with its atomic adds inside)
  assert module.count("__gpu$xla.gpu.triton") == 2
  # at head_dim 128 the fused kernel launches with 8 warps by default (4 spill on sm_90)
  calls = {re.search(r'name = "(\w+)"', c).group(1): c
           for c in re.findall(r"stablehlo.custom_call @__gpu\$xla\.gpu\.triton.*", module)}
  assert set(calls) == {"baichuan_flash_fwd", "baichuan_flash_bwd_fused"}
  assert re.search(r"num_warps = (\d+)", calls["baichuan_flash_bwd_fused"]).group(1) == "8"


def test_xla_backend_is_the_reference():
  q, k, v = _inputs(1, 40, 2, 2, 64, jnp.float32)
  np.testing.assert_array_equal(np.asarray(flash_attention(q, k, v, backend="xla")),
                                np.asarray(attention_reference(q, k, v)))


def test_reference_matches_model_attention():
  """The kernels' reference agrees with the model's own XLA attention (masks, ALiBi, GQA)."""
  from baichuan_jax.model.attention import AttnContext, xla_attention
  q, k, v = _inputs(2, 48, 4, 2, 32, jnp.float32)
  seg = _packed_segments(2, 48)
  pos = _positions(seg)
  idx = jnp.arange(48)
  slopes = jnp.asarray(alibi_slopes(4))
  ctx = AttnContext(pos, seg, idx, pos, seg, idx)
  np.testing.assert_allclose(
      np.asarray(attention_reference(q, k, v, alibi_slopes=slopes, segment_ids=seg, positions=pos)),
      np.asarray(xla_attention(q, k, v, ctx, slopes)), atol=1e-5)


def test_auto_backend_on_cpu(monkeypatch):
  monkeypatch.delenv(kernels_pallas.attention.CPU_BACKEND_ENV, raising=False)
  assert kernels_pallas.resolve_backend("auto") == "interpret"
  monkeypatch.setenv(kernels_pallas.attention.CPU_BACKEND_ENV, "xla")
  assert kernels_pallas.resolve_backend("auto") == "xla"
  monkeypatch.setenv(kernels_pallas.attention.CPU_BACKEND_ENV, "gpu")
  with pytest.raises(ValueError, match="KERNELS_PALLAS_CPU_BACKEND"):
    kernels_pallas.resolve_backend("auto")


def test_triton_target_answers_for_an_h200_on_a_machine_without_a_gpu():
  # jax >= 0.11 only (0.10 takes compute capability 9.0 without asking). This module's tests run
  # inside an H200 target; a nested H100 target answers inside, and the H200 comes back after
  gpu_info = kernels_pallas.attention.triton_gpu_info()
  if gpu_info is None:
    pytest.skip(f"jax {jax.__version__}'s Triton lowering asks no GPU for its compute capability")
  if jax.default_backend() == "gpu":
    pytest.skip("this machine has a GPU: the lookup answers for it")
  with kernels_pallas.triton_target("NVIDIA H100"):
    assert gpu_info.get_gpu_info().compute_capability == 90
    assert gpu_info.get_gpu_info().gpu_version.value == "NVIDIA H100"
  assert gpu_info.get_gpu_info().gpu_version.value == "NVIDIA H200"


def test_lowering_platform_sets_what_auto_resolves_to(monkeypatch):
  # For exporting to a platform this machine lacks (gpu_suite.py --preflight); restored after.
  monkeypatch.delenv(kernels_pallas.attention.CPU_BACKEND_ENV, raising=False)
  with kernels_pallas.lowering_platform("cuda"):
    assert kernels_pallas.resolve_backend("auto") == "gpu"
    assert kernels_pallas.resolve_backend("xla") == "xla"  # an explicit backend stays
    with kernels_pallas.lowering_platform("tpu"):
      assert kernels_pallas.resolve_backend("auto") == "tpu"
    assert kernels_pallas.resolve_backend("auto") == "gpu"
  assert kernels_pallas.resolve_backend("auto") == "interpret"
  with pytest.raises(ValueError, match="platform='gpu' is invalid: must be 'cuda' or 'tpu'"):
    with kernels_pallas.lowering_platform("gpu"):
      pass


def test_bad_inputs_raise_clear_errors():
  q, k, v = _inputs(1, 16, 4, 4, 64, jnp.float32)
  with pytest.raises(ValueError, match="kv_heads=3 is invalid: must divide heads=4"):
    flash_attention(q, k[:, :, :3], v[:, :, :3])
  with pytest.raises(ValueError, match="backend='cuda' is invalid"):
    flash_attention(q, k, v, backend="cuda")
  with pytest.raises(ValueError, match=r"alibi_slopes.shape=\(3,\) is invalid"):
    flash_attention(q, k, v, alibi_slopes=jnp.ones(3))
  with pytest.raises(ValueError, match="segment_ids.shape"):
    flash_attention(q, k, v, segment_ids=jnp.ones((1, 15), jnp.int32))
  with pytest.raises(ValueError, match="block_q=48 is invalid for the GPU kernels"):
    flash_attention(q, k, v, backend="interpret", block_q=48)
  with pytest.raises(ValueError, match="dtypes"):
    flash_attention(q, k.astype(jnp.bfloat16), v)
  with pytest.raises(ValueError, match="tuning keys"):
    flash_attention(q, k, v, backend="interpret", tuning={"warps": 4})
  with pytest.raises(ValueError, match="num_warps, num_stages"):
    flash_attention(q, k, v, backend="interpret", tuning={"launch": {"fwd": {"warps": 4}}})
  with pytest.raises(ValueError, match=r"tuning\['fused_backward'\]=1 is invalid: must be True"):
    flash_attention(q, k, v, backend="interpret", tuning={"fused_backward": 1})
  with pytest.raises(ValueError, match=r"fused_backward'\]=True is invalid with in-kernel RoPE"):
    flash_attention(q, k, v, backend="interpret", rope_theta=1e4,
                    tuning={"fused_backward": True})


def _lower_fwd_bwd(platform, backend, s, h, hkv, d):
  q = jax.ShapeDtypeStruct((2, s, h, d), jnp.bfloat16)
  kv = jax.ShapeDtypeStruct((2, s, hkv, d), jnp.bfloat16)
  seg = jax.ShapeDtypeStruct((2, s), jnp.int32)
  slopes = jnp.asarray(alibi_slopes(h))

  def f(q, k, v, seg):
    loss = lambda *a: jnp.sum(flash_attention(*a, alibi_slopes=slopes, segment_ids=seg,
                                              positions=seg, backend=backend).astype(jnp.float32))
    return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

  checks = [export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton"),
            export.DisabledSafetyCheck.custom_call("tpu_custom_call")]
  return export.export(jax.jit(f), platforms=[platform], disabled_checks=checks)(
      q, kv, kv, seg).mlir_module()


@pytest.mark.parametrize("platform,backend,target", [("cuda", "gpu", "__gpu$xla.gpu.triton"),
                                                     ("tpu", "tpu", "tpu_custom_call")])
def test_kernels_lower_for_cuda_and_tpu(platform, backend, target):
  # Forward, dq and dk/dv kernels all lower (Triton IR / Mosaic MLIR) for GQA + ALiBi + segments.
  module = _lower_fwd_bwd(platform, backend, s=1000, h=40, hkv=8, d=128)
  assert module.count(f"@{target}") >= 3 or module.count(target) >= 3


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs an NVIDIA GPU (JAX_PLATFORMS=cuda)")
@pytest.mark.parametrize("alibi", [False, True])
def test_compiled_gpu_kernels(alibi):
  _check("gpu", b=2, s=1000, h=8, hkv=2, d=128, dtype=jnp.bfloat16, alibi=alibi, segments=True)


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs an NVIDIA GPU (JAX_PLATFORMS=cuda)")
def test_compiled_gpu_fused_backward():
  # the real fp32 atomics (many k-block programs adding into the same dQ rows at once)
  _check("gpu", b=2, s=1000, h=8, hkv=2, d=128, dtype=jnp.bfloat16, alibi=True, segments=True,
         tuning={"fused_backward": True})


@pytest.mark.tpu
@pytest.mark.skipif(jax.default_backend() != "tpu", reason="needs a TPU")
@pytest.mark.parametrize("alibi", [False, True])
def test_compiled_tpu_kernels(alibi):
  _check("tpu", b=2, s=1000, h=8, hkv=2, d=128, dtype=jnp.bfloat16, alibi=alibi, segments=True)
