"""The continuous-batching engine: per-row cache writes, requests joining and leaving a running
batch with the same tokens as a lone `infer.generate` call (greedy and seeded sampling), stops,
cancellation that frees the slot within a step, and the bounded queue."""

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from baichuan_jax import configs
from baichuan_jax.infer import generate
from baichuan_jax.infer.engine import Engine, QueueFull, Request
from baichuan_jax.model import init_params
from baichuan_jax.model.attention import write_cache

N_NEW = 12
LETTERS = lambda ids: "".join(chr(97 + (t % 26)) for t in ids)  # one letter per token


@pytest.fixture(scope="module")
def model():
  cfg = configs.get("tiny", num_layers=2, dtype="float32", position_embedding="alibi")
  cfg.init_std = 0.08  # peaked next-token distributions: argmax gaps dwarf float noise
  return cfg, jax.jit(functools.partial(init_params, cfg))(jax.random.PRNGKey(7))


@pytest.fixture(scope="module")
def engine(model):
  cfg, params = model
  eng = Engine(cfg, params, LETTERS, num_slots=3, max_queue=16)
  yield eng
  eng.close()


def _result(req, timeout=300):
  tokens = []
  while True:
    kind, *rest = req.events.get(timeout=timeout)
    if kind == "token":
      tokens.append(rest[0])
      continue
    assert kind == "done", rest
    return rest[0], "".join(tokens)


def test_write_cache_per_row_index_matches_numpy():
  cache = jnp.arange(2 * 3 * 6, dtype=jnp.float32).reshape(2, 3, 6)
  new = -jnp.arange(2 * 3 * 2, dtype=jnp.float32).reshape(2, 3, 2) - 1
  got = np.asarray(write_cache(cache, new, jnp.array([1, 4]), axis=2))
  want = np.asarray(cache).copy()
  want[0, :, 1:3] = np.asarray(new)[0]
  want[1, :, 4:6] = np.asarray(new)[1]
  np.testing.assert_array_equal(got, want)
  # A scalar index writes every row at the same slot, as before.
  same = np.asarray(write_cache(cache, new, jnp.array(2), axis=2))
  want = np.asarray(cache).copy()
  want[:, :, 2:4] = np.asarray(new)
  np.testing.assert_array_equal(same, want)


def test_greedy_alone_equals_beside_others(model, engine):
  cfg, params = model
  rng = np.random.default_rng(0)
  prompts = [rng.integers(3, 4000, n).tolist() for n in (5, 17, 1, 30, 9, 40)]
  max_new = [N_NEW, 3, N_NEW, 7, 1, N_NEW]
  # Six requests on three slots: later ones join while earlier ones are decoding, rows leave at
  # different steps; two more arrive mid-flight.
  reqs = [engine.submit(Request(ids=p, max_new=m, stop_ids=[])) for p, m in
          zip(prompts[:4], max_new[:4])]
  time.sleep(0.05)
  reqs += [engine.submit(Request(ids=p, max_new=m, stop_ids=[])) for p, m in
           zip(prompts[4:], max_new[4:])]
  outs = [_result(r)[0] for r in reqs]
  assert max(engine.step_sizes) > 1  # requests really shared decode steps
  for p, m, out in zip(prompts, max_new, outs):
    ref = generate(cfg, params, [p], max_new_tokens=m, stop_token_ids=[])[0]
    assert (out.tokens, out.finish_reason) == (ref.tokens, ref.finish_reason)
    assert out.prompt_tokens == len(p)


def test_sampling_settings_are_per_request(model, engine):
  cfg, params = model
  settings = [dict(temperature=1.0, top_k=20, seed=3, repetition_penalty=1.3),
              dict(temperature=0.0),
              dict(temperature=0.7, top_p=0.9, seed=11),
              dict(temperature=1.5, top_k=5, top_p=0.8, seed=3, repetition_penalty=1.1)]
  prompts = [[5, 6, 7, 8], [9, 10], [11, 12, 13], [5, 6, 7, 8]]
  reqs = [engine.submit(Request(ids=p, max_new=N_NEW, stop_ids=[], **kw))
          for p, kw in zip(prompts, settings)]
  outs = [_result(r)[0].tokens for r in reqs]
  for p, kw, out in zip(prompts, settings, outs):
    ref = generate(cfg, params, [p], max_new_tokens=N_NEW, stop_token_ids=[], **kw)[0]
    assert out == ref.tokens, kw
  assert outs[0] != outs[3]  # same prompt and seed, other settings: other samples


def test_stop_ids_strings_and_streaming_match_generate(model, engine):
  cfg, params = model
  prompts = [[4, 5, 6], [7], [8, 9]]
  free = generate(cfg, params, prompts, max_new_tokens=N_NEW, stop_token_ids=[], decode=LETTERS)
  stop_tok = free[1].tokens[3]
  stop_str = free[0].text[4:6]
  reqs = [engine.submit(Request(ids=prompts[0], max_new=N_NEW, stop_strings=[stop_str],
                                stream=True)),
          engine.submit(Request(ids=prompts[1], max_new=N_NEW, stop_ids=[stop_tok], stream=True)),
          engine.submit(Request(ids=prompts[2], max_new=N_NEW, stream=True))]
  (o0, s0), (o1, s1), (o2, s2) = [_result(r) for r in reqs]
  ref0 = generate(cfg, params, [prompts[0]], max_new_tokens=N_NEW, stop_token_ids=[],
                  decode=LETTERS, stop_strings=[stop_str])[0]
  assert (o0.text, o0.tokens, o0.finish_reason) == (ref0.text, ref0.tokens, "stop")
  cut = free[1].tokens.index(stop_tok)
  assert (o1.tokens, o1.finish_reason) == (free[1].tokens[:cut], "stop")
  assert (o2.tokens, o2.finish_reason) == (free[2].tokens, "length")
  # Streamed deltas add up to the final text.
  assert (s0, s1, s2) == (o0.text, o1.text, o2.text)


def test_cancel_frees_the_slot_within_a_step(model):
  cfg, params = model
  eng = Engine(cfg, params, LETTERS, num_slots=1, max_queue=1)
  try:
    long = eng.submit(Request(ids=[5, 6, 7], max_new=200, stop_ids=[], stream=True))
    assert long.events.get(timeout=300)[0] == "token"  # running in the only slot
    waiting = eng.submit(Request(ids=[8, 9], max_new=4, stop_ids=[]))
    with pytest.raises(QueueFull):
      eng.submit(Request(ids=[1], max_new=2))
    steps = eng.steps_total
    long.cancel()
    out, _ = _result(waiting)
    assert len(out.tokens) == 4
    # The waiting request took the freed slot after at most one more step of the cancelled one,
    # and its own 3 decode steps (its first token comes from the prefill).
    assert eng.steps_total - steps <= 1 + 3
    assert eng.metrics.cancelled == 1 and eng.metrics.rejected == 1
    assert eng.active_slots() == 0 and eng.queue_depth() == 0
  finally:
    eng.close()


def test_requests_that_do_not_fit_are_refused(model, engine):
  with pytest.raises(ValueError, match="does not fit"):
    engine.submit(Request(ids=[5] * 250, max_new=10))
  with pytest.raises(ValueError, match="does not fit"):
    engine.submit(Request(ids=[], max_new=10))


def test_several_steps_per_sync_give_the_same_tokens(model):
  # The device loop of `steps_per_sync=4` stops when a slot finishes (so it can be refilled) and
  # records nothing for idle slots; results equal the one-step engine and `generate`.
  cfg, params = model
  eng = Engine(cfg, params, LETTERS, num_slots=2, steps_per_sync=4)
  try:
    prompts = [[5, 6, 7, 8], [9, 10], [11, 12, 13]]
    max_new = [N_NEW, 5, 6]
    reqs = [eng.submit(Request(ids=p, max_new=m, stop_ids=[])) for p, m in zip(prompts, max_new)]
    outs = [_result(r)[0] for r in reqs]
    for p, m, out in zip(prompts, max_new, outs):
      ref = generate(cfg, params, [p], max_new_tokens=m, stop_token_ids=[])[0]
      assert (out.tokens, out.finish_reason) == (ref.tokens, ref.finish_reason)
    # 12 tokens for the longest request need at least 3 four-step calls.
    assert eng.steps_total >= 3
  finally:
    eng.close()
