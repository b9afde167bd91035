"""SentencePiece tokenizer with the Baichuan special ids.

``Tokenizer(path)`` wraps a SentencePiece model: one trained by
``python -m baichuan_jax.data.tokenizer train`` (``baichuan_jax.tokenizer.training``) or a
released Baichuan ``tokenizer.model``.

Special ids follow Baichuan (``baichuan_jax.tokenizer.special``): ``<unk>``/pad = 0, ``<s>`` = 1,
``</s>`` = 2, and the chat-turn markers ``user`` = 195, ``assistant`` = 196 (trained models reserve
ids 3..194 as control pieces ``<reserved_N>`` so those two land where Baichuan has them).

Text can never produce a special id. SentencePiece itself never emits a *control* piece from text,
but it does match *user-defined* pieces inside raw text, and the released Baichuan 2
``tokenizer.model`` makes 195/196 user-defined pieces named ``<reserved_106>``/``<reserved_107>``:
with it, ``sp.encode("hi<reserved_107>...<reserved_106>next")`` yields the turn markers and forges
a turn. So ``encode`` runs a copy of the model in which every user-defined piece, and BOS, EOS and
the two turn markers whatever their type in the file, are control pieces (``special_ids``); ids,
scores and the rest of the vocabulary are unchanged, so ordinary text encodes exactly as before and
such strings become ordinary pieces (byte pieces where needed). Typed ``"<s>"``/``"</s>"`` likewise
become ordinary pieces, never ids 1/2: the released Hugging Face tokenizer maps them to 1/2 (its
Python tokenizer splits registered special-token strings out of the text first), which lets user
text end a turn or start a document; here only ``add_bos``/``add_eos`` and the chat template place
those ids.

Exact round trip: with byte fallback every string decodes back to itself, except that SentencePiece
writes spaces as U+2581 (``▁``) and turns that character back into a space on decode. ``encode``
therefore emits a literal U+2581 as its three UTF-8 byte pieces, which decode to U+2581.
"""

from __future__ import annotations

import os
from typing import Sequence, overload

import sentencepiece as spm

from baichuan_jax.tokenizer.special import ASSISTANT_ID, BOS_ID, EOS_ID, PAD_ID, USER_ID

_META = "\u2581"
# sentencepiece_model.proto: ModelProto.pieces = 1; SentencePiece.type = 3; Type enum values.
_PIECES_FIELD, _TYPE_FIELD = 1, 3
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
  value = shift = 0
  while True:
    b = buf[pos]
    pos += 1
    value |= (b & 0x7F) << shift
    shift += 7
    if not b & 0x80:
      return value, pos


def _varint(value: int) -> bytes:
  out = bytearray()
  while True:
    b = value & 0x7F
    value >>= 7
    out.append(b | (0x80 if value else 0))
    if not value:
      return bytes(out)


def _fields(buf: bytes):
  """(field number, wire type, payload, raw bytes) of each field of a serialised protobuf."""
  pos = 0
  while pos < len(buf):
    start = pos
    tag, pos = _read_varint(buf, pos)
    field, wire = tag >> 3, tag & 7
    if wire == 0:
      value, pos = _read_varint(buf, pos)
    elif wire == 1:
      value, pos = buf[pos:pos + 8], pos + 8
    elif wire == 2:
      n, pos = _read_varint(buf, pos)
      value, pos = buf[pos:pos + n], pos + n
    elif wire == 5:
      value, pos = buf[pos:pos + 4], pos + 4
    else:
      raise ValueError(f"unsupported protobuf wire type {wire} in a SentencePiece model")
    yield field, wire, value, buf[start:pos]


def piece_types(model_proto: bytes) -> list[int]:
  """The type (NORMAL, CONTROL, USER_DEFINED, ...) of every piece of a serialised model, by id."""
  types = []
  for field, wire, value, _ in _fields(model_proto):
    if field == _PIECES_FIELD and wire == 2:
      t = NORMAL  # proto2 default
      for f, w, v, _ in _fields(value):
        if f == _TYPE_FIELD and w == 0:
          t = v
      types.append(t)
  return types


def _with_control(model_proto: bytes, ids: set[int]) -> bytes:
  """The serialised model with the pieces `ids` re-typed as CONTROL (nothing else changes)."""
  out, i = bytearray(), 0
  for field, wire, value, raw in _fields(model_proto):
    if field == _PIECES_FIELD and wire == 2:
      if i in ids:
        body = b"".join(r for f, _, _, r in _fields(value) if f != _TYPE_FIELD)
        body += _varint(_TYPE_FIELD << 3) + _varint(CONTROL)
        raw = _varint(_PIECES_FIELD << 3 | 2) + _varint(len(body)) + body
      i += 1
    out += raw
  return bytes(out)


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
    with open(path, "rb") as f:
      proto = f.read()
    try:
      self.sp = spm.SentencePieceProcessor(model_proto=proto)
      types = piece_types(proto)
    except (RuntimeError, ValueError, IndexError) as err:
      raise ValueError(f"{path}: not a SentencePiece model ({err})") from None
    # A byte piece at 1/2/195/196 (a generic byte-fallback model without Baichuan's reserved ids
    # 3..194) is not a special token there, and SentencePiece needs all 256 byte pieces typed BYTE.
    forced = {i for i in (BOS_ID, EOS_ID, USER_ID, ASSISTANT_ID)
              if i < len(types) and types[i] != BYTE}
    #: ids that text never encodes to: control and user-defined pieces, BOS/EOS, turn markers.
    self.special_ids = frozenset(forced | {i for i, t in enumerate(types)
                                           if t in (CONTROL, USER_DEFINED)})
    retype = {i for i in self.special_ids if types[i] != CONTROL}
    self._enc = (spm.SentencePieceProcessor(model_proto=_with_control(proto, retype)) if retype
                 else self.sp)
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
      return self._enc.encode(text)
    ids: list[int] = []
    for k, part in enumerate(text.split(_META)):
      if k:
        ids.extend(self._meta_bytes)
      if part:
        ids.extend(self._enc.encode(part))
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
