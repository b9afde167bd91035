"""LoRA: merged weights equal the adapted forward pass; only adapters receive gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from baichuan_jax import configs
from baichuan_jax.align import lora
from baichuan_jax.model import BaichuanLM, init_params

ALL = ("W_pack", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def setup():
  cfg = configs.get("tiny", num_layers=2, dtype="float32")
  params = jax.jit(lambda k: init_params(cfg, k))(jax.random.PRNGKey(0))
  lcfg = lora.LoRAConfig(rank=4, alpha=8.0, targets=ALL)
  adapters = lora.init_lora(params, lcfg, jax.random.PRNGKey(1))
  # B starts at 0; give it values so the update is not trivially zero.
  adapters = jax.tree_util.tree_map_with_path(
      lambda p, x: 0.05 * jax.random.normal(jax.random.PRNGKey(len(str(p))), x.shape)
      if p[-1].key == "B" else x, adapters)
  return cfg, params, lcfg, adapters


def test_merged_kernel_equals_activation_level_lora(setup):
  cfg, params, lcfg, adapters = setup
  merged = lora.merge_lora(params, adapters, lcfg)
  rng = np.random.default_rng(0)
  for name in ALL:
    path, n_in = lora.TARGETS[name]
    w = np.asarray(lora._get(params, path))
    w_merged = np.asarray(lora._get(merged, path))
    a, b = np.asarray(adapters[name]["A"]), np.asarray(adapters[name]["B"])
    for layer in range(cfg.num_layers):
      d_in = int(np.prod(w.shape[1:1 + n_in]))
      x = rng.normal(size=(3, d_in))
      # What PEFT computes on activations: x W + (alpha / r) (x A) B.
      ref = x @ w[layer].reshape(d_in, -1) + (8.0 / 4) * (x @ a[layer]) @ b[layer]
      np.testing.assert_allclose(x @ w_merged[layer].reshape(d_in, -1), ref, rtol=1e-5, atol=1e-5)


def test_merged_forward_equals_adapted_forward(setup):
  cfg, params, lcfg, adapters = setup
  tokens = jax.random.randint(jax.random.PRNGKey(2), (2, 12), 3, cfg.vocab_size)
  apply = jax.jit(lambda p: BaichuanLM(cfg).apply({"params": p}, tokens))
  adapted = jax.jit(lambda ad: BaichuanLM(cfg).apply(
      {"params": lora.apply_lora(params, ad, lcfg)}, tokens))(adapters)
  merged = apply(lora.merge_lora(params, adapters, lcfg))
  base = apply(params)
  np.testing.assert_allclose(merged, adapted, rtol=1e-5, atol=1e-5)
  assert float(jnp.max(jnp.abs(merged - base))) > 1e-3  # the adapters do change the model


def test_fresh_adapters_are_identity_and_only_adapters_get_gradients(setup):
  cfg, params, lcfg, _ = setup
  fresh = lora.init_lora(params, lcfg, jax.random.PRNGKey(3))
  merged = lora.merge_lora(params, fresh, lcfg)
  for a, b in zip(jax.tree_util.tree_leaves(merged), jax.tree_util.tree_leaves(params)):
    np.testing.assert_array_equal(a, b)
  tokens = jax.random.randint(jax.random.PRNGKey(4), (2, 8), 3, cfg.vocab_size)

  def loss(ad):
    logits = BaichuanLM(cfg).apply({"params": lora.apply_lora(params, ad, lcfg)}, tokens)
    return jnp.mean(logits ** 2)

  grads = jax.jit(jax.grad(loss))(fresh)
  assert jax.tree_util.tree_structure(grads) == jax.tree_util.tree_structure(fresh)
  # With B = 0, dL/dA = 0 and dL/dB != 0 (the standard LoRA start).
  for name in ALL:
    assert float(jnp.abs(grads[name]["A"]).max()) == 0.0
    assert float(jnp.abs(grads[name]["B"]).max()) > 0.0
  r = lcfg.rank
  expected = 2 * (256 * r + r * 3 * 256) + 2 * (256 * r + r * 256) + 2 * 2 * (256 * r + r * 768) \
      + 2 * (768 * r + r * 256)
  assert lora.num_adapter_params(fresh) == expected


def test_dropout_zeroes_input_rows_and_is_off_without_rng(setup):
  _, params, _, adapters = setup
  lcfg = lora.LoRAConfig(rank=4, alpha=8.0, dropout=0.5, targets=("gate_proj",))
  ad = {"gate_proj": adapters["gate_proj"]}
  path = lora.TARGETS["gate_proj"][0]
  eff = lora.apply_lora(params, ad, lcfg, rng=jax.random.PRNGKey(5))
  delta = np.asarray(lora._get(eff, path) - lora._get(params, path))  # [L, E, F]
  dropped_rows = np.all(delta == 0.0, axis=-1)
  assert 0.3 < dropped_rows.mean() < 0.7
  np.testing.assert_allclose(lora.merge_lora(params, ad, lcfg)[("layers")]["mlp"]["gate_proj"]["kernel"],
                             lora.apply_lora(params, ad, lcfg)["layers"]["mlp"]["gate_proj"]["kernel"])


def test_bad_config_and_missing_target():
  with pytest.raises(ValueError, match="lora.targets"):
    lora.LoRAConfig(targets=("qkv",))
  with pytest.raises(ValueError, match="lora.rank"):
    lora.LoRAConfig(rank=0)
  cfg = configs.get("tiny", num_layers=1, num_kv_heads=2, dtype="float32")
  params = jax.eval_shape(lambda: init_params(cfg, jax.random.PRNGKey(0)))
  with pytest.raises(ValueError, match="q_proj/kv_proj"):
    lora.init_lora(params, lora.LoRAConfig(), jax.random.PRNGKey(0))
