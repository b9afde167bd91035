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


# ---- the real published layouts and their quirks (project-made files in each layout) ------------

def _write(path, text, encoding="utf-8"):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_bytes(text.encode(encoding))
  return path


_CEVAL_HEAD = "id,question,A,B,C,D,answer,explanation\n"


def test_single_choice_means_exactly_one_of_the_items_own_letters(tmp_path):
  _write(tmp_path / "val" / "law_val.csv", _CEVAL_HEAD + "".join(
      f"{i},问题{i},甲,乙,丙,丁,{a},\n" for i, a in enumerate(["A", " b ", "AB", "", "E", "CD", "d"])))
  bench = load_benchmark("ceval", tmp_path, shots=0)
  qs = bench.subjects["law"].questions
  # .strip().upper() as Baichuan's scripts do: " b " -> B, "d" -> D.
  assert [(q.qid, q.answer) for q in qs] == [("0", "A"), ("1", "B"), ("6", "D")]
  assert [(m.line, m.reason) for m in bench.multi_answer] == [
      (4, "answer 'AB' has several letters: not single-choice"),
      (7, "answer 'CD' has several letters: not single-choice")]
  assert [(s.line, s.reason) for s in bench.skipped] == [(5, "missing answer"),
                                                         (6, "answer 'E' not in A-D")]


def test_test_split_with_an_empty_answer_column_is_unlabeled(tmp_path):
  # The HF-style export of C-Eval's test split keeps the answer/explanation columns, empty.
  _write(tmp_path / "test" / "law_test.csv", _CEVAL_HEAD + "0,问一,甲,乙,丙,丁,,\n1,问二,甲,乙,丙,丁,,\n")
  _write(tmp_path / "dev" / "law_dev.csv", _CEVAL_HEAD + "0,例,甲,乙,丙,丁,c,解析\n")
  bench = load_benchmark("ceval", tmp_path, split="test", shots=1)
  law = bench.subjects["law"]
  assert [q.answer for q in law.questions] == [None, None] and not bench.skipped
  assert law.shots[0].answer == "C"
  _write(tmp_path / "dev" / "law_dev.csv", _CEVAL_HEAD + "0,例,甲,乙,丙,丁,,\n")
  with pytest.raises(ValueError, match="law_dev.csv: dev examples need an answer column"):
    load_benchmark("ceval", tmp_path, split="test", shots=1)


def test_mmlu_common_export_with_header_and_answers_0_to_3(tmp_path):
  _write(tmp_path / "test" / "astronomy_test.csv",
         "question,subject,A,B,C,D,answer\nWhat orbits Earth?,astronomy,Moon,Sun,Mars,Venus,0\n"
         "Hottest planet?,astronomy,Mercury,Venus,Earth,Mars,1\nRed planet?,astronomy,a,b,c,Mars,3\n")
  _write(tmp_path / "dev" / "astronomy_dev.csv", "Largest planet?,Jupiter,Mars,Venus,Earth,A\n")
  bench = load_benchmark("mmlu", tmp_path, shots=1)
  d = bench.subjects["astronomy"]
  assert [(q.question, q.answer) for q in d.questions] == [
      ("What orbits Earth?", "A"), ("Hottest planet?", "B"), ("Red planet?", "D")]
  assert d.questions[0].options == ("Moon", "Sun", "Mars", "Venus")
  assert d.shots[0].answer == "A" and not bench.skipped  # the headerless Hendrycks file


def test_cmmlu_with_and_without_the_index_column(tmp_path):
  _write(tmp_path / "test" / "arts.csv", ",Question,A,B,C,D,Answer\n0,问,甲,乙,丙,丁,b\n")
  _write(tmp_path / "dev" / "arts.csv", "Question,A,B,C,D,Answer\n例,甲,乙,丙,丁,D\n")
  bench = load_benchmark("cmmlu", tmp_path, shots=1)
  assert bench.subjects["arts"].questions[0].answer == "B"
  assert bench.subjects["arts"].shots[0].answer == "D"


def test_gbk_file_is_read_and_noted_and_undecodable_file_named(tmp_path):
  _write(tmp_path / "val" / "law_val.csv", _CEVAL_HEAD + "0,宪法是国家的根本法吗,是,否,不一定,不知道,A,\n",
         encoding="gbk")
  bench = load_benchmark("ceval", tmp_path, shots=0)
  assert bench.subjects["law"].questions[0].question == "宪法是国家的根本法吗"
  assert any("law_val.csv: not UTF-8; read as GB18030" in n for n in bench.notes)
  (tmp_path / "val" / "law_val.csv").write_bytes(_CEVAL_HEAD.encode() + b"0,\xff\xfe,a,b,c,d,A,\n")
  with pytest.raises(ValueError, match=r"law_val.csv: not UTF-8 \(byte 0xff at offset 41\)"):
    load_benchmark("ceval", tmp_path, shots=0)


def _gaokao_file(folder, items):
  return _write(folder / "2010-2022_Physics_MCQs.json",
                json.dumps({"keywords": "2010-2022_Physics_MCQs", "example": items},
                           ensure_ascii=False, indent=4))


def test_gaokao_glued_and_full_width_option_markers(tmp_path):
  items = [
      {"question": "下列叙述正确的是（  ）A．神经递质参与信息传递B．激素直接参与代谢C．抗体在细胞内起作用D．酶只在细胞内起作用",
       "answer": ["A"], "index": 0},
      {"question": "1．如图，物块静止（）15A.0B.1 NC.2 ND.3 N", "answer": ["d"], "index": 1},
      {"question": "含有DNA.的结构是Ａ．线粒体Ｂ．核糖体Ｃ．中心体Ｄ．高尔基体", "answer": ["A"], "index": 2},
      {"question": "下列细胞中A．含DNA.的细胞B．乙C．丙D．丁", "answer": ["B"], "index": 5},
      {"question": "多选题 A．甲 B．乙 C．丙 D．丁", "answer": ["BC"], "index": 3},
      {"question": "两小题 A．甲 B．乙 C．丙 D．丁", "answer": ["A", "C"], "index": 4},
  ]
  _gaokao_file(tmp_path, items)
  bench = load_benchmark("gaokao", tmp_path, shots=0)
  qs = bench.subjects["Physics"].questions
  assert [(q.question, q.options, q.answer) for q in qs] == [
      ("下列叙述正确的是（  ）", ("神经递质参与信息传递", "激素直接参与代谢", "抗体在细胞内起作用", "酶只在细胞内起作用"), "A"),
      ("1．如图，物块静止（）15", ("0", "1 N", "2 N", "3 N"), "D"),
      ("含有DNA.的结构是", ("线粒体", "核糖体", "中心体", "高尔基体"), "A"),
      ("下列细胞中", ("含DNA.的细胞", "乙", "丙", "丁"), "B")]
  assert not bench.skipped
  assert [m.reason for m in bench.multi_answer] == [
      "answer 'BC' has several letters: not single-choice",
      "answer ['A', 'C'] has 2 answers: not single-choice"]


def _jsonl(path, rows):
  return _write(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def test_agieval_option_formats_labels_and_the_baichuan_four_option_table(tmp_path):
  opts = [["(A)人参", "(B)党参", "(C)黄芪", "(D)当归"], ["A 没有党参", "B 有党参", "C 有黄芪", "D 有当归"],
          ["A: 甲", "B: 乙", "C: 丙", "D: 丁"], ["A．一", "B．二", "C．三", "D．四"],
          ["Aspirin", "B x", "C y", "D z"]]
  rows = [{"passage": None, "question": f"问{i}", "options": o, "label": lab}
          for i, (o, lab) in enumerate(zip(opts, ["a", ["B"], "C", " d ", "A"]))]
  rows.append({"passage": None, "question": "多选", "options": opts[0], "label": ["C", "D"]})
  _jsonl(tmp_path / "logiqa-zh.jsonl", rows)
  _jsonl(tmp_path / "aqua-rat.jsonl", [{"passage": None, "question": "1+1?", "label": "B",
                                       "options": ["(A)1", "(B)2", "(C)3", "(D)4", "(E)5"]}])
  bench = load_benchmark("agieval", tmp_path, shots=0)
  zh = bench.subjects["logiqa-zh"].questions
  assert [(q.options, q.answer) for q in zh] == [
      (("人参", "党参", "黄芪", "当归"), "A"), (("没有党参", "有党参", "有黄芪", "有当归"), "B"),
      (("甲", "乙", "丙", "丁"), "C"), (("一", "二", "三", "四"), "D")]
  assert [(s.line, s.reason) for s in bench.skipped] == [
      (5, "option 0 'Aspirin' does not start with A ((A), A , A:, A．)")]
  assert [(m.line, m.reason) for m in bench.multi_answer] == [
      (6, "answer 'CD' has several letters: not single-choice")]
  assert len(bench.subjects["aqua-rat"].questions[0].options) == 5  # kept without a protocol
  baichuan = load_benchmark("agieval", tmp_path, shots=0, protocol="baichuan")
  assert "aqua-rat" not in baichuan.subjects and baichuan.num_questions == 4
  assert [e.reason for e in baichuan.excluded] == [
      "5 options: Baichuan's table keeps 4-option items only"]


def test_agieval_official_needs_few_shot_prompts_csv(tmp_path):
  _jsonl(tmp_path / "logiqa-zh.jsonl", [{"passage": None, "question": "问", "label": "A",
                                         "options": ["(A)1", "(B)2", "(C)3", "(D)4"]}])
  with pytest.raises(FileNotFoundError, match="few_shot_prompts.csv, not found"):
    load_benchmark("agieval", tmp_path, shots=5, protocol="official")
  assert load_benchmark("agieval", tmp_path, shots=0, protocol="official").num_questions == 1


def test_cell_text_is_kept_as_written(tmp_path):
  # The scripts format pandas / datasets cells as they are: no stripping of the question or options.
  _write(tmp_path / "val" / "law_val.csv", _CEVAL_HEAD + '0,"问题 ", 甲,乙 ,丙,丁,A,\n')
  q = load_benchmark("ceval", tmp_path, shots=0).subjects["law"].questions[0]
  assert (q.question, q.options) == ("问题 ", (" 甲", "乙 ", "丙", "丁"))
