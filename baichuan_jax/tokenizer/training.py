"""Training Baichuan-style SentencePiece tokenizers, and the compression report.

Commands (``python -m baichuan_jax.tokenizer.training`` is the same CLI)::

    python -m baichuan_jax.data.tokenizer train --input train.jsonl --vocab-size 4096 --out tok/bc4k
    python -m baichuan_jax.data.tokenizer report [--corpus DIR] [--out FILE.md] [--extra NAME=MODEL]

Compression rate (undefined by Baichuan) is reported two ways, per corpus slice: tokens per
Unicode character (lower = stronger compression) and UTF-8 bytes per token (higher = stronger).

Baichuan's options: BPE; identity normalisation (the raw text is not rewritten, so full-width
and half-width forms stay distinct); every digit its own piece; whitespace-only pieces so runs of
spaces (code indentation) become single tokens; byte fallback so any string round-trips; character
coverage 0.9999; pieces at most 32 characters. Ids 0/1/2 are ``<unk>``/``<s>``/``</s>``; ids 3..194
are reserved control pieces and 195/196 are ``<user>``/``<assistant>``, as in Baichuan. Newline is
a user-defined piece (id 197) because training sentences keep their line breaks.

Small vocabularies cannot hold every character that 0.9999 coverage asks for (the default corpus has
~4,900 such characters, more than a 4,096 vocabulary). ``train`` then lowers the coverage to the
largest value whose character set fills at most ``--max-char-fraction`` of the free vocabulary, says
so, and records it; rarer characters fall back to UTF-8 bytes.
"""

from __future__ import annotations

import argparse
import collections
import io
import json
import os
import sys
from pathlib import Path
from typing import Iterable, Iterator

from baichuan_jax.tokenizer.special import (ASSISTANT_ID, BOS_ID, EOS_ID, FIRST_RESERVED_ID,
                                            PAD_ID, USER_ID)

N_RESERVED = USER_ID - FIRST_RESERVED_ID  # ids 3..194
# Control pieces in id order from id 3, so that <user>/<assistant> land at USER_ID/ASSISTANT_ID.
CONTROL_SYMBOLS = ([f"<reserved_{i}>" for i in range(FIRST_RESERVED_ID, USER_ID)]
                   + ["<user>", "<assistant>"])
USER_DEFINED = ["\n"]
BAICHUAN_COVERAGE = 0.9999
MAX_PIECE_LEN = 32
MIN_COVERAGE = 0.98  # SentencePiece's lower limit for character_coverage
# SentencePiece skips training sentences longer than max_sentence_length bytes; documents are fed in
# chunks of about this many characters, cut at line ends.
CHUNK_CHARS = 1000


def read_texts(paths: Iterable[str | os.PathLike], limit: int | None = None) -> Iterator[str]:
  """Texts from ``.jsonl`` (the ``text`` field) or plain-text files (the whole file is one text).

  Raises:
    ValueError naming file and line for a malformed JSONL line or invalid UTF-8.
  """
  n = 0
  for p in paths:
    p = Path(p)
    if not p.exists():
      raise FileNotFoundError(f"tokenizer input not found: {p}")
    if p.suffix == ".jsonl":
      from baichuan_jax.data.corpus import read_jsonl  # pylint: disable=import-outside-toplevel
      for rec in read_jsonl(p):
        if limit is not None and n >= limit:
          return
        yield rec["text"]
        n += 1
    else:
      from baichuan_jax.records import decode_utf8  # pylint: disable=import-outside-toplevel
      yield decode_utf8(p.read_bytes(), p)
      n += 1


def chunk_text(text: str, size: int = CHUNK_CHARS) -> Iterator[str]:
  """Splits a document at line ends into pieces of about ``size`` characters (newlines kept)."""
  cur: list[str] = []
  n = 0
  for line in text.splitlines(keepends=True):
    if cur and n + len(line) > size:
      yield "".join(cur)
      cur, n = [], 0
    while len(line) > size * 4:  # a single huge line (minified data) is cut hard
      yield line[: size * 4]
      line = line[size * 4:]
    cur.append(line)
    n += len(line)
  if cur:
    yield "".join(cur)


def fit_character_coverage(char_counts: collections.Counter, vocab_size: int,
                           target: float = BAICHUAN_COVERAGE, max_char_fraction: float = 0.6,
                           n_special: int = 3 + len(CONTROL_SYMBOLS) + len(USER_DEFINED)) -> float:
  """Largest coverage <= ``target`` whose required characters fit the vocabulary budget.

  Args:
    char_counts: character frequencies of the training text.
    vocab_size: total vocabulary.
    target: wanted coverage (Baichuan: 0.9999).
    max_char_fraction: at most this fraction of the non-special, non-byte vocabulary for characters.
  Returns:
    coverage in (0, target]; equals ``target`` when the characters fit.
  """
  budget = int((vocab_size - n_special - 256) * max_char_fraction)
  total = sum(char_counts.values())
  if total == 0:
    raise ValueError("tokenizer training text is empty")
  acc = 0
  covered_at_budget = 0.0
  for i, (_, n) in enumerate(char_counts.most_common()):
    acc += n
    if i + 1 == budget:
      covered_at_budget = acc / total
      break
  else:
    return target
  if covered_at_budget >= target:
    return target
  # Coverage is the fraction of character occurrences: stop just below the budget's coverage so
  # SentencePiece's own count matches ours. SentencePiece refuses coverage below 0.98.
  return max(MIN_COVERAGE, float(f"{covered_at_budget - 1e-6:.6f}"))


def train(inputs: Iterable[str | os.PathLike], vocab_size: int, out_prefix: str | os.PathLike,
          split_digits: bool = True, whitespace_pieces: bool = True,
          character_coverage: float = BAICHUAN_COVERAGE, max_piece_length: int = MAX_PIECE_LEN,
          max_char_fraction: float = 0.6, limit: int | None = None, num_threads: int | None = None,
          baichuan_specials: bool = True, verbose: bool = True) -> dict:
  """Trains a SentencePiece BPE model and writes ``PREFIX.model``, ``PREFIX.vocab``, ``PREFIX.json``.

  Args:
    inputs: corpus ``.jsonl`` files or plain-text files.
    vocab_size: vocabulary size (>= 1024 with Baichuan specials).
    out_prefix: output path prefix.
    split_digits / whitespace_pieces: Baichuan options; the LLaMA-style baseline turns both off.
    character_coverage: wanted coverage; lowered automatically if the vocabulary is too small.
    limit: use at most this many documents.
    baichuan_specials: reserve ids 3..196 (``<reserved_N>``, ``<user>``, ``<assistant>``).
  Returns:
    dict of the options used (also saved as ``PREFIX.json``).
  """
  import sentencepiece as spm  # pylint: disable=import-outside-toplevel

  specials = (CONTROL_SYMBOLS if baichuan_specials else [])
  n_special = 3 + len(specials) + len(USER_DEFINED)
  if vocab_size < n_special + 256 + 64:
    raise ValueError(f"vocab_size={vocab_size} too small: needs > {n_special + 256 + 64} "
                     f"({n_special} special + 256 byte pieces + merges)")
  if not 0.0 < character_coverage <= 1.0:
    raise ValueError(f"character_coverage must be in (0, 1], got {character_coverage}")
  if not 1 <= max_piece_length <= 64:
    raise ValueError(f"max_piece_length must be in [1, 64], got {max_piece_length}")
  chunks = [c for t in read_texts(inputs, limit) for c in chunk_text(t)]
  counts = collections.Counter()
  for c in chunks:
    counts.update(c)
  counts.pop("\n", None)
  coverage = fit_character_coverage(counts, vocab_size, character_coverage, max_char_fraction,
                                     n_special)
  if verbose and coverage < character_coverage:
    print(f"character_coverage lowered {character_coverage} -> {coverage}: {len(counts)} distinct "
          f"characters do not fit a {vocab_size} vocabulary; rarer ones use byte fallback",
          file=sys.stderr)
  model = io.BytesIO()
  options = dict(
      model_type="bpe", vocab_size=vocab_size, character_coverage=coverage,
      normalization_rule_name="identity", add_dummy_prefix=False, remove_extra_whitespaces=False,
      split_digits=split_digits, allow_whitespace_only_pieces=whitespace_pieces,
      byte_fallback=True, max_sentencepiece_length=max_piece_length,
      unk_id=PAD_ID, bos_id=BOS_ID, eos_id=EOS_ID, pad_id=-1,
      control_symbols=specials, user_defined_symbols=USER_DEFINED,
      max_sentence_length=CHUNK_CHARS * 16, input_sentence_size=2_000_000,
      shuffle_input_sentence=True, num_threads=num_threads or os.cpu_count() or 1,
      minloglevel=0 if verbose else 2)
  if not whitespace_pieces:
    # LLaMA-style: spaces only ever start a word piece; runs of spaces are split one by one.
    options["split_by_whitespace"] = True
  spm.SentencePieceTrainer.train(sentence_iterator=iter(chunks), model_writer=model, **options)
  out_prefix = Path(out_prefix)
  out_prefix.parent.mkdir(parents=True, exist_ok=True)
  Path(f"{out_prefix}.model").write_bytes(model.getvalue())
  sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
  with open(f"{out_prefix}.vocab", "w", encoding="utf-8") as f:
    for i in range(sp.vocab_size()):
      f.write(f"{sp.id_to_piece(i)}\t{sp.get_score(i)}\n")
  meta = {k: v for k, v in options.items() if k not in ("control_symbols", "num_threads", "minloglevel")}
  meta.update(requested_character_coverage=character_coverage, training_chunks=len(chunks),
              distinct_characters=len(counts), baichuan_specials=baichuan_specials)
  Path(f"{out_prefix}.json").write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
  if baichuan_specials:
    assert sp.id_to_piece(USER_ID) == "<user>" and sp.id_to_piece(ASSISTANT_ID) == "<assistant>"
  return meta


SLICES = (("zh news", "zh_news"), ("zh reviews", "zh_reviews"), ("en prose", "en_prose"),
          ("code", "code"))


def compression(encode, texts: list[str]) -> dict:
  """Compression of a tokenizer on texts (no bos/eos).

  Args:
    encode: function list[str] -> list[list[int]] (or any sequences of tokens).
    texts: documents.
  Returns:
    dict with ``chars``, ``bytes`` (UTF-8), ``tokens``, ``tokens_per_char`` (lower is better) and
    ``bytes_per_token`` (higher is better).
  """
  chars = sum(len(t) for t in texts)
  nbytes = sum(len(t.encode("utf-8")) for t in texts)
  tokens = sum(len(x) for x in encode(texts))
  return {"chars": chars, "bytes": nbytes, "tokens": tokens,
          "tokens_per_char": tokens / max(chars, 1), "bytes_per_token": nbytes / max(tokens, 1)}


def report(corpus_dir: str | os.PathLike | None = None, vocab_size: int = 32000,
           work_dir: str | os.PathLike | None = None, split: str = "validation",
           extra: dict | None = None, ablate: bool = False, verbose: bool = True) -> str:
  """Markdown table of compression per corpus slice for ours, LLaMA-style, byte and char level.

  Both trained tokenizers see the same training text (the corpus train split) and the same
  vocabulary size; they differ only in the options under test. Rates are measured on ``split``
  (held-out documents by default).

  Args:
    corpus_dir: a built corpus (default: the cached default corpus, built if missing).
    vocab_size: vocabulary of both trained tokenizers (LLaMA: 32,000).
    work_dir: where trained models are kept and reused (default: ``ROOT/tokenizer/report``).
    split: corpus split to measure on.
    extra: more rows, ``{name: tokenizer model path}`` (e.g. the 4,096-piece tiny tokenizer).
    ablate: also train ours with one option at a time switched to the LLaMA-style setting.
  Returns:
    the markdown table (with a definitions paragraph).
  """
  from baichuan_jax import data as data_lib  # pylint: disable=import-outside-toplevel
  from baichuan_jax.data.corpus import read_jsonl  # pylint: disable=import-outside-toplevel
  from baichuan_jax.tokenizer.runtime import Tokenizer  # pylint: disable=import-outside-toplevel
  root = data_lib.default_root()
  corpus_dir = Path(corpus_dir) if corpus_dir else data_lib.ensure_corpus(root, verbose)
  work_dir = Path(work_dir) if work_dir else root / "tokenizer" / "report"
  k = f"{vocab_size // 1000}k"
  variants = {
      f"ours (Baichuan options, {k})": ("ours", dict()),
      # The LLaMA-style baseline as the comparison asks: digit runs and whitespace runs may merge;
      # SentencePiece's default max piece length (16); everything else equal.
      f"LLaMA-style ({k})": ("llama", dict(split_digits=False, whitespace_pieces=False,
                                           max_piece_length=16)),
  }
  if ablate:
    variants.update({
        f"ours, digits not split ({k})": ("ours-nodigits", dict(split_digits=False)),
        f"ours, no whitespace pieces ({k})": ("ours-nows", dict(whitespace_pieces=False)),
        f"ours, max piece 16 ({k})": ("ours-max16", dict(max_piece_length=16)),
    })
  encoders = {}
  for name, (stem, kw) in variants.items():
    prefix = work_dir / f"{stem}{vocab_size}"
    if not Path(f"{prefix}.model").exists():
      if verbose:
        print(f"training {name} on {corpus_dir}/train.jsonl ...", file=sys.stderr, flush=True)
      train([corpus_dir / "train.jsonl"], vocab_size, prefix, verbose=False, **kw)
    encoders[name] = Tokenizer(f"{prefix}.model").encode
  for name, path in (extra or {}).items():
    encoders[name] = Tokenizer(path).encode
  encoders["byte-level (UTF-8)"] = lambda ts: [t.encode("utf-8") for t in ts]
  encoders["char-level"] = lambda ts: [list(t) for t in ts]

  docs = list(read_jsonl(corpus_dir / f"{split}.jsonl"))
  texts = {label: [d["text"] for d in docs if d.get("source") == src] for label, src in SLICES}
  texts["all"] = [d["text"] for d in docs]
  rows = {name: {label: compression(enc, ts) for label, ts in texts.items()}
          for name, enc in encoders.items()}
  labels = list(texts)
  head = "| tokenizer | " + " | ".join(labels) + " |"
  lines = [f"Compression on the `{split}` split of `{corpus_dir}` (tokens/char, lower is better "
           f"/ UTF-8 bytes/token, higher is better):", "", head,
           "|" + "---|" * (len(labels) + 1)]
  for name, r in rows.items():
    cells = [f"{r[l]['tokens_per_char']:.3f} / {r[l]['bytes_per_token']:.2f}" for l in labels]
    lines.append(f"| {name} | " + " | ".join(cells) + " |")
  size = rows["char-level"]
  lines.append("| *(slice size: chars / UTF-8 bytes)* | "
               + " | ".join(f"{size[l]['chars']:,} / {size[l]['bytes']:,}" for l in labels) + " |")
  return "\n".join(lines)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m baichuan_jax.data.tokenizer",
                                   description="Train Baichuan-style tokenizers; report compression.")
  sub = parser.add_subparsers(dest="cmd", required=True)
  t = sub.add_parser("train", help="train a SentencePiece BPE tokenizer with Baichuan options")
  t.add_argument("--input", required=True, nargs="+",
                 help="corpus .jsonl files (text field) or plain .txt files")
  t.add_argument("--vocab-size", type=int, required=True, help="e.g. 4096 (tiny), 64000 (Baichuan 1)")
  t.add_argument("--out", required=True, help="output prefix: writes PREFIX.model/.vocab/.json")
  t.add_argument("--character-coverage", type=float, default=BAICHUAN_COVERAGE,
                 help="wanted coverage (default %(default)s; lowered if the vocabulary is too small)")
  t.add_argument("--max-piece-length", type=int, default=MAX_PIECE_LEN)
  t.add_argument("--no-split-digits", action="store_true", help="LLaMA-style: keep digit runs")
  t.add_argument("--no-whitespace-pieces", action="store_true", help="no whitespace-run pieces")
  t.add_argument("--limit", type=int, default=None, help="use at most N documents")
  t.add_argument("--quiet", action="store_true")
  r = sub.add_parser("report", help="compression rate of ours vs LLaMA-style, byte and char")
  r.add_argument("--corpus", default=None, help="built corpus dir (default: build/reuse the cache)")
  r.add_argument("--out", default=None, help="also write the markdown table to this file")
  r.add_argument("--vocab-size", type=int, default=32000,
                 help="vocab for both trained tokenizers (default %(default)s, LLaMA's)")
  r.add_argument("--work-dir", default=None, help="where to keep trained models (default: cache)")
  r.add_argument("--ablate", action="store_true",
                 help="also train ours with each option switched off alone (3 more trainings)")
  r.add_argument("--split", default="validation", choices=("train", "validation"),
                 help="corpus split to measure on (default: %(default)s, held out)")
  r.add_argument("--extra", nargs="*", default=[], metavar="NAME=MODEL",
                 help="more tokenizers to measure, e.g. tiny4k=~/.cache/baichuan_jax/tokenizer/"
                      "bc4096.model or a released Baichuan tokenizer.model")
  args = parser.parse_args(argv)
  if args.cmd == "train":
    meta = train(args.input, args.vocab_size, args.out, split_digits=not args.no_split_digits,
                 whitespace_pieces=not args.no_whitespace_pieces,
                 character_coverage=args.character_coverage,
                 max_piece_length=args.max_piece_length, limit=args.limit, verbose=not args.quiet)
    print(f"wrote {args.out}.model ({meta['vocab_size']} pieces, coverage "
          f"{meta['character_coverage']}, {meta['training_chunks']} training chunks)")
    return 0
  extra = dict(e.split("=", 1) for e in args.extra)
  table = report(corpus_dir=args.corpus, vocab_size=args.vocab_size, work_dir=args.work_dir,
                 split=args.split, extra=extra, ablate=args.ablate)
  print(table)
  if args.out:
    Path(args.out).write_text(table + "\n", encoding="utf-8")
    print(f"wrote {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
