"""Weight-only int8 / int4: quantization error bounds, packing, the quantized forward pass against
the dequantized float model, quantize-while-loading, and the 13B memory table by hand count."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from baichuan_jax import configs, hf
from baichuan_jax.infer import generate, quant
from baichuan_jax.model import BaichuanLM, init_params


def _cfg():
  cfg = configs.get("tiny", num_layers=2, dtype="float32")
  cfg.init_std = 0.08  # peaked next-token distributions: argmax gaps dwarf float noise
  return cfg


@pytest.fixture(scope="module")
def model():
  cfg = _cfg()
  return cfg, jax.jit(functools.partial(init_params, cfg))(jax.random.PRNGKey(0))


def _dequantized(tree):
  return jax.tree.map(lambda x: x.dequantize(jnp.float32) if quant.is_quantized(x) else x, tree,
                      is_leaf=quant.is_quantized)


def test_int8_per_output_channel_absmax():
  rng = np.random.default_rng(0)
  w = rng.standard_normal((3, 64, 40)).astype(np.float32)  # [layers, in, out]
  q, scale = quant.quantize_int8(w, xp=np)
  expect_scale = np.abs(w).max(axis=1, keepdims=True) / 127.0  # one scale per output column
  np.testing.assert_allclose(scale, expect_scale, rtol=1e-7)
  assert q.dtype == np.int8 and np.abs(q).max(axis=1).min() == 127  # absmax maps to +-127
  assert np.all(np.abs(q * scale - w) <= scale / 2 + 1e-7)


def test_int4_packing_is_exact_and_nibble_ordered():
  rng = np.random.default_rng(1)
  q = rng.integers(-8, 8, (2, 10, 6)).astype(np.int8)
  np.testing.assert_array_equal(quant.unpack_int4(quant.pack_int4(q, np), np), q)
  # Row 0 -> low nibble, row 1 -> high nibble: 1 and -2 (0xE) pack to 0xE1.
  assert quant.pack_int4(np.array([[1], [-2]], np.int8), np).tolist() == [[0xE1]]


def test_int4_group_scales_bound_the_error():
  rng = np.random.default_rng(2)
  w = rng.standard_normal((256, 24)).astype(np.float32)
  packed, scale = quant.quantize_int4(w, group_size=64, xp=np)
  assert packed.shape == (128, 24) and packed.dtype == np.uint8 and scale.shape == (4, 24)
  groups = w.reshape(4, 64, 24)
  np.testing.assert_allclose(scale, np.abs(groups).max(axis=1) / 7.0, rtol=1e-3)  # fp16 scales
  t = quant.quantize_tensor("lm_head", w, "int4", group_size=64, xp=np)
  err = np.abs(np.asarray(t.dequantize()) - w).reshape(4, 64, 24)
  assert np.all(err <= scale.astype(np.float32)[:, None, :] / 2 + 1e-6)
  assert t.nbytes == 128 * 24 + 4 * 24 * 2


def test_int8_linear_layers_forward_equals_dequantized_model(model):
  cfg, params = model
  q = quant.quantize_params(params, "int8")
  assert quant.is_quantized(q["layers"]["mlp"]["down_proj"]["kernel"])
  assert not quant.is_quantized(q["embed_tokens"]) and not quant.is_quantized(q["lm_head"])
  fwd = jax.jit(lambda p, t: BaichuanLM(cfg).apply({"params": p}, t))
  tokens = jnp.array([[5, 6, 7, 8, 9, 10]])
  np.testing.assert_allclose(fwd(q, tokens), fwd(_dequantized(q), tokens), rtol=2e-4, atol=2e-4)
  # And it is a real approximation of the float model, not the float model itself.
  diff = np.abs(np.asarray(fwd(q, tokens) - fwd(params, tokens))).max()
  assert 0 < diff < 0.1 * np.abs(np.asarray(fwd(params, tokens))).max()


def test_int4_everything_generates_like_dequantized_model(model):
  cfg, params = model
  q = quant.quantize_params(params, "int4", group_size=64, embedding=True, head=True)
  assert quant.is_quantized(q["embed_tokens"]) and quant.is_quantized(q["lm_head"])
  prompts = [[5, 6, 7], [8, 9, 10, 11]]
  got = generate(cfg, q, prompts, max_new_tokens=6, stop_token_ids=[])
  ref = generate(cfg, _dequantized(q), prompts, max_new_tokens=6, stop_token_ids=[])
  assert [g.tokens for g in got] == [r.tokens for r in ref]


def test_quantize_while_loading_hf_checkpoint(model, tmp_path):
  cfg, params = model
  host = jax.tree.map(np.asarray, params)
  hf.save(cfg, host, tmp_path / "ckpt")
  transform = quant.tensor_transform("int8", head=True)
  _, loaded = hf.load(tmp_path / "ckpt", tensor_transform=transform, progress=False)
  for path in (("layers", "self_attn", "W_pack", "kernel"), ("layers", "mlp", "down_proj", "kernel"),
               ("lm_head",)):
    got = functools.reduce(lambda t, k: t[k], path, loaded)
    expect = quant.quantize_tensor("/".join(path), functools.reduce(lambda t, k: t[k], path, host),
                                   "int8", xp=np)
    assert isinstance(got.q, np.ndarray)  # quantized on the host, one tensor at a time
    assert (got.in_shape, got.out_shape) == (expect.in_shape, expect.out_shape)
    np.testing.assert_array_equal(got.q, expect.q)
    np.testing.assert_array_equal(got.scale, expect.scale)
  assert isinstance(loaded["embed_tokens"], np.ndarray)  # embedding left in float


def test_memory_table_matches_hand_count():
  row = {r["preset"]: r for r in quant.memory_table(("baichuan2-13b",))}["baichuan2-13b"]
  e, f, layers, v = 5120, 13696, 40, 125696
  linear_in_out = [(e, 3 * e), (e, e), (e, f), (e, f), (f, e)]  # W_pack, o_proj, gate, up, down
  n_linear = layers * sum(i * o for i, o in linear_in_out)
  other = 2 * v * e + (2 * layers + 1) * e  # embedding, head, norms stay bf16
  assert row["bf16"] == 2 * (n_linear + other) == 2 * configs.param_counts(
      configs.get("baichuan2-13b"))["total"]
  int8_scales = layers * sum(4 * o for _, o in linear_in_out)  # fp32, one per output channel
  assert row["int8"] == n_linear + int8_scales + 2 * other
  int4_scales = layers * sum(2 * (i // 128) * o for i, o in linear_in_out)  # fp16 per 128 inputs
  assert row["int4"] == n_linear // 2 + int4_scales + 2 * other
  # Published Baichuan2-13B footprints: 26.0 / 15.8 / 9.7 GB; ours are at or below them (GiB).
  assert row["int8"] / 2**30 <= 15.8 and row["int4"] / 2**30 <= 9.7


def test_bad_kind_and_group_size_raise():
  with pytest.raises(ValueError, match="int3"):
    quant.tensor_transform("int3")
  with pytest.raises(ValueError, match="group size"):
    quant.quantize_tensor("lm_head", np.zeros((96, 8), np.float32), "int4", group_size=64, xp=np)
  with pytest.raises(ValueError, match="not a quantizable"):
    quant.quantize_tensor("norm/weight", np.zeros((8,), np.float32), "int8", xp=np)
