"""MinHash-LSH math for near-duplicate detection, vectorised in numpy.

Pure functions, no Beam: ``clean.py`` wraps them in transforms, ``benchmarks/dedup.py`` times them.

Pipeline for one collection of texts:

1. ``normalize``: lowercase, full-width ASCII folded, punctuation/symbols to spaces; every CJK
   character is its own unit, so Chinese shingles are character n-grams, English ones word n-grams.
2. ``shingle_hashes``: all n-unit shingles of a text as one ``uint64`` array. Unit and shingle hashes
   are polynomial hashes mod 2^64 computed with prefix sums (no Python loop over tokens), then mixed
   with the splitmix64 finaliser.
3. ``signatures``: ``num_perm`` universal hashes ``h_k(x) = (a_k * x + b_k) mod p``, p = 2^31 - 1
   (a Mersenne prime small enough that ``a * x + b`` is exact in uint64), broadcast over
   [num_perm, shingles] and min-reduced per document with ``np.minimum.reduceat``, so a batch of
   documents is one array operation. Signature rows are uint32.
4. ``band_keys``: the first ``bands * rows`` signature values, grouped into bands of ``rows`` values,
   each band hashed to one uint64 key. Documents sharing a key in any band are candidates.
5. ``candidate_pairs`` / ``verified_pairs``: candidates become edges only when the estimated Jaccard
   (fraction of equal signature values) reaches the threshold.
6. ``UnionFind`` / ``clusters``: connected components over verified edges, in process; each
   component keeps one representative chosen by a caller-supplied deterministic rank. (The Beam
   pipeline computes the same components distributed: ``clean.ConnectedComponents``.)

The probability that two documents with Jaccard ``s`` become candidates is ``1 - (1 - s^r)^b``;
``lsh_params`` picks (b, r) minimising the weighted false-positive/negative area like datasketch.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

MERSENNE_P = np.uint64((1 << 31) - 1)
_MASK64 = (1 << 64) - 1
# Odd 64-bit bases for the polynomial hashes (odd so the base is invertible mod 2^64).
_UNIT_BASE = 0x9E3779B97F4A7C15
_SHINGLE_BASE = 0xC2B2AE3D27D4EB4F
CJK_RANGES = ((0x3040, 0x30FF), (0x3400, 0x4DBF), (0x4E00, 0x9FFF), (0xF900, 0xFAFF),
               (0xAC00, 0xD7AF), (0x20000, 0x3FFFF))


def _word_table() -> np.ndarray:
  """[65536] bool: BMP code points that belong to a word (letters, digits, marks), as str.isalnum."""
  t = np.array([chr(c).isalnum() for c in range(0x10000)], dtype=bool)
  t[0xD800:0xE000] = False  # lone surrogates never reach here; keep the table total
  return t


_WORD = _word_table()


def _codepoints(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
  """Normalised code points of several texts joined by spaces, and each text's start offset.

  Normalisation: lowercase; full-width ASCII forms (U+FF01..FF5E, common in Chinese text such as
  "１９９８") folded to ASCII; every non-word character (punctuation, symbols, whitespace, "_")
  becomes a space. Done on the code-point array because ``unicodedata.normalize`` and
  ``str.translate`` cost ~0.35 us per character, several times the rest of the hashing.

  Returns:
    (cps [chars] uint32, starts [len(texts)] int64).
  """
  lowered = [t.lower() for t in texts]
  lens = np.fromiter((len(t) + 1 for t in lowered), dtype=np.int64, count=len(lowered))
  starts = np.concatenate(([0], np.cumsum(lens)[:-1])) if len(lowered) else lens
  cps = np.frombuffer(" ".join(lowered).encode("utf-32-le") + b" \0\0\0", dtype=np.uint32).copy()
  fw = (cps >= 0xFF01) & (cps <= 0xFF5E)
  cps[fw] -= 0xFEE0
  # Folded full-width capitals were lowercased as full-width letters already by str.lower.
  bmp = cps < 0x10000
  # Outside the BMP only the CJK extension planes count as words (emoji become spaces).
  word = (cps >= 0x20000) & (cps <= 0x3FFFF)
  word[bmp] = _WORD[cps[bmp]]
  cps[~word] = 32
  return cps, starts


def normalize(text: str) -> str:
  """The normalised text the shingles are built from, with single spaces (for inspection/tests).

  Args:
    text: raw text.
  Returns:
    e.g. ``"Hello, 世界! １９９８" -> "hello 世界 1998"``.
  """
  cps, _ = _codepoints([text])
  return " ".join(cps.tobytes().decode("utf-32-le").split())


def _is_cjk(cps: np.ndarray) -> np.ndarray:
  """[n] bool: code point in a CJK ideograph, kana or hangul block (one unit per character)."""
  m = np.zeros(cps.shape, dtype=bool)
  for lo, hi in CJK_RANGES:
    m |= (cps >= lo) & (cps <= hi)
  return m


def _splitmix64(x: np.ndarray) -> np.ndarray:
  """Bijective 64-bit finaliser: spreads polynomial hashes over all bits. uint64 in, uint64 out."""
  with np.errstate(over="ignore"):
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


_POW_CACHE: dict[int, np.ndarray] = {}


def _powers(base: int, n: int) -> np.ndarray:
  """[>= n + 1] uint64: base^0 .. base^n mod 2^64 (cumprod wraps mod 2^64), cached and grown."""
  cached = _POW_CACHE.get(base)
  if cached is None or cached.shape[0] <= n:
    size = max(n + 1, 1 << 16, 0 if cached is None else 2 * cached.shape[0])
    p = np.full(size, base, dtype=np.uint64)
    p[0] = 1
    cached = _POW_CACHE[base] = np.cumprod(p, dtype=np.uint64)
  return cached


def _window_hashes(values: np.ndarray, starts: np.ndarray, ends: np.ndarray, base: int) -> np.ndarray:
  """Polynomial hashes of values[s:e] for every (s, e), mod 2^64, without a loop.

  With prefix P[k] = sum_{j<k} v_j * base^(k-1-j), the window hash is P[e] - P[s] * base^(e-s).
  P itself is base^(k-1) * cumsum(v_j * base^-j); base^-1 exists mod 2^64 because base is odd.

  Args:
    values: [n] uint64.
    starts, ends: [m] int window bounds, 0 <= s < e <= n.
  Returns:
    [m] uint64.
  """
  n = values.shape[0]
  pw = _powers(base, n)
  ipw = _powers(pow(base, -1, 1 << 64), n)
  with np.errstate(over="ignore"):
    prefix = np.empty(n + 1, dtype=np.uint64)
    prefix[0] = 0
    # prefix[k] = base^(k-1) * sum_{j<k} v_j base^-j  (k >= 1)
    prefix[1:] = np.cumsum(values * ipw[:n], dtype=np.uint64) * pw[:n]
    return prefix[ends] - prefix[starts] * pw[ends - starts]


def window_hashes(values: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
  """Mixed hashes of the windows values[s:e] of a uint64 sequence ([m] uint64); e.g. n-grams."""
  return _splitmix64(_window_hashes(values, starts, ends, _SHINGLE_BASE))


def _units(cps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Unit bounds in a normalised code-point array: words, and every CJK character alone.

  Returns:
    (starts [u], ends [u]) int64 indices into ``cps``.
  """
  is_space = cps == 32
  cjk = _is_cjk(cps)
  brk = is_space | cjk
  prev_brk = np.concatenate(([True], brk[:-1]))
  next_brk = np.concatenate((brk[1:], [True]))
  starts = np.flatnonzero(~is_space & (prev_brk | cjk))
  ends = np.flatnonzero(~is_space & (next_brk | cjk)) + 1
  return starts, ends


def batch_shingle_hashes(texts: list[str], ngram: int) -> tuple[np.ndarray, np.ndarray]:
  """Shingle hashes of many texts in one vectorised pass.

  A shingle is ``ngram`` consecutive units (words or single CJK characters) of one text; a text
  with fewer than ``ngram`` units yields one shingle of all its units, so short texts still get a
  signature; a text with no units yields none. Duplicate shingles are kept (MinHash ignores them).

  Args:
    texts: documents.
    ngram: shingle size in units, >= 1.
  Returns:
    (hashes [total] uint64, counts [len(texts)] int64): text i owns the ``counts[i]`` hashes after
    ``sum(counts[:i])``.
  """
  if ngram < 1:
    raise ValueError(f"ngram must be >= 1, got {ngram}")
  if not texts:
    return np.zeros(0, dtype=np.uint64), np.zeros(0, dtype=np.int64)
  cps, text_starts = _codepoints(texts)
  u_start, u_end = _units(cps)
  unit_hash = _splitmix64(_window_hashes(cps.astype(np.uint64), u_start, u_end, _UNIT_BASE))
  # Units per text: the joining spaces guarantee no unit crosses two texts.
  owner = np.searchsorted(text_starts, u_start, side="right") - 1
  n_units = np.bincount(owner, minlength=len(texts))
  first = np.concatenate(([0], np.cumsum(n_units)[:-1]))
  width = np.minimum(ngram, n_units)
  counts = np.where(n_units > 0, np.maximum(n_units - ngram + 1, 1), 0)
  # Window starts: first[i] + 0 .. counts[i]-1 for every text, built without a loop.
  seg = np.repeat(np.arange(len(texts)), counts)
  offs = np.arange(seg.shape[0]) - np.repeat(np.cumsum(counts) - counts, counts)
  w_start = first[seg] + offs
  w_end = w_start + width[seg]
  return window_hashes(unit_hash, w_start, w_end), counts


def shingle_hashes(text: str, ngram: int) -> np.ndarray:
  """All ``ngram``-unit shingles of one text as a uint64 array (see ``batch_shingle_hashes``)."""
  return batch_shingle_hashes([text], ngram)[0]


@dataclass(frozen=True)
class Permutations:
  """``num_perm`` universal hash functions (a*x + b) mod p, seeded, as [num_perm, 1] uint64."""
  a: np.ndarray
  b: np.ndarray

  @property
  def num_perm(self) -> int:
    return self.a.shape[0]


def make_permutations(num_perm: int, seed: int = 1) -> Permutations:
  """Draws a in [1, p), b in [0, p) with numpy's PCG64 (same seed -> same signatures)."""
  if num_perm < 1:
    raise ValueError(f"num_perm must be >= 1, got {num_perm}")
  rng = np.random.default_rng(seed)
  p = int(MERSENNE_P)
  a = rng.integers(1, p, size=(num_perm, 1), dtype=np.uint64)
  b = rng.integers(0, p, size=(num_perm, 1), dtype=np.uint64)
  return Permutations(a, b)


def _permute_min(x: np.ndarray, offsets: np.ndarray, perms: Permutations) -> np.ndarray:
  """Per-segment minimum of (a*x + b) mod p. x [T] uint64 < p, offsets [D] segment starts."""
  # [num_perm, T]: a, x < 2^31 so a*x + b < 2^62 is exact in uint64. In-place ops and numpy's
  # division-by-constant path for % keep this near 10 ns per value on one core.
  y = perms.a * x[None, :]
  y += perms.b
  y %= MERSENNE_P
  # [num_perm, D] -> [D, num_perm]
  return np.minimum.reduceat(y, offsets, axis=1).T.astype(np.uint32)


def signatures_from_hashes(hashes: np.ndarray, counts: np.ndarray, perms: Permutations,
                           chunk_shingles: int = 1 << 13) -> np.ndarray:
  """MinHash signatures of many documents given their concatenated shingle hashes.

  Documents are processed in groups of about ``chunk_shingles`` shingles so the [num_perm, chunk]
  intermediate stays cache-sized (8 MiB at 128 x 2^13); a longer document is one group by itself.

  Args:
    hashes: [total] uint64 from ``batch_shingle_hashes``.
    counts: [docs] shingles per document.
    perms: from ``make_permutations``.
  Returns:
    [docs, num_perm] uint32. A document with no shingles gets the all-(2^32 - 1) row, which never
    matches a real signature value (those are < 2^31 - 1).
  """
  counts = np.asarray(counts, dtype=np.int64)
  out = np.full((counts.shape[0], perms.num_perm), np.iinfo(np.uint32).max, dtype=np.uint32)
  nonempty = np.flatnonzero(counts > 0)
  if nonempty.size == 0:
    return out
  x = hashes % MERSENNE_P
  ends = np.cumsum(counts)
  starts = ends - counts
  # Greedy grouping of consecutive non-empty documents by cumulative shingle count.
  group = (ends[nonempty] - 1) // chunk_shingles
  bounds = np.flatnonzero(np.diff(group)) + 1
  for g in np.split(nonempty, bounds):
    lo, hi = starts[g[0]], ends[g[-1]]
    out[g] = _permute_min(x[lo:hi], starts[g] - lo, perms)
  return out


def signatures(texts: list[str], perms: Permutations, ngram: int,
               batch_docs: int = 256) -> np.ndarray:
  """MinHash signatures of texts: ``batch_shingle_hashes`` then ``signatures_from_hashes``.

  Args:
    texts: documents.
    perms: from ``make_permutations``.
    ngram: shingle size in units.
    batch_docs: texts hashed per vectorised pass.
  Returns:
    [len(texts), num_perm] uint32.
  """
  parts = []
  for i in range(0, len(texts), batch_docs):
    h, c = batch_shingle_hashes(texts[i:i + batch_docs], ngram)
    parts.append(signatures_from_hashes(h, c, perms))
  if not parts:
    return np.zeros((0, perms.num_perm), dtype=np.uint32)
  return np.concatenate(parts)


def estimated_jaccard(sig_a: np.ndarray, sig_b: np.ndarray) -> np.ndarray:
  """Fraction of equal signature values. [..., num_perm] x [..., num_perm] -> [...] float64."""
  return np.mean(sig_a == sig_b, axis=-1)


def jaccard(a, b) -> float:
  """Exact Jaccard similarity of two sets (1.0 for two empty sets)."""
  a, b = set(a), set(b)
  if not a and not b:
    return 1.0
  return len(a & b) / len(a | b)


def collision_probability(s: float, bands: int, rows: int) -> float:
  """Probability that two documents with Jaccard ``s`` share at least one band: 1 - (1 - s^r)^b."""
  return 1.0 - (1.0 - s ** rows) ** bands


def lsh_params(threshold: float, num_perm: int, fp_weight: float = 0.5,
               fn_weight: float = 0.5) -> tuple[int, int]:
  """(bands, rows) with bands * rows <= num_perm minimising the weighted error area.

  False positives: integral of the collision probability below ``threshold``; false negatives:
  integral of its complement above. Same criterion as datasketch's MinHashLSH so the two are
  comparable at equal settings.
  """
  if not 0.0 < threshold < 1.0:
    raise ValueError(f"threshold must be in (0, 1), got {threshold}")
  grid_lo = np.linspace(0.0, threshold, 201)
  grid_hi = np.linspace(threshold, 1.0, 201)
  best, best_err = (1, num_perm), np.inf
  for b in range(1, num_perm + 1):
    for r in range(1, num_perm // b + 1):
      fp = np.trapezoid(1 - (1 - grid_lo ** r) ** b, grid_lo)
      fn = np.trapezoid((1 - grid_hi ** r) ** b, grid_hi)
      err = fp_weight * fp + fn_weight * fn
      if err < best_err - 1e-15:
        best, best_err = (b, r), err
  return best


def band_keys(sigs: np.ndarray, bands: int, rows: int) -> np.ndarray:
  """One uint64 key per (document, band).

  Args:
    sigs: [docs, num_perm] uint32 with num_perm >= bands * rows.
  Returns:
    [docs, bands] uint64; equal keys mean (up to 2^-64 collisions) equal band values.
  """
  if bands * rows > sigs.shape[1]:
    raise ValueError(f"bands * rows = {bands * rows} exceeds num_perm = {sigs.shape[1]}")
  # [docs, bands, rows]
  v = sigs[:, :bands * rows].reshape(sigs.shape[0], bands, rows).astype(np.uint64)
  with np.errstate(over="ignore"):
    key = np.zeros(v.shape[:2], dtype=np.uint64)
    for r in range(rows):  # rows is small (<= 32); the loop is over band positions, not tokens
      key = _splitmix64(key ^ v[:, :, r])
  return key


def bucket_edges(members: np.ndarray, max_pairs_bucket: int = 64) -> tuple[np.ndarray, np.ndarray]:
  """Candidate edges inside one LSH bucket.

  All pairs when the bucket has at most ``max_pairs_bucket`` members; above that (a template copied
  thousands of times) a star from the first member, which keeps the work linear while still
  connecting every true duplicate of the first member.

  Args:
    members: [k] sorted document indices sharing a band key.
  Returns:
    (left, right): [e] int64 each, left < right.
  """
  k = members.shape[0]
  if k <= max_pairs_bucket:
    i, j = np.triu_indices(k, 1)
    return members[i], members[j]
  return np.full(k - 1, members[0]), members[1:]


def candidate_pairs(keys: np.ndarray, max_pairs_bucket: int = 64) -> np.ndarray:
  """All distinct candidate pairs from band keys.

  Args:
    keys: [docs, bands] uint64 from ``band_keys``.
  Returns:
    [pairs, 2] int64, each row (i, j) with i < j, rows sorted.
  """
  n, nb = keys.shape
  lefts, rights = [], []
  for band in range(nb):
    col = keys[:, band]
    order = np.argsort(col, kind="stable")
    sorted_keys = col[order]
    # Runs of equal keys; only runs of length >= 2 matter.
    bounds = np.flatnonzero(np.diff(sorted_keys)) + 1
    starts = np.concatenate(([0], bounds))
    ends = np.concatenate((bounds, [n]))
    for s, e in zip(starts[ends - starts > 1], ends[ends - starts > 1]):
      l, r = bucket_edges(np.sort(order[s:e]), max_pairs_bucket)
      lefts.append(l)
      rights.append(r)
  if not lefts:
    return np.zeros((0, 2), dtype=np.int64)
  pairs = np.stack([np.concatenate(lefts), np.concatenate(rights)], axis=1).astype(np.int64)
  return np.unique(pairs, axis=0)


def verified_pairs(sigs: np.ndarray, pairs: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
  """Keeps candidate pairs whose estimated Jaccard reaches ``threshold``.

  Documents without shingles (all-(2^32 - 1) signature rows) never match anything.

  Returns:
    (pairs [e, 2] int64, similarity [e] float64) for the kept pairs.
  """
  if pairs.size == 0:
    return pairs, np.zeros(0)
  sim = estimated_jaccard(sigs[pairs[:, 0]], sigs[pairs[:, 1]])
  empty = sigs[:, 0] == np.iinfo(np.uint32).max
  keep = (sim >= threshold) & ~empty[pairs[:, 0]] & ~empty[pairs[:, 1]]
  return pairs[keep], sim[keep]


class UnionFind:
  """Disjoint sets over 0..n-1 with path halving; the root of a set is its smallest member."""

  def __init__(self, n: int):
    self.parent = list(range(n))

  def find(self, x: int) -> int:
    parent = self.parent
    while parent[x] != x:
      parent[x] = parent[parent[x]]
      x = parent[x]
    return x

  def union(self, a: int, b: int) -> None:
    ra, rb = self.find(a), self.find(b)
    if ra != rb:
      # Smaller root wins, so the result does not depend on edge order.
      if rb < ra:
        ra, rb = rb, ra
      self.parent[rb] = ra

  def roots(self) -> np.ndarray:
    return np.array([self.find(i) for i in range(len(self.parent))], dtype=np.int64)


def clusters(n: int, edges: np.ndarray, rank: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Connected components over verified edges and one representative per component.

  Args:
    n: number of documents.
    edges: [e, 2] int pairs.
    rank: [n] sort key; the member with the smallest rank (ties: smallest index) represents its
      component. Default: the index itself.
  Returns:
    (rep [n] int64: representative index of each document's cluster,
     size [n] int64: size of that cluster). ``rep[i] == i`` marks the documents to keep.
  """
  if n == 0:  # no documents (e.g. a shard without verified pairs): nothing to cluster
    return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
  uf = UnionFind(n)
  for a, b in np.asarray(edges, dtype=np.int64).reshape(-1, 2).tolist():
    uf.union(a, b)
  root = uf.roots()
  rank = np.arange(n) if rank is None else np.asarray(rank)
  # Sort by (root, rank, index); the first of each root's run is the representative.
  order = np.lexsort((np.arange(n), rank, root))
  first = np.concatenate(([True], root[order][1:] != root[order][:-1]))
  rep_of_root = np.empty(n, dtype=np.int64)
  rep_of_root[root[order][first]] = order[first]
  size = np.bincount(root, minlength=n)
  return rep_of_root[root], size[root]


def cluster_size_histogram(size: np.ndarray, rep: np.ndarray) -> dict[int, int]:
  """{cluster size: number of clusters of that size} over clusters with >= 2 members."""
  sizes = size[(rep == np.arange(rep.shape[0])) & (size > 1)]
  vals, counts = np.unique(sizes, return_counts=True)
  return {int(v): int(c) for v, c in zip(vals, counts)}


def deduplicate(texts: list[str], ngram: int = 5, num_perm: int = 128, bands: int | None = None,
                rows: int | None = None, threshold: float = 0.8, seed: int = 1,
                rank: np.ndarray | None = None) -> dict:
  """In-memory near-duplicate detection over a list of texts (benchmarks and small corpora).

  Args:
    texts: documents.
    ngram, num_perm, bands, rows, threshold, seed: MinHash-LSH settings; bands/rows default to
      ``lsh_params(threshold, num_perm)``.
    rank: optional [n] representative preference (smallest wins).
  Returns:
    dict with ``rep`` [n], ``size`` [n], ``keep`` [n] bool, ``pairs`` [e, 2] verified edges,
    ``candidates`` (number of candidate pairs), ``bands``, ``rows``.
  """
  if bands is None or rows is None:
    bands, rows = lsh_params(threshold, num_perm)
  perms = make_permutations(num_perm, seed)
  sigs = signatures(texts, perms, ngram)
  cand = candidate_pairs(band_keys(sigs, bands, rows))
  pairs, _ = verified_pairs(sigs, cand, threshold)
  rep, size = clusters(len(texts), pairs, rank)
  return {"rep": rep, "size": size, "keep": rep == np.arange(len(texts)), "pairs": pairs,
          "candidates": int(cand.shape[0]), "bands": bands, "rows": rows, "signatures": sigs}
