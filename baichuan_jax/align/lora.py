"""LoRA (Hu et al., 2021) as a parameter transform over the plain Baichuan parameter tree.

Adapters live in their own pytree, `{target: {"A": [layers, in, rank], "B": [layers, rank, out]}}`,
beside the frozen base parameters. `apply_lora` builds the effective parameters
`W + (alpha / rank) * A @ B` (reshaped to the kernel's layout) inside the loss function, so the model
code is untouched, gradients flow only into A and B, and only the adapters carry optimizer state.
`merge_lora` folds the adapters into the base weights for export (the merged model is a plain model).

Dropout: because the adapter is applied to the weights rather than to activations, LoRA dropout here
drops input features of `A` (rows, rescaled by 1/(1-p)), resampled every step and shared by the
batch; this is the DropConnect-style counterpart of PEFT's per-token input dropout.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp

# Target module -> (path of its kernel in the parameter tree, number of input axes after `layers`).
TARGETS: dict[str, tuple[tuple[str, ...], int]] = {
    "W_pack": (("layers", "self_attn", "W_pack", "kernel"), 1),
    "q_proj": (("layers", "self_attn", "q_proj", "kernel"), 1),  # GQA configs only
    "kv_proj": (("layers", "self_attn", "kv_proj", "kernel"), 1),  # GQA configs only
    "o_proj": (("layers", "self_attn", "o_proj", "kernel"), 2),
    "gate_proj": (("layers", "mlp", "gate_proj", "kernel"), 1),
    "up_proj": (("layers", "mlp", "up_proj", "kernel"), 1),
    "down_proj": (("layers", "mlp", "down_proj", "kernel"), 1),
}

Params = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
  """Adapter hyper-parameters (PEFT names)."""
  # Rank r of A [in, r] and B [r, out].
  rank: int = 8
  # Scale numerator: the update is (alpha / rank) * A @ B.
  alpha: float = 16.0
  # Dropout probability on the input features of A (0 disables).
  dropout: float = 0.0
  # Which projections get adapters.
  targets: Sequence[str] = ("W_pack", "o_proj")

  def __post_init__(self):
    if not isinstance(self.rank, int) or self.rank <= 0:
      raise ValueError(f"lora.rank={self.rank!r} is invalid: must be a positive integer")
    if not 0.0 <= self.dropout < 1.0:
      raise ValueError(f"lora.dropout={self.dropout!r} is invalid: must be in [0, 1)")
    bad = [t for t in self.targets if t not in TARGETS]
    if bad or not self.targets:
      raise ValueError(f"lora.targets={tuple(self.targets)!r} is invalid: choose a non-empty subset "
                       f"of {', '.join(TARGETS)}")

  @property
  def scale(self) -> float:
    return self.alpha / self.rank


def _get(tree: Params, path: tuple[str, ...]):
  for key in path:
    tree = tree[key]
  return tree


def _set(tree: Params, path: tuple[str, ...], value) -> Params:
  """Copy of `tree` with `path` replaced (shallow copies along the path only)."""
  if not path:
    return value
  out = dict(tree)
  out[path[0]] = _set(tree[path[0]], path[1:], value)
  return out


def _split(kernel_shape: tuple[int, ...], n_in: int) -> tuple[int, int, int]:
  layers = kernel_shape[0]
  return layers, math.prod(kernel_shape[1:1 + n_in]), math.prod(kernel_shape[1 + n_in:])


def init_lora(params: Params, cfg: LoRAConfig, rng: jax.Array) -> Params:
  """Fresh adapters for `params`: A ~ U(-1/sqrt(in), 1/sqrt(in)) as in PEFT, B = 0 (no change yet).

  Args:
    params: base model parameters (`model.init_params`).
    cfg: LoRA settings.
    rng: PRNG key.
  Returns:
    {target: {"A": [layers, in, rank] fp32, "B": [layers, rank, out] fp32}}.
  Raises:
    ValueError: a target module that this model does not have (e.g. W_pack in a GQA config).
  """
  adapters = {}
  for i, name in enumerate(cfg.targets):
    path, n_in = TARGETS[name]
    try:
      kernel = _get(params, path)
    except KeyError:
      raise ValueError(f"lora target {name!r} is not in this model (no {'/'.join(path)}); GQA "
                       "models use q_proj/kv_proj instead of W_pack") from None
    layers, d_in, d_out = _split(kernel.shape, n_in)
    bound = 1.0 / math.sqrt(d_in)
    a = jax.random.uniform(jax.random.fold_in(rng, i), (layers, d_in, cfg.rank), jnp.float32,
                           -bound, bound)
    adapters[name] = {"A": a, "B": jnp.zeros((layers, cfg.rank, d_out), jnp.float32)}
  return adapters


def lora_delta(a: jax.Array, b: jax.Array, kernel_shape: tuple[int, ...], scale: float) -> jax.Array:
  """(alpha / rank) * A @ B per layer, reshaped to the kernel layout, fp32.

  Args:
    a: [layers, in, rank]; b: [layers, rank, out]; kernel_shape: [layers, *in_axes, *out_axes].
  """
  # [layers, in, out]
  delta = jnp.einsum("lir,lro->lio", a, b, preferred_element_type=jnp.float32)
  return (scale * delta).reshape(kernel_shape)


def apply_lora(params: Params, adapters: Params, cfg: LoRAConfig,
               rng: Optional[jax.Array] = None) -> Params:
  """Effective parameters W + scale * A @ B for every adapted kernel (call inside the loss).

  Args:
    params: base parameters (frozen; pass them as a non-differentiated argument).
    adapters: from `init_lora`.
    cfg: LoRA settings.
    rng: PRNG key for adapter dropout; None (evaluation, export) disables dropout.
  Returns:
    A parameter tree shaped like `params`, adapted kernels in their original dtype.
  """
  out = params
  for i, name in enumerate(cfg.targets):
    path, _ = TARGETS[name]
    kernel = _get(params, path)
    a = adapters[name]["A"]
    if rng is not None and cfg.dropout > 0.0:
      keep = jax.random.bernoulli(jax.random.fold_in(rng, i), 1.0 - cfg.dropout, a.shape[:2] + (1,))
      a = jnp.where(keep, a / (1.0 - cfg.dropout), 0.0)
    delta = lora_delta(a, adapters[name]["B"], kernel.shape, cfg.scale)
    out = _set(out, path, (kernel.astype(jnp.float32) + delta).astype(kernel.dtype))
  return out


def merge_lora(params: Params, adapters: Params, cfg: LoRAConfig) -> Params:
  """Base weights with the adapters folded in, for export: a plain model, no adapter at run time."""
  return apply_lora(params, adapters, cfg, rng=None)


def num_adapter_params(adapters: Params) -> int:
  """Number of trainable adapter values."""
  return sum(int(x.size) for x in jax.tree_util.tree_leaves(adapters))
