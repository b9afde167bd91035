"""Hugging Face checkpoint import/export: parity with transformers' LLaMA and a torch ALiBi/NormHead
reference, exact save/load round trips, the position/NormHead inference rule and bad input."""

import json
import math

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from baichuan_jax import configs, hf
from baichuan_jax.model import BaichuanLM, init_params

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from safetensors.numpy import load_file as st_load_numpy  # noqa: E402
from safetensors.torch import save_file as st_save_torch  # noqa: E402

F = torch.nn.functional


def _init(cfg, seed, std=0.1):
  """Random params with `init_params`' tree and dtypes; norm scales around 1 (numpy: fast)."""
  shapes = jax.eval_shape(lambda: init_params(cfg, jax.random.PRNGKey(0)))
  rng = np.random.default_rng(seed)

  def draw(path, x):
    offset = 1.0 if "norm" in jax.tree_util.keystr(path) else 0.0
    return (offset + std * rng.standard_normal(x.shape)).astype(x.dtype)
  return jax.tree_util.tree_map_with_path(draw, shapes)


def _logits(cfg, params, tokens):
  return np.asarray(jax.jit(BaichuanLM(cfg).apply)({"params": params}, jnp.asarray(tokens)))


def _baichuan_state_dict(llama_sd):
  """LLaMA names -> Baichuan names: q, k, v fused row-wise into W_pack as the HF code does."""
  out = {}
  for name, t in llama_sd.items():
    if name.endswith(("q_proj.weight", "k_proj.weight", "rotary_emb.inv_freq")):
      continue
    if name.endswith("v_proj.weight"):
      pre = name[: -len("v_proj.weight")]
      out[pre + "W_pack.weight"] = torch.cat(
          [llama_sd[pre + "q_proj.weight"], llama_sd[pre + "k_proj.weight"], t], dim=0)
    else:
      out[name] = t
  return {k: v.contiguous() for k, v in out.items()}


def _write_bin_shards(sd, root, parts):
  """torch.save shards + pytorch_model.bin.index.json, as `save_pretrained` lays them out."""
  names = list(sd)
  chunks = [names[i::parts] for i in range(parts)]
  weight_map = {}
  for k, chunk in enumerate(chunks):
    fname = f"pytorch_model-{k + 1:05d}-of-{parts:05d}.bin"
    torch.save({n: sd[n].clone() for n in chunk}, root / fname)
    weight_map.update({n: fname for n in chunk})
  (root / hf.BIN_INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def _write_st_shards(sd, root, parts):
  names = list(sd)
  weight_map = {}
  for k in range(parts):
    fname = f"model-{k + 1:05d}-of-{parts:05d}.safetensors"
    st_save_torch({n: sd[n] for n in names[k::parts]}, str(root / fname), metadata={"format": "pt"})
    weight_map.update({n: fname for n in names[k::parts]})
  (root / hf.SAFETENSORS_INDEX).write_text(json.dumps({"weight_map": weight_map}))


LLAMA = dict(vocab_size=320, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
             num_attention_heads=4)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
  """A random tiny LlamaForCausalLM, its logits, and Baichuan-format copies of it on disk."""
  torch.manual_seed(0)
  lcfg = transformers.LlamaConfig(
      **LLAMA, num_key_value_heads=4, max_position_embeddings=128, rms_norm_eps=1e-6,
      rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, tie_word_embeddings=False,
      attention_bias=False, mlp_bias=False, initializer_range=0.1, pad_token_id=0)
  lcfg._attn_implementation = "eager"  # pylint: disable=protected-access
  model = transformers.LlamaForCausalLM(lcfg).eval().float()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name:  # non-trivial norm scales so a mis-mapped norm cannot pass
        p.copy_(1 + 0.2 * torch.randn_like(p))
  tokens = np.random.default_rng(0).integers(0, LLAMA["vocab_size"], (2, 11))
  with torch.no_grad():
    ref = model(torch.as_tensor(tokens)).logits.numpy()
  sd = _baichuan_state_dict(model.state_dict())
  config = {"architectures": ["BaiChuanForCausalLM"], "model_type": "baichuan", **LLAMA,
            "max_position_embeddings": 128, "rms_norm_eps": 1e-6, "hidden_act": "silu",
            "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": False}
  st_dir = tmp_path_factory.mktemp("llama_st")
  st_save_torch(sd, str(st_dir / "model.safetensors"), metadata={"format": "pt"})
  (st_dir / "config.json").write_text(json.dumps(config))
  bin_dir = tmp_path_factory.mktemp("llama_bin")
  _write_bin_shards(sd, bin_dir, parts=3)
  (bin_dir / "config.json").write_text(json.dumps(config))
  return dict(model=model, sd=sd, tokens=tokens, ref=ref, st=st_dir, bin=bin_dir, config=config)


@pytest.mark.parametrize("fmt", ["st", "bin"])
def test_llama_parity(llama, fmt):
  cfg, params = hf.load(llama[fmt], overrides={"dtype": "float32"})
  assert cfg.position_embedding == "rope" and not cfg.norm_head
  assert cfg.param_dtype == "float32" and cfg.max_seq_len == 128
  n = sum(x.size for x in jax.tree.leaves(params))
  assert n == sum(p.numel() for p in llama["model"].parameters())
  got = _logits(cfg, params, llama["tokens"])
  assert np.abs(got - llama["ref"]).max() <= 1e-4


def test_export_loads_into_transformers_llama(llama, tmp_path):
  """Our params -> save -> split W_pack -> LlamaForCausalLM gives our logits (export parity)."""
  cfg = configs.get("tiny", vocab_size=320, hidden_size=64, intermediate_size=176, num_layers=2,
                    num_heads=4, num_kv_heads=4, norm_head=False, dtype="float32")
  params = _init(cfg, 3)
  hf.save(cfg, params, tmp_path)
  sd = st_load_numpy(str(tmp_path / "model.safetensors"))
  llama_sd = {}
  for name, arr in sd.items():
    t = torch.from_numpy(arr.copy())
    if name.endswith("rotary_emb.inv_freq"):  # Baichuan-7B's buffers; LLaMA computes its own
      continue
    if name.endswith("W_pack.weight"):
      pre = name[: -len("W_pack.weight")]
      for part, q in zip(("q_proj", "k_proj", "v_proj"), t.chunk(3, dim=0)):
        llama_sd[pre + part + ".weight"] = q
    else:
      llama_sd[name] = t
  lcfg = transformers.LlamaConfig(
      **LLAMA, num_key_value_heads=4, max_position_embeddings=256, rms_norm_eps=1e-6,
      rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, tie_word_embeddings=False)
  lcfg._attn_implementation = "eager"  # pylint: disable=protected-access
  model = transformers.LlamaForCausalLM(lcfg).eval()
  missing, unexpected = model.load_state_dict(llama_sd, strict=False)
  assert not unexpected and all("rotary" in m for m in missing)
  tokens = np.random.default_rng(1).integers(0, 320, (1, 9))
  with torch.no_grad():
    ref = model(torch.as_tensor(tokens)).logits.numpy()
  assert np.abs(_logits(cfg, params, tokens) - ref).max() <= 1e-4


# ----------------------------------------------------------------------------------------------
# ALiBi + NormHead against a torch reference written from the published formulas.

# 6 heads (not a power of two): the 4-head slopes 2^(-8k/4) = 2^-2, 2^-4, 2^-6, 2^-8, then every
# other slope of the 8-head set 2^(-k), k = 1, 3.
SLOPES_6 = [2**-2, 2**-4, 2**-6, 2**-8, 2**-1, 2**-3]


def _torch_alibi_normhead(sd, cfg, tokens):
  """Baichuan-13B/2 forward as published: pre-norm, W_pack, ALiBi, SwiGLU, NormHead."""
  e, h = cfg["hidden_size"], cfg["num_attention_heads"]
  d = e // h
  slopes = torch.tensor(SLOPES_6, dtype=torch.float64)

  def norm(x, w):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + cfg["rms_norm_eps"]) * w

  x = sd["model.embed_tokens.weight"][tokens]
  s = tokens.shape[1]
  i = torch.arange(s)
  dist = (i[:, None] - i[None, :]).double()
  bias = -slopes[:, None, None] * dist  # [heads, q, k]
  bias = bias.masked_fill(dist < 0, float("-inf"))
  for l in range(cfg["num_hidden_layers"]):
    p = lambda n: sd[f"model.layers.{l}.{n}.weight"]
    y = norm(x, p("input_layernorm"))
    q, k, v = (y @ p("self_attn.W_pack").T).split(e, dim=-1)
    q, k, v = (t.reshape(t.shape[0], s, h, d).transpose(1, 2) for t in (q, k, v))
    att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d) + bias, dim=-1)
    o = (att @ v).transpose(1, 2).reshape(x.shape)
    x = x + o @ p("self_attn.o_proj").T
    y = norm(x, p("post_attention_layernorm"))
    x = x + (F.silu(y @ p("mlp.gate_proj").T) * (y @ p("mlp.up_proj").T)) @ p("mlp.down_proj").T
  x = norm(x, sd["model.norm.weight"])
  return x @ F.normalize(sd["lm_head.weight"], dim=1).T


def test_alibi_normhead_parity(tmp_path):
  config = {"architectures": ["BaichuanForCausalLM"], "hidden_size": 96, "intermediate_size": 256,
            "num_attention_heads": 6, "num_hidden_layers": 2, "vocab_size": 300,
            "model_max_length": 64, "rms_norm_eps": 1e-6, "z_loss_weight": 0,
            "tie_word_embeddings": False}
  gen = torch.Generator().manual_seed(0)
  e, f, v = 96, 256, 300
  shapes = {"model.embed_tokens.weight": (v, e), "model.norm.weight": (e,), "lm_head.weight": (v, e)}
  for l in range(2):
    pre = f"model.layers.{l}."
    shapes.update({pre + "input_layernorm.weight": (e,), pre + "post_attention_layernorm.weight": (e,),
                   pre + "self_attn.W_pack.weight": (3 * e, e), pre + "self_attn.o_proj.weight": (e, e),
                   pre + "mlp.gate_proj.weight": (f, e), pre + "mlp.up_proj.weight": (f, e),
                   pre + "mlp.down_proj.weight": (e, f)})
  sd = {n: (1 + 0.2 * torch.randn(s, generator=gen)) if len(s) == 1 else
        0.15 * torch.randn(s, generator=gen) for n, s in shapes.items()}
  # Rows of very different norms: NormHead changes the logits a lot, so skipping it would fail.
  sd["lm_head.weight"] *= torch.linspace(0.2, 5.0, v)[:, None]
  _write_st_shards(sd, tmp_path, parts=2)
  (tmp_path / "config.json").write_text(json.dumps(config))

  cfg, params = hf.load(tmp_path, overrides={"dtype": "float32"})
  assert cfg.position_embedding == "alibi" and cfg.norm_head and cfg.max_seq_len == 64
  tokens = np.random.default_rng(2).integers(0, v, (2, 13))
  with torch.no_grad():
    ref = _torch_alibi_normhead({k: t.double() for k, t in sd.items()}, config,
                                torch.as_tensor(tokens)).numpy()
  got = _logits(cfg, params, tokens)
  assert np.abs(got - ref).max() <= 1e-4
  # The NormHead weight is loaded as trained (not pre-normalised).
  np.testing.assert_array_equal(params["lm_head"], sd["lm_head.weight"].numpy().T)


# ----------------------------------------------------------------------------------------------
# Round trips.


def _bits(x):
  x = np.asarray(x)
  return x.view(np.uint8)


MODEL_FIELDS = ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
                "intermediate_size", "max_seq_len", "position_embedding", "rope_theta", "norm_head",
                "rms_norm_eps", "z_loss_weight", "init_std", "pad_id", "bos_id", "eos_id",
                "user_token_id", "assistant_token_id")


@pytest.mark.parametrize("pos,dtype", [("rope", "float32"), ("alibi", "bfloat16")])
def test_save_load_round_trip_is_exact(tmp_path, pos, dtype):
  cfg = configs.get("tiny", num_layers=2, position_embedding=pos, param_dtype=dtype, max_seq_len=200)
  params = _init(cfg, 0)
  files = hf.save(cfg, jax.tree.map(jnp.asarray, params), tmp_path, shard_size="1MB")  # jax arrays in
  shards = [f for f in files if f.suffix == ".safetensors"]
  assert len(shards) > 1 and (tmp_path / hf.SAFETENSORS_INDEX).exists()
  hf_cfg = json.loads((tmp_path / "config.json").read_text())
  assert hf_cfg["architectures"] == ["BaichuanForCausalLM"] and hf_cfg["tie_word_embeddings"] is False
  assert (hf_cfg["pad_token_id"], hf_cfg["bos_token_id"], hf_cfg["eos_token_id"]) == (0, 1, 2)
  assert ("max_position_embeddings" in hf_cfg) == (pos == "rope")
  # Baichuan2-7B's config carries both length fields (its chat code reads model_max_length).
  assert ("model_max_length" in hf_cfg) == (pos == "alibi" or cfg.norm_head)
  assert hf_cfg["z_loss_weight"] == 2e-4

  cfg2, params2 = hf.load(tmp_path)
  for field in MODEL_FIELDS:
    assert cfg2[field] == cfg[field], field
  assert cfg2.param_dtype == dtype
  flat, flat2 = jax.tree_util.tree_flatten_with_path(params)[0], jax.tree_util.tree_flatten_with_path(params2)[0]
  assert [p for p, _ in flat] == [p for p, _ in flat2]
  for (path, a), (_, b) in zip(flat, flat2):
    assert np.asarray(a).dtype == b.dtype and a.shape == b.shape, path
    np.testing.assert_array_equal(_bits(a), _bits(b), err_msg=str(path))

  # The files are standard safetensors: the reference reader sees HF layouts.
  ref = {}
  for f in shards:
    ref.update(st_load_numpy(str(f)))
  e, h = cfg.hidden_size, cfg.num_heads
  w_pack = np.asarray(params["layers"]["self_attn"]["W_pack"]["kernel"][1])  # [E, 3, H, D]
  np.testing.assert_array_equal(ref["model.layers.1.self_attn.W_pack.weight"],
                                w_pack.reshape(e, 3 * e).T)
  np.testing.assert_array_equal(ref["lm_head.weight"], np.asarray(params["lm_head"]).T)
  np.testing.assert_array_equal(ref["model.layers.0.mlp.down_proj.weight"],
                                np.asarray(params["layers"]["mlp"]["down_proj"]["kernel"][0]).T)
  assert len(ref) == 3 + 7 * cfg.num_layers and h == 4


def test_load_dtype_and_tensor_transform(llama):
  _, p32 = hf.load(llama["st"])
  seen = []

  def quantize(name, x):
    seen.append((name, x.shape, x.dtype))
    return {"q": np.round(x.astype(np.float32) * 100).astype(np.int32), "scale": 0.01}

  cfg, q = hf.load(llama["st"], dtype=jnp.bfloat16, tensor_transform=quantize)
  assert cfg.param_dtype == "bfloat16"
  expect = hf.param_names(cfg)
  assert [n for n, _, _ in seen] == list(expect)
  assert all(dt == ml_dtypes.bfloat16 for _, _, dt in seen)
  # bf16 rounding by ml_dtypes (numpy) matches XLA's convert.
  _, pbf = hf.load(llama["st"], dtype="bfloat16")
  ref = np.asarray(jnp.asarray(p32["layers"]["mlp"]["up_proj"]["kernel"]).astype(jnp.bfloat16))
  np.testing.assert_array_equal(_bits(pbf["layers"]["mlp"]["up_proj"]["kernel"]), _bits(ref))
  np.testing.assert_array_equal(
      q["lm_head"]["q"], np.round(pbf["lm_head"].astype(np.float32) * 100).astype(np.int32))


def test_bf16_bin_loads_as_bf16(llama, tmp_path):
  sd = {k: t.to(torch.bfloat16) for k, t in llama["sd"].items()}
  torch.save(sd, tmp_path / "pytorch_model.bin")
  (tmp_path / "config.json").write_text(json.dumps(llama["config"]))
  cfg, params = hf.load(tmp_path)
  assert cfg.param_dtype == "bfloat16"
  got = params["layers"]["self_attn"]["o_proj"]["kernel"][1].astype(np.float32)  # [H, D, E]
  want = sd["model.layers.1.self_attn.o_proj.weight"].float().numpy()  # [E, H*D]
  np.testing.assert_array_equal(got.reshape(-1, 64).T, want)


# ----------------------------------------------------------------------------------------------
# Position / NormHead inference.


@pytest.mark.parametrize("fields,expected", [
    ({"max_position_embeddings": 4096, "hidden_size": 4096, "num_hidden_layers": 32}, "rope"),  # Baichuan-7B
    ({"model_max_length": 4096, "hidden_size": 5120, "num_hidden_layers": 40}, "alibi"),  # Baichuan-13B
    ({"max_position_embeddings": 4096, "model_max_length": 4096, "hidden_size": 4096}, "rope"),  # Baichuan2-7B
    ({"hidden_size": 5120, "num_hidden_layers": 40}, "alibi"),  # no length field: 13B-shaped
    ({"hidden_size": 4096, "num_hidden_layers": 32}, "rope"),
    ({"hidden_size": 5120, "num_hidden_layers": 40, "max_position_embeddings": 4096}, "rope"),
    ({"model_max_length": 4096, "position_embedding": "rope"}, "rope"),  # recorded field wins
])
def test_infer_position_embedding(fields, expected):
  assert hf.infer_position_embedding(fields) == expected


@pytest.mark.parametrize("fields,expected", [
    ({"vocab_size": 125_696}, True), ({"vocab_size": 64_000}, False),
    ({"vocab_size": 4096, "z_loss_weight": 0}, True), ({"vocab_size": 125_696, "norm_head": False}, False),
])
def test_infer_norm_head(fields, expected):
  assert hf.infer_norm_head(fields) is expected


def test_overrides_win(llama):
  cfg, _ = hf.load(llama["st"], position_embedding="alibi", norm_head=True)
  assert cfg.position_embedding == "alibi" and cfg.norm_head
  with pytest.raises(ValueError, match="position_embedding='xpos'"):
    hf.load(llama["st"], position_embedding="xpos")
  with pytest.raises(ValueError, match="unknown config field 'dtypo'"):
    hf.load(llama["st"], overrides={"dtypo": "float32"})


def test_published_configs_map_to_presets():
  """Released config.json shapes give the presets (7B RoPE, 13B ALiBi, NormHead in Baichuan 2)."""
  base = {"architectures": ["BaichuanForCausalLM"], "rms_norm_eps": 1e-6, "tie_word_embeddings": False}
  b7 = dict(base, hidden_size=4096, intermediate_size=11008, num_attention_heads=32,
            num_hidden_layers=32, vocab_size=64000, max_position_embeddings=4096)
  b13 = dict(base, hidden_size=5120, intermediate_size=13696, num_attention_heads=40,
             num_hidden_layers=40, vocab_size=64000, model_max_length=4096)
  for hf_cfg, preset in ((b7, "baichuan-7b"), (b13, "baichuan-13b"),
                         (dict(b7, vocab_size=125696, model_max_length=4096, z_loss_weight=0), "baichuan2-7b"),
                         (dict(b13, vocab_size=125696), "baichuan2-13b")):
    ours, want = hf.config_from_hf(hf_cfg), configs.get(preset)
    for field in ("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size",
                  "position_embedding", "norm_head", "max_seq_len"):
      assert ours[field] == want[field], (preset, field)
    assert configs.param_counts(ours) == configs.param_counts(want)


# ----------------------------------------------------------------------------------------------
# Bad input.


def _sub(root, name):
  (root / name).mkdir()
  return root / name


def _copy_ckpt(src, dst):
  for f in src.iterdir():
    (dst / f.name).write_bytes(f.read_bytes())
  return dst


def test_missing_paths(tmp_path, llama):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    hf.load(tmp_path / "nope")
  with pytest.raises(FileNotFoundError, match="config.json"):
    hf.load(tmp_path)
  (tmp_path / "config.json").write_text(json.dumps(llama["config"]))
  with pytest.raises(FileNotFoundError, match="no weights found"):
    hf.load(tmp_path)
  d = _copy_ckpt(llama["bin"], _sub(tmp_path, "bin"))
  (d / "pytorch_model-00002-of-00003.bin").unlink()
  with pytest.raises(FileNotFoundError, match=r"pytorch_model-00002-of-00003\.bin.*missing"):
    hf.load(d)


def test_unknown_architecture(tmp_path, llama):
  d = _copy_ckpt(llama["st"], tmp_path)
  (d / "config.json").write_text(json.dumps(dict(llama["config"], architectures=["LlamaForCausalLM"])))
  with pytest.raises(ValueError, match=r"config\.json: architectures=\['LlamaForCausalLM'\]"):
    hf.load(d)
  (d / "config.json").write_text(json.dumps({k: v for k, v in llama["config"].items() if k != "vocab_size"}))
  with pytest.raises(ValueError, match="config.json: required field 'vocab_size'"):
    hf.load(d)


def _st_dir(tmp_path, llama, edit):
  sd = dict(llama["sd"])
  edit(sd)
  st_save_torch(sd, str(tmp_path / "model.safetensors"))
  (tmp_path / "config.json").write_text(json.dumps(llama["config"]))
  return tmp_path


def test_missing_extra_and_misshaped_tensors(tmp_path, llama):
  calls = []
  record = lambda name, x: calls.append(name) or x
  d = _st_dir(_sub(tmp_path, "a"), llama, lambda sd: sd.pop("model.layers.1.mlp.up_proj.weight"))
  with pytest.raises(ValueError, match="tensor 'model.layers.1.mlp.up_proj.weight' is missing"):
    hf.load(d, tensor_transform=record)
  d = _st_dir(_sub(tmp_path, "b"), llama, lambda sd: sd.update({"model.layers.2.mlp.up_proj.weight": torch.zeros(3)}))
  with pytest.raises(ValueError, match=r"model\.safetensors: unexpected tensor 'model\.layers\.2\.mlp\.up_proj\.weight'"):
    hf.load(d, tensor_transform=record)
  # The last tensor is wrong: validation fails before anything is read or transformed.
  d = _st_dir(_sub(tmp_path, "c"), llama, lambda sd: sd.update({"lm_head.weight": torch.zeros(320, 63)}))
  with pytest.raises(ValueError, match=r"model\.safetensors: tensor 'lm_head\.weight' has shape \[320, 63\], expected \[320, 64\]"):
    hf.load(d, tensor_transform=record)
  assert calls == []
  # RoPE inverse-frequency buffers of the released 7B .bin files are accepted and ignored.
  d = _st_dir(_sub(tmp_path, "d"), llama, lambda sd: sd.update({"model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(8)}))
  assert hf.load(d)[0].num_layers == 2


def test_corrupt_files(tmp_path, llama):
  d = _copy_ckpt(llama["st"], tmp_path)
  f = d / "model.safetensors"
  data = f.read_bytes()
  f.write_bytes(data[:-1000])  # truncated: the last tensor's bytes are cut
  with pytest.raises(ValueError, match=r"model\.safetensors: tensor '.*': file is truncated"):
    hf.load(d)
  f.write_bytes(data[:8] + b"{not json" + data[17:])
  with pytest.raises(ValueError, match=r"model\.safetensors: corrupt safetensors header"):
    hf.load(d)
  f.write_bytes(b"\x01\x02")
  with pytest.raises(ValueError, match=r"model\.safetensors: corrupt safetensors file"):
    hf.load(d)
  b = _copy_ckpt(llama["bin"], _sub(tmp_path, "bin"))
  shard = b / "pytorch_model-00001-of-00003.bin"
  shard.write_bytes(shard.read_bytes()[:300])
  with pytest.raises(ValueError, match=r"pytorch_model-00001-of-00003\.bin: cannot read as a torch checkpoint"):
    hf.load(b)


def test_index_pointing_to_wrong_file(tmp_path, llama):
  d = _copy_ckpt(llama["bin"], tmp_path)
  index = json.loads((d / hf.BIN_INDEX).read_text())
  name = "model.layers.0.mlp.gate_proj.weight"
  other = next(v for v in set(index["weight_map"].values()) if v != index["weight_map"][name])
  index["weight_map"][name] = other
  (d / hf.BIN_INDEX).write_text(json.dumps(index))
  with pytest.raises(ValueError, match=rf"tensor '{name}' is in .*{other}, but that file does not hold it"):
    hf.load(d)


def test_save_errors(tmp_path):
  cfg = configs.get("tiny", num_layers=1)
  params = _init(cfg, 0)
  hf.save(cfg, params, tmp_path)
  with pytest.raises(FileExistsError, match="already holds a checkpoint"):
    hf.save(cfg, params, tmp_path)
  hf.save(cfg, params, tmp_path, overwrite=True, shard_size="1MB")
  assert not (tmp_path / "model.safetensors").exists()  # the old single file was replaced
  bad = jax.tree.map(lambda x: x, params)
  bad["layers"]["mlp"]["up_proj"]["kernel"] = np.zeros((1, 256, 10), np.float32)
  with pytest.raises(ValueError, match=r"'layers/mlp/up_proj/kernel' has shape \[1, 256, 10\], expected \[1, 256, 768\]"):
    hf.save(cfg, bad, tmp_path / "x")
  bad = dict(params, extra=np.zeros(3))
  with pytest.raises(ValueError, match="unexpected entry 'extra'"):
    hf.save(cfg, bad, tmp_path / "y")
  gqa = configs.get("tiny", num_layers=1, num_kv_heads=2)
  with pytest.raises(ValueError, match="num_kv_heads=2 is invalid for the Baichuan HF format"):
    hf.save(gqa, _init(gqa, 0), tmp_path / "z")


def test_cli_inspect_and_convert(llama, tmp_path, capsys):
  hf.main(["inspect", str(llama["bin"])])
  out = capsys.readouterr().out
  assert "rope (inferred)" in out and f"{sum(p.numel() for p in llama['model'].parameters()):,}" in out
  hf.main(["convert", str(llama["bin"]), str(tmp_path / "out"), "--dtype", "bfloat16"])
  _, a = hf.load(llama["bin"], dtype="bfloat16")
  cfg, b = hf.load(tmp_path / "out")
  assert cfg.param_dtype == "bfloat16"
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(_bits(x), _bits(y))
  with pytest.raises(SystemExit):
    hf.main(["inspect", str(tmp_path / "missing")])
  assert "error:" in capsys.readouterr().err
