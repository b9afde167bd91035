"""Tokenized corpus as a TensorFlow Datasets dataset stored in ArrayRecord files.

``TokenizedCorpus`` is a TFDS builder over a built (optionally cleaned) corpus directory: one example
per document with ``tokens`` (int32 ids, no bos/eos; the loader adds them), ``weight`` (sampling
weight from the mixture/cluster weights, 1.0 if none), ``source`` and ``id``. ArrayRecord gives
random access, so the loader can shuffle globally and resume at any index without TensorFlow.

    build_tokenized(corpus_dir, tokenizer_path, data_dir) -> path of the prepared dataset
    open_split(dataset_path, split) -> random-access source (len, __getitem__)
    read_index(dataset_path, split) -> {"lengths", "weights"} per document (loader_index-SPLIT.npz)

Command line::

    python -m baichuan_jax.data.tokenized build --corpus DIR --tokenizer MODEL --out DATA_DIR
    python -m baichuan_jax.data.tokenized show DATASET [--split train] [--batches 1] [--seq-len 64]

``show`` prints per-split document/token statistics and decodes the first packed rows (segment by
segment) so the packing can be checked by eye.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

from baichuan_jax.data.corpus import SOURCES, read_jsonl

SPLITS = ("train", "validation")
DATASET_VERSION = "1.0.0"  # the TFDS dataset version: the last directory of its path


def _tfds():
  try:
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  except ImportError as e:  # pragma: no cover
    raise ImportError("the tokenized dataset needs `tensorflow-datasets` and `array-record` "
                      "(TensorFlow itself is not needed): pip install tensorflow-datasets "
                      "array-record") from e
  return tfds


def _builder_class():
  tfds = _tfds()

  class TokenizedCorpus(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """One example per document: token ids, sampling weight, source, id."""

    VERSION = tfds.core.Version(DATASET_VERSION)
    RELEASE_NOTES = {DATASET_VERSION: "Tokenized embedded corpus."}

    def __init__(self, corpus_dir=None, tokenizer_path=None, **kwargs):
      self._corpus_dir = corpus_dir
      self._tokenizer_path = tokenizer_path
      super().__init__(**kwargs)

    def _info(self):
      return tfds.core.DatasetInfo(
          builder=self,
          description="Tokenized documents of the baichuan-jax corpus.",
          features=tfds.features.FeaturesDict({
              "tokens": tfds.features.Tensor(shape=(None,), dtype=np.int32),
              "weight": tfds.features.Scalar(dtype=np.float32),
              "source": tfds.features.ClassLabel(names=list(SOURCES)),
              "id": tfds.features.Text(),
          }))

    def _split_generators(self, dl_manager):
      del dl_manager
      return {s: self._generate_examples(s) for s in SPLITS
              if (Path(self._corpus_dir) / f"{s}.jsonl").exists()}

    def _generate_examples(self, split):
      from baichuan_jax.tokenizer import Tokenizer  # pylint: disable=import-outside-toplevel
      tok = Tokenizer(self._tokenizer_path)
      path = Path(self._corpus_dir) / f"{split}.jsonl"
      batch = []
      for rec in read_jsonl(path):
        if rec.get("source") not in SOURCES:
          raise ValueError(f"{path}: document {rec.get('id')!r} has source {rec.get('source')!r}; "
                           f"allowed: {SOURCES}")
        batch.append(rec)
        if len(batch) == 256:
          yield from _encode_batch(tok, batch)
          batch = []
      yield from _encode_batch(tok, batch)

  return TokenizedCorpus


def _encode_batch(tok, recs):
  ids = tok.encode([r["text"] for r in recs])
  for r, toks in zip(recs, ids):
    w = r.get("weight", 1.0)
    if isinstance(w, bool) or not isinstance(w, (int, float)) or not np.isfinite(w) or w < 0:
      raise ValueError(f"document {r.get('id')!r}: weight={w!r} is invalid; allowed: a finite "
                       "number >= 0")
    yield r["id"], {"tokens": np.asarray(toks, np.int32), "weight": float(w),
                    "source": r["source"], "id": r["id"]}


def build_tokenized(corpus_dir: str | os.PathLike, tokenizer_path: str | os.PathLike,
                    data_dir: str | os.PathLike, progress: bool = True) -> Path:
  """Tokenizes ``corpus_dir/{train,validation}.jsonl`` into ArrayRecord files under ``data_dir``.

  Args:
    corpus_dir: a built (or cleaned) corpus; a document's optional ``weight`` is carried along.
    tokenizer_path: SentencePiece model.
    data_dir: TFDS data directory to write into.
    progress: show TFDS progress bars.
  Returns:
    the prepared dataset directory (``data_dir/tokenized_corpus/1.0.0``), readable by ``open_split``.
  """
  tfds = _tfds()
  if not progress:
    tfds.disable_progress_bar()
  builder = _builder_class()(corpus_dir=str(corpus_dir), tokenizer_path=str(tokenizer_path),
                             data_dir=str(data_dir), file_format="array_record")
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(verify_ssl=False))
  path = Path(builder.data_path)
  for split in builder.info.splits:
    write_index(path, split)
  return path


def write_index(dataset_path: str | os.PathLike, split: str) -> Path:
  """Writes ``loader_index-SPLIT.npz`` (per-document token ``lengths`` and ``weights``).

  The loader needs every document's weight before it can plan an epoch; reading them from this
  small file avoids a pass over the ArrayRecord shards at every start.
  """
  source = open_split(dataset_path, split)
  n = len(source)
  lengths = np.empty(n, np.int64)
  weights = np.empty(n, np.float64)
  for start in range(0, n, 1024):
    recs = source.__getitems__(list(range(start, min(n, start + 1024))))
    for i, rec in enumerate(recs, start):
      lengths[i] = len(rec["tokens"])
      weights[i] = float(rec["weight"])
  out = index_path(dataset_path, split)
  tmp = out.with_name(f"{out.stem}.tmp{os.getpid()}.npz")
  np.savez(tmp, lengths=lengths, weights=weights)
  os.replace(tmp, out)
  return out


def index_path(dataset_path: str | os.PathLike, split: str) -> Path:
  """Location of a split's document index (see ``write_index``)."""
  return Path(dataset_path) / f"loader_index-{split}.npz"


def read_index(dataset_path: str | os.PathLike, split: str) -> dict:
  """``{"lengths", "weights"}`` arrays of a split, written on first use if missing."""
  path = index_path(dataset_path, split)
  if not path.exists():
    write_index(dataset_path, split)
  with np.load(path) as z:
    return {"lengths": z["lengths"], "weights": z["weights"]}


def open_split(dataset_path: str | os.PathLike, split: str = "train"):
  """Random-access source over one split of a prepared dataset (no TensorFlow import)."""
  tfds = _tfds()
  dataset_path = Path(dataset_path)
  if not (dataset_path / "dataset_info.json").exists():
    raise FileNotFoundError(f"{dataset_path} is not a prepared tokenized dataset "
                            "(no dataset_info.json); build it with build_tokenized or default_data")
  builder = tfds.builder_from_directory(str(dataset_path))
  if split not in builder.info.splits:
    raise ValueError(f"split {split!r} not in {dataset_path}; available: {list(builder.info.splits)}")
  return builder.as_data_source(split=split)


def stats(dataset_path: str | os.PathLike) -> dict:
  """Per split: documents, tokens, mean/max document length, summed weight."""
  out = {}
  for split in SPLITS:
    try:
      ix = read_index(dataset_path, split)
    except ValueError:
      continue
    n = len(ix["lengths"])
    out[split] = {"documents": n, "tokens": int(ix["lengths"].sum()),
                  "mean_len": float(ix["lengths"].mean()) if n else 0.0,
                  "max_len": int(ix["lengths"].max()) if n else 0,
                  "weight_sum": float(ix["weights"].sum())}
  return out


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m baichuan_jax.data.tokenized",
                                   description="Build or inspect the tokenized ArrayRecord dataset.")
  sub = parser.add_subparsers(dest="cmd", required=True)
  b = sub.add_parser("build", help="tokenize a built corpus into a TFDS ArrayRecord dataset")
  b.add_argument("--corpus", required=True, help="corpus dir with train.jsonl/validation.jsonl")
  b.add_argument("--tokenizer", required=True, help="SentencePiece .model")
  b.add_argument("--out", required=True, help="TFDS data dir to write")
  s = sub.add_parser("show", help="statistics and the first packed rows, decoded")
  s.add_argument("dataset", help="prepared dataset dir (.../tokenized_corpus/1.0.0)")
  s.add_argument("--tokenizer", default=None, help="model to decode with (default: print ids)")
  s.add_argument("--split", default="train", choices=SPLITS)
  s.add_argument("--rows", type=int, default=2, help="packed rows to print")
  s.add_argument("--seq-len", type=int, default=64)
  args = parser.parse_args(argv)
  if args.cmd == "build":
    path = build_tokenized(args.corpus, args.tokenizer, args.out)
    print(f"wrote {path}")
    args.dataset = path
  for split, st in stats(args.dataset).items():
    print(f"{split:<11} {st['documents']:>8,} docs {st['tokens']:>12,} tokens  mean {st['mean_len']:.1f}"
          f"  max {st['max_len']:,}  weight sum {st['weight_sum']:,.1f}")
  if args.cmd == "show":
    from baichuan_jax.data.loader import Loader  # pylint: disable=import-outside-toplevel
    tok = None
    if args.tokenizer:
      from baichuan_jax.tokenizer import Tokenizer  # pylint: disable=import-outside-toplevel
      tok = Tokenizer(args.tokenizer)
    batch = next(Loader(args.dataset, args.split, batch_size=args.rows, seq_len=args.seq_len,
                        process_index=0, process_count=1))
    for r in range(args.rows):
      seg = batch["segment_ids"][r]
      for k in [k for k in np.unique(seg) if k > 0]:
        ids = batch["inputs"][r][seg == k]
        text = repr(tok.decode(ids.tolist())) if tok else ids.tolist()
        print(f"row {r} segment {k} ({ids.size} tokens, positions {batch['positions'][r][seg == k][0]}.."
              f"{batch['positions'][r][seg == k][-1]}): {text}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
