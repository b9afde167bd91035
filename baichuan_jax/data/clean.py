"""Corpus cleaning as an Apache Beam pipeline: quality rules, MinHash-LSH dedup, sampling weights.

    python -m baichuan_jax.data.clean --corpus DIR --out DIR [--config.dedup.threshold=0.7 ...]
                                      [--runner DataflowRunner | FlinkRunner | SparkRunner ...]

Reads ``DIR/train*.jsonl`` and ``DIR/validation*.jsonl`` (a built corpus), and writes the same
layout under ``--out`` (``train.jsonl``, ``validation.jsonl``; ``train-00000-of-00008.jsonl`` ... with
``--num-shards``) plus ``clean_report.json`` (counts per rule, per source, cluster-size histograms)
and ``rejected.jsonl`` (every skipped input line with file, line number and reason).

Stages (each a Beam transform):

1. ``ParseJsonl``: one element per line; malformed JSON, non-objects, missing/non-string ``text``,
   empty text and non-UTF-8 bytes go to the ``rejected`` output with file and line, never crash.
2. ``QualityFilter``: ``filters.QualityFilter`` rules; each removal is counted per rule and source.
3. Document ``NearDuplicates``: signatures (vectorised numpy over batches of documents), LSH band
   keys, GroupByKey per band key -> candidate pairs, two CoGroupByKeys to verify each pair's
   estimated Jaccard, then union-find over the verified edges. One representative per cluster is
   kept: validation documents first (so validation text never loses its copy), then the longest,
   then the smallest key.
4. Sentence ``NearDuplicates``: the same transform over sentences of at least ``min_chars``
   characters; every later copy of a near-duplicate sentence is cut from its document.
5. Weights: ``mixture`` factor per language/category x cluster factor (``size ** -beta``).
6. Write: documents hashed to shards, each shard sorted by key, so output is byte-identical across
   runs and runners.

Every stage is an ordinary Beam transform, so the same pipeline runs on Dataflow, Flink or Spark by
passing the runner's pipeline options (see ``docs/data_cleaning.md``). The union-find step gathers
the verified edges (only near-duplicate pairs, far fewer than documents) on one worker.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import logging
import os
import posixpath
import re
import sys
import time

import ml_collections
import numpy as np


class _DropGcpNotice(logging.Filter):
  # Beam logs this on import when the optional GCP extras are absent; it is noise for local runs.
  def filter(self, record):
    return "apitools not found" not in record.getMessage()


logging.getLogger().addFilter(_DropGcpNotice())

import apache_beam as beam  # pylint: disable=wrong-import-position
from apache_beam.io import fileio  # pylint: disable=wrong-import-position
from apache_beam.io.filesystems import FileSystems  # pylint: disable=wrong-import-position
from apache_beam.options.pipeline_options import PipelineOptions  # pylint: disable=wrong-import-position

from baichuan_jax.data import filters, minhash, mixture  # pylint: disable=wrong-import-position
# The settings live in a module without Beam, so checking a cached cleaned corpus stays cheap.
from baichuan_jax.data.clean_config import (SPLITS, default_config,  # noqa: F401  pylint: disable=wrong-import-position
                                            validate)

REPORT = "clean_report.json"
# The runner when none is given: local, in process, nothing fetched at run time.
DEFAULT_RUNNER = "FnApiRunner"
REJECTED = "rejected.jsonl"
# JSON "\ud800" escapes decode to lone surrogates, which cannot be written back as UTF-8.
_SURROGATE = re.compile("[\ud800-\udfff]")


def lsh_shape(d: ml_collections.ConfigDict) -> tuple[int, int]:
  """(bands, rows) of a dedup section, auto-chosen when both are 0."""
  if d.bands and d.rows:
    return d.bands, d.rows
  return minhash.lsh_params(d.threshold, d.num_perm)


# ----------------------------------------------------------------------------------------------
# 1. Reading


def _split_of(path: str, splits) -> str | None:
  base = posixpath.basename(path.replace("\\", "/"))
  for s in sorted(splits, key=len, reverse=True):
    if base.startswith(s):
      return s
  return None


class ParseJsonl(beam.DoFn):
  """Readable file -> (key, record); bad lines -> ``rejected`` output (file, line, reason)."""

  REJECTED = "rejected"

  def __init__(self, splits):
    self.splits = tuple(splits)

  def process(self, readable):
    path = readable.metadata.path
    split = _split_of(path, self.splits)
    name = posixpath.basename(path.replace("\\", "/"))
    with readable.open() as f:
      lineno = 0
      while True:
        raw = f.readline()
        if not raw:
          break
        lineno += 1
        rec, reason = _parse_line(raw)
        if reason is not None:
          yield beam.pvalue.TaggedOutput(self.REJECTED, (path, lineno, reason))
          continue
        key = f"{name}:{lineno:010d}"
        rec["_key"], rec["_split"] = key, split
        yield key, rec


def _parse_line(raw: bytes) -> tuple[dict | None, str | None]:
  """(record, None) for a good line, (None, reason) otherwise."""
  try:
    line = raw.decode("utf-8")
  except UnicodeDecodeError as e:
    return None, f"not UTF-8: byte 0x{raw[e.start]:02x} at offset {e.start}"
  if not line.strip():
    return None, "blank line"
  try:
    rec = json.loads(line)
  except json.JSONDecodeError as e:
    return None, f"malformed JSON: {e.msg} (column {e.colno})"
  if not isinstance(rec, dict):
    return None, f"expected a JSON object, got {type(rec).__name__}"
  if not isinstance(rec.get("text"), str):
    return None, "missing or non-string 'text' field"
  if not rec["text"].strip():
    return None, "empty text"
  if _SURROGATE.search(rec["text"]):
    return None, "text holds a lone surrogate (\\ud8xx escape), not valid Unicode"
  for field in ("lang", "category", "source"):
    if not isinstance(rec.get(field, ""), str):
      return None, f"non-string {field!r} field"
  return rec, None


# ----------------------------------------------------------------------------------------------
# 2. Quality rules


def _source(rec: dict) -> str:
  return rec.get("source") or "unknown"


class QualityFilterFn(beam.DoFn):
  """(key, record) -> (key, cleaned record); counts go to the ``stats`` output."""

  STATS = "stats"

  def __init__(self, cfg: ml_collections.ConfigDict):
    self.cfg_dict = cfg.to_dict()
    self.qf = None

  def setup(self):
    self.qf = filters.QualityFilter(ml_collections.ConfigDict(self.cfg_dict))

  def process(self, kv):
    key, rec = kv
    src = _source(rec)
    yield beam.pvalue.TaggedOutput(self.STATS, (("in/docs", src), 1))
    text, stats = self.qf(rec["text"], rec.get("lang", "unknown"))
    for name, n in stats.items():
      yield beam.pvalue.TaggedOutput(self.STATS, ((name, src), n))
    if text is not None:
      rec = dict(rec, text=text)
      yield key, rec


# ----------------------------------------------------------------------------------------------
# 3./4. Near duplicates


class _Signatures(beam.DoFn):
  """Batch of (key, rank, text) -> (key, (rank, signature)); band keys to the ``bands`` output."""

  BANDS = "bands"

  def __init__(self, ngram, num_perm, bands, rows, seed):
    self.ngram, self.num_perm, self.bands, self.rows, self.seed = ngram, num_perm, bands, rows, seed
    self.perms = None

  def setup(self):
    self.perms = minhash.make_permutations(self.num_perm, self.seed)

  def process(self, batch):
    texts = [t for _, _, t in batch]
    hashes, counts = minhash.batch_shingle_hashes(texts, self.ngram)
    sigs = minhash.signatures_from_hashes(hashes, counts, self.perms)
    keys = minhash.band_keys(sigs, self.bands, self.rows)
    for (key, rank, _), sig, bk, c in zip(batch, sigs, keys, counts):
      if c == 0:  # no word characters: nothing to compare
        continue
      yield key, (rank, sig)
      for b, k in enumerate(bk.tolist()):
        yield beam.pvalue.TaggedOutput(self.BANDS, ((b, k), (rank, key)))


def _bucket_pairs(kv, max_pairs_bucket):
  """Band bucket -> candidate pairs (key_a, key_b) ordered by rank."""
  _, members = kv
  members = sorted(members)
  if len(members) < 2:
    return
  left, right = minhash.bucket_edges(np.arange(len(members)), max_pairs_bucket)
  for i, j in zip(left.tolist(), right.tolist()):
    yield (members[i][1], members[j][1]), None


def _attach_left(kv):
  """(key_a, {pairs: [key_b...], sig: [(rank, sig)]}) -> (key_b, (key_a, rank_a, sig_a))."""
  key_a, g = kv
  if not g["sig"]:
    return
  rank_a, sig_a = g["sig"][0]
  for key_b in g["pairs"]:
    yield key_b, (key_a, rank_a, sig_a)


def _verify(kv, threshold):
  """(key_b, {left: [...], sig: [(rank_b, sig_b)]}) -> edges (rank_a, key_a, rank_b, key_b)."""
  key_b, g = kv
  if not g["sig"] or not g["left"]:
    return
  rank_b, sig_b = g["sig"][0]
  for key_a, rank_a, sig_a in g["left"]:
    if float(np.mean(sig_a == sig_b)) >= threshold:
      yield rank_a, key_a, rank_b, key_b


class _UnionFind(beam.DoFn):
  """All verified edges -> (key, (rep_key, cluster_size)) per member of a 2+ cluster; stats."""

  STATS = "stats"

  def __init__(self, label):
    self.label = label

  def process(self, edges):
    nodes = sorted({(r, k) for r, k, _, _ in edges} | {(r, k) for _, _, r, k in edges})
    index = {k: i for i, (_, k) in enumerate(nodes)}
    pairs = np.array([(index[a], index[b]) for _, a, _, b in edges], dtype=np.int64).reshape(-1, 2)
    # Nodes are sorted by rank, so the smallest index of a component is its best-ranked member.
    rep, size = minhash.clusters(len(nodes), pairs)
    hist = minhash.cluster_size_histogram(size, rep)
    for s, n in hist.items():
      yield beam.pvalue.TaggedOutput(self.STATS, ((f"{self.label}/cluster_size={s}", "all"), n))
    yield beam.pvalue.TaggedOutput(self.STATS, ((f"{self.label}/clusters", "all"), sum(hist.values())))
    yield beam.pvalue.TaggedOutput(self.STATS, ((f"{self.label}/verified_pairs", "all"), len(edges)))
    for i, (_, key) in enumerate(nodes):
      yield key, (nodes[rep[i]][1], int(size[i]))


class NearDuplicates(beam.PTransform):
  """(key, rank, text) -> clusters: (key, (rep_key, size)) for members of 2+ clusters; and stats.

  Returns a dict with ``clusters`` and ``stats`` PCollections.
  """

  def __init__(self, d: ml_collections.ConfigDict, label: str):
    super().__init__(label)
    self.d = d
    self.name = label
    self.bands, self.rows = lsh_shape(d)

  def expand(self, items):
    d = self.d
    sig_out = (items
               | "Batch" >> beam.BatchElements(min_batch_size=16, max_batch_size=512)
               | "Signatures" >> beam.ParDo(_Signatures(d.ngram, d.num_perm, self.bands, self.rows,
                                                        d.seed)).with_outputs(
                                                            _Signatures.BANDS, main="sigs"))
    sigs, bands = sig_out.sigs, sig_out[_Signatures.BANDS]
    cands = (bands
             | "GroupBands" >> beam.GroupByKey()
             | "BucketPairs" >> beam.FlatMap(_bucket_pairs, d.max_pairs_bucket)
             | "PairKeys" >> beam.Keys()
             | "DistinctPairs" >> beam.Distinct())
    left = ({"pairs": cands, "sig": sigs}
            | "JoinLeft" >> beam.CoGroupByKey()
            | "AttachLeft" >> beam.FlatMap(_attach_left))
    edges = ({"left": left, "sig": sigs}
             | "JoinRight" >> beam.CoGroupByKey()
             | "Verify" >> beam.FlatMap(_verify, d.threshold))
    uf = (edges
          | "AllEdges" >> beam.combiners.ToList()
          | "UnionFind" >> beam.ParDo(_UnionFind(self.name)).with_outputs(_UnionFind.STATS,
                                                                          main="clusters"))
    return {"clusters": uf.clusters, "stats": uf[_UnionFind.STATS]}


def _doc_rank(rec: dict):
  # Validation first (it must keep its copy), then the longest text, then the key.
  return (0 if rec["_split"] == "validation" else 1, -len(rec["text"]), rec["_key"])


class _ApplyDocClusters(beam.DoFn):
  """(key, {doc: [rec], cluster: [(rep, size)]}) -> kept (key, rec) with ``_cluster`` size."""

  STATS = "stats"

  def process(self, kv):
    key, g = kv
    for rec in g["doc"]:
      rep, size = g["cluster"][0] if g["cluster"] else (key, 1)
      if rep != key:
        yield beam.pvalue.TaggedOutput(self.STATS, (("doc/near_duplicate", _source(rec)), 1))
        continue
      yield key, dict(rec, _cluster=size)


def _sentences(kv, min_chars, langs):
  key, rec = kv
  if rec.get("lang", "unknown") not in langs:
    return
  split_rank = 0 if rec["_split"] == "validation" else 1
  for i, s in enumerate(filters.split_sentences(rec["text"])):
    if len("".join(s.split())) >= min_chars:
      yield f"{key}#{i:06d}", (split_rank, key, i), s


class _CutSentences(beam.DoFn):
  """(key, {doc: [rec], cut: [sentence index]}) -> doc without its duplicate sentences."""

  STATS = "stats"

  def __init__(self, min_chars):
    self.min_chars = min_chars

  def process(self, kv):
    key, g = kv
    for rec in g["doc"]:
      cut = set(g["cut"])
      if not cut:
        yield key, rec
        continue
      spans = filters.split_sentences(rec["text"])
      text = "".join(s for i, s in enumerate(spans) if i not in cut).strip()
      src = _source(rec)
      yield beam.pvalue.TaggedOutput(self.STATS, (("sentence/near_duplicate", src), len(cut)))
      if len("".join(text.split())) < max(self.min_chars, 1):
        yield beam.pvalue.TaggedOutput(self.STATS, (("doc/too_short_after_sentence_dedup", src), 1))
        continue
      yield key, dict(rec, text=text)


# ----------------------------------------------------------------------------------------------
# 5./6. Weights and output


def _weighted_chars(kv, beta, floor):
  _, rec = kv
  f = mixture.cluster_factor(rec.get("_cluster", 1), beta, floor)
  return mixture.group(rec.get("lang", "unknown"), rec.get("category", "unknown")), f * len(rec["text"])


def _assign_weight(kv, factors, beta, floor):
  key, rec = kv
  w = mixture.document_weight(factors, rec.get("lang", "unknown"), rec.get("category", "unknown"),
                              rec.get("_cluster", 1), beta, floor)
  return key, dict(rec, weight=w)


def shard_of(key: str, num_shards: int) -> int:
  """Stable shard of a document key (sha1, not Python's salted hash)."""
  return int(hashlib.sha1(key.encode()).hexdigest()[:8], 16) % num_shards


def shard_path(out: str, split: str, shard: int, num_shards: int) -> str:
  if num_shards == 1:
    return FileSystems.join(out, f"{split}.jsonl")
  return FileSystems.join(out, f"{split}-{shard:05d}-of-{num_shards:05d}.jsonl")


def output_record(rec: dict) -> dict:
  """The written record: input fields (text cleaned), ``weight`` and ``cluster_size``."""
  out = {k: v for k, v in rec.items() if not k.startswith("_")}
  out["cluster_size"] = int(rec.get("_cluster", 1))
  return out


class _WriteShard(beam.DoFn):
  """((split, shard), [(key, rec)]) -> one sorted JSONL file; per-source counts to stats."""

  def __init__(self, out, num_shards):
    self.out, self.num_shards = out, num_shards

  def process(self, kv):
    (split, shard), items = kv
    path = shard_path(self.out, split, shard, self.num_shards)
    tmp = path + ".tmp"
    counts = collections.Counter()
    with FileSystems.create(tmp) as f:
      for key, rec in sorted(items, key=lambda x: x[0]):
        f.write((json.dumps(output_record(rec), ensure_ascii=False, sort_keys=True) + "\n")
                .encode("utf-8"))
        counts[("out/docs", _source(rec))] += 1
        counts[("out/chars", _source(rec))] += len(rec["text"])
        counts[(f"out/docs/{split}", _source(rec))] += 1
    FileSystems.rename([tmp], [path])
    yield from counts.items()


def _write_empty_shards(out, splits, num_shards, written):
  """Splits/shards that received no document still get an (empty) file."""
  done = set(written)
  for split in splits:
    for shard in range(num_shards):
      if (split, shard) not in done:
        path = shard_path(out, split, shard, num_shards)
        with FileSystems.create(path):
          pass


def build_pipeline(p: beam.Pipeline, corpus: str, out: str, cfg: ml_collections.ConfigDict):
  """Adds the cleaning transforms to pipeline ``p``.

  Args:
    p: a Beam pipeline.
    corpus: input directory (local path or a URI Beam's FileSystems understands, e.g. gs://).
    out: output directory.
    cfg: ``default_config()``-shaped config (validated here).
  Returns:
    dict of PCollections: ``stats`` ((name, source), count), ``rejected`` (file, line, reason).
  """
  validate(cfg)
  patterns = [FileSystems.join(corpus, f"{s}*.jsonl") for s in cfg.splits]
  files = (p | "Patterns" >> beam.Create(patterns)
           | "Match" >> fileio.MatchAll(fileio.EmptyMatchTreatment.ALLOW)
           | "Read" >> fileio.ReadMatches())
  parsed = files | "Parse" >> beam.ParDo(ParseJsonl(cfg.splits)).with_outputs(
      ParseJsonl.REJECTED, main="docs")
  stats = []
  q = parsed.docs | "Quality" >> beam.ParDo(QualityFilterFn(cfg.filters)).with_outputs(
      QualityFilterFn.STATS, main="docs")
  stats.append(q[QualityFilterFn.STATS])
  docs = q.docs

  if cfg.dedup.enabled:
    nd = (docs | "DocItems" >> beam.Map(lambda kv: (kv[0], _doc_rank(kv[1]), kv[1]["text"]))
          | "DocDedup" >> NearDuplicates(cfg.dedup, "dedup/doc"))
    stats.append(nd["stats"])
    applied = ({"doc": docs, "cluster": nd["clusters"]}
               | "JoinDocClusters" >> beam.CoGroupByKey()
               | "ApplyDocClusters" >> beam.ParDo(_ApplyDocClusters()).with_outputs(
                   _ApplyDocClusters.STATS, main="docs"))
    stats.append(applied[_ApplyDocClusters.STATS])
    docs = applied.docs

  sd = cfg.sentence_dedup
  if sd.enabled:
    sents = docs | "SentenceItems" >> beam.FlatMap(_sentences, sd.min_chars, tuple(sd.langs))
    ns = sents | "SentenceDedup" >> NearDuplicates(sd, "dedup/sentence")
    stats.append(ns["stats"])
    cuts = (ns["clusters"]
            | "NonReps" >> beam.Filter(lambda kv: kv[0] != kv[1][0])
            | "CutIndex" >> beam.Map(lambda kv: (kv[0].rsplit("#", 1)[0], int(kv[0].rsplit("#", 1)[1]))))
    floor = cfg.filters.length.min_chars
    cut = ({"doc": docs, "cut": cuts}
           | "JoinCuts" >> beam.CoGroupByKey()
           | "CutSentences" >> beam.ParDo(_CutSentences(floor)).with_outputs(
               _CutSentences.STATS, main="docs"))
    stats.append(cut[_CutSentences.STATS])
    docs = cut.docs

  mcfg = cfg.mixture
  factors = (docs
             | "WeightedChars" >> beam.Map(_weighted_chars, mcfg.cluster_beta,
                                           mcfg.min_cluster_weight)
             | "SumPerGroup" >> beam.CombinePerKey(sum)
             | "GroupsToDict" >> beam.combiners.ToDict()
             | "Factors" >> beam.Map(lambda wc: mixture.group_factors(mcfg, wc)))
  weighted = docs | "Weights" >> beam.Map(_assign_weight, beam.pvalue.AsSingleton(factors),
                                          mcfg.cluster_beta, mcfg.min_cluster_weight)

  n = cfg.num_shards
  written = (weighted
             | "ShardKey" >> beam.Map(lambda kv: ((kv[1]["_split"], shard_of(kv[0], n)), kv))
             | "GroupShards" >> beam.GroupByKey()
             | "WriteShards" >> beam.ParDo(_WriteShard(out, n)))
  stats.append(written)
  stats.append(factors | "FactorStats" >> beam.FlatMap(
      lambda f: [((f"mixture/factor/{g}", "all"), float(f"{v:.6g}")) for g, v in f.items()]))
  all_stats = (stats | "FlattenStats" >> beam.Flatten()
               | "SumStats" >> beam.CombinePerKey(sum))
  return {"stats": all_stats, "rejected": parsed[ParseJsonl.REJECTED]}


def _clear_outputs(out: str, splits) -> None:
  """Deletes shard files of an earlier run, so a file on disk is always from this run."""
  for split in splits:
    for pattern in (f"{split}.jsonl", f"{split}-*-of-*.jsonl"):
      found = FileSystems.match([FileSystems.join(out, pattern)])[0].metadata_list
      if found:
        FileSystems.delete([m.path for m in found])


def _finish(out, splits, num_shards, stats, rejected, cfg):
  """Writes empty shards that got no documents, rejected.jsonl and clean_report.json."""
  written = set()
  for split in splits:
    for shard in range(num_shards):
      if FileSystems.exists(shard_path(out, split, shard, num_shards)):
        written.add((split, shard))
  _write_empty_shards(out, splits, num_shards, written)
  rejected = sorted(rejected)
  with FileSystems.create(FileSystems.join(out, REJECTED)) as f:
    for path, line, reason in rejected:
      f.write((json.dumps({"file": path, "line": line, "reason": reason}, ensure_ascii=False)
               + "\n").encode("utf-8"))
  table = collections.defaultdict(dict)
  for (name, src), v in stats:
    table[name][src] = v
  report = {
      "stats": {name: dict(sorted(v.items())) for name, v in sorted(table.items())},
      "rejected": {"count": len(rejected),
                   "by_reason": dict(collections.Counter(r.split(":")[0] for _, _, r in rejected))},
      "config": cfg.to_dict(),
      "lsh": {"doc": list(lsh_shape(cfg.dedup)), "sentence": list(lsh_shape(cfg.sentence_dedup))},
  }
  with FileSystems.create(FileSystems.join(out, REPORT)) as f:
    f.write((json.dumps(report, ensure_ascii=False, indent=1, sort_keys=True, default=list) + "\n")
            .encode("utf-8"))
  # Run facts (time, command) are printed, not written: the output directory stays byte-identical.
  return report


def run(corpus: str, out: str, cfg: ml_collections.ConfigDict | None = None,
        beam_args: list[str] | None = None) -> dict:
  """Runs the pipeline and writes the report.

  Args:
    corpus: directory with ``<split>*.jsonl``.
    out: output directory (created).
    cfg: cleaning config (default: ``default_config()``).
    beam_args: pipeline options, e.g. ``["--runner=DataflowRunner", "--project=..."]``; without
      ``--runner``, the local in-process ``FnApiRunner`` (``DEFAULT_RUNNER``).
  Returns:
    the report dict (also in ``out/clean_report.json``).
  """
  cfg = validate(cfg if cfg is not None else default_config())
  if "://" not in corpus and not os.path.isdir(corpus):
    raise FileNotFoundError(f"--corpus {corpus!r} is not a directory (build one with "
                            "`python -m baichuan_jax.data.corpus build --out DIR`)")
  if "://" not in out:
    os.makedirs(out, exist_ok=True)
  _clear_outputs(out, cfg.splits)
  beam_args = list(beam_args or [])
  if not any(a == "--runner" or a.startswith("--runner=") for a in beam_args):
    # Beam's DirectRunner first tries the Prism runner, which downloads a binary from GitHub at
    # run time; the in-process FnApiRunner is what it falls back to for this batch pipeline.
    beam_args.append(f"--runner={DEFAULT_RUNNER}")
  options = PipelineOptions(beam_args)
  with beam.Pipeline(options=options) as p:
    res = build_pipeline(p, corpus, out, cfg)
    # Small results come back to the launcher through a side channel written by the pipeline.
    _ = res["stats"] | "CollectStats" >> beam.combiners.ToList() | "S" >> beam.Map(
        lambda xs: _stash(out, "stats", xs))
    _ = res["rejected"] | "CollectRejected" >> beam.combiners.ToList() | "R" >> beam.Map(
        lambda xs: _stash(out, "rejected", xs))
  stats_out = _unstash(out, "stats")
  rej_out = _unstash(out, "rejected")
  if not any(name.startswith("in/docs") for (name, _), _ in stats_out) and not rej_out:
    raise FileNotFoundError(f"no input lines under {corpus!r} (looked for "
                            f"{', '.join(s + '*.jsonl' for s in cfg.splits)})")
  return _finish(out, cfg.splits, cfg.num_shards, stats_out, rej_out, cfg)


def _stash(out, name, items):
  path = FileSystems.join(out, f".{name}.json.tmp")
  with FileSystems.create(path) as f:
    f.write(json.dumps([list(x) for x in items], ensure_ascii=False).encode("utf-8"))


def _unstash(out, name):
  path = FileSystems.join(out, f".{name}.json.tmp")
  with FileSystems.open(path) as f:
    items = json.loads(f.read().decode("utf-8"))
  FileSystems.delete([path])
  if name == "stats":
    return [((k[0], k[1]), v) for k, v in items]
  return [tuple(x) for x in items]


def _print_report(report: dict, out: str) -> None:
  stats = report["stats"]
  sources = sorted({s for v in stats.values() for s in v if s != "all"})
  rows = [n for n in stats if n.startswith(("in/", "doc/", "sentence/", "out/docs"))
          and n not in ("out/docs/train", "out/docs/validation")]
  print(f"{'rule':<36}" + "".join(f"{s:>12}" for s in sources) + f"{'total':>12}")
  for name in rows:
    v = stats[name]
    print(f"{name:<36}" + "".join(f"{v.get(s, 0):>12}" for s in sources) + f"{sum(v.values()):>12}")
  for label in ("dedup/doc", "dedup/sentence"):
    sizes = {int(n.split("=")[1]): v["all"] for n, v in stats.items()
             if n.startswith(f"{label}/cluster_size=")}
    if sizes:
      hist = ", ".join(f"{s}:{c}" for s, c in sorted(sizes.items()))
      print(f"{label} clusters by size (size:count): {hist}")
  rej = report["rejected"]
  if rej["count"]:
    print(f"rejected input lines: {rej['count']} {rej['by_reason']} (see {out}/{REJECTED})")
  print(f"wrote {out}/ (report: {REPORT})")


def _parse_config_overrides(cfg: ml_collections.ConfigDict, overrides: list[str]) -> None:
  """Applies ``--config.a.b=value`` overrides (value parsed as JSON, else kept as a string)."""
  for item in overrides:
    if "=" not in item:
      raise ValueError(f"--config override {item!r} must look like --config.dedup.threshold=0.7")
    path, raw = item.split("=", 1)
    try:
      value = json.loads(raw)
    except json.JSONDecodeError:
      value = raw
    if isinstance(value, list):
      value = tuple(value)
    node = cfg
    parts = path.split(".")
    for part in parts[:-1]:
      if part not in node:
        raise ValueError(f"--config.{path}: unknown section {part!r}")
      node = node[part]
    if parts[-1] not in node and parts[-2:-1] != ["weights"]:
      raise ValueError(f"--config.{path}: unknown field {parts[-1]!r}; known: {', '.join(node.keys())}")
    if parts[-1] in node and isinstance(node[parts[-1]], float) and isinstance(value, int):
      value = float(value)
    node[parts[-1]] = value


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m baichuan_jax.data.clean",
      description="Clean a built corpus with Apache Beam: heuristic quality and safety rules, "
                  "MinHash-LSH near-duplicate removal (documents and sentences), and sampling weights "
                  "(mixture x cluster size). Unknown flags are passed to Beam, e.g. --runner, "
                  "--direct_num_workers, --project, --temp_location.",
      epilog="Config overrides: --config.dedup.threshold=0.7 --config.filters.safety.enabled=false "
             "--config.mixture.mode=proportion --config.mixture.weights.zh/news=0.4 "
             "(values parsed as JSON). See docs/data_cleaning.md.")
  parser.add_argument("--corpus", required=True, help="built corpus directory (<split>*.jsonl)")
  parser.add_argument("--out", required=True, help="output directory")
  parser.add_argument("--num-shards", type=int, default=None,
                      help="output files per split (default 1: <split>.jsonl)")
  parser.add_argument("--print-config", action="store_true", help="print the config and exit")
  args, rest = parser.parse_known_args(argv)
  overrides = [a[len("--config."):] for a in rest if a.startswith("--config.")]
  beam_args = [a for a in rest if not a.startswith("--config.")]
  cfg = default_config()
  try:
    _parse_config_overrides(cfg, overrides)
    if args.num_shards is not None:
      cfg.num_shards = args.num_shards
    validate(cfg)
  except ValueError as e:
    parser.error(str(e))
  if args.print_config:
    print(cfg)
    return 0
  t0 = time.time()
  report = run(args.corpus, args.out, cfg, beam_args)
  _print_report(report, args.out)
  print(f"took {time.time() - t0:.1f}s")
  return 0


if __name__ == "__main__":
  sys.exit(main())
