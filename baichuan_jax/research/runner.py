"""A short, measured training run for experiments: the shared train step on the packed loader.

Experiments need more than a loss at the end: the validation curve against tokens and FLOPs,
the training throughput with compilation and evaluation excluded, and the final parameters to
probe. `train_lm` builds the engine pieces (`baichuan_jax.train`: sharded state, the one jitted
train step, the eval step) over `baichuan_jax.data.loader.Loader` and returns all of that.
Validation always uses the same fixed batches (read once), so curves of different runs are
comparable point by point.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Optional

import jax
import ml_collections
import numpy as np

from baichuan_jax import configs, sharding
from baichuan_jax import train as engine
from baichuan_jax.train import loop as loop_lib


RunResult = loop_lib.RunResult  # the one result type (params, history, evals, timings)


def validation_batches(dataset_path, batch_size: int, seq_len: int, num_batches: int) -> list:
  """The first `num_batches` packed validation batches (documents in file order, no shuffle)."""
  from baichuan_jax.data.loader import Loader  # pylint: disable=import-outside-toplevel
  batches = list(Loader(dataset_path, "validation", batch_size=batch_size, seq_len=seq_len,
                        num_batches=num_batches, process_index=0, process_count=1))
  if not batches:
    raise ValueError(f"{dataset_path} has no validation documents")
  return batches


def evaluate(eval_step, params, batches: list) -> float:
  """Token-weighted mean validation cross-entropy over `batches` (`train.loop.weighted_mean`)."""
  mean, _ = loop_lib.weighted_mean(eval_step, params, batches)
  return 0.0 if mean is None else mean


def train_lm(model_cfg: ml_collections.ConfigDict, train_cfg: ml_collections.ConfigDict,
             dataset_path, *, data_seed: int = 0, eval_every: int = 50, eval_batches: int = 4,
             val_batches: Optional[list] = None, log_every: int = 10,
             progress: Optional[Callable[[dict], None]] = None, train_batches=None,
             mesh=None) -> RunResult:
  """Trains `model_cfg` for `train_cfg.total_steps` steps and measures it.

  Args:
    model_cfg: model config.
    train_cfg: engine train config (batch_size, seq_len, total_steps, schedule, seed, mesh).
    dataset_path: prepared tokenized dataset (`default_data().dataset_path`).
    data_seed: shuffle seed of the training loader (equal seeds give the same data order).
    eval_every: evaluate every this many steps (and always after the last step).
    eval_batches: validation batches per evaluation (ignored with `val_batches`).
    val_batches: precomputed validation batches (share them across runs of one experiment).
    log_every: record training metrics every this many steps.
    progress: called with each history/eval record (e.g. to update a progress bar).
    train_batches: an iterator of batches to use instead of the loader (tests).
    mesh: device mesh (default `sharding.make_mesh(train_cfg.mesh)` over every device).
  Returns:
    `RunResult`.
  """
  t_start = time.perf_counter()
  mesh = sharding.make_mesh(train_cfg.mesh) if mesh is None else mesh
  seq, bs = train_cfg.seq_len, train_cfg.batch_size
  fpt = float(configs.flops_per_token(model_cfg, seq)["total"])
  if train_batches is None:
    from baichuan_jax.data.loader import Loader  # pylint: disable=import-outside-toplevel
    train_batches = Loader(dataset_path, "train", batch_size=bs, seq_len=seq, seed=data_seed,
                           process_index=0, process_count=1)
  if val_batches is None:
    val_batches = validation_batches(dataset_path, bs, seq, eval_batches)
  state = engine.create_train_state(model_cfg, train_cfg, mesh)
  step_fn = engine.make_train_step(model_cfg, train_cfg, mesh)
  eval_fn = engine.make_eval_step(model_cfg, train_cfg, mesh)

  history, evals = [], []
  clock = {"train": 0.0, "timed_tokens": 0, "compile": 0.0, "start": time.perf_counter()}
  loop = loop_lib.Loop(step_fn, state, train_batches, train_cfg.total_steps)

  def record(rec: dict, into: list) -> None:
    into.append(rec)
    if progress:
      progress(rec)

  def measure(info: loop_lib.StepInfo) -> None:
    # Every position of the row is computed whether or not it holds a real target, so the
    # throughput and FLOPs count all batch * seq positions.
    info.row.update(tokens=info.step * bs * seq, flops=info.step * bs * seq * fpt)
    if info.step_time is None:  # the first step: compilation + one step
      clock["compile"] = time.perf_counter() - clock["start"]
    else:
      clock["train"] += info.step_time
      clock["timed_tokens"] += bs * seq
    if not np.isfinite(info.metrics["loss"]):
      raise FloatingPointError(f"non-finite training loss at step {info.step}: "
                               f"{info.metrics['loss']}")
    if info.step % log_every == 0 or info.step == 1 or info.step == train_cfg.total_steps:
      record({**info.row, **{k: float(info.metrics[k]) for k in ("loss", "ce", "lr", "grad_norm")}},
             history)

  loop.add_hook(measure)
  loop.add_hook(lambda info: record(
      {**info.row, "val_loss": evaluate(eval_fn, info.state.params, val_batches)}, evals),
                every=eval_every, at_end=True)
  state = loop.run()
  train_time = clock["train"]
  return RunResult(params=jax.device_get(state.params), history=history, evals=evals,
                   flops_per_token=fpt,
                   train_tokens_per_s=clock["timed_tokens"] / train_time if train_time else float("nan"),
                   compile_s=clock["compile"], wall_s=time.perf_counter() - t_start)


def decode_tokens_per_s(model_cfg: ml_collections.ConfigDict, params, prompt: list, *,
                        new_tokens: int = 128, batch: int = 1, repeats: int = 2) -> float:
  """Greedy KV-cache decode throughput of `baichuan_jax.infer.generate` (new tokens / s).

  The first call compiles; the best of `repeats` timed calls after it is returned. No stop token
  is set, so every row generates exactly `new_tokens`.
  """
  from baichuan_jax.infer.generate import generate  # pylint: disable=import-outside-toplevel
  prompts = [list(prompt)] * batch
  run = lambda: generate(model_cfg, params, prompts, max_new_tokens=new_tokens,
                         stop_token_ids=[])
  out = run()
  if any(len(c.tokens) != new_tokens for c in out):
    raise RuntimeError("decode benchmark generated fewer tokens than asked")
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    run()
    best = min(best, time.perf_counter() - t0)
  return batch * new_tokens / best


def resolve_data(data_cfg: ml_collections.ConfigDict) -> tuple[str, str]:
  """(dataset_path, tokenizer_path) from an experiment's `data` config.

  Explicit paths are checked and used; empty ones fall back to `baichuan_jax.data.default_data`,
  which builds the default corpus, tokenizer and tokenized dataset on first use.
  """
  from pathlib import Path  # pylint: disable=import-outside-toplevel
  if data_cfg.dataset_path:
    if not (Path(data_cfg.dataset_path) / "dataset_info.json").exists():
      raise FileNotFoundError(f"data.dataset_path={data_cfg.dataset_path!r} is not a prepared "
                              "tokenized dataset (no dataset_info.json)")
    if not data_cfg.tokenizer_path or not Path(data_cfg.tokenizer_path).exists():
      raise FileNotFoundError(f"data.tokenizer_path={data_cfg.tokenizer_path!r} does not exist; "
                              "give the tokenizer the dataset was built with")
    return str(data_cfg.dataset_path), str(data_cfg.tokenizer_path)
  from baichuan_jax.data import default_data  # pylint: disable=import-outside-toplevel
  d = default_data(vocab_size=data_cfg.vocab_size, clean=data_cfg.get("clean", True))
  return str(d.dataset_path), str(d.tokenizer_path)


def enable_compilation_cache(path) -> None:
  """Turns on JAX's persistent compilation cache in `path`.

  Runs of a sweep that differ only in values (seeds) compile to the same programs; on a small CPU
  compiling a train step costs about as much as a hundred steps, so reuse matters.
  """
  jax.config.update("jax_compilation_cache_dir", str(path))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
