"""The model against an independent implementation: transformers' `LlamaForCausalLM` (eager
attention, fp32) with as many, fewer (GQA) or one (MQA) key/value heads, full forward and the
KV-cache decode path. The weights are mapped here from the torch layout, not through `hf.py`."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from baichuan_jax import configs
from baichuan_jax.model import BaichuanLM, init_cache, init_params

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

VOCAB, HIDDEN, HEADS, FFN, LAYERS = 320, 64, 4, 176, 2
D = HIDDEN // HEADS


@pytest.fixture(autouse=True)
def _fp32_matmuls():
  # Full fp32 dots on any backend (a GPU's default fp32 precision rounds inputs to TF32).
  with jax.default_matmul_precision("highest"):
    yield


def _llama(num_kv_heads, seed=0):
  """A random fp32 LLaMA (RoPE, rotate-half, SwiGLU, RMSNorm 1e-6, no biases, untied head)."""
  cfg = transformers.LlamaConfig(
      vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS,
      num_attention_heads=HEADS, num_key_value_heads=num_kv_heads, max_position_embeddings=64,
      rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False, attention_bias=False,
      mlp_bias=False, hidden_act="silu", attn_implementation="eager")
  torch.manual_seed(seed)
  model = transformers.LlamaForCausalLM(cfg).eval()
  with torch.no_grad():  # larger than the 0.02 init so that attention is far from uniform
    for name, p in model.named_parameters():
      p.copy_((1.0 if "norm" in name else 0.0) + 0.15 * torch.randn_like(p))
  return model


def _params_from_llama(model, num_kv_heads):
  """The torch state dict in this package's tree: kernels are [in, out] with heads split out."""
  sd = {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}
  layer = lambda i, n: sd[f"model.layers.{i}.{n}.weight"]  # noqa: E731

  def attn(i):
    q = layer(i, "self_attn.q_proj").T.reshape(HIDDEN, HEADS, D)  # [embed, heads, head_dim]
    k = layer(i, "self_attn.k_proj").T.reshape(HIDDEN, num_kv_heads, D)
    v = layer(i, "self_attn.v_proj").T.reshape(HIDDEN, num_kv_heads, D)
    out = {"o_proj": {"kernel": layer(i, "self_attn.o_proj").T.reshape(HEADS, D, HIDDEN)}}
    if num_kv_heads == HEADS:  # fused [embed, 3, heads, head_dim]
      out["W_pack"] = {"kernel": np.stack([q, k, v], axis=1)}
    else:  # [embed, heads, head_dim] and [embed, 2, kv_heads, head_dim]
      out["q_proj"] = {"kernel": q}
      out["kv_proj"] = {"kernel": np.stack([k, v], axis=1)}
    return out

  per_layer = [{
      "input_layernorm": {"weight": layer(i, "input_layernorm")},
      "post_attention_layernorm": {"weight": layer(i, "post_attention_layernorm")},
      "mlp": {n: {"kernel": layer(i, f"mlp.{n}").T} for n in ("gate_proj", "up_proj", "down_proj")},
      "self_attn": attn(i),
  } for i in range(LAYERS)]
  stacked = jax.tree.map(lambda *xs: np.stack(xs), *per_layer)
  return {"embed_tokens": sd["model.embed_tokens.weight"], "layers": stacked,
          "norm": {"weight": sd["model.norm.weight"]}, "lm_head": sd["lm_head.weight"].T}


def _ours(num_kv_heads):
  return configs.get("tiny", vocab_size=VOCAB, hidden_size=HIDDEN, num_heads=HEADS,
                     num_kv_heads=num_kv_heads, intermediate_size=FFN, num_layers=LAYERS,
                     max_seq_len=64, norm_head=False, z_loss_weight=0.0, dtype="float32")


@pytest.fixture(scope="module", params=[4, 2, 1], ids=["mha", "gqa", "mqa"])
def pair(request):
  kvh = request.param
  llama = _llama(kvh)
  cfg = _ours(kvh)
  params = jax.tree.map(jnp.asarray, _params_from_llama(llama, kvh))
  # The tree must be exactly the one the model initialises (no missing or extra leaves).
  init = jax.eval_shape(lambda: init_params(cfg, jax.random.PRNGKey(0)))
  assert jax.tree.map(jnp.shape, params) == jax.tree.map(lambda x: x.shape, init)
  tokens = np.random.default_rng(kvh).integers(0, VOCAB, (2, 14))
  with torch.no_grad():
    want = llama(torch.from_numpy(tokens)).logits.numpy()
  return cfg, params, tokens, want


def test_forward_matches_transformers_llama(pair):
  cfg, params, tokens, want = pair
  got = np.asarray(jax.jit(BaichuanLM(cfg).apply)({"params": params}, jnp.asarray(tokens)))
  assert np.abs(want).max() > 1.0  # a non-degenerate reference
  # Query head h reads kv head h // (heads // kv_heads), as HF's repeat_kv; the interleaved
  # h % kv_heads grouping gives logits ~6 off here, fp32 rounding ~6e-6.
  np.testing.assert_allclose(got, want, rtol=0, atol=2e-5)


@pytest.mark.parametrize("unroll", [False, True], ids=["scan", "unrolled"])
def test_kv_cache_decode_matches_transformers_llama(pair, unroll):
  # A 6-token prompt into a 16-slot cache, then one token per step: every step's logits equal
  # the reference's full forward at that position (so the cached GQA keys are grouped right).
  cfg, params, tokens, want = pair
  apply = jax.jit(BaichuanLM(cfg, unroll_layers=unroll).apply)
  cache = init_cache(cfg, tokens.shape[0], 16)
  logits, cache = apply({"params": params}, jnp.asarray(tokens[:, :6]), cache=cache)
  steps = [np.asarray(logits)]
  for t in range(6, tokens.shape[1]):
    logits, cache = apply({"params": params}, jnp.asarray(tokens[:, t:t + 1]), cache=cache)
    steps.append(np.asarray(logits))
  np.testing.assert_allclose(np.concatenate(steps, axis=1), want, rtol=0, atol=2e-5)
  assert cache.k[0].shape == (2, cfg.num_kv_heads, 16, D)
  assert int(cache.index) == tokens.shape[1]
