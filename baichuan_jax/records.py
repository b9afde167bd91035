"""Reading JSONL input: one line reader, and bad lines reported as `path:line: reason`.

`iter_jsonl(path)` is the one loop over a JSONL file: it yields `(line_no, value)` for every
non-blank line (1-based line numbers; blank lines are skipped but counted). A line that is not
valid UTF-8 or not valid JSON becomes a `BadRecord` (file, line, reason); by default it raises a
`ValueError` with that text, or it is handed to `on_bad` and skipped. `parse_jsonl_lines` does the
same over lines already in memory. Every JSONL reader of the project goes through one of the two:
the corpus reader (`data.corpus.read_jsonl`), the alignment readers (`read_jsonl` here, with a
per-format validator), the prompt file of the generation CLI and the perplexity texts
(`eval.perplexity`).

`BadRecord` is also what the evaluation benchmark readers report, so every skipped line reads the
same: `path:line: reason`, the form editors and terminals turn into a link.

`read_jsonl(path, validate)` is the skipping reader of alignment data (chat and preference files):
it hands each decoded line to a validator and collects every malformed line in a `ReadReport`, so
a run can say "1,204 records read, 3 skipped" instead of silently training on less.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any, Callable, Iterable, Iterator, Optional, Union

_LOG = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class BadRecord:
  """One skipped line: where it is and why it was rejected."""
  path: str
  line: int  # 1-based line (or row) number in `path`
  reason: str

  def __str__(self) -> str:
    return f"{self.path}:{self.line}: {self.reason}"


class RecordError(ValueError):
  """A record that cannot be used; the message names the field and what is allowed."""


def utf8_error(raw: bytes, err: UnicodeDecodeError) -> tuple[int, str]:
  """(line offset of the bad byte from the start of `raw`, reason naming column and bytes)."""
  offset = raw.count(b"\n", 0, err.start)
  col = err.start - (raw.rfind(b"\n", 0, err.start) + 1) + 1
  near = raw[max(0, err.start - 8):err.start + 8]
  return offset, (f"invalid UTF-8 at column {col} (byte 0x{raw[err.start]:02x} in {near!r}); "
                  "input text must be UTF-8")


def decode_utf8(raw: bytes, path: Union[str, os.PathLike], first_line: int = 1) -> str:
  """`raw.decode("utf-8")`; invalid UTF-8 raises a ValueError naming the file, the line (counted
  from `first_line`), the column and the bytes around it."""
  try:
    return raw.decode("utf-8")
  except UnicodeDecodeError as e:
    offset, reason = utf8_error(raw, e)
    raise ValueError(f"{os.fspath(path)}:{first_line + offset}: {reason}") from None


OnBad = Callable[[BadRecord, Exception], None]


def _raise(bad: BadRecord, err: Exception) -> None:
  raise ValueError(str(bad)) from err


def parse_jsonl_lines(lines: Iterable[Union[str, bytes]], path: Union[str, os.PathLike],
                      on_bad: Optional[OnBad] = None) -> Iterator[tuple[int, Any]]:
  """Yields (line_no, decoded JSON value) for each non-blank line of `lines` (line 1 first).

  Args:
    lines: the file's lines, as bytes (decoded here as UTF-8) or str.
    path: the file the lines came from, for the reports.
    on_bad: called with the `BadRecord` and the error of each line that is not UTF-8 or not JSON;
      the line is then skipped. Default: raise ValueError("path:line: reason").
  """
  path, on_bad = os.fspath(path), on_bad or _raise
  for line_no, raw in enumerate(lines, start=1):
    if isinstance(raw, bytes):
      try:
        raw = raw.decode("utf-8")
      except UnicodeDecodeError as e:
        on_bad(BadRecord(path, line_no, utf8_error(raw, e)[1]), e)
        continue
    if not raw.strip():
      continue
    try:
      value = json.loads(raw.rstrip("\r\n"))  # so a column past the text reads as the line's end
    except json.JSONDecodeError as e:
      on_bad(BadRecord(path, line_no, f"not valid JSON ({e.msg} at column {e.colno})"), e)
      continue
    yield line_no, value


def iter_jsonl(path: Union[str, os.PathLike],
               on_bad: Optional[OnBad] = None) -> Iterator[tuple[int, Any]]:
  """Yields (line_no, decoded JSON value) for each non-blank line of the file `path`.

  Lines are split at b"\\n" and each is decoded as UTF-8 on its own, so invalid UTF-8 is reported
  with its line. See `parse_jsonl_lines` for `on_bad`.
  """
  with open(path, "rb") as f:
    yield from parse_jsonl_lines(f, path, on_bad)


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

  def add_bad(self, bad: BadRecord, _err: Optional[Exception] = None) -> None:
    """Records a skipped line and logs it as a warning (an `on_bad` for `iter_jsonl`)."""
    self.bad.append(bad)
    _LOG.warning("skipping malformed record %s", bad)


def read_jsonl(path: str, validate: Callable[[Any], Any], *, max_bad_fraction: float = 0.5,
               report: Optional[ReadReport] = None) -> Iterator[Any]:
  """Yields `validate(json.loads(line))` for every non-empty line of `path`.

  A line that is not UTF-8 or not JSON, or whose object `validate` rejects with `RecordError`, is
  logged as a warning with its line number, appended to `report.bad` and skipped.

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

  def unparsed(bad: BadRecord, err: Exception) -> None:
    nonlocal total
    total += 1
    report.add_bad(bad, err)

  for line_no, obj in iter_jsonl(path, on_bad=unparsed):
    total += 1
    try:
      rec = validate(obj)
    except RecordError as e:
      report.add_bad(BadRecord(path, line_no, str(e)))
      continue
    report.read += 1
    yield rec
  if total >= 10 and report.skipped > max_bad_fraction * total:
    raise RecordError(f"{path}: {report.skipped} of {total} lines are malformed "
                      f"(first: {report.bad[0]}); is this the right file and format?")
  if report.skipped:
    _LOG.warning(report.summary())


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
