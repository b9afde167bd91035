"""Shared pieces of the inference tests: a small Baichuan-layout SentencePiece model."""

import io
from pathlib import Path

import pydoc_data.topics
import sentencepiece as spm

CONTROLS = [f"<reserved_{i}>" for i in range(3, 195)] + ["<user>", "<assistant>"]


def train_sp_model(path: Path, vocab_size: int = 700) -> str:
  """Trains a BPE model laid out like Baichuan's tokenizer.model (<unk>/<s>/</s> = 0/1/2, control
  pieces 3..194, <user>/<assistant> = 195/196, byte fallback) on stdlib English docs; returns
  its path."""
  text = "".join(pydoc_data.topics.topics.values())[:60000].splitlines()
  buf = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter([t for t in text if t.strip()]), model_writer=buf,
      vocab_size=vocab_size, model_type="bpe", byte_fallback=True, control_symbols=CONTROLS,
      unk_id=0, bos_id=1, eos_id=2, pad_id=-1, hard_vocab_limit=False, minloglevel=2)
  path = Path(path)
  path.write_bytes(buf.getvalue())
  return str(path)
