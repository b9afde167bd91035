"""KV-cache generation against a full-recompute reference, sampling semantics, stops and sharding."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from baichuan_jax import configs
from baichuan_jax.infer import generate, shard_params
from baichuan_jax.infer import sampling
from baichuan_jax.model import BaichuanLM, init_params

REF_LEN = 48  # fixed reference length: one compilation for every step of the reference
N_NEW = 12  # every greedy test uses batch 3, prompts <= 16 tokens and 12 new tokens, so the
# compiled prefill/decode pair of each config is shared by all of them.


def _init(cfg, seed):
  return jax.jit(functools.partial(init_params, cfg))(jax.random.PRNGKey(seed))


def _cfg(pos):
  return configs.get("tiny", num_layers=2, dtype="float32", position_embedding=pos)


@pytest.fixture(scope="module", params=["rope", "alibi"])
def model(request):
  cfg = _cfg(request.param)
  # A wider init makes the next-token distribution peaked, so argmax gaps dwarf float noise.
  cfg.init_std = 0.08
  return cfg, _init(cfg, 7)


def _reference_greedy(cfg, params, prompt, n_new):
  """Greedy decoding that recomputes the whole forward pass (no cache) for every token."""
  fwd = jax.jit(lambda p, t, s: BaichuanLM(cfg).apply({"params": p}, t, segment_ids=s))
  seq = list(prompt)
  for _ in range(n_new):
    toks = np.zeros((1, REF_LEN), np.int32)
    segs = np.zeros((1, REF_LEN), np.int32)  # right padding in its own segment
    toks[0, :len(seq)] = seq
    segs[0, :len(seq)] = 1
    logits = fwd(params, toks, segs)
    seq.append(int(jnp.argmax(logits[0, len(seq) - 1])))
  return seq[len(prompt):]


def test_greedy_matches_full_recompute_batched(model):
  cfg, params = model
  rng = np.random.default_rng(0)
  prompts = [rng.integers(3, 4000, n).tolist() for n in (5, 17, 1)]
  for loop in ("device", "host"):
    outs = generate(cfg, params, prompts, max_new_tokens=N_NEW, stop_token_ids=[],
                    decode_loop=loop)
    for p, out in zip(prompts, outs):
      assert out.finish_reason == "length"
      assert out.tokens == _reference_greedy(cfg, params, p, N_NEW)


def test_device_loop_without_split_weights_matches_reference(model, monkeypatch):
  # Above SPLIT_LAYERS_MAX_BYTES the device loop slices the stacked weights inside the loop
  # instead of copying them per layer first: same tokens.
  import importlib  # pylint: disable=import-outside-toplevel
  gen_mod = importlib.import_module("baichuan_jax.infer.generate")
  monkeypatch.setattr(gen_mod, "SPLIT_LAYERS_MAX_BYTES", 0)
  monkeypatch.setattr(gen_mod, "_GENERATORS", {})  # fresh compilations that see the new limit
  cfg, params = model
  prompts = [[5, 6, 7, 8], [9, 10]]
  outs = generate(cfg, params, prompts, max_new_tokens=N_NEW, stop_token_ids=[],
                  decode_loop="device")
  for p, out in zip(prompts, outs):
    assert out.tokens == _reference_greedy(cfg, params, p, N_NEW)


def test_host_loop_matches_device_loop(model):
  # The host loop (unrolled layers, a jitted step per token, done checked every 8 steps) and
  # the device while_loop agree on tokens and finish reasons, also when rows end early and the
  # host loop runs steps past the end of every row.
  cfg, params = model
  prompts = [[5, 6, 7, 8], [9, 10], [11]]
  free = generate(cfg, params, prompts, max_new_tokens=N_NEW, stop_token_ids=[],
                  decode_loop="device")
  cases = [dict(max_new_tokens=N_NEW, stop_token_ids=[free[0].tokens[1]]),
           dict(max_new_tokens=[1, 5, N_NEW], stop_token_ids=[]),
           dict(max_new_tokens=N_NEW, stop_token_ids=[], temperature=1.0, top_k=20, seed=[3, 4, 5],
                repetition_penalty=1.3)]
  for kw in cases:
    host = generate(cfg, params, prompts, decode_loop="host", **kw)
    device = generate(cfg, params, prompts, decode_loop="device", **kw)
    assert [(o.tokens, o.finish_reason) for o in host] == \
        [(o.tokens, o.finish_reason) for o in device], kw
  assert host[0].tokens != free[0].tokens  # the sampled case differs from greedy


def test_stop_token_ends_row_and_is_excluded(model):
  cfg, params = model
  prompts = [[5, 6, 7, 8], [9, 10], [11]]
  free = generate(cfg, params, prompts, max_new_tokens=N_NEW, stop_token_ids=[])
  # Stop on the third token row 0 would emit: the row ends right before it, row 1 is unaffected
  # unless it emits the same token.
  stop = free[0].tokens[2]
  outs = generate(cfg, params, prompts, max_new_tokens=N_NEW, stop_token_ids=[stop])
  assert outs[0].tokens == free[0].tokens[:free[0].tokens.index(stop)]
  assert outs[0].finish_reason == "stop"
  expect1 = free[1].tokens[:free[1].tokens.index(stop)] if stop in free[1].tokens else free[1].tokens
  assert outs[1].tokens == expect1


def test_per_row_max_new_tokens_and_streaming(model):
  cfg, params = model
  prompts = [[5, 6, 7], [11, 12, 13, 14, 15], [3]]
  events = []
  outs = generate(cfg, params, prompts, max_new_tokens=[3, 6, N_NEW], stop_token_ids=[],
                  stream=events.append)
  assert [len(o.tokens) for o in outs] == [3, 6, N_NEW]
  for row in (0, 1, 2):
    got = [e.token for e in events if e.row == row]
    assert got == outs[row].tokens
    finals = [e.finish_reason for e in events if e.row == row]
    assert finals[-1] == "length" and all(f is None for f in finals[:-1])
  # Streaming (a host loop over one-token chunks) yields the same tokens as one device loop.
  assert [o.tokens for o in outs] == [o.tokens for o in generate(
      cfg, params, prompts, max_new_tokens=[3, 6, N_NEW], stop_token_ids=[])]


def test_stop_strings_cut_text(model):
  cfg, params = model
  decode = lambda ids: "".join(chr(97 + (t % 26)) for t in ids)  # one letter per token
  prompts = [[4, 5, 6], [7], [8, 9]]
  free = generate(cfg, params, prompts, max_new_tokens=N_NEW, stop_token_ids=[], decode=decode)[0]
  stop = free.text[4:6]
  cut = free.text.find(stop)
  out = generate(cfg, params, prompts, max_new_tokens=N_NEW, stop_token_ids=[], decode=decode,
                 stop_strings=[stop])[0]
  assert out.finish_reason == "stop"
  assert out.text == free.text[:cut]
  assert out.tokens == free.tokens[:cut + len(stop)]


def test_sampling_is_seeded_per_row():
  cfg = _cfg("alibi")
  params = _init(cfg, 2)
  kw = dict(max_new_tokens=N_NEW, temperature=1.0, top_k=50, top_p=0.9, stop_token_ids=[])
  a = generate(cfg, params, [[5, 6, 7], [8, 9], [3]], seed=[1, 2, 4], **kw)
  b = generate(cfg, params, [[10, 11, 12, 13], [8, 9], [4, 4]], seed=[5, 2, 6], **kw)
  c = generate(cfg, params, [[5, 6, 7], [8, 9], [3]], seed=[3, 2, 4], **kw)
  assert a[1].tokens == b[1].tokens == c[1].tokens  # independent of batch mates
  assert a[2].tokens == c[2].tokens
  assert a[0].tokens != c[0].tokens  # a different seed samples differently


def test_repetition_penalty_hf_semantics():
  logits = jnp.array([[2.0, -1.0, 0.5, -3.0]])
  present = jnp.array([[True, True, False, False]])
  out = sampling.apply_repetition_penalty(logits, present, jnp.array([2.0]))
  np.testing.assert_allclose(out, [[1.0, -2.0, 0.5, -3.0]])


def test_top_k_top_p_match_hand_computed():
  logits = jnp.log(jnp.array([[0.5, 0.2, 0.15, 0.1, 0.05]]))
  # top-k 2 keeps the two largest.
  kept = sampling.top_k_top_p_filter(logits, jnp.array([2]), jnp.array([1.0]))
  assert np.isfinite(np.asarray(kept)).tolist() == [[True, True, False, False, False]]
  # top-p 0.8: ascending cumulative 0.05, 0.15, 0.30, 0.50, 1.0; drop those <= 0.2 -> the two
  # smallest go; 0.15 survives (0.30 > 0.2), as in HF TopPLogitsWarper.
  kept = sampling.top_k_top_p_filter(logits, jnp.array([0]), jnp.array([0.8]))
  assert np.isfinite(np.asarray(kept)).tolist() == [[True, True, True, False, False]]
  # top-p tiny keeps only the argmax.
  kept = sampling.top_k_top_p_filter(logits, jnp.array([0]), jnp.array([1e-6]))
  assert np.isfinite(np.asarray(kept)).tolist() == [[True, False, False, False, False]]


def test_sampled_frequencies_follow_filtered_distribution():
  logits = jnp.log(jnp.array([0.5, 0.2, 0.15, 0.1, 0.05]))
  n = 4000
  keys = jax.random.split(jax.random.PRNGKey(0), n)
  pick = jax.jit(sampling.next_token, static_argnums=7)
  toks = pick(jnp.tile(logits, (n, 1)), jnp.zeros((n, 5), bool), keys,
              jnp.ones(n), jnp.full(n, 3, jnp.int32), jnp.ones(n), jnp.ones(n), True)
  freq = np.bincount(np.asarray(toks), minlength=5) / n
  np.testing.assert_allclose(freq, [0.5 / 0.85, 0.2 / 0.85, 0.15 / 0.85, 0, 0], atol=0.03)


def test_bad_settings_raise_clear_errors():
  cfg = _cfg("rope")
  params = None  # validation happens before the model runs
  with pytest.raises(ValueError, match="top_p"):
    generate(cfg, params, [[5]], top_p=1.5)
  with pytest.raises(ValueError, match="prompt 0 is empty"):
    generate(cfg, params, [[]])
  with pytest.raises(ValueError, match="max_seq_len"):
    generate(cfg, params, [[5] * 250], max_new_tokens=10)
  with pytest.raises(ValueError, match="decode"):
    generate(cfg, params, [[5]], stop_strings=["x"])
  with pytest.raises(ValueError, match=r"decode_loop='gpu'.*allowed \('host', 'device'\)"):
    generate(cfg, params, [[5]], decode_loop="gpu")


def test_tensor_parallel_generation_matches_single_device():
  from baichuan_jax import sharding
  if jax.device_count() < 8:
    pytest.skip("needs 8 (fake) devices")
  cfg = _cfg("alibi")
  cfg.init_std = 0.08
  params = _init(cfg, 3)
  mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "model": 4}, jax.devices()[:4])
  prompts = [[5, 6, 7], [8, 9, 10, 11, 12], [13]]
  single = generate(cfg, params, prompts, max_new_tokens=N_NEW, stop_token_ids=[])
  sharded_params = shard_params(cfg, params, mesh)
  wq = sharded_params["layers"]["self_attn"]["W_pack"]["kernel"]
  assert wq.sharding.shard_shape(wq.shape)[3] == cfg.num_heads // 4  # heads split 4 ways
  for loop in ("device", "host"):
    multi = generate(cfg, sharded_params, prompts, max_new_tokens=N_NEW, stop_token_ids=[],
                     mesh=mesh, decode_loop=loop)
    assert [o.tokens for o in multi] == [o.tokens for o in single], loop
