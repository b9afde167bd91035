"""Shared pieces of the interop tests: a SentencePiece model laid out like the released Baichuan 2
`tokenizer.model`, whose turn markers are user-defined pieces."""

import io
from pathlib import Path

import pydoc_data.topics
import sentencepiece as spm

# Ids 3..194 control pieces; 195/196 user-defined `<reserved_106>`/`<reserved_107>` as in the
# released Baichuan 2 tokenizer; 197 one more user-defined piece.
CONTROLS = [f"<ctl_{i}>" for i in range(3, 195)]
USER_DEFINED = ["<reserved_106>", "<reserved_107>", "<reserved_108>"]


def train_released_like(path: Path, vocab_size: int = 800) -> str:
  """Trains (about a second) a byte-fallback BPE model with that layout; returns its path."""
  text = "".join(pydoc_data.topics.topics.values())[:60000].splitlines()
  buf = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter([t for t in text if t.strip()]), model_writer=buf,
      vocab_size=vocab_size, model_type="bpe", byte_fallback=True, control_symbols=CONTROLS,
      user_defined_symbols=USER_DEFINED, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
      hard_vocab_limit=False, split_digits=True, normalization_rule_name="identity",
      add_dummy_prefix=False, remove_extra_whitespaces=False, minloglevel=2)
  path = Path(path)
  path.write_bytes(buf.getvalue())
  return str(path)
