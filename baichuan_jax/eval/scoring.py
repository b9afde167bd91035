"""Option-letter scoring: batch prompts, read the next-token logits of each letter, pick the best.

The model is only seen through `score_fn(batch: TokenBatch) -> [batch, vocab]` next-token logits at
`batch.last_index` (so a stub with chosen logits tests the harness, and a real model can apply its
output head at one position instead of all of them). `from_sequence_logits` adapts a function that
returns full `[batch, seq, vocab]` logits.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Callable, Optional, Sequence

import numpy as np
from tqdm.auto import tqdm


@dataclasses.dataclass(frozen=True)
class TokenBatch:
  """A padded batch of token rows; padding has segment id 0 and never mixes with real tokens."""
  tokens: np.ndarray  # [batch, seq] int32
  positions: np.ndarray  # [batch, seq] int32, 0 at each row's first real token
  segment_ids: np.ndarray  # [batch, seq] int32: 1 = real token, 0 = padding
  last_index: np.ndarray  # [batch] int32 index of each row's last real token


ScoreFn = Callable[[TokenBatch], np.ndarray]


def pad_batch(rows: Sequence[Sequence[int]], pad_id: int, padding: str = "right",
              length: Optional[int] = None, batch_size: Optional[int] = None) -> TokenBatch:
  """Pads token rows to one [batch, length] array.

  Args:
    rows: token id sequences (non-empty).
    padding: "right" (real tokens first) or "left" (real tokens last, so every row ends at the same
      index). Positions count from each row's first real token either way.
    length: padded length (default: the longest row).
    batch_size: pad with all-padding rows up to this many rows (fixed shapes = fewer compiles).
  Returns:
    a `TokenBatch`.
  """
  if padding not in ("left", "right"):
    raise ValueError(f"padding={padding!r} is invalid: allowed 'left', 'right'")
  n = max(len(rows), batch_size or 0)
  length = length or max(len(r) for r in rows)
  tokens = np.full((n, length), pad_id, np.int32)
  seg = np.zeros((n, length), np.int32)
  pos = np.zeros((n, length), np.int32)
  last = np.zeros((n,), np.int32)
  for i, r in enumerate(rows):
    m = len(r)
    if m == 0 or m > length:
      raise ValueError(f"row {i} has {m} tokens; rows need 1..{length}")
    start = 0 if padding == "right" else length - m
    tokens[i, start:start + m] = r
    seg[i, start:start + m] = 1
    pos[i, start:start + m] = np.arange(m)
    last[i] = start + m - 1
  return TokenBatch(tokens, pos, seg, last)


def from_sequence_logits(fn: Callable[[TokenBatch], np.ndarray]) -> ScoreFn:
  """Turns `fn(batch) -> [batch, seq, vocab]` logits into a `ScoreFn` (gathers `last_index`)."""
  def score(batch: TokenBatch) -> np.ndarray:
    logits = np.asarray(fn(batch))
    return logits[np.arange(logits.shape[0]), batch.last_index]
  return score


def _bucket(n: int, multiple: int, cap: Optional[int]) -> int:
  m = -(-n // multiple) * multiple
  return max(n, min(m, cap)) if cap else m


def _log_softmax(logits: np.ndarray) -> np.ndarray:
  x = np.asarray(logits, np.float64)
  m = x.max(-1, keepdims=True)
  return x - (m + np.log(np.exp(x - m).sum(-1, keepdims=True)))


def letter_scores(prompts: Sequence[Sequence[int]], letter_conts: Sequence, score_fn: ScoreFn,
                  pad_id: int = 0, batch_size: int = 8, padding: str = "right",
                  bucket: int = 64, max_len: Optional[int] = None, progress: bool = True,
                  desc: str = "scoring") -> np.ndarray:
  """Log-probability of each option letter's tokens right after each prompt.

  A letter that is one token (the usual case) costs nothing extra: its score is the log-softmax of
  the prompt's next-token logits at that token. A letter of several tokens adds rows
  `prompt + first tokens` to read the later ones. Rows are sorted longest first (an
  out-of-memory shows up in the first batch), padded to a multiple of `bucket` tokens (capped at
  `max_len`) and to `batch_size` rows, so only a few shapes are compiled.

  Args:
    prompts: token ids per question.
    letter_conts: per letter, a token id or a tuple of token ids.
  Returns:
    [num_prompts, num_letters] float64 log-probabilities, in the order of `prompts`.
  """
  conts = [(c,) if isinstance(c, (int, np.integer)) else tuple(c) for c in letter_conts]
  prefixes = sorted({c[:k] for c in conts for k in range(len(c))}, key=len)
  rows, where = [], {}
  for i, p in enumerate(prompts):
    for pre in prefixes:
      where[i, pre] = len(rows)
      rows.append(tuple(p) + pre)
  logp = np.zeros((len(rows), max(max(c) for c in conts) + 1))
  order = sorted(range(len(rows)), key=lambda r: -len(rows[r]))
  for s in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch", disable=not progress,
                leave=False):
    idx = order[s:s + batch_size]
    chunk = [rows[r] for r in idx]
    length = _bucket(max(len(r) for r in chunk), bucket, max_len)
    batch = pad_batch(chunk, pad_id, padding, length=length, batch_size=batch_size)
    logits = np.asarray(score_fn(batch))[:len(idx)]  # [rows, vocab]
    logp[idx] = _log_softmax(logits)[:, :logp.shape[1]]
  out = np.zeros((len(prompts), len(conts)))
  for i in range(len(prompts)):
    for j, c in enumerate(conts):
      out[i, j] = sum(logp[where[i, c[:k]], c[k]] for k in range(len(c)))
  return out


def pick(scores: np.ndarray, num_options: Sequence[int]) -> np.ndarray:
  """Index of the best option per row; ties go to the lowest letter.

  Args:
    scores: [rows, letters] letter logits.
    num_options: options each row actually has (letters beyond it are ignored).
  Returns:
    [rows] int option indices.
  """
  scores = np.array(scores, np.float64)
  cols = np.arange(scores.shape[1])[None, :]
  scores[cols >= np.asarray(num_options)[:, None]] = -np.inf
  return np.argmax(scores, axis=1)  # argmax returns the first maximum: the lowest letter


def aggregate(records: Sequence[dict]) -> dict:
  """Accuracy per subject, per category and overall from per-question records.

  Args:
    records: dicts with `subject`, `category` and `correct` (bool); optionally `categories`, every
      category the subject counts in (CMMLU's China-specific subjects count in two).
  Returns:
    {"subjects": {s: {category, categories, correct, total, accuracy}}, "categories": {c: {correct,
    total, accuracy, subjects, macro_accuracy}}, "micro_accuracy" (over questions),
    "macro_accuracy" (mean of subject accuracies), "total", "correct"}. Accuracies with nothing to
    average are None (JSON null), never NaN.
  """
  by_subject = collections.OrderedDict()
  for r in records:
    d = by_subject.setdefault(r["subject"], {
        "category": r["category"], "categories": list(r.get("categories") or [r["category"]]),
        "correct": 0, "total": 0})
    d["correct"] += int(bool(r["correct"]))
    d["total"] += 1
  for d in by_subject.values():
    d["accuracy"] = d["correct"] / d["total"]
  cats = collections.OrderedDict()
  for s, d in sorted(by_subject.items()):
    for name in d["categories"]:
      c = cats.setdefault(name, {"correct": 0, "total": 0, "subjects": 0, "_accs": []})
      c["correct"] += d["correct"]
      c["total"] += d["total"]
      c["subjects"] += 1
      c["_accs"].append(d["accuracy"])
  for c in cats.values():
    c["accuracy"] = c["correct"] / c["total"]
    c["macro_accuracy"] = float(np.mean(c.pop("_accs")))
  total = sum(d["total"] for d in by_subject.values())
  correct = sum(d["correct"] for d in by_subject.values())
  return {
      "subjects": dict(sorted(by_subject.items())),
      "categories": dict(sorted(cats.items())),
      "total": total,
      "correct": correct,
      "micro_accuracy": correct / total if total else None,
      "macro_accuracy": float(np.mean([d["accuracy"] for d in by_subject.values()]))
      if by_subject else None,
  }
