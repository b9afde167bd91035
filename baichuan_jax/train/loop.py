"""The one training loop: a jitted step over batches, with everything else as hooks.

    loop = Loop(step_fn, state, batches, total_steps=1000)
    loop.add_hook(log_row)                        # every step
    loop.add_hook(run_eval, every=100, at_end=True)
    state = loop.run()

`step_fn(state, batch) -> (state, metrics)` is any train step (`train.make_train_step`,
`train.step.build_step`, `align.engine.TreeTrainer.step_fn()`, or a host function such as one
PPO iteration). After each step the
loop reads the metrics to the host and calls the due hooks, in the order they were added, with
one `StepInfo`. A hook is called when `info.step % every == 0` (and, with `at_end`, at the last
step). Hooks steer the loop through two calls:

* `loop.rewind(state, step)`: continue from another state (a rollback to a checkpoint); the
  remaining hooks of this step are skipped and the next step's time is not measured.
* `loop.stop()`: stop after this step's hooks (preemption).

The next batch is read on the host while the device runs the step (`jax.device_get` of the
metrics waits for it); the loop never reads a batch past `total_steps`. When the batch iterator
has `get_state()` (the packed loader), `info.data_state` is its state after this step's batch:
what a checkpoint saves to resume on exactly the next batch.

`weighted_mean` is the one token-weighted evaluator of the engine (pretraining validation,
research curves, the SFT recipe's held-out loss) and `RunResult` the one result type of a run
(pretraining `train.trainer.run`, research `research.runner.train_lm`).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Iterable, Iterator, Optional

import jax


@dataclasses.dataclass
class RunResult:
  """What a training run returns; a field a kind of run does not measure stays at its default."""
  state: Any = None  # the final TrainState (sharded on the mesh); pretraining
  params: Any = None  # the final fp32 parameters on the host; research runs
  history: list = dataclasses.field(default_factory=list)  # per logged step: metric rows
  evals: list = dataclasses.field(default_factory=list)  # per evaluation: {"step", "val_loss", ...}
  tokenizer_path: Optional[str] = None
  workdir: Optional[str] = None
  resumed_from: Optional[int] = None  # checkpoint step this run started from (None: fresh)
  preempted: bool = False  # stopped early by SIGTERM (a checkpoint of the last step was saved)
  rollbacks: int = 0  # restores of the last checkpoint after max_bad_steps non-finite steps
  rejected_checkpoints: list = dataclasses.field(default_factory=list)  # [(step, reason)]
  sample: Optional[str] = None  # greedy continuation of the config's sample prompt
  flops_per_token: Optional[float] = None  # configs.flops_per_token(model, seq_len)["total"]
  train_tokens_per_s: Optional[float] = None  # steps after the first (compile) one, no eval
  compile_s: Optional[float] = None  # wall time of the first step (compilation + one step)
  wall_s: Optional[float] = None  # the whole run

  def summary(self) -> dict:
    """JSON-able summary of the measurements (no parameters)."""
    return {"history": self.history, "evals": self.evals,
            "flops_per_token": self.flops_per_token,
            "train_tokens_per_s": self.train_tokens_per_s, "compile_s": self.compile_s,
            "wall_s": self.wall_s,
            "final_val_loss": self.evals[-1]["val_loss"] if self.evals else None}


@dataclasses.dataclass
class StepInfo:
  """What a hook sees after one step."""
  step: int  # steps done, counting this one (== the state's step for a fresh count)
  state: Any  # the TrainState after this step
  metrics: dict  # the step's metrics on the host (numpy fp32 scalars)
  step_time: Optional[float]  # seconds; None right after a start or a rewind (compilation)
  data_state: Any  # the batch iterator's get_state() after this step's batch (None: no state)
  row: dict  # the step's log row; hooks fill it in order (e.g. val_loss before the log hook)


@dataclasses.dataclass
class Hook:
  fn: Callable[[StepInfo], Any]
  every: int = 1
  at_end: bool = False

  def due(self, step: int, total: int) -> bool:
    return (self.every > 0 and step % self.every == 0) or (self.at_end and step == total)


class Loop:
  """Steps `step_fn` from `state` to `total_steps` over `batches`, calling hooks after each step.

  Args:
    step_fn: `step(state, batch) -> (state, metrics)`.
    state: the starting TrainState.
    batches: an iterable of batches (one per step).
    total_steps: the step count at which the loop ends.
    step: steps already done (a resumed run); default 0.
  """

  def __init__(self, step_fn: Callable, state: Any, batches: Iterable, total_steps: int,
               step: int = 0):
    self.step_fn, self.state, self.total, self.step = step_fn, state, total_steps, step
    # An iterator is used as it is (its get_state() belongs to it); an iterable is iterated.
    self.batches: Iterator = batches if hasattr(batches, "__next__") else iter(batches)
    self.hooks: list[Hook] = []
    self.data_state: Any = None  # the iterator's state after the last batch stepped on
    self.stopped = False
    self._rewound = False

  def add_hook(self, fn: Callable[[StepInfo], Any], every: int = 1, at_end: bool = False) -> None:
    """Calls `fn(info)` after every `every`-th step (and after the last one with `at_end`)."""
    self.hooks.append(Hook(fn, every, at_end))

  def rewind(self, state: Any, step: int) -> None:
    """Continues from `state` at `step`; the rest of this step's hooks are skipped."""
    self.state, self.step, self._rewound = state, step, True

  def stop(self) -> None:
    """Ends the loop after the current step's hooks."""
    self.stopped = True

  def _next(self):
    batch = next(self.batches)
    get_state = getattr(self.batches, "get_state", None)
    return batch, (get_state() if get_state is not None else None)

  def run(self) -> Any:
    """Runs to `total_steps` (or `stop()`); returns the final state."""
    if self.step >= self.total:
      return self.state
    batch, data_state = self._next()
    first = True
    while self.step < self.total and not self.stopped:
      t0 = time.perf_counter()
      self.state, metrics = self.step_fn(self.state, batch)
      self.step += 1
      self.data_state = data_state
      prefetched = self.step < self.total
      if prefetched:  # read the next batch while the device runs this step
        next_batch, next_data_state = self._next()
      metrics = _to_host(metrics)
      dt = None if first else time.perf_counter() - t0
      first, self._rewound = False, False
      info = StepInfo(step=self.step, state=self.state, metrics=metrics, step_time=dt,
                      data_state=data_state, row={"step": self.step})
      for hook in self.hooks:
        if hook.due(info.step, self.total):
          hook.fn(info)
          if self._rewound:
            first = True
            break
      if self.step < self.total and not self.stopped:
        batch, data_state = (next_batch, next_data_state) if prefetched else self._next()
    return self.state


def _to_host(metrics: Any) -> Any:
  """`jax.device_get`, keeping a dict's key order (a host step's row stays as it was written)."""
  host = jax.device_get(metrics)
  return {k: host[k] for k in metrics} if isinstance(metrics, dict) else host


def weighted_mean(eval_fn: Callable, params: Any, batches: Iterable,
                  key: str = "ce") -> tuple[Optional[float], float]:
  """Token-weighted mean of one metric over `batches` (the one evaluator).

  Args:
    eval_fn: `eval_fn(params, batch) -> metrics` (`train.make_eval_step`, or any jitted loss).
    params: the parameters to evaluate.
    batches: an iterable of batches.
    key: the metric to average; falls back to `loss` when the metrics have no `key`.
  Returns:
    (the mean weighted by `weight`, else `tokens`, else 1 per batch; None when the weights sum
    to 0), and the total weight.
  """
  total, weight = 0.0, 0.0
  for batch in batches:
    m = jax.device_get(eval_fn(params, batch))
    w = float(m.get("weight", m.get("tokens", 1.0)))
    total += float(m[key] if key in m else m["loss"]) * w
    weight += w
  return (total / weight if weight > 0 else None), weight
