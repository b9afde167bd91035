"""Complete Hugging Face exports: for each of the four families a tiny model is exported and loaded
with transformers' Auto classes (the project's own remote code), and `--format llama` in plain
`LlamaForCausalLM`; logits, greedy tokens and tokenizer ids equal the project's."""

import json
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from baichuan_jax import configs, hf
from baichuan_jax.checkpoint import CheckpointManager, checkpoint_dir
from baichuan_jax.infer import generate, loading
from baichuan_jax.model import BaichuanLM, init_params
from baichuan_jax.tokenizer import Tokenizer
from tests.hf_helpers import train_released_like

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from safetensors.numpy import load_file as st_load_numpy  # noqa: E402

V = 800
FAMILIES = {  # family -> (position scheme, NormHead, released architecture name)
    "baichuan-7b": ("rope", False, "BaiChuanForCausalLM"),
    "baichuan-13b": ("alibi", False, "BaichuanForCausalLM"),
    "baichuan2-7b": ("rope", True, "BaichuanForCausalLM"),
    "baichuan2-13b": ("alibi", True, "BaichuanForCausalLM"),
}


def _cfg(family, **kw):
  pos, norm_head, _ = FAMILIES[family]
  # 6 heads: ALiBi slopes of a non-power-of-two head count.
  return configs.get("tiny", vocab_size=V, hidden_size=96, num_heads=6, num_kv_heads=6,
                     num_layers=2, intermediate_size=256, max_seq_len=64, dtype="float32",
                     position_embedding=pos, norm_head=norm_head, **kw)


def _params(cfg, seed=0):
  shapes = jax.eval_shape(lambda: init_params(cfg, jax.random.PRNGKey(0)))
  rng = np.random.default_rng(seed)

  def draw(path, x):
    offset = 1.0 if "norm" in jax.tree_util.keystr(path) else 0.0
    return (offset + 0.1 * rng.standard_normal(x.shape)).astype(x.dtype)
  params = jax.tree_util.tree_map_with_path(draw, shapes)
  # Head rows of very different norms: a NormHead that is skipped or applied twice cannot pass.
  params["lm_head"] = params["lm_head"] * np.linspace(0.2, 5.0, cfg.vocab_size, dtype=np.float32)
  return params


def _logits(cfg, params, tokens):
  return np.asarray(BaichuanLM(cfg).apply({"params": params}, jnp.asarray(tokens)))


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory):
  return train_released_like(tmp_path_factory.mktemp("tok") / "tokenizer.model", vocab_size=V)


def _expected_names(family, layers=2):
  """The released state-dict names of a family (Baichuan-7B adds its RoPE buffers)."""
  names = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
  for i in range(layers):
    p = f"model.layers.{i}."
    names |= {p + n + ".weight" for n in ("input_layernorm", "post_attention_layernorm",
                                          "self_attn.W_pack", "self_attn.o_proj", "mlp.gate_proj",
                                          "mlp.up_proj", "mlp.down_proj")}
    if family == "baichuan-7b":
      names.add(p + "self_attn.rotary_emb.inv_freq")
  return names


@pytest.mark.parametrize("family", list(FAMILIES))
def test_export_loads_with_auto_classes(family, tok_path, tmp_path):
  cfg, (pos, norm_head, arch) = _cfg(family), FAMILIES[family]
  params = _params(cfg)
  hf.save(cfg, params, tmp_path, tokenizer=tok_path)
  for f in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.model",
            "tokenizer_config.json", "special_tokens_map.json", "configuration_baichuan.py",
            "modeling_baichuan.py", "tokenization_baichuan.py"):
    assert (tmp_path / f).is_file(), f
  c = json.loads((tmp_path / "config.json").read_text())
  assert c["architectures"] == [arch] and c["model_type"] == "baichuan"
  spelled = arch[: -len("ForCausalLM")]
  assert c["auto_map"] == {"AutoConfig": f"configuration_baichuan.{spelled}Config",
                           "AutoModelForCausalLM": f"modeling_baichuan.{arch}"}
  assert ("max_position_embeddings" in c) == (pos == "rope")
  assert ("model_max_length" in c) == (pos == "alibi" or norm_head)
  g = json.loads((tmp_path / "generation_config.json").read_text())
  assert (g["user_token_id"], g["assistant_token_id"], g["max_new_tokens"]) == (195, 196, 2048)
  assert (g["temperature"], g["top_k"], g["top_p"]) == (0.3, 5, 0.85)
  assert g["repetition_penalty"] == (1.1 if family == "baichuan-13b" else 1.05)
  t = json.loads((tmp_path / "tokenizer_config.json").read_text())
  assert t["add_bos_token"] is False and t["add_eos_token"] is False
  sd = st_load_numpy(str(tmp_path / "model.safetensors"))
  assert set(sd) == _expected_names(family)

  model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=True,
                                                            dtype=torch.float32).eval()
  assert type(model).__name__ == arch
  # The weights load strictly: same names, shapes and persistent buffers.
  model.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in sd.items()}, strict=True)
  tokens = np.random.default_rng(1).integers(0, V, (2, 13))
  with torch.no_grad():
    ref = model(torch.as_tensor(tokens)).logits.numpy()
  assert np.abs(_logits(cfg, params, tokens) - ref).max() <= 1e-4
  # Greedy decoding through transformers' generate (with its KV cache) gives our tokens (one RoPE
  # and one ALiBi family: each costs a compilation of our decoder).
  prompt = [5, 77, 300, 12]
  if family in ("baichuan-7b", "baichuan2-13b"):
    _check_greedy(model, cfg, params, prompt)
  _check_tokenizer(tmp_path, tok_path)


def _check_greedy(model, cfg, params, prompt):
  with torch.no_grad():
    out = model.generate(torch.as_tensor([prompt]), max_new_tokens=6, do_sample=False,
                         repetition_penalty=1.0, top_k=None, top_p=None, temperature=None)
  ours = generate(cfg, params, [prompt], max_new_tokens=6, temperature=0.0, stop_token_ids=[])[0]
  assert out[0, len(prompt):].tolist() == ours.tokens


def _check_tokenizer(tmp_path, tok_path):
  at = transformers.AutoTokenizer.from_pretrained(tmp_path, trust_remote_code=True)
  ours_tok = Tokenizer(tok_path)
  text = "The function returns a list of 42 values.\n    return x"
  assert at(text)["input_ids"] == ours_tok.encode(text)  # no BOS/EOS added, same pieces
  assert at.decode(ours_tok.encode(text)) == text
  assert (at.bos_token_id, at.eos_token_id, at.pad_token_id) == (1, 2, 0)


def test_inv_freq_and_rope_theta_warning(tmp_path):
  cfg = _cfg("baichuan-7b")
  hf.save(cfg, _params(cfg), tmp_path / "a")
  inv = st_load_numpy(str(tmp_path / "a" / "model.safetensors"))[
      "model.layers.1.self_attn.rotary_emb.inv_freq"]
  d = 96 // 6
  np.testing.assert_allclose(inv, 1.0 / 10000 ** (np.arange(0, d, 2) / d), rtol=1e-6)
  assert inv.dtype == np.float32
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # the default base exports silently
    hf.save(cfg, _params(cfg), tmp_path / "b")
  theta = _cfg("baichuan2-7b", rope_theta=500000.0)
  with pytest.warns(UserWarning, match="hard-codes RoPE base 10000"):
    hf.save(theta, _params(theta), tmp_path / "c")
  # Our remote code honours the exported base.
  model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "c", trust_remote_code=True,
                                                            dtype=torch.float32).eval()
  tokens = np.random.default_rng(2).integers(0, V, (1, 20))
  with torch.no_grad():
    ref = model(torch.as_tensor(tokens)).logits.numpy()
  assert np.abs(_logits(theta, _params(theta), tokens) - ref).max() <= 1e-4


@pytest.mark.parametrize("family", ["baichuan-7b", "baichuan2-7b"])
def test_llama_format_loads_in_plain_llama(family, tok_path, tmp_path):
  cfg = _cfg(family)
  params = _params(cfg, seed=4)
  hf.save(cfg, params, tmp_path, fmt="llama", tokenizer=tok_path)
  c = json.loads((tmp_path / "config.json").read_text())
  assert c["architectures"] == ["LlamaForCausalLM"] and "auto_map" not in c
  assert not (tmp_path / "modeling_baichuan.py").exists()
  _check_tokenizer(tmp_path, tok_path)  # the tokenizer still needs the exported tokenizer code
  model = transformers.LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
  assert set(model.state_dict()) - {"model.rotary_emb.inv_freq"} == set(
      st_load_numpy(str(tmp_path / "model.safetensors")))
  tokens = np.random.default_rng(3).integers(0, V, (2, 11))
  with torch.no_grad():
    ref = model(torch.as_tensor(tokens)).logits.numpy()
  assert np.abs(_logits(cfg, params, tokens) - ref).max() <= 1e-4
  with pytest.raises(ValueError, match="fmt='llama' needs a RoPE model"):
    hf.save(_cfg("baichuan2-13b"), _params(_cfg("baichuan2-13b")), tmp_path / "x", fmt="llama")


def test_convert_a_workdir_then_load_in_transformers(tok_path, tmp_path):
  cfg = _cfg("baichuan2-13b")
  params = _params(cfg, seed=5)
  work = tmp_path / "run"
  loading.describe_workdir(work, cfg, tok_path)
  mgr = CheckpointManager(checkpoint_dir(str(work)), async_save=False)
  mgr.save(7, {"params": params, "step": np.int32(7)})
  mgr.close()
  hf.main(["convert", str(work), str(tmp_path / "hf")])
  assert (tmp_path / "hf" / "tokenizer.model").read_bytes() == open(tok_path, "rb").read()
  model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", trust_remote_code=True,
                                                            dtype=torch.float32).eval()
  tokens = np.random.default_rng(6).integers(0, V, (1, 9))
  with torch.no_grad():
    ref = model(torch.as_tensor(tokens)).logits.numpy()
  assert np.abs(_logits(cfg, params, tokens) - ref).max() <= 1e-4
  with pytest.raises(SystemExit):
    hf.main(["convert", str(work), str(tmp_path / "ll"), "--format", "llama"])  # ALiBi
