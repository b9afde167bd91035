"""AdamW with Baichuan's hyper-parameters, global-norm clipping and warm-up + cosine schedule.

Moments are kept in fp32 whatever the parameter dtype (Baichuan: bf16 compute, fp32 master
weights and optimizer state).
Weight decay skips the RMSNorm scales, chosen by parameter path (under `nn.scan` a norm scale is
[layers, hidden], so a rank rule cannot tell it from a matrix).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax


def lr_schedule(cfg: ml_collections.ConfigDict) -> optax.Schedule:
  """Linear warm-up 0 -> peak_lr over warmup_steps, then cosine to min_lr_ratio * peak_lr.

  At step t (0-based count of updates already applied):
    t < W:       peak * t / W
    W <= t < T:  floor + (peak - floor) * 0.5 * (1 + cos(pi * (t - W) / (T - W)))
    t >= T:      floor
  with floor = min_lr_ratio * peak, W = warmup_steps, T = total_steps.
  """
  peak = float(cfg.peak_lr)
  floor = peak * float(cfg.min_lr_ratio)
  warm = int(cfg.warmup_steps)
  decay = max(int(cfg.total_steps) - warm, 1)

  def schedule(step):
    t = jnp.asarray(step, jnp.float32)
    warm_lr = peak * t / max(warm, 1)
    frac = jnp.clip((t - warm) / decay, 0.0, 1.0)
    cos_lr = floor + (peak - floor) * 0.5 * (1.0 + jnp.cos(jnp.pi * frac))
    return jnp.where(t < warm, warm_lr, cos_lr)

  return schedule


def _path_str(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def is_norm_path(path: str) -> bool:
  """True for RMSNorm scales: `input_layernorm`, `post_attention_layernorm`, final `norm`."""
  parts = path.split("/")
  return any(p == "norm" or p.endswith("layernorm") for p in parts)


def decay_mask(params: Any) -> Any:
  """Pytree of bools like `params`: True where weight decay applies (everything but norms)."""
  return jax.tree_util.tree_map_with_path(lambda p, _: not is_norm_path(_path_str(p)), params)


def make_optimizer(cfg: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """clip_by_global_norm(grad_clip) -> AdamW(lr_schedule, betas, eps, weight_decay on non-norms).

  Args:
    cfg: train config (`baichuan_jax.train.config.default_train_config()`).
  Returns:
    An optax transformation whose moments are fp32.
  """
  b1, b2 = (float(b) for b in cfg.betas)
  parts = []
  if cfg.grad_clip > 0:
    parts.append(optax.clip_by_global_norm(float(cfg.grad_clip)))
  parts.append(optax.adamw(lr_schedule(cfg), b1=b1, b2=b2, eps=float(cfg.eps),
                           mu_dtype=jnp.float32, weight_decay=float(cfg.weight_decay),
                           mask=decay_mask))
  return optax.chain(*parts)
