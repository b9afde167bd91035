"""Whole-model behaviour: packing, KV cache, dtypes and losses."""

import jax
import jax.numpy as jnp
import flax.linen as nn
import numpy as np
import pytest

from baichuan_jax import configs, losses
from baichuan_jax.model import BaichuanLM, init_cache, init_params
from baichuan_jax.model.transformer import split_layers


def _setup(pos, **kw):
  cfg = configs.get("tiny", dtype="float32", position_embedding=pos, num_layers=2, **kw)
  model = BaichuanLM(cfg)
  # jit: eager op-by-op dispatch of a scanned model is slow on CPU.
  model.apply = jax.jit(model.apply)
  return cfg, model, init_params(cfg, jax.random.PRNGKey(0))


@pytest.mark.parametrize("pos", ["rope", "alibi"])
def test_packed_equals_separate(pos):
  cfg, model, params = _setup(pos)
  rng = np.random.default_rng(0)
  a = rng.integers(3, cfg.vocab_size, 9)
  b = rng.integers(3, cfg.vocab_size, 6)
  row = jnp.asarray(np.concatenate([a, b, [0]])[None])
  seg = jnp.asarray([[1] * 9 + [2] * 6 + [0]])
  positions = jnp.asarray([list(range(9)) + list(range(6)) + [0]])
  packed = model.apply({"params": params}, row, positions=positions, segment_ids=seg)
  alone_a = model.apply({"params": params}, jnp.asarray(a[None]))
  alone_b = model.apply({"params": params}, jnp.asarray(b[None]))
  np.testing.assert_allclose(packed[0, :9], alone_a[0], atol=1e-5)
  np.testing.assert_allclose(packed[0, 9:15], alone_b[0], atol=1e-5)


@pytest.mark.parametrize("pos", ["rope", "alibi"])
def test_kv_cache_matches_full_forward(pos):
  cfg, model, params = _setup(pos)
  toks = jax.random.randint(jax.random.PRNGKey(1), (2, 12), 0, cfg.vocab_size)
  full = model.apply({"params": params}, toks)
  cache = init_cache(cfg, 2, 16)
  l1, cache = model.apply({"params": params}, toks[:, :7], cache=cache)
  outs = [l1]
  for t in range(7, 12):
    lt, cache = model.apply({"params": params}, toks[:, t:t + 1], cache=cache)
    outs.append(lt)
  np.testing.assert_allclose(jnp.concatenate(outs, 1), full, atol=1e-5)
  assert int(cache.index) == 12


@pytest.mark.parametrize("pos", ["rope", "alibi"])
def test_unrolled_layers_match_scan(pos):
  # The decode path applies the stacked layer weights in an unrolled loop: same tree, same
  # logits and the same cache contents as the scan, prompt and single-token steps alike.
  cfg, model, params = _setup(pos)
  unrolled = BaichuanLM(cfg, unroll_layers=True)
  toks = jax.random.randint(jax.random.PRNGKey(2), (2, 9), 0, cfg.vocab_size)
  np.testing.assert_allclose(unrolled.apply({"params": params}, toks),
                             model.apply({"params": params}, toks), atol=1e-5)
  # Per-layer weight copies (what the device decode loop passes) give the same logits.
  split = split_layers(params)
  assert sorted(split["layers"]) == [f"layer_{i}" for i in range(cfg.num_layers)]
  np.testing.assert_array_equal(split["layers"]["layer_1"]["mlp"]["up_proj"]["kernel"],
                                params["layers"]["mlp"]["up_proj"]["kernel"][1])
  np.testing.assert_allclose(unrolled.apply({"params": split}, toks),
                             model.apply({"params": params}, toks), atol=1e-5)
  c_scan, c_unroll = init_cache(cfg, 2, 12), init_cache(cfg, 2, 12)
  for sl in (slice(0, 6), slice(6, 7), slice(7, 8)):
    ls, c_scan = model.apply({"params": params}, toks[:, sl], cache=c_scan)
    lu, c_unroll = unrolled.apply({"params": params}, toks[:, sl], cache=c_unroll)
    np.testing.assert_allclose(lu, ls, atol=1e-5)
  assert len(c_scan.k) == len(c_unroll.k) == cfg.num_layers
  assert c_scan.k[0].shape == (2, cfg.num_kv_heads, 12, cfg.hidden_size // cfg.num_heads)
  np.testing.assert_allclose(np.stack(c_unroll.k), np.stack(c_scan.k), atol=1e-6)
  np.testing.assert_allclose(np.stack(c_unroll.v), np.stack(c_scan.v), atol=1e-6)
  assert int(c_unroll.index) == int(c_scan.index) == 8
  # Initialising the unrolled module still creates the stacked tree.
  init = nn.meta.unbox(unrolled.init(jax.random.PRNGKey(0), toks)["params"])
  assert jax.tree.map(jnp.shape, init) == jax.tree.map(jnp.shape, params)


def test_scan_layers_switch_unrolls_training_too(monkeypatch):
  """layers.SCAN_LAYERS = False: with remat "none" the training forward and its gradients run
  the unrolled stack (no `scan` in the program), with the scan's loss and gradients; with remat
  the scan stays (it is what applies the policy)."""
  from baichuan_jax.model import layers
  toks = jax.random.randint(jax.random.PRNGKey(2), (2, 9), 0, 4096)

  def loss_and_grads(policy):
    cfg = configs.get("tiny", dtype="float32", position_embedding="rope", num_layers=2,
                      remat_policy=policy)
    params = init_params(cfg, jax.random.PRNGKey(0))
    model = BaichuanLM(cfg)
    loss = lambda p: losses.lm_loss(model.apply({"params": p}, toks[:, :-1]), toks[:, 1:])["loss"]
    fn = jax.value_and_grad(loss)
    return str(jax.make_jaxpr(fn)(params)), jax.jit(fn)(params)

  text_scan, (l_scan, g_scan) = loss_and_grads("none")
  monkeypatch.setattr(layers, "SCAN_LAYERS", False)
  text_unrolled, (l_unrolled, g_unrolled) = loss_and_grads("none")
  assert " scan[" in text_scan and " scan[" not in text_unrolled
  np.testing.assert_allclose(l_unrolled, l_scan, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), g_unrolled, g_scan)
  assert jax.tree.map(jnp.shape, g_unrolled) == jax.tree.map(jnp.shape, g_scan)
  text_remat, _ = loss_and_grads("full")
  assert " scan[" in text_remat


def test_swiglu_backward_is_the_formulas_derivative():
  """layers.swiglu: the forward is the model's formula bit for bit; the backward is its
  derivative (d gate = d * up * s * (1 + gate * (1 - s)), d up = d * silu(gate)): in fp32 equal
  to jax's autodiff of the formula, in bf16 the fp32 derivative rounded once (within bf16's
  half-ulp, 2**-8 relative), which autodiff in bf16, rounding at every step, is not."""
  from baichuan_jax.model.layers import swiglu
  rng = np.random.default_rng(0)
  gate, up, d = (jnp.asarray(rng.standard_normal((4, 96)) * 4, jnp.float32) for _ in range(3))
  formula = lambda g, u: nn.silu(g) * u
  ref_out, ref_vjp = jax.vjp(formula, gate, up)
  out, vjp = jax.vjp(swiglu, gate, up)
  np.testing.assert_array_equal(out, ref_out)
  for ours, ref in zip(vjp(d), ref_vjp(d)):
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-6)
  # by hand at gate 0 (s = 1/2): d gate = d * up / 2, d up = 0
  dg, du = jax.vjp(swiglu, jnp.zeros(3), jnp.asarray([1.0, -2.0, 4.0]))[1](jnp.ones(3))
  np.testing.assert_array_equal(dg, [0.5, -1.0, 2.0])
  np.testing.assert_array_equal(du, [0.0, 0.0, 0.0])
  bf = [x.astype(jnp.bfloat16) for x in (gate, up, d)]
  exact = jax.vjp(formula, *(x.astype(jnp.float32) for x in bf[:2]))[1](bf[2].astype(jnp.float32))
  out, vjp = jax.vjp(swiglu, bf[0], bf[1])
  np.testing.assert_array_equal(out, formula(bf[0], bf[1]))
  auto = jax.vjp(formula, bf[0], bf[1])[1](bf[2])

  def worst(grads):
    return max(float(jnp.max(jnp.abs(g.astype(jnp.float32) - e) / (jnp.abs(e) + 1e-3)))
               for g, e in zip(grads, exact))
  assert all(g.dtype == jnp.bfloat16 for g in vjp(bf[2]))
  assert worst(vjp(bf[2])) <= 2.0 ** -8 * 1.01
  assert worst(auto) > 2.0 ** -8 * 1.01


def test_swiglu_switch_keeps_half_the_mlp_activations(monkeypatch):
  """layers.SWIGLU_VJP: the backward keeps 3 [layers, batch, seq, ffn] arrays of the SwiGLU
  block (gate, up and the product, which the down projection's weight gradient needs), not the
  formula's every intermediate; the loss is the same bits and the gradients the same up to
  rounding."""
  from baichuan_jax.model import layers
  cfg = configs.get("tiny", dtype="float32", position_embedding="rope", num_layers=2,
                    intermediate_size=176)
  params = init_params(cfg, jax.random.PRNGKey(0))
  model = BaichuanLM(cfg)
  toks = jax.random.randint(jax.random.PRNGKey(2), (2, 9), 0, cfg.vocab_size)
  loss = lambda p: losses.lm_loss(model.apply({"params": p}, toks[:, :-1]), toks[:, 1:])["loss"]
  ffn_shape = (2, 2, 8, 176)  # [layers, batch, seq, ffn]: stacked by the layer scan

  def run(switch):
    monkeypatch.setattr(layers, "SWIGLU_VJP", switch)
    saved = jax.tree.leaves(jax.eval_shape(lambda p: jax.vjp(loss, p)[1], params))
    return sum(x.shape == ffn_shape for x in saved), jax.jit(jax.value_and_grad(loss))(params)

  (kept_vjp, (l_vjp, g_vjp)), (kept_auto, (l_auto, g_auto)) = run(True), run(False)
  assert kept_vjp == 3 and kept_auto > kept_vjp
  assert float(l_vjp) == float(l_auto)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7), g_vjp, g_auto)


def test_gqa_runs_and_counts():
  cfg, model, params = _setup("rope", num_kv_heads=2)
  n = sum(x.size for x in jax.tree.leaves(params))
  assert n == configs.param_counts(cfg)["total"]
  out = model.apply({"params": params}, jnp.zeros((1, 5), jnp.int32))
  assert out.shape == (1, 5, cfg.vocab_size)


def test_bf16_compute_fp32_params_and_logits():
  cfg = configs.get("tiny", num_layers=1)
  params = init_params(cfg, jax.random.PRNGKey(0))
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
  logits = BaichuanLM(cfg).apply({"params": params}, jnp.zeros((1, 4), jnp.int32))
  assert logits.dtype == jnp.float32


def test_norm_head_is_scale_invariant_per_row():
  cfg, model, params = _setup("rope")
  toks = jnp.arange(8)[None]
  base = model.apply({"params": params}, toks)
  scaled = dict(params, lm_head=params["lm_head"] * jnp.linspace(0.5, 3.0, cfg.vocab_size)[None])
  np.testing.assert_allclose(model.apply({"params": scaled}, toks), base, atol=1e-5)


def test_remat_policies_same_gradients():
  toks = jax.random.randint(jax.random.PRNGKey(2), (1, 8), 0, 4096)
  grads = []
  for policy in ["none", "full", "save_dots"]:
    cfg, model, params = _setup("alibi", remat_policy=policy)
    loss = lambda p: losses.lm_loss(model.apply({"params": p}, toks[:, :-1]), toks[:, 1:])["loss"]
    grads.append(jax.jit(jax.grad(loss))(params))
  for g in grads[1:]:
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), grads[0], g)


def test_losses_hand_worked():
  # Two positions, vocab 3. log-softmax by hand.
  logits = jnp.array([[[0.0, 0.0, 0.0], [1.0, 2.0, 3.0]]])
  targets = jnp.array([[1, 2]])
  ce0 = np.log(3.0)
  ce1 = np.log(np.exp(1) + np.exp(2) + np.exp(3)) - 3.0
  out = losses.lm_loss(logits, targets, z_loss_weight=2e-4)
  assert float(out["ce"]) == pytest.approx((ce0 + ce1) / 2, rel=1e-6)
  assert float(out["z_loss"]) == pytest.approx((0.0 + 9.0) / 2)
  assert float(out["loss"]) == pytest.approx((ce0 + ce1) / 2 + 2e-4 * 4.5, rel=1e-6)
  masked = losses.lm_loss(logits, targets, mask=jnp.array([[0, 1]]))
  assert float(masked["ce"]) == pytest.approx(ce1, rel=1e-6)
  assert float(masked["tokens"]) == 1.0


@pytest.mark.parametrize("pos", ["rope", "alibi"])
def test_flash_mosaic_switch_runs_the_hopper_kernels_with_the_same_loss(monkeypatch, pos):
  """layers.FLASH_MOSAIC = True: with attention_impl="pallas" the training forward runs
  attention on kernels_pallas.flash_mgpu (Mosaic GPU interpret mode on this CPU) for a packed
  batch (segments, positions restarting per document; ALiBi by position), with the loss and
  gradients of the Triton kernels' path within bf16 rounding."""
  from baichuan_jax.model import layers
  from kernels_pallas import flash_mgpu
  cfg = configs.get("tiny", dtype="bfloat16", attention_impl="pallas", position_embedding=pos,
                    num_layers=2)  # head_dim 64: a shape the Hopper kernels take
  params = init_params(cfg, jax.random.PRNGKey(0))
  toks = jax.random.randint(jax.random.PRNGKey(3), (2, 129), 3, cfg.vocab_size)
  seg = jnp.asarray([[1] * 50 + [2] * 78, [1] * 128])
  positions = jnp.asarray([list(range(50)) + list(range(78)), list(range(128))])
  model = BaichuanLM(cfg)

  def loss(p):
    logits = model.apply({"params": p}, toks[:, :-1], positions=positions, segment_ids=seg)
    return losses.lm_loss(logits, toks[:, 1:])["loss"]

  calls = []
  real = flash_mgpu.flash_attention_mgpu
  monkeypatch.setattr(flash_mgpu, "flash_attention_mgpu",
                      lambda *a, **kw: calls.append(kw) or real(*a, **kw))
  l_triton, g_triton = jax.jit(jax.value_and_grad(loss))(params)
  assert calls == []  # off by default
  monkeypatch.setattr(layers, "FLASH_MOSAIC", True)
  l_mosaic, g_mosaic = jax.jit(jax.value_and_grad(loss))(params)
  # the layer scan's body (flax traces it more than once), every time on the Hopper kernels
  assert calls and all(c["interpret"] is True for c in calls)
  assert all((c["alibi_slopes"] is not None) == (pos == "alibi") for c in calls)
  np.testing.assert_allclose(float(l_mosaic), float(l_triton), rtol=2e-3)
  leaves = lambda g: jax.tree.leaves(jax.tree.map(lambda x: np.asarray(x, np.float32), g))
  for a, b in zip(leaves(g_mosaic), leaves(g_triton)):
    assert np.linalg.norm(a - b) <= 2e-2 * np.linalg.norm(b) + 1e-6
