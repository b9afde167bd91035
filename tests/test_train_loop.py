"""The one training loop (`train.loop.Loop`): hook schedule, rewind, stop, batch prefetch, loader
state per step, the one evaluator, and a real train step giving the same bits as a plain loop."""

import jax
import numpy as np

from baichuan_jax import configs, sharding, train
from baichuan_jax.train import loop as loop_lib


class _Batches:
  """Counts reads; get_state() is the number of batches read so far."""

  def __init__(self):
    self.read = 0

  def __iter__(self):
    return self

  def __next__(self):
    self.read += 1
    return {"x": self.read}

  def get_state(self):
    return self.read


def _add(state, batch):
  """A host step: the state is the sum of the batches seen; metrics echo the batch."""
  return state + batch["x"], {"x": np.float32(batch["x"])}


def test_hooks_run_on_schedule_in_order_and_no_batch_is_read_past_the_end():
  data, calls = _Batches(), []
  loop = loop_lib.Loop(_add, 0, data, total_steps=7)
  loop.add_hook(lambda i: calls.append(("a", i.step, i.data_state, i.step_time is None)))
  loop.add_hook(lambda i: calls.append(("b", i.step)), every=3)
  loop.add_hook(lambda i: calls.append(("c", i.step)), every=5, at_end=True)
  assert loop.run() == sum(range(1, 8))
  assert data.read == 7  # prefetch never reads an 8th batch
  assert [c for c in calls if c[0] == "b"] == [("b", 3), ("b", 6)]
  assert [c for c in calls if c[0] == "c"] == [("c", 5), ("c", 7)]
  a = [c for c in calls if c[0] == "a"]
  assert [c[1] for c in a] == list(range(1, 8))
  assert [c[2] for c in a] == list(range(1, 8))  # the loader state after this step's batch
  assert [c[3] for c in a] == [True] + [False] * 6  # only the first (compile) step is untimed
  assert [c[0] for c in calls[:3]] == ["a", "a", "a"] and calls[3] == ("b", 3)  # added order


def test_rewind_skips_the_remaining_hooks_and_continues_with_new_data():
  data, seen, later = _Batches(), [], []
  loop = loop_lib.Loop(_add, 0, data, total_steps=6)

  def rollback(info):
    seen.append((info.step, info.step_time is None))
    if info.step == 4 and len(seen) == 4:
      loop.rewind(100, 2)  # back to "checkpoint" step 2 with state 100

  loop.add_hook(rollback)
  loop.add_hook(lambda i: later.append(i.step))
  final = loop.run()
  assert [s for s, _ in seen] == [1, 2, 3, 4, 3, 4, 5, 6]
  assert later == [1, 2, 3, 3, 4, 5, 6]  # step 4's second hook was skipped by the rewind
  assert seen[4][1]  # the step after a rewind is untimed again
  # Batches 5..8 follow the rewind (the data goes on; the bad batches are not replayed).
  assert final == 100 + 5 + 6 + 7 + 8 and data.read == 8


def test_stop_ends_after_the_current_steps_hooks():
  data, rows = _Batches(), []
  loop = loop_lib.Loop(_add, 0, data, total_steps=10)
  loop.add_hook(lambda i: loop.stop() if i.step == 3 else None)
  loop.add_hook(lambda i: rows.append(i.step))
  assert loop.run() == 1 + 2 + 3 and rows == [1, 2, 3] and loop.step == 3
  assert loop_lib.Loop(_add, 5, data, total_steps=2, step=2).run() == 5  # nothing left to do


def test_weighted_mean_weights_by_weight_then_tokens():
  batches = [{"ce": 1.0, "weight": 3.0}, {"ce": 3.0, "weight": 1.0}]
  assert loop_lib.weighted_mean(lambda p, b: b, None, batches) == (1.5, 4.0)
  assert loop_lib.weighted_mean(lambda p, b: b, None, [{"loss": 2.0, "tokens": 5}]) == (2.0, 5.0)
  assert loop_lib.weighted_mean(lambda p, b: b, None, [{"ce": 2.0, "weight": 0.0}]) == (None, 0.0)


def test_the_loop_gives_the_bits_of_a_plain_loop_over_the_real_step():
  cfg = configs.get("tiny", vocab_size=32, hidden_size=32, num_layers=1, num_heads=2,
                    num_kv_heads=2, intermediate_size=64, dtype="float32", max_seq_len=16)
  t = train.default_train_config()
  t.batch_size, t.seq_len, t.total_steps, t.warmup_steps, t.peak_lr = 4, 16, 4, 1, 1e-2
  mesh = sharding.make_mesh(t.mesh, devices=jax.devices()[:1])
  rng = np.random.default_rng(0)
  batches = []
  for _ in range(4):
    toks = rng.integers(3, 32, (4, 17)).astype(np.int32)
    batches.append({"inputs": toks[:, :-1], "targets": toks[:, 1:],
                    "positions": np.tile(np.arange(16, dtype=np.int32), (4, 1)),
                    "segment_ids": np.ones((4, 16), np.int32),
                    "loss_mask": np.ones((4, 16), np.int32)})
  step = train.make_train_step(cfg, t, mesh)
  state, plain = train.create_train_state(cfg, t, mesh), []
  for b in batches:
    state, m = step(state, b)
    plain.append(float(m["loss"]))
  expected = jax.device_get(state.params)
  losses = []
  loop = loop_lib.Loop(step, train.create_train_state(cfg, t, mesh), iter(batches), 4)
  loop.add_hook(lambda i: losses.append(float(i.metrics["loss"])))
  got = jax.device_get(loop.run().params)
  assert losses == plain
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
    np.testing.assert_array_equal(a, b)


def test_ppo_iterations_run_on_the_loop_one_prompt_draw_each(tmp_path):
  import json
  import types
  from baichuan_jax.align import ppo_trainer
  draws, calls = [], []

  def source(n):
    draws.append(n)
    return [[len(draws)]] * n

  def iteration(it, prompts):
    calls.append((it, prompts[0][0]))
    return {"iteration": it, "score": 0.5 * it, "kl": 1.0, "seconds": 0.25}

  fake = types.SimpleNamespace(pc=types.SimpleNamespace(iterations=3, rollout_batch=2),
                               iteration=iteration)
  path = str(tmp_path / "ppo.jsonl")
  rows = ppo_trainer.PPOTrainer.run(fake, source, log_path=path)
  assert calls == [(0, 1), (1, 2), (2, 3)] and draws == [2, 2, 2]
  expected = [{"iteration": float(i), "score": 0.5 * i, "kl": 1.0, "seconds": 0.25}
              for i in range(3)]
  assert rows == expected
  with open(path) as f:
    lines = f.read().splitlines()
  assert lines == [json.dumps(r) for r in expected]  # values as floats, keys in written order
