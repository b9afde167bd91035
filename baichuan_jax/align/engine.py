"""The pretraining step for the alignment trainers: language-model trees and any other trainable tree.

`ModelTrainer` trains a full language-model parameter tree (full SFT, the PPO actor) with
`baichuan_jax.train.make_train_step(..., loss_fn=...)` itself, starting from given weights.

`make_train_step` is built around the language model's own parameter tree. The alignment trainers
train other trees too: LoRA adapters beside frozen base weights, a backbone plus a
scalar head (reward model, critic). This module reuses the engine's pieces as they are: the
micro-batch gradient accumulation (`grads_and_metrics`), the AdamW + clip optimizer and schedule,
`TrainState`, non-finite-step skipping and the mesh/logical-axis-rule context. What it adds is the
shardings of an arbitrary tree (from its logical axis names) and a second, frozen argument: frozen
weights (LoRA base, the reference policy) are passed in, never captured as compile-time constants.

A loss here has the signature `loss_fn(trainable, batch, rng, frozen) -> (loss, metrics)`.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec
import ml_collections
import optax

from baichuan_jax import sharding
from baichuan_jax import train
from baichuan_jax.model import param_logical_axes
from baichuan_jax.train import optim
from baichuan_jax.train import step as train_step
from baichuan_jax.train.step import TrainState

AlignLossFn = Callable[[Any, dict, jax.Array, Any], tuple[jax.Array, dict]]


def lm_axes_without_head(cfg: ml_collections.ConfigDict) -> dict:
  """Logical axes of the backbone (model params minus lm_head)."""
  return {k: v for k, v in param_logical_axes(cfg).items() if k != "lm_head"}


def value_model_axes(cfg: ml_collections.ConfigDict) -> dict:
  """Logical axes of `reward.init_reward_params` trees (reward model, critic)."""
  return {"backbone": lm_axes_without_head(cfg),
          "head": {"kernel": PartitionSpec("embed"), "bias": PartitionSpec()}}


def replicated_axes(tree: Any) -> Any:
  """No logical axes for any leaf (small trees such as LoRA adapters stay replicated)."""
  return jax.tree.map(lambda x: PartitionSpec(*([None] * len(x.shape))), tree)


def tree_shardings(axes: Any, mesh: Mesh, zero_stage: int, view: str) -> Any:
  """NamedShardings for a tree of logical PartitionSpecs in one view of the state."""
  return sharding.logical_to_sharding(axes, mesh, sharding.logical_axis_rules(zero_stage, view))


def _state_shardings(axes, train_cfg, mesh, opt, abstract_params):
  rep = sharding.replicated(mesh)
  p = tree_shardings(axes, mesh, train_cfg.zero_stage, "params")
  o_param = tree_shardings(axes, mesh, train_cfg.zero_stage, "opt_state")
  abstract_opt = jax.eval_shape(opt.init, abstract_params)
  o = optax.tree_map_params(opt, lambda _, s: s, abstract_opt, o_param,
                            transform_non_params=lambda _: rep,
                            is_leaf=lambda x: isinstance(x, jax.sharding.NamedSharding))
  return TrainState(step=rep, params=p, opt_state=o, rng=rep, skipped=rep, consecutive_bad=rep)


class TreeTrainer:
  """Train state and the one jitted step for a trainable tree with given logical axes.

  Args:
    params: initial trainable parameters (fp32).
    axes: logical PartitionSpec per leaf of `params`.
    train_cfg: the engine's train config (`baichuan_jax.train.default_train_config()`).
    mesh: device mesh.
    loss_fn: `loss_fn(trainable, batch, rng, frozen) -> (loss, metrics)`.
    seed: RNG seed of the per-step key passed to the loss.
  """

  def __init__(self, params: Any, axes: Any, train_cfg: ml_collections.ConfigDict, mesh: Mesh,
               loss_fn: AlignLossFn, seed: int = 0):
    self.mesh, self.train_cfg = mesh, train_cfg
    opt = optim.make_optimizer(train_cfg)
    schedule = optim.lr_schedule(train_cfg)
    abstract = jax.eval_shape(lambda: params)
    st_shard = _state_shardings(axes, train_cfg, mesh, opt, abstract)
    grad_shard = tree_shardings(axes, mesh, train_cfg.zero_stage, "grads")
    rules = sharding.logical_axis_rules(train_cfg.zero_stage, "params")
    rep = sharding.replicated(mesh)

    def init(p):
      return TrainState(step=jnp.zeros((), jnp.int32), params=p, opt_state=opt.init(p),
                        rng=jax.random.PRNGKey(seed), skipped=jnp.zeros((), jnp.int32),
                        consecutive_bad=jnp.zeros((), jnp.int32))

    def step(state: TrainState, frozen: Any, batch: dict):
      rng, step_rng = jax.random.split(state.rng)
      bound = lambda p, b, r: loss_fn(p, b, r, frozen)  # noqa: E731
      grads, metrics = train_step.grads_and_metrics(
          bound, state.params, batch, step_rng, train_cfg.microbatches, grad_shard, mesh)
      return train_step.guarded_update(state, grads, metrics, rng, opt, schedule)

    def evaluate(params, frozen, batch):
      _, metrics = loss_fn(params, batch, jax.random.PRNGKey(0), frozen)
      return {k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()}

    mj = train_step.MeshJit
    self.state = mj(init, mesh, rules, out_shardings=st_shard)(params)
    self._step = mj(step, mesh, rules, in_shardings=(st_shard, None, sharding.batch_sharding(mesh)),
                    out_shardings=(st_shard, rep), donate_argnums=(0,))
    self._eval = mj(evaluate, mesh, rules,
                    in_shardings=(st_shard.params, None, sharding.batch_sharding(mesh)),
                    out_shardings=rep)

  @property
  def params(self) -> Any:
    return self.state.params

  def step(self, batch: dict, frozen: Optional[Any] = None) -> dict:
    """One optimizer step on `batch` ([batch_size, ...] arrays); returns fp32 scalar metrics."""
    self.state, metrics = self._step(self.state, frozen, batch)
    return metrics

  def evaluate(self, batch: dict, frozen: Optional[Any] = None) -> dict:
    """The loss's metrics on `batch` without an update."""
    return self._eval(self.state.params, frozen, batch)


class ModelTrainer:
  """`train.make_train_step` with a custom loss, started from given language-model weights.

  Args:
    params: initial model parameters (fp32 master weights; e.g. a pretrained policy).
    model_cfg: model config.
    train_cfg: the engine's train config.
    mesh: device mesh.
    loss_fn: `loss_fn(params, batch, rng) -> (loss, metrics)`; None = next-token LM loss.
    seed: RNG seed of the per-step key.
  """

  def __init__(self, params: Any, model_cfg: ml_collections.ConfigDict,
               train_cfg: ml_collections.ConfigDict, mesh: Mesh,
               loss_fn: Optional[train.step.LossFn] = None, seed: int = 0):
    shard = train.state_shardings(model_cfg, train_cfg, mesh)
    opt = optim.make_optimizer(train_cfg)
    params = jax.tree.map(lambda x, s: jax.device_put(jnp.asarray(x, jnp.float32), s), params,
                          shard.params)
    rep = sharding.replicated(mesh)
    zero = lambda: jax.device_put(jnp.zeros((), jnp.int32), rep)  # noqa: E731 (own buffer each: the step donates)
    self.state = TrainState(step=zero(), params=params,
                            opt_state=jax.device_put(opt.init(params), shard.opt_state),
                            rng=jax.device_put(jax.random.PRNGKey(seed), rep), skipped=zero(),
                            consecutive_bad=zero())
    self._step = train.make_train_step(model_cfg, train_cfg, mesh, loss_fn=loss_fn)

  @property
  def params(self) -> Any:
    return self.state.params

  def step(self, batch: dict) -> dict:
    """One optimizer step on `batch`; returns the step's fp32 scalar metrics."""
    self.state, metrics = self._step(self.state, batch)
    return metrics
