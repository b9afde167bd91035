"""Scaling-law math: the Baichuan 2 loss-vs-compute fit and compute-optimal model sizes.

The Baichuan 2 report fits ``L(C) = a * C^b + L_inf`` to the final losses of seven small models
(11.5M to 3.0B parameters), C = training FLOPs, and reads the 7B and 13B losses off the curve.
`fit_loss_vs_compute` does the same fit with SciPy; `compute_optimal_sizes` reads the loss-optimal
model size at each compute budget off the lower envelope of the training curves (Chinchilla's
"approach 1": every run's validation loss as a function of the FLOPs spent so far), and
`fit_power_law` turns those sizes into ``N_opt(C) = g * C^alpha``.

Everything here is pure numpy/scipy on floats; nothing touches JAX.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Mapping, Sequence

import numpy as np
from scipy import optimize


@dataclasses.dataclass(frozen=True)
class LossFit:
  """``L(C) = a * C^b + l_inf`` (b < 0), fitted on `num_points` (compute, loss) pairs."""
  a: float
  b: float
  l_inf: float
  num_points: int
  rmse: float  # root-mean-square residual of the fit on its own points, in loss units

  def predict(self, compute) -> np.ndarray:
    """Loss at `compute` FLOPs (scalar or array)."""
    return self.a * np.power(np.asarray(compute, np.float64), self.b) + self.l_inf

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)


def _check_points(compute, loss) -> tuple[np.ndarray, np.ndarray]:
  c = np.asarray(compute, np.float64).ravel()
  l = np.asarray(loss, np.float64).ravel()
  if c.shape != l.shape:
    raise ValueError(f"compute and loss must have the same length, got {c.size} and {l.size}")
  if not (np.all(np.isfinite(c)) and np.all(np.isfinite(l))):
    raise ValueError("compute and loss must be finite")
  if np.any(c <= 0):
    raise ValueError(f"compute must be > 0 FLOPs, got min {c.min()}")
  return c, l


def fit_loss_vs_compute(compute: Sequence[float], loss: Sequence[float]) -> LossFit:
  """Least-squares fit of ``L(C) = a * C^b + L_inf`` (Baichuan 2's scaling law).

  The fit runs in normalised units (C / geometric-mean C, log a) so the optimiser sees numbers of
  order one although C spans many decades; several starting values of the irreducible loss are
  tried and the lowest residual wins, since the three-parameter fit has flat valleys with few points.

  Args:
    compute: [n] training FLOPs of each run (n >= 3; 3 points fit exactly).
    loss: [n] final validation loss of each run (nats/token).
  Returns:
    `LossFit` in the original units (C in FLOPs).
  Raises:
    ValueError: fewer than 3 points, mismatched lengths, non-finite or non-positive compute.
  """
  c, l = _check_points(compute, loss)
  if c.size < 3:
    raise ValueError(f"fitting a*C^b + L_inf needs at least 3 points, got {c.size}")
  if np.unique(c).size < 3:
    raise ValueError(f"fitting a*C^b + L_inf needs 3 distinct compute values, got {c.tolist()}")
  c0 = float(np.exp(np.mean(np.log(c))))
  x = np.log(c / c0)
  lmin = float(l.min())
  spread = max(float(l.max() - lmin), 1e-3)

  def model(x, log_a, b, l_inf):
    return np.exp(log_a + b * x) + l_inf

  best = None
  for frac in (0.0, 0.5, 0.9, 0.99):
    # Start L_inf below the lowest loss; log a then matches the excess at the reference compute.
    l_inf0 = max(lmin - spread * (1.0 - frac) * 2.0, 0.0) if frac else 0.0
    excess = np.clip(l - l_inf0, 1e-6, None)
    slope, intercept = np.polyfit(x, np.log(excess), 1)
    p0 = (float(intercept), float(np.clip(slope, -4.9, -1e-3)), min(l_inf0, lmin * 0.999))
    try:
      with warnings.catch_warnings():
        # With exactly 3 points the covariance is undefined; only the estimate is used.
        warnings.simplefilter("ignore", optimize.OptimizeWarning)
        popt, _ = optimize.curve_fit(
            model, x, l, p0=p0, bounds=([-50.0, -5.0, 0.0], [50.0, 0.0, lmin]), maxfev=20000)
    except (RuntimeError, ValueError):
      continue
    rss = float(np.sum((model(x, *popt) - l) ** 2))
    if best is None or rss < best[0]:
      best = (rss, popt)
  if best is None:
    raise RuntimeError(f"scaling-law fit did not converge on {c.size} points")
  rss, (log_a, b, l_inf) = best
  # Undo the normalisation: a * (C/c0)^b = (a * c0^-b) * C^b.
  a = float(np.exp(log_a - b * np.log(c0)))
  return LossFit(a=a, b=float(b), l_inf=float(l_inf), num_points=int(c.size),
                 rmse=float(np.sqrt(rss / c.size)))


@dataclasses.dataclass(frozen=True)
class PowerLaw:
  """``y = coef * x^exponent``, fitted as a straight line in log-log space."""
  coef: float
  exponent: float

  def predict(self, x) -> np.ndarray:
    return self.coef * np.power(np.asarray(x, np.float64), self.exponent)


def fit_power_law(x: Sequence[float], y: Sequence[float]) -> PowerLaw:
  """Least-squares line through (log x, log y) (e.g. optimal size vs compute).

  Raises:
    ValueError: fewer than 2 distinct x, or non-positive values.
  """
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  if x.shape != y.shape or x.size < 2 or np.unique(x).size < 2:
    raise ValueError(f"a power-law fit needs >= 2 points with distinct x, got x={x.tolist()}")
  if np.any(x <= 0) or np.any(y <= 0):
    raise ValueError("power-law fit needs positive x and y")
  slope, intercept = np.polyfit(np.log(x), np.log(y), 1)
  return PowerLaw(coef=float(np.exp(intercept)), exponent=float(slope))


def loss_at_compute(curve_compute: Sequence[float], curve_loss: Sequence[float],
                    budget: float, hold_final: bool = False) -> float | None:
  """A training curve's loss at `budget` FLOPs, linear in log-compute between evaluations.

  Returns None when the budget lies before the first evaluation, or after the last one unless
  `hold_final` (then the final loss: more training of that model could only lower it, so this is
  a conservative value for the model at the larger budget).
  """
  c, l = _check_points(curve_compute, curve_loss)
  order = np.argsort(c)
  c, l = c[order], l[order]
  if budget > c[-1] and hold_final:
    return float(l[-1])
  if budget < c[0] or budget > c[-1]:
    return None
  return float(np.interp(np.log(budget), np.log(c), l))


def compute_optimal_sizes(curves: Mapping[str, dict], budgets: Sequence[float],
                          hold_final: bool = False) -> list[dict]:
  """Loss-optimal model size at each compute budget, from the lower envelope of training curves.

  Each run's validation loss is read at every budget its curve covers (with `hold_final`, also
  past its end, at its final loss: a run whose schedule ended early then still competes, at a
  value it could only improve on); the run with the lowest loss is the optimum among the
  measured sizes. With one budget per size, evaluate at the runs' final computes: there one run
  is fully annealed, smaller runs are held at their final loss and larger ones are mid-schedule. When that run has a measured neighbour on each side
  (in size), a parabola in log N through the three points refines the optimum between ladder rungs
  (the IsoFLOP-profile minimum of Chinchilla's approach 2, on three points).

  Args:
    curves: run name -> {"params": N, "compute": [k] FLOPs so far, "loss": [k] val loss}.
    budgets: FLOP budgets to evaluate.
  Returns:
    one dict per budget with at least 2 covering runs: budget, best_run, best_params, best_loss,
    n_opt (refined size; = best_params without two neighbours), candidates (runs compared).
  """
  out = []
  for budget in budgets:
    rows = []
    for name, cv in curves.items():
      v = loss_at_compute(cv["compute"], cv["loss"], float(budget), hold_final)
      if v is not None:
        rows.append((float(cv["params"]), v, name))
    if len(rows) < 2:
      continue
    rows.sort()
    i = int(np.argmin([r[1] for r in rows]))
    n_opt = rows[i][0]
    if 0 < i < len(rows) - 1:
      xs = np.log([rows[j][0] for j in (i - 1, i, i + 1)])
      ys = np.array([rows[j][1] for j in (i - 1, i, i + 1)])
      p2, p1, _ = np.polyfit(xs, ys, 2)
      if p2 > 0:  # convex: the vertex is a minimum and lies between the outer neighbours
        n_opt = float(np.exp(np.clip(-p1 / (2 * p2), xs[0], xs[2])))
    out.append({"budget": float(budget), "best_run": rows[i][2], "best_params": rows[i][0],
                "best_loss": rows[i][1], "n_opt": float(n_opt), "candidates": len(rows)})
  return out


def prediction_error(predicted: float, actual: float) -> dict:
  """Absolute and relative error of a predicted loss."""
  return {"predicted": float(predicted), "actual": float(actual),
          "abs_error": float(predicted - actual),
          "rel_error": float((predicted - actual) / actual)}
