"""Packed rows: the one layout of a packed training batch, and the two ways rows are filled.

Every packed row, pretraining or SFT, is five int32 ``[seq_len]`` arrays (``ROW_KEYS``):

- ``inputs`` / ``targets``: the next-token pairs of each segment, laid end to end;
- ``positions``: 0, 1, ... restarting at each segment (the model's RoPE/ALiBi positions);
- ``segment_ids``: 1, 2, ... per segment in its row, 0 on padding (attention never crosses a
  segment, see ``model.attention``);
- ``loss_mask``: 1 where the target is trained, 0 on padding (SFT: only assistant targets).

Padding is ``pad_id`` in ``inputs``/``targets`` and 0 elsewhere. ``put_segment`` writes one segment
into a row; both packers call it:

- pretraining (``data.loader``): concatenate-then-split, streaming and resumable; a document that
  does not fit is cut and its continuation opens a new segment in the next row (no padding except
  at the end of the data);
- SFT (``align.sft_data.pack_examples``): ``first_fit`` over a window of open rows; a
  conversation is never cut (its loss mask would lose the answer), so rows end in padding.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

ROW_KEYS = ("inputs", "targets", "positions", "segment_ids", "loss_mask")


def empty_rows(n_rows: int, seq_len: int, pad_id: int = 0) -> dict[str, np.ndarray]:
  """``ROW_KEYS`` -> int32 [n_rows, seq_len], all padding."""
  rows = {k: np.zeros((n_rows, seq_len), np.int32) for k in ROW_KEYS}
  if pad_id:
    rows["inputs"][:] = pad_id
    rows["targets"][:] = pad_id
  return rows


def put_segment(rows: dict[str, np.ndarray], row: int, at: int, segment: int, inputs, targets,
                loss_mask: Optional[np.ndarray] = None) -> int:
  """Writes one segment at ``rows[*][row, at:at + n]``; returns ``at + n``.

  Args:
    rows: arrays from ``empty_rows``.
    row, at: the row and the first column of the segment.
    segment: its id in the row (1, 2, ...).
    inputs, targets: [n] token ids.
    loss_mask: [n] 0/1 (default: all 1).
  """
  n = len(inputs)
  sl = slice(at, at + n)
  rows["inputs"][row, sl] = inputs
  rows["targets"][row, sl] = targets
  rows["positions"][row, sl] = np.arange(n, dtype=np.int32)
  rows["segment_ids"][row, sl] = segment
  rows["loss_mask"][row, sl] = 1 if loss_mask is None else loss_mask
  return at + n


def first_fit(lengths: Sequence[int], seq_len: int, open_rows: int = 64) -> list[list[int]]:
  """Assigns items to rows of ``seq_len`` by first fit over the ``open_rows`` newest open rows.

  Args:
    lengths: the length of each item, each at most ``seq_len``.
    seq_len: row capacity.
    open_rows: how many partly filled rows stay candidates; more packs tighter.
  Returns:
    per row, the indices of its items in order.
  Raises:
    ValueError: an item longer than ``seq_len``.
  """
  rows: list[list[int]] = []
  fill: list[int] = []
  open_idx: list[int] = []
  for i, n in enumerate(lengths):
    if n > seq_len:
      raise ValueError(f"example of {n} tokens does not fit seq_len={seq_len}; truncate first")
    for j in open_idx:
      if fill[j] + n <= seq_len:
        rows[j].append(i)
        fill[j] += n
        break
    else:
      rows.append([i])
      fill.append(n)
      open_idx.append(len(rows) - 1)
      if len(open_idx) > open_rows:
        open_idx.pop(0)
  return rows
