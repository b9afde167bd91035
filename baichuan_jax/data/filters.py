"""Heuristic quality and safety rules at document and sentence granularity.

Each rule is one section of an ``ml_collections`` config (``default_config()``), can be switched off
(``enabled``), limited to some languages (``langs``; empty = all) and reports how many documents or
sentences it removed. Rules run in a fixed order; a document is attributed to the first rule it
fails, as in datatrove's filter chain.

Document rules (in order): ``length``, ``language``, ``symbol_ratio``, ``digit_ratio``,
``repetition`` (duplicate n-gram and duplicate line fractions, Gopher-style), ``junk_lines``
(fraction of junk / bullet / ellipsis lines) and ``safety`` (word list hits).
Sentence rules, applied to surviving documents: ``sentence.junk_patterns`` (boilerplate such as
photo credits, "click here"), ``sentence.min_letters`` (lines of only digits/symbols such as reST
underlines) and ``sentence.max_symbol_ratio``; a document emptied by them is counted under
``doc/too_short_after_sentences``.

Character classes come from one lookup table over the Basic Multilingual Plane, so ratios are numpy
reductions over the code-point array rather than per-character Python.

    qf = QualityFilter(default_config())
    text_or_none, stats = qf(text, lang)   # stats: Counter of "doc/<rule>" / "sentence/<rule>"
"""

from __future__ import annotations

import collections
import re
import types
import unicodedata
from typing import Iterable

import ml_collections
import numpy as np

from baichuan_jax.data import minhash

# Character classes.
SPACE, LETTER, CJK, DIGIT, PUNCT, SYMBOL, OTHER = range(7)
_CLASS_NAMES = ("space", "letter", "cjk", "digit", "punct", "symbol", "other")

# A small default word list for the safety filter: gambling, pornography, drugs-for-sale, weapons
# and forged-document spam, the categories Chinese web filters most often target. Users replace or
# extend it with ``safety.words_file`` (one term per line).
DEFAULT_SAFETY_WORDS = (
    "赌博网站", "网上赌场", "博彩", "六合彩", "百家乐", "色情", "裸聊", "黄色网站", "成人电影", "一夜情",
    "代开发票", "办假证", "假文凭", "出售枪支", "枪支弹药", "冰毒", "海洛因", "摇头丸", "迷幻药", "迷奸",
    "porn", "xxx video", "online casino", "casino bonus", "sex cam", "escort service",
    "buy viagra", "cocaine for sale", "fake passport", "hitman for hire",
)

# Boilerplate lines seen in web and news text; each is a regex matched against a whole sentence.
DEFAULT_JUNK_PATTERNS = (
    r"^[（(][^（）()]{0,30}摄[）)]\s*$",          # People's Daily photo credits: （新华社记者某某摄）
    r"(?i)\bjavascript\b.*\b(enable|disabled?)\b",
    r"(?i)\b(accept|use) (of )?cookies\b",
    r"(?i)\ball rights reserved\b",
    r"(?i)\blorem ipsum\b",
    r"(?i)\bclick here\b",
    r"版权所有", r"点击(这里|此处|进入|查看)", r"(上一篇|下一篇|返回顶部|返回首页)",
)

# English stop words of the Gopher quality filter: real English prose contains some of them.
EN_STOPWORDS = frozenset(("the", "be", "to", "of", "and", "that", "have", "with"))

DOC_RULES = ("length", "language", "symbol_ratio", "digit_ratio", "repetition", "junk_lines",
             "safety")


def default_config() -> ml_collections.ConfigDict:
  """Quality-rule settings; every threshold has a comment saying why."""
  c = ml_collections.ConfigDict()

  c.length = ml_collections.ConfigDict()
  c.length.enabled = True
  # Rule applies to these languages; empty tuple = all.
  c.length.langs = ()
  # Non-space characters. 4 keeps the shortest real reviews ("很好用的") and drops fragments.
  c.length.min_chars = 4
  # Larger documents are usually dumps (logs, tables); 100k chars is ~30 training rows of 4096.
  c.length.max_chars = 100_000

  c.language = ml_collections.ConfigDict()
  c.language.enabled = True
  c.language.langs = ("zh", "en")
  # Share of letters (CJK ideographs + alphabetic) in the declared script: below it the `lang`
  # field is wrong or the text is mostly another language.
  c.language.min_script_ratio = 0.5
  # English documents must contain at least this many Gopher stop words (the, be, to, of, ...).
  c.language.en_min_stopwords = 2

  c.symbol_ratio = ml_collections.ConfigDict()
  c.symbol_ratio.enabled = True
  c.symbol_ratio.langs = ("zh", "en")
  # Unicode symbol characters (S*: math, currency, emoji, box drawing) over non-space characters.
  # 0.25: short reviews with a decoration ("很好~~!") stay, emoji/ASCII-art lines go.
  c.symbol_ratio.max_ratio = 0.25

  c.digit_ratio = ml_collections.ConfigDict()
  c.digit_ratio.enabled = True
  c.digit_ratio.langs = ("zh", "en")
  # Tables of numbers and phone/price lists; news with many dates stays well below 0.3.
  c.digit_ratio.max_ratio = 0.3

  c.repetition = ml_collections.ConfigDict()
  c.repetition.enabled = True
  c.repetition.langs = ("zh", "en")
  # n-gram size in units (English words / single CJK characters).
  c.repetition.ngram = 10
  # Fraction of units covered by an n-gram that occurs twice or more (Gopher: 0.10 for 10-grams of
  # words; character 10-grams of Chinese are about 5 words, so a looser 0.3).
  c.repetition.max_dup_ngram_ratio = 0.3
  # Fraction of non-empty lines that repeat an earlier line (Gopher: 0.30).
  c.repetition.max_dup_line_ratio = 0.3

  c.junk_lines = ml_collections.ConfigDict()
  c.junk_lines.enabled = True
  c.junk_lines.langs = ("zh", "en")
  # Line ratios only mean something for documents with at least this many lines.
  c.junk_lines.min_lines = 3
  # Lines matching a junk pattern or without any letter.
  c.junk_lines.max_junk_ratio = 0.5
  # Gopher: at most 90% bullet lines and 30% lines ending in an ellipsis.
  c.junk_lines.max_bullet_ratio = 0.9
  c.junk_lines.max_ellipsis_ratio = 0.3

  c.safety = ml_collections.ConfigDict()
  c.safety.enabled = True
  c.safety.langs = ()
  # Word list; terms are matched case-insensitively as substrings.
  c.safety.words = DEFAULT_SAFETY_WORDS
  # Optional file with one extra term per line ('' = none).
  c.safety.words_file = ""
  # A document is removed when it has at least min_hits hits AND at least min_density hits per
  # 1000 characters: a news report that mentions a crackdown once or twice in a long article stays,
  # spam that repeats its keywords goes.
  c.safety.min_hits = 2
  c.safety.min_density = 3.0

  c.sentence = ml_collections.ConfigDict()
  c.sentence.enabled = True
  c.sentence.langs = ("zh", "en")
  # Whole-sentence regexes (Python `re`, searched) for boilerplate.
  c.sentence.junk_patterns = DEFAULT_JUNK_PATTERNS
  # Sentences with fewer letters (alphabetic or CJK) are removed: "*****", "1998.", "---".
  c.sentence.min_letters = 1
  # Sentences whose non-space characters are mostly symbols.
  c.sentence.max_symbol_ratio = 0.5
  return c


def _check(cond: bool, field: str, value, allowed: str) -> None:
  if not cond:
    raise ValueError(f"filters.{field} = {value!r} is invalid; allowed: {allowed}")


def validate(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Checks every field; raises ValueError naming the field, its value and what is allowed."""
  known = set(DOC_RULES) | {"sentence"}
  for key in cfg.keys():
    _check(key in known, key, "(section)", "one of " + ", ".join(sorted(known)))
  for key in known:
    _check(key in cfg, key, None, "a config section (start from filters.default_config())")
    _check(isinstance(cfg[key].enabled, bool), f"{key}.enabled", cfg[key].enabled, "True or False")
    langs = cfg[key].langs
    _check(isinstance(langs, (tuple, list)) and all(isinstance(l, str) for l in langs),
           f"{key}.langs", langs, "a tuple of language codes, () for all")
  ratio = lambda f, v: _check(isinstance(v, (int, float)) and 0.0 <= v <= 1.0, f, v, "a number in [0, 1]")
  nonneg = lambda f, v: _check(isinstance(v, int) and not isinstance(v, bool) and v >= 0, f, v,
                               "an integer >= 0")
  nonneg("length.min_chars", cfg.length.min_chars)
  _check(isinstance(cfg.length.max_chars, int) and cfg.length.max_chars > cfg.length.min_chars,
         "length.max_chars", cfg.length.max_chars, f"an integer > length.min_chars ({cfg.length.min_chars})")
  ratio("language.min_script_ratio", cfg.language.min_script_ratio)
  nonneg("language.en_min_stopwords", cfg.language.en_min_stopwords)
  ratio("symbol_ratio.max_ratio", cfg.symbol_ratio.max_ratio)
  ratio("digit_ratio.max_ratio", cfg.digit_ratio.max_ratio)
  _check(isinstance(cfg.repetition.ngram, int) and cfg.repetition.ngram >= 1, "repetition.ngram",
         cfg.repetition.ngram, "an integer >= 1")
  ratio("repetition.max_dup_ngram_ratio", cfg.repetition.max_dup_ngram_ratio)
  ratio("repetition.max_dup_line_ratio", cfg.repetition.max_dup_line_ratio)
  nonneg("junk_lines.min_lines", cfg.junk_lines.min_lines)
  for f in ("max_junk_ratio", "max_bullet_ratio", "max_ellipsis_ratio"):
    ratio(f"junk_lines.{f}", cfg.junk_lines[f])
  _check(all(isinstance(w, str) and w.strip() for w in cfg.safety.words), "safety.words",
         cfg.safety.words, "a tuple of non-empty strings")
  _check(isinstance(cfg.safety.words_file, str), "safety.words_file", cfg.safety.words_file,
         "a path string or ''")
  _check(isinstance(cfg.safety.min_hits, int) and cfg.safety.min_hits >= 1, "safety.min_hits",
         cfg.safety.min_hits, "an integer >= 1")
  _check(isinstance(cfg.safety.min_density, (int, float)) and cfg.safety.min_density > 0,
         "safety.min_density", cfg.safety.min_density, "a number > 0 (hits per 1000 characters)")
  for i, p in enumerate(cfg.sentence.junk_patterns):
    try:
      re.compile(p)
    except (re.error, TypeError) as e:
      raise ValueError(f"filters.sentence.junk_patterns[{i}] = {p!r} is not a valid regex: {e}") from e
  nonneg("sentence.min_letters", cfg.sentence.min_letters)
  ratio("sentence.max_symbol_ratio", cfg.sentence.max_symbol_ratio)
  return cfg


def _class_table() -> np.ndarray:
  """[65536] uint8 character class of every BMP code point."""
  table = np.full(0x10000, OTHER, dtype=np.uint8)
  for cp in range(0x10000):
    cat = unicodedata.category(chr(cp))
    if cat[0] == "L":
      table[cp] = LETTER
    elif cat == "Nd" or cat == "No":
      table[cp] = DIGIT
    elif cat[0] == "P":
      table[cp] = PUNCT
    elif cat[0] == "S":
      table[cp] = SYMBOL
    elif cat[0] == "Z" or chr(cp) in "\t\n\r\x0b\x0c":
      table[cp] = SPACE
  for lo, hi in minhash.CJK_RANGES:
    if lo < 0x10000:
      table[lo:hi + 1][table[lo:hi + 1] == LETTER] = CJK
  return table


_CLASSES = _class_table()


def char_classes(text: str) -> np.ndarray:
  """[len(text)] uint8 class of each character (SPACE, LETTER, CJK, DIGIT, PUNCT, SYMBOL, OTHER)."""
  cps = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
  out = np.full(cps.shape, OTHER, dtype=np.uint8)
  bmp = cps < 0x10000
  out[bmp] = _CLASSES[cps[bmp]]
  astral = ~bmp
  if astral.any():
    a = cps[astral]
    # Astral planes: CJK extensions are ideographs; most of the rest in practice is emoji (So).
    out[astral] = np.where((a >= 0x20000) & (a <= 0x3FFFF), CJK, SYMBOL)
  return out


def class_counts(text: str) -> np.ndarray:
  """[7] int64 counts per character class."""
  return np.bincount(char_classes(text), minlength=7)


def dup_ngram_ratio(text: str, n: int) -> float:
  """Fraction of units (words / CJK characters) covered by an n-gram occurring at least twice.

  Example: units ``a b c a b c`` with n = 3: "a b c" occurs twice and covers all 6 units -> 1.0.
  """
  h, _ = minhash.batch_shingle_hashes([text], 1)  # unigram shingles are the unit hashes
  units = h.shape[0]
  if units < n or units == 0:
    return 0.0
  starts = np.arange(units - n + 1)
  grams = minhash.window_hashes(h, starts, starts + n)
  _, inverse, counts = np.unique(grams, return_inverse=True, return_counts=True)
  dup_starts = starts[counts[inverse] > 1]
  if dup_starts.size == 0:
    return 0.0
  # Coverage of [s, s + n) for each duplicated start, via a difference array.
  diff = np.zeros(units + 1, dtype=np.int64)
  np.add.at(diff, dup_starts, 1)
  np.add.at(diff, dup_starts + n, -1)
  return float(np.count_nonzero(np.cumsum(diff)[:units]) / units)


def dup_line_ratio(lines: list[str]) -> float:
  """Fraction of non-empty lines equal (after strip) to an earlier line."""
  lines = [l.strip() for l in lines if l.strip()]
  if not lines:
    return 0.0
  return 1.0 - len(set(lines)) / len(lines)


# A sentence ends after CJK or Latin terminal punctuation (plus closing quotes/brackets), the Latin
# ones only before whitespace so "3.14" and "e.g.x" stay whole; a newline always ends one. Trailing
# whitespace belongs to the sentence it follows, so the spans concatenate back to the text exactly.
_SENT_END = re.compile(r"(?:[。！？!?；]+|…+|\.(?=\s))[”’」』）)\"']*[^\S\n]*\n?|\n")


# "1. ", "a) ", "iv. " open a list item; they are not sentences of their own.
_LIST_MARKER = re.compile(r"\s*(\d{1,3}|[a-zA-Z]|[ivxIVX]{1,4})[.)]\s*")


def split_sentences(text: str) -> list[str]:
  """Sentence spans whose concatenation is exactly ``text``.

  Example: ``"你好。再见！\\nOK. Bye"`` -> ``["你好。", "再见！\\n", "OK. ", "Bye"]``; a list marker
  such as ``"1. "`` stays with the sentence it opens.
  """
  spans, start = [], 0
  for m in _SENT_END.finditer(text):
    if m.end() > start:
      spans.append(text[start:m.end()])
      start = m.end()
  if start < len(text):
    spans.append(text[start:])
  merged: list[str] = []
  carry = ""
  for span in spans:
    if "\n" not in span and _LIST_MARKER.fullmatch(span):
      carry += span
      continue
    merged.append(carry + span)
    carry = ""
  if carry:
    merged.append(carry)
  return merged


_BULLET = re.compile(r"^\s*([-*•●·▪◦‣+]|\d+[.)、])\s")
_ELLIPSIS = re.compile(r"(\.\.\.|…|。。。)\s*$")


def span_class_counts(classes: np.ndarray, spans: list[str]) -> np.ndarray:
  """[len(spans), 7] class counts of consecutive spans whose lengths sum to len(classes)."""
  if not spans:
    return np.zeros((0, 7), dtype=np.int64)
  lens = np.fromiter((len(x) for x in spans), dtype=np.int64, count=len(spans))
  # [chars + 1, 7] running counts; a span's counts are the difference at its bounds.
  onehot = np.zeros((classes.shape[0] + 1, 7), dtype=np.int64)
  onehot[np.arange(1, classes.shape[0] + 1), classes] = 1
  run = np.cumsum(onehot, axis=0)
  ends = np.cumsum(lens)
  return run[ends] - run[ends - lens]


def _section(cfg: ml_collections.ConfigDict) -> types.SimpleNamespace:
  # Plain attributes: ConfigDict lookups cost ~2 us each, and the rules read dozens per document.
  return types.SimpleNamespace(**cfg.to_dict())


class QualityFilter:
  """Applies the configured document and sentence rules to one text at a time."""

  def __init__(self, cfg: ml_collections.ConfigDict | None = None):
    self.cfg = validate(cfg if cfg is not None else default_config())
    self.c = types.SimpleNamespace(**{k: _section(self.cfg[k]) for k in self.cfg.keys()})
    words = list(self.c.safety.words)
    if self.c.safety.words_file:
      try:
        with open(self.c.safety.words_file, encoding="utf-8") as f:
          words += [w.strip() for w in f if w.strip() and not w.startswith("#")]
      except OSError as e:
        raise ValueError(f"filters.safety.words_file = {self.c.safety.words_file!r}: {e}") from e
    words = sorted(set(w.lower() for w in words), key=lambda w: (-len(w), w))
    self._safety = re.compile("|".join(re.escape(w) for w in words)) if words else None
    self._junk = [re.compile(p) for p in self.c.sentence.junk_patterns]

  def _applies(self, rule: str, lang: str) -> bool:
    c = getattr(self.c, rule)
    return c.enabled and (not c.langs or lang in c.langs)

  def _junk_spans(self, spans: list[str], counts: np.ndarray) -> list[str | None]:
    """Per span, the sentence rule that removes it (or None). counts: [spans, 7]."""
    c = self.c.sentence
    letters = counts[:, LETTER] + counts[:, CJK]
    nonspace = counts.sum(axis=1) - counts[:, SPACE]
    out: list[str | None] = []
    for i, span in enumerate(spans):
      if nonspace[i] == 0:
        out.append(None)
      elif letters[i] < c.min_letters:
        out.append("min_letters")
      elif counts[i, SYMBOL] > c.max_symbol_ratio * nonspace[i]:
        out.append("max_symbol_ratio")
      elif any(p.search(span.strip()) for p in self._junk):
        out.append("junk_patterns")
      else:
        out.append(None)
    return out

  def doc_rule(self, text: str, lang: str, classes: np.ndarray | None = None) -> str | None:
    """The first document rule ``text`` fails, or None."""
    classes = char_classes(text) if classes is None else classes
    cc = np.bincount(classes, minlength=7)
    nonspace = len(text) - int(cc[SPACE])
    c = self.c
    if self._applies("length", lang):
      if nonspace < c.length.min_chars:
        return "length_min"
      if nonspace > c.length.max_chars:
        return "length_max"
    if self._applies("language", lang) and lang in ("zh", "en"):
      letters = int(cc[LETTER] + cc[CJK])
      script = cc[CJK] if lang == "zh" else cc[LETTER]
      if letters == 0 or script / letters < c.language.min_script_ratio:
        return "language"
      if lang == "en":
        words = re.findall(r"[a-z]+", text.lower())
        if sum(w in EN_STOPWORDS for w in words) < c.language.en_min_stopwords:
          return "language"
    if self._applies("symbol_ratio", lang) and nonspace and \
        cc[SYMBOL] / nonspace > c.symbol_ratio.max_ratio:
      return "symbol_ratio"
    if self._applies("digit_ratio", lang) and nonspace and \
        cc[DIGIT] / nonspace > c.digit_ratio.max_ratio:
      return "digit_ratio"
    if self._applies("repetition", lang):
      if dup_ngram_ratio(text, c.repetition.ngram) > c.repetition.max_dup_ngram_ratio:
        return "dup_ngram"
      if dup_line_ratio(text.splitlines()) > c.repetition.max_dup_line_ratio:
        return "dup_line"
    if self._applies("junk_lines", lang):
      lines = text.splitlines(keepends=True)
      body = [i for i, l in enumerate(lines) if l.strip()]
      if len(body) >= c.junk_lines.min_lines:
        junk = self._junk_spans(lines, span_class_counts(classes, lines))
        n = len(body)
        if sum(junk[i] is not None for i in body) / n > c.junk_lines.max_junk_ratio:
          return "junk_lines"
        if sum(bool(_BULLET.match(lines[i])) for i in body) / n > c.junk_lines.max_bullet_ratio:
          return "bullet_lines"
        if sum(bool(_ELLIPSIS.search(lines[i])) for i in body) / n > c.junk_lines.max_ellipsis_ratio:
          return "ellipsis_lines"
    if self._applies("safety", lang) and self._safety is not None:
      hits = len(self._safety.findall(text.lower()))
      if hits >= c.safety.min_hits and hits * 1000.0 / max(len(text), 1) >= c.safety.min_density:
        return "safety"
    return None

  def filter_sentences(self, text: str, lang: str,
                       classes: np.ndarray | None = None) -> tuple[str, collections.Counter]:
    """Removes junk sentences. Returns (remaining text, Counter of rule -> sentences removed)."""
    removed: collections.Counter = collections.Counter()
    if not self._applies("sentence", lang):
      return text, removed
    classes = char_classes(text) if classes is None else classes
    spans = split_sentences(text)
    kept = []
    for span, why in zip(spans, self._junk_spans(spans, span_class_counts(classes, spans))):
      if why is None:
        kept.append(span)
      else:
        removed[why] += 1
    return "".join(kept), removed

  def __call__(self, text: str, lang: str) -> tuple[str | None, collections.Counter]:
    """Document rules, then sentence rules, then the length floor again.

    Args:
      text: document text.
      lang: its declared language (``zh``, ``en``, ``code`` ...).
    Returns:
      (cleaned text, or None if the document is removed;
       Counter with ``doc/<rule>`` = 1 for the rule that removed it and ``sentence/<rule>`` = number
       of sentences each sentence rule removed).
    """
    stats: collections.Counter = collections.Counter()
    classes = char_classes(text)
    why = self.doc_rule(text, lang, classes)
    if why is not None:
      stats[f"doc/{why}"] += 1
      return None, stats
    cleaned, removed = self.filter_sentences(text, lang, classes)
    for k, v in removed.items():
      stats[f"sentence/{k}"] += v
    if removed:
      cleaned = cleaned.strip()
      nonspace = len(cleaned) - int(np.count_nonzero(char_classes(cleaned) == SPACE))
      floor = self.c.length.min_chars if self._applies("length", lang) else 1
      if nonspace < max(floor, 1):
        stats["doc/too_short_after_sentences"] += 1
        return None, stats
    return cleaned, stats


def rule_names() -> list[str]:
  """Every stats key ``QualityFilter`` can report, in rule order (for reports with zero rows)."""
  doc = ["length_min", "length_max", "language", "symbol_ratio", "digit_ratio", "dup_ngram",
         "dup_line", "junk_lines", "bullet_lines", "ellipsis_lines", "safety",
         "too_short_after_sentences"]
  return [f"doc/{d}" for d in doc] + [f"sentence/{s}" for s in
                                      ("min_letters", "max_symbol_ratio", "junk_patterns")]


def summarize(counters: Iterable[collections.Counter]) -> collections.Counter:
  """Sums per-document stats counters."""
  total: collections.Counter = collections.Counter()
  for c in counters:
    total.update(c)
  return total
