"""Training metrics: the per-step JSONL log (+ TensorBoard), MFU arithmetic and the loss-curve plot.

`MetricsLog` appends one JSON object per step to `WORKDIR/metrics.jsonl`. On resume (or roll
back) `truncate(step)` drops rows after the checkpoint so the file again describes one history.

MFU (model FLOPs utilisation, the PaLM convention) = achieved model FLOP/s / peak FLOP/s, with
achieved = `configs.flops_per_token(model, seq_len)["total"]` x tokens/s (forward + backward,
attention included, rematerialisation NOT counted), and peak = per-device dense peak x devices.
On CPU the fake devices of one host share its cores, so the peak is the host's measured one.
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any, Iterable, Optional

import jax
import jax.numpy as jnp
import numpy as np

METRICS_FILE = "metrics.jsonl"


def measure_peak_flops(device: Optional[jax.Device] = None, dtype: Any = jnp.bfloat16,
                       n: Optional[int] = None, repeats: int = 3) -> float:
  """Measured matmul FLOP/s of one device: best of `repeats` timed [n, n] x [n, n] products.

  Args:
    device: the device (default: the first local one).
    dtype: matmul input dtype (the model's compute dtype).
    n: matrix size (default 1024 on CPU, 8192 on accelerators).
    repeats: timed runs after one warm-up; the fastest counts.
  Returns:
    FLOP/s (2 n^3 per product).
  """
  device = device or jax.local_devices()[0]
  if n is None:
    n = 1024 if device.platform == "cpu" else 8192
  k1, k2 = jax.random.split(jax.random.PRNGKey(0))
  a = jax.device_put(jax.random.normal(k1, (n, n), jnp.float32).astype(dtype), device)
  b = jax.device_put(jax.random.normal(k2, (n, n), jnp.float32).astype(dtype), device)
  # Four chained products per call amortise the dispatch overhead.
  f = jax.jit(lambda x, y: ((((x @ y) @ y) @ y) @ y).astype(jnp.float32).sum())
  jax.block_until_ready(f(a, b))
  best = math.inf
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(f(a, b))
    best = min(best, time.perf_counter() - t0)
  return 4 * 2.0 * n ** 3 / best


def total_peak_flops(per_device: float, devices: list) -> float:
  """Peak FLOP/s of the devices a step runs on (one host's peak for CPU fake devices)."""
  if devices and devices[0].platform == "cpu":
    return per_device * len({d.process_index for d in devices})
  return per_device * len(devices)


def _clean(v: Any) -> Any:
  """JSON-safe scalar: numpy -> Python, NaN/inf -> their string names (JSON has none)."""
  if isinstance(v, (np.generic, np.ndarray)):
    v = v.item()
  if isinstance(v, float) and not math.isfinite(v):
    return str(v)
  return v


class MetricsLog:
  """The one metrics log: per-step rows in a JSONL file and, optionally, TensorBoard scalars.

  Pretraining logs to `WORKDIR/metrics.jsonl`, reading back the rows of earlier runs (resume);
  the alignment stages use `MetricsLog.at_path(path)`: a file started empty, values as floats.

  Args:
    workdir: run folder (the file is `WORKDIR/metrics.jsonl`); None with `path`.
    tensorboard: also write `WORKDIR/tensorboard` event files (tensorboardX).
    enabled: False on every process but 0 of a multi-host job (rows are still kept in memory).
    path: the JSONL file instead of `WORKDIR/metrics.jsonl`.
    fresh: start the file empty instead of reading back its rows.
    as_float: store every number as a float (the alignment stages' format).
  """

  def __init__(self, workdir: Optional[str] = None, tensorboard: bool = True,
               enabled: bool = True, *, path: Optional[str] = None, fresh: bool = False,
               as_float: bool = False):
    self.path = path if path is not None else os.path.join(workdir, METRICS_FILE)
    self.enabled, self.as_float = enabled, as_float
    self.rows: list[dict] = []
    if fresh and enabled:
      os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
      open(self.path, "w", encoding="utf-8").close()
    elif os.path.exists(self.path):
      with open(self.path, encoding="utf-8") as f:
        self.rows = [json.loads(line) for line in f if line.strip()]
    self._tb = None
    if tensorboard and enabled:
      from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
      self._tb = SummaryWriter(os.path.join(workdir or os.path.dirname(self.path), "tensorboard"))

  @classmethod
  def at_path(cls, path: Optional[str]) -> "MetricsLog":
    """A log written from scratch to `path` (None: rows in memory only), no TensorBoard,
    every number stored as a float."""
    return cls(path=path or "", tensorboard=False, enabled=bool(path), fresh=True, as_float=True)

  def truncate(self, step: int) -> None:
    """Forgets rows after `step` (the checkpoint a run resumed or rolled back to)."""
    keep = [r for r in self.rows if r.get("step", 0) <= step]
    if len(keep) != len(self.rows) or not os.path.exists(self.path):
      self.rows = keep
      if self.enabled:
        tmp = self.path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
          f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in keep)
        os.replace(tmp, self.path)

  def write(self, row: dict) -> None:
    """Appends one step's metrics (a dict with an integer `step`)."""
    if self.as_float:
      row = {k: (float(v) if hasattr(v, "__float__") else v) for k, v in row.items()}
    else:
      row = {k: _clean(v) for k, v in row.items()}
    self.rows.append(row)
    if not self.enabled:
      return
    with open(self.path, "a", encoding="utf-8") as f:
      f.write(json.dumps(row, ensure_ascii=False) + "\n")
    if self._tb is not None:
      for k, v in row.items():
        if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
          self._tb.add_scalar(f"train/{k}" if k != "val_loss" else "eval/val_loss", v, row["step"])

  def close(self) -> None:
    if self._tb is not None:
      self._tb.flush()
      self._tb.close()
      self._tb = None


def smooth(values: Iterable[float], alpha: float = 0.9) -> list[float]:
  """Bias-corrected exponential moving average (TensorBoard's smoothing)."""
  out, acc = [], 0.0
  for i, v in enumerate(values, start=1):
    acc = alpha * acc + (1 - alpha) * v
    out.append(acc / (1 - alpha ** i))
  return out


def plot_loss_curve(rows: list[dict], path: str, title: str = "") -> Optional[str]:
  """Train loss (raw and smoothed) and validation loss against step, plus the LR, as a PNG.

  Args:
    rows: metrics rows (`step`, `loss`, optional `val_loss`, `lr`).
    path: output .png.
    title: figure title.
  Returns:
    `path`, or None when there is nothing to plot.
  """
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  train = [(r["step"], r["loss"]) for r in rows
           if isinstance(r.get("loss"), (int, float)) and math.isfinite(r["loss"])]
  val = [(r["step"], r["val_loss"]) for r in rows if isinstance(r.get("val_loss"), (int, float))]
  if not train and not val:
    return None
  fig, (ax, ax_lr) = plt.subplots(2, 1, figsize=(7, 5.5), sharex=True,
                                  gridspec_kw={"height_ratios": [3, 1]})
  if train:
    s, l = zip(*train)
    ax.plot(s, l, color="tab:blue", alpha=0.3, lw=0.8, label="train loss")
    ax.plot(s, smooth(l), color="tab:blue", lw=1.5, label="train loss (EMA 0.9)")
  if val:
    s, l = zip(*val)
    ax.plot(s, l, "o-", color="tab:red", lw=1.5, ms=4, label="validation loss")
  ax.set_ylabel("cross-entropy (nats/token)")
  ax.grid(alpha=0.3)
  ax.legend()
  ax.set_title(title)
  lr = [(r["step"], r["lr"]) for r in rows if isinstance(r.get("lr"), (int, float))]
  if lr:
    s, v = zip(*lr)
    ax_lr.plot(s, v, color="tab:green")
  ax_lr.set_ylabel("learning rate")
  ax_lr.set_xlabel("step")
  ax_lr.grid(alpha=0.3)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path
