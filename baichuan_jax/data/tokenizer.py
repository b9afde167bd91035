"""The tokenizer-training CLI at its old path: the code lives in ``baichuan_jax.tokenizer.training``.

``python -m baichuan_jax.data.tokenizer train|report ...`` and ``from baichuan_jax.data import
tokenizer`` keep working.
"""

import sys

from baichuan_jax.tokenizer.training import (  # noqa: F401  (re-exports)
    BAICHUAN_COVERAGE, CHUNK_CHARS, CONTROL_SYMBOLS, MAX_PIECE_LEN, MIN_COVERAGE, N_RESERVED,
    SLICES, USER_DEFINED, chunk_text, compression, fit_character_coverage, main, read_texts, report,
    train)

if __name__ == "__main__":
  sys.exit(main())
