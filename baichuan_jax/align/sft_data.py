"""Supervised fine-tuning data: chat JSONL -> Baichuan chat-template tokens with assistant-only loss.

A record is `{"messages": [{"role": "user"|"assistant"|"system", "content": str}, ...]}`.
Rendering follows Baichuan 2's released fine-tuning recipe: each user turn is `<user>`(195) + text,
each assistant turn `<assistant>`(196) + text, and the conversation ends with `</s>`(eos). No `</s>`
is written between turns (the released chat template does not put one in the history either), but
the last token of every assistant reply is trained to predict `</s>`, so the model learns to stop at
the end of its own turn. An optional leading system message is plain text with no control token and
no loss.

Loss is on exactly the positions whose target is an assistant token or the end-of-turn `</s>`;
everything the user (or system) wrote, and the control tokens that the chat template supplies at
inference, carry no loss. Examples are packed into fixed-length rows with segment ids (attention never
crosses segments) and positions that restart per example.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Iterator, Optional, Protocol, Sequence

import numpy as np

from baichuan_jax.data.packing import empty_rows, first_fit, put_segment
from baichuan_jax.records import ReadReport, RecordError, read_jsonl, require_str

_LOG = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")


class TextEncoder(Protocol):
  """What rendering needs from a tokenizer (`baichuan_jax.tokenizer.Tokenizer` satisfies it)."""
  eos_id: int
  user_id: int
  assistant_id: int

  def encode(self, text: str) -> list[int]:
    ...


@dataclasses.dataclass(frozen=True)
class ChatExample:
  """One rendered conversation: next-token inputs, targets and loss mask, all [n] int32."""
  tokens: np.ndarray
  targets: np.ndarray
  loss_mask: np.ndarray

  def __len__(self) -> int:
    return int(self.tokens.shape[0])


def validate_chat(obj: Any) -> list[dict[str, str]]:
  """Checks one decoded chat record and returns its messages.

  Raises:
    RecordError: not an object with a `messages` list of {role, content}; an unknown role; a system
      message that is not first; turns that do not alternate user/assistant starting with user; no
      assistant turn at the end.
  """
  if not isinstance(obj, dict):
    raise RecordError(f"record must be a JSON object, got {type(obj).__name__}")
  msgs = obj.get("messages")
  if not isinstance(msgs, list) or not msgs:
    raise RecordError("field 'messages' must be a non-empty list of {role, content} objects")
  out = []
  for i, m in enumerate(msgs):
    if not isinstance(m, dict):
      raise RecordError(f"messages[{i}] must be an object with 'role' and 'content'")
    role = m.get("role")
    if role not in ROLES:
      raise RecordError(f"messages[{i}].role={role!r} is invalid; allowed: {', '.join(ROLES)}")
    try:
      content = require_str(m, "content", allow_empty=(role == "system"))
    except RecordError as e:
      raise RecordError(f"messages[{i}]: {e}") from None
    if role == "system" and i != 0:
      raise RecordError(f"messages[{i}]: a system message may only come first")
    out.append({"role": role, "content": content})
  turns = [m["role"] for m in out if m["role"] != "system"]
  for i, role in enumerate(turns):
    want = "user" if i % 2 == 0 else "assistant"
    if role != want:
      raise RecordError(f"turn {i} has role {role!r} but turns must alternate user/assistant, "
                        "starting with user")
  if not turns or turns[-1] != "assistant":
    raise RecordError("the conversation must end with an assistant turn (nothing to learn otherwise)")
  return out


def render_chat(messages: Sequence[dict[str, str]], tok: TextEncoder) -> ChatExample:
  """Renders validated messages into next-token training arrays.

  Args:
    messages: output of `validate_chat`.
    tok: tokenizer with `encode`, `eos_id`, `user_id`, `assistant_id`.
  Returns:
    ChatExample with tokens/targets/loss_mask of length n = (rendered length) - 1.
  """
  seq: list[int] = []
  # labels[i] is what position i-1 must predict (None: no loss there), aligned with `seq`.
  labels: list[Optional[int]] = []
  prev_assistant = False
  for m in messages:
    ids = list(tok.encode(m["content"])) if m["content"] else []
    if m["role"] == "system":
      seq += ids
      labels += [None] * len(ids)
    elif m["role"] == "user":
      seq += [tok.user_id] + ids
      # Where an assistant reply ends, the model must predict </s>, not <user>.
      labels += [tok.eos_id if prev_assistant else None] + [None] * len(ids)
    else:
      seq += [tok.assistant_id] + ids
      labels += [None] + ids
    prev_assistant = m["role"] == "assistant"
  seq.append(tok.eos_id)
  labels.append(tok.eos_id)
  tokens = np.asarray(seq[:-1], np.int32)
  mask = np.asarray([lab is not None for lab in labels[1:]], np.int32)
  targets = np.asarray([lab if lab is not None else s for lab, s in zip(labels[1:], seq[1:])],
                       np.int32)
  return ChatExample(tokens, targets, mask)


@dataclasses.dataclass
class SFTStats:
  """What happened to the records on their way to examples."""
  records: int = 0
  truncated: int = 0
  dropped_no_loss: int = 0
  loss_tokens: int = 0
  tokens: int = 0


def load_chat_examples(path: str, tok: TextEncoder, max_len: int,
                       report: Optional[ReadReport] = None,
                       stats: Optional[SFTStats] = None) -> list[ChatExample]:
  """Reads a chat JSONL file into rendered examples of at most `max_len` tokens.

  Malformed lines are logged with their line number and skipped (see `records.read_jsonl`).
  Longer conversations are cut at `max_len`; one left with no assistant token is dropped (counted).
  """
  stats = stats if stats is not None else SFTStats()
  out = []
  for msgs in read_jsonl(path, validate_chat, report=report):
    ex = render_chat(msgs, tok)
    stats.records += 1
    if len(ex) > max_len:
      stats.truncated += 1
      ex = ChatExample(ex.tokens[:max_len], ex.targets[:max_len], ex.loss_mask[:max_len])
    if ex.loss_mask.sum() == 0:
      stats.dropped_no_loss += 1
      continue
    stats.loss_tokens += int(ex.loss_mask.sum())
    stats.tokens += len(ex)
    out.append(ex)
  if stats.truncated or stats.dropped_no_loss:
    _LOG.warning("%s: %d conversations truncated to %d tokens, %d dropped with no assistant token "
                 "left", path, stats.truncated, max_len, stats.dropped_no_loss)
  return out


def pack_examples(examples: Sequence[ChatExample], seq_len: int,
                  open_rows: int = 64) -> dict[str, np.ndarray]:
  """Packs examples into rows of `seq_len` tokens (first fit over a window of open rows).

  The row layout is `data.packing`'s, shared with the pretraining loader; conversations are never
  split across rows.

  Args:
    examples: each at most `seq_len` long.
    seq_len: row length.
    open_rows: how many partly filled rows are kept open for first fit; more packs tighter.
  Returns:
    dict of int32 [rows, seq_len] arrays `inputs`, `targets`, `positions`, `segment_ids`
    (1, 2, ... per example in its row; 0 = padding) and `loss_mask` (0 on padding).
  """
  rows = first_fit([len(ex) for ex in examples], seq_len, open_rows)
  out = empty_rows(len(rows), seq_len)
  for r, row in enumerate(rows):
    at = 0
    for s, i in enumerate(row, start=1):
      ex = examples[i]
      at = put_segment(out, r, at, s, ex.tokens, ex.targets, ex.loss_mask)
  return out


def batches(packed: dict[str, np.ndarray], batch_size: int, seed: int,
            epochs: Optional[int] = None) -> Iterator[dict[str, np.ndarray]]:
  """Shuffled batches of packed rows, reshuffled each epoch (forever when `epochs` is None).

  The last partial batch of an epoch is filled with empty rows (segment 0, loss mask 0), so every
  example is seen exactly once per epoch and shapes stay static for jit.
  """
  n = packed["inputs"].shape[0]
  if n == 0:
    raise ValueError("no packed rows: the SFT data produced no examples")
  rng = np.random.default_rng(seed)
  epoch = 0
  while epochs is None or epoch < epochs:
    order = rng.permutation(n)
    for i in range(0, n, batch_size):
      idx = order[i:i + batch_size]
      batch = {k: v[idx] for k, v in packed.items()}
      if len(idx) < batch_size:
        pad = batch_size - len(idx)
        batch = {k: np.concatenate([v, np.zeros((pad, v.shape[1]), v.dtype)]) for k, v in batch.items()}
      yield batch
    epoch += 1
