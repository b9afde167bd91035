"""Embedded corpus: tag stripping, deterministic build and split, manifest counts, bad input."""

from __future__ import annotations

import collections
import json

import pytest

from baichuan_jax.data import corpus
from tests.data_fixtures import SMALL_LIMIT, small_data


def test_strip_pos_tags_hand_example():
  line = "19980101-01-001-002/m  中共中央/nt  总书记/n  、/w  [国家/n  主席/n]nt  江/nr  泽民/nr"
  assert corpus.strip_pos_tags(line) == "19980101-01-001-002中共中央总书记、国家主席江泽民"
  assert corpus.strip_pos_tags("") == ""


def _records(d, split):
  return list(corpus.read_jsonl(d / f"{split}.jsonl"))


def test_build_is_deterministic_and_counts_match(tmp_path):
  paths = small_data()
  again = tmp_path / "again"
  m = corpus.build(again, limit=SMALL_LIMIT, validation_fraction=0.1, code_chars=60_000,
                   progress=False)
  for split in ("train", "validation"):
    assert (again / f"{split}.jsonl").read_bytes() == (paths.corpus_dir / f"{split}.jsonl").read_bytes()
  recs = {s: _records(again, s) for s in ("train", "validation")}
  for split, rs in recs.items():
    per_source = collections.Counter(r["source"] for r in rs)
    for source in corpus.SOURCES:
      assert m["sources"][source][split] == per_source[source]
  every = recs["train"] + recs["validation"]
  for source in corpus.SOURCES:
    chars = sum(len(r["text"]) for r in every if r["source"] == source)
    assert m["sources"][source]["chars"] == chars
    assert 0 < m["sources"][source]["train"] + m["sources"][source]["validation"] <= SMALL_LIMIT
  # Ids are content hashes, unique, and the split is a function of the id alone.
  assert len({r["id"] for r in every}) == len(every)
  for split, rs in recs.items():
    for r in rs:
      assert r["id"] == corpus.doc_id(r["source"], r["text"])
      assert corpus.is_validation(r["id"], 0.1) == (split == "validation")
      assert (r["lang"], r["category"]) == corpus.SOURCE_META[r["source"]]
      assert r["text"].strip()
  labels = {r.get("label") for r in every if r["source"] == "zh_reviews"}
  assert labels == {0, 1}
  assert all("label" not in r for r in every if r["source"] != "zh_reviews")
  assert json.loads((again / "manifest.json").read_text())["sources"] == m["sources"]


def test_news_documents_are_plain_text():
  docs = list(corpus.iter_documents(("zh_news",), limit=20))
  assert len(docs) == 20
  for d in docs:
    assert "/n" not in d["text"] and "/v" not in d["text"] and "]nt" not in d["text"]
    assert len(d["text"]) <= corpus.MAX_DOC_CHARS + 200  # one paragraph may overshoot the cut


def test_bad_input_is_named(tmp_path):
  bad = tmp_path / "c.jsonl"
  bad.write_text('{"text": "fine"}\n\n[1, 2]\n', encoding="utf-8")
  with pytest.raises(ValueError, match=r"c.jsonl:3: expected an object with a string 'text'"):
    list(corpus.read_jsonl(bad))
  with pytest.raises(ValueError, match="unknown source 'web'"):
    list(corpus.iter_documents(("web",)))
  with pytest.raises(ValueError, match="validation_fraction must be in"):
    corpus.build(tmp_path / "x", validation_fraction=1.5, progress=False)


def test_cli_prints_counts(tmp_path, capsys):
  assert corpus.main(["build", "--out", str(tmp_path / "c"), "--sources", "zh_reviews,en_prose",
                      "--limit", "30", "--quiet"]) == 0
  out = capsys.readouterr().out
  assert "zh_reviews" in out and "en_prose" in out and "zh_news" not in out
  total = sum(1 for s in ("train", "validation") for _ in corpus.read_jsonl(tmp_path / "c" / f"{s}.jsonl"))
  assert total == 60
  assert f"{'total':<12}" in out


def test_default_data_rebuilds_a_corpus_from_an_older_builder(tmp_path):
  from baichuan_jax import data  # pylint: disable=import-outside-toplevel
  kw = dict(limit=5, code_chars=2000)
  path = data.ensure_corpus(tmp_path, progress=False, **kw)
  manifest = json.loads((path / "manifest.json").read_text())
  assert manifest["format_version"] == corpus.FORMAT_VERSION
  first = (path / "train.jsonl").read_bytes()
  # Reused as is while current ...
  (path / "marker").write_text("x")
  assert data.ensure_corpus(tmp_path, progress=False, **kw) == path and (path / "marker").exists()
  # ... rebuilt (atomically, same content) when written by an older format.
  manifest["format_version"] = corpus.FORMAT_VERSION - 1
  (path / "manifest.json").write_text(json.dumps(manifest))
  assert data.ensure_corpus(tmp_path, progress=False, **kw) == path
  assert not (path / "marker").exists() and (path / "train.jsonl").read_bytes() == first
  assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus"]
