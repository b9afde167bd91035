"""Shared fixtures for the alignment tests: a character-level tokenizer with Baichuan's special ids."""


class CharTokenizer:
  """One id per character (ids from 300 up), with Baichuan's pad/bos/eos/user/assistant ids."""
  pad_id, bos_id, eos_id, user_id, assistant_id = 0, 1, 2, 195, 196

  def __init__(self, vocab_size: int = 4096):
    self.vocab_size = vocab_size
    self._ids: dict[str, int] = {}

  def encode(self, text, add_bos=False, add_eos=False):
    if isinstance(text, list):
      return [self.encode(t, add_bos, add_eos) for t in text]
    ids = [self._ids.setdefault(c, 300 + len(self._ids)) for c in text]
    assert max(ids, default=0) < self.vocab_size
    return ([self.bos_id] if add_bos else []) + ids + ([self.eos_id] if add_eos else [])

  def decode(self, ids):
    inv = {v: k for k, v in self._ids.items()}
    return "".join(inv.get(i, "") for i in ids)
