"""A small real corpus, tokenizer and tokenized dataset, built once per test process.

Uses the same code path as ``default_data`` (corpus build, tokenizer training, TFDS build) on a
subset: 120 documents per source and 60k characters of code, a 2,048-piece tokenizer.
"""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from pathlib import Path

SMALL_LIMIT = 120
SMALL_VOCAB = 2048


@functools.lru_cache(maxsize=None)
def small_data():
  """DataPaths of the small dataset (built on first call, deleted at interpreter exit)."""
  from baichuan_jax.data import corpus, default_data  # pylint: disable=import-outside-toplevel
  root = Path(tempfile.mkdtemp(prefix="bcjax-data-"))
  atexit.register(shutil.rmtree, root, True)
  # A 10% validation split keeps the validation pass long enough to span several batches.
  corpus.build(root / "small_corpus", limit=SMALL_LIMIT, validation_fraction=0.1,
               code_chars=60_000, progress=False)
  return default_data(vocab_size=SMALL_VOCAB, root=root, progress=False,
                      corpus_dir=root / "small_corpus")
