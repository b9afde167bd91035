"""Readers for the published file layouts of C-Eval, CMMLU, MMLU, GAOKAO-Bench and AGIEval.

Every reader returns `Question`s plus a list of `Skipped` rows. A malformed row (a missing option,
an answer outside the allowed letters, a wrong column count) is never guessed at: it is logged with
its file and line and left out, and the caller reports how many were left out.

Layouts (as published; the data cannot be downloaded here, so point `data_dir` at a local copy):
  C-Eval   `{dev,val,test}/{subject}_{split}.csv`, header `id,question,A,B,C,D,answer[,explanation]`;
           the public test split has no `answer` column (predictions only, for submission).
  CMMLU    `{dev,test}/{subject}.csv`, header `,Question,A,B,C,D,Answer` (first column a row index).
  MMLU     `{dev,val,test}/{subject}_{split}.csv`, no header: `question,A,B,C,D,answer`.
  GAOKAO   GAOKAO-Bench objective files `2010-2022_{Subject}[_MCQs].json` (in `data_dir` or
           `data_dir/Objective_Questions`): `{"keywords": ..., "example": [{"question": stem with the
           options written inline ("A．...B．..."), "answer": ["A"], "year", "category", "analysis",
           "index", "score"}, ...]}`. Only items with exactly one answer letter are single-choice.
  AGIEval  `{task}.jsonl` (the repo's `data/v1/`): one object per line with `passage` (str or null),
           `question`, `options` (["(A)...", "(B)...", ...]) and `label` ("A" or ["A"]).
           Tasks without options (cloze) are not multiple choice and are skipped whole.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import os
import re
from pathlib import Path
from typing import Iterator, Optional

from baichuan_jax.records import BadRecord

log = logging.getLogger(__name__)

LETTERS = "ABCDEFGH"
TASKS = ("ceval", "cmmlu", "mmlu", "gaokao", "agieval")


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


Skipped = BadRecord  # a row left out, with where it is and why


@dataclasses.dataclass
class SubjectData:
  """The shots (few-shot examples, in file order) and the questions to score for one subject."""
  subject: str
  shots: list
  questions: list


@dataclasses.dataclass
class Benchmark:
  """All subjects of one benchmark split, plus every row that was skipped while reading."""
  task: str
  split: str
  subjects: dict  # subject -> SubjectData, sorted by subject
  skipped: list  # [Skipped] malformed rows left out
  notes: list = dataclasses.field(default_factory=list)  # items left out as not single-choice

  @property
  def num_questions(self) -> int:
    return sum(len(s.questions) for s in self.subjects.values())


def _skip(skipped: list, path, line: int, reason: str) -> None:
  item = Skipped(str(path), line, reason)
  log.warning("skipping %s", item)
  skipped.append(item)


def _check_choice(options, answer, letters, answer_required=True):
  """Returns an error message for bad options/answer, or None when the row is usable."""
  for letter, text in zip(letters, options):
    if text is None or not str(text).strip():
      return f"missing option {letter}"
  if answer is None:
    return "missing answer" if answer_required else None
  if answer not in letters:
    return f"answer {answer!r} not in {letters[0]}-{letters[-1]}"
  return None


def _csv_records(path: Path) -> Iterator[tuple[int, list]]:
  """Yields (line where the record starts, fields) for each CSV record (quoted newlines allowed)."""
  with open(path, newline="", encoding="utf-8-sig") as f:
    reader = csv.reader(f)
    start = 1
    for row in reader:
      yield start, row
      start = reader.line_num + 1


def _read_mc_csv(task, subject, path, header, columns, skipped, letters="ABCD"):
  """Reads one CSV of `question, A..D, answer` rows.

  Args:
    header: the expected header names (lower-cased), or None for header-less files.
    columns: (question column, first option column, answer column or None) indices.
  """
  q_col, opt_col, ans_col = columns
  out = []
  records = _csv_records(path)
  if header is not None:
    first = next(records, None)
    if first is None:
      raise ValueError(f"{path}: empty file; expected a header row {header}")
    got = [h.strip().lower() for h in first[1]]
    if got[:len(header)] != header:
      raise ValueError(f"{path}:1: header {first[1]} does not match the published layout {header}")
    width = len(got)
  else:
    width = None
  for line, row in records:
    if not any(c.strip() for c in row):
      continue
    need = width if width is not None else (ans_col + 1)
    if len(row) != need:
      _skip(skipped, path, line, f"expected {need} columns, found {len(row)}")
      continue
    options = tuple(row[opt_col:opt_col + len(letters)])
    answer = row[ans_col].strip() if ans_col is not None else None
    err = _check_choice(options, answer, letters, ans_col is not None)
    if not row[q_col].strip():
      err = err or "empty question"
    if err:
      _skip(skipped, path, line, err)
      continue
    qid = row[0].strip() if task == "ceval" else str(len(out))
    out.append(Question(task, subject, qid, row[q_col].strip(), tuple(o.strip() for o in options),
                        answer, f"{path}:{line}"))
  return out


# ---- C-Eval / CMMLU / MMLU -------------------------------------------------------------------

def _ceval_file(path, subject, skipped):
  with open(path, newline="", encoding="utf-8-sig") as f:
    head = [h.strip().lower() for h in next(csv.reader(f), [])]
  if head[:7] == ["id", "question", "a", "b", "c", "d", "answer"]:
    return _read_mc_csv("ceval", subject, path, head[:7], (1, 2, 6), skipped)
  if head[:6] == ["id", "question", "a", "b", "c", "d"]:  # the public test split: no answers
    return _read_mc_csv("ceval", subject, path, head[:6], (1, 2, None), skipped)
  raise ValueError(f"{path}:1: header {head} is not C-Eval's id,question,A,B,C,D[,answer[,explanation]]")


def _cmmlu_file(path, subject, skipped):
  return _read_mc_csv("cmmlu", subject, path, ["", "question", "a", "b", "c", "d", "answer"],
                      (1, 2, 6), skipped)


def _mmlu_file(path, subject, skipped):
  return _read_mc_csv("mmlu", subject, path, None, (0, 1, 5), skipped)


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


_CSV_READERS = {"ceval": _ceval_file, "cmmlu": _cmmlu_file, "mmlu": _mmlu_file}
DEFAULT_SPLIT = {"ceval": "val", "cmmlu": "test", "mmlu": "test", "gaokao": "test", "agieval": "test"}


def _read_csv_benchmark(task, data_dir, split, shots, subjects, skipped):
  reader = _CSV_READERS[task]
  eval_files = _subject_files(task, data_dir, split)
  dev_files = _subject_files(task, data_dir, "dev") if shots > 0 else {}
  out = {}
  for subject, path in eval_files.items():
    if subjects and subject not in subjects:
      continue
    if shots > 0 and subject not in dev_files:
      raise FileNotFoundError(f"{task}: {shots}-shot prompts need dev/ examples for {subject!r}, "
                              f"but {data_dir / 'dev'} has no file for it")
    shot_rows = reader(dev_files[subject], subject, skipped)[:shots] if shots > 0 else []
    if any(q.answer is None for q in shot_rows):
      raise ValueError(f"{dev_files[subject]}: dev examples need an answer column")
    out[subject] = SubjectData(subject, shot_rows, reader(path, subject, skipped))
  return out


# ---- GAOKAO-Bench ----------------------------------------------------------------------------

_GAOKAO_NAME = re.compile(r"^\d{4}-\d{4}_(.+?)(?:_MCQs)?$")
# An option marker: the letter, then a full-width or ASCII period, 、 or colon.
_OPTION_MARK = {L: re.compile(rf"(?:^|(?<=\s)|(?<=[（(]))({L})\s*[．.、:：]") for L in "ABCD"}


def split_inline_options(text: str, letters: str = "ABCD"):
  """Splits a GAOKAO stem with inline options into (stem, options).

  Markers are searched from the end (D last, then the last C before it, ...), so letters that
  appear inside a reading passage earlier in the stem are not taken for options.
  Returns None when some option marker cannot be found.
  """
  end = len(text)
  starts = []
  for letter in reversed(letters):
    found = None
    for m in _OPTION_MARK[letter].finditer(text, 0, end):
      found = m
    if found is None:
      return None
    starts.append((found.start(1), found.end()))
    end = found.start(1)
  starts.reverse()
  stem = text[:starts[0][0]].rstrip(" \n（(")
  options = []
  for i, (_, body_start) in enumerate(starts):
    body_end = starts[i + 1][0] if i + 1 < len(starts) else len(text)
    options.append(text[body_start:body_end].strip().rstrip("（(").strip())
  return stem.strip(), tuple(options)


def _json_items_with_lines(path: Path, key: str):
  """Yields (line, item) for each element of the top-level array `key` of a JSON object file."""
  text = Path(path).read_text(encoding="utf-8-sig")
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


def _read_gaokao_file(path, subject, skipped, notes):
  out = []
  multi = 0
  for line, item in _json_items_with_lines(path, "example"):
    if not isinstance(item, dict) or "question" not in item or "answer" not in item:
      _skip(skipped, path, line, "item needs 'question' and 'answer' fields")
      continue
    answer = item["answer"]
    if isinstance(answer, str):
      answer = [answer]
    if not isinstance(answer, list) or not answer:
      _skip(skipped, path, line, f"answer {item['answer']!r} is not a list of letters")
      continue
    if len(answer) != 1:
      multi += 1  # several sub-questions or several correct letters: not single-choice
      continue
    parsed = split_inline_options(str(item["question"]))
    if parsed is None:
      _skip(skipped, path, line, "missing option (could not find all of A-D in the question text)")
      continue
    stem, options = parsed
    letter = str(answer[0]).strip()
    err = _check_choice(options, letter, "ABCD")
    if err:
      _skip(skipped, path, line, err)
      continue
    qid = str(item.get("index", len(out)))
    out.append(Question("gaokao", subject, qid, stem, options, letter, f"{path}:{line}"))
  if multi:
    notes.append(f"{path}: {multi} items with several answers are not single-choice; not scored")
  return out


def _read_gaokao(data_dir, shots, subjects, skipped, notes):
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
    items = _read_gaokao_file(p, subject, skipped, notes)
    if items:
      out[subject] = SubjectData(subject, items[:shots], items[shots:])
  return out


# ---- AGIEval ---------------------------------------------------------------------------------

_AGI_OPTION = re.compile(r"^\s*[(（]([A-H])[)）]\s*")


def _read_agieval_file(path, subject, skipped, notes):
  out = []
  with open(path, encoding="utf-8-sig") as f:
    lines = list(enumerate(f, start=1))
  for line, raw in lines:
    if not raw.strip():
      continue
    try:
      item = json.loads(raw)
    except json.JSONDecodeError as e:
      _skip(skipped, path, line, f"not valid JSON ({e.msg})")
      continue
    opts = item.get("options")
    if not opts:
      notes.append(f"{path}: items without options (cloze task) are not multiple choice; not scored")
      return []
    texts, bad = [], None
    for k, o in enumerate(opts):
      m = _AGI_OPTION.match(str(o))
      if not m or m.group(1) != LETTERS[k]:
        bad = f"option {k} {str(o)[:20]!r} does not start with ({LETTERS[k]})"
        break
      texts.append(str(o)[m.end():])
    if bad:
      _skip(skipped, path, line, bad)
      continue
    label = item.get("label")
    if isinstance(label, list):
      if len(label) != 1:
        _skip(skipped, path, line, f"label {label!r} has several answers; not single-choice")
        continue
      label = label[0]
    letters = LETTERS[:len(texts)]
    err = _check_choice(texts, None if label is None else str(label).strip(), letters)
    if not str(item.get("question") or "").strip():
      err = err or "empty question"
    if err:
      _skip(skipped, path, line, err)
      continue
    out.append(Question("agieval", subject, str(len(out)), str(item["question"]).strip(),
                        tuple(t.strip() for t in texts), str(label).strip(), f"{path}:{line}",
                        passage=(item.get("passage") or None)))
  return out


def _read_agieval(data_dir, shots, subjects, skipped, notes):
  files = sorted(data_dir.glob("*.jsonl"))
  if not files:
    raise FileNotFoundError(f"agieval: no AGIEval *.jsonl files in {data_dir}")
  out = {}
  for p in files:
    if subjects and p.stem not in subjects:
      continue
    items = _read_agieval_file(p, p.stem, skipped, notes)
    if items:
      out[p.stem] = SubjectData(p.stem, items[:shots], items[shots:])
  return out


def load_benchmark(task: str, data_dir, split: Optional[str] = None, shots: int = 5,
                   subjects=None) -> Benchmark:
  """Reads one benchmark from its published layout.

  Args:
    task: one of ceval, cmmlu, mmlu, gaokao, agieval.
    data_dir: folder holding the benchmark (e.g. the unpacked `data/` of the release).
    split: split to score (default: C-Eval val, others test). GAOKAO and AGIEval have a single
      split: their first `shots` items per subject become the shots and are not scored.
    shots: few-shot examples per subject, from `dev/` for the CSV benchmarks.
    subjects: optional iterable restricting which subjects are read.
  Returns:
    a `Benchmark`; `.skipped` lists malformed rows (file, line, reason); `.notes` explains items
    that are not single-choice.
  """
  if task not in TASKS:
    raise ValueError(f"task={task!r} is invalid: allowed {', '.join(TASKS)}")
  if shots < 0:
    raise ValueError(f"shots={shots} is invalid: must be >= 0")
  data_dir = Path(os.path.expanduser(str(data_dir)))
  if not data_dir.is_dir():
    raise FileNotFoundError(f"{task}: data dir {data_dir} does not exist")
  split = split or DEFAULT_SPLIT[task]
  subjects = set(subjects) if subjects else None
  skipped, notes = [], []
  if task in _CSV_READERS:
    by_subject = _read_csv_benchmark(task, data_dir, split, shots, subjects, skipped)
  elif task == "gaokao":
    by_subject = _read_gaokao(data_dir, shots, subjects, skipped, notes)
  else:
    by_subject = _read_agieval(data_dir, shots, subjects, skipped, notes)
  if subjects:
    missing = sorted(subjects - set(by_subject))
    if missing:
      raise ValueError(f"{task}: subjects {missing} not found under {data_dir}")
  for note in notes:
    log.info(note)
  return Benchmark(task, split, dict(sorted(by_subject.items())), skipped, notes)
