"""Training engine: config, AdamW + schedule, split output-layer loss, sharded state and the step.

Typical use (what `experiments/train.py` does)::

    from baichuan_jax import configs, sharding
    from baichuan_jax import train

    model_cfg = configs.get("tiny")
    train_cfg = train.default_train_config()          # ml_collections.ConfigDict
    train_cfg.mesh.data, train_cfg.mesh.model = -1, 1
    mesh = sharding.make_mesh(train_cfg.mesh)          # Mesh(('data', 'fsdp', 'model'))
    state = train.create_train_state(model_cfg, train_cfg, mesh)      # sharded at birth
    step = train.make_train_step(model_cfg, train_cfg, mesh)          # one jit
    eval_step = train.make_eval_step(model_cfg, train_cfg, mesh)
    for batch in loader:                               # numpy dict, [batch_size, seq_len] int32
      state, metrics = step(state, batch)              # donates `state`; keep only the new one
      if int(metrics["consecutive_bad"]) >= train_cfg.max_bad_steps:
        ...                                            # roll back to the last checkpoint

API:

* `default_train_config()` / `validate_train_config(cfg)` - the train ConfigDict.
* `TrainState(step, params, opt_state, rng, skipped, consecutive_bad)` - flax struct dataclass;
  `params` fp32 master weights, `opt_state` optax state with fp32 moments.
* `create_train_state(model_cfg, train_cfg, mesh, rng=None) -> TrainState`.
* `state_shardings(model_cfg, train_cfg, mesh) -> TrainState` of NamedShardings, and
  `abstract_train_state(...)` - ShapeDtypeStructs with shardings (orbax restore targets).
* `make_train_step(model_cfg, train_cfg, mesh, loss_fn=None, donate=True)` ->
  `step(state, batch) -> (state, metrics)`; metrics are fp32 scalars: loss, ce, z_loss,
  grad_norm, lr, skipped, tokens, consecutive_bad, total_skipped. `step.lower(state, batch)`.
* `step.build_step(loss_fn, axes, params_like, train_cfg, mesh, frozen=False)` - the one jit
  builder behind `make_train_step`, for any trainable tree with logical axes (LoRA adapters,
  reward model, critic); `step.build_eval_step(...)`; `step.create_tree_state(params, axes,
  train_cfg, mesh, rng)` and `step.tree_state_shardings(axes, params_like, train_cfg, mesh)`.
* `loop.Loop(step_fn, state, batches, total_steps)` with `add_hook(fn, every=n)` - the one
  training loop; `loop.weighted_mean` the one evaluator; `loop.RunResult` the one result type.
* `make_eval_step(model_cfg, train_cfg, mesh, loss_fn=None)` -> `eval_step(params, batch)`;
  average batches weighting by `metrics["weight"]` (tokens).
* `lm_loss_fn(model_cfg, train_cfg, vocab_shards=1)` - the default loss; any
  `loss_fn(params, batch, rng) -> (loss, metrics)` can replace it (SFT, RM, PPO). A `weight`
  entry in `metrics` weights micro-batch averaging (token-mean losses then accumulate exactly).
* `dry_run(model_cfg, train_cfg, mesh) -> dict` and `format_dry_run(report) -> str` - AOT
  compile on abstract inputs, per-device bytes of params / optimizer state / temporaries.
* `make_optimizer(train_cfg)`, `lr_schedule(train_cfg)`, `decay_mask(params)`.
* `chunked_lm_loss(hidden, kernel, targets, mask, norm_head=..., ...)` - the split loss.
* `validate(model_cfg, train_cfg, mesh)` - every check that runs before compiling.
"""

from baichuan_jax.train.chunked_loss import chunked_lm_loss
from baichuan_jax.train.config import default_train_config, validate_train_config
from baichuan_jax.train.optim import decay_mask, lr_schedule, make_optimizer
from baichuan_jax.train.step import (BATCH_KEYS, TrainState, abstract_batch, abstract_train_state,
                                     create_train_state, dry_run, format_dry_run, lm_loss_fn,
                                     make_eval_step, make_train_step, state_shardings, validate)

__all__ = [
    "BATCH_KEYS", "TrainState", "abstract_batch", "abstract_train_state", "chunked_lm_loss",
    "create_train_state", "decay_mask", "default_train_config", "dry_run", "format_dry_run",
    "lm_loss_fn", "lr_schedule", "make_eval_step", "make_optimizer", "make_train_step",
    "state_shardings", "validate", "validate_train_config",
]
