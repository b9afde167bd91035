"""Distributed pieces of the cleaning pipeline: connected components (large-star/small-star) against
the in-process union-find, byte-range reading, empty inputs and shards, the CLI's flag checks."""

import json
import random

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.options.pipeline_options import PipelineOptions
from hypothesis import given, settings
from hypothesis import strategies as st

from baichuan_jax.data import clean, minhash

from test_data_clean import BOILER, _read, _rec, _zh  # pylint: disable=wrong-import-order

# ----------------------------------------------------------------------------------------------
# Connected components


def _union_find_reps(edges):
  """{node: (rep, size)} from minhash.clusters over the nodes on an edge (the reference)."""
  nodes = sorted({x for e in edges for x in e})
  index = {v: i for i, v in enumerate(nodes)}
  pairs = np.array([(index[a], index[b]) for a, b in edges], dtype=np.int64).reshape(-1, 2)
  rep, size = minhash.clusters(len(nodes), pairs)
  return {v: (nodes[rep[i]], int(size[i])) for i, v in enumerate(nodes)}


def _group(pairs):
  g = {}
  for k, v in pairs:
    g.setdefault(k, []).append(v)
  return sorted(g.items())


def _simulate(edges, rounds):
  """The ConnectedComponents steps with an in-memory GroupByKey."""
  adj = [x for e in edges for x in clean._both_ways(e)]  # pylint: disable=protected-access
  for _ in range(rounds):
    adj = [x for kv in _group(adj) for x in clean._large_star(kv)]  # pylint: disable=protected-access
    adj = [x for kv in _group(adj) for x in clean._small_star(kv)]  # pylint: disable=protected-access
  out = [x for kv in _group(adj) for x in clean._star_members(kv, rounds, "t")]  # pylint: disable=protected-access
  assert len(out) == len({k for k, _ in out})  # every node exactly once
  return dict(out)


def _shapes(draw):
  """One graph: a chain, star, clique, random graph or nothing, over shuffled node labels."""
  kind = draw(st.sampled_from(["chain", "star", "clique", "random", "empty"]))
  n = draw(st.integers(2, 40 if kind != "clique" else 12))
  labels = draw(st.permutations(range(n)))
  if kind == "chain":
    edges = [(labels[i], labels[i + 1]) for i in range(n - 1)]
  elif kind == "star":
    edges = [(labels[0], labels[i]) for i in range(1, n)]
  elif kind == "clique":
    edges = [(labels[i], labels[j]) for i in range(n) for j in range(i + 1, n)]
  elif kind == "random":
    m = draw(st.integers(0, 2 * n))
    edges = [tuple(draw(st.lists(st.sampled_from(labels), min_size=2, max_size=2, unique=True)))
             for _ in range(m)]
  else:
    edges = []
  return edges


@st.composite
def _graph_sets(draw):
  """Several disjoint graphs in one edge list (nodes offset per graph), with random edge
  directions and repeated edges."""
  edges, offset = [], 0
  for _ in range(draw(st.integers(0, 6))):
    g = _shapes(draw)
    for a, b in g:
      a, b = a + offset, b + offset
      edges.append((a, b) if draw(st.booleans()) else (b, a))
    offset += 100
  if edges and draw(st.booleans()):
    edges += edges[: draw(st.integers(1, len(edges)))]
  return edges


@settings(max_examples=300, deadline=None)
@given(_graph_sets())
def test_star_iteration_matches_union_find(edges):
  assert _simulate(edges, clean.auto_cc_rounds(13 * 300)) == _union_find_reps(edges)


def test_long_paths_converge_within_auto_rounds():
  rng = random.Random(0)
  for n in (2, 100, 1000, 3000):
    order = list(range(n))
    rng.shuffle(order)
    for labels in (order, list(range(n))):  # shuffled, and the sorted path (the slowest seen)
      edges = [(labels[i], labels[i + 1]) for i in range(n - 1)]
      rounds = clean.auto_cc_rounds(13 * n)
      got = _simulate(edges, rounds)
      assert got == {v: (0, n) for v in range(n)}


def test_too_few_rounds_fail_loudly():
  edges = [(i, i + 1) for i in range(200)]
  with pytest.raises(clean.NotConverged, match="did not converge in 2 large-star/small-star"):
    _simulate(edges, 2)


def _run_components(edges, rounds, expected):
  """Runs ConnectedComponents on the FnApiRunner and checks its output equals ``expected``."""
  from apache_beam.testing.util import assert_that, equal_to  # pylint: disable=import-outside-toplevel
  with beam.Pipeline(options=PipelineOptions(["--runner=FnApiRunner"])) as p:
    out = p | beam.Create(edges) | clean.ConnectedComponents(rounds, "cc")
    assert_that(out, equal_to(sorted(expected.items())))


@settings(max_examples=3, deadline=None)
@given(_graph_sets())
def test_beam_components_match_union_find(edges):
  # Nodes shaped like the pipeline's: (rank tuple, key).
  node = lambda v: ((v % 2, -v, f"k{v:05d}"), f"k{v:05d}")  # noqa: E731
  edges = [(node(a), node(b)) for a, b in edges]
  # Components have at most 40 nodes: the rounds run() would choose for a 40-record input.
  _run_components(edges, clean.auto_cc_rounds(13 * 40), _union_find_reps(edges))


def test_beam_components_hand_worked():
  # {1,2,3} (a path given out of order), {7,8} and the star {10: 11, 12, 13}.
  edges = [(3, 2), (1, 2), (8, 7), (10, 11), (12, 10), (13, 10)]
  want = {1: (1, 3), 2: (1, 3), 3: (1, 3), 7: (7, 2), 8: (7, 2), 10: (10, 4), 11: (10, 4),
          12: (10, 4), 13: (10, 4)}
  assert _union_find_reps(edges) == want
  _run_components(edges, 4, want)
  _run_components([], 3, {})
  with pytest.raises(Exception, match="did not converge"):
    _run_components([(i, i + 1) for i in range(64)], 1, {})


# ----------------------------------------------------------------------------------------------
# Reading, empty inputs, shards


def _write(path, lines):
  path.write_bytes(b"".join(l if isinstance(l, bytes) else (l + "\n").encode() for l in lines))


def test_input_ranges_cover_each_line_once(tmp_path):
  lines = [json.dumps(_rec(i, f"text {i} " * (i % 7 + 1))) for i in range(40)]
  _write(tmp_path / "train.jsonl", lines[:30] + [b"{bad json\n"] + [l.encode() + b"\n" for l in lines[30:]])
  (tmp_path / "validation.jsonl").write_bytes(b"")
  for split_bytes in (1, 7, 64, 1000, 1 << 20):
    ranges = clean.input_splits(str(tmp_path), clean.SPLITS, split_bytes)
    docs, rejected = [], []
    for r in ranges:
      for tag, v in clean.ReadSplit().process(r):
        (docs if tag == "docs" else rejected).append(v)
    assert [rec["id"] for _, rec in docs] == [f"zh_news-{i:04d}" for i in range(40)]
    keys = [k for k, _ in docs]
    assert keys == sorted(keys) and len(set(keys)) == 40
    assert [(line, reason.split(":")[0]) for _, line, reason in rejected] == [(31, "malformed JSON")]
  with pytest.raises(FileNotFoundError, match="no input files"):
    clean.input_splits(str(tmp_path / "nothing"), clean.SPLITS)


def test_small_read_ranges_give_identical_output(tmp_path):
  rng = np.random.default_rng(5)
  a = _zh(rng, 8)
  docs = [a, a[:40] + "天" + a[41:]] + [_zh(rng, 4) + BOILER for _ in range(3)] + [_zh(rng, 5)]
  corpus = tmp_path / "c"
  corpus.mkdir()
  _write(corpus / "train.jsonl", [json.dumps(_rec(i, t)) for i, t in enumerate(docs)]
         + [b"\xff\xfe not utf-8\n", '{"text": 3}'])
  _write(corpus / "validation.jsonl", [json.dumps(_rec(99, _zh(rng, 3)))])
  whole = clean.run(str(corpus), str(tmp_path / "a"))
  pieces = clean.run(str(corpus), str(tmp_path / "b"), split_bytes=97, cc_rounds=3)
  assert whole == pieces
  for name in ("train.jsonl", "validation.jsonl", "rejected.jsonl", "clean_report.json"):
    assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
  rows = _read(tmp_path / "a" / "rejected.jsonl")
  assert [(r["line"], r["reason"].split(":")[0]) for r in rows] == [
      (7, "not UTF-8"), (8, "missing or non-string 'text' field")]
  assert whole["stats"]["doc/near_duplicate"] == {"zh_news": 1}
  assert whole["rejected"] == {"count": 2, "by_reason": {
      "missing or non-string 'text' field": 1, "not UTF-8": 1}}


def test_empty_inputs_and_shards(tmp_path):
  corpus = tmp_path / "c"
  corpus.mkdir()
  (corpus / "train.jsonl").write_bytes(b"")
  (corpus / "validation.jsonl").write_bytes(b"")
  cfg = clean.default_config()
  cfg.num_shards = 3
  report = clean.run(str(corpus), str(tmp_path / "o"), cfg)
  files = sorted(p.name for p in (tmp_path / "o").iterdir())
  assert files == ["clean_report.json", "rejected.jsonl"] + [
      f"{s}-0000{i}-of-00003.jsonl" for s in ("train", "validation") for i in range(3)]
  assert all((tmp_path / "o" / f).read_bytes() == b"" for f in files if f != "clean_report.json")
  assert report["stats"] == {"dedup/doc/clusters": {"all": 0}, "dedup/doc/verified_pairs": {"all": 0},
                             "dedup/sentence/clusters": {"all": 0},
                             "dedup/sentence/verified_pairs": {"all": 0}}
  assert report["rejected"] == {"count": 0, "by_reason": {}}


def test_split_without_duplicates(tmp_path):
  # The crash: no verified edge at all (minhash.clusters(0, ...) raised IndexError).
  rng = np.random.default_rng(1)
  corpus = tmp_path / "c"
  corpus.mkdir()
  _write(corpus / "train.jsonl", [json.dumps(_rec(i, _zh(rng, 5))) for i in range(6)])
  (corpus / "validation.jsonl").write_bytes(b"")
  cfg = clean.default_config()
  cfg.num_shards = 8  # more shards than documents: some stay empty
  report = clean.run(str(corpus), str(tmp_path / "o"), cfg)
  s = report["stats"]
  assert s["dedup/doc/verified_pairs"] == {"all": 0} and s["dedup/doc/clusters"] == {"all": 0}
  assert s["out/docs"] == {"zh_news": 6}
  shards = sorted((tmp_path / "o").glob("train-*-of-00008.jsonl"))
  assert len(shards) == 8 and sum(len(_read(p)) for p in shards) == 6
  assert any(p.stat().st_size == 0 for p in shards)
  assert len(list((tmp_path / "o").glob("validation-*-of-00008.jsonl"))) == 8
  rep, size = minhash.clusters(0, np.zeros((0, 2), dtype=np.int64))
  assert rep.shape == (0,) and size.shape == (0,)


# ----------------------------------------------------------------------------------------------
# CLI


def test_cli_unknown_flags_are_errors(tmp_path, capsys):
  corpus = tmp_path / "c"
  corpus.mkdir()
  _write(corpus / "train.jsonl", [json.dumps(_rec(1, "很好用的东西，下次还会再来买。"))])
  base = ["--corpus", str(corpus), "--out", str(tmp_path / "o")]
  for bad in (["--num_shards=2"], ["--runer=FnApiRunner"], ["--verbose"]):
    with pytest.raises(SystemExit):
      clean.main(base + bad)
    err = capsys.readouterr().err
    assert "unrecognized arguments" in err and bad[0] in err
  with pytest.raises(SystemExit):
    clean.main(base + ["--cc-rounds", "0"])
  assert "--cc-rounds" in capsys.readouterr().err
  # Beam's own options are accepted, and anything after `--` goes to Beam unchecked.
  assert clean.main(base + ["--direct_num_workers=1", "--", "--some_runner_flag=1"]) == 0
  assert _read(tmp_path / "o" / "train.jsonl")[0]["id"] == "zh_news-0001"
