"""Settings of the cleaning pipeline (`baichuan_jax.data.clean`): `default_config()` and `validate()`.

Kept apart from the Beam pipeline so that code which only needs the settings (e.g. checking
whether a cached cleaned corpus is still current, `baichuan_jax.data.ensure_clean`) does not
import Apache Beam.
"""

from __future__ import annotations

import ml_collections

from baichuan_jax.data import filters, mixture

SPLITS = ("train", "validation")


def _dedup_config(ngram: int, num_perm: int, threshold: float) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.enabled = True
  # Shingle size in units (words / single CJK characters).
  c.ngram = ngram
  # Number of MinHash permutations (signature length).
  c.num_perm = num_perm
  # LSH bands x rows; 0 = choose by minimising false positive + negative area at `threshold`.
  c.bands = 0
  c.rows = 0
  # Estimated Jaccard at or above which a candidate pair is a near-duplicate.
  c.threshold = threshold
  # Seed of the permutation parameters (a, b).
  c.seed = 1
  # Buckets larger than this emit a star of edges from their first member instead of all pairs.
  c.max_pairs_bucket = 64
  return c


def default_config() -> ml_collections.ConfigDict:
  """All cleaning settings: quality rules, document/sentence dedup, weights, output."""
  c = ml_collections.ConfigDict()
  c.filters = filters.default_config()
  # Document-level near-duplicates: character/word 5-grams, 128 permutations, Jaccard 0.8
  # (the usual setting of text-dedup / datatrove for web documents).
  c.dedup = _dedup_config(ngram=5, num_perm=128, threshold=0.8)
  # Sentence-level near-duplicates: shorter shingles for short texts, fewer permutations.
  c.sentence_dedup = _dedup_config(ngram=3, num_perm=64, threshold=0.8)
  # Sentences shorter than this (non-space characters) are never removed as duplicates: "谢谢！"
  # repeats across documents without being boilerplate.
  c.sentence_dedup.min_chars = 15
  # Languages whose documents are split into sentences (code is not).
  c.sentence_dedup.langs = ("zh", "en")
  c.mixture = mixture.default_config()
  # Input splits; each reads <corpus>/<split>*.jsonl.
  c.splits = SPLITS
  # Output files per split (1 -> <split>.jsonl, the layout the tokenizer and loader read).
  c.num_shards = 1
  return c


def validate(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Validates every section; raises ValueError naming the field, value and what is allowed."""
  filters.validate(cfg.filters)
  mixture.validate(cfg.mixture)
  for name in ("dedup", "sentence_dedup"):
    d = cfg[name]
    for f in ("ngram", "num_perm"):
      if not isinstance(d[f], int) or d[f] < 1:
        raise ValueError(f"{name}.{f} = {d[f]!r} is invalid; allowed: an integer >= 1")
    for f in ("bands", "rows", "max_pairs_bucket"):
      if not isinstance(d[f], int) or d[f] < 0:
        raise ValueError(f"{name}.{f} = {d[f]!r} is invalid; allowed: an integer >= 0")
    if (d.bands == 0) != (d.rows == 0):
      raise ValueError(f"{name}.bands = {d.bands}, {name}.rows = {d.rows}: set both or neither (0)")
    if d.bands * d.rows > d.num_perm:
      raise ValueError(f"{name}.bands * {name}.rows = {d.bands * d.rows} exceeds "
                       f"{name}.num_perm = {d.num_perm}")
    if not isinstance(d.threshold, (int, float)) or not 0.0 < d.threshold < 1.0:
      raise ValueError(f"{name}.threshold = {d.threshold!r} is invalid; allowed: a number in (0, 1)")
  if not isinstance(cfg.sentence_dedup.min_chars, int) or cfg.sentence_dedup.min_chars < 1:
    raise ValueError(f"sentence_dedup.min_chars = {cfg.sentence_dedup.min_chars!r} is invalid; "
                     "allowed: an integer >= 1")
  if not cfg.splits or any(not isinstance(s, str) or not s for s in cfg.splits):
    raise ValueError(f"splits = {cfg.splits!r} is invalid; allowed: a non-empty tuple of names")
  if not isinstance(cfg.num_shards, int) or cfg.num_shards < 1:
    raise ValueError(f"num_shards = {cfg.num_shards!r} is invalid; allowed: an integer >= 1")
  return cfg
