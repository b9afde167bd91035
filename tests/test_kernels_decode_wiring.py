"""attention_impl="pallas" in the decode step: the decode-attention kernel and the top-k pick
wired into the model, `infer.generate` and the continuous-batching engine give the XLA path's
tokens (interpret mode on the CPU)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from baichuan_jax import configs
from baichuan_jax.infer import engine as eng_lib
from baichuan_jax.infer import generate
from baichuan_jax.infer import sampling
from baichuan_jax.model import init_params
from baichuan_jax.model.attention import AttnContext, decode_span

gen_lib = eng_lib.gen_lib
N_NEW = 6


def _cfgs(pos, kv_heads=4):
  base = dict(num_layers=2, dtype="float32", position_embedding=pos, num_kv_heads=kv_heads)
  xla = configs.get("tiny", attention_impl="xla", **base)
  pallas = configs.get("tiny", attention_impl="pallas", **base)
  for c in (xla, pallas):
    c.init_std = 0.08  # peaked next-token distributions (as tests/test_infer_generate.py)
  return xla, pallas


# ALiBi with multi-head attention (the fused W_pack), RoPE with GQA (2 kv heads for 4 heads).
VARIANTS = {"alibi": ("alibi", 4), "rope_gqa": ("rope", 2)}


@pytest.fixture(scope="module", params=list(VARIANTS))
def model(request):
  xla, pallas = _cfgs(*VARIANTS[request.param])
  params = jax.jit(functools.partial(init_params, xla))(jax.random.PRNGKey(3))
  return xla, pallas, params


@pytest.fixture(scope="module")
def gqa_model():
  """The RoPE + GQA variant alone, for the sampling tests (the pick does not depend on the
  attention variant; one variant keeps the file fast)."""
  xla, pallas = _cfgs(*VARIANTS["rope_gqa"])
  return xla, pallas, jax.jit(functools.partial(init_params, xla))(jax.random.PRNGKey(3))


PROMPTS = [[5, 9, 200, 31, 7], list(range(40, 57)), [1000]]  # 5, 17, 1 tokens: left padding


def test_generate_greedy_tokens_equal_xla(model):
  xla, pallas, params = model
  want = generate(xla, params, PROMPTS, max_new_tokens=N_NEW, stop_token_ids=[])
  got = generate(pallas, params, PROMPTS, max_new_tokens=N_NEW, stop_token_ids=[])
  assert [o.tokens for o in got] == [o.tokens for o in want]
  assert all(len(o.tokens) == N_NEW for o in got)


def test_generate_sampled_tokens_equal_xla(gqa_model):
  """Top-k rows (drawn from the kernel's candidates), a top-p row (full-vocabulary fallback) and
  a greedy row in one batch, with the repetition penalty."""
  xla, pallas, params = gqa_model
  kw = dict(max_new_tokens=N_NEW, stop_token_ids=[], temperature=[0.8, 0.0, 1.3],
            top_k=[5, 0, 3], repetition_penalty=[1.3, 1.1, 1.0], seed=[1, 2, 3])
  want = generate(xla, params, PROMPTS, **kw)
  got = generate(pallas, params, PROMPTS, **kw)
  assert [o.tokens for o in got] == [o.tokens for o in want]
  kw["top_p"] = [0.9, 1.0, 1.0]  # row 0 needs the nucleus: the batch takes the full path
  want = generate(xla, params, PROMPTS, **kw)
  got = generate(pallas, params, PROMPTS, **kw)
  assert [o.tokens for o in got] == [o.tokens for o in want]


def _prefilled(cfg, params):
  """generate's prefill state for PROMPTS (left-padded to 32, cache of 48 slots)."""
  tokens, positions, segs = gen_lib._left_pad(cfg, PROMPTS, 32)  # pylint: disable=protected-access
  rows, _, _ = gen_lib._row_params(cfg, PROMPTS, N_NEW, 0.0, 0, 1.0, 1.0, 0, [], None)  # pylint: disable=protected-access
  return gen_lib.Generator(cfg).prefill(params, tokens, positions, segs, rows, 16, 48, False)


def _span_of(cache, q_pos, q_seg, alibi):
  """decode_span for one decode token per row on `cache` (as the model's _context builds it)."""
  from baichuan_jax.model.attention import write_cache  # pylint: disable=import-outside-toplevel
  seg = write_cache(cache.segment_ids, q_seg[:, None], cache.index, 1)
  pos = write_cache(cache.positions, q_pos[:, None], cache.index, 1)
  k_idx = jnp.arange(seg.shape[1], dtype=jnp.int32)
  ctx = AttnContext(q_pos[:, None], q_seg[:, None], cache.index[..., None] + jnp.zeros(1, jnp.int32),
                    pos, seg, k_idx, cache.index)
  return decode_span(ctx, alibi)


def test_left_padded_cache_is_one_span_per_row(model):
  xla, _, params = model
  state = _prefilled(xla, params)
  starts, lengths, ok = _span_of(state.cache, state.pos, jnp.ones(3, jnp.int32),
                                 xla.position_embedding == "alibi")
  assert bool(ok)
  np.testing.assert_array_equal(starts, [32 - len(p) for p in PROMPTS])
  np.testing.assert_array_equal(lengths, [33, 33, 33])


def test_decode_step_logits_match_xla(model):
  xla, pallas, params = model
  state = _prefilled(xla, params)
  args = (params, state.last[:, None], state.pos[:, None], jnp.ones((3, 1), jnp.int32),
          state.cache)
  want, cache_x = jax.jit(functools.partial(gen_lib._forward_last, xla, unroll=True))(*args)  # pylint: disable=protected-access
  got, cache_p = jax.jit(functools.partial(gen_lib._forward_last, pallas, unroll=True))(*args)  # pylint: disable=protected-access
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)
  np.testing.assert_allclose(cache_p.k[1], cache_x.k[1], rtol=2e-5, atol=2e-5)
  assert np.abs(np.asarray(want)).max() > 0.1  # real logits, not zeros


def test_holes_in_a_row_keep_the_xla_path(model):
  """A row whose segment has a gap (a packed / hand-built cache) is not one span: the step falls
  back to the XLA path for the batch, and the logits equal it to within float rounding.

  Not bit for bit: the fallback runs inside a `lax.cond` branch, which XLA compiles as its own
  computation, and under jax 0.11.2 its fusions round one logit 1 ulp apart (2.4e-7) from the
  plain XLA step's. The hole itself moves row 1's logits by orders of magnitude more (asserted),
  so the tolerance still tells a step that skips slot 20 from one that reads it."""
  xla, pallas, params = model
  state = _prefilled(xla, params)
  seg = state.cache.segment_ids.at[1, 20].set(2)  # slot 20 of row 1 leaves its segment
  cache = state.cache.replace(segment_ids=seg)
  _, _, ok = _span_of(cache, state.pos, jnp.ones(3, jnp.int32), False)
  assert not bool(ok)
  rest = (state.last[:, None], state.pos[:, None], jnp.ones((3, 1), jnp.int32))
  step_x = jax.jit(functools.partial(gen_lib._forward_last, xla, unroll=True))  # pylint: disable=protected-access
  step_p = jax.jit(functools.partial(gen_lib._forward_last, pallas, unroll=True))  # pylint: disable=protected-access
  want, _ = step_x(params, *rest, cache)
  got, _ = step_p(params, *rest, cache)
  np.testing.assert_allclose(got, want, rtol=0, atol=2e-6)
  no_hole, _ = step_x(params, *rest, state.cache)
  assert np.abs(np.asarray(no_hole[1]) - np.asarray(want[1])).max() > 1e-3  # the hole matters


def _count_conds(jaxpr) -> int:
  """`cond` equations in `jaxpr` and every sub-jaxpr (pjit bodies, branches)."""
  n = 0
  for eqn in jaxpr.eqns:
    n += eqn.primitive.name == "cond"
    for v in eqn.params.values():
      for sub in (v if isinstance(v, (tuple, list)) else [v]):
        inner = getattr(sub, "jaxpr", None)
        if inner is not None:
          n += _count_conds(getattr(inner, "jaxpr", inner))
  return n


def test_the_span_check_is_one_cond_per_step(model, monkeypatch):
  """The unrolled decode step checks the spans once for the whole stack: one `lax.cond` (not one
  per layer: each makes a GPU wait on the host), whose branches hold every layer; without the
  check, none."""
  from baichuan_jax.model import layers
  xla, pallas, params = model
  state = _prefilled(xla, params)
  args = (params, state.last[:, None], state.pos[:, None], jnp.ones((3, 1), jnp.int32),
          state.cache)
  step = functools.partial(gen_lib.forward_last, pallas, unroll=True)
  jaxpr = jax.make_jaxpr(step)(*args).jaxpr
  assert pallas.num_layers == 2 and _count_conds(jaxpr) == 1
  (cond,) = [e for e in jaxpr.eqns if e.primitive.name == "cond"]
  # both branches run the whole stack (each layer's two fused RMSNorm kernels), one of them
  # also the decode-attention kernel of every layer
  calls = sorted(str(b.jaxpr).count("pallas_call") for b in cond.params["branches"])
  assert calls == [2 * pallas.num_layers, 3 * pallas.num_layers]
  monkeypatch.setattr(layers, "DECODE_SPAN_CHECK", False)
  step = functools.partial(gen_lib.forward_last, pallas, unroll=True)  # traced anew (no cache)
  assert _count_conds(jax.make_jaxpr(step)(*args).jaxpr) == 0
  want, _ = jax.jit(functools.partial(gen_lib.forward_last, xla, unroll=True))(*args)
  got, _ = jax.jit(step)(*args)
  np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4)


def _engine_run(cfg, params, do_sample):
  """Three requests joining a 3-slot engine at steps 0, 2 and 3; returns every step's tokens and
  the final state."""
  admit, decode = eng_lib._compiled(cfg)  # pylint: disable=protected-access
  state = eng_lib._init_state(cfg, 3, 48)  # pylint: disable=protected-access
  reqs = {0: ([5, 9, 200, 31, 7], 1), 2: (list(range(40, 57)), 0), 3: ([1000, 3], 2)}
  log = []
  for step in range(7):
    if step in reqs:
      ids, slot = reqs[step]
      tokens = np.full((1, 32), cfg.pad_id, np.int32)
      tokens[0, :len(ids)] = ids
      settings = {"temperature": np.float32(0.9 * do_sample), "top_k": np.int32(4),
                  "top_p": np.float32(1.0), "repetition_penalty": np.float32(1.2),
                  "max_new": np.int32(20), "seeds": np.uint32(slot + 5),
                  "stop_ids": np.full((eng_lib.MAX_STOP_IDS,), -1, np.int32)}
      state, tok = admit(do_sample, params, state, tokens, np.int32(len(ids)), np.int32(slot),
                         settings)
      log.append(("admit", slot, int(tok)))
    state, out = decode(do_sample, 1, params, state, jnp.ones(3, bool))
    log.append(("step", np.asarray(out)[:, 0].tolist()))
  return log, state


def test_engine_sampled_tokens_equal_xla(gqa_model):
  xla, pallas, params = gqa_model
  want, _ = _engine_run(xla, params, True)
  got, _ = _engine_run(pallas, params, True)
  assert got == want
  assert len({tuple(step[1]) for step in want if step[0] == "step"}) > 1


def test_engine_per_row_index_tokens_equal_xla(model):
  xla, pallas, params = model
  want, state = _engine_run(xla, params, False)
  got, _ = _engine_run(pallas, params, False)
  assert got == want
  assert want[0][0] == "admit" and want[1][1][0] == -1  # idle slots produce no token
  # The per-row-index cache: slot 1 from step 0, slot 0 from step 2, slot 2 from step 3.
  lengths = [17 + 5, 5 + 7, 2 + 4]  # prompt + decode steps taken so far (index = next slot)
  np.testing.assert_array_equal(state.cache.index, lengths)
  starts, span_len, ok = _span_of(state.cache, state.pos, jnp.ones(3, jnp.int32), True)
  assert bool(ok)
  np.testing.assert_array_equal(starts, [0, 0, 0])
  np.testing.assert_array_equal(span_len, np.asarray(lengths) + 1)
  # An idle slot (segment 0 query) reads nothing.
  starts, span_len, ok = _span_of(state.cache, state.pos, jnp.array([1, 0, 1], jnp.int32), True)
  assert bool(ok) and int(span_len[1]) == 0


def test_engine_step_logits_match_xla(model):
  xla, pallas, params = model
  _, state = _engine_run(xla, params, False)
  args = (params, state.last[:, None], state.pos[:, None], jnp.ones((3, 1), jnp.int32),
          state.cache)
  want, _ = jax.jit(functools.partial(gen_lib._forward_last, xla, unroll=True))(*args)  # pylint: disable=protected-access
  got, _ = jax.jit(functools.partial(gen_lib._forward_last, pallas, unroll=True))(*args)  # pylint: disable=protected-access
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)


def test_next_token_kernels_equal_full_path():
  """Greedy and sampled picks through kernels_pallas.top_k equal next_token's full path exactly:
  ties (the lowest index wins), the repetition penalty, top-k boundary ties beyond the candidates
  and top-p rows (both fall back), greedy rows inside a sampled batch."""
  rng = np.random.default_rng(0)
  b, vocab = 6, 4096
  logits = rng.normal(size=(b, vocab)).astype(np.float32)
  logits[0, [7, 900, 3000]] = 9.0  # a three-way tie for the maximum
  logits[2, :] = np.round(logits[2, :], 1)  # many ties everywhere
  logits = jnp.asarray(logits)
  present = jnp.asarray(rng.random((b, vocab)) < 0.05)
  penalty = jnp.asarray([1.0, 1.3, 1.1, 1.0, 2.0, 1.05], jnp.float32)
  keys = jax.vmap(jax.random.PRNGKey)(jnp.arange(b))
  temperature = jnp.asarray([0.7, 1.0, 0.0, 1.5, 0.3, 1.0], jnp.float32)
  top_p = jnp.ones(b, jnp.float32)
  pick = jax.jit(sampling.next_token, static_argnums=(7, 8))
  for top_k in ([5, 3, 4, 1, 15, 8], [5, 3, 0, 2, 4, 6], [5, 40, 4, 1, 2, 8]):
    top_k = jnp.asarray(top_k, jnp.int32)
    for do_sample in (False, True):
      args = (logits, present, keys, temperature, top_k, top_p, penalty, do_sample)
      want = pick(*args, False)
      np.testing.assert_array_equal(pick(*args, True), want)
  greedy = pick(logits, present, keys, temperature, top_k, top_p, penalty, False, True)
  assert int(greedy[0]) == 7
  # Boundary ties past the candidates (row 2 rounded to 0.1, now sampled) and a top-p row.
  temperature = temperature.at[2].set(1.0)
  for top_p in (top_p, top_p.at[1].set(0.8)):
    args = (logits, present, keys, temperature, jnp.asarray([5, 3, 15, 1, 2, 8]), top_p,
            penalty, True)
    np.testing.assert_array_equal(pick(*args, True), pick(*args, False))
  # Many seeds: the candidate draw is the full path's draw, token for token.
  many = jax.vmap(jax.random.PRNGKey)(jnp.arange(100, 100 + b))
  for seed_keys in (keys, many):
    args = (logits, present, seed_keys, jnp.full((b,), 2.0), jnp.full((b,), 10, jnp.int32),
            jnp.ones(b), penalty, True)
    np.testing.assert_array_equal(pick(*args, True), pick(*args, False))
