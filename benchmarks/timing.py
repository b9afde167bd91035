"""The timing rule every benchmark here uses: median wall seconds per call, synchronised.

Run as scripts (`python benchmarks/NAME.py`), the benchmarks import this as `timing` (their own
folder is first on `sys.path`).
"""

from __future__ import annotations

import time

import jax
import numpy as np


def median_seconds(fn, *args, iters: int = 10, warmup: int = 2) -> float:
  """Median seconds per call of `fn(*args)`: one untimed call (compiles a jitted `fn`), `warmup`
  more, then `iters` timed calls, each waited on with `jax.block_until_ready`."""
  jax.block_until_ready(fn(*args))
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(iters):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return float(np.median(times))
