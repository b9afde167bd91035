"""The data build cache: ``default_data()`` builds, once, each missing piece under ``ROOT``.

    ROOT/corpus/{train,validation}.jsonl, manifest.json        corpus.build (rebuilt when its
                                                               format_version is older)
    ROOT/corpus_clean/{train,validation}.jsonl, clean_report   clean.run, default config (rebuilt
                                                               when the corpus or config changes;
                                                               ``clean=False`` trains on the raw one)
    ROOT/tokenizer/bc{V}.model (+ .vocab, .json)               tokenizer training on the train split
    ROOT/tokenized/bc{V}-{hash}/tokenized_corpus/1.0.0         tokenized.build_tokenized

``ROOT`` is ``root``, else ``$BAICHUAN_JAX_DATA``, else ``~/.cache/baichuan_jax``. Every piece is
built in a temporary sibling directory and renamed into place when complete, so an interrupted
build is never mistaken for a finished one (and two processes building at once both end up with
one complete copy). The tokenized dataset's directory name carries a hash of the corpus files and
the tokenizer model, so changing either builds a new dataset instead of reusing a stale one.

The names here are re-exported by ``baichuan_jax.data`` (``data.default_data()`` etc.).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

from baichuan_jax.data import corpus as corpus_lib

__all__ = ["CLEAN_STAMP", "ENV_VAR", "DataPaths", "default_corpus", "default_data", "default_root",
           "ensure_clean", "ensure_corpus", "ensure_tokenized", "ensure_tokenizer"]

ENV_VAR = "BAICHUAN_JAX_DATA"


def default_root() -> Path:
  """``$BAICHUAN_JAX_DATA`` or ``~/.cache/baichuan_jax``."""
  return Path(os.environ.get(ENV_VAR) or Path.home() / ".cache" / "baichuan_jax")


@dataclasses.dataclass(frozen=True)
class DataPaths:
  """Where the default data lives; also readable as a dict (``paths["dataset_path"]``)."""
  corpus_dir: Path
  tokenizer_path: Path
  dataset_path: Path

  def __getitem__(self, key: str) -> Path:
    if key not in self.keys():
      raise KeyError(f"{key!r}; available: {', '.join(self.keys())}")
    return getattr(self, key)

  def keys(self):
    return tuple(f.name for f in dataclasses.fields(self))

  def as_dict(self) -> dict:
    return {k: str(getattr(self, k)) for k in self.keys()}


def _log(progress: bool, msg: str) -> None:
  if progress:
    print(f"[baichuan_jax.data] {msg}", file=sys.stderr, flush=True)


def _tmp_sibling(final: Path) -> Path:
  tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}-{time.time_ns()}")
  tmp.mkdir(parents=True)
  return tmp


def _publish(tmp: Path, final: Path) -> None:
  """Renames a finished build into place; if another process got there first, keeps theirs."""
  try:
    os.rename(tmp, final)
  except OSError:
    if not final.exists():
      raise
    shutil.rmtree(tmp, ignore_errors=True)


def _file_hash(paths, n: int = 12) -> str:
  h = hashlib.sha1()
  for p in paths:
    with open(p, "rb") as f:
      for block in iter(lambda: f.read(1 << 20), b""):
        h.update(block)
  return h.hexdigest()[:n]


def _corpus_version(path: Path) -> int | None:
  try:
    return int(json.loads((path / "manifest.json").read_text()).get("format_version", 1))
  except (OSError, ValueError):
    return None


def ensure_corpus(root: Path, progress: bool = True, **build_kwargs) -> Path:
  """``ROOT/corpus``, built if missing or written by an older corpus builder."""
  final = root / "corpus"
  version = _corpus_version(final)
  if version == corpus_lib.FORMAT_VERSION:
    return final
  why = "missing" if version is None else f"format {version}, now {corpus_lib.FORMAT_VERSION}"
  _log(progress, f"building corpus -> {final} ({why})")
  tmp = _tmp_sibling(final)
  try:
    corpus_lib.build(tmp, progress=progress, **build_kwargs)
    _replace(tmp, final)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return final


CLEAN_STAMP = "source.json"


def _clean_key(raw: Path) -> str:
  """Hash of the raw corpus files and the cleaning config: a change in either rebuilds."""
  from baichuan_jax.data import clean_config  # pylint: disable=import-outside-toplevel
  cfg = clean_config.default_config().to_json(sort_keys=True)
  return (_file_hash([raw / "train.jsonl", raw / "validation.jsonl"]) + "-"
          + hashlib.sha1(cfg.encode("utf-8")).hexdigest()[:12])


def ensure_clean(raw: Path, root: Path, progress: bool = True) -> Path:
  """``ROOT/corpus_clean``: ``raw`` through the cleaning pipeline (``baichuan_jax.data.clean``:
  quality rules, document and sentence MinHash-LSH dedup, sampling weights) with its default
  config, on Beam's in-process FnApiRunner. Rebuilt when the raw corpus or the default config
  changes (``source.json`` records both). About a minute on 2 CPU cores; Beam is imported only
  when a build is needed.
  """
  final = root / "corpus_clean"
  key = _clean_key(raw)
  try:
    if json.loads((final / CLEAN_STAMP).read_text())["key"] == key:
      return final
    why = "raw corpus or cleaning config changed"
  except (OSError, ValueError, KeyError):
    why = "missing"
  _log(progress, f"cleaning {raw} -> {final} ({why}; quality rules, MinHash-LSH dedup, "
                 "sampling weights; about a minute)")
  from baichuan_jax.data import clean as clean_lib  # pylint: disable=import-outside-toplevel
  tmp = _tmp_sibling(final)
  try:
    report = clean_lib.run(str(raw), str(tmp))
    (tmp / CLEAN_STAMP).write_text(json.dumps({"key": key, "raw_corpus": str(raw)}) + "\n")
    docs = {k: sum(report["stats"].get(k, {}).values()) for k in ("in/docs", "out/docs")}
    _log(progress, f"cleaned corpus: {docs['in/docs']} documents in, {docs['out/docs']} out "
                   f"(report: {final / clean_lib.REPORT})")
    _replace(tmp, final)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return final


def default_corpus(root: str | os.PathLike | None = None, clean: bool = True,
                   progress: bool = True) -> Path:
  """The corpus folder the main job trains on: ``ROOT/corpus_clean`` (``clean=True``) or the raw
  ``ROOT/corpus``; builds what is missing (no tokenizer, no tokenized dataset)."""
  root = Path(root) if root is not None else default_root()
  root.mkdir(parents=True, exist_ok=True)
  raw = ensure_corpus(root, progress)
  return ensure_clean(raw, root, progress) if clean else raw


def _replace(tmp: Path, final: Path) -> None:
  """Publishes the finished build ``tmp`` as ``final``, moving a stale ``final`` aside first
  (readers of data derived from it are unaffected)."""
  if final.exists():
    old = final.with_name(f".{final.name}.old-{os.getpid()}-{time.time_ns()}")
    try:
      os.rename(final, old)
      shutil.rmtree(old, ignore_errors=True)
    except OSError:
      pass  # another process replaced it already
  _publish(tmp, final)


def ensure_tokenizer(corpus_dir: Path, root: Path, vocab_size: int, progress: bool = True,
                     limit: int | None = None) -> Path:
  """``ROOT/tokenizer/bc{vocab_size}.model`` trained on the corpus train split (if missing)."""
  from baichuan_jax.tokenizer import training as tok_train  # pylint: disable=import-outside-toplevel
  final = root / "tokenizer"
  model = final / f"bc{vocab_size}.model"
  if model.exists():
    return model
  _log(progress, f"training a {vocab_size}-piece tokenizer -> {model}")
  tmp = _tmp_sibling(final.with_name(f"tokenizer-bc{vocab_size}"))
  try:
    tok_train.train([corpus_dir / "train.jsonl"], vocab_size, tmp / f"bc{vocab_size}",
                    limit=limit, verbose=False)
    final.mkdir(parents=True, exist_ok=True)
    # The .model file is what marks the tokenizer present, so it is moved last.
    for suffix in (".vocab", ".json", ".model"):
      os.replace(tmp / f"bc{vocab_size}{suffix}", final / f"bc{vocab_size}{suffix}")
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return model


def ensure_tokenized(corpus_dir: Path, tokenizer_path: Path, root: Path,
                     progress: bool = True) -> Path:
  """Prepared TFDS dataset for (corpus, tokenizer), keyed by a hash of both (built if missing)."""
  from baichuan_jax.data import tokenized  # pylint: disable=import-outside-toplevel
  key = _file_hash([corpus_dir / "train.jsonl", corpus_dir / "validation.jsonl", tokenizer_path])
  final = root / "tokenized" / f"{Path(tokenizer_path).stem}-{key}"
  dataset = final / "tokenized_corpus" / tokenized.DATASET_VERSION
  if (dataset / "dataset_info.json").exists():
    return dataset
  _log(progress, f"tokenizing {corpus_dir} -> {final}")
  tmp = _tmp_sibling(final)
  try:
    tokenized.build_tokenized(corpus_dir, tokenizer_path, tmp, progress=progress)
    shutil.rmtree(tmp / "downloads", ignore_errors=True)
    _publish(tmp, final)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return dataset


def default_data(vocab_size: int = 4096, root: str | os.PathLike | None = None,
                 progress: bool = True, corpus_dir: str | os.PathLike | None = None,
                 tokenizer_limit: int | None = None, clean: bool = True) -> DataPaths:
  """Builds (once) the corpus, its cleaned version, a Baichuan-style tokenizer and the tokenized
  dataset.

  About two minutes on 2 CPU cores the first time (corpus ~15 s, cleaning ~60 s, tokenizer
  ~15 s, tokenizing ~30 s); later calls only check that the files exist.

  Args:
    vocab_size: tokenizer vocabulary (4096 for the ``tiny`` preset, 8192 for ``small``).
    root: cache directory (default ``$BAICHUAN_JAX_DATA`` or ``~/.cache/baichuan_jax``).
    progress: log steps and show progress bars on stderr.
    corpus_dir: use this built corpus (e.g. the cleaned one, whose documents carry ``weight``)
      instead of ``ROOT/corpus``; the tokenizer is still cached per vocabulary under ``ROOT``.
    tokenizer_limit: train the tokenizer on at most this many documents (None = all).
    clean: train on ``ROOT/corpus_clean`` (``ensure_clean``) rather than the raw ``ROOT/corpus``;
      ignored when ``corpus_dir`` is given (that corpus is used as it is).
  Returns:
    DataPaths(corpus_dir, tokenizer_path, dataset_path).
  """
  root = Path(root) if root is not None else default_root()
  root.mkdir(parents=True, exist_ok=True)
  if corpus_dir is None:
    cdir = default_corpus(root, clean, progress)
  else:
    cdir = Path(corpus_dir)
    missing = [n for n in ("train.jsonl", "validation.jsonl") if not (cdir / n).exists()]
    if missing:
      raise FileNotFoundError(f"corpus_dir={cdir} lacks {', '.join(missing)}; build one with "
                              "`python -m baichuan_jax.data.corpus build --out DIR`")
  tok = ensure_tokenizer(cdir, root, vocab_size, progress, tokenizer_limit)
  dataset = ensure_tokenized(cdir, tok, root, progress)
  return DataPaths(corpus_dir=cdir, tokenizer_path=tok, dataset_path=dataset)
