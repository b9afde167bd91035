"""MinHash-LSH math: hashes against plain-Python references, Jaccard estimates, planted duplicates."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from baichuan_jax.data import minhash as mh


def test_normalize_folds_width_case_and_punctuation():
  assert mh.normalize("Hello, 世界! ＡＢＣ１２ foo_bar 😀") == "hello 世界 abc12 foo bar"


def test_window_hashes_match_python_polynomial():
  rng = np.random.default_rng(0)
  vals = rng.integers(0, 2**63, size=40, dtype=np.uint64)
  starts = np.array([0, 3, 10, 39, 5])
  ends = np.array([1, 9, 40, 40, 5 + 30])
  got = mh._window_hashes(vals, starts, ends, mh._SHINGLE_BASE)  # pylint: disable=protected-access
  for s, e, g in zip(starts, ends, got):
    h = 0
    for v in vals[s:e].tolist():  # Horner's rule with Python integers, reduced mod 2^64
      h = (h * mh._SHINGLE_BASE + v) % (1 << 64)  # pylint: disable=protected-access
    assert int(g) == h


def test_shingles_count_and_equality():
  # Units: a b c a b c -> bigrams ab bc ca ab bc: 5 shingles, 3 distinct.
  h = mh.shingle_hashes("a b c a b c", 2)
  assert h.shape == (5,)
  assert len(set(h.tolist())) == 3
  assert h[0] == h[3] and h[1] == h[4]
  # Each CJK character is a unit: 4 characters, trigrams -> 2 shingles.
  assert mh.shingle_hashes("我爱北京", 3).shape == (2,)
  # Fewer units than the shingle size: one shingle; no units: none.
  assert mh.shingle_hashes("hi there", 5).shape == (1,)
  assert mh.shingle_hashes("... !!!", 5).shape == (0,)
  # Batched hashing gives the same hashes as one text at a time.
  texts = ["a b c a b c", "", "我爱北京天安门", "x"]
  h, counts = mh.batch_shingle_hashes(texts, 2)
  np.testing.assert_array_equal(counts, [5, 0, 6, 1])
  np.testing.assert_array_equal(h, np.concatenate([mh.shingle_hashes(t, 2) for t in texts]))


def test_signatures_match_naive_minimum():
  perms = mh.make_permutations(16, seed=3)
  texts = ["the cat sat on the mat", "a b", "", "一二三四五六"]
  hashes, counts = mh.batch_shingle_hashes(texts, 2)
  sigs = mh.signatures_from_hashes(hashes, counts, perms, chunk_shingles=3)
  p = (1 << 31) - 1
  offset = 0
  for i, c in enumerate(counts):
    xs = [int(x) % p for x in hashes[offset:offset + c]]
    offset += c
    for k in range(16):
      a, b = int(perms.a[k, 0]), int(perms.b[k, 0])
      want = min(((a * x + b) % p for x in xs), default=2**32 - 1)
      assert int(sigs[i, k]) == want


def _word_doc(rng, vocab, n):
  return " ".join(vocab[rng.integers(0, len(vocab), n)])


def test_estimated_jaccard_tracks_exact_jaccard():
  rng = np.random.default_rng(1)
  perms = mh.make_permutations(256, seed=7)
  errors = []
  for overlap in (0.0, 0.2, 0.5, 0.8, 0.95):
    # Two sets of distinct words sharing a controlled fraction.
    universe = [f"w{i}" for i in range(2000)]
    order = rng.permutation(len(universe))
    a = [universe[i] for i in order[:300]]
    shared = int(300 * overlap)
    b = a[:shared] + [universe[i] for i in order[300:600 - shared]]
    exact = mh.jaccard(a, b)
    sig = mh.signatures([" ".join(a), " ".join(b)], perms, ngram=1)
    est = float(mh.estimated_jaccard(sig[0], sig[1]))
    errors.append(abs(est - exact))
    # std of the estimate is sqrt(J(1-J)/256) <= 0.031; 0.1 is over 3 sigma.
    assert abs(est - exact) < 0.1, (overlap, exact, est)
  assert np.mean(errors) < 0.04


def test_lsh_params_and_collision_curve():
  # datasketch 2.0's MinHashLSH(threshold=0.8, num_perm=128) also picks b=9, r=13.
  assert mh.lsh_params(0.8, 128) == (9, 13)
  b, r = mh.lsh_params(0.5, 64)
  assert b * r <= 64
  assert mh.collision_probability(0.9, 9, 13) > 0.9
  assert mh.collision_probability(0.3, 9, 13) < 0.01
  with pytest.raises(ValueError, match="threshold"):
    mh.lsh_params(1.5, 128)


def test_union_find_clusters_and_representatives():
  # Components {0,1,2}, {3,4}, {5}; rank prefers 2 in the first component.
  rank = np.array([5, 3, 0, 9, 1, 4])
  rep, size = mh.clusters(6, np.array([[0, 1], [1, 2], [4, 3]]), rank)
  np.testing.assert_array_equal(rep, [2, 2, 2, 4, 4, 5])
  np.testing.assert_array_equal(size, [3, 3, 3, 2, 2, 1])
  assert mh.cluster_size_histogram(size, rep) == {2: 1, 3: 1}
  # Edge order does not change the result.
  rep2, _ = mh.clusters(6, np.array([[3, 4], [2, 1], [1, 0]]), rank)
  np.testing.assert_array_equal(rep, rep2)


def test_bucket_edges_all_pairs_then_star():
  l, r = mh.bucket_edges(np.array([2, 5, 7]), max_pairs_bucket=4)
  assert sorted(zip(l.tolist(), r.tolist())) == [(2, 5), (2, 7), (5, 7)]
  l, r = mh.bucket_edges(np.arange(10), max_pairs_bucket=4)
  assert list(zip(l.tolist(), r.tolist())) == [(0, i) for i in range(1, 10)]


def test_planted_near_duplicates_are_found():
  rng = np.random.default_rng(2)
  vocab = np.array([f"tok{i}" for i in range(5000)])
  base = [_word_doc(rng, vocab, 200) for _ in range(150)]
  texts, planted = list(base), set()
  # 15 planted copies with 1% of words replaced: shingle Jaccard ~0.9, where 14 bands x 9 rows
  # make a pair a candidate with probability 1 - (1 - 0.9^9)^14 > 0.999.
  for i in range(0, 150, 10):
    words = base[i].split()
    for j in rng.choice(len(words), 2, replace=False):
      words[j] = vocab[rng.integers(0, len(vocab))]
    planted.add((i, len(texts)))
    texts.append(" ".join(words))
  res = mh.deduplicate(texts, ngram=5, num_perm=128, threshold=0.7)
  found = {tuple(p) for p in res["pairs"].tolist()}
  assert found == planted
  # Exactly the copies are dropped; each original (earlier index) is kept.
  assert set(np.flatnonzero(~res["keep"]).tolist()) == {b for _, b in planted}
  assert mh.cluster_size_histogram(res["size"], res["rep"]) == {2: 15}


def test_empty_documents_never_match():
  res = mh.deduplicate(["!!!", "???", "real words here and there"], ngram=2, threshold=0.5)
  assert res["keep"].all()


@settings(max_examples=50, deadline=None)
@given(st.lists(st.text(alphabet=st.sampled_from(list("ab c,中文 ！Ａ１") + ["😀", "\n"]),
                        max_size=30), max_size=6))
def test_batching_does_not_change_hashes(texts):
  h, counts = mh.batch_shingle_hashes(texts, 3)
  singles = [mh.shingle_hashes(t, 3) for t in texts]
  np.testing.assert_array_equal(counts, [x.size for x in singles])
  np.testing.assert_array_equal(h, np.concatenate(singles) if singles else np.zeros(0, np.uint64))
