"""SFT and reward-model trainers on the shared step: LoRA trains only adapters, the assistant-only
mask keeps user tokens out of the loss, and the reward model learns a separable preference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from baichuan_jax import configs, sharding, train
from baichuan_jax.align import engine, lora, preference, sft_data, trainers
from baichuan_jax.model import init_params
from tests.align_helpers import CharTokenizer

CFG = configs.get("tiny", num_layers=1, hidden_size=64, num_heads=2, num_kv_heads=2,
                  intermediate_size=192, vocab_size=512, dtype="float32")


def _mesh():
  return sharding.make_mesh(train.default_train_config().mesh, jax.devices()[:1])


def _train_cfg(batch_size, seq_len, lr, steps):
  tc = train.default_train_config()
  tc.batch_size, tc.seq_len, tc.peak_lr, tc.total_steps = batch_size, seq_len, lr, steps
  tc.warmup_steps, tc.zero_stage, tc.loss_chunk_size = 0, 0, 0
  return tc


def _packed_chat(tok, seq_len):
  convs = [[("user", "ab"), ("assistant", "cd")], [("user", "xyz"), ("assistant", "q")],
           [("user", "hello"), ("assistant", "hi"), ("user", "ok?"), ("assistant", "ok")]]
  exs = [sft_data.render_chat(sft_data.validate_chat(
      {"messages": [{"role": r, "content": c} for r, c in conv]}), tok) for conv in convs]
  return sft_data.pack_examples(exs, seq_len)


def test_lora_sft_trains_only_adapters():
  tok = CharTokenizer(vocab_size=512)
  packed = _packed_chat(tok, 16)
  batch = {k: v[:2] for k, v in packed.items()}
  base = jax.jit(lambda k: init_params(CFG, k))(jax.random.PRNGKey(0))
  lcfg = lora.LoRAConfig(rank=2, alpha=4.0, targets=("W_pack", "down_proj"))
  adapters = lora.init_lora(base, lcfg, jax.random.PRNGKey(1))
  tc = _train_cfg(2, 16, 1e-2, 3)
  lm_loss = train.lm_loss_fn(CFG, tc)
  trainer = engine.TreeTrainer(
      adapters, engine.replicated_axes(adapters), tc, _mesh(),
      lambda ad, b, r, frozen: lm_loss(lora.apply_lora(frozen, ad, lcfg, r), b, r))
  # Optimizer state exists only for the adapters: every moment has an adapter's shape.
  adapter_shapes = sorted(x.shape for x in jax.tree.leaves(adapters))
  moments = [x for x in jax.tree.leaves(trainer.state.opt_state) if x.ndim > 0]
  assert sorted(x.shape for x in moments) == sorted(adapter_shapes * 2)  # Adam mu and nu
  losses = [float(trainer.step(batch, frozen=base)["loss"]) for _ in range(3)]
  assert losses[-1] < losses[0]
  merged = lora.merge_lora(base, jax.device_get(trainer.params), lcfg)
  names = ["/".join(k.key for k in path) for path, _ in jax.tree_util.tree_flatten_with_path(base)[0]]
  changed = {n for n, a, b in zip(names, jax.tree.leaves(merged), jax.tree.leaves(base))
             if not np.array_equal(np.asarray(a), np.asarray(b))}
  assert changed == {"layers/self_attn/W_pack/kernel", "layers/mlp/down_proj/kernel"}


def test_sft_loss_ignores_user_tokens():
  tok = CharTokenizer(vocab_size=512)
  packed = _packed_chat(tok, 16)
  params = jax.jit(lambda k: init_params(CFG, k))(jax.random.PRNGKey(2))
  loss_fn = jax.jit(lambda p, b: train.lm_loss_fn(CFG, _train_cfg(2, 16, 1e-3, 1))(
      p, b, jax.random.PRNGKey(0))[1])
  out = loss_fn(params, packed)
  # Counted positions: each reply's tokens plus its closing </s> ("cd", "q", "hi", "ok").
  assert int(out["tokens"]) == int(packed["loss_mask"].sum()) == (2 + 1) + (1 + 1) + (2 + 1) + (2 + 1)
  # Targets where the user (or the template) speaks do not enter the loss at all.
  scrambled = dict(packed)
  user_slot = (packed["loss_mask"] == 0) & (packed["segment_ids"] > 0)
  scrambled["targets"] = np.where(user_slot, 7, packed["targets"])
  np.testing.assert_allclose(loss_fn(params, scrambled)["loss"], out["loss"], rtol=1e-6)


def test_reward_model_learns_separable_pairs():
  tok = CharTokenizer(vocab_size=512)
  rng = np.random.default_rng(0)
  letters = "abcdefghij"

  def pair(i):
    body = "".join(rng.choice(list(letters), size=5))
    # Chosen replies contain "+", rejected ones "-": a preference the model must find.
    return preference.PreferencePair("q" + str(i % 3), body + "+", body + "-",
                                     ("top", "sub" + str(i % 2)))

  pairs = [pair(i) for i in range(64)]
  enc = preference.encode_pairs(pairs, tok, 12, template="chat")
  tc = _train_cfg(8, 12, 3e-3, 30)
  tc.warmup_steps = 4
  params, rows = trainers.train_reward_model(
      CFG, None, enc, [p.category for p in pairs], tc, _mesh(), 30,
      eval_pairs={k: v[:16] for k, v in enc.items()}, eval_every=0)
  assert rows[0]["loss"] == pytest.approx(np.log(2), abs=0.05)  # small head init: r ~ 0
  assert rows[-1]["eval_accuracy"] == 1.0 and rows[-1]["eval_pairs"] == 16
  assert rows[-1]["eval_loss"] < 0.5 * np.log(2)
  assert "lm_head" not in params["backbone"]
