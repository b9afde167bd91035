"""The pretraining loop: data, mesh, exact resume, verified checkpoints, metrics, preemption.

    from experiments.configs import pretrain
    from baichuan_jax.train import trainer
    result = trainer.run(pretrain.get_config("tiny"), "/tmp/tiny")
    result.evals          # [{"step": 0, "val_loss": 8.3}, ..., {"step": 200, "val_loss": ...}]

What `run` does, in order:

1. Checks every config field (`validate_config`) and the mesh before anything compiles.
2. Data: `baichuan_jax.data.default_data` (corpus + tokenizer + tokenized dataset, built once)
   and a `Loader` per split; each process reads its own shard of every global batch.
3. Resumes from the newest checkpoint under `WORKDIR/checkpoints` that verifies (params,
   optimizer state, step, RNG, skip counters and the loader's position, so the run continues
   bit for bit); a checkpoint that fails its checksums is reported, moved to
   `checkpoints/rejected/` and the previous one is used.
4. Trains to `cfg.train.total_steps`: one jitted step (`train.make_train_step`); every step's
   metrics go to `WORKDIR/metrics.jsonl` and TensorBoard; the validation loss is measured every
   `cfg.eval_every` steps; checkpoints are written asynchronously every `save_every` steps.
5. A non-finite loss or gradient skips the update (inside the step). After `max_bad_steps` in a
   row the loop restores the last checkpoint's parameters and optimizer state and carries on
   with the data AFTER the bad batches (PaLM's remedy for loss spikes: replaying the same data
   would reproduce the divergence); after `max_rollbacks` rollbacks it stops with an error.
6. SIGTERM (preemption) finishes the current step, saves a checkpoint, waits for it to be
   committed and returns (`result.preempted`); the command line then exits with status 0.
7. At the end: a final checkpoint, `WORKDIR/loss_curve.png`, `WORKDIR/summary.json` and a
   greedy continuation of `cfg.sample_prompt`.

A `DataSource` can replace the default data (tests, other corpora): any object with
`train(process_index, process_count)` -> an iterator of loader-contract batches that has
`get_state()` / `set_state()`, `validation(process_index, process_count)` -> an iterable of
batches for one evaluation, and `tokenizer_path` (None: no sample).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import signal
import sys
import threading
import time
from typing import Any, Iterator, Optional, Protocol

import jax
import ml_collections
import numpy as np

from baichuan_jax import checkpoint as ckpt_lib
from baichuan_jax import configs, sharding
from baichuan_jax.train import config as train_config
from baichuan_jax.train import metrics as metrics_lib
from baichuan_jax.train import step as step_lib

log = logging.getLogger(__name__)

SUMMARY_FILE = "summary.json"
PLOT_FILE = "loss_curve.png"
XLA_PRESETS = ("cpu", "gpu", "tpu")


class DataSource(Protocol):
  """Where a run's batches come from (see the module docstring)."""
  tokenizer_path: Optional[str]

  def train(self, process_index: int, process_count: int) -> Iterator[dict]:
    ...

  def validation(self, process_index: int, process_count: int):
    ...


@dataclasses.dataclass
class RunResult:
  """What `run` returns."""
  state: Any  # the final TrainState (sharded on the mesh)
  history: list  # per-step metric dicts (the rows of WORKDIR/metrics.jsonl, earlier runs included)
  evals: list  # [{"step", "val_loss"}]
  tokenizer_path: Optional[str]
  workdir: str
  resumed_from: Optional[int] = None  # checkpoint step this run started from (None: fresh)
  preempted: bool = False  # stopped early by SIGTERM (a checkpoint of the last step was saved)
  rollbacks: int = 0  # restores of the last checkpoint after max_bad_steps non-finite steps
  rejected_checkpoints: list = dataclasses.field(default_factory=list)  # [(step, reason)]
  sample: Optional[str] = None  # greedy continuation of cfg.sample_prompt


# ----------------------------------------------------------------------------------------------
# Config checks.


def _fail(field: str, value: Any, allowed: str) -> None:
  raise ValueError(f"config {field}={value!r} is invalid: {allowed}")


def _int_field(cfg, field: str, low: int) -> None:
  v = cfg
  for part in field.split("."):
    v = v[part]
  if isinstance(v, bool) or not isinstance(v, int) or v < low:
    _fail(field, v, f"must be an integer >= {low}")


def validate_config(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Checks the run-level fields, the model and the train config (before any compile).

  Mesh divisibility is checked once the devices are known (`train.validate`).

  Raises:
    ValueError: naming the field, its value and what is allowed.
  """
  for name in ("model", "train", "data", "checkpoint"):
    if name not in cfg:
      raise ValueError(f"config has no `{name}` section; start from "
                       "experiments/configs/pretrain.py:get_config()")
  configs.validate(cfg.model)
  train_config.validate_train_config(cfg.train)
  for field, low in (("eval_every", 0), ("eval_batches", 1), ("log_every", 1),
                     ("checkpoint.save_every", 1), ("checkpoint.keep_last", 1),
                     ("checkpoint.keep_every", 0), ("max_rollbacks", 0), ("sample_tokens", 0),
                     ("num_devices", 0), ("dry_run_devices", 1), ("data.seed", 0),
                     ("data.read_threads", 0), ("data.vocab_size", 1)):
    _int_field(cfg, field, low)
  if cfg.data.vocab_size > cfg.model.vocab_size:
    _fail("data.vocab_size", cfg.data.vocab_size,
          f"the tokenizer vocabulary must not exceed model.vocab_size={cfg.model.vocab_size}")
  if cfg.train.seq_len > cfg.model.max_seq_len:
    _fail("train.seq_len", cfg.train.seq_len,
          f"must not exceed model.max_seq_len={cfg.model.max_seq_len}")
  if cfg.sample_tokens and cfg.sample_prompt and cfg.sample_tokens >= cfg.model.max_seq_len:
    _fail("sample_tokens", cfg.sample_tokens, f"must be < model.max_seq_len={cfg.model.max_seq_len}")
  if not isinstance(cfg.peak_flops, (int, float)) or cfg.peak_flops < 0:
    _fail("peak_flops", cfg.peak_flops, "must be a number >= 0 (0: measure)")
  if cfg.xla_flags not in XLA_PRESETS:
    _fail("xla_flags", cfg.xla_flags, f"allowed: {XLA_PRESETS}")
  return cfg


# ----------------------------------------------------------------------------------------------
# Data.


@dataclasses.dataclass
class DefaultData:
  """The built corpus through `baichuan_jax.data.Loader` (see `baichuan_jax.data`)."""
  dataset_path: str
  tokenizer_path: Optional[str]
  batch_size: int  # global
  seq_len: int
  seed: int
  eval_batches: int
  read_threads: int = 2

  def _rows(self, process_count: int) -> int:
    if self.batch_size % process_count:
      raise ValueError(f"train.batch_size={self.batch_size} is not divisible by the "
                       f"{process_count} processes (each loads batch_size/processes rows)")
    return self.batch_size // process_count

  def train(self, process_index: int, process_count: int):
    from baichuan_jax.data.loader import Loader  # pylint: disable=import-outside-toplevel
    return Loader(self.dataset_path, "train", batch_size=self._rows(process_count),
                  seq_len=self.seq_len, seed=self.seed, process_index=process_index,
                  process_count=process_count, read_threads=self.read_threads)

  def validation(self, process_index: int, process_count: int):
    from baichuan_jax.data.loader import Loader  # pylint: disable=import-outside-toplevel
    return Loader(self.dataset_path, "validation", batch_size=self._rows(process_count),
                  seq_len=self.seq_len, seed=self.seed, process_index=process_index,
                  process_count=process_count, num_batches=self.eval_batches,
                  read_threads=self.read_threads)


def default_data_source(cfg: ml_collections.ConfigDict, progress: bool = True) -> DefaultData:
  """Builds (once) the corpus, tokenizer and tokenized dataset for `cfg.data`."""
  from baichuan_jax.data import default_data  # pylint: disable=import-outside-toplevel
  paths = default_data(vocab_size=cfg.data.vocab_size, root=cfg.data.root,
                       corpus_dir=cfg.data.corpus_dir, clean=cfg.data.get("clean", True),
                       progress=progress and jax.process_index() == 0)
  return DefaultData(dataset_path=str(paths.dataset_path), tokenizer_path=str(paths.tokenizer_path),
                     batch_size=cfg.train.batch_size, seq_len=cfg.train.seq_len,
                     seed=cfg.data.seed, eval_batches=cfg.eval_batches,
                     read_threads=cfg.data.read_threads)


# ----------------------------------------------------------------------------------------------
# Preemption.


class _SigtermFlag:
  """Turns SIGTERM into a flag the loop checks between steps (main thread only)."""

  def __init__(self):
    self.set = False
    self._old = None

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      self._old = signal.signal(signal.SIGTERM, self._handle)
    return self

  def _handle(self, signum, frame):
    del signum, frame
    self.set = True

  def __exit__(self, *exc):
    if self._old is not None:
      signal.signal(signal.SIGTERM, self._old)

  def agreed(self) -> bool:
    """True if any process was signalled (every process then stops at the same step)."""
    if jax.process_count() == 1:
      return self.set
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    flags = multihost_utils.process_allgather(np.asarray([int(self.set)], np.int32))
    return bool(np.max(flags))


# ----------------------------------------------------------------------------------------------
# Pieces of the loop.


def _devices(cfg) -> list:
  devices = jax.devices()
  if cfg.num_devices:
    if cfg.num_devices > len(devices):
      _fail("num_devices", cfg.num_devices, f"only {len(devices)} devices are present")
    devices = devices[:cfg.num_devices]
  return devices


def evaluate(eval_step, params, batches) -> Optional[float]:
  """Token-weighted mean cross-entropy over `batches` (None if they hold no target token)."""
  total, weight = 0.0, 0.0
  for batch in batches:
    m = jax.device_get(eval_step(params, batch))
    w = float(m.get("weight", m.get("tokens", 1.0)))
    total += float(m["ce"] if "ce" in m else m["loss"]) * w
    weight += w
  return total / weight if weight > 0 else None


def _sample(cfg, params, tokenizer_path: Optional[str], mesh) -> Optional[str]:
  """Greedy continuation of `cfg.sample_prompt` (the prompt followed by the generated text)."""
  if not (cfg.sample_prompt and cfg.sample_tokens and tokenizer_path):
    return None
  from baichuan_jax.infer import generate  # pylint: disable=import-outside-toplevel
  from baichuan_jax.tokenizer import Tokenizer  # pylint: disable=import-outside-toplevel
  tok = Tokenizer(tokenizer_path)
  ids = tok.encode(cfg.sample_prompt, add_bos=True)
  n = min(cfg.sample_tokens, cfg.model.max_seq_len - len(ids))
  if jax.process_count() == 1:
    params, mesh = jax.device_get(params), None  # small enough to gather; plain placement
  out = generate(cfg.model, params, [ids], max_new_tokens=n, temperature=0.0,
                          decode=tok.decode, mesh=mesh)[0]
  return cfg.sample_prompt + tok.decode(list(out.tokens))


def _row(step: int, m: dict, *, dt: Optional[float], tokens_per_step: int, flops_per_token: float,
         peak: float, wall: float) -> dict:
  row = {"step": step}
  for k in ("loss", "ce", "z_loss", "grad_norm", "lr", "tokens", "skipped", "total_skipped",
            "consecutive_bad"):
    if k in m:
      v = float(m[k])
      row[k] = int(v) if k in ("tokens", "skipped", "total_skipped", "consecutive_bad") else v
  row["step_time"] = dt
  if dt:
    row["tokens_per_s"] = tokens_per_step / dt
    row["mfu"] = flops_per_token * row["tokens_per_s"] / peak if peak > 0 else None
  else:  # the first step after a (re)start includes compilation: no throughput
    row["tokens_per_s"] = row["mfu"] = None
  row["time"] = wall
  return row


def _fmt(row: dict) -> str:
  parts = [f"step {row['step']}", f"loss {row.get('loss', float('nan')):.4f}"]
  if row.get("val_loss") is not None:
    parts.append(f"val {row['val_loss']:.4f}")
  parts.append(f"gnorm {row.get('grad_norm', float('nan')):.3f}")
  parts.append(f"lr {row.get('lr', float('nan')):.2e}")
  if row.get("tokens_per_s"):
    parts.append(f"{row['tokens_per_s']:.0f} tok/s")
  if row.get("mfu") is not None:
    parts.append(f"MFU {100 * row['mfu']:.1f}%")
  if row.get("total_skipped"):
    parts.append(f"skipped {row['total_skipped']}")
  return " | ".join(parts)


# ----------------------------------------------------------------------------------------------
# The loop.


def run(cfg: ml_collections.ConfigDict, workdir: str, *, progress: bool = True,
        data: Optional[DataSource] = None,
        loss_fn: Optional[step_lib.LossFn] = None) -> RunResult:
  """Trains (or resumes training) `cfg` in `workdir`; see the module docstring.

  Args:
    cfg: `experiments/configs/pretrain.py:get_config(...)`.
    workdir: run folder (checkpoints, metrics.jsonl, tensorboard/, loss_curve.png, summary.json).
      Running again in the same folder resumes.
    progress: show a progress bar (when stderr is a terminal) or log lines every
      `cfg.log_every` steps.
    data: a `DataSource` (default: the built corpus, `default_data_source(cfg)`).
    loss_fn: `loss_fn(params, batch, rng) -> (loss, metrics)` for train and eval steps
      (default: the next-token LM loss; metrics `ce` or `loss` give the validation loss).
  Returns:
    RunResult.
  Raises:
    ValueError: bad config values (before compiling).
    RuntimeError: divergence that rollbacks did not cure, or nothing to roll back to.
  """
  validate_config(cfg)
  model_cfg, tc = cfg.model, cfg.train
  devices = _devices(cfg)
  mesh = sharding.make_mesh(tc.mesh, devices)
  step_lib.validate(model_cfg, tc, mesh)
  pi, pc = jax.process_index(), jax.process_count()
  lead = pi == 0
  workdir = os.path.abspath(os.path.expanduser(workdir))
  os.makedirs(workdir, exist_ok=True)
  if data is None:
    data = default_data_source(cfg, progress)
  if lead:  # a self-describing workdir: the model config and the tokenizer beside the checkpoints
    from baichuan_jax.infer import loading  # pylint: disable=import-outside-toplevel
    loading.describe_workdir(workdir, model_cfg, data.tokenizer_path)
  save_meta = {"preset": cfg.preset, "model_config": model_cfg.to_dict()}

  train_it = data.train(pi, pc)
  mgr = ckpt_lib.CheckpointManager(ckpt_lib.checkpoint_dir(workdir),
                                   save_every=cfg.checkpoint.save_every,
                                   keep_last=cfg.checkpoint.keep_last,
                                   keep_every=cfg.checkpoint.keep_every,
                                   async_save=cfg.checkpoint.async_save)
  target = step_lib.abstract_train_state(model_cfg, tc, mesh)
  restored = mgr.restore(target, quarantine=True)
  result = RunResult(state=None, history=[], evals=[], tokenizer_path=data.tokenizer_path,
                     workdir=workdir)
  mlog = metrics_lib.MetricsLog(workdir, tensorboard=cfg.tensorboard, enabled=lead)
  if restored is not None:
    state = restored.state
    if restored.data_state is not None:
      train_it.set_state(restored.data_state)
    result.resumed_from = restored.step
    result.rejected_checkpoints = restored.rejected
    for s, reason in restored.rejected:
      log.warning("checkpoint %d rejected: %s", s, reason)
    mlog.truncate(restored.step)
    log.info("resumed from checkpoint step %d in %s", restored.step, mgr.directory)
  else:
    state = step_lib.create_train_state(model_cfg, tc, mesh)
    mlog.truncate(0)
  step_fn = step_lib.make_train_step(model_cfg, tc, mesh, loss_fn=loss_fn)
  eval_step = step_lib.make_eval_step(model_cfg, tc, mesh, loss_fn=loss_fn)

  per_device_peak = cfg.peak_flops or metrics_lib.measure_peak_flops(
      devices[0], jax.numpy.dtype(model_cfg.dtype))
  peak = metrics_lib.total_peak_flops(per_device_peak, devices)
  fpt = configs.flops_per_token(model_cfg, tc.seq_len)["total"]
  tokens_per_step = tc.batch_size * tc.seq_len
  total = tc.total_steps
  step = int(jax.device_get(state.step))
  if lead:
    n = configs.param_counts(model_cfg)["total"]
    log.info("%s: %.2fM params, mesh %s, %d steps from %d, batch %d x %d, peak %.3g FLOP/s",
             cfg.preset or "run", n / 1e6, sharding.mesh_shape(mesh), total, step,
             tc.batch_size, tc.seq_len, peak)

  def do_eval(at: int) -> Optional[float]:
    val = evaluate(eval_step, state.params, data.validation(pi, pc))
    if val is not None:
      result.evals = [e for e in result.evals if e["step"] != at] + [{"step": at, "val_loss": val}]
    return val

  bar = None
  if progress and lead and sys.stderr.isatty():
    import tqdm  # pylint: disable=import-outside-toplevel
    bar = tqdm.tqdm(total=total, initial=step, desc="train", unit="step", dynamic_ncols=True)
  # Evaluations of earlier runs in this workdir, then (fresh start) the untrained model's loss.
  result.evals = [{"step": r["step"], "val_loss": r["val_loss"]} for r in mlog.rows
                  if r.get("val_loss") is not None]
  if cfg.eval_every and step == 0:
    # Row 0 holds only the untrained model's validation loss.
    mlog.write({"step": 0, "val_loss": do_eval(0), "time": time.time()})
    if lead and result.evals:
      log.info("step 0 | val %.4f (untrained)", result.evals[-1]["val_loss"])

  saved_step = restored.step if restored is not None else None
  sigterm = _SigtermFlag()
  t_start = time.time()
  first = True
  try:
    with sigterm:
      batch = next(train_it) if step < total else None
      data_state = train_it.get_state() if batch is not None else None
      while step < total:
        t0 = time.perf_counter()
        state, m = step_fn(state, batch)
        step += 1
        # Read the next batch on the host while the device runs this step.
        if step < total:
          next_batch = next(train_it)
          next_data_state = train_it.get_state()
        m = jax.device_get(m)
        dt = None if first else time.perf_counter() - t0
        first = False
        row = _row(step, m, dt=dt, tokens_per_step=tokens_per_step, flops_per_token=fpt,
                   peak=peak, wall=time.time())

        if m["consecutive_bad"] >= tc.max_bad_steps:
          mlog.write(row)
          state, step = _rollback(cfg, mgr, target, result, mlog, step)
          first = True
          if step < total:
            batch, data_state = next_batch, next_data_state
          continue

        if cfg.eval_every and (step % cfg.eval_every == 0 or step == total):
          row["val_loss"] = do_eval(step)
        mlog.write(row)
        if bar is not None:
          bar.update(1)
          bar.set_postfix_str(_fmt(row).split(" | ", 1)[1], refresh=False)
        elif progress and lead and (step % cfg.log_every == 0 or step == total or
                                    "val_loss" in row):
          log.info(_fmt(row))

        stop = sigterm.agreed()
        if mgr.should_save(step) or step == total or stop:
          mgr.save(step, state, data_state, extra_meta=save_meta)
          saved_step = step
        if stop:
          log.warning("SIGTERM: saved checkpoint %d; stopping", step)
          result.preempted = True
          break
        if step < total:
          batch, data_state = next_batch, next_data_state
      if saved_step != step and step > 0:
        mgr.save(step, state, data_state, extra_meta=save_meta)
      mgr.wait()
  finally:
    if bar is not None:
      bar.close()
    mgr.close()
    mlog.close()

  result.state = state
  result.history = list(mlog.rows)
  elapsed = time.time() - t_start
  if not result.preempted:
    if lead:
      metrics_lib.plot_loss_curve(result.history, os.path.join(workdir, PLOT_FILE),
                                  title=f"{cfg.preset or 'run'}: {model_cfg.num_layers} layers, "
                                  f"{tc.batch_size}x{tc.seq_len} tokens/step")
    result.sample = _sample(cfg, state.params, data.tokenizer_path, mesh)
  if lead:
    _write_summary(cfg, result, workdir, elapsed)
  return result


def _rollback(cfg, mgr, target, result: RunResult, mlog: metrics_lib.MetricsLog,
              step: int) -> tuple[Any, int]:
  """Restores the last good checkpoint's params and optimizer state (data keeps going)."""
  tc = cfg.train
  result.rollbacks += 1
  if result.rollbacks > cfg.max_rollbacks:
    raise RuntimeError(f"step {step}: {tc.max_bad_steps} consecutive non-finite steps again "
                       f"after {cfg.max_rollbacks} rollbacks (max_rollbacks); giving up. Lower "
                       "train.peak_lr or inspect the data near this step")
  mgr.wait()
  restored = mgr.restore(target, quarantine=True)
  if restored is None:
    raise RuntimeError(f"step {step}: {tc.max_bad_steps} consecutive non-finite steps and no "
                       f"checkpoint to roll back to in {mgr.directory}")
  log.warning("step %d: %d consecutive non-finite steps; rolled back to checkpoint %d "
              "(rollback %d of at most %d); the data continues after the bad batches", step,
              tc.max_bad_steps, restored.step, result.rollbacks, cfg.max_rollbacks)
  mlog.truncate(restored.step)
  result.evals = [e for e in result.evals if e["step"] <= restored.step]
  return restored.state, restored.step


def _write_summary(cfg, result: RunResult, workdir: str, elapsed: float) -> None:
  rows = [r for r in result.history if r.get("tokens_per_s")]
  summary = {
      "preset": cfg.preset,
      "final_step": int(jax.device_get(result.state.step)),
      "total_steps": cfg.train.total_steps,
      "preempted": result.preempted,
      "resumed_from": result.resumed_from,
      "rollbacks": result.rollbacks,
      "rejected_checkpoints": result.rejected_checkpoints,
      "skipped_steps": int(jax.device_get(result.state.skipped)),
      "evals": result.evals,
      "seconds_this_run": elapsed,
      "median_tokens_per_s": float(np.median([r["tokens_per_s"] for r in rows])) if rows else None,
      "median_mfu": (float(np.median([r["mfu"] for r in rows if r["mfu"] is not None]))
                     if rows and rows[0]["mfu"] is not None else None),
      "sample": result.sample,
      "tokenizer_path": result.tokenizer_path,
  }
  with open(os.path.join(workdir, SUMMARY_FILE), "w", encoding="utf-8") as f:
    json.dump(summary, f, ensure_ascii=False, indent=2, default=float)


# ----------------------------------------------------------------------------------------------
# Dry run and the command-line driver.


def dry_run(cfg: ml_collections.ConfigDict) -> dict:
  """Compiles the train step for `cfg.train.mesh` on `cfg.dry_run_devices` devices; no data.

  Run in a process whose backend was started with that many fake CPU devices (`main` arranges
  it). Pallas attention is replaced by XLA attention for the CPU compile, so the activation
  estimate is an upper bound for a flash-attention run.

  Returns:
    the `train.dry_run` report (bytes per device), plus `note`.
  """
  validate_config(cfg)
  model_cfg = cfg.model
  note = []
  if model_cfg.attention_impl == "pallas" and jax.devices()[0].platform == "cpu":
    model_cfg = ml_collections.ConfigDict(model_cfg.to_dict())
    model_cfg.attention_impl = "xla"
    note.append("attention compiled with the XLA reference on CPU (S x S scores held), so "
                "activations are an upper bound for the flash-attention kernel")
  mesh_cfg = dict(cfg.train.mesh.to_dict())
  if mesh_cfg.get("dcn_data", 1) > 1 and jax.process_count() == 1:
    mesh_cfg["dcn_data"] = 1
    note.append("dcn_data ignored (one process); memory per device is the same")
  devices = jax.devices()
  if len(devices) < cfg.dry_run_devices:
    raise ValueError(f"dry run needs {cfg.dry_run_devices} devices, the backend has "
                     f"{len(devices)}; start it with "
                     f"XLA_FLAGS=--xla_force_host_platform_device_count={cfg.dry_run_devices}")
  mesh = sharding.make_mesh(mesh_cfg, devices[:cfg.dry_run_devices])
  report = step_lib.dry_run(model_cfg, cfg.train, mesh)
  report["note"] = "; ".join(note)
  return report


def setup_runtime(cfg: ml_collections.ConfigDict) -> None:
  """Process start-up before any device is touched: XLA flags, fake devices for a dry run,
  the persistent compilation cache, multi-host initialisation."""
  if cfg.dry_run:
    flags = os.environ.get("XLA_FLAGS", "").split()
    flags = [f for f in flags if not f.startswith("--xla_force_host_platform_device_count")]
    os.environ["XLA_FLAGS"] = " ".join(
        flags + [f"--xla_force_host_platform_device_count={cfg.dry_run_devices}"])
    jax.config.update("jax_platforms", "cpu")
    return
  sharding.apply_xla_flags(cfg.xla_flags)
  if cfg.compilation_cache:
    path = os.path.expanduser(cfg.compilation_cache)
    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
  from baichuan_jax import distributed  # pylint: disable=import-outside-toplevel
  plan = distributed.initialize(cfg.distributed)
  log.info("%s", distributed.describe(plan))


def main(cfg: ml_collections.ConfigDict, workdir: str) -> int:
  """What `python -m experiments.train` does: set up, dry-run or train, print the outcome.

  Returns:
    the process exit status (0 also after a SIGTERM-triggered checkpoint).
  """
  validate_config(cfg)
  setup_runtime(cfg)
  if cfg.dry_run:
    report = dry_run(cfg)
    print(f"dry run of {cfg.preset}: {configs.param_counts(cfg.model)['total'] / 1e9:.2f}B params, "
          f"batch {cfg.train.batch_size} x {cfg.train.seq_len}, "
          f"{cfg.train.microbatches} micro-batches, ZeRO-{cfg.train.zero_stage}, "
          f"compiled in {report['compile_seconds']:.1f} s")
    print(step_lib.format_dry_run(report))
    if report["note"]:
      print(f"note: {report['note']}")
    return 0
  result = run(cfg, workdir)
  if jax.process_index() == 0:
    if result.preempted:
      print(f"preempted: checkpoint of step {int(jax.device_get(result.state.step))} saved in "
            f"{workdir}; run the same command to resume")
      return 0
    evals = result.evals
    if evals:
      print(f"validation loss: {evals[0]['val_loss']:.4f} (step {evals[0]['step']}) -> "
            f"{evals[-1]['val_loss']:.4f} (step {evals[-1]['step']})")
    if result.sample is not None:
      print(f"sample (greedy): {result.sample}")
    print(f"metrics: {os.path.join(result.workdir, metrics_lib.METRICS_FILE)}; "
          f"plot: {os.path.join(result.workdir, PLOT_FILE)}")
  return 0
