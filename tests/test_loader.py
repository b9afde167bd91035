"""Packed loader: packing layout, exact resume, disjoint per-process shards, weights, default_data."""

from __future__ import annotations

import collections
import json

import grain
import numpy as np
import pytest

from baichuan_jax.data import corpus, loader as loader_lib, tokenized
from baichuan_jax.data.loader import DocumentStream, Loader
from baichuan_jax.tokenizer import Tokenizer
from tests.data_fixtures import small_data

SEQ = 64


@pytest.fixture(scope="module")
def data():
  return small_data()


def _reference_docs(paths, split):
  """Token sequences of a split, encoded straight from the corpus JSONL (not from the dataset)."""
  tok = Tokenizer(paths.tokenizer_path)
  texts = [r["text"] for r in corpus.read_jsonl(paths.corpus_dir / f"{split}.jsonl")]
  return [tuple([1] + ids + [2]) for ids in tok.encode(texts)]


def _segments(batches):
  """Splits packed rows into per-segment (inputs, targets, positions) pieces, checking the layout."""
  pieces = []
  for b in batches:
    for r in range(b["inputs"].shape[0]):
      seg = b["segment_ids"][r]
      np.testing.assert_array_equal(b["loss_mask"][r], (seg > 0).astype(np.int32))
      real = seg[seg > 0]
      # Segments are 1, 2, ... in order, contiguous, and padding only follows them.
      assert np.all(np.diff(real) >= 0) and np.all(np.diff(real) <= 1)
      assert real.size == 0 or real[0] == 1
      assert np.all(seg[real.size:] == 0) and np.all(b["inputs"][r][real.size:] == 0)
      for s in np.unique(real):
        idx = np.flatnonzero(seg == s)
        np.testing.assert_array_equal(b["positions"][r][idx], np.arange(idx.size))
        pieces.append((b["inputs"][r][idx], b["targets"][r][idx]))
  return pieces


def _documents(pieces):
  """Re-joins pieces into whole documents [bos] + tokens + [eos] (a piece ends a doc at eos)."""
  docs, cur = [], []
  for inp, tgt in pieces:
    # Targets are the inputs shifted by one inside the document.
    np.testing.assert_array_equal(inp[1:], tgt[:-1])
    if not cur:
      assert inp[0] == 1, "a document must start with bos"
    cur.append((inp, tgt))
    if tgt[-1] == 2:
      toks = np.concatenate([c[0] for c in cur] + [cur[-1][1][-1:]])
      # The targets alone rebuild the same document: no target crosses a piece boundary wrongly.
      np.testing.assert_array_equal(np.concatenate([[1]] + [c[1] for c in cur]), toks)
      docs.append(tuple(int(t) for t in toks))
      cur = []
  assert not cur, "the stream ended inside a document"
  return docs


def test_validation_pass_packs_every_document_once(data):
  batches = list(Loader(data.dataset_path, "validation", batch_size=3, seq_len=SEQ,
                        process_index=0, process_count=1))
  for b in batches:
    assert set(b) == set(loader_lib.FIELDS)
    for v in b.values():
      assert v.dtype == np.int32 and v.shape == (3, SEQ)
  docs = _documents(_segments(batches))
  assert collections.Counter(docs) == collections.Counter(_reference_docs(data, "validation"))
  # Concatenate-then-split leaves padding only at the very end of the pass.
  total = sum(len(d) - 1 for d in docs)
  assert sum(int(b["loss_mask"].sum()) for b in batches) == total
  assert len(batches) == -(-total // (3 * SEQ))


def test_hand_packed_rows():
  # Two documents of 3 and 6 tokens into rows of 5: [bos a b c] -> inputs bos a b c | targets a b c eos.
  docs = [{"tokens": np.array([10, 11, 12], np.int32)},
          {"tokens": np.array([20, 21, 22, 23, 24, 25], np.int32)}]
  ds = grain.MapDataset.source(docs).map(lambda r: loader_lib.to_example(r, 1, 2))
  rows = list(loader_lib.PackIterDataset(ds.to_iter_dataset(), 5))
  np.testing.assert_array_equal(rows[0]["inputs"], [1, 10, 11, 12, 1])
  np.testing.assert_array_equal(rows[0]["targets"], [10, 11, 12, 2, 20])
  np.testing.assert_array_equal(rows[0]["segment_ids"], [1, 1, 1, 1, 2])
  np.testing.assert_array_equal(rows[0]["positions"], [0, 1, 2, 3, 0])
  np.testing.assert_array_equal(rows[1]["inputs"], [20, 21, 22, 23, 24])
  np.testing.assert_array_equal(rows[1]["targets"], [21, 22, 23, 24, 25])
  np.testing.assert_array_equal(rows[1]["positions"], [0, 1, 2, 3, 4])
  np.testing.assert_array_equal(rows[2]["inputs"], [25, 0, 0, 0, 0])
  np.testing.assert_array_equal(rows[2]["targets"], [2, 0, 0, 0, 0])
  np.testing.assert_array_equal(rows[2]["loss_mask"], [1, 0, 0, 0, 0])
  assert len(rows) == 3


def _same(a, b):
  return all(np.array_equal(x[k], y[k]) for x, y in zip(a, b) for k in loader_lib.FIELDS)


def test_restored_iterator_yields_the_same_batches_across_epochs(data):
  kw = dict(batch_size=4, seq_len=SEQ, seed=3, process_index=0, process_count=1)
  tokens_per_epoch = int(tokenized.read_index(data.dataset_path, "train")["lengths"].sum())
  batches_per_epoch = tokens_per_epoch // (4 * SEQ)
  ref = Loader(data.dataset_path, "train", **kw)
  first = [next(ref) for _ in range(batches_per_epoch - 2)]
  state = json.loads(json.dumps(ref.get_state()))
  # Continue uninterrupted past the end of epoch 0 into epoch 1.
  rest = [next(ref) for _ in range(6)]
  restored = Loader(data.dataset_path, "train", **kw)
  restored.set_state(state)
  assert _same(rest, [next(restored) for _ in range(6)])
  # A fresh loader with the same seed repeats the run; another seed does not.
  again = Loader(data.dataset_path, "train", **kw)
  assert _same(first[:3], [next(again) for _ in range(3)])
  other = Loader(data.dataset_path, "train", **{**kw, "seed": 4})
  assert not _same(first[:3], [next(other) for _ in range(3)])
  assert ref.get_state()["batches"] == len(first) + 6


def test_state_from_other_settings_is_rejected(data):
  a = Loader(data.dataset_path, "train", batch_size=2, seq_len=SEQ, seed=0, process_index=0,
             process_count=1)
  next(a)
  b = Loader(data.dataset_path, "train", batch_size=2, seq_len=SEQ, seed=1, process_index=0,
             process_count=1)
  with pytest.raises(ValueError, match="seed: saved 0, now 1"):
    b.set_state(a.get_state())


def test_two_processes_see_disjoint_shards_covering_the_epoch(data):
  per_process = []
  for pi in range(2):
    ld = Loader(data.dataset_path, "train", batch_size=2, seq_len=SEQ, seed=7, process_index=pi,
                process_count=2, num_epochs=1)
    per_process.append(_documents(_segments(list(ld))))
  a, b = (collections.Counter(d) for d in per_process)
  assert not set(a) & set(b)
  assert a + b == collections.Counter(_reference_docs(data, "train"))
  assert abs(sum(a.values()) - sum(b.values())) <= 1


def test_epochs_reshuffle_and_shards_partition_each_epoch():
  n = 101
  parent = grain.MapDataset.source(list(range(n)))
  streams = [DocumentStream(parent, None, seed=5, shuffle=True, process_index=i, process_count=3,
                            num_epochs=None) for i in range(3)]
  for e in range(3):
    orders = [s.epoch_order(e) for s in streams]
    assert sorted(np.concatenate(orders).tolist()) == list(range(n))
  assert not np.array_equal(streams[0].epoch_order(0), streams[0].epoch_order(1))
  # Stream index i walks epoch 0 and then epoch 1.
  s0 = streams[0]
  n0 = len(s0.epoch_order(0))
  got = [s0[i] for i in range(n0 + 5)]
  assert got == s0.epoch_order(0).tolist() + s0.epoch_order(1)[:5].tolist()


def test_weights_set_expected_appearances_per_epoch():
  weights = np.array([0.0, 1.0, 2.5, 0.25])
  ds = DocumentStream(grain.MapDataset.source(list(range(4))), weights, seed=0, shuffle=True,
                      process_index=0, process_count=1, num_epochs=None)
  counts = np.array([np.bincount(ds.epoch_order(e), minlength=4) for e in range(2000)])
  assert counts[:, 0].max() == 0
  assert np.all(counts[:, 1] == 1)
  assert set(counts[:, 2].tolist()) == {2, 3}
  assert set(counts[:, 3].tolist()) == {0, 1}
  # Mean appearances match the weights (binomial standard error < 0.011 for 2000 epochs).
  np.testing.assert_allclose(counts.mean(0), weights, atol=0.05)
  with pytest.raises(ValueError, match=">= 0"):
    DocumentStream(grain.MapDataset.source([0, 1]), np.array([1.0, -1.0]), seed=0, shuffle=True,
                   process_index=0, process_count=1, num_epochs=None)


def test_default_data_reuses_complete_builds_and_ignores_partial_ones(data, tmp_path):
  from baichuan_jax.data import default_data  # pylint: disable=import-outside-toplevel
  root = data.tokenizer_path.parent.parent
  # A leftover temporary directory from an interrupted build is not a dataset.
  (root / "tokenized" / ".bc2048-dead.tmp-1-1").mkdir(parents=True)
  again = default_data(vocab_size=2048, root=root, progress=False, corpus_dir=data.corpus_dir)
  assert again.as_dict() == data.as_dict()
  assert again["dataset_path"] == data.dataset_path
  with pytest.raises(FileNotFoundError, match="lacks train.jsonl"):
    default_data(vocab_size=2048, root=root, progress=False, corpus_dir=tmp_path)


def test_dataset_stats_and_show_cli(data, capsys):
  ref = _reference_docs(data, "validation")
  st = tokenized.stats(data.dataset_path)["validation"]
  assert st["documents"] == len(ref)
  assert st["tokens"] == sum(len(d) - 2 for d in ref)  # stored without bos/eos
  assert st["weight_sum"] == len(ref)
  assert tokenized.main(["show", str(data.dataset_path), "--tokenizer", str(data.tokenizer_path),
                         "--split", "validation", "--rows", "2", "--seq-len", "32"]) == 0
  out = capsys.readouterr().out
  assert "row 0 segment 1 (" in out and "row 1 segment 1 (" in out


def test_multiprocess_validation_yields_num_batches_on_every_process(data):
  full = list(Loader(data.dataset_path, "validation", batch_size=2, seq_len=SEQ, process_index=0,
                     process_count=2))
  n = len(full) + 3
  for pi in range(2):
    got = list(Loader(data.dataset_path, "validation", batch_size=2, seq_len=SEQ, process_index=pi,
                      process_count=2, num_batches=n))
    assert len(got) == n
    if pi == 0:
      assert _same(got[:len(full)], full)
      assert all(int(b["loss_mask"].sum()) == 0 for b in got[len(full):])


def test_cleaned_corpus_weights_are_carried_and_sampled(data, tmp_path):
  weights = [0.0, 1.0, 2.0, 3.0]
  texts = [f"文档{i}号：" + "内容" * (i + 3) for i in range(len(weights))]
  cdir = tmp_path / "cleaned"
  cdir.mkdir()
  with open(cdir / "train.jsonl", "w", encoding="utf-8") as f:
    for i, (t, w) in enumerate(zip(texts, weights)):
      f.write(json.dumps({"id": f"zh_news-{i}", "text": t, "source": "zh_news", "weight": w},
                         ensure_ascii=False) + "\n")
  (cdir / "validation.jsonl").write_text(
      json.dumps({"id": "zh_news-v", "text": "验证", "source": "zh_news"}) + "\n", encoding="utf-8")
  path = tokenized.build_tokenized(cdir, data.tokenizer_path, tmp_path / "tfds", progress=False)
  src = tokenized.open_split(path, "train")
  stored = {src[i]["id"].decode(): float(src[i]["weight"]) for i in range(len(src))}
  assert stored == {f"zh_news-{i}": w for i, w in enumerate(weights)}
  assert tokenized.read_index(path, "validation")["weights"].tolist() == [1.0]
  # One epoch with integer weights: document i appears exactly weight_i times.
  tok = Tokenizer(data.tokenizer_path)
  ref = {tuple([1] + tok.encode(t) + [2]): w for t, w in zip(texts, weights)}
  docs = _documents(_segments(list(Loader(path, "train", batch_size=2, seq_len=16, seed=0,
                                          process_index=0, process_count=1, num_epochs=1))))
  assert collections.Counter(docs) == {d: int(w) for d, w in ref.items() if w}

  with open(cdir / "train.jsonl", "a", encoding="utf-8") as f:
    f.write(json.dumps({"id": "zh_news-bad", "text": "坏", "source": "zh_news", "weight": -1}) + "\n")
  with pytest.raises(ValueError, match="'zh_news-bad': weight=-1 is invalid"):
    tokenized.build_tokenized(cdir, data.tokenizer_path, tmp_path / "tfds2", progress=False)


def test_default_corpus_is_cleaned_once_and_rebuilt_when_the_raw_corpus_changes(data, tmp_path):
  import json  # pylint: disable=import-outside-toplevel,reimported
  import shutil  # pylint: disable=import-outside-toplevel
  from baichuan_jax.data import CLEAN_STAMP, ensure_clean  # pylint: disable=import-outside-toplevel
  raw = tmp_path / "corpus"
  shutil.copytree(data.corpus_dir, raw)
  clean = ensure_clean(raw, tmp_path, progress=False)
  assert clean == tmp_path / "corpus_clean"
  report = json.loads((clean / "clean_report.json").read_text())
  for split in ("train", "validation"):
    n_raw = sum(1 for _ in open(raw / f"{split}.jsonl", encoding="utf-8"))
    out = [json.loads(l) for l in open(clean / f"{split}.jsonl", encoding="utf-8")]
    assert 0 < len(out) <= n_raw
    assert sum(report["stats"][f"out/docs/{split}"].values()) == len(out)
    assert all(r["weight"] > 0 and r["cluster_size"] >= 1 for r in out)
  assert sum(report["stats"]["in/docs"].values()) == sum(
      1 for s in ("train", "validation") for _ in open(raw / f"{s}.jsonl", encoding="utf-8"))
  # A second call finds the stamp and does not rebuild.
  stamp = (clean / CLEAN_STAMP).stat().st_mtime_ns
  assert ensure_clean(raw, tmp_path, progress=False) == clean
  assert (clean / CLEAN_STAMP).stat().st_mtime_ns == stamp
  # A changed raw corpus is cleaned again: one more document goes in.
  n_in = sum(report["stats"]["in/docs"].values())
  key = json.loads((clean / CLEAN_STAMP).read_text())["key"]
  doc = {"id": "added-1", "text": "One more document, so that the raw corpus hash changes.",
         "lang": "en", "source": "en_prose", "category": "prose"}
  with open(raw / "train.jsonl", "a", encoding="utf-8") as f:
    f.write(json.dumps(doc) + "\n")
  ensure_clean(raw, tmp_path, progress=False)
  report = json.loads((clean / "clean_report.json").read_text())
  assert sum(report["stats"]["in/docs"].values()) == n_in + 1
  assert json.loads((clean / CLEAN_STAMP).read_text())["key"] != key
  assert not [p for p in tmp_path.iterdir() if p.name.startswith(".corpus_clean")]
