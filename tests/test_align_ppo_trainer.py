"""PPO end to end on the tiny preset: critic warm-up leaves the actor unchanged, then both train;
rollouts from the KV-cache generator agree with a full forward pass."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from baichuan_jax import configs, sharding, train
from baichuan_jax.align import ppo_trainer, reward, rollout
from baichuan_jax.model import BaichuanLM, init_params

CFG = configs.get("tiny", num_layers=1, hidden_size=64, num_heads=2, num_kv_heads=2,
                  intermediate_size=192, vocab_size=512, dtype="float32")


@pytest.fixture(scope="module")
def trainer():
  mc = train.default_train_config().mesh
  mesh = sharding.make_mesh(mc, jax.devices()[:1])
  actor = jax.jit(lambda k: init_params(CFG, k))(jax.random.PRNGKey(0))
  rm = jax.jit(lambda k: reward.init_reward_params(CFG, k))(jax.random.PRNGKey(1))
  pc = ppo_trainer.default_ppo_config()
  pc.iterations, pc.critic_warmup = 4, 1
  pc.rollout_batch, pc.minibatch, pc.prompt_len, pc.max_new_tokens = 4, 2, 6, 5
  pc.lr = 1e-3  # large enough that one update visibly moves fp32 weights
  return ppo_trainer.PPOTrainer(CFG, pc, mesh, actor, rm)


def _prompts(n):
  r = np.random.RandomState(n)
  return [list(r.randint(3, 500, size=r.randint(2, 7))) for _ in range(n)]


def test_critic_warmup_then_actor_updates(trainer):
  leaves = lambda t: [np.asarray(x) for x in jax.tree.leaves(t)]  # noqa: E731
  actor0, critic0 = leaves(trainer.actor.params), leaves(trainer.critic.params)
  m0 = trainer.iteration(0, _prompts(4))
  for a, b in zip(actor0, leaves(trainer.actor.params)):
    np.testing.assert_array_equal(a, b)  # warm-up: actor bit-for-bit unchanged
  assert any(not np.array_equal(a, b) for a, b in zip(critic0, leaves(trainer.critic.params)))
  assert m0["actor_updated"] == 0.0 and np.isnan(m0["policy_loss"])
  assert m0["kl"] == pytest.approx(0.0, abs=0.05)  # actor == reference (bf16 copy) before updates
  assert m0["kl_coef"] == pytest.approx(0.2)
  m1 = trainer.iteration(1, _prompts(4))
  assert m1["actor_updated"] == 1.0
  assert any(not np.array_equal(a, b) for a, b in zip(actor0, leaves(trainer.actor.params)))
  for k in ("score", "kl", "policy_loss", "value_loss", "clip_fraction", "entropy"):
    assert np.isfinite(m1[k]), k
  assert 1 <= m1["response_length"] <= 5
  # Iteration 1 of 4, exponential 0.2 -> 0.005.
  assert m1["kl_coef"] == pytest.approx(0.2 * (0.005 / 0.2) ** (1 / 3), rel=1e-5)


def test_greedy_rollout_matches_full_forward():
  params = jax.jit(lambda k: init_params(CFG, k))(jax.random.PRNGKey(3))
  prompts = [[1, 7, 8, 9], [1, 5]]
  # eos_id -1 never stops a row, so all 4 tokens are generated.
  resp, rmask = rollout.generate_responses(CFG, params, prompts, 4, temperature=0.0, eos_id=-1)
  # Greedy means every generated token is the argmax of a plain (cache-free) forward pass over the
  # unpadded prompt + response so far: check all of them with one teacher-forced pass per row.
  full = jax.jit(lambda p, t: BaichuanLM(CFG).apply({"params": p}, t))
  for row, prompt in enumerate(prompts):
    gen = [int(x) for x in resp[row]]
    logits = full(params, jnp.asarray([prompt + gen]))[0]
    argmax = np.asarray(jnp.argmax(logits, axis=-1))
    assert list(argmax[len(prompt) - 1:-1]) == gen
  np.testing.assert_array_equal(rmask, np.ones((2, 4)))
  # Stopping on a token: make the row-0 first greedy token the stop token; it is kept (mask 1),
  # and everything after it is padding with mask 0.
  stop = int(resp[0, 0])
  resp2, rmask2 = rollout.generate_responses(CFG, params, prompts[:1], 4, temperature=0.0,
                                             eos_id=stop)
  np.testing.assert_array_equal(resp2[0], [stop, 0, 0, 0])
  np.testing.assert_array_equal(rmask2[0], [1, 0, 0, 0])


def _make_trainer(devices, model_axis):
  mc = train.default_train_config().mesh
  mc.model = model_axis
  mesh = sharding.make_mesh(mc, devices)
  actor = jax.jit(lambda k: init_params(CFG, k))(jax.random.PRNGKey(0))
  rm = jax.jit(lambda k: reward.init_reward_params(CFG, k))(jax.random.PRNGKey(1))
  pc = ppo_trainer.default_ppo_config()
  pc.iterations, pc.critic_warmup = 4, 1
  pc.rollout_batch, pc.minibatch, pc.prompt_len, pc.max_new_tokens = 4, 2, 6, 5
  pc.lr = 1e-3
  return ppo_trainer.PPOTrainer(CFG, pc, mesh, actor, rm)


def test_ppo_on_a_tensor_and_data_parallel_mesh_matches_one_device():
  # The four models on a 2 (data) x 2 (model) mesh: Megatron-split weights, sharded rollouts and
  # updates. Same seeds, so the same tokens are sampled and the metrics and weights agree with
  # the single-device run up to float reassociation.
  if len(jax.devices()) < 4:
    pytest.skip("needs 4 devices (tests/conftest.py forces 8 CPU devices)")
  one = _make_trainer(jax.devices()[:1], 1)
  four = _make_trainer(jax.devices()[:4], 2)
  kernel = four.actor.params["layers"]["mlp"]["up_proj"]["kernel"]
  assert len(kernel.sharding.device_set) == 4 and not kernel.sharding.is_fully_replicated
  for it in range(2):
    m1, m4 = one.iteration(it, _prompts(4)), four.iteration(it, _prompts(4))
    assert m4["response_length"] == m1["response_length"]
    for k in ("score", "kl", "value_loss", "entropy", "policy_loss"):
      if np.isnan(m1[k]):
        assert np.isnan(m4[k]), k
      else:
        assert m4[k] == pytest.approx(m1[k], rel=1e-3, abs=1e-4), k
  for a, b in zip(jax.tree.leaves(one.actor.params), jax.tree.leaves(four.actor.params)):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-5)
