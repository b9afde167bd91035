"""Deterministic, resumable packed loader over the tokenized corpus (Grain on TFDS ArrayRecord).

Pipeline (all Grain datasets; TensorFlow is never imported)::

    tfds.data_source(split)                      random access to tokenized documents
      -> DocumentStream   (MapDataset)           epoch e: weighted replication + seeded global
                                                 shuffle, then the process's strided shard;
                                                 epochs chained (infinite for train)
      -> map(to_example)                         [bos] + tokens + [eos] -> inputs = doc[:-1],
                                                 targets = doc[1:] (shifted inside the document)
      -> to_iter_dataset()
      -> PackIterDataset  (IterDataset)          concatenate-then-split into rows of seq_len
      -> Loader                                  stacks rows into int32 [batch, seq_len] batches

Batches are dicts of int32 numpy arrays ``[batch, seq_len]``: ``inputs``, ``targets``, ``positions``
(restart at 0 for every segment), ``segment_ids`` (1, 2, ... per segment within a row; 0 = padding),
``loss_mask`` (1 where a real target exists, i.e. ``segment_ids > 0``). Every token's target is the
next token of the same document, so no target crosses a document boundary and the last input of a
document predicts its ``eos``. A document longer than the room left in a row is split; the
continuation opens the next row as a new segment whose positions restart at 0 (as in MaxText's and
Grain's concat-then-split), so attention never sees past ``seq_len`` tokens.

Sampling weights: each document carries a ``weight`` (mixture x near-duplicate-cluster weight written
by the cleaning pipeline, 1.0 otherwise). In epoch ``e`` a document appears ``floor(w)`` times plus
once more with probability ``frac(w)`` (drawn from ``(seed, e)``), so the expected number of
appearances per epoch is ``w`` and weight-0 documents never appear. Validation ignores weights and
shuffling and reads each document exactly once.

State: ``Loader.get_state()`` is a small JSON-able dict (the Grain iterator state: the next document
index in the stream plus the token offset into a split document and the row being filled) and
``set_state`` resumes on exactly the next batch. The state also records the seed, shard and shapes;
restoring it into a loader built differently raises.

Multi-host: ``process_index``/``process_count`` (default ``jax.process_index()/process_count()``)
select a strided shard of each epoch's shuffled order, so processes with the same seed read disjoint
documents that together cover the epoch. In the finite validation pass the shards differ by at most
one document; batches are padded (all-padding rows) to the full batch size. With
``process_count > 1`` and ``num_batches`` set, every process yields exactly ``num_batches``
batches (all-padding ones after its shard ends), so collective evaluation steps stay in lockstep.
"""

from __future__ import annotations

import bisect
import json
import os
import sys
from pathlib import Path
from typing import Any

import grain
import numpy as np

from baichuan_jax.data import packing, tokenized

FIELDS = ("inputs", "targets", "positions", "segment_ids", "loss_mask")
STATE_VERSION = 1


class DocumentStream(grain.MapDataset):
  """Index ``i`` of the (possibly infinite) per-process stream of documents -> document record.

  Epoch ``e`` is the sequence ``shard(shuffle_e(replicate_e(range(num_docs))))``; epochs follow one
  another. ``len`` is ``sys.maxsize`` for an infinite stream (Grain's convention for repeat).
  """

  def __init__(self, parent: grain.MapDataset, weights: np.ndarray | None, *, seed: int,
               shuffle: bool, process_index: int, process_count: int, num_epochs: int | None):
    super().__init__(parent)
    self._n = len(parent)
    self._weights = None if weights is None else np.asarray(weights, np.float64)
    if self._weights is not None:
      if self._weights.shape != (self._n,):
        raise ValueError(f"weights: expected shape ({self._n},), got {self._weights.shape}")
      if not np.all(np.isfinite(self._weights)) or np.any(self._weights < 0):
        raise ValueError("weights: every document weight must be finite and >= 0")
      if np.all(self._weights == 1.0):
        self._weights = None  # uniform: skip the replication draw
    self._seed = int(seed)
    self._shuffle = shuffle
    self._pi, self._pc = int(process_index), int(process_count)
    self._num_epochs = num_epochs
    self._epoch_starts = [0]  # cumulative start index of each epoch computed so far
    self._cache: tuple[int, np.ndarray] | None = None

  def epoch_order(self, epoch: int) -> np.ndarray:
    """Document indices this process reads in ``epoch`` (int64 [n_e])."""
    if self._cache is not None and self._cache[0] == epoch:
      return self._cache[1]
    rng = np.random.default_rng([self._seed, epoch])
    if self._weights is None:
      order = np.arange(self._n, dtype=np.int64)
    else:
      base = np.floor(self._weights)
      extra = rng.random(self._n) < (self._weights - base)
      order = np.repeat(np.arange(self._n, dtype=np.int64), (base + extra).astype(np.int64))
    if self._shuffle:
      order = rng.permutation(order)
    order = order[self._pi::self._pc]
    self._cache = (epoch, order)
    return order

  def _locate(self, index: int) -> tuple[int, int]:
    # Extend the table of epoch starts until it covers index; epochs may differ in length when
    # weights are fractional.
    while index >= self._epoch_starts[-1]:
      e = len(self._epoch_starts) - 1
      if self._num_epochs is not None and e >= self._num_epochs:
        raise IndexError(index)
      n_e = len(self.epoch_order(e))
      if n_e == 0:
        raise ValueError("an epoch holds no documents for this process (all weights 0, or more "
                         "processes than documents)")
      self._epoch_starts.append(self._epoch_starts[-1] + n_e)
    e = bisect.bisect_right(self._epoch_starts, index) - 1
    return e, index - self._epoch_starts[e]

  def __len__(self) -> int:
    if self._num_epochs is None:
      return sys.maxsize
    if self._num_epochs == 0:
      return 0
    try:
      self._locate(2**62)
    except IndexError:
      pass
    return self._epoch_starts[min(self._num_epochs, len(self._epoch_starts) - 1)]

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    e, j = self._locate(int(index))
    return self._parent[int(self.epoch_order(e)[j])]

  def __str__(self) -> str:
    return (f"DocumentStream(docs={self._n}, seed={self._seed}, shuffle={self._shuffle}, "
            f"shard={self._pi}/{self._pc}, epochs={self._num_epochs})")


def to_example(record: dict, bos_id: int, eos_id: int) -> dict:
  """Document record -> shifted pair: inputs = [bos] + tokens, targets = tokens + [eos]."""
  toks = np.asarray(record["tokens"], np.int32)
  return {"inputs": np.concatenate([np.asarray([bos_id], np.int32), toks]),
          "targets": np.concatenate([toks, np.asarray([eos_id], np.int32)])}


class _PackIterator(grain.DatasetIterator):
  """Concatenate-then-split packing with a JSON-able state (see ``PackIterDataset``)."""

  def __init__(self, parent: grain.DatasetIterator, seq_len: int, pad_id: int):
    super().__init__(parent)
    self._seq_len = seq_len
    self._pad_id = pad_id
    self._cur: dict | None = None  # example being consumed
    self._cur_state: Any = None  # parent state *before* the current example
    self._offset = 0  # tokens of the current example already emitted
    self._exhausted = False

  def _next_example(self) -> bool:
    self._cur_state = self._parent.get_state()
    try:
      self._cur = next(self._parent)
    except StopIteration:
      self._cur = None
      self._exhausted = True
      return False
    self._offset = 0
    return True

  def __next__(self) -> dict:
    s = self._seq_len
    rows = packing.empty_rows(1, s, self._pad_id)
    filled, seg = 0, 0
    while filled < s:
      if self._cur is None or self._offset >= len(self._cur["inputs"]):
        if self._exhausted or not self._next_example():
          break
        continue
      n = min(len(self._cur["inputs"]) - self._offset, s - filled)
      seg += 1
      sl = slice(self._offset, self._offset + n)
      filled = packing.put_segment(rows, 0, filled, seg, self._cur["inputs"][sl],
                                   self._cur["targets"][sl])
      self._offset += n
    if filled == 0:
      raise StopIteration
    return {k: v[0] for k, v in rows.items()}

  def get_state(self) -> dict:
    # Resuming = restore the parent to just before the current example, re-read it, skip offset.
    if self._cur is None:
      return {"parent": self._parent.get_state(), "offset": 0, "exhausted": self._exhausted}
    return {"parent": self._cur_state, "offset": self._offset, "exhausted": False}

  def set_state(self, state: dict) -> None:
    self._parent.set_state(state["parent"])
    self._cur, self._cur_state, self._offset = None, None, 0
    self._exhausted = bool(state.get("exhausted", False))
    if state["offset"]:
      if not self._next_example():
        raise ValueError("loader state points past the end of the data")
      self._offset = int(state["offset"])


class PackIterDataset(grain.IterDataset):
  """Packs ``{"inputs","targets"}`` examples into rows of ``seq_len`` with positions/segment ids."""

  def __init__(self, parent: grain.IterDataset, seq_len: int, pad_id: int = 0):
    super().__init__(parent)
    if seq_len < 1:
      raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    self._seq_len = seq_len
    self._pad_id = pad_id

  def __iter__(self) -> _PackIterator:
    return _PackIterator(self._parent.__iter__(), self._seq_len, self._pad_id)

  def __str__(self) -> str:
    return f"PackIterDataset(seq_len={self._seq_len})"


class Loader:
  """Iterator of packed int32 batches with exact save/restore; see the module docstring.

  Args:
    dataset_path: a prepared tokenized dataset (``default_data().dataset_path``).
    split: ``"train"`` or ``"validation"``.
    batch_size: rows per batch *on this process*.
    seq_len: tokens per row.
    seed: shuffle/replication seed (same on all processes).
    process_index, process_count: this process's shard (default: from ``jax``).
    num_epochs: None = infinite (train default); validation defaults to 1.
    shuffle, use_weights: default True for train, False for validation.
    num_batches: stop after this many batches (None = until the data ends). With more than one
      process, exactly this many (empty batches follow the end of the shard).
    bos_id, eos_id, pad_id: special ids (Baichuan: 1, 2, 0).
    read_threads, prefetch: Grain reader threads and documents read ahead (0 threads = inline).
  Yields:
    dict of int32 [batch_size, seq_len]: inputs, targets, positions, segment_ids, loss_mask.
  """

  def __init__(self, dataset_path: str | os.PathLike, split: str = "train", *, batch_size: int,
               seq_len: int, seed: int = 0, process_index: int | None = None,
               process_count: int | None = None, num_epochs: int | None = -1,
               shuffle: bool | None = None, use_weights: bool | None = None,
               num_batches: int | None = None, bos_id: int = 1, eos_id: int = 2, pad_id: int = 0,
               read_threads: int = 2, prefetch: int = 64):
    if split not in tokenized.SPLITS:
      raise ValueError(f"split must be one of {tokenized.SPLITS}, got {split!r}")
    if batch_size < 1 or seq_len < 1:
      raise ValueError(f"batch_size and seq_len must be >= 1, got {batch_size}, {seq_len}")
    if process_index is None or process_count is None:
      import jax  # pylint: disable=import-outside-toplevel
      process_index = jax.process_index() if process_index is None else process_index
      process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
      raise ValueError(f"process_index must be in [0, process_count={process_count}), "
                       f"got {process_index}")
    train = split == "train"
    if num_epochs == -1:
      num_epochs = None if train else 1
    if num_epochs is not None and num_epochs < 0:
      raise ValueError(f"num_epochs must be None (infinite) or >= 0, got {num_epochs}")
    self.dataset_path = Path(dataset_path)
    self.split, self.batch_size, self.seq_len = split, int(batch_size), int(seq_len)
    self.seed, self.process_index, self.process_count = int(seed), process_index, process_count
    self.num_epochs, self.num_batches = num_epochs, num_batches
    self.shuffle = train if shuffle is None else shuffle
    self.use_weights = train if use_weights is None else use_weights
    self.bos_id, self.eos_id, self.pad_id = bos_id, eos_id, pad_id

    source = tokenized.open_split(self.dataset_path, split)
    weights = tokenized.read_index(self.dataset_path, split)["weights"] if self.use_weights \
        else None
    self.documents = DocumentStream(
        grain.MapDataset.source(source), weights, seed=self.seed, shuffle=self.shuffle,
        process_index=process_index, process_count=process_count, num_epochs=num_epochs)
    bos, eos = bos_id, eos_id
    examples = self.documents.map(lambda r: to_example(r, bos, eos))
    # A few reader threads hide ArrayRecord read latency; Grain's default (16 threads, 500 buffered
    # documents) spends more time on thread bookkeeping than on reading for short documents.
    read = grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=prefetch)
    self._rows = PackIterDataset(examples.to_iter_dataset(read), self.seq_len, pad_id).__iter__()
    self._batches = 0

  def _signature(self) -> dict:
    return {"split": self.split, "seed": self.seed, "batch_size": self.batch_size,
            "seq_len": self.seq_len, "process_index": self.process_index,
            "process_count": self.process_count, "shuffle": self.shuffle,
            "use_weights": self.use_weights, "num_epochs": self.num_epochs}

  def __iter__(self) -> "Loader":
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self.num_batches is not None and self._batches >= self.num_batches:
      raise StopIteration
    rows = []
    for _ in range(self.batch_size):
      try:
        rows.append(next(self._rows))
      except StopIteration:
        break
    if not rows and not (self.num_batches is not None and self.process_count > 1):
      raise StopIteration
    # Multi-process with num_batches: a process whose shard ran out keeps yielding empty batches
    # (loss_mask all 0) so every process runs the same number of collective steps.
    pad = self.batch_size - len(rows)
    batch = {k: np.stack([r[k] for r in rows]) if rows else np.zeros((0, self.seq_len), np.int32)
             for k in FIELDS}
    if pad:  # last batch of a finite pass: pad with empty rows
      for k in FIELDS:
        fill = self.pad_id if k in ("inputs", "targets") else 0
        batch[k] = np.concatenate([batch[k], np.full((pad, self.seq_len), fill, np.int32)])
    self._batches += 1
    return batch

  def get_state(self) -> dict:
    """JSON-able state; ``set_state`` of it resumes on exactly the next batch."""
    state = {"version": STATE_VERSION, "batches": self._batches, "rows": self._rows.get_state(),
             **self._signature()}
    return json.loads(json.dumps(state))  # plain lists/dicts/ints only

  def set_state(self, state: dict) -> None:
    """Restores a state from ``get_state`` (raises if it belongs to a differently built loader)."""
    if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
      raise ValueError(f"not a loader state (version {STATE_VERSION}): {str(state)[:200]}")
    mine = self._signature()
    diff = {k: (state.get(k), v) for k, v in mine.items() if state.get(k) != v}
    if diff:
      raise ValueError("loader state was saved by a loader with different settings "
                       + ", ".join(f"{k}: saved {a!r}, now {b!r}" for k, (a, b) in diff.items()))
    self._rows.set_state(state["rows"])
    self._batches = int(state["batches"])


def make_loader(dataset_path, split="train", **kwargs) -> Loader:
  """Shorthand for ``Loader(dataset_path, split, **kwargs)``."""
  return Loader(dataset_path, split, **kwargs)
