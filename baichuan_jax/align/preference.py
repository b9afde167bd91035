"""Preference data for reward modelling: JSONL pairs, their token encoding and a balanced sampler.

A record is `{"prompt": str, "chosen": str, "rejected": str, "category": optional}`, where the
category is a taxonomy path of 1 to 3 levels, given as `"a/b/c"` or `["a", "b", "c"]` (Baichuan 2
balanced its reward-model prompts over a 3-level taxonomy of 6 / 30 / 200+ categories).
`CategoryBalancedSampler` draws records so that, at every level, each child category of the chosen
parent is equally likely, whatever the raw counts.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator, Optional, Sequence

import numpy as np

from baichuan_jax.records import ReadReport, RecordError, read_jsonl, require_str

MAX_CATEGORY_LEVELS = 3
TEMPLATES = ("chat", "plain")
UNCATEGORIZED = "(uncategorized)"
# A node that has records of its own besides child categories treats them as this extra child.
_DIRECT = "(direct)"


@dataclasses.dataclass(frozen=True)
class PreferencePair:
  """One comparison: `chosen` is preferred over `rejected` as a reply to `prompt`."""
  prompt: str
  chosen: str
  rejected: str
  category: tuple[str, ...] = ()


def validate_preference(obj: Any) -> PreferencePair:
  """Checks one decoded preference record.

  Raises:
    RecordError: not an object; `prompt` not a string; `chosen`/`rejected` missing, empty or equal;
      `category` not a path of 1-3 non-empty names.
  """
  if not isinstance(obj, dict):
    raise RecordError(f"record must be a JSON object, got {type(obj).__name__}")
  prompt = require_str(obj, "prompt", allow_empty=True)
  chosen = require_str(obj, "chosen")
  rejected = require_str(obj, "rejected")
  if chosen == rejected:
    raise RecordError("'chosen' and 'rejected' are identical: the pair carries no preference")
  return PreferencePair(prompt, chosen, rejected, parse_category(obj.get("category")))


def parse_category(value: Any) -> tuple[str, ...]:
  """A category path as a tuple of 0-3 names, from None, "a/b/c" or ["a", "b", "c"]."""
  if value is None:
    return ()
  if isinstance(value, str):
    parts = value.split("/")
  elif isinstance(value, list) and all(isinstance(p, str) for p in value):
    parts = value
  else:
    raise RecordError(f"field 'category'={value!r} is invalid: use \"a/b/c\" or [\"a\", \"b\", \"c\"]")
  parts = [p.strip() for p in parts]
  if not 1 <= len(parts) <= MAX_CATEGORY_LEVELS or not all(parts):
    raise RecordError(f"field 'category'={value!r} is invalid: 1 to {MAX_CATEGORY_LEVELS} "
                      "non-empty levels allowed")
  return tuple(parts)


def load_preferences(path: str, report: Optional[ReadReport] = None) -> list[PreferencePair]:
  """All valid pairs of a preference JSONL file (malformed lines logged with line number, skipped)."""
  return list(read_jsonl(path, validate_preference, report=report))


def encode_sequence(tok, prompt: str, response: str, max_len: int, template: str = "chat",
                    prompt_ids: Optional[Sequence[int]] = None) -> list[int]:
  """Token ids the reward model scores for (prompt, response); always ends with `</s>`.

  `chat`: `<user>` prompt `<assistant>` response `</s>` (Baichuan chat template).
  `plain`: `<s>` prompt response `</s>` (raw text, e.g. review continuation).
  Too long: the prompt is cut from the left (as at chat inference) to at most half of `max_len`,
  then the response is cut on the right; the final `</s>` is kept.

  Args:
    tok: tokenizer (`encode`, `bos_id`, `eos_id`, `user_id`, `assistant_id`).
    prompt, response: text.
    max_len: maximum number of ids.
    template: "chat" or "plain".
    prompt_ids: already-encoded prompt (overrides `prompt`), e.g. the prompt a policy was given.
  """
  if template not in TEMPLATES:
    raise ValueError(f"template={template!r} is invalid; allowed: {', '.join(TEMPLATES)}")
  p = list(prompt_ids) if prompt_ids is not None else (tok.encode(prompt) if prompt else [])
  r = tok.encode(response) if isinstance(response, str) else list(response)
  if template == "chat":
    head, mid = [tok.user_id], [tok.assistant_id]
  else:
    head, mid = [tok.bos_id], []
  fixed = len(head) + len(mid) + 1
  if fixed + len(p) + len(r) > max_len:
    p = p[-max(0, min(len(p), max_len // 2 - len(head) - len(mid))):] if p else p
    r = r[:max(0, max_len - fixed - len(p))]
  return head + p + mid + r + [tok.eos_id]


def pad_batch(seqs: Sequence[Sequence[int]], max_len: int, pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Right-padded tokens and a 1/0 mask, both int32 [len(seqs), max_len]."""
  tokens = np.full((len(seqs), max_len), pad_id, np.int32)
  mask = np.zeros((len(seqs), max_len), np.int32)
  for i, s in enumerate(seqs):
    if len(s) > max_len:
      raise ValueError(f"sequence {i} has {len(s)} tokens > max_len={max_len}")
    tokens[i, :len(s)] = s
    mask[i, :len(s)] = 1
  return tokens, mask


def encode_pairs(pairs: Sequence[PreferencePair], tok, max_len: int,
                 template: str = "chat") -> dict[str, np.ndarray]:
  """Token arrays for a list of pairs.

  Returns:
    dict of int32 [N, max_len]: `chosen`, `chosen_mask`, `rejected`, `rejected_mask`.
  """
  ch = [encode_sequence(tok, p.prompt, p.chosen, max_len, template) for p in pairs]
  rj = [encode_sequence(tok, p.prompt, p.rejected, max_len, template) for p in pairs]
  c, cm = pad_batch(ch, max_len, tok.pad_id)
  r, rm = pad_batch(rj, max_len, tok.pad_id)
  return {"chosen": c, "chosen_mask": cm, "rejected": r, "rejected_mask": rm}


class CategoryBalancedSampler:
  """Draws record indices balanced over a category taxonomy of up to 3 levels.

  Sampling walks the tree from the root: at each node it picks one child uniformly (records filed
  directly at an inner node form one extra child), then a record uniformly at the leaf reached. So
  each top-level category gets the same share, each sub-category the same share of its parent, and
  so on. Records without a category form the top-level category "(uncategorized)".
  """

  def __init__(self, categories: Sequence[tuple[str, ...]], seed: int = 0):
    if not categories:
      raise ValueError("CategoryBalancedSampler needs at least one record")
    self._tree: dict = {}
    for i, path in enumerate(categories):
      node = self._tree
      for name in (tuple(path) or (UNCATEGORIZED,)):
        node = node.setdefault(name, {})
      node.setdefault(_DIRECT, []).append(i)
    self._rng = np.random.default_rng(seed)

  def probabilities(self) -> np.ndarray:
    """Exact probability of drawing each record index, [num_records]."""
    n = sum(1 for _ in self._leaves(self._tree))
    probs = np.zeros(n)
    def walk(node, p):
      for key, child in node.items():
        share = p / len(node)
        if key == _DIRECT:
          probs[child] = share / len(child)
        else:
          walk(child, share)
    walk(self._tree, 1.0)
    return probs

  def _leaves(self, node) -> Iterator[int]:
    for key, child in node.items():
      if key == _DIRECT:
        yield from child
      else:
        yield from self._leaves(child)

  def sample(self, n: int) -> np.ndarray:
    """`n` record indices drawn with replacement, int64 [n]."""
    out = np.empty(n, np.int64)
    for j in range(n):
      node = self._tree
      while True:
        keys = list(node)
        key = keys[self._rng.integers(len(keys))]
        if key == _DIRECT:
          ids = node[key]
          out[j] = ids[self._rng.integers(len(ids))]
          break
        node = node[key]
    return out
