"""The one JSONL line reader: line numbers, blank lines, bad JSON and invalid UTF-8 named by line."""

import json

import pytest

from baichuan_jax import records


def _write(tmp_path, data: bytes):
  p = tmp_path / "in.jsonl"
  p.write_bytes(data)
  return p


def test_yields_line_numbers_counting_blank_lines(tmp_path):
  p = _write(tmp_path, b'{"a": 1}\n\n   \n[2, 3]\r\n"x"\n')
  assert list(records.iter_jsonl(p)) == [(1, {"a": 1}), (4, [2, 3]), (5, "x")]


def test_bad_lines_raise_with_file_and_line_by_default(tmp_path):
  p = _write(tmp_path, b'{"a": 1}\n{"a": \n')
  with pytest.raises(ValueError, match=rf"^{p}:2: not valid JSON \(Expecting value at column 7\)$"):
    list(records.iter_jsonl(p))
  # "ab\xe4\xb8" : the 3-byte UTF-8 of U+4E2D cut after 2 bytes, at column 3 of line 3.
  p = _write(tmp_path, b'1\n2\nab\xe4\xb8 x\n')
  with pytest.raises(ValueError, match=rf"^{p}:3: invalid UTF-8 at column 3 \(byte 0xe4"):
    list(records.iter_jsonl(p))


def test_on_bad_collects_and_skips(tmp_path):
  p = _write(tmp_path, b'{"t": "ok"}\nnope\n\xff\n{"t": "\xe4\xb8\xad"}\n')
  seen = []
  got = list(records.iter_jsonl(p, on_bad=lambda bad, err: seen.append((bad, type(err)))))
  assert got == [(1, {"t": "ok"}), (4, {"t": "\u4e2d"})]
  assert [(b.line, b.reason.split(" (")[0], e) for b, e in seen] == [
      (2, "not valid JSON", json.JSONDecodeError), (3, "invalid UTF-8 at column 1", UnicodeDecodeError)]
  assert str(seen[0][0]) == f"{p}:2: not valid JSON (Expecting value at column 1)"


def test_read_jsonl_counts_unparsable_lines_towards_the_bad_fraction(tmp_path):
  # 10 lines: 4 valid, 3 not JSON, 3 rejected by the validator -> 6 of 10 > 0.5.
  lines = [b'{"v": 1}'] * 4 + [b"{"] * 3 + [b'{"v": -1}'] * 3
  p = _write(tmp_path, b"\n".join(lines) + b"\n")

  def validate(obj):
    if obj["v"] < 0:
      raise records.RecordError("field 'v' must be >= 0")
    return obj["v"]

  report = records.ReadReport(str(p))
  with pytest.raises(records.RecordError, match="6 of 10 lines are malformed"):
    list(records.read_jsonl(str(p), validate, report=report))
  assert report.read == 4 and [b.line for b in report.bad] == [5, 6, 7, 8, 9, 10]
