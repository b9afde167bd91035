"""SFT (full or LoRA) and reward-model trainers on the shared training step and the one loop.

Full SFT is the pretraining step itself (`train.make_train_step` with its default next-token loss):
the SFT data's loss mask already restricts the loss to assistant tokens. LoRA SFT and the reward
model train other parameter trees through `engine.TreeTrainer`, which wraps the same step; each
trainer here adds only its loss, its data and its hooks; `run_loop` runs them on
`train.loop.Loop` and logs to the one `train.metrics.MetricsLog`.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Iterator, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm

from baichuan_jax import train
from baichuan_jax.train import loop as train_loop
from baichuan_jax.train import metrics as metrics_lib
from baichuan_jax.align import engine, lora, preference, reward

_LOG = logging.getLogger(__name__)


def MetricsLog(path: Optional[str]) -> metrics_lib.MetricsLog:  # pylint: disable=invalid-name
  """The alignment stages' per-step JSONL log: `train.metrics.MetricsLog.at_path(path)`."""
  return metrics_lib.MetricsLog.at_path(path)


def place(tree: Any, shardings: Any) -> Any:
  """Puts a host/device tree onto the given shardings."""
  return jax.tree.map(jax.device_put, tree, shardings)


def run_loop(trainer: Any, batches: Iterator[dict], steps: int, log: metrics_lib.MetricsLog, desc: str,
             frozen: Optional[Any] = None, hooks=(), postfix: Optional[Callable] = None) -> None:
  """`steps` steps of an `engine.TreeTrainer` / `ModelTrainer` on `train.loop.Loop`.

  Hooks, in order: the metrics row, each `(fn, every)` of `hooks` (also run after the last step;
  they add to `info.row`), the log row and the progress bar. `trainer.state` is the final state.
  """
  loop = train_loop.Loop(trainer.step_fn(frozen), trainer.state, batches, steps)
  bar = tqdm.tqdm(total=steps, desc=desc, unit="step")
  postfix = postfix or (lambda r: {"loss": f"{r['loss']:.3f}"})
  loop.add_hook(lambda info: info.row.update({k: float(v) for k, v in info.metrics.items()}))
  for fn, every in hooks:
    loop.add_hook(fn, every=every, at_end=True)

  def write(info: train_loop.StepInfo) -> None:
    log.write(info.row)
    bar.update(1)
    bar.set_postfix(**postfix(log.rows[-1]))

  loop.add_hook(write)
  try:
    trainer.state = loop.run()
  finally:
    bar.close()


def train_sft(model_cfg: ml_collections.ConfigDict, params: Any, batches: Iterator[dict],
              train_cfg: ml_collections.ConfigDict, mesh, steps: int,
              lora_cfg: Optional[lora.LoRAConfig] = None, log_path: Optional[str] = None,
              seed: int = 0) -> tuple[Any, list[dict]]:
  """Supervised fine-tuning on packed chat batches (`sft_data.batches`).

  Args:
    model_cfg: model config.
    params: starting (pretrained) parameters.
    batches: iterator of loader-contract dicts with the assistant-only `loss_mask`.
    train_cfg: engine train config (batch_size, seq_len, peak_lr, schedule, grad_clip ...).
    mesh: device mesh.
    steps: optimizer steps.
    lora_cfg: train LoRA adapters only (base frozen) when given; otherwise all weights.
    log_path: JSONL of per-step metrics.
  Returns:
    (fine-tuned parameters, LoRA merged in; per-step metrics).
  """
  log = MetricsLog(log_path)
  lm_loss = train.lm_loss_fn(model_cfg, train_cfg)
  if lora_cfg is None:
    trainer = engine.ModelTrainer(params, model_cfg, train_cfg, mesh, lm_loss, seed=seed)
  else:
    adapters = lora.init_lora(params, lora_cfg, jax.random.PRNGKey(seed))

    def loss_fn(ad, batch, rng, base):
      return lm_loss(lora.apply_lora(base, ad, lora_cfg, rng), batch, rng)

    trainer = engine.TreeTrainer(adapters, engine.replicated_axes(adapters), train_cfg, mesh,
                                 loss_fn, seed=seed)
    _LOG.info("LoRA: %d trainable adapter values (base frozen)", lora.num_adapter_params(adapters))
  run_loop(trainer, batches, steps, log, "sft", frozen=None if lora_cfg is None else params)
  if lora_cfg is None:
    return jax.device_get(trainer.params), log.rows
  return lora.merge_lora(params, jax.device_get(trainer.params), lora_cfg), log.rows


def rm_loss_fn(model_cfg: ml_collections.ConfigDict):
  """Pairwise loss on a batch {chosen, chosen_mask, rejected, rejected_mask} ([batch, seq] each);
  chosen and rejected go through the model as one [2 * batch, seq] forward pass."""

  def loss_fn(params, batch, rng, frozen):
    del rng, frozen
    tokens = jnp.concatenate([batch["chosen"], batch["rejected"]], axis=0)
    mask = jnp.concatenate([batch["chosen_mask"], batch["rejected_mask"]], axis=0)
    r = reward.sequence_rewards(model_cfg, params, tokens, mask)
    n = batch["chosen"].shape[0]
    out = reward.pairwise_loss(r[:n], r[n:])
    out["weight"] = jnp.asarray(n, jnp.float32)
    return out["loss"], out

  return loss_fn


def evaluate_reward_model(model_cfg, params, pairs: dict, batch_size: int,
                          score_fn: Optional[Callable] = None) -> dict:
  """Pairwise accuracy / loss / margin over every held-out pair (no pair left out).

  Args:
    pairs: `preference.encode_pairs` output.
  Returns:
    dict: accuracy, loss, margin, pairs (count).
  """
  score_fn = score_fn or jax.jit(lambda p, t, m: reward.sequence_rewards(model_cfg, p, t, m))
  n = pairs["chosen"].shape[0]
  rc, rr = [], []
  for i in range(0, n, batch_size):
    sl = slice(i, min(i + batch_size, n))
    pad = batch_size - (sl.stop - sl.start)  # static shapes: pad the last batch, drop the padding
    get = lambda k: np.pad(pairs[k][sl], ((0, pad), (0, 0)), constant_values=1 if "mask" in k else 0)  # noqa: E731
    rc.append(np.asarray(score_fn(params, get("chosen"), get("chosen_mask")))[:batch_size - pad])
    rr.append(np.asarray(score_fn(params, get("rejected"), get("rejected_mask")))[:batch_size - pad])
  out = reward.pairwise_loss(jnp.asarray(np.concatenate(rc)), jnp.asarray(np.concatenate(rr)))
  return {**{k: float(v) for k, v in out.items()}, "pairs": n}


def train_reward_model(model_cfg: ml_collections.ConfigDict, backbone: Optional[Any],
                       train_pairs: dict, categories: list, train_cfg: ml_collections.ConfigDict,
                       mesh, steps: int, eval_pairs: Optional[dict] = None, eval_every: int = 0,
                       log_path: Optional[str] = None, seed: int = 0) -> tuple[Any, list[dict]]:
  """Trains a reward model with the pairwise loss, drawing pairs balanced over their categories.

  Args:
    backbone: pretrained LM parameters to start from (None: random init).
    train_pairs: `preference.encode_pairs` arrays, [N, seq] each.
    categories: category path per pair (for `CategoryBalancedSampler`).
    train_cfg: engine train config (batch_size = pairs per step).
    eval_pairs: held-out pairs evaluated every `eval_every` steps and at the end.
  Returns:
    (reward-model params, per-step metrics incl. eval rows).
  """
  log = MetricsLog(log_path)
  params = reward.init_reward_params(model_cfg, jax.random.PRNGKey(seed), backbone)
  trainer = engine.TreeTrainer(params, engine.value_model_axes(model_cfg), train_cfg, mesh,
                               rm_loss_fn(model_cfg), seed=seed)
  sampler = preference.CategoryBalancedSampler(categories, seed=seed)
  score = jax.jit(lambda p, t, m: reward.sequence_rewards(model_cfg, p, t, m))
  pair_batches = ({k: v[sampler.sample(train_cfg.batch_size)] for k, v in train_pairs.items()}
                  for _ in range(steps))

  def evaluate(info: train_loop.StepInfo) -> None:
    ev = evaluate_reward_model(model_cfg, info.state.params, eval_pairs, train_cfg.batch_size, score)
    info.row.update({f"eval_{k}": v for k, v in ev.items()})

  hooks = [] if eval_pairs is None else [(evaluate, eval_every)]
  run_loop(trainer, pair_batches, steps, log, "reward model", hooks=hooks,
           postfix=lambda r: {"loss": f"{r['loss']:.3f}", "acc": f"{r['accuracy']:.2f}"})
  return jax.device_get(trainer.params), log.rows
