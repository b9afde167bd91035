"""Perplexity and bits per byte of a language model on a JSONL text file.

bits/byte = (sum over every text token of -log2 p(token | preceding tokens)) / (UTF-8 bytes of the
text). Each document is tokenized with a leading BOS so its first token is scored too; documents
longer than the context are scored in windows of at most `max_len` inputs that advance by `stride`
new targets, each target scored once with up to `max_len - stride` earlier tokens as extra context.
Unlike per-token perplexity, bits per byte compares models with different tokenizers.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import numpy as np
from tqdm.auto import tqdm

from baichuan_jax.eval.scoring import TokenBatch, pad_batch
from baichuan_jax.records import iter_jsonl

log = logging.getLogger(__name__)

# nll_fn(batch, targets [batch, seq] int32) -> [batch, seq] float negative log-likelihood (nats).
NllFn = Callable[[TokenBatch, np.ndarray], np.ndarray]


def nll_from_logits(fn: Callable[[TokenBatch], np.ndarray]) -> NllFn:
  """Adapts `fn(batch) -> [batch, seq, vocab]` logits into an `NllFn` (log-softmax in float64)."""
  def nll(batch: TokenBatch, targets: np.ndarray) -> np.ndarray:
    logits = np.asarray(fn(batch), np.float64)
    m = logits.max(-1, keepdims=True)
    lse = m[..., 0] + np.log(np.exp(logits - m).sum(-1))
    return lse - np.take_along_axis(logits, targets[..., None], -1)[..., 0]
  return nll


def read_texts(path) -> Iterator[tuple[int, str]]:
  """Yields (line, text) from a JSONL file with a `text` field; bad lines are logged and skipped."""
  path = Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"perplexity: text file {path} does not exist")
  for line, rec in iter_jsonl(path, on_bad=lambda bad, _: log.warning("skipping %s", bad)):
    text = rec.get("text") if isinstance(rec, dict) else None
    if not isinstance(text, str):
      log.warning("skipping %s:%d: no string 'text' field", path, line)
      continue
    if text:
      yield line, text


def windows(ids: Sequence[int], max_len: int, stride: int):
  """Splits one BOS-led token sequence into scoring windows.

  Args:
    ids: [n] token ids, ids[0] the BOS (never a target).
    max_len: most input tokens per window.
    stride: new targets per window (1..max_len).
  Returns:
    list of (inputs, targets, first) with `first` the index in the window of the first target
    that has not been scored before; every ids[1:] token is scored exactly once.
  """
  if not 1 <= stride <= max_len:
    raise ValueError(f"stride={stride} is invalid: must be in 1..max_len={max_len}")
  n = len(ids)
  out = []
  a = 1  # first target index not scored yet
  while a < n:
    b = min(a + stride, n)
    s = max(0, b - 1 - max_len)
    out.append((list(ids[s:b - 1]), list(ids[s + 1:b]), a - s - 1))
    a = b
  return out


def evaluate_text(texts: Sequence[str], encode: Callable[[str], list], bos_id: int, nll_fn: NllFn,
                  max_len: int, stride: Optional[int] = None, batch_size: int = 4,
                  pad_id: int = 0, bucket: int = 64, progress: bool = True) -> dict:
  """Bits per byte, bits per token and token perplexity of `texts`.

  Args:
    texts: documents.
    encode: text -> token ids (no BOS).
    nll_fn: see `NllFn`.
    max_len: model context (inputs per window).
    stride: new targets per window (default max_len: no overlap beyond the one-token shift).
    bucket: windows are padded to a multiple of this (capped at max_len) to bound recompiles.
  Returns:
    dict with documents, tokens (scored), bytes, nll_nats, bits_per_byte, bits_per_token,
    perplexity (exp of mean token NLL) and bytes_per_token.
  """
  stride = stride or max_len
  jobs = []
  n_bytes = n_tokens = 0
  for text in texts:
    ids = [bos_id] + list(encode(text))
    n_bytes += len(text.encode("utf-8"))
    n_tokens += len(ids) - 1
    jobs.extend(windows(ids, max_len, stride))
  jobs.sort(key=lambda j: -len(j[0]))
  total = 0.0
  scored = 0
  for s in tqdm(range(0, len(jobs), batch_size), desc="perplexity", unit="batch",
                disable=not progress, leave=False):
    chunk = jobs[s:s + batch_size]
    length = min(-(-max(len(j[0]) for j in chunk) // bucket) * bucket, max_len)
    batch = pad_batch([j[0] for j in chunk], pad_id, "right", length=length, batch_size=batch_size)
    targets = pad_batch([j[1] for j in chunk], pad_id, "right", length=length,
                        batch_size=batch_size).tokens
    nll = np.asarray(nll_fn(batch, targets), np.float64)
    for i, (inp, _, first) in enumerate(chunk):
      total += float(nll[i, first:len(inp)].sum())
      scored += len(inp) - first
  assert scored == n_tokens, (scored, n_tokens)
  return {
      "documents": len(texts),
      "tokens": n_tokens,
      "bytes": n_bytes,
      "nll_nats": total,
      "bits_per_byte": total / math.log(2) / n_bytes if n_bytes else float("nan"),
      "bits_per_token": total / math.log(2) / n_tokens if n_tokens else float("nan"),
      "perplexity": math.exp(total / n_tokens) if n_tokens else float("nan"),
      "bytes_per_token": n_bytes / n_tokens if n_tokens else float("nan"),
      "max_len": max_len,
      "stride": stride,
  }
