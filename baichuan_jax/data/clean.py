"""Corpus cleaning as an Apache Beam pipeline: quality rules, MinHash-LSH dedup, sampling weights.

    python -m baichuan_jax.data.clean --corpus DIR --out DIR [--config.dedup.threshold=0.7 ...]
                                      [--runner=DataflowRunner --project=P ...] [-- BEAM_ARGS]

Reads ``DIR/train*.jsonl`` and ``DIR/validation*.jsonl`` (a built corpus), and writes the same
layout under ``--out`` (``train.jsonl``, ``validation.jsonl``; ``train-00000-of-00008.jsonl`` ... with
``--num-shards``) plus ``clean_report.json`` (counts per rule, per source, cluster-size histograms)
and ``rejected.jsonl`` (every skipped input line with file, line number and reason).

Stages (each a Beam transform):

1. ``ReadSplit``: the driver lists the input files and cuts them into byte ranges
   (``--split-mb``); each range is read by whichever worker gets it, one element per line it
   starts. Malformed JSON, non-objects, missing/non-string ``text``, empty text and non-UTF-8 bytes
   become ``rejected`` rows with file and line number, never a crash.
2. ``QualityFilterFn``: ``filters.QualityFilter`` rules; each removal is counted per rule and source.
3. Document ``NearDuplicates``: signatures (vectorised numpy over batches formed by a GroupByKey on
   a hash of the key), LSH band keys, GroupByKey per band key -> candidate pairs verified in the
   bucket (the band entries carry the signatures) by estimated Jaccard, ``Distinct``, then
   ``ConnectedComponents`` over the verified edges: the large-star / small-star iteration of Kiveris et al. (2014), each step a
   GroupByKey, so no worker ever holds more than one node's neighbourhood. One representative per
   cluster is kept: validation documents first (so validation text never loses its copy), then
   the longest, then the smallest key.
4. Sentence ``NearDuplicates``: the same transform over sentences of at least ``min_chars``
   characters; every later copy of a near-duplicate sentence is cut from its document.
5. Weights: ``mixture`` factor per language/category x cluster factor (``size ** -beta``); the
   factors reach the writers through a join, not a side input.
6. Write: documents hashed to shards, each shard sorted by key and written whole by one worker
   (``_WriteShard``), so output is byte-identical across runs and runners; the report and
   ``rejected.jsonl`` are computed and written inside the pipeline too. The launcher only lists
   the input files before the run and reads ``clean_report.json`` back after it.

Runner portability: the pipeline uses only ParDo/Map, GroupByKey, CoGroupByKey, CombinePerKey,
Flatten and Create, and every output leads into one final transform. That is the subset that
Beam's DaskRunner (2.77) executes correctly: it computes only the last transform's graph (a
pipeline with several sinks silently runs one of them), mixes a ParDo's tagged outputs into its
main output, drops elements emitted from ``finish_bundle`` (so ``BatchElements`` and ``fileio``
lose data there) and recomputes a side input's whole upstream inside each task that reads it. So
DoFns here emit ``(tag, value)`` pairs that are split with ``FlatMap``s, and batching, broadcast
and global aggregation are joins. The same code runs on Dataflow, Flink or Spark
(``docs/data_cleaning.md``).
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import logging
import math
import os
import posixpath
import re
import sys
import time
import uuid

import ml_collections
import numpy as np


class _DropGcpNotice(logging.Filter):
  # Beam logs this on import when the optional GCP extras are absent; it is noise for local runs.
  def filter(self, record):
    return "apitools not found" not in record.getMessage()


logging.getLogger().addFilter(_DropGcpNotice())

import apache_beam as beam  # pylint: disable=wrong-import-position
from apache_beam.io.filesystem import CompressionTypes  # pylint: disable=wrong-import-position
from apache_beam.io.filesystems import FileSystems  # pylint: disable=wrong-import-position
from apache_beam.options.pipeline_options import PipelineOptions  # pylint: disable=wrong-import-position

from baichuan_jax.data import filters, minhash, mixture  # pylint: disable=wrong-import-position
# The settings live in a module without Beam, so checking a cached cleaned corpus stays cheap.
from baichuan_jax.data.clean_config import (SPLITS, default_config,  # noqa: F401  pylint: disable=wrong-import-position
                                            validate)

REPORT = "clean_report.json"
# The runner when none is given: local, in process, nothing fetched at run time.
DEFAULT_RUNNER = "FnApiRunner"
DASK_RUNNER = "apache_beam.runners.dask.dask_runner.DaskRunner"
REJECTED = "rejected.jsonl"
# Large-star + small-star rounds unrolled into the pipeline graph: None = ``auto_cc_rounds``.
DEFAULT_CC_ROUNDS = None
# The shortest record a component node can come from, {"text":"a"} and a newline.
_MIN_RECORD_BYTES = 13
# Input byte range per read task (``--split-mb``).
DEFAULT_SPLIT_BYTES = 64 << 20
# Text per signature batch: batches are GroupByKey groups on a hash of the key, and their number
# is the input size divided by this, so a batch stays about this size at any corpus size.
BATCH_BYTES = 1 << 20
# Items hashed per vectorised numpy pass inside a batch.
_CHUNK = 512
# JSON "\ud800" escapes decode to lone surrogates, which cannot be written back as UTF-8.
_SURROGATE = re.compile("[\ud800-\udfff]")


def lsh_shape(d: ml_collections.ConfigDict) -> tuple[int, int]:
  """(bands, rows) of a dedup section, auto-chosen when both are 0."""
  if d.bands and d.rows:
    return d.bands, d.rows
  return minhash.lsh_params(d.threshold, d.num_perm)


def _pick(element, tag):
  if element[0] == tag:
    yield element[1]


def _select(pcoll, tag: str, label: str):
  """The ``tag`` part of a PCollection of ``(tag, value)`` pairs (a runner-portable with_outputs)."""
  return pcoll | label >> beam.FlatMap(_pick, tag)


# ----------------------------------------------------------------------------------------------
# 1. Reading


def _split_of(path: str, splits) -> str | None:
  base = posixpath.basename(path.replace("\\", "/"))
  for s in sorted(splits, key=len, reverse=True):
    if base.startswith(s):
      return s
  return None


def input_splits(corpus: str, splits, split_bytes: int = DEFAULT_SPLIT_BYTES):
  """Byte ranges to read: ``[(path, split, start, end)]`` over ``corpus/<split>*.jsonl``.

  Runs on the launcher before the pipeline (a file listing, no reading). A file matched by two
  split patterns (``train*`` and ``train_big*``) belongs to the longest matching split name.

  Raises:
    FileNotFoundError: no file matches any split pattern.
  """
  if split_bytes < 1:
    raise ValueError(f"split_bytes = {split_bytes} is invalid; allowed: an integer >= 1")
  found = {}
  for s in splits:
    for m in FileSystems.match([FileSystems.join(corpus, f"{s}*.jsonl")])[0].metadata_list:
      found[m.path] = m.size_in_bytes
  if not found:
    raise FileNotFoundError(f"no input files under {corpus!r} (looked for "
                            f"{', '.join(s + '*.jsonl' for s in splits)})")
  out = []
  for path in sorted(found):
    split = _split_of(path, splits)
    for start in range(0, found[path], split_bytes):
      out.append((path, split, start, min(start + split_bytes, found[path])))
  return out


def _newlines_before(path: str, offset: int) -> int:
  """Number of b"\\n" in the first ``offset`` bytes of a file (line numbers of a later range)."""
  n = 0
  with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
    left = offset
    while left > 0:
      block = f.read(min(left, 1 << 20))
      if not block:
        break
      n += block.count(b"\n")
      left -= len(block)
  return n


class ReadSplit(beam.DoFn):
  """(path, split, start, end) -> ("docs", (key, record)) | ("rejected", (file, line, reason)).

  A range owns the lines that start inside it (as Beam's text source splits files). Keys are
  ``<file name>:<byte offset>``, zero-padded, so they sort in file order. Line numbers are only
  needed for rejected lines; a range that has one counts the newlines before it once.
  """

  def process(self, split_range):
    path, split, start, end = split_range
    name = posixpath.basename(path.replace("\\", "/"))
    with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
      if start > 0:
        f.seek(start - 1)
        f.readline()  # the line running through `start` belongs to the range before
      pos = f.tell()
      first, lineno, base = pos, 0, None
      while pos < end:
        raw = f.readline()
        if not raw:
          break
        lineno += 1
        rec, reason = _parse_line(raw)
        if reason is not None:
          if base is None:
            base = _newlines_before(path, first)
          yield "rejected", (path, base + lineno, reason)
        else:
          key = f"{name}:{pos:012d}"
          rec["_key"], rec["_split"] = key, split
          yield "docs", (key, rec)
        pos += len(raw)


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
  """(key, record) -> ("docs", (key, cleaned record)) | ("stats", ((rule, source), count))."""

  def __init__(self, cfg: ml_collections.ConfigDict):
    self.cfg_dict = cfg.to_dict()
    self.qf = None

  def setup(self):
    self.qf = filters.QualityFilter(ml_collections.ConfigDict(self.cfg_dict))

  def process(self, kv):
    key, rec = kv
    src = _source(rec)
    yield "stats", (("in/docs", src), 1)
    text, stats = self.qf(rec["text"], rec.get("lang", "unknown"))
    for name, n in stats.items():
      yield "stats", ((name, src), n)
    if text is not None:
      rec = dict(rec, text=text)
      yield "docs", (key, rec)


# ----------------------------------------------------------------------------------------------
# 3./4. Near duplicates


class _Signatures(beam.DoFn):
  """Batch (bucket, [(key, rank, text)]) -> ((band, band key), (rank, key, signature)) for every
  band of every item with at least one shingle."""

  def __init__(self, ngram, num_perm, bands, rows, seed):
    self.ngram, self.num_perm, self.bands, self.rows, self.seed = ngram, num_perm, bands, rows, seed
    self.perms = None

  def setup(self):
    self.perms = minhash.make_permutations(self.num_perm, self.seed)

  def process(self, kv):
    _, items = kv
    items = list(items)
    for i in range(0, len(items), _CHUNK):
      batch = items[i:i + _CHUNK]
      hashes, counts = minhash.batch_shingle_hashes([t for _, _, t in batch], self.ngram)
      sigs = minhash.signatures_from_hashes(hashes, counts, self.perms)
      keys = minhash.band_keys(sigs, self.bands, self.rows)
      for (key, rank, _), sig, bk, c in zip(batch, sigs, keys, counts):
        if c == 0:  # no word characters: nothing to compare
          continue
        for b, k in enumerate(bk.tolist()):
          yield (b, k), (rank, key, sig)


def _bucket_edges(kv, max_pairs_bucket, threshold):
  """Band bucket -> verified edges ((rank_a, key_a), (rank_b, key_b)), a before b in rank order.

  Candidates are all pairs of the bucket (a star from the best-ranked member above
  ``max_pairs_bucket`` members); a candidate is an edge when the share of equal signature values
  reaches ``threshold``. The signatures travel with the band entries, so verifying needs no join.
  A pair that shares several bands is verified in each; ``Distinct`` keeps one copy.
  """
  _, members = kv
  members = sorted(members, key=lambda m: (m[0], m[1]))
  if len(members) < 2:
    return
  left, right = minhash.bucket_edges(np.arange(len(members)), max_pairs_bucket)
  sigs = np.stack([m[2] for m in members])
  sim = np.mean(sigs[left] == sigs[right], axis=1)
  for i, j in zip(left[sim >= threshold].tolist(), right[sim >= threshold].tolist()):
    yield (members[i][0], members[i][1]), (members[j][0], members[j][1])


# Connected components (Kiveris, Lattanzi, Mirrokni, Rastogi, Vassilvitskii: "Connected Components
# in MapReduce and Beyond", SoCC 2014). Nodes are totally ordered; the graph is kept as directed
# pairs (u, v) and (v, u). Both steps keep every component connected and never add edges:
#   large-star at u: connect each neighbour v > u to m = min(u, neighbours of u);
#   small-star at u: connect u and each neighbour v < u to m = min(neighbours below u).
# At the fixed point every component is a star around its smallest node, which is then its
# representative: the best-ranked member, the same one the in-process union-find picks.


def _both_ways(edge):
  a, b = edge
  if a != b:
    yield a, b
    yield b, a


def _large_star(kv):
  u, nbrs = kv
  nbrs = set(nbrs)
  m = min(min(nbrs), u)
  for v in nbrs:
    if v > u:
      yield v, m
      yield m, v


def _small_star(kv):
  u, nbrs = kv
  low = {v for v in nbrs if v < u}
  if not low:
    return
  m = min(low)
  yield u, m
  yield m, u
  for v in low:
    if v != m:
      yield v, m
      yield m, v


class NotConverged(RuntimeError):
  """Connected components did not reach a fixed point within the unrolled rounds."""


def _star_members(kv, rounds, label):
  """Final check at node u: u is a centre (all neighbours larger) or a leaf (one, smaller
  neighbour). Centres emit (member, (centre, size)) for themselves and every leaf.

  A leaf's neighbour m is then a centre: m has the larger neighbour u, so m passes only as a
  centre. Any other shape means the iteration has not converged, and the run stops.
  """
  u, nbrs = kv
  nbrs = set(nbrs)
  m = min(nbrs)
  if m > u:
    size = len(nbrs) + 1
    yield u, (u, size)
    for v in nbrs:
      yield v, (u, size)
  elif len(nbrs) != 1:
    raise NotConverged(
        f"{label}: connected components did not converge in {rounds} large-star/small-star "
        f"rounds (node {u!r} still has {len(nbrs)} neighbours, {sum(v < u for v in nbrs)} of them "
        "smaller); rerun with a larger --cc-rounds")


class ConnectedComponents(beam.PTransform):
  """Edges (a, b) of comparable nodes -> (node, (smallest node of its component, component size))
  for every node on an edge; ``rounds`` large-star/small-star rounds, then a star check.

  Each step is a GroupByKey on the node, so a worker holds one node's neighbourhood at a time
  (a component's size at most), never the edge list. Edges never grow in number from one round
  to the next. Raises ``NotConverged`` from the check when ``rounds`` were too few.
  """

  def __init__(self, rounds: int, label: str | None = None):
    super().__init__(label)
    if not isinstance(rounds, int) or rounds < 1:
      raise ValueError(f"rounds = {rounds!r} is invalid; allowed: an integer >= 1")
    self.rounds = rounds

  def expand(self, edges):
    adj = edges | "BothWays" >> beam.FlatMap(_both_ways)
    for r in range(self.rounds):
      adj = (adj
             | f"GroupLarge{r}" >> beam.GroupByKey()
             | f"LargeStar{r}" >> beam.FlatMap(_large_star)
             | f"GroupSmall{r}" >> beam.GroupByKey()
             | f"SmallStar{r}" >> beam.FlatMap(_small_star))
    return (adj
            | "GroupFinal" >> beam.GroupByKey()
            | "StarCheck" >> beam.FlatMap(_star_members, self.rounds, self.label))


def auto_cc_rounds(input_bytes: int) -> int:
  """Rounds for inputs of ``input_bytes``: bit_length(n) + 2 for n = input_bytes / 13, the most
  nodes (documents or sentences) a component can have.

  Kiveris et al. prove O(log^2 n) rounds; the slowest shape measured is a path, which needs
  about log2(n) + 1 rounds in any node order (7 at 100 nodes, 10 at 10^3, 14 at 10^4, 17 at
  10^5; near-duplicate clusters, near-cliques, take 2-3). The star check after the last round
  stops the run with ``NotConverged`` if a component has not converged, so a too-small bound
  fails loudly instead of splitting clusters. 23 rounds for the 15 MB default corpus.
  """
  return max(2, input_bytes // _MIN_RECORD_BYTES).bit_length() + 2


def _batch_key(item, num_batches):
  return shard_of(item[0], num_batches), item


def _cluster_of_key(kv):
  (_, key), ((_, rep_key), size) = kv
  return key, (rep_key, size)


def _cluster_stats(kv, label):
  key, (rep, size) = kv
  if key == rep:
    yield (f"{label}/cluster_size={size}", "all"), 1
    yield (f"{label}/clusters", "all"), 1


class NearDuplicates(beam.PTransform):
  """(key, rank, text) -> clusters: (key, (rep_key, size)) for members of 2+ clusters; and stats.

  Returns a dict with ``clusters`` and ``stats`` PCollections.
  """

  def __init__(self, d: ml_collections.ConfigDict, label: str, num_batches: int = 1,
               cc_rounds: int = 24):
    super().__init__(label)
    self.d = d
    self.name = label
    self.bands, self.rows = lsh_shape(d)
    self.num_batches = max(1, int(num_batches))
    self.cc_rounds = cc_rounds

  def expand(self, items):
    d = self.d
    edges = (items
             | "BatchKey" >> beam.Map(_batch_key, self.num_batches)
             | "GroupBatches" >> beam.GroupByKey()
             | "Signatures" >> beam.ParDo(_Signatures(d.ngram, d.num_perm, self.bands, self.rows,
                                                      d.seed))
             | "GroupBands" >> beam.GroupByKey()
             | "VerifyBuckets" >> beam.FlatMap(_bucket_edges, d.max_pairs_bucket, d.threshold)
             | "DistinctEdges" >> beam.Distinct())
    clusters = (edges
                | "Components" >> ConnectedComponents(self.cc_rounds, f"{self.name}/components")
                | "ByKey" >> beam.Map(_cluster_of_key))
    stats = (
        (clusters | "ClusterStats" >> beam.FlatMap(_cluster_stats, self.name),
         edges | "PairStats" >> beam.Map(lambda _, n: ((f"{n}/verified_pairs", "all"), 1),
                                         self.name))
        | "FlattenStats" >> beam.Flatten())
    return {"clusters": clusters, "stats": stats}


def _doc_rank(rec: dict):
  # Validation first (it must keep its copy), then the longest text, then the key.
  return (0 if rec["_split"] == "validation" else 1, -len(rec["text"]), rec["_key"])


class _ApplyDocClusters(beam.DoFn):
  """(key, {doc: [rec], cluster: [(rep, size)]}) -> ("docs", kept (key, rec)) with ``_cluster``
  size | ("stats", ...) for removed near-duplicates."""

  def process(self, kv):
    key, g = kv
    cluster = list(g["cluster"])
    for rec in g["doc"]:
      rep, size = cluster[0] if cluster else (key, 1)
      if rep != key:
        yield "stats", (("doc/near_duplicate", _source(rec)), 1)
        continue
      yield "docs", (key, dict(rec, _cluster=size))


def _sentences(kv, min_chars, langs):
  key, rec = kv
  if rec.get("lang", "unknown") not in langs:
    return
  split_rank = 0 if rec["_split"] == "validation" else 1
  for i, s in enumerate(filters.split_sentences(rec["text"])):
    if len("".join(s.split())) >= min_chars:
      yield f"{key}#{i:06d}", (split_rank, key, i), s


class _CutSentences(beam.DoFn):
  """(key, {doc: [rec], cut: [sentence index]}) -> ("docs", doc without its duplicate sentences)
  | ("stats", ...)."""

  def __init__(self, min_chars):
    self.min_chars = min_chars

  def process(self, kv):
    key, g = kv
    cut = set(g["cut"])
    for rec in g["doc"]:
      if not cut:
        yield "docs", (key, rec)
        continue
      spans = filters.split_sentences(rec["text"])
      text = "".join(s for i, s in enumerate(spans) if i not in cut).strip()
      src = _source(rec)
      yield "stats", (("sentence/near_duplicate", src), len(cut))
      if len("".join(text.split())) < max(self.min_chars, 1):
        yield "stats", (("doc/too_short_after_sentence_dedup", src), 1)
        continue
      yield "docs", (key, dict(rec, text=text))


# ----------------------------------------------------------------------------------------------
# 5./6. Weights and output


def _grow_partials(partials: list, x: float) -> list:
  """Adds x to a list of non-overlapping float partials whose sum is exact (Shewchuk)."""
  i = 0
  for y in partials:
    if abs(x) < abs(y):
      x, y = y, x
    hi = x + y
    lo = y - (hi - x)
    if lo:
      partials[i] = lo
      i += 1
    x = hi
  partials[i:] = [x]
  return partials


class ExactSum(beam.CombineFn):
  """Float sum rounded once from the exact value, so it has the same bits in any order and any
  split into partial sums (``sum`` does not; weights would differ between runners)."""

  def create_accumulator(self):
    return []

  def add_input(self, mutable_accumulator, element):
    return _grow_partials(mutable_accumulator, float(element))

  def merge_accumulators(self, accumulators):
    out = []
    for acc in accumulators:
      for x in acc:
        out = _grow_partials(out, x)
    return out

  def extract_output(self, accumulator):
    return math.fsum(accumulator)


def _weighted_chars(kv, beta, floor):
  _, rec = kv
  f = mixture.cluster_factor(rec.get("_cluster", 1), beta, floor)
  return mixture.group(rec.get("lang", "unknown"), rec.get("category", "unknown")), f * len(rec["text"])


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


def _write_whole_file(path: str, lines) -> None:
  """Writes a file from one worker: a uniquely named temporary file, then a rename, so a retried
  or concurrent attempt never leaves a partial file under the final name. The directory need not
  exist (Beam's local filesystem creates it; object stores have none)."""
  tmp = f"{path}.tmp-{uuid.uuid4().hex}"
  with FileSystems.create(tmp, compression_type=CompressionTypes.UNCOMPRESSED) as f:
    for line in lines:
      f.write(line.encode("utf-8"))
  FileSystems.rename([tmp], [path])


class _WriteShard(beam.DoFn):
  """((split, shard), {docs, factors, file}) -> one sorted JSONL file, written even when empty;
  yields ("stats", per-source counts) and ("file", path)."""

  def __init__(self, out, num_shards, beta, floor):
    self.out, self.num_shards, self.beta, self.floor = out, num_shards, beta, floor

  def process(self, kv):
    (split, shard), g = kv
    docs = sorted(g["docs"], key=lambda x: x[0])
    factors = next(iter(g["factors"]), None)
    path = shard_path(self.out, split, shard, self.num_shards)
    counts = collections.Counter()
    lines = []
    for _, rec in docs:
      w = mixture.document_weight(factors, rec.get("lang", "unknown"),
                                  rec.get("category", "unknown"), rec.get("_cluster", 1),
                                  self.beta, self.floor)
      rec = dict(rec, weight=w)
      lines.append(json.dumps(output_record(rec), ensure_ascii=False, sort_keys=True) + "\n")
      counts[("out/docs", _source(rec))] += 1
      counts[("out/chars", _source(rec))] += len(rec["text"])
      counts[(f"out/docs/{split}", _source(rec))] += 1
    _write_whole_file(path, lines)
    for item in counts.items():
      yield "stats", item
    yield "file", path


def _write_rejected(kv, out):
  _, g = kv
  rows = sorted(g["rows"])
  path = FileSystems.join(out, REJECTED)
  _write_whole_file(path, (json.dumps({"file": p, "line": line, "reason": reason},
                                      ensure_ascii=False) + "\n" for p, line, reason in rows))
  yield path


def report_dict(stats, reasons, cfg_dict: dict, lsh: dict, defaults=()) -> dict:
  """The ``clean_report.json`` content.

  Args:
    stats: ((name, source), value) summed per key.
    reasons: (reason prefix, count) of rejected lines.
    cfg_dict: the config as a dict.
    lsh: {"doc": [bands, rows], "sentence": [...]}.
    defaults: names reported as ``{"all": 0}`` when nothing counted them (e.g. no verified pair).
  """
  table = collections.defaultdict(dict)
  for (name, src), v in stats:
    table[name][src] = v
  for name in defaults:
    table.setdefault(name, {"all": 0})
  by_reason = dict(sorted(reasons))
  return {
      "stats": {name: dict(sorted(v.items())) for name, v in sorted(table.items())},
      "rejected": {"count": sum(by_reason.values()), "by_reason": by_reason},
      "config": cfg_dict,
      "lsh": lsh,
  }


def _write_report(kv, out, cfg_dict, lsh, defaults):
  _, parts = kv
  stats, reasons = [], []
  for kind, item in parts:
    if kind == "stat":
      stats.append(item)
    elif kind == "rejected":
      reasons.append(item)
  report = report_dict(stats, reasons, cfg_dict, lsh, defaults)
  path = FileSystems.join(out, REPORT)
  _write_whole_file(path, [json.dumps(report, ensure_ascii=False, indent=1, sort_keys=True,
                                      default=list) + "\n"])
  yield path


def build_pipeline(p: beam.Pipeline, corpus: str, out: str, cfg: ml_collections.ConfigDict,
                   cc_rounds: int = DEFAULT_CC_ROUNDS, split_bytes: int = DEFAULT_SPLIT_BYTES,
                   ranges=None):
  """Adds the cleaning transforms to pipeline ``p``; they write every output under ``out``.

  Args:
    p: a Beam pipeline.
    corpus: input directory (local path or a URI Beam's FileSystems understands, e.g. gs://).
    out: output directory (need not exist).
    cfg: ``default_config()``-shaped config (validated here).
    cc_rounds: large-star/small-star rounds of ``ConnectedComponents`` (None: ``auto_cc_rounds``
      of the input size).
    split_bytes: input bytes per read task.
    ranges: ``input_splits(...)`` if already listed.
  Returns:
    dict of PCollections: ``stats`` ((name, source), count), ``rejected`` (file, line, reason),
    ``outputs`` (paths of the files written; the pipeline's single final transform).
  """
  validate(cfg)
  if ranges is None:
    ranges = input_splits(corpus, cfg.splits, split_bytes)
  total_bytes = sum(end - start for _, _, start, end in ranges)
  num_batches = max(1, math.ceil(total_bytes / BATCH_BYTES))
  if cc_rounds is None:
    cc_rounds = auto_cc_rounds(total_bytes)
  read = (p | "Ranges" >> beam.Create(ranges)
          | "Read" >> beam.ParDo(ReadSplit()))
  rejected = _select(read, "rejected", "Rejected")
  stats = []
  q = _select(read, "docs", "Docs") | "Quality" >> beam.ParDo(QualityFilterFn(cfg.filters))
  stats.append(_select(q, "stats", "QualityStats"))
  docs = _select(q, "docs", "QualityDocs")
  defaults = []

  if cfg.dedup.enabled:
    docs = _dedup_documents(docs, cfg.dedup, num_batches, cc_rounds, stats, defaults)
  if cfg.sentence_dedup.enabled:
    docs = _cut_duplicate_sentences(docs, cfg, num_batches, cc_rounds, stats, defaults)
  factors = _mixture_factors(docs, cfg.mixture)
  shards = _write_shards(p, docs, factors, cfg, out)
  stats.append(_select(shards, "stats", "ShardStats"))
  stats.append(factors | "FactorStats" >> beam.FlatMap(
      lambda f: [((f"mixture/factor/{g}", "all"), float(f"{v:.6g}")) for g, v in sorted(f.items())]))
  all_stats = (stats | "AllStats" >> beam.Flatten()
               | "SumStats" >> beam.CombinePerKey(sum))
  rejected_file, report_file = _write_rejected_and_report(p, rejected, all_stats, cfg, out,
                                                          defaults)
  # Everything above feeds this one transform, applied last (the DaskRunner runs only the graph
  # of the last transform).
  outputs = ((_select(shards, "file", "WrittenShards"), rejected_file, report_file)
             | "Outputs" >> beam.Flatten())
  return {"stats": all_stats, "rejected": rejected, "outputs": outputs}


def _dedup_documents(docs, dcfg, num_batches, cc_rounds, stats: list, defaults: list):
  """``docs`` with near-duplicate documents clustered (``_ApplyDocClusters``); appends the stats
  PCollections to ``stats`` and the report keys that default to 0 to ``defaults``."""
  nd = (docs | "DocItems" >> beam.Map(lambda kv: (kv[0], _doc_rank(kv[1]), kv[1]["text"]))
        | "DocDedup" >> NearDuplicates(dcfg, "dedup/doc", num_batches, cc_rounds))
  stats.append(nd["stats"])
  defaults += ["dedup/doc/clusters", "dedup/doc/verified_pairs"]
  applied = ({"doc": docs, "cluster": nd["clusters"]}
             | "JoinDocClusters" >> beam.CoGroupByKey()
             | "ApplyDocClusters" >> beam.ParDo(_ApplyDocClusters()))
  stats.append(_select(applied, "stats", "DocClusterStats"))
  return _select(applied, "docs", "DocClusterDocs")


def _cut_duplicate_sentences(docs, cfg, num_batches, cc_rounds, stats: list, defaults: list):
  """``docs`` with every non-representative near-duplicate sentence cut (``_CutSentences``);
  appends to ``stats`` and ``defaults`` as ``_dedup_documents`` does."""
  sd = cfg.sentence_dedup
  sents = docs | "SentenceItems" >> beam.FlatMap(_sentences, sd.min_chars, tuple(sd.langs))
  ns = sents | "SentenceDedup" >> NearDuplicates(sd, "dedup/sentence", num_batches, cc_rounds)
  stats.append(ns["stats"])
  defaults += ["dedup/sentence/clusters", "dedup/sentence/verified_pairs"]
  cuts = (ns["clusters"]
          | "NonReps" >> beam.Filter(lambda kv: kv[0] != kv[1][0])
          | "CutIndex" >> beam.Map(lambda kv: (kv[0].rsplit("#", 1)[0], int(kv[0].rsplit("#", 1)[1]))))
  floor = cfg.filters.length.min_chars
  cut = ({"doc": docs, "cut": cuts}
         | "JoinCuts" >> beam.CoGroupByKey()
         | "CutSentences" >> beam.ParDo(_CutSentences(floor)))
  stats.append(_select(cut, "stats", "CutStats"))
  return _select(cut, "docs", "CutDocs")


def _mixture_factors(docs, mcfg):
  """A one-element PCollection: the mixture's per-group weight factors over all of ``docs``."""
  return (docs
          | "WeightedChars" >> beam.Map(_weighted_chars, mcfg.cluster_beta,
                                        mcfg.min_cluster_weight)
          | "SumPerGroup" >> beam.CombinePerKey(ExactSum())
          | "OneKey" >> beam.Map(lambda kv: (None, kv))
          | "AllGroups" >> beam.GroupByKey()
          | "Factors" >> beam.Map(lambda kv: mixture.group_factors(mcfg, dict(sorted(kv[1])))))


def _write_shards(p, docs, factors, cfg, out: str):
  """Writes every (split, shard) file (empty ones too); the result has ``stats`` and ``file``."""
  mcfg, n = cfg.mixture, cfg.num_shards
  shard_keys = [(s, i) for s in cfg.splits for i in range(n)]
  return ({"docs": docs | "ShardKey" >> beam.Map(lambda kv: ((kv[1]["_split"], shard_of(kv[0], n)), kv)),
           "factors": factors | "ToEveryShard" >> beam.FlatMap(lambda f: [(k, f) for k in shard_keys]),
           "file": p | "ShardFiles" >> beam.Create([(k, None) for k in shard_keys])}
          | "GroupShards" >> beam.CoGroupByKey()
          | "WriteShards" >> beam.ParDo(_WriteShard(out, n, mcfg.cluster_beta,
                                                    mcfg.min_cluster_weight)))


def _write_rejected_and_report(p, rejected, all_stats, cfg, out: str, defaults: list):
  """Writes the rejected-lines file and the report; returns the two PCollections of their paths."""
  rejected_file = ({"rows": rejected | "RejectedKey" >> beam.Map(lambda r: (REJECTED, r)),
                    "file": p | "RejectedFile" >> beam.Create([(REJECTED, None)])}
                   | "GroupRejected" >> beam.CoGroupByKey()
                   | "WriteRejected" >> beam.FlatMap(_write_rejected, out))
  reasons = (rejected
             | "Reason" >> beam.Map(lambda r: (r[2].split(":")[0], 1))
             | "CountReasons" >> beam.CombinePerKey(sum))
  lsh = {"doc": list(lsh_shape(cfg.dedup)), "sentence": list(lsh_shape(cfg.sentence_dedup))}
  report_file = ((all_stats | "StatPart" >> beam.Map(lambda kv: (REPORT, ("stat", kv))),
                  reasons | "ReasonPart" >> beam.Map(lambda kv: (REPORT, ("rejected", kv))),
                  p | "ReportFile" >> beam.Create([(REPORT, ("file", None))]))
                 | "ReportParts" >> beam.Flatten()
                 | "GroupReport" >> beam.GroupByKey()
                 | "WriteReport" >> beam.FlatMap(_write_report, out, cfg.to_dict(), lsh,
                                                 tuple(defaults)))
  return rejected_file, report_file


def _clear_outputs(out: str, splits) -> None:
  """Deletes shard files and the report of an earlier run, so a file on disk is always from this
  run (and a failed run leaves no report behind)."""
  patterns = [REPORT] + [p for s in splits for p in (f"{s}.jsonl", f"{s}-*-of-*.jsonl")]
  for pattern in patterns:
    found = FileSystems.match([FileSystems.join(out, pattern)])[0].metadata_list
    if found:
      FileSystems.delete([m.path for m in found])


def run(corpus: str, out: str, cfg: ml_collections.ConfigDict | None = None,
        beam_args: list[str] | None = None, cc_rounds: int = DEFAULT_CC_ROUNDS,
        split_bytes: int = DEFAULT_SPLIT_BYTES) -> dict:
  """Runs the pipeline (which writes every output) and reads back the report.

  Args:
    corpus: directory with ``<split>*.jsonl``.
    out: output directory (created by the pipeline's writers if missing).
    cfg: cleaning config (default: ``default_config()``).
    beam_args: pipeline options, e.g. ``["--runner=DataflowRunner", "--project=..."]``; without
      ``--runner``, the local in-process ``FnApiRunner`` (``DEFAULT_RUNNER``).
    cc_rounds: large-star/small-star rounds of the connected-components step (None: from the
      input size, ``auto_cc_rounds``).
    split_bytes: input bytes per read task.
  Returns:
    the report dict (also in ``out/clean_report.json``).
  """
  cfg = validate(cfg if cfg is not None else default_config())
  if "://" not in corpus and not os.path.isdir(corpus):
    raise FileNotFoundError(f"--corpus {corpus!r} is not a directory (build one with "
                            "`python -m baichuan_jax.data.corpus build --out DIR`)")
  ranges = input_splits(corpus, cfg.splits, split_bytes)
  _clear_outputs(out, cfg.splits)
  beam_args = list(beam_args or [])
  if not any(a == "--runner" or a.startswith("--runner=") for a in beam_args):
    # Beam's DirectRunner first tries the Prism runner, which downloads a binary from GitHub at
    # run time; the in-process FnApiRunner is what it falls back to for this batch pipeline.
    beam_args.append(f"--runner={DEFAULT_RUNNER}")
  options = PipelineOptions(beam_args)
  with beam.Pipeline(options=options) as p:
    build_pipeline(p, corpus, out, cfg, cc_rounds, split_bytes, ranges)
  # Driver-side step after the run: read the report the pipeline wrote.
  with FileSystems.open(FileSystems.join(out, REPORT)) as f:
    return json.loads(f.read().decode("utf-8"))


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


def _beam_option_parser() -> argparse.ArgumentParser:
  """Parser of every pipeline option Beam defines (``PipelineOptions`` subclasses: standard,
  Google Cloud, worker, Flink, Spark, portable, and Dask when dask is installed)."""
  try:  # registers --dask_client_address, --dask_npartitions, ...
    import apache_beam.runners.dask.dask_runner  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
  except ImportError:
    pass
  from apache_beam.options import pipeline_options as po  # pylint: disable=import-outside-toplevel
  parser = po._BeamArgumentParser(allow_abbrev=False)  # pylint: disable=protected-access
  seen = {}
  for cls in po.PipelineOptions.__subclasses__():
    seen.setdefault(str(cls), cls)
  for cls in seen.values():
    cls._add_argparse_args(parser)  # pylint: disable=protected-access
  return parser


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m baichuan_jax.data.clean",
      description="Clean a built corpus with Apache Beam: heuristic quality and safety rules, "
                  "MinHash-LSH near-duplicate removal (documents and sentences), and sampling weights "
                  "(mixture x cluster size). Besides the flags below, only Beam pipeline options "
                  "are accepted: any option a Beam PipelineOptions class defines (e.g. --runner, "
                  "--direct_num_workers, --project, --temp_location, --flink_master, "
                  "--dask_client_address, --dask_npartitions); anything after `--` goes to Beam "
                  "unchecked. Any other flag is an error.",
      epilog="Config overrides: --config.dedup.threshold=0.7 --config.filters.safety.enabled=false "
             "--config.mixture.mode=proportion --config.mixture.weights.zh/news=0.4 "
             "(values parsed as JSON). See docs/data_cleaning.md.")
  parser.add_argument("--corpus", required=True, help="built corpus directory (<split>*.jsonl)")
  parser.add_argument("--out", required=True, help="output directory")
  parser.add_argument("--num-shards", type=int, default=None,
                      help="output files per split (default 1: <split>.jsonl)")
  parser.add_argument("--cc-rounds", type=int, default=DEFAULT_CC_ROUNDS,
                      help="large-star/small-star rounds of the connected-components step; the "
                           "run stops with an error if they were too few (default: from the input "
                           "size, bit_length(bytes / 13) + 2)")
  parser.add_argument("--split-mb", type=float, default=DEFAULT_SPLIT_BYTES / (1 << 20),
                      help="input MiB per read task (default %(default)s)")
  parser.add_argument("--print-config", action="store_true", help="print the config and exit")
  argv = list(sys.argv[1:] if argv is None else argv)
  passthrough = []
  if "--" in argv:
    i = argv.index("--")
    argv, passthrough = argv[:i], argv[i + 1:]
  args, rest = parser.parse_known_args(argv)
  overrides = [a[len("--config."):] for a in rest if a.startswith("--config.")]
  beam_args = [a for a in rest if not a.startswith("--config.")]
  _, unknown = _beam_option_parser().parse_known_args(beam_args)
  if unknown:
    parser.error(f"unrecognized arguments: {' '.join(unknown)} (not a flag of this command, a "
                 "--config.* override or a Beam pipeline option; put options for Beam that it "
                 "does not define after `--`)")
  if args.cc_rounds is not None and args.cc_rounds < 1:
    parser.error(f"--cc-rounds {args.cc_rounds} is invalid; allowed: an integer >= 1")
  if not args.split_mb > 0:
    parser.error(f"--split-mb {args.split_mb} is invalid; allowed: a number > 0")
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
  report = run(args.corpus, args.out, cfg, beam_args + passthrough, cc_rounds=args.cc_rounds,
               split_bytes=max(1, int(args.split_mb * (1 << 20))))
  _print_report(report, args.out)
  print(f"took {time.time() - t0:.1f}s")
  return 0


if __name__ == "__main__":
  sys.exit(main())
