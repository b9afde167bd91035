"""Tokenizers: the runtime SentencePiece ``Tokenizer``, training, and the Baichuan special ids.

- ``special``: the special ids (pad/bos/eos 0/1/2, user/assistant 195/196), defined once.
- ``runtime``: ``Tokenizer(path)``, batched encode/decode where text never encodes to a special id.
- ``training``: training Baichuan-style SentencePiece BPE models and the compression report
  (``python -m baichuan_jax.tokenizer.training train ...``, also reachable as
  ``python -m baichuan_jax.data.tokenizer``).
"""

from baichuan_jax.tokenizer.special import (ASSISTANT_ID, BOS_ID, EOS_ID, FIRST_RESERVED_ID,
                                            PAD_ID, USER_ID)
from baichuan_jax.tokenizer.runtime import (BYTE, CONTROL, NORMAL, UNKNOWN, UNUSED, USER_DEFINED,
                                            Tokenizer, piece_types)

__all__ = ["ASSISTANT_ID", "BOS_ID", "EOS_ID", "FIRST_RESERVED_ID", "PAD_ID", "USER_ID", "BYTE",
           "CONTROL", "NORMAL", "UNKNOWN", "UNUSED", "USER_DEFINED", "Tokenizer", "piece_types"]
