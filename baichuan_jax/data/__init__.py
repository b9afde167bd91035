"""Data: embedded bilingual corpus, Baichuan-style tokenizer, tokenized TFDS dataset, packed loader.

    paths = default_data(vocab_size=4096)     # builds what is missing under ~/.cache/baichuan_jax
    loader = Loader(paths.dataset_path, "train", batch_size=8, seq_len=256, seed=0)
    batch = next(loader)                       # int32 [8, 256]: inputs, targets, positions, ...

Modules: ``corpus`` (the embedded corpus), ``clean`` / ``clean_config`` / ``filters`` /
``minhash`` / ``mixture`` (the cleaning pipeline), ``tokenized`` (the TFDS dataset), ``loader``
(the packed Grain loader) and ``cache`` (``default_data``: builds each missing piece once under
``~/.cache/baichuan_jax`` or ``$BAICHUAN_JAX_DATA``; see its docstring for the layout). The
tokenizer lives in ``baichuan_jax.tokenizer``; ``data.tokenizer`` is its CLI at the old path.
"""

from __future__ import annotations

from baichuan_jax.data.cache import (CLEAN_STAMP, ENV_VAR, DataPaths, default_corpus, default_data,
                                     default_root, ensure_clean, ensure_corpus, ensure_tokenized,
                                     ensure_tokenizer)

__all__ = ["CLEAN_STAMP", "DataPaths", "Loader", "default_corpus", "default_data", "default_root",
           "ensure_clean", "make_loader"]


def __getattr__(name):
  # The loader pulls in Grain (seconds to import); the corpus, tokenizer and cleaning CLIs that
  # live in this package should not pay for it.
  if name in ("Loader", "make_loader"):
    from baichuan_jax.data import loader  # pylint: disable=import-outside-toplevel
    return getattr(loader, name)
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
