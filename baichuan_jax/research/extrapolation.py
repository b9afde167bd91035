"""Length extrapolation: validation loss per position bucket at multiples of the training length.

A model trained on rows of ``L`` tokens is evaluated on windows of ``f * L`` tokens (f = 1, 2, 4,
8) cut from single validation documents, so every position is a true in-document position and the
context is real text, not a concatenation of unrelated documents. The same windows serve every
factor (each truncated to ``f * L + 1`` tokens), so the first ``L`` positions see exactly the same
tokens at every factor: their loss must be identical (causal attention), and any change further out
is the effect of longer context and of unseen positions. ALiBi's claim (Press et al., 2022) is that
the loss stays flat or improves past ``L``; RoPE's usually rises.

    windows = document_windows(docs, length=8 * L + 1, max_windows=64, bos_id=1, eos_id=2)
    report = length_extrapolation(cfg, params, windows, train_len=L)   # per-bucket losses
"""

from __future__ import annotations

import functools
import json
from typing import Iterable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from baichuan_jax.model import BaichuanLM

DEFAULT_FACTORS = (1, 2, 4, 8)


def document_windows(docs: Iterable[Sequence[int]], length: int, max_windows: int, *,
                     bos_id: int = 1, eos_id: int = 2) -> np.ndarray:
  """Non-overlapping windows of `length` tokens, each inside one document.

  Each document becomes ``[bos] + tokens + [eos]`` (as the training loader sees it) and yields
  ``floor(len / length)`` consecutive windows; documents shorter than `length` are skipped.

  Args:
    docs: token-id sequences (no bos/eos), in a fixed order.
    length: tokens per window (inputs + 1 for the shifted target).
    max_windows: stop after this many windows.
  Returns:
    int32 [num_windows, length] (num_windows <= max_windows).
  Raises:
    ValueError: no document is long enough.
  """
  if length < 2 or max_windows < 1:
    raise ValueError(f"length must be >= 2 and max_windows >= 1, got {length}, {max_windows}")
  out, longest = [], 0
  for doc in docs:
    seq = np.concatenate([[bos_id], np.asarray(doc, np.int64), [eos_id]]).astype(np.int32)
    longest = max(longest, seq.size)
    for start in range(0, seq.size - length + 1, length):
      out.append(seq[start:start + length])
      if len(out) == max_windows:
        return np.stack(out)
  if not out:
    raise ValueError(f"no document has {length} tokens (with bos/eos); the longest has {longest}. "
                     "Lower the evaluation length or use a corpus with longer documents.")
  return np.stack(out)


@functools.lru_cache(maxsize=16)
def _nll_fn(cfg_json: str):
  cfg = ml_collections.ConfigDict(json.loads(cfg_json))
  model = BaichuanLM(cfg)

  @jax.jit
  def nll(params, tokens):
    # [batch, seq, vocab] fp32 logits -> [batch, seq] -log p(next token).
    logits = model.apply({"params": params}, tokens[:, :-1]).astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    tgt = jnp.take_along_axis(logits, tokens[:, 1:, None], axis=-1)[..., 0]
    return lse - tgt
  return nll


def per_position_loss(cfg: ml_collections.ConfigDict, params, windows: np.ndarray,
                      batch_size: int = 8) -> np.ndarray:
  """Mean next-token loss at each position over `windows`.

  Args:
    cfg: model config.
    params: model parameters.
    windows: int32 [n, T + 1]; position t predicts token t + 1 from tokens 0..t.
    batch_size: windows per forward pass (the last batch is padded by repeating a window and the
      padding rows are dropped).
  Returns:
    float64 [T] mean loss (nats) at each position.
  """
  windows = np.asarray(windows, np.int32)
  if windows.ndim != 2 or windows.shape[1] < 2:
    raise ValueError(f"windows must be [n, T+1] with T >= 1, got shape {windows.shape}")
  nll = _nll_fn(cfg.to_json())
  n = windows.shape[0]
  total = np.zeros(windows.shape[1] - 1, np.float64)
  for i in range(0, n, batch_size):
    chunk = windows[i:i + batch_size]
    real = chunk.shape[0]
    if real < batch_size:  # one compiled shape for every batch
      chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch_size - real, 0)])
    total += np.asarray(nll(params, jnp.asarray(chunk)), np.float64)[:real].sum(0)
  return total / n


def bucket_means(values: np.ndarray, bucket_len: int) -> np.ndarray:
  """Means of consecutive buckets of `bucket_len` positions ([T] -> [ceil(T / bucket_len)])."""
  values = np.asarray(values, np.float64)
  if bucket_len < 1:
    raise ValueError(f"bucket_len must be >= 1, got {bucket_len}")
  return np.array([values[i:i + bucket_len].mean() for i in range(0, values.size, bucket_len)])


def length_extrapolation(cfg: ml_collections.ConfigDict, params, windows: np.ndarray,
                         train_len: int, factors: Sequence[int] = DEFAULT_FACTORS,
                         bucket_len: int | None = None, batch_size: int = 8) -> dict:
  """Validation loss per position bucket at ``f * train_len`` tokens for each factor f.

  Args:
    cfg: model config (its position scheme is what is being measured).
    params: model parameters.
    windows: int32 [n, >= max(factors) * train_len + 1] in-document windows (`document_windows`).
    train_len: the training sequence length L.
    factors: evaluation lengths in units of L.
    bucket_len: positions per bucket (default L: bucket k covers positions [k L, (k+1) L)).
    batch_size: windows per forward pass.
  Returns:
    {"train_len", "bucket_len", "factors", "num_windows",
     "buckets": {f: [ceil(f L / bucket_len)] mean loss per bucket},
     "mean": {f: mean loss over all f L positions},
     "per_position": {f: [f L] mean loss per position}}
  """
  bucket_len = train_len if bucket_len is None else bucket_len
  need = max(factors) * train_len + 1
  if windows.shape[1] < need:
    raise ValueError(f"windows have {windows.shape[1]} tokens; factors up to {max(factors)} x "
                     f"train_len {train_len} need {need}")
  out = {"train_len": int(train_len), "bucket_len": int(bucket_len),
         "factors": [int(f) for f in factors], "num_windows": int(windows.shape[0]),
         "buckets": {}, "mean": {}, "per_position": {}}
  for f in factors:
    losses = per_position_loss(cfg, params, windows[:, :f * train_len + 1], batch_size)
    out["buckets"][int(f)] = bucket_means(losses, bucket_len).tolist()
    out["mean"][int(f)] = float(losses.mean())
    out["per_position"][int(f)] = losses.tolist()
  return out
