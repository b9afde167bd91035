"""Benchmark readers: the published layouts, malformed rows reported with file and line."""

import json

import pytest

from baichuan_jax.eval import load_benchmark, split_inline_options
from test_eval_support import FIXTURES


def _skipped(bench):
  return [(s.path.replace(str(FIXTURES) + "/", ""), s.line, s.reason) for s in bench.skipped]


def test_ceval_val_skips_malformed_rows_with_file_and_line(caplog):
  bench = load_benchmark("ceval", FIXTURES / "ceval", shots=5)
  assert bench.split == "val"
  # Line 4: option B empty; line 5: answer "E". Line 6 starts a record whose question spans two
  # lines (a quoted newline), so its line is 6, not 7.
  assert _skipped(bench) == [("ceval/val/computer_network_val.csv", 4, "missing option B"),
                             ("ceval/val/computer_network_val.csv", 5, "answer 'E' not in A-D")]
  assert "computer_network_val.csv:4: missing option B" in caplog.text
  cn = bench.subjects["computer_network"]
  assert [q.qid for q in cn.questions] == ["0", "1", "4"]
  assert cn.questions[2].question == "下面关于子网掩码的说法，\n正确的是____。"
  assert cn.questions[2].source.endswith("computer_network_val.csv:6")
  assert [q.answer for q in cn.shots] == ["C", "B", "B", "D", "A"]
  assert bench.num_questions == 6


def test_ceval_test_split_has_no_answers():
  bench = load_benchmark("ceval", FIXTURES / "ceval", split="test", shots=5)
  qs = [q for s in bench.subjects.values() for q in s.questions]
  assert len(qs) == 5 and all(q.answer is None for q in qs)


def test_cmmlu_and_mmlu_layouts():
  cm = load_benchmark("cmmlu", FIXTURES / "cmmlu", shots=5)
  assert _skipped(cm) == [("cmmlu/test/agronomy.csv", 4, "answer 'F' not in A-D")]
  assert [q.answer for q in cm.subjects["agronomy"].questions] == ["B", "A", "C"]
  mm = load_benchmark("mmlu", FIXTURES / "mmlu", shots=5)
  assert _skipped(mm) == [("mmlu/test/abstract_algebra_test.csv", 3, "missing option D")]
  q = mm.subjects["world_religions"].questions[1]
  assert (q.question, q.options, q.answer) == (
      "Which festival marks the end of Ramadan?", ("Diwali", "Eid al-Fitr", "Passover", "Vesak"), "B")


def test_gaokao_single_choice_only():
  bench = load_benchmark("gaokao", FIXTURES / "gaokao", shots=5)
  lines = _skipped(bench)
  assert [(p, r) for p, _, r in lines] == [
      ("gaokao/2010-2022_Biology_MCQs.json", "missing option D"),
      ("gaokao/2010-2022_History_MCQs.json", "answer 'E' not in A-D")]
  # The reported line is where the item's "{" sits in the file.
  for path, line, _ in lines:
    assert (FIXTURES / path).read_text(encoding="utf-8").splitlines()[line - 1].strip() == "{"
  assert any("1 items with several answers" in n for n in bench.notes)
  bio = bench.subjects["Biology"]
  assert len(bio.shots) == 5 and [q.qid for q in bio.questions] == ["5", "6", "9"]


def test_agieval_options_labels_and_cloze():
  bench = load_benchmark("agieval", FIXTURES / "agieval", shots=5)
  assert _skipped(bench) == [("agieval/logiqa-zh.jsonl", 8, "answer 'D' not in A-C")]
  assert "math" not in bench.subjects and any("math.jsonl" in n for n in bench.notes)
  lsat = bench.subjects["lsat-ar"]
  assert lsat.shots[3].answer == "A"  # label given as ["A"]
  assert len(lsat.questions[0].options) == 5 and lsat.questions[0].answer == "E"
  assert lsat.questions[0].passage.startswith("Five runners")


def test_split_inline_options_searches_from_the_end():
  stem, opts = split_inline_options("Read: A. cat sat.\nQ?\nA．one B．two\nC．three D．four")
  assert stem == "Read: A. cat sat.\nQ?" and opts == ("one", "two", "three", "four")
  assert split_inline_options("no options here") is None


def test_bad_layouts_raise_clear_errors(tmp_path):
  (tmp_path / "val").mkdir()
  (tmp_path / "dev").mkdir()
  (tmp_path / "val" / "law_val.csv").write_text("q,a,b,c,d,ans\n1,2,3,4,5,A\n", encoding="utf-8")
  (tmp_path / "dev" / "law_dev.csv").write_text("id,question,A,B,C,D,answer\n", encoding="utf-8")
  with pytest.raises(ValueError, match=r"law_val.csv:1: header .* not C-Eval"):
    load_benchmark("ceval", tmp_path)
  with pytest.raises(FileNotFoundError, match="no test/ folder"):
    load_benchmark("mmlu", tmp_path)
  with pytest.raises(ValueError, match="task='boolq' is invalid"):
    load_benchmark("boolq", tmp_path)
  (tmp_path / "2010-2022_Math_I_MCQs.json").write_text('{"example": [', encoding="utf-8")
  with pytest.raises(ValueError, match="MCQs.json:1: not valid JSON"):
    load_benchmark("gaokao", tmp_path)


def test_ceval_missing_dev_subject_is_an_error(tmp_path):
  (tmp_path / "val").mkdir()
  (tmp_path / "dev").mkdir()
  row = "id,question,A,B,C,D,answer\n0,q,a,b,c,d,A\n"
  (tmp_path / "val" / "law_val.csv").write_text(row, encoding="utf-8")
  (tmp_path / "dev" / "logic_dev.csv").write_text(row, encoding="utf-8")
  with pytest.raises(FileNotFoundError, match="dev/ examples for 'law'"):
    load_benchmark("ceval", tmp_path, shots=5)
  assert load_benchmark("ceval", tmp_path, shots=0).num_questions == 1
