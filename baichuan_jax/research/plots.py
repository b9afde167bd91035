"""Matplotlib figures for the experiments (headless Agg backend; each function writes one PNG)."""

from __future__ import annotations

import os
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position

_COLORS = {"rope": "tab:blue", "alibi": "tab:orange"}


def _save(fig, path) -> str:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return str(path)


def loss_curves(runs: Mapping[str, dict], path, *, x: str = "tokens", title: str = "") -> str:
  """Validation-loss curves, one line per run.

  Args:
    runs: label -> {"evals": [{x: ..., "val_loss": ...}], "group": optional colour key}.
    path: output PNG.
    x: "tokens", "flops" or "step".
  """
  fig, ax = plt.subplots(figsize=(6.4, 4.2))
  for label, r in runs.items():
    xs = [e[x] for e in r["evals"]]
    ys = [e["val_loss"] for e in r["evals"]]
    ax.plot(xs, ys, marker="o", ms=3, label=label, color=_COLORS.get(r.get("group")),
            alpha=0.85, linestyle=r.get("linestyle", "-"))
  ax.set_xlabel({"tokens": "training tokens", "flops": "training FLOPs", "step": "step"}[x])
  ax.set_ylabel("validation loss (nats/token)")
  if x == "flops":
    ax.set_xscale("log")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  ax.set_title(title)
  return _save(fig, path)


def extrapolation(per_scheme: Mapping[str, dict], path, *, title: str = "") -> str:
  """Loss per position bucket at the longest evaluation length, one line per scheme (mean over
  seeds, shaded min-max), with the training length marked.

  Args:
    per_scheme: scheme -> {"train_len", "bucket_len", "buckets": [seeds, num_buckets]} at the
      longest factor.
  """
  fig, ax = plt.subplots(figsize=(6.4, 4.2))
  train_len = None
  for scheme, r in per_scheme.items():
    b = np.asarray(r["buckets"], np.float64)
    centers = (np.arange(b.shape[1]) + 0.5) * r["bucket_len"]
    ax.plot(centers, b.mean(0), marker="o", label=scheme, color=_COLORS.get(scheme))
    if b.shape[0] > 1:
      ax.fill_between(centers, b.min(0), b.max(0), alpha=0.2, color=_COLORS.get(scheme))
    train_len = r["train_len"]
  if train_len:
    ax.axvline(train_len, color="gray", linestyle="--", label=f"training length {train_len}")
  ax.set_xlabel("position in the evaluation window")
  ax.set_ylabel("validation loss (nats/token)")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  ax.set_title(title)
  return _save(fig, path)


def scaling_fit(points: Sequence[dict], fit, path, *, curves: Mapping[str, dict] | None = None,
                title: str = "") -> str:
  """Final loss vs compute with the fitted ``a C^b + L_inf`` and the held-out point.

  Args:
    points: [{"name", "compute", "loss", "held_out": bool}].
    fit: a `scaling_law.LossFit` (fitted on the non-held-out points).
    curves: optional run name -> {"compute": [...], "loss": [...]} training curves drawn faintly.
  """
  fig, ax = plt.subplots(figsize=(6.4, 4.4))
  if curves:
    for name, cv in curves.items():
      ax.plot(cv["compute"], cv["loss"], color="gray", alpha=0.35, lw=1)
  cs = np.array([p["compute"] for p in points], np.float64)
  grid = np.geomspace(cs.min() / 2, cs.max() * 4, 200)
  ax.plot(grid, fit.predict(grid), color="tab:red",
          label=f"fit: {fit.a:.3g}·C^{fit.b:.3f} + {fit.l_inf:.3f}")
  ax.axhline(fit.l_inf, color="tab:red", lw=0.8, linestyle=":", alpha=0.6)
  for p in points:
    held = p.get("held_out", False)
    ax.scatter([p["compute"]], [p["loss"]], s=60 if held else 30, zorder=3,
               marker="*" if held else "o", color="tab:green" if held else "tab:blue",
               label=None)
    ax.annotate(p["name"], (p["compute"], p["loss"]), textcoords="offset points", xytext=(4, 4),
                fontsize=7)
    if held:
      pred = float(fit.predict(p["compute"]))
      ax.scatter([p["compute"]], [pred], marker="x", s=60, color="tab:red", zorder=3)
      ax.plot([p["compute"]] * 2, [pred, p["loss"]], color="tab:red", lw=1)
  ax.scatter([], [], marker="o", color="tab:blue", label="fitted runs")
  ax.scatter([], [], marker="*", s=60, color="tab:green", label="held-out run (actual)")
  ax.scatter([], [], marker="x", color="tab:red", label="held-out run (predicted)")
  ax.set_xscale("log")
  ax.set_xlabel("training compute C (FLOPs)")
  ax.set_ylabel("final validation loss (nats/token)")
  ax.grid(alpha=0.3, which="both")
  ax.legend(fontsize=8)
  ax.set_title(title)
  return _save(fig, path)


def optimal_size(rows: Sequence[dict], path, *, power_law=None, title: str = "") -> str:
  """Compute-optimal model size vs budget (rows from `scaling_law.compute_optimal_sizes`)."""
  fig, ax = plt.subplots(figsize=(6.4, 4.2))
  c = np.array([r["budget"] for r in rows])
  ax.scatter(c, [r["n_opt"] for r in rows], label="optimum (envelope, parabola-refined)")
  ax.scatter(c, [r["best_params"] for r in rows], marker="_", s=120, color="gray",
             label="best measured size")
  if power_law is not None:
    grid = np.geomspace(c.min(), c.max(), 100)
    ax.plot(grid, power_law.predict(grid), color="tab:red",
            label=f"N_opt ≈ {power_law.coef:.3g}·C^{power_law.exponent:.2f}")
  ax.set_xscale("log")
  ax.set_yscale("log")
  ax.set_xlabel("compute budget C (FLOPs)")
  ax.set_ylabel("parameters (non-embedding)")
  ax.grid(alpha=0.3, which="both")
  ax.legend(fontsize=8)
  ax.set_title(title)
  return _save(fig, path)
