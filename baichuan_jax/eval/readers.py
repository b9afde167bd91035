"""Readers for the published file layouts of C-Eval, CMMLU, MMLU, GAOKAO-Bench and AGIEval.

Every reader returns `Question`s and sorts every other item into one of two lists, each entry naming
its file and line: `multi_answer` (a genuine item whose answer is several letters, "BC", ["A", "C"],
or several sub-questions: not single-choice, so not in single-choice tables) and `skipped` (a
malformed row: a missing option, an answer that is not one of the item's own letters, a wrong
column count). Nothing is guessed at.

An item is single-choice only when its answer, after `.strip().upper()` (what Baichuan's scripts do
to gold answers), is exactly one letter among its own options (A-D for four options).

Layouts (as published; the data cannot be downloaded here, so point `data_dir` at a local copy):
  C-Eval   `{dev,val,test}/{subject}_{split}.csv`, header `id,question,A,B,C,D,answer[,explanation]`;
           the public test split has no `answer` column, or (HF-style exports) an empty one: such a
           file is unlabeled (predictions only, for the submission file).
  CMMLU    `{dev,test}/{subject}.csv`, header `,Question,A,B,C,D,Answer` (first column a row index);
           exports without the index column (`Question,A,B,C,D,Answer`) are read the same way.
  MMLU     `{dev,val,test}/{subject}_{split}.csv`, no header: `question,A,B,C,D,answer`; the common
           export with a header row (`question,A,B,C,D,answer`, extra columns ignored) and answers
           0-3 (0 = A) is read too.
  GAOKAO   GAOKAO-Bench objective files `2010-2022_{Subject}[_MCQs].json` (in `data_dir` or
           `data_dir/Objective_Questions`): `{"keywords": ..., "example": [{"question": stem with the
           options written inline ("A．...B．..."), "answer": ["A"], ...}, ...]}`.
  AGIEval  `{task}.jsonl` (the repo's `data/v1/`): one object per line with `passage` (str or null),
           `question`, `options` (["(A)...", ...], also written "A ...", "A: ...", "A．...") and
           `label` ("A", ["A"], or several letters for multi-answer items). Tasks without options
           (cloze) are not multiple choice and are left out whole. AGIEval's own few-shot examples
           live in `few_shot_prompts.csv` beside (or one folder above) the JSONL files.

Files are read as UTF-8 (a BOM is allowed); a file that is not UTF-8 but decodes as GB18030 (a
superset of GBK, what Excel on a Chinese system saves) is read as that, with a note; anything else
is an error naming the file and the byte offset.
"""

from __future__ import annotations

import ast
import csv
import dataclasses
import io
import json
import logging
import os
import re
from pathlib import Path
from typing import Iterator, Optional

from baichuan_jax.records import BadRecord, parse_jsonl_lines

log = logging.getLogger(__name__)

LETTERS = "ABCDEFGH"
TASKS = ("ceval", "cmmlu", "mmlu", "gaokao", "agieval")
PROTOCOLS = ("baichuan", "official")
# Baichuan kept AGIEval's four-option single-choice items only; AQuA-RAT and LSAT have five options.
BAICHUAN_AGIEVAL_OPTIONS = 4


@dataclasses.dataclass(frozen=True)
class Question:
  """One multiple-choice item: the stem, its options (in letter order) and the answer letter."""
  task: str
  subject: str
  qid: str
  question: str
  options: tuple  # option texts for letters A, B, C, ... in order
  answer: Optional[str]  # "A".."D" (or further letters for AGIEval); None = unlabeled (C-Eval test)
  source: str  # "path:line" the item was read from
  passage: Optional[str] = None  # AGIEval reading passage
  raw_options: tuple = ()  # AGIEval: the option strings as written in the file ("(A)...")


Skipped = BadRecord  # a row left out, with where it is and why


@dataclasses.dataclass
class SubjectData:
  """The shots (few-shot examples, in the order prompts use them) and the questions to score."""
  subject: str
  shots: list
  questions: list


@dataclasses.dataclass
class Benchmark:
  """All subjects of one benchmark split, plus every item that was left out while reading."""
  task: str
  split: str
  subjects: dict  # subject -> SubjectData, sorted by subject
  skipped: list  # [Skipped] malformed rows left out
  notes: list = dataclasses.field(default_factory=list)  # file-level remarks (cloze task, GB18030)
  multi_answer: list = dataclasses.field(default_factory=list)  # [Skipped] multi-answer items
  excluded: list = dataclasses.field(default_factory=list)  # [Skipped] left out by the protocol
  protocol: Optional[str] = None

  @property
  def num_questions(self) -> int:
    return sum(len(s.questions) for s in self.subjects.values())


@dataclasses.dataclass
class _Sink:
  """Where a reader puts what it leaves out."""
  skipped: list = dataclasses.field(default_factory=list)
  multi: list = dataclasses.field(default_factory=list)
  notes: list = dataclasses.field(default_factory=list)
  excluded: list = dataclasses.field(default_factory=list)

  def skip(self, path, line: int, reason: str) -> None:
    item = Skipped(str(path), line, reason)
    log.warning("skipping %s", item)
    self.skipped.append(item)

  def multi_answer(self, path, line: int, answer) -> None:
    self.multi.append(Skipped(str(path), line, f"answer {answer!r} has several letters: "
                              "not single-choice"))


# ---- answers -----------------------------------------------------------------------------------

def normalize_answer(raw) -> str:
  """The gold answer as Baichuan's scripts compare it: `str(raw).strip().upper()`."""
  return "" if raw is None else str(raw).strip().upper()


def classify_answer(answer: str, letters: str):
  """("single", letter) | ("multi", answer) | ("empty", "") | ("bad", reason) for a normalized answer.

  Single-choice means exactly one letter among the item's own `letters`; several distinct letters
  among them is a multi-answer item; anything else (a letter beyond the options, a digit, "A或B")
  is malformed.
  """
  if not answer:
    return "empty", ""
  if len(answer) == 1 and answer in letters:
    return "single", answer
  if len(answer) > 1 and all(c in letters for c in answer) and len(set(answer)) == len(answer):
    return "multi", answer
  return "bad", f"answer {answer!r} not in {letters[0]}-{letters[-1]}"


def _missing_option(options, letters) -> Optional[str]:
  for letter, text in zip(letters, options):
    if text is None or not str(text).strip():
      return f"missing option {letter}"
  return None


# ---- files -------------------------------------------------------------------------------------

def read_text(path, sink: Optional[_Sink] = None) -> str:
  """A file's text: UTF-8 (BOM allowed), else GB18030 with a note; otherwise a clear error."""
  data = Path(path).read_bytes()
  try:
    return data.decode("utf-8-sig")
  except UnicodeDecodeError as e:
    utf8_error = e
  try:
    text = data.decode("gb18030")
  except UnicodeDecodeError:
    raise ValueError(f"{path}: not UTF-8 (byte 0x{data[utf8_error.start]:02x} at offset "
                     f"{utf8_error.start}) and not GBK/GB18030 either; re-save it as UTF-8") from None
  note = f"{path}: not UTF-8; read as GB18030 (GBK)"
  log.warning(note)
  if sink is not None:
    sink.notes.append(note)
  return text


def _csv_records(path: Path, sink: _Sink) -> Iterator[tuple[int, list]]:
  """Yields (line where the record starts, fields) for each CSV record (quoted newlines allowed)."""
  reader = csv.reader(io.StringIO(read_text(path, sink), newline=""))
  start = 1
  try:
    for row in reader:
      yield start, row
      start = reader.line_num + 1
  except csv.Error as e:
    raise ValueError(f"{path}:{start}: not valid CSV ({e})") from e


# ---- C-Eval / CMMLU / MMLU -------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _Columns:
  """Where the fields of a CSV layout are: column indices (answer None = no answer column)."""
  question: int
  options: tuple  # 4 indices for A-D
  answer: Optional[int]
  qid: Optional[int]
  width: Optional[int]  # columns a row must have (None: at least up to the last used column)


_OPTION_NAMES = ({"a", "b", "c", "d"}, {"option_a", "option_b", "option_c", "option_d"})


def _header_columns(header: list) -> Optional[_Columns]:
  """The columns of a header row naming question, A-D and (optionally) answer; None if not one."""
  names = [h.strip().lower() for h in header]
  if "question" not in names:
    return None
  for option_names in _OPTION_NAMES:
    if option_names <= set(names):
      opts = tuple(names.index(n) for n in sorted(option_names))
      ans = names.index("answer") if "answer" in names else None
      qid = names.index("id") if "id" in names else (0 if names[0] == "" else None)
      return _Columns(names.index("question"), opts, ans, qid, len(names))
  return None


def _layout(task: str, path: Path, first: list) -> tuple[_Columns, bool]:
  """(columns, whether the first record is a header) for one CSV file of `task`."""
  cols = _header_columns(first)
  if cols is not None:
    if task == "ceval" and [h.strip().lower() for h in first[:2]] != ["id", "question"]:
      raise ValueError(f"{path}:1: header {first} is not C-Eval's id,question,A,B,C,D[,answer"
                       "[,explanation]]")
    return cols, True
  if task == "mmlu":  # Hendrycks' files: no header, question,A,B,C,D,answer
    return _Columns(0, (1, 2, 3, 4), 5, None, 6), False
  if task == "ceval":
    raise ValueError(f"{path}:1: header {first} is not C-Eval's id,question,A,B,C,D[,answer"
                     "[,explanation]]")
  raise ValueError(f"{path}:1: header {first} does not match CMMLU's ,Question,A,B,C,D,Answer "
                   "(or Question,A,B,C,D,Answer)")


def _read_mc_csv(task: str, subject: str, path: Path, sink: _Sink) -> tuple[list, bool]:
  """Reads one CSV of question, A-D, answer rows. Returns (questions, whether it is labeled).

  A file whose answer column is missing or empty on every row is unlabeled (a test split for
  submission). Answers written 0-3 on every row (the common MMLU export) mean A-D.
  """
  records = list(_csv_records(path, sink))
  if not records:
    raise ValueError(f"{path}: empty file")
  cols, has_header = _layout(task, path, records[0][1])
  rows = [(line, row) for line, row in records[1 if has_header else 0:] if any(c.strip() for c in row)]
  need = cols.width
  answers = [normalize_answer(row[cols.answer]) if cols.answer is not None and
             len(row) > cols.answer else "" for _, row in rows]
  labeled = cols.answer is not None and (any(answers) or not rows)
  digits = labeled and all(a in ("0", "1", "2", "3") for a in answers if a)
  out = []
  for (line, row), answer in zip(rows, answers):
    if need is not None and len(row) != need:
      sink.skip(path, line, f"expected {need} columns, found {len(row)}")
      continue
    options = tuple(row[i] for i in cols.options)
    err = _missing_option(options, "ABCD") or (None if row[cols.question].strip() else "empty question")
    if err:
      sink.skip(path, line, err)
      continue
    if digits and answer:
      answer = "ABCD"[int(answer)]
    if labeled:
      kind, value = classify_answer(answer, "ABCD")
      if kind == "multi":
        sink.multi_answer(path, line, answer)
        continue
      if kind != "single":
        sink.skip(path, line, value or "missing answer")
        continue
    qid = row[cols.qid].strip() if task == "ceval" and cols.qid is not None else str(len(out))
    # Texts as written (the scripts format pandas / `datasets` cells without stripping them).
    out.append(Question(task, subject, qid, row[cols.question], tuple(options),
                        answer if labeled else None,
                        f"{path}:{line}"))
  return out, labeled


def _subject_files(task: str, data_dir: Path, split: str) -> dict:
  """subject -> path of its `split` file, for the CSV benchmarks."""
  folder = data_dir / split
  if not folder.is_dir():
    raise FileNotFoundError(f"{task}: no {split}/ folder under {data_dir} (expected the published "
                            f"layout with dev/ and {split}/ folders of per-subject CSV files)")
  suffix = "" if task == "cmmlu" else f"_{split}"
  files = {}
  for p in sorted(folder.glob("*.csv")):
    stem = p.stem
    if suffix:
      if not stem.endswith(suffix):
        continue
      stem = stem[:-len(suffix)]
    files[stem] = p
  if not files:
    raise FileNotFoundError(f"{task}: no *{suffix}.csv files in {folder}")
  return files


CSV_TASKS = ("ceval", "cmmlu", "mmlu")
DEFAULT_SPLIT = {"ceval": "val", "cmmlu": "test", "mmlu": "test", "gaokao": "test", "agieval": "test"}
BAICHUAN_CEVAL_SHOT_SEED = 123  # evaluate_zh.py: dataset['dev'].shuffle(seed=123)


def baichuan_shot_order(n: int) -> list:
  """The dev-row order of Baichuan's `evaluate_zh.py`: HF `datasets` `Dataset.shuffle(seed=123)`,
  which is `numpy.random.default_rng(123).permutation(n)`."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  return [int(i) for i in np.random.default_rng(BAICHUAN_CEVAL_SHOT_SEED).permutation(n)]


def _read_csv_benchmark(task, data_dir, split, shots, subjects, sink, protocol):
  eval_files = _subject_files(task, data_dir, split)
  dev_files = _subject_files(task, data_dir, "dev") if shots > 0 else {}
  out = {}
  for subject, path in eval_files.items():
    if subjects and subject not in subjects:
      continue
    if shots > 0 and subject not in dev_files:
      raise FileNotFoundError(f"{task}: {shots}-shot prompts need dev/ examples for {subject!r}, "
                              f"but {data_dir / 'dev'} has no file for it")
    shot_rows = []
    if shots > 0:
      dev, dev_labeled = _read_mc_csv(task, subject, dev_files[subject], sink)
      if not dev_labeled:
        raise ValueError(f"{dev_files[subject]}: dev examples need an answer column")
      if protocol == "baichuan" and task == "ceval":
        dev = [dev[i] for i in baichuan_shot_order(len(dev))]
      shot_rows = dev[:shots]
    out[subject] = SubjectData(subject, shot_rows, _read_mc_csv(task, subject, path, sink)[0])
  return out


# ---- GAOKAO-Bench ----------------------------------------------------------------------------

_GAOKAO_NAME = re.compile(r"^\d{4}-\d{4}_(.+?)(?:_MCQs)?$")
_FULLWIDTH = {"A": "Ａ", "B": "Ｂ", "C": "Ｃ", "D": "Ｄ", "E": "Ｅ"}
# An option marker: the letter (ASCII or full-width), then a period, 、 or colon (ASCII or
# full-width). Real files glue markers to the previous text ("…信息传递D．…", "（）15A.", "1 NC.2 N"),
# so any character may come before one. A first pass refuses markers right after an ASCII letter
# (so "含DNA.的" inside option A is no marker); when it cannot find all four, a second pass allows
# them ("NC." = the unit N, then option C).
_OPTION_MARK = {L: re.compile(rf"(?<![A-Za-z])([{L}{_FULLWIDTH[L]}])\s*[．.、:：]") for L in "ABCDE"}
_GLUED_MARK = {L: re.compile(rf"([{L}{_FULLWIDTH[L]}])\s*[．.、:：]") for L in "ABCDE"}


def _find_markers(text: str, letters: str, marks: dict):
  """[(letter start, body start)] searching from the end, or None when a letter is missing."""
  end = len(text)
  starts = []
  for letter in reversed(letters):
    found = None
    for m in marks[letter].finditer(text, 0, end):
      found = m
    if found is None:
      return None
    starts.append((found.start(1), found.end()))
    end = found.start(1)
  return starts[::-1]


def split_inline_options(text: str, letters: str = "ABCD"):
  """Splits a GAOKAO stem with inline options into (stem, options).

  Markers are searched from the end (the last D, then the last C before it, ...), so letters in a
  reading passage earlier in the stem are not taken for options.
  Returns None when some option marker cannot be found.
  """
  starts = _find_markers(text, letters, _OPTION_MARK) or _find_markers(text, letters, _GLUED_MARK)
  if starts is None:
    return None
  stem = text[:starts[0][0]].rstrip(" \n（(")
  options = []
  for i, (_, body_start) in enumerate(starts):
    body_end = starts[i + 1][0] if i + 1 < len(starts) else len(text)
    options.append(text[body_start:body_end].strip().rstrip("（(").strip())
  return stem.strip(), tuple(options)


def _json_items_with_lines(path: Path, key: str, sink: _Sink):
  """Yields (line, item) for each element of the top-level array `key` of a JSON object file."""
  text = read_text(path, sink)
  dec = json.JSONDecoder()
  ws = re.compile(r"[\s,]*")
  try:
    json.loads(text)
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from e
  i = ws.match(text, 0).end()
  if text[i:i + 1] != "{":
    raise ValueError(f"{path}:1: expected a JSON object with an {key!r} list")
  i += 1
  while True:
    i = ws.match(text, i).end()
    if text[i:i + 1] == "}":
      raise ValueError(f"{path}: no {key!r} list at the top level")
    name, i = dec.raw_decode(text, i)
    i = re.compile(r"\s*:\s*").match(text, i).end()
    if name != key:
      _, i = dec.raw_decode(text, i)
      continue
    if text[i:i + 1] != "[":
      raise ValueError(f"{path}:{text.count(chr(10), 0, i) + 1}: {key!r} must be a list")
    i += 1
    while True:
      i = ws.match(text, i).end()
      if text[i:i + 1] == "]":
        return
      item, j = dec.raw_decode(text, i)
      yield text.count("\n", 0, i) + 1, item
      i = j


def _gaokao_answer(raw):
  """The normalized answer letters of a GAOKAO item ("A", "BC", or "A,C,D" for sub-questions)."""
  if isinstance(raw, str):
    raw = [raw]
  if not isinstance(raw, list) or not raw:
    return None
  parts = [normalize_answer(a) for a in raw]
  return parts[0] if len(parts) == 1 else ",".join(parts)


def _read_gaokao_file(path, subject, sink):
  out = []
  multi = 0
  for line, item in _json_items_with_lines(path, "example", sink):
    if not isinstance(item, dict) or "question" not in item or "answer" not in item:
      sink.skip(path, line, "item needs 'question' and 'answer' fields")
      continue
    answer = _gaokao_answer(item["answer"])
    if answer is None:
      sink.skip(path, line, f"answer {item['answer']!r} is not a list of letters")
      continue
    if "," in answer:  # several sub-questions, each with its own answer: not one single choice
      parts = answer.split(",")
      if all(p and set(p) <= set("ABCD") for p in parts):
        multi += 1
        sink.multi.append(Skipped(str(path), line, f"answer {item['answer']!r} has "
                                  f"{len(parts)} answers: not single-choice"))
      else:
        sink.skip(path, line, f"answer {item['answer']!r} is not a list of letters A-D")
      continue
    kind, value = classify_answer(answer, "ABCD")
    if kind == "multi":
      multi += 1
      sink.multi_answer(path, line, answer)
      continue
    parsed = split_inline_options(str(item["question"]))
    if parsed is None:
      sink.skip(path, line, "missing option (could not find all of A-D in the question text)")
      continue
    stem, options = parsed
    err = _missing_option(options, "ABCD") or (None if kind == "single" else value or "missing answer")
    if err:
      sink.skip(path, line, err)
      continue
    qid = str(item.get("index", len(out)))
    out.append(Question("gaokao", subject, qid, stem, options, value, f"{path}:{line}"))
  if multi:
    sink.notes.append(f"{path}: {multi} items with several answers are not single-choice; "
                      "not scored")
  return out


def _read_gaokao(data_dir, shots, subjects, sink):
  folder = data_dir / "Objective_Questions" if (data_dir / "Objective_Questions").is_dir() else data_dir
  files = sorted(folder.glob("*.json"))
  if not files:
    raise FileNotFoundError(f"gaokao: no GAOKAO-Bench *.json files in {folder}")
  out = {}
  for p in files:
    m = _GAOKAO_NAME.match(p.stem)
    subject = m.group(1) if m else p.stem
    if subjects and subject not in subjects:
      continue
    items = _read_gaokao_file(p, subject, sink)
    if items:
      out[subject] = SubjectData(subject, items[:shots], items[shots:])
  return out


# ---- AGIEval ---------------------------------------------------------------------------------

# "(A)...", "（A）...", "A ...", "A: ...", "A．...", "A. ...", "A、...": the letter must be bracketed,
# or followed by punctuation or a space, so "Aspirin" is not read as option A.
_AGI_OPTION = re.compile(r"^\s*(?:[(（]([A-H])[)）]|([A-H])(?:\s*[:：.．、]|\s))\s*")


def parse_agieval_options(options):
  """Option strings -> (texts, None), or (None, reason) when one does not start with its letter."""
  texts = []
  for k, o in enumerate(options):
    m = _AGI_OPTION.match(str(o))
    letter = m and (m.group(1) or m.group(2))
    if letter != LETTERS[k]:
      return None, f"option {k} {str(o)[:20]!r} does not start with {LETTERS[k]} ((A), A , A:, A．)"
    texts.append(str(o)[m.end():].strip())
  return tuple(texts), None


def _agieval_label(item) -> str:
  label = item.get("label")
  if isinstance(label, list):
    return "".join(normalize_answer(x) for x in label)
  return normalize_answer(label)


def _read_agieval_file(path, subject, sink, max_options=None):
  out = []
  lines = read_text(path, sink).splitlines()
  for line, item in parse_jsonl_lines(lines, path, lambda bad, _: sink.skip(path, bad.line,
                                                                             bad.reason)):
    opts = item.get("options")
    if not opts:
      sink.notes.append(f"{path}: items without options (cloze task) are not multiple choice; "
                        "not scored")
      return []
    texts, bad = parse_agieval_options(opts)
    if bad:
      sink.skip(path, line, bad)
      continue
    letters = LETTERS[:len(texts)]
    kind, value = classify_answer(_agieval_label(item), letters)
    if kind == "multi":
      sink.multi_answer(path, line, value)
      continue
    err = _missing_option(texts, letters) or (None if kind == "single" else value or "missing answer")
    if not str(item.get("question") or "").strip():
      err = err or "empty question"
    if err:
      sink.skip(path, line, err)
      continue
    if max_options is not None and len(texts) != max_options:
      sink.excluded.append(Skipped(str(path), line, f"{len(texts)} options: Baichuan's table "
                                   f"keeps {max_options}-option items only"))
      continue
    out.append(Question("agieval", subject, str(len(out)), str(item["question"]), texts,
                        value, f"{path}:{line}", passage=(item.get("passage") or None),
                        raw_options=tuple(str(o) for o in opts)))
  return out


def _distinct_passage_shots(items, shots):
  """The first `shots` items whose passages differ (so a shot never repeats another's passage)."""
  chosen, seen = [], set()
  for q in items:
    if len(chosen) == shots:
      break
    if q.passage and q.passage in seen:
      continue
    chosen.append(q)
    seen.add(q.passage)
  return chosen


def find_agieval_prompts(data_dir: Path) -> Optional[Path]:
  """AGIEval's `few_shot_prompts.csv`: in `data_dir` or one folder above (the repo's `data/`)."""
  for folder in (data_dir, data_dir.parent):
    p = folder / "few_shot_prompts.csv"
    if p.is_file():
      return p
  return None


def read_agieval_prompts(path: Path, subject: str, sink: Optional[_Sink] = None) -> list:
  """AGIEval's own few-shot examples for one task, as `Question`s (official protocol).

  `few_shot_prompts.csv` has one column per task; after the header, rows alternate an example
  (a Python-literal dict with passage/question/options/label) and its explanation, five times.
  `sat-en-without-passage` uses the `sat-en` column without the passages, as AGIEval's loader does.
  """
  sink = sink or _Sink()
  column, skip_passage = ("sat-en", True) if subject == "sat-en-without-passage" else (subject, False)
  rows = list(_csv_records(path, sink))
  if not rows:
    raise ValueError(f"{path}: empty file")
  header = rows[0][1]
  if column not in header:
    raise ValueError(f"{path}:1: no column {column!r} for AGIEval task {subject!r}")
  col = header.index(column)
  out = []
  for line, row in rows[1:11:2]:  # rows 1, 3, 5, 7, 9 of the file: the examples
    cell = row[col] if col < len(row) else ""
    if not cell:
      continue
    try:
      ex = ast.literal_eval(cell)
    except (ValueError, SyntaxError) as e:
      raise ValueError(f"{path}:{line}: column {column!r} is not a Python dict literal ({e})") from e
    opts = ex.get("options") or []
    texts, _ = parse_agieval_options(opts)
    label = ex.get("label")
    out.append(Question("agieval", subject, f"shot{len(out)}", str(ex.get("question", "")),
                        texts or tuple(opts), "" if label is None else "{}".format(label),
                        f"{path}:{line}",
                        passage=None if skip_passage else (ex.get("passage") or None),
                        raw_options=tuple(str(o) for o in opts)))
  return out


def _read_agieval(data_dir, shots, subjects, sink, protocol):
  files = sorted(data_dir.glob("*.jsonl"))
  if not files:
    raise FileNotFoundError(f"agieval: no AGIEval *.jsonl files in {data_dir}")
  max_options = BAICHUAN_AGIEVAL_OPTIONS if protocol == "baichuan" else None
  prompts_file = find_agieval_prompts(data_dir) if protocol == "official" and shots > 0 else None
  if protocol == "official" and shots > 0 and prompts_file is None:
    raise FileNotFoundError(f"agieval: the official protocol's few-shot examples come from AGIEval's "
                            f"few_shot_prompts.csv, not found in {data_dir} or {data_dir.parent}; "
                            "pass --shots 0 or copy it there")
  out = {}
  for p in files:
    if subjects and p.stem not in subjects:
      continue
    items = _read_agieval_file(p, p.stem, sink, max_options)
    if not items:
      continue
    if prompts_file is not None:
      out[p.stem] = SubjectData(p.stem, read_agieval_prompts(prompts_file, p.stem, sink)[:shots],
                                items)
    elif protocol == "baichuan":
      chosen = _distinct_passage_shots(items, shots)
      ids = {id(q) for q in chosen}
      out[p.stem] = SubjectData(p.stem, chosen, [q for q in items if id(q) not in ids])
    else:
      out[p.stem] = SubjectData(p.stem, items[:shots], items[shots:])
  return out


def load_benchmark(task: str, data_dir, split: Optional[str] = None, shots: int = 5,
                   subjects=None, protocol: Optional[str] = None) -> Benchmark:
  """Reads one benchmark from its published layout.

  Args:
    task: one of ceval, cmmlu, mmlu, gaokao, agieval.
    data_dir: folder holding the benchmark (e.g. the unpacked `data/` of the release).
    split: split to score (default: C-Eval val, others test). GAOKAO and AGIEval have a single
      split: their first `shots` items per subject become the shots and are not scored.
    shots: few-shot examples per subject, from `dev/` for the CSV benchmarks.
    subjects: optional iterable restricting which subjects are read.
    protocol: None (every single-choice item, shots in file order), "baichuan" (C-Eval shots in
      `evaluate_zh.py`'s shuffled order; AGIEval four-option items only, shots with distinct
      passages) or "official" (AGIEval shots from its `few_shot_prompts.csv`).
  Returns:
    a `Benchmark`; `.skipped` lists malformed rows (file, line, reason), `.multi_answer` the items
    with several answers, `.excluded` the items the protocol leaves out, `.notes` file remarks.
  """
  if task not in TASKS:
    raise ValueError(f"task={task!r} is invalid: allowed {', '.join(TASKS)}")
  if protocol is not None and protocol not in PROTOCOLS:
    raise ValueError(f"protocol={protocol!r} is invalid: allowed {', '.join(PROTOCOLS)}")
  if shots < 0:
    raise ValueError(f"shots={shots} is invalid: must be >= 0")
  data_dir = Path(os.path.expanduser(str(data_dir)))
  if not data_dir.is_dir():
    raise FileNotFoundError(f"{task}: data dir {data_dir} does not exist")
  split = split or DEFAULT_SPLIT[task]
  subjects = set(subjects) if subjects else None
  sink = _Sink()
  if task in CSV_TASKS:
    by_subject = _read_csv_benchmark(task, data_dir, split, shots, subjects, sink, protocol)
  elif task == "gaokao":
    by_subject = _read_gaokao(data_dir, shots, subjects, sink)
  else:
    by_subject = _read_agieval(data_dir, shots, subjects, sink, protocol)
  if subjects:
    missing = sorted(subjects - set(by_subject))
    if missing:
      raise ValueError(f"{task}: subjects {missing} not found under {data_dir}")
  for note in sink.notes:
    log.info(note)
  return Benchmark(task, split, dict(sorted(by_subject.items())), sink.skipped, sink.notes,
                   sink.multi, sink.excluded, protocol)
