"""The fused RMSNorm kernel against its jnp reference, and whole-model parity:
`attention_impl="pallas"` (flash attention + fused RMSNorm kernels, run in Pallas interpret mode on
CPU) against the XLA path on the tiny preset, logits and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kernels_pallas
from kernels_pallas import rms_norm, rms_norm_reference

from baichuan_jax import configs, losses
from baichuan_jax.model import BaichuanLM, init_params


def _check_rms_norm(backend, dtype, shape, tol, **kw):
  kx, kw_, kg = jax.random.split(jax.random.PRNGKey(3), 3)
  x = (3.0 * jax.random.normal(kx, shape, jnp.float32)).astype(dtype)
  w = 1.0 + 0.1 * jax.random.normal(kw_, shape[-1:], jnp.float32)
  ct = jax.random.normal(kg, shape, jnp.float32)

  def vjp(fn, x, w):
    y, pull = jax.vjp(fn, x, w)
    return (y,) + pull(ct.astype(y.dtype))

  got = jax.jit(lambda x, w: vjp(lambda x, w: rms_norm(x, w, eps=1e-6, backend=backend, **kw),
                                 x, w))(x, w)
  want = vjp(lambda x, w: rms_norm_reference(x.astype(jnp.float32), w, 1e-6),
             x.astype(jnp.float32), w)
  for name, g, r in zip(("y", "dx", "dscale"), got, want):
    assert g.shape == r.shape, name
    scale = max(1.0, float(jnp.max(jnp.abs(r))))
    np.testing.assert_allclose(np.asarray(g, np.float32) / scale, np.asarray(r) / scale,
                               atol=tol, rtol=tol, err_msg=name)


@pytest.mark.parametrize("backend,dtype,tol", [("interpret", jnp.float32, 1e-5),
                                               ("tpu_interpret", jnp.bfloat16, 2e-2)])
def test_rms_norm_kernel_matches_reference(backend, dtype, tol):
  # 3 x 13 = 39 rows: padded to whole row blocks; hidden 320 = 5 x 64 column chunks on the GPU
  # path (Triton needs power-of-two values, as 5120 = 5 x 1024 in Baichuan-13B).
  _check_rms_norm(backend, dtype, (3, 13, 320), tol, block_rows=16 if backend == "interpret"
                  else 8)


def test_rms_norm_rejects_bad_scale():
  with pytest.raises(ValueError, match=r"scale.shape=\(3,\) is invalid"):
    rms_norm(jnp.ones((2, 4)), jnp.ones(3), backend="interpret")
  # the shapes a kernel does not take are named for what they are
  with pytest.raises(ValueError, match=r"hidden=200 \(x.shape\[-1\]\) is invalid for the GPU "
                                       "kernel: must be a multiple of 16"):
    rms_norm(jnp.ones((2, 200)), jnp.ones(200), backend="interpret")
  for backend, rows, allowed in (("interpret", 3, "a power of two"),
                                 ("tpu_interpret", -8, "a positive multiple of 8"),
                                 ("interpret", 0, "a power of two")):
    with pytest.raises(ValueError, match=f"block_rows={rows} is invalid .* must be {allowed}"):
      rms_norm(jnp.ones((2, 64)), jnp.ones(64), backend=backend, block_rows=rows)
  # the TPU kernel takes any hidden size: 200 = 8 x 25
  assert not kernels_pallas.rms_norm_kernel_fits(200, "interpret")
  assert kernels_pallas.rms_norm_kernel_fits(200, "tpu_interpret")
  _check_rms_norm("tpu_interpret", jnp.float32, (5, 200), 1e-5)


@pytest.mark.parametrize("backend", ["interpret", "tpu_interpret"])
def test_rms_norm_of_no_rows(backend):
  x, w = jnp.ones((2, 0, 64)), jnp.ones(64)
  y, (dx, dw) = jax.value_and_grad(lambda x, w: rms_norm(x, w, backend=backend).sum(),
                                   argnums=(0, 1))(x, w)
  assert float(y) == 0.0 and dx.shape == x.shape and dw.shape == (64,)
  np.testing.assert_array_equal(np.asarray(dw), np.zeros(64))


def test_model_with_a_hidden_size_the_gpu_norm_kernel_does_not_take():
  # hidden 200 is a valid config (4 heads of 50) but no multiple of 16: the pallas model keeps
  # its attention kernels and normalises with the jnp formula; logits equal the xla model's
  cfg = configs.get("tiny", hidden_size=200, num_heads=4, num_kv_heads=4, intermediate_size=96,
                    num_layers=1, dtype="float32", attention_impl="pallas")
  params = init_params(cfg, jax.random.PRNGKey(0))
  tokens = jnp.asarray(np.random.default_rng(0).integers(3, cfg.vocab_size, size=(2, 24)))
  text = str(jax.make_jaxpr(lambda p: BaichuanLM(cfg).apply({"params": p}, tokens))(params))
  assert "name=baichuan_rms_norm" not in text
  got = BaichuanLM(cfg).apply({"params": params}, tokens)
  want = BaichuanLM(configs.get("tiny", hidden_size=200, num_heads=4, num_kv_heads=4,
                                intermediate_size=96, num_layers=1, dtype="float32",
                                attention_impl="xla")).apply({"params": params}, tokens)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-4, rtol=2e-4)


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs an NVIDIA GPU (JAX_PLATFORMS=cuda)")
@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
def test_rms_norm_compiled_gpu(dtype, tol):
  _check_rms_norm("gpu", dtype, (4, 1000, 5120), tol)


def _packed_batch(cfg, b, s):
  rng = np.random.default_rng(0)
  tokens = rng.integers(3, cfg.vocab_size, size=(b, s)).astype(np.int32)
  # Row 0: two documents; row 1: one document and a zero-id padded tail.
  seg = np.ones((b, s), np.int32)
  seg[0, s // 3:] = 2
  seg[1, s - 7:] = 0
  pos = np.zeros((b, s), np.int32)
  for r in range(b):
    for i in range(1, s):
      pos[r, i] = pos[r, i - 1] + 1 if seg[r, i] == seg[r, i - 1] else 0
  return jnp.asarray(tokens), jnp.asarray(pos), jnp.asarray(seg)


@pytest.mark.parametrize("position_embedding, rope_in_kernel, fused_backward",
                         [("alibi", False, False), ("rope", True, False), ("rope", False, False),
                          ("alibi", False, True)])
def test_pallas_model_matches_xla(monkeypatch, position_embedding, rope_in_kernel,
                                  fused_backward):
  # "auto" must pick the interpret-mode kernels on CPU for this test to exercise them.
  monkeypatch.delenv("KERNELS_PALLAS_CPU_BACKEND", raising=False)
  # ALiBi (the Baichuan-13B scheme, in-kernel) or RoPE (rotated inside the kernels: head_dim 64,
  # layers.ROPE_IN_KERNEL; or applied to q and k first, the default since the H200 run) with GQA
  # and packed rows: every kernel feature the model uses at once.
  from baichuan_jax.model import layers
  monkeypatch.setattr(layers, "ROPE_IN_KERNEL", rope_in_kernel)
  import kernels_pallas
  seen = []
  real_flash = kernels_pallas.flash_attention

  def recording(*args, **kwargs):
    seen.append(kwargs.get("rope_theta"))
    return real_flash(*args, **kwargs)

  monkeypatch.setattr(kernels_pallas, "flash_attention", recording)
  cfgs = {impl: configs.get("tiny", num_layers=2, dtype="float32",
                            position_embedding=position_embedding, num_kv_heads=2,
                            attention_impl=impl) for impl in ("xla", "pallas")}
  params = init_params(cfgs["xla"], jax.random.PRNGKey(0))
  tokens, positions, segments = _packed_batch(cfgs["xla"], 2, 48)
  mask = (segments[:, 1:] > 0).astype(jnp.float32)

  def run(impl):
    model = BaichuanLM(cfgs[impl])

    def loss(p):
      logits = model.apply({"params": p}, tokens, positions=positions, segment_ids=segments)
      return losses.lm_loss(logits[:, :-1], tokens[:, 1:], mask)["loss"], logits

    return jax.jit(jax.value_and_grad(loss, has_aux=True))(params)

  (loss_x, logits_x), grads_x = run("xla")
  # fused_backward: the one-kernel backward (dQ by atomic adds) as MEASURED_TUNING would hand
  # it to the model's attention after a device run chose it
  with kernels_pallas.default_tuning({"fused_backward": True} if fused_backward else None):
    (loss_p, logits_p), grads_p = run("pallas")
    if fused_backward:
      grad_text = str(jax.make_jaxpr(jax.grad(lambda p: jnp.sum(BaichuanLM(cfgs["pallas"]).apply(
          {"params": p}, tokens, positions=positions, segment_ids=segments))))(params))
      assert "baichuan_flash_bwd_fused" in grad_text and "baichuan_flash_dq" not in grad_text
  # every trace of the layer body: RoPE goes into the kernel (when switched there), ALiBi needs
  # no rope_theta
  assert seen and set(seen) == {cfgs["pallas"].rope_theta if rope_in_kernel else None}
  real = np.asarray(segments) > 0
  np.testing.assert_allclose(np.asarray(logits_p)[real], np.asarray(logits_x)[real],
                             atol=2e-4, rtol=2e-4)
  np.testing.assert_allclose(float(loss_p), float(loss_x), rtol=1e-5)
  flat_x = jax.tree_util.tree_leaves_with_path(grads_x)
  flat_p = jax.tree_util.tree_leaves(grads_p)
  for (path, gx), gp in zip(flat_x, flat_p):
    scale = float(jnp.max(jnp.abs(gx))) + 1e-12
    np.testing.assert_allclose(np.asarray(gp) / scale, np.asarray(gx) / scale, atol=2e-4,
                               err_msg=jax.tree_util.keystr(path))


def test_fused_rms_norm_switch(monkeypatch):
  # layers.FUSED_RMS_NORM=False (the gpu_suite's "xla RMSNorm" A/B of the training step) keeps
  # the attention kernels and runs every RMSNorm as the jnp formula: the same loss and gradients,
  # and no RMSNorm kernel in the traced step.
  monkeypatch.delenv("KERNELS_PALLAS_CPU_BACKEND", raising=False)
  from baichuan_jax.model import layers
  cfg = configs.get("tiny", num_layers=2, dtype="float32", attention_impl="pallas")
  params = init_params(cfg, jax.random.PRNGKey(0))
  tokens, positions, segments = _packed_batch(cfg, 2, 48)

  def value_and_grad():  # a new model and new functions: the switch is read when traced
    model = BaichuanLM(cfg)

    def loss(p):
      logits = model.apply({"params": p}, tokens, positions=positions, segment_ids=segments)
      return jnp.mean(jax.nn.log_softmax(logits) * (segments[..., None] > 0))
    return jax.value_and_grad(loss)

  runs = {}
  for fused in (True, False):
    monkeypatch.setattr(layers, "FUSED_RMS_NORM", fused)
    text = str(jax.make_jaxpr(value_and_grad())(params))
    runs[fused] = (text.count("name=baichuan_rms_norm"), text.count("name=baichuan_flash"),
                   jax.jit(value_and_grad())(params))
  # the layer body is traced once (the layer scan): its 2 norms and the final norm, each a
  # forward and a backward kernel, are no longer called; the 3 attention kernels stay
  assert (runs[True][0], runs[False][0]) == (2 * (2 + 1), 0)
  assert runs[True][1] == runs[False][1] == 3
  (lt, gt), (lf, gf) = runs[True][2], runs[False][2]
  np.testing.assert_allclose(float(lf), float(lt), rtol=1e-6)
  for a, b in zip(jax.tree.leaves(gf), jax.tree.leaves(gt)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-7)
