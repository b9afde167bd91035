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
5. A non-finite loss, gradient or update skips the update (inside the step). After
   `max_bad_steps` in a row the loop restores the last checkpoint's parameters and optimizer
   state and carries on with the data AFTER the bad batches (PaLM's remedy for loss spikes:
   replaying the same data would reproduce the divergence); after `max_rollbacks` rollbacks in a
   row (the count restarts after `rollback_reset_steps` healthy steps) it stops with an error.
   Non-finite parameters are never saved: the run stops instead, keeping the last good
   checkpoint.
   Each save is checked as soon as it completes: a failed one (full disk, write error) is
   reported in one line (step, path, OS cause) and retried with back-off on the current state;
   after `checkpoint.save_retries` failures the run stops (`TrainingStopped`) naming the last
   good checkpoint. `WORKDIR/.lock` (`baichuan_jax.workdir_lock`) keeps a second run out.
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
from baichuan_jax import configs, sharding, workdir_lock
from baichuan_jax.train import config as train_config
from baichuan_jax.train import loop as loop_lib
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


RunResult = loop_lib.RunResult  # the one result type: state, history, evals, resume/rollbacks


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
                     ("checkpoint.keep_every", 0), ("checkpoint.save_retries", 0),
                     ("max_rollbacks", 0), ("rollback_reset_steps", 1), ("sample_tokens", 0),
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
  if (isinstance(cfg.peak_flops, bool) or not isinstance(cfg.peak_flops, (int, float))
      or not math.isfinite(cfg.peak_flops) or cfg.peak_flops < 0):
    _fail("peak_flops", cfg.peak_flops, "must be a number >= 0 (0: measure)")
  for field in ("checkpoint.retry_backoff_s", "checkpoint.free_space_margin"):
    v = cfg.checkpoint[field.split(".")[1]]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
      _fail(field, v, "must be a finite number >= 0")
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
  """Token-weighted mean cross-entropy over `batches` (None if they hold no target token);
  `train.loop.weighted_mean`."""
  return loop_lib.weighted_mean(eval_step, params, batches)[0]


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


class TrainingStopped(RuntimeError):
  """The run stopped on a fault it cannot fix itself; the message names the step that is safe."""


@dataclasses.dataclass
class _Loop:
  """What the loop's helpers share (one run)."""
  cfg: Any
  workdir: str
  mesh: Any
  data: Any
  mgr: Any
  saver: "_Saver"
  target: Any
  result: RunResult
  mlog: Any
  state: Any = None
  step: int = 0
  train_it: Any = None
  step_fn: Any = None
  eval_step: Any = None
  peak: float = 0.0
  fpt: float = 0.0
  lead: bool = True
  bar: Any = None
  progress: bool = True
  rollbacks_in_row: int = 0  # rollbacks since the last healthy stretch (max_rollbacks caps it)
  healthy: int = 0  # applied (not skipped) steps in a row
  saved_step: Optional[int] = None  # the newest step a save was started for
  save_meta: dict = dataclasses.field(default_factory=dict)


class _Saver:
  """Checkpoint saves that fail loudly: each save is checked as soon as it completes
  (`poll` after every step), a failure is retried with exponential back-off on the CURRENT
  state (the previous checkpoint stays untouched), and after `checkpoint.save_retries` failures
  in a row the run stops with `TrainingStopped` naming the last good checkpoint."""

  def __init__(self, cfg, mgr):
    self.mgr, self.retries = mgr, cfg.checkpoint.save_retries
    self.backoff = cfg.checkpoint.retry_backoff_s
    self.good = mgr.latest_step()  # newest committed step
    self.failures = 0  # failed saves in a row

  def safe(self) -> str:
    if self.good is None:
      return "no checkpoint was committed; a restart begins from scratch"
    return (f"the last good checkpoint is step {self.good} in {self.mgr.directory}; run the "
            "same command to resume from it")

  def save(self, step: int, state, data_state, meta: dict) -> None:
    try:
      self.mgr.save(step, state, data_state, extra_meta=meta)
    except ckpt_lib.NonFiniteError as e:
      raise TrainingStopped(f"{e}. Stopping; {self.safe()}") from None
    except ckpt_lib.CheckpointSaveError as e:
      self._retry(e, step, state, data_state, meta)

  def poll(self, step: int, state, data_state, meta: dict, block: bool = False) -> None:
    """Checks the save in flight (waits for it with `block`); retries a failed one now."""
    try:
      done = self.mgr.wait() if block else self.mgr.poll()
    except ckpt_lib.CheckpointSaveError as e:
      self._retry(e, step, state, data_state, meta)
      return
    if done is not None:
      self.good, self.failures = done, 0

  def _retry(self, err, step: int, state, data_state, meta: dict) -> None:
    while True:
      self.failures += 1
      if self.failures > self.retries:
        raise TrainingStopped(f"{err}. {self.retries} retries failed: stopping; {self.safe()}")
      delay = self.backoff * 2 ** (self.failures - 1)
      log.error("%s; retrying with step %d in %.1f s (attempt %d of %d)", err, step, delay,
                self.failures, self.retries)
      time.sleep(delay)
      try:
        self.mgr.save(step, state, data_state, extra_meta=meta)
        self.good, self.failures = self.mgr.wait(), 0
        log.warning("checkpoint step %d saved on retry", step)
        return
      except ckpt_lib.NonFiniteError as e:
        raise TrainingStopped(f"{e}. Stopping; {self.safe()}") from None
      except ckpt_lib.CheckpointSaveError as e:
        err = e


def _lock(workdir: str, lead: bool):
  """Takes the workdir lock on process 0; every process stops if it is held elsewhere."""
  lock, err = None, None
  if lead:
    try:
      lock = workdir_lock.acquire(workdir, "train")
    except workdir_lock.WorkdirLocked as e:
      err = e
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    failed = multihost_utils.process_allgather(np.asarray([int(err is not None)], np.int32))
    if np.max(failed) and err is None:
      raise workdir_lock.WorkdirLocked(f"{workdir}: process 0 could not take the workdir lock")
  if err is not None:
    raise err
  return lock


def run(cfg: ml_collections.ConfigDict, workdir: str, *, progress: bool = True,
        data: Optional[DataSource] = None,
        loss_fn: Optional[step_lib.LossFn] = None) -> RunResult:
  """Trains (or resumes training) `cfg` in `workdir`; see the module docstring.

  Args:
    cfg: `experiments/configs/pretrain.py:get_config(...)`.
    workdir: run folder (checkpoints, metrics.jsonl, tensorboard/, loss_curve.png, summary.json).
      Running again in the same folder resumes. One run at a time: `WORKDIR/.lock`.
    progress: show a progress bar (when stderr is a terminal) or log lines every
      `cfg.log_every` steps.
    data: a `DataSource` (default: the built corpus, `default_data_source(cfg)`).
    loss_fn: `loss_fn(params, batch, rng) -> (loss, metrics)` for train and eval steps
      (default: the next-token LM loss; metrics `ce` or `loss` give the validation loss).
  Returns:
    RunResult.
  Raises:
    ValueError: bad config values (before compiling).
    workdir_lock.WorkdirLocked: another live run writes this workdir (nothing was touched).
    TrainingStopped: divergence that rollbacks did not cure, nothing to roll back to, saves
      that kept failing, or non-finite parameters at a save (the message names the safe step).
  """
  validate_config(cfg)
  mesh = sharding.make_mesh(cfg.train.mesh, _devices(cfg))
  step_lib.validate(cfg.model, cfg.train, mesh)
  lead = jax.process_index() == 0
  workdir = os.path.abspath(os.path.expanduser(workdir))
  lock = _lock(workdir, lead)
  try:
    if data is None:
      data = default_data_source(cfg, progress)
    if lead:  # a self-describing workdir: the model config and the tokenizer beside the checkpoints
      from baichuan_jax.infer import loading  # pylint: disable=import-outside-toplevel
      loading.describe_workdir(workdir, cfg.model, data.tokenizer_path)
    lp = _start(cfg, workdir, mesh, data, loss_fn, progress, lead)
    t_start = time.time()
    try:
      _train(lp)
    finally:
      if lp.bar is not None:
        lp.bar.close()
      lp.mgr.close()
      lp.mlog.close()
    return _finish(lp, time.time() - t_start)
  finally:
    if lock is not None:
      workdir_lock.release(lock)


def _start(cfg, workdir: str, mesh, data, loss_fn, progress: bool, lead: bool) -> _Loop:
  """Checkpoint manager, resume (or fresh state), compiled steps, the step-0 evaluation."""
  model_cfg, tc = cfg.model, cfg.train
  pi, pc = jax.process_index(), jax.process_count()
  mgr = ckpt_lib.CheckpointManager(ckpt_lib.checkpoint_dir(workdir),
                                   save_every=cfg.checkpoint.save_every,
                                   keep_last=cfg.checkpoint.keep_last,
                                   keep_every=cfg.checkpoint.keep_every,
                                   async_save=cfg.checkpoint.async_save,
                                   error_log=os.path.join(workdir, ckpt_lib.ERROR_LOG),
                                   free_space_margin=cfg.checkpoint.free_space_margin)
  lp = _Loop(cfg=cfg, workdir=workdir, mesh=mesh, data=data, mgr=mgr, saver=_Saver(cfg, mgr),
             target=step_lib.abstract_train_state(model_cfg, tc, mesh),
             result=RunResult(state=None, history=[], evals=[],
                              tokenizer_path=data.tokenizer_path, workdir=workdir),
             mlog=metrics_lib.MetricsLog(workdir, tensorboard=cfg.tensorboard, enabled=lead),
             lead=lead, progress=progress,
             save_meta={"preset": cfg.preset, "model_config": model_cfg.to_dict()})
  lp.train_it = data.train(pi, pc)
  restored = mgr.restore(lp.target, quarantine=True)
  if restored is not None:
    lp.state = restored.state
    if restored.data_state is not None:
      lp.train_it.set_state(restored.data_state)
    lp.result.resumed_from = restored.step
    lp.result.rejected_checkpoints = restored.rejected
    for s, reason in restored.rejected:
      log.warning("checkpoint %d rejected: %s", s, reason)
    lp.mlog.truncate(restored.step)
    log.info("resumed from checkpoint step %d in %s", restored.step, mgr.directory)
  else:
    lp.state = step_lib.create_train_state(model_cfg, tc, mesh)
    lp.mlog.truncate(0)
  lp.saver.good = mgr.latest_step()
  lp.step_fn = step_lib.make_train_step(model_cfg, tc, mesh, loss_fn=loss_fn)
  lp.eval_step = step_lib.make_eval_step(model_cfg, tc, mesh, loss_fn=loss_fn)
  devices = list(mesh.devices.flat)
  per_device_peak = cfg.peak_flops or metrics_lib.measure_peak_flops(
      devices[0], jax.numpy.dtype(model_cfg.dtype))
  lp.peak = metrics_lib.total_peak_flops(per_device_peak, devices)
  lp.fpt = configs.flops_per_token(model_cfg, tc.seq_len)["total"]
  lp.step = int(jax.device_get(lp.state.step))
  if lead:
    log.info("%s: %.2fM params, mesh %s, %d steps from %d, batch %d x %d, peak %.3g FLOP/s",
             cfg.preset or "run", configs.param_counts(model_cfg)["total"] / 1e6,
             sharding.mesh_shape(mesh), tc.total_steps, lp.step, tc.batch_size, tc.seq_len,
             lp.peak)
  if progress and lead and sys.stderr.isatty():
    import tqdm  # pylint: disable=import-outside-toplevel
    lp.bar = tqdm.tqdm(total=tc.total_steps, initial=lp.step, desc="train", unit="step",
                       dynamic_ncols=True)
  # Evaluations of earlier runs in this workdir, then (fresh start) the untrained model's loss.
  lp.result.evals = [{"step": r["step"], "val_loss": r["val_loss"]} for r in lp.mlog.rows
                     if r.get("val_loss") is not None]
  if cfg.eval_every and lp.step == 0:
    # Row 0 holds only the untrained model's validation loss.
    lp.mlog.write({"step": 0, "val_loss": _eval(lp, 0), "time": time.time()})
    if lead and lp.result.evals:
      log.info("step 0 | val %.4f (untrained)", lp.result.evals[-1]["val_loss"])
  return lp


def _eval(lp: _Loop, at: int) -> Optional[float]:
  val = evaluate(lp.eval_step, lp.state.params,
                 lp.data.validation(jax.process_index(), jax.process_count()))
  if val is not None:
    lp.result.evals = [e for e in lp.result.evals if e["step"] != at] + [
        {"step": at, "val_loss": val}]
  return val


def _train(lp: _Loop) -> None:
  """The loop (`train.loop.Loop`) with its hooks, in order: the metrics row, NaN rollback,
  the healthy-step count, evaluation, logging/progress, checked checkpoints and SIGTERM."""
  cfg, total = lp.cfg, lp.cfg.train.total_steps
  lp.saved_step = lp.saver.good
  sigterm = _SigtermFlag()
  loop = loop_lib.Loop(lp.step_fn, lp.state, lp.train_it, total, step=lp.step)
  loop.add_hook(lambda info: _row_hook(lp, info))
  loop.add_hook(lambda info: _rollback_hook(lp, loop, info))
  loop.add_hook(lambda info: _count_healthy(lp, info.metrics))
  if cfg.eval_every:
    loop.add_hook(lambda info: info.row.update(val_loss=_eval(lp, info.step)),
                  every=cfg.eval_every, at_end=True)
  loop.add_hook(lambda info: _log_row(lp, info.row))
  loop.add_hook(lambda info: _checkpoint_hook(lp, loop, info, sigterm))
  with sigterm:
    try:
      loop.run()
    finally:
      lp.state, lp.step = loop.state, loop.step
    if lp.result.preempted:
      return
    if lp.saved_step != lp.step and lp.step > 0:
      lp.saver.save(lp.step, lp.state, loop.data_state, lp.save_meta)
    lp.saver.poll(lp.step, lp.state, loop.data_state, lp.save_meta, block=True)


def _row_hook(lp: _Loop, info: loop_lib.StepInfo) -> None:
  """The first hook: the run follows the loop's state and step; the step's metrics row."""
  lp.state, lp.step = info.state, info.step
  tc = lp.cfg.train
  info.row.update(_row(info.step, info.metrics, dt=info.step_time,
                       tokens_per_step=tc.batch_size * tc.seq_len, flops_per_token=lp.fpt,
                       peak=lp.peak, wall=time.time()))


def _rollback_hook(lp: _Loop, loop: loop_lib.Loop, info: loop_lib.StepInfo) -> None:
  """After `max_bad_steps` skipped steps in a row: log the row, restore the last checkpoint."""
  if info.metrics["consecutive_bad"] < lp.cfg.train.max_bad_steps:
    return
  lp.mlog.write(info.row)
  _rollback(lp, info.data_state)
  lp.saved_step = lp.step
  loop.rewind(lp.state, lp.step)


def _checkpoint_hook(lp: _Loop, loop: loop_lib.Loop, info: loop_lib.StepInfo, sigterm) -> None:
  """Checks the save in flight, saves every `save_every` steps, at the end and on SIGTERM."""
  # The save in flight (if any) is checked while `state` is still live: a failure is
  # retried at once with this step's state.
  lp.saver.poll(lp.step, lp.state, info.data_state, lp.save_meta)
  stop = sigterm.agreed()
  if lp.mgr.should_save(lp.step) or lp.step == lp.cfg.train.total_steps or stop:
    lp.saver.save(lp.step, lp.state, info.data_state, lp.save_meta)
    lp.saved_step = lp.step
  if stop:
    lp.saver.poll(lp.step, lp.state, info.data_state, lp.save_meta, block=True)
    log.warning("SIGTERM: saved checkpoint %d; stopping", lp.step)
    lp.result.preempted = True
    loop.stop()


def _count_healthy(lp: _Loop, m: dict) -> None:
  """Applied steps in a row; `rollback_reset_steps` of them end a run of rollbacks."""
  lp.healthy = 0 if m["skipped"] else lp.healthy + 1
  if lp.rollbacks_in_row and lp.healthy >= lp.cfg.rollback_reset_steps:
    log.info("step %d: %d healthy steps since the last rollback; the rollback count restarts",
             lp.step, lp.healthy)
    lp.rollbacks_in_row = 0


def _log_row(lp: _Loop, row: dict) -> None:
  lp.mlog.write(row)
  if lp.bar is not None:
    lp.bar.update(1)
    lp.bar.set_postfix_str(_fmt(row).split(" | ", 1)[1], refresh=False)
  elif lp.progress and lp.lead and (lp.step % lp.cfg.log_every == 0 or "val_loss" in row
                                    or lp.step == lp.cfg.train.total_steps):
    log.info(_fmt(row))


def _finish(lp: _Loop, elapsed: float) -> RunResult:
  """Final state, plot, sample and summary."""
  cfg, result = lp.cfg, lp.result
  result.state = lp.state
  result.history = list(lp.mlog.rows)
  if not result.preempted:
    if lp.lead:
      metrics_lib.plot_loss_curve(
          result.history, os.path.join(lp.workdir, PLOT_FILE),
          title=f"{cfg.preset or 'run'}: {cfg.model.num_layers} layers, "
          f"{cfg.train.batch_size}x{cfg.train.seq_len} tokens/step")
    result.sample = _sample(cfg, lp.state.params, lp.data.tokenizer_path, lp.mesh)
  if lp.lead:
    _write_summary(cfg, result, lp.workdir, elapsed)
  return result


def _rollback(lp: _Loop, data_state) -> None:
  """Restores the last good checkpoint's params and optimizer state (data keeps going).

  `max_rollbacks` bounds the rollbacks in a row: the count restarts after
  `rollback_reset_steps` healthy steps, so separate spikes each get their own rollbacks.
  """
  cfg, tc, step = lp.cfg, lp.cfg.train, lp.step
  lp.result.rollbacks += 1
  lp.rollbacks_in_row += 1
  lp.healthy = 0
  if lp.rollbacks_in_row > cfg.max_rollbacks:
    raise TrainingStopped(
        f"step {step}: {tc.max_bad_steps} consecutive non-finite steps again after "
        f"{cfg.max_rollbacks} rollbacks (max_rollbacks) with fewer than "
        f"{cfg.rollback_reset_steps} healthy steps between them; giving up. Lower "
        f"train.peak_lr or inspect the data near this step; {lp.saver.safe()}")
  lp.saver.poll(step, lp.state, data_state, lp.save_meta, block=True)
  restored = lp.mgr.restore(lp.target, quarantine=True)
  if restored is None:
    raise TrainingStopped(f"step {step}: {tc.max_bad_steps} consecutive non-finite steps and no "
                          f"checkpoint to roll back to in {lp.mgr.directory}")
  log.warning("step %d: %d consecutive non-finite steps; rolled back to checkpoint %d "
              "(rollback %d in a row, at most %d); the data continues after the bad batches",
              step, tc.max_bad_steps, restored.step, lp.rollbacks_in_row, cfg.max_rollbacks)
  lp.mlog.truncate(restored.step)
  lp.result.evals = [e for e in lp.result.evals if e["step"] <= restored.step]
  lp.state, lp.step = restored.state, restored.step
  lp.saver.good = restored.step


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
  try:
    result = run(cfg, workdir)
  except (TrainingStopped, workdir_lock.WorkdirLocked) as e:
    # One clear final line instead of a traceback: what happened and which step is safe.
    print(f"stopped: {e}", file=sys.stderr, flush=True)
    return 1
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
