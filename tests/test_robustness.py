"""No silent corruption: non-finite configs and updates, the workdir lock, save failures, rollback
counting, one-line checkpoint errors, absurd HF configs, undecodable data input."""

import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from baichuan_jax import configs, sharding, train
from baichuan_jax.train import config as train_config
from baichuan_jax.train import step as step_lib

INF, NAN = float("inf"), float("nan")


# ----------------------------------------------------------------------------------------------
# 1. Every config number finite; the step guard checks the update itself.


@pytest.mark.parametrize("field,value", [("init_std", INF), ("rope_theta", NAN),
                                         ("z_loss_weight", INF), ("rms_norm_eps", NAN)])
def test_model_config_rejects_non_finite_by_name(field, value):
  with pytest.raises(ValueError, match=f"config.{field}={value} is invalid: must be a finite"):
    configs.get("tiny", **{field: value})


def test_model_config_type_errors_name_the_field():
  with pytest.raises(ValueError, match="config.hidden_size='256' is invalid: must be of type int"):
    configs.get("tiny", hidden_size="256")
  with pytest.raises(ValueError, match="config.eos_id=4096 is invalid: must be < vocab_size=4096"):
    configs.get("tiny", eos_id=4096)


@pytest.mark.parametrize("field,value", [("peak_lr", INF), ("peak_lr", NAN), ("eps", INF),
                                         ("weight_decay", INF), ("grad_clip", INF),
                                         ("min_lr_ratio", NAN), ("betas", (0.9, NAN))])
def test_train_config_rejects_non_finite_by_name(field, value):
  tc = train_config.default_train_config()
  tc[field] = value
  with pytest.raises(ValueError, match=f"train config {field}=.* is invalid"):
    train_config.validate_train_config(tc)


def _tiny_state():
  cfg = configs.get("tiny", num_layers=1, hidden_size=32, num_heads=2, num_kv_heads=2,
                    intermediate_size=64, vocab_size=64, max_seq_len=16, dtype="float32")
  tc = train_config.default_train_config()
  tc.batch_size, tc.seq_len, tc.warmup_steps, tc.total_steps, tc.loss_chunk_size = 2, 8, 0, 10, 0
  tc.zero_stage = 0
  mesh = sharding.make_mesh(tc.mesh, jax.devices()[:1])
  return cfg, tc, train.create_train_state(cfg, tc, mesh)


def _bits(tree):
  return [np.asarray(x).tobytes() for x in jax.tree.leaves(jax.device_get(tree))]


def test_guard_skips_a_non_finite_update_with_finite_loss_and_gradient():
  _, _, state = _tiny_state()
  grads = jax.tree.map(lambda p: jnp.full_like(p, 1e-3), state.params)
  metrics = {"loss": jnp.float32(1.0)}
  sched = lambda _: jnp.float32(INF)  # noqa: E731
  # lr = inf: the gradient and loss are finite, the update is -inf * g -> params -inf.
  new, m = step_lib.guarded_update(state, grads, metrics, state.rng, optax.sgd(INF), sched)
  assert float(m["skipped"]) == 1 and int(new.skipped) == 1 and int(new.consecutive_bad) == 1
  assert math.isfinite(float(m["grad_norm"]))
  assert _bits(new.params) == _bits(state.params)
  # The same with a finite lr applies the update.
  ok, m = step_lib.guarded_update(state, grads, metrics, state.rng, optax.sgd(0.5), sched)
  assert float(m["skipped"]) == 0
  leaf = jax.tree.leaves(state.params)[0]
  assert np.allclose(np.asarray(jax.tree.leaves(ok.params)[0]), np.asarray(leaf) - 0.5e-3)
