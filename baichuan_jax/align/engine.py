"""The alignment trainers' handle on the one train step: a state plus its jitted step for a tree.

Both classes are thin holders over `baichuan_jax.train.step`: `build_step` (the one jit builder
for any trainable tree with logical axes, with an optional frozen argument), `create_tree_state`
(the one TrainState initialisation from given weights) and `tree_state_shardings` (the one
state-sharding function). `ModelTrainer` trains a full language-model tree (full SFT, the PPO
actor) with `train.make_train_step`; `TreeTrainer` trains any other tree: LoRA adapters beside
frozen base weights, a backbone plus a scalar head (reward model, critic). Frozen weights (LoRA
base, the reference policy) are passed in, never captured as compile-time constants.

A `TreeTrainer` loss has the signature `loss_fn(trainable, batch, rng, frozen) -> (loss, metrics)`.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import jax
from jax.sharding import Mesh
import ml_collections

from baichuan_jax import sharding, train
from baichuan_jax.model import param_logical_axes
from baichuan_jax.train import step as train_step

AlignLossFn = Callable[[Any, dict, jax.Array, Any], tuple[jax.Array, dict]]


def lm_axes_without_head(cfg: ml_collections.ConfigDict) -> dict:
  """Logical axes of the backbone (model params minus lm_head)."""
  return {k: v for k, v in param_logical_axes(cfg).items() if k != "lm_head"}


def value_model_axes(cfg: ml_collections.ConfigDict) -> dict:
  """Logical axes of `reward.init_reward_params` trees (reward model, critic)."""
  return {"backbone": lm_axes_without_head(cfg),
          "head": {"kernel": sharding.logical_spec("embed"), "bias": sharding.logical_spec()}}


def replicated_axes(tree: Any) -> Any:
  """No logical axes for any leaf (small trees such as LoRA adapters stay replicated)."""
  return sharding.unsharded_axes(tree)


tree_shardings = train_step.tree_shardings  # re-exported: the one place is train/step.py


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
    self.state = train_step.create_tree_state(params, axes, train_cfg, mesh,
                                              jax.random.PRNGKey(seed))
    self._step = train_step.build_step(loss_fn, axes, params, train_cfg, mesh, frozen=True)
    self._eval = train_step.build_eval_step(loss_fn, axes, train_cfg, mesh, frozen=True)

  @property
  def params(self) -> Any:
    return self.state.params

  def step(self, batch: dict, frozen: Optional[Any] = None) -> dict:
    """One optimizer step on `batch` ([batch_size, ...] arrays); returns fp32 scalar metrics."""
    self.state, metrics = self._step(self.state, frozen, batch)
    return metrics

  def step_fn(self, frozen: Optional[Any] = None) -> Callable:
    """`step(state, batch) -> (state, metrics)` with `frozen` bound (for `train.loop.Loop`);
    set `self.state` to the loop's final state afterwards."""
    return lambda state, batch: self._step(state, frozen, batch)

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
    self.state = train_step.create_tree_state(params, param_logical_axes(model_cfg), train_cfg,
                                              mesh, jax.random.PRNGKey(seed))
    self._step = train.make_train_step(model_cfg, train_cfg, mesh, loss_fn=loss_fn)

  @property
  def params(self) -> Any:
    return self.state.params

  def step(self, batch: dict) -> dict:
    """One optimizer step on `batch`; returns the step's fp32 scalar metrics."""
    self.state, metrics = self._step(self.state, batch)
    return metrics

  def step_fn(self, frozen: Optional[Any] = None) -> Callable:
    """`step(state, batch) -> (state, metrics)` (for `train.loop.Loop`); `frozen` must be None."""
    if frozen is not None:
      raise ValueError("ModelTrainer trains the whole model tree: it has no frozen argument")
    return self._step
