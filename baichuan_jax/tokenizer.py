"""SentencePiece tokenizer with the Baichuan special ids.

``Tokenizer(path)`` wraps a SentencePiece model: one trained by
``python -m baichuan_jax.data.tokenizer train`` or a released Baichuan ``tokenizer.model``.

Special ids follow Baichuan: ``<unk>``/pad = 0, ``<s>`` = 1, ``</s>`` = 2, and the chat-turn
markers ``user`` = 195, ``assistant`` = 196 (trained models reserve ids 3..194 as control pieces
``<reserved_N>`` so those two land where Baichuan has them). Control pieces are never produced from
text: encoding the string ``"<user>"`` gives ordinary pieces, so user text cannot forge a turn.

Exact round trip: with byte fallback every string decodes back to itself, except that SentencePiece
writes spaces as U+2581 (``▁``) and turns that character back into a space on decode. ``encode``
therefore emits a literal U+2581 as its three UTF-8 byte pieces, which decode to U+2581.
"""

from __future__ import annotations

import os
from typing import Sequence, overload

import sentencepiece as spm

PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
USER_ID, ASSISTANT_ID = 195, 196
_META = "\u2581"


class Tokenizer:
  """Batched encode/decode over a SentencePiece model with Baichuan's special ids."""

  def __init__(self, path: str | os.PathLike):
    path = os.fspath(path)
    if os.path.isdir(path):
      path = os.path.join(path, "tokenizer.model")
    if not os.path.exists(path):
      raise FileNotFoundError(f"tokenizer model not found: {path} (expected a SentencePiece "
                              "`.model` file or a directory holding `tokenizer.model`)")
    self.path = path
    self.sp = spm.SentencePieceProcessor(model_file=path)
    self._meta_bytes = None
    if self.sp.piece_to_id("<0xE2>") != self.sp.unk_id():
      self._meta_bytes = [self.sp.piece_to_id(f"<0x{b:02X}>") for b in _META.encode("utf-8")]

  # --- special ids ---------------------------------------------------------------------------
  @property
  def vocab_size(self) -> int:
    return self.sp.vocab_size()

  @property
  def pad_id(self) -> int:
    # Baichuan pads with id 0 (<unk>); SentencePiece's own pad id is unset in its models.
    return PAD_ID

  @property
  def bos_id(self) -> int:
    return BOS_ID

  @property
  def eos_id(self) -> int:
    return EOS_ID

  @property
  def user_id(self) -> int:
    return USER_ID

  @property
  def assistant_id(self) -> int:
    return ASSISTANT_ID

  def id_to_piece(self, i: int) -> str:
    """The vocabulary string of id ``i``."""
    if not 0 <= int(i) < self.vocab_size:
      raise ValueError(f"id {i} out of range [0, {self.vocab_size})")
    return self.sp.id_to_piece(int(i))

  def piece_to_id(self, piece: str) -> int:
    return self.sp.piece_to_id(piece)

  # --- encode / decode -----------------------------------------------------------------------
  def _encode_one(self, text: str) -> list[int]:
    if self._meta_bytes is None or _META not in text:
      return self.sp.encode(text)
    ids: list[int] = []
    for k, part in enumerate(text.split(_META)):
      if k:
        ids.extend(self._meta_bytes)
      if part:
        ids.extend(self.sp.encode(part))
    return ids

  @overload
  def encode(self, text: str, add_bos: bool = ..., add_eos: bool = ...) -> list[int]: ...
  @overload
  def encode(self, text: Sequence[str], add_bos: bool = ..., add_eos: bool = ...) -> list[list[int]]: ...

  def encode(self, text, add_bos=False, add_eos=False):
    """Text to ids.

    Args:
      text: a string or a list of strings.
      add_bos: prepend ``bos_id``.
      add_eos: append ``eos_id``.
    Returns:
      list[int] for a string, list[list[int]] for a list.
    """
    if isinstance(text, str):
      return self._wrap(self._encode_one(text), add_bos, add_eos)
    if not isinstance(text, (list, tuple)):
      raise TypeError(f"encode expects str or list[str], got {type(text).__name__}")
    out = []
    for i, t in enumerate(text):
      if not isinstance(t, str):
        raise TypeError(f"encode: item {i} is {type(t).__name__}, expected str")
      out.append(self._wrap(self._encode_one(t), add_bos, add_eos))
    return out

  @staticmethod
  def _wrap(ids, add_bos, add_eos):
    return ([BOS_ID] if add_bos else []) + list(ids) + ([EOS_ID] if add_eos else [])

  def decode(self, ids):
    """Ids to text; a list of id lists gives a list of strings. Special ids decode to ''."""
    if hasattr(ids, "tolist"):
      ids = ids.tolist()
    if len(ids) and isinstance(ids[0], (list, tuple)) or (len(ids) and hasattr(ids[0], "tolist")):
      return [self.decode(x) for x in ids]
    ids = [int(i) for i in ids]
    bad = [i for i in ids if not 0 <= i < self.vocab_size]
    if bad:
      raise ValueError(f"decode: ids {bad[:5]} out of range [0, {self.vocab_size})")
    return self.sp.decode(ids)

  def __len__(self) -> int:
    return self.vocab_size

  def __repr__(self) -> str:
    return f"Tokenizer({self.path!r}, vocab_size={self.vocab_size})"
