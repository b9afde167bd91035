"""The train state, its sharded initialisation, and the one jitted train / eval step.

`make_train_step` returns ONE `jax.jit` with explicit in/out shardings (pjit semantics): the
model runs in bf16 on fp32 master parameters, gradients are accumulated over micro-batches with
`lax.scan`, clipped, and applied by AdamW; a non-finite loss or gradient leaves params and
optimizer state untouched and is counted. The loss is a parameter, so SFT, reward modelling and
PPO reuse the step and add only their loss.

A loss function has the signature `loss_fn(params, batch, rng) -> (loss, metrics)`: `loss` is the
scalar to differentiate; `metrics` is a dict of scalars. If it holds `weight` (e.g. the number of
counted tokens), micro-batch gradients and metrics are averaged with those weights, which makes
accumulation exactly equal to one big batch for token-mean losses; `tokens` is summed.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Optional

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding
import ml_collections
import numpy as np
import optax

from baichuan_jax import configs, sharding
from baichuan_jax.model import BaichuanLM, init_params, param_logical_axes
from baichuan_jax.train import optim
from baichuan_jax.train.chunked_loss import chunked_lm_loss
from baichuan_jax.train.config import validate_train_config

LossFn = Callable[[Any, dict, jax.Array], tuple[jax.Array, dict]]
BATCH_KEYS = ("inputs", "targets", "positions", "segment_ids", "loss_mask")
SUM_METRICS = ("tokens",)


@flax.struct.dataclass
class TrainState:
  """Everything a step reads and writes; a checkpoint saves all of it."""
  step: jax.Array  # int32 []: train steps run (skipped ones included)
  params: Any  # fp32 master parameters
  opt_state: Any  # optax state; fp32 moments
  rng: jax.Array  # PRNG key; split once per step
  skipped: jax.Array  # int32 []: total steps whose update was skipped (non-finite)
  consecutive_bad: jax.Array  # int32 []: skipped steps in a row; the loop rolls back at K


# ----------------------------------------------------------------------------------------------
# Losses.


def lm_loss_fn(model_cfg: ml_collections.ConfigDict, train_cfg: ml_collections.ConfigDict,
               vocab_shards: int = 1) -> LossFn:
  """Next-token loss on a loader batch (inputs, targets, positions, segment_ids, loss_mask).

  Uses the split output layer (`chunked_lm_loss`) when `train_cfg.loss_chunk_size > 0`.
  Metrics: loss, ce, z_loss, tokens, weight (= tokens).
  """
  model = BaichuanLM(model_cfg)

  def loss_fn(params, batch, rng):
    del rng  # the Baichuan model has no dropout
    hidden = model.apply({"params": params}, batch["inputs"], positions=batch.get("positions"),
                         segment_ids=batch.get("segment_ids"), return_hidden=True)
    out = chunked_lm_loss(hidden, params["lm_head"], batch["targets"], batch.get("loss_mask"),
                          norm_head=model_cfg.norm_head, z_loss_weight=model_cfg.z_loss_weight,
                          chunk_size=train_cfg.loss_chunk_size,
                          vocab_chunks=train_cfg.loss_vocab_chunks, vocab_shards=vocab_shards)
    out["weight"] = jax.lax.stop_gradient(out["tokens"])
    return out["loss"], out

  return loss_fn


# ----------------------------------------------------------------------------------------------
# Shardings and initialisation.


class MeshJit:
  """A jitted function called (and lowered) with the mesh and logical-axis rules in context, so
  the model's `with_logical_constraint` activations follow `sharding.logical_axis_rules`.

  In a multi-process job, a host (numpy) batch at position `batch_arg` holds only this
  process's rows (`sharding.host_batch_rows`) and is assembled into the global array first.
  """

  def __init__(self, fn, mesh: Mesh, rules, batch_arg: Optional[int] = None, **jit_kwargs):
    self.mesh, self.rules, self.batch_arg = mesh, rules, batch_arg
    self.jitted = jax.jit(fn, **jit_kwargs)

  def __call__(self, *args):
    if self.batch_arg is not None and jax.process_count() > 1:
      batch = args[self.batch_arg]
      if not all(isinstance(x, jax.Array) for x in jax.tree.leaves(batch)):
        args = list(args)
        args[self.batch_arg] = sharding.global_batch(batch, self.mesh)
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      return self.jitted(*args)

  def lower(self, *args):
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      return self.jitted.lower(*args)


def init_state(params: Any, opt: optax.GradientTransformation, rng: jax.Array) -> TrainState:
  """The one TrainState initialisation: step 0, fresh optimizer state, no skipped steps."""
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=opt.init(params),
                    rng=rng, skipped=jnp.zeros((), jnp.int32),
                    consecutive_bad=jnp.zeros((), jnp.int32))


def tree_shardings(axes: Any, mesh: Mesh, zero_stage: int, view: str) -> Any:
  """NamedShardings for a tree of logical PartitionSpecs in one view of the state."""
  return sharding.logical_to_sharding(axes, mesh, sharding.logical_axis_rules(zero_stage, view))


def tree_state_shardings(axes: Any, params_like: Any, train_cfg: ml_collections.ConfigDict,
                         mesh: Mesh) -> TrainState:
  """The one state-sharding function: NamedShardings for every leaf of a TrainState.

  Args:
    axes: logical PartitionSpec per leaf of the trainable tree.
    params_like: the trainable tree (arrays or ShapeDtypeStructs; only shapes are read).
    train_cfg: train config (ZeRO stage, optimizer).
    mesh: device mesh.
  Returns:
    TrainState of NamedShardings: params and opt_state per the ZeRO stage, scalars replicated.
  """
  rep = sharding.replicated(mesh)
  p_shard = tree_shardings(axes, mesh, train_cfg.zero_stage, "params")
  o_param_shard = tree_shardings(axes, mesh, train_cfg.zero_stage, "opt_state")
  opt = optim.make_optimizer(train_cfg)
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(jnp.shape(x), x.dtype), params_like)
  abstract_opt = jax.eval_shape(opt.init, abstract)
  o_shard = optax.tree_map_params(
      opt, lambda _, s: s, abstract_opt, o_param_shard,
      transform_non_params=lambda _: rep, is_leaf=lambda x: isinstance(x, NamedSharding))
  return TrainState(step=rep, params=p_shard, opt_state=o_shard, rng=rep, skipped=rep,
                    consecutive_bad=rep)


def create_tree_state(params: Any, axes: Any, train_cfg: ml_collections.ConfigDict, mesh: Mesh,
                      rng: jax.Array) -> TrainState:
  """A fresh TrainState for given starting parameters (cast to fp32), placed on its shardings."""
  opt = optim.make_optimizer(train_cfg)
  shard = tree_state_shardings(axes, params, train_cfg, mesh)
  init = lambda p, r: init_state(jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), p), opt, r)  # noqa: E731
  rules = sharding.logical_axis_rules(train_cfg.zero_stage, "params")
  return MeshJit(init, mesh, rules, out_shardings=shard)(params, rng)


def _abstract_state(model_cfg, train_cfg):
  opt = optim.make_optimizer(train_cfg)

  def init(rng):
    return init_state(init_params(model_cfg, rng), opt, jax.random.fold_in(rng, 1))

  return init, jax.eval_shape(init, jax.random.PRNGKey(0))


def state_shardings(model_cfg: ml_collections.ConfigDict, train_cfg: ml_collections.ConfigDict,
                    mesh: Mesh) -> TrainState:
  """NamedShardings for every leaf of the LM TrainState (`tree_state_shardings` of its axes)."""
  _, abstract = _abstract_state(model_cfg, train_cfg)
  return tree_state_shardings(param_logical_axes(model_cfg), abstract.params, train_cfg, mesh)


def abstract_train_state(model_cfg: ml_collections.ConfigDict,
                         train_cfg: ml_collections.ConfigDict, mesh: Mesh) -> TrainState:
  """The TrainState as ShapeDtypeStructs carrying their shardings (for AOT lowering, restore)."""
  _, abstract = _abstract_state(model_cfg, train_cfg)
  shard = state_shardings(model_cfg, train_cfg, mesh)
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract, shard)


def create_train_state(model_cfg: ml_collections.ConfigDict, train_cfg: ml_collections.ConfigDict,
                       mesh: Mesh, rng: Optional[jax.Array] = None) -> TrainState:
  """Initialises params and optimizer state directly in their shards (no full copy anywhere).

  Args:
    model_cfg: model config (`configs.get(...)`).
    train_cfg: train config (`default_train_config()`).
    mesh: from `sharding.make_mesh`.
    rng: PRNG key (default `PRNGKey(train_cfg.seed)`).
  Returns:
    TrainState with step 0, sharded per `state_shardings`.
  """
  validate(model_cfg, train_cfg, mesh)
  init, _ = _abstract_state(model_cfg, train_cfg)
  rng = jax.random.PRNGKey(train_cfg.seed) if rng is None else rng
  shard = state_shardings(model_cfg, train_cfg, mesh)
  # The out_shardings make XLA generate each shard on its own device (partitionable threefry),
  # so the full model never exists in one place.
  rules = sharding.logical_axis_rules(train_cfg.zero_stage, "params")
  return MeshJit(init, mesh, rules, out_shardings=shard)(rng)


def validate(model_cfg: ml_collections.ConfigDict, train_cfg: ml_collections.ConfigDict,
             mesh: Mesh) -> None:
  """All config checks that can fail before compiling (fields, mesh divisibility)."""
  configs.validate(model_cfg)
  validate_train_config(train_cfg)
  sharding.check_divisibility(model_cfg, train_cfg, mesh)


# ----------------------------------------------------------------------------------------------
# Steps.


def _split_micro(x: jax.Array, n: int) -> jax.Array:
  """[batch, ...] -> [n, batch / n, ...], micro-batch k = rows k, k + n, ... so that the
  data-parallel split of the batch dimension stays put (no cross-device shuffle)."""
  b = x.shape[0]
  return jnp.swapaxes(x.reshape(b // n, n, *x.shape[1:]), 0, 1)


def _weighted(metrics: dict) -> tuple[jax.Array, dict]:
  w = jnp.asarray(metrics.get("weight", 1.0), jnp.float32)
  out = {k: (v if k in SUM_METRICS else v * w) for k, v in metrics.items() if k != "weight"}
  return w, out


def _finish(wsum: jax.Array, sums: dict) -> dict:
  denom = jnp.where(wsum > 0, wsum, 1.0)
  return {k: (v if k in SUM_METRICS else v / denom) for k, v in sums.items()}


def grads_and_metrics(loss_fn, params, batch, rng, microbatches, grad_shard, mesh):
  """Weighted-mean gradient and metrics over micro-batches (scan; fp32 accumulators)."""
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  constrain = lambda g: jax.lax.with_sharding_constraint(g, grad_shard)  # noqa: E731

  def one(mb, key):
    (_, metrics), g = grad_fn(params, mb, key)
    w, m = _weighted(metrics)
    return constrain(jax.tree.map(lambda x: x.astype(jnp.float32) * w, g)), w, m

  if microbatches == 1:
    g_sum, wsum, m_sum = one(batch, rng)
  else:
    micro = jax.tree.map(lambda x: _split_micro(x, microbatches), batch)
    micro = jax.lax.with_sharding_constraint(micro, sharding.microbatch_sharding(mesh))
    keys = jax.random.split(rng, microbatches)
    g0, w0, m0 = jax.eval_shape(one, jax.tree.map(lambda x: x[0], micro), keys[0])
    zeros = lambda t: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), t)  # noqa: E731

    def body(carry, xs):
      g_acc, w_acc, m_acc = carry
      g, w, m = one(*xs)
      return (constrain(jax.tree.map(jnp.add, g_acc, g)), w_acc + w,
              jax.tree.map(jnp.add, m_acc, m)), None

    init = (constrain(zeros(g0)), zeros(w0), zeros(m0))
    (g_sum, wsum, m_sum), _ = jax.lax.scan(body, init, (micro, keys))
  denom = jnp.where(wsum > 0, wsum, 1.0)
  grads = jax.tree.map(lambda g: g / denom, g_sum)
  return grads, _finish(wsum, m_sum)


def _inexact(x) -> bool:
  return hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.inexact)


def all_finite(tree: Any) -> jax.Array:
  """bool []: every floating-point element of `tree` is finite (integer leaves are ignored)."""
  leaves = [x for x in jax.tree.leaves(tree) if _inexact(x)]
  ok = jnp.asarray(True)
  for x in leaves:
    ok = ok & jnp.all(jnp.isfinite(x))
  return ok


def update_finite(new_params: Any, new_opt: Any) -> jax.Array:
  """bool []: every floating-point element of the new params and optimizer state is finite.

  The moment trees of `new_opt` shaped like the params (AdamW's mu and nu) are checked together
  with the params, one reduction per parameter leaf over `isfinite(p) & isfinite(mu) & ...`, so
  a program that computes the update inside the check reads each leaf's inputs once; the other
  optimizer leaves are checked one by one (`all_finite`).
  """
  pdef = jax.tree.structure(new_params)
  if pdef.num_leaves < 2:  # a lone array's treedef matches every leaf: nothing to pair
    return all_finite(new_params) & all_finite(new_opt)
  parts = jax.tree.leaves(new_opt, is_leaf=lambda x: jax.tree.structure(x) == pdef)
  moments = [jax.tree.leaves(t) for t in parts if jax.tree.structure(t) == pdef]
  rest = [t for t in parts if jax.tree.structure(t) != pdef]
  ok = all_finite(rest)
  for group in zip(jax.tree.leaves(new_params), *moments):
    flags = [jnp.isfinite(x) for x in group if _inexact(x)]  # integer leaves: nothing to check
    if flags:
      ok = ok & jnp.all(functools.reduce(jnp.logical_and, flags))
  return ok


# How the update's finiteness decides what is kept (both keep every bit of the old state on a
# bad step and give the same new state on a good one):
# - False: the update is written out, checked, and a select over new and old state picks (the
#   H200 profile of the ~1B step: 3.4 ms of finiteness reductions and 8.7 ms of selects after
#   5.4 ms of update, reading and writing the parameters and moments three times);
# - True: a first pass computes the update inside the finiteness reductions without writing it;
#   then, behind an optimization barrier (so XLA neither merges the two computations nor runs
#   the second before the verdict), the update is computed again with the select inside the
#   same elementwise pass. Two reads of the state and one write, for a second evaluation of the
#   elementwise AdamW formula. Timed against False by benchmarks/gpu_suite.py (the optimizer
#   update alone), which benchmarks/gpu_apply.py applies by rule.
GUARD_RECOMPUTE = False


def _apply(opt, grads, opt_state, params):
  updates, new_opt = opt.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), new_opt


def guarded_update(state: TrainState, grads: Any, metrics: dict, rng: jax.Array,
                   opt: optax.GradientTransformation, schedule: Callable) -> tuple[TrainState, dict]:
  """Applies one optimizer update unless the loss, the gradient norm or the update is non-finite.

  A finite loss and gradient can still give a non-finite update (an lr of inf, an overflowing
  moment, params already at the edge of the float range), so the new parameters and optimizer
  moments are checked too (`update_finite`). A skipped step leaves every bit of params and
  moments as it was (select, not multiply) and counts in `skipped` / `consecutive_bad`; how the
  select is fused is `GUARD_RECOMPUTE`'s choice, the result the same. Returns the new state and
  the fp32 metrics: the loss's own plus grad_norm, lr, skipped, consecutive_bad and
  total_skipped.
  """
  grad_norm = optax.global_norm(grads)
  new_params, new_opt = _apply(opt, grads, state.opt_state, state.params)
  ok = (jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
        & update_finite(new_params, new_opt))
  old_params, old_opt = state.params, state.opt_state
  if GUARD_RECOMPUTE:
    grads, old_opt, old_params, ok = jax.lax.optimization_barrier(
        (grads, old_opt, old_params, ok))
    new_params, new_opt = _apply(opt, grads, old_opt, old_params)
  keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)  # noqa: E731
  bad = (~ok).astype(jnp.int32)
  new_state = TrainState(
      step=state.step + 1, params=keep(new_params, old_params),
      opt_state=keep(new_opt, old_opt), rng=rng, skipped=state.skipped + bad,
      consecutive_bad=jnp.where(ok, 0, state.consecutive_bad + 1))
  # The optimizer has applied (step - skipped) updates: that is the schedule's position.
  lr = schedule(state.step - state.skipped)
  metrics = dict(metrics, grad_norm=grad_norm, lr=lr, skipped=bad.astype(jnp.float32),
                 consecutive_bad=new_state.consecutive_bad.astype(jnp.float32),
                 total_skipped=new_state.skipped.astype(jnp.float32))
  return new_state, {k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()}


def make_train_step(model_cfg: ml_collections.ConfigDict, train_cfg: ml_collections.ConfigDict,
                    mesh: Mesh, loss_fn: Optional[LossFn] = None, donate: bool = True):
  """Builds `step(state, batch) -> (state, metrics)`: one jit with explicit shardings.

  Args:
    model_cfg: model config; its `dtype` (bf16) is the compute dtype, `param_dtype` the master
      dtype, `remat_policy` the per-block rematerialisation.
    train_cfg: train config.
    mesh: device mesh (`sharding.make_mesh`).
    loss_fn: `loss_fn(params, batch, rng) -> (loss, metrics)`; default: next-token LM loss
      with the split output layer.
    donate: donate the input state's buffers (halves state memory; the caller must not reuse
      the state it passed in).
  Returns:
    A callable `step(state, batch)`; `batch` is a dict of [batch_size, ...] arrays (the loader
    contract), sharded over the data axes. In a multi-process job a numpy batch holds only this
    process's rows (`sharding.host_batch_rows`; the loader's per-process shard). Metrics
    (fp32 scalars): loss, ce, z_loss (for the LM loss; whatever `loss_fn` reports otherwise),
    grad_norm, lr, skipped (1. if this update was skipped), tokens, consecutive_bad,
    total_skipped. `step.lower(state, batch)` lowers it AOT.
  Raises:
    ValueError: before compiling, for any config that does not fit the mesh.
  """
  validate(model_cfg, train_cfg, mesh)
  if loss_fn is None:
    loss_fn = lm_loss_fn(model_cfg, train_cfg, vocab_shards=sharding.model_parallel_size(mesh))
  _, abstract = _abstract_state(model_cfg, train_cfg)
  return build_step(loss_fn, param_logical_axes(model_cfg), abstract.params, train_cfg, mesh,
                    donate=donate)


def build_step(loss_fn: Callable, axes: Any, params_like: Any,
               train_cfg: ml_collections.ConfigDict, mesh: Mesh, *, frozen: bool = False,
               donate: bool = True) -> MeshJit:
  """The one jit builder of a train step, for any trainable tree with logical axes.

  Args:
    loss_fn: `loss_fn(params, batch, rng) -> (loss, metrics)`, or with `frozen`
      `loss_fn(params, batch, rng, frozen) -> (loss, metrics)`.
    axes: logical PartitionSpec per leaf of the trainable tree (`param_logical_axes(cfg)` for
      the LM; `align.engine.value_model_axes`, `replicated_axes` for other trees).
    params_like: the trainable tree or its ShapeDtypeStructs (for the optimizer-state layout).
    train_cfg: train config (optimizer, schedule, micro-batches, ZeRO stage).
    mesh: device mesh.
    frozen: the step takes a second, frozen tree (`step(state, frozen, batch)`): frozen weights
      (a LoRA base, a reference policy) are an argument, never compile-time constants.
    donate: donate the input state's buffers.
  Returns:
    `step(state, batch)` (or `step(state, frozen, batch)`) -> (state, fp32 scalar metrics),
    jitted with the shardings of `tree_state_shardings`.
  """
  opt = optim.make_optimizer(train_cfg)
  schedule = optim.lr_schedule(train_cfg)
  st_shard = tree_state_shardings(axes, params_like, train_cfg, mesh)
  grad_shard = tree_shardings(axes, mesh, train_cfg.zero_stage, "grads")
  microbatches = train_cfg.microbatches

  def update(state: TrainState, batch: dict, bound: Callable):
    rng, step_rng = jax.random.split(state.rng)
    grads, metrics = grads_and_metrics(bound, state.params, batch, step_rng, microbatches,
                                       grad_shard, mesh)
    return guarded_update(state, grads, metrics, rng, opt, schedule)

  if frozen:
    step = lambda state, fz, batch: update(  # noqa: E731
        state, batch, lambda p, b, r: loss_fn(p, b, r, fz))
    in_shard, batch_arg = (st_shard, None, sharding.batch_sharding(mesh)), 2
  else:
    step = lambda state, batch: update(state, batch, loss_fn)  # noqa: E731
    in_shard, batch_arg = (st_shard, sharding.batch_sharding(mesh)), 1
  rules = sharding.logical_axis_rules(train_cfg.zero_stage, "params")
  return MeshJit(step, mesh, rules, batch_arg=batch_arg, in_shardings=in_shard,
                 out_shardings=(st_shard, sharding.replicated(mesh)),
                 donate_argnums=(0,) if donate else ())


def build_eval_step(loss_fn: Callable, axes: Any, train_cfg: ml_collections.ConfigDict,
                    mesh: Mesh, *, frozen: bool = False) -> MeshJit:
  """The one jit builder of an eval step: `eval_step(params[, frozen], batch) -> metrics`.

  Same loss signatures and shardings as `build_step`; the loss sees the fixed key PRNGKey(0).
  """
  p_shard = tree_shardings(axes, mesh, train_cfg.zero_stage, "params")

  def metrics_of(params, batch, *fz):
    _, metrics = loss_fn(params, batch, jax.random.PRNGKey(0), *fz)
    return {k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()}

  if frozen:
    fn = lambda params, fz, batch: metrics_of(params, batch, fz)  # noqa: E731
    in_shard, batch_arg = (p_shard, None, sharding.batch_sharding(mesh)), 2
  else:
    fn, in_shard, batch_arg = metrics_of, (p_shard, sharding.batch_sharding(mesh)), 1
  rules = sharding.logical_axis_rules(train_cfg.zero_stage, "params")
  return MeshJit(fn, mesh, rules, batch_arg=batch_arg, in_shardings=in_shard,
                 out_shardings=sharding.replicated(mesh))


def make_eval_step(model_cfg: ml_collections.ConfigDict, train_cfg: ml_collections.ConfigDict,
                   mesh: Mesh, loss_fn: Optional[LossFn] = None):
  """Builds `eval_step(params, batch) -> metrics` (no gradients), jitted with the same shardings.

  Metrics are the loss function's (for the LM loss: loss, ce, z_loss, tokens, weight). To average
  over many batches weight each batch's values by `weight` (the token count).
  """
  validate(model_cfg, train_cfg, mesh)
  if loss_fn is None:
    loss_fn = lm_loss_fn(model_cfg, train_cfg, vocab_shards=sharding.model_parallel_size(mesh))
  return build_eval_step(loss_fn, param_logical_axes(model_cfg), train_cfg, mesh)


# ----------------------------------------------------------------------------------------------
# Ahead-of-time sizing.


def abstract_batch(train_cfg: ml_collections.ConfigDict, mesh: Mesh) -> dict:
  """Loader-contract batch as int32 ShapeDtypeStructs [batch_size, seq_len], data-sharded."""
  shape = (train_cfg.batch_size, train_cfg.seq_len)
  s = sharding.batch_sharding(mesh)
  return {k: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=s) for k in BATCH_KEYS}


def dry_run(model_cfg: ml_collections.ConfigDict, train_cfg: ml_collections.ConfigDict,
            mesh: Mesh, loss_fn: Optional[LossFn] = None) -> dict[str, Any]:
  """Lowers and compiles the train step on abstract inputs and reports per-device memory.

  Nothing is allocated: params, optimizer state and batch are ShapeDtypeStructs. For a mesh
  larger than the machine, run on CPU with
  `XLA_FLAGS=--xla_force_host_platform_device_count=N` (N = mesh size) set before jax starts.
  CPU compilation sizes temporaries with the CPU backend's fusion decisions: treat
  `temp_bytes` as an estimate of the accelerator's activation memory.

  Returns:
    dict (bytes per device unless named otherwise): params_bytes, opt_state_bytes,
    batch_bytes, temp_bytes (activations and other temporaries), argument_bytes,
    output_bytes, alias_bytes (donated, reused for outputs), peak_bytes
    (= argument + output - alias + temp), flops (per device per step, if the backend reports
    it), mesh ({axis: size}), compile_seconds.
  """
  import time  # pylint: disable=import-outside-toplevel
  state = abstract_train_state(model_cfg, train_cfg, mesh)
  batch = abstract_batch(train_cfg, mesh)
  shard = state_shardings(model_cfg, train_cfg, mesh)
  step = make_train_step(model_cfg, train_cfg, mesh, loss_fn=loss_fn)
  t0 = time.perf_counter()
  compiled = step.lower(state, batch).compile()
  seconds = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  report = {
      "mesh": sharding.mesh_shape(mesh),
      "params_bytes": sharding.per_device_bytes(state.params, shard.params),
      "opt_state_bytes": sharding.per_device_bytes(state.opt_state, shard.opt_state),
      "batch_bytes": sharding.per_device_bytes(batch, jax.tree.map(lambda x: x.sharding, batch)),
      "temp_bytes": int(mem.temp_size_in_bytes),
      "argument_bytes": int(mem.argument_size_in_bytes),
      "output_bytes": int(mem.output_size_in_bytes),
      "alias_bytes": int(mem.alias_size_in_bytes),
      "flops": float((cost or {}).get("flops", float("nan"))),
      "compile_seconds": seconds,
  }
  report["peak_bytes"] = (report["argument_bytes"] + report["output_bytes"]
                          - report["alias_bytes"] + report["temp_bytes"])
  return report


def format_dry_run(report: dict) -> str:
  """Human-readable table of a `dry_run` report (GiB per device)."""
  gib = lambda b: f"{b / 2**30:10.3f} GiB"  # noqa: E731
  mesh = " x ".join(f"{k}={v}" for k, v in report["mesh"].items())
  lines = [f"mesh {mesh} ({math.prod(report['mesh'].values())} devices); per device:",
           f"  params            {gib(report['params_bytes'])}",
           f"  optimizer state   {gib(report['opt_state_bytes'])}",
           f"  batch             {gib(report['batch_bytes'])}",
           f"  activations/temps {gib(report['temp_bytes'])}",
           f"  peak (args+out-donated+temps) {gib(report['peak_bytes'])}"]
  if np.isfinite(report["flops"]):
    lines.append(f"  compiled FLOPs/step {report['flops']:.3e}")
  return "\n".join(lines)
