"""JSONL record reading for alignment data: bad lines are reported with their line number, not hidden.

Chat (SFT) and preference (reward model) files are read through `read_jsonl`, which parses each line,
hands it to a per-format validator and collects every malformed line as a `BadRecord`
(file, line number, reason). Callers log the problems and skip those lines; `ReadReport` keeps the
counts so a run can say "1,204 records read, 3 skipped" instead of silently training on less.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any, Callable, Iterator, Optional

from baichuan_jax.records import BadRecord

_LOG = logging.getLogger(__name__)


class RecordError(ValueError):
  """A record that cannot be used; the message names the field and what is allowed."""


@dataclasses.dataclass
class ReadReport:
  """Counts of a JSONL read; `bad` lists every skipped line."""
  path: str
  read: int = 0
  bad: list[BadRecord] = dataclasses.field(default_factory=list)

  @property
  def skipped(self) -> int:
    return len(self.bad)

  def summary(self) -> str:
    return f"{self.path}: {self.read} records read, {self.skipped} malformed lines skipped"


def read_jsonl(path: str, validate: Callable[[Any], Any], *, max_bad_fraction: float = 0.5,
               report: Optional[ReadReport] = None) -> Iterator[Any]:
  """Yields `validate(json.loads(line))` for every non-empty line of `path`.

  A line that is not JSON, or whose object `validate` rejects with `RecordError`, is logged as a
  warning with its line number, appended to `report.bad` and skipped.

  Args:
    path: JSONL file.
    validate: maps a decoded JSON value to a record; raises `RecordError` with a clear reason.
    max_bad_fraction: if more than this fraction of the lines is malformed (checked at the end,
      with at least 10 lines), raise: a file that is mostly wrong is the wrong file.
    report: filled in as lines are read (pass your own to see the counts afterwards).
  Raises:
    FileNotFoundError: `path` does not exist.
    RecordError: too many malformed lines.
  """
  if not os.path.exists(path):
    raise FileNotFoundError(f"alignment data file not found: {path}")
  report = report if report is not None else ReadReport(path)
  total = 0
  with open(path, encoding="utf-8") as f:
    for lineno, line in enumerate(f, start=1):
      if not line.strip():
        continue
      total += 1
      try:
        obj = json.loads(line)
      except json.JSONDecodeError as e:
        _bad(report, path, lineno, f"not valid JSON ({e.msg} at column {e.colno})")
        continue
      try:
        rec = validate(obj)
      except RecordError as e:
        _bad(report, path, lineno, str(e))
        continue
      report.read += 1
      yield rec
  if total >= 10 and report.skipped > max_bad_fraction * total:
    raise RecordError(f"{path}: {report.skipped} of {total} lines are malformed "
                      f"(first: {report.bad[0]}); is this the right file and format?")
  if report.skipped:
    _LOG.warning(report.summary())


def _bad(report: ReadReport, path: str, lineno: int, reason: str) -> None:
  bad = BadRecord(path, lineno, reason)
  report.bad.append(bad)
  _LOG.warning("skipping malformed record %s", bad)


def require_str(obj: dict, field: str, *, allow_empty: bool = False) -> str:
  """obj[field] as a string, or RecordError naming the field."""
  if field not in obj:
    raise RecordError(f"missing field {field!r}")
  value = obj[field]
  if not isinstance(value, str):
    raise RecordError(f"field {field!r} must be a string, got {type(value).__name__}")
  if not allow_empty and not value.strip():
    raise RecordError(f"field {field!r} is empty")
  return value
