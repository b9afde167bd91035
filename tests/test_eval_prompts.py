"""Prompt formats (golden strings of both protocols), fitting prompts to the context, and the
answer-letter tokens."""

import csv
import dataclasses
import json

import pytest

from baichuan_jax.eval import fit_prompt, letter_tokens, load_benchmark, prompt_text
from baichuan_jax.eval.prompts import prompt_parts, rules, single_letter_tokens
from baichuan_jax.eval.readers import Question
from test_eval_support import FIXTURES


def _subject(task, subject, shots=2):
  return load_benchmark(task, FIXTURES / task, shots=shots).subjects[subject]


# The official protocol: each benchmark's own script (C-Eval llama.py, CMMLU mp_utils, Hendrycks).


def test_ceval_golden():
  d = _subject("ceval", "high_school_history")
  assert prompt_text(d.questions[0], d.shots, "official") == (
      "以下是中国关于高中历史考试的单项选择题，请选出其中的正确答案。\n\n"
      "秦始皇统一六国是在公元前____年。\nA. 221\nB. 206\nC. 202\nD. 230\n答案：A\n\n"
      "中国古代四大发明不包括____。\nA. 造纸术\nB. 印刷术\nC. 火药\nD. 瓷器\n答案：D\n\n"
      "唐朝的都城是____。\nA. 洛阳\nB. 长安\nC. 开封\nD. 南京\n答案：")


def test_cmmlu_golden():
  d = _subject("cmmlu", "chinese_history", shots=1)
  assert prompt_text(d.questions[0], d.shots, "official") == (
      "以下是关于中国历史的单项选择题，请直接给出正确答案的选项。\n\n"
      "题目：中国历史上第一个统一的中央集权国家是____。\nA. 夏\nB. 商\nC. 周\nD. 秦\n答案是：D\n\n"
      "题目：北宋的都城是____。\nA. 临安\nB. 开封\nC. 洛阳\nD. 北京\n答案是：")


def test_mmlu_golden():
  d = _subject("mmlu", "world_religions", shots=1)
  # Hendrycks' format_subject puts a space before every word: two spaces after "about".
  assert prompt_text(d.questions[0], d.shots, "official") == (
      "The following are multiple choice questions (with answers) about  world religions.\n\n"
      "Which religion's holy book is the Quran?\nA. Islam\nB. Hinduism\nC. Buddhism\nD. Judaism\n"
      "Answer: A\n\n"
      "The Vedas are scriptures of\nA. Hinduism\nB. Islam\nC. Shinto\nD. Baha'i\nAnswer:")


def test_gaokao_golden_splits_inline_options():
  d = _subject("gaokao", "Biology", shots=2)
  # The second shot writes its options on one line ("A．线粒体　B．叶绿体　..."); they are split out.
  assert prompt_text(d.questions[0], d.shots, "official") == (
      "以下是中国高考生物考试的单项选择题，请选出其中的正确答案。\n\n"
      "1．下列关于细胞的叙述，正确的是（\u3000\u3000）\nA. 病毒具有细胞结构\nB. 蓝藻没有细胞核\n"
      "C. 所有细胞都有叶绿体\nD. 细胞膜不含蛋白质\n答案：B\n\n"
      "2．光合作用的场所是（\u3000\u3000）\nA. 线粒体\nB. 叶绿体\nC. 核糖体\nD. 高尔基体\n答案：B\n\n"
      "3．DNA的基本组成单位是（\u3000\u3000）\nA. 氨基酸\nB. 葡萄糖\nC. 脱氧核苷酸\nD. 脂肪酸\n答案：")


def _chars(text):
  return [ord(c) for c in text]  # one token per character: lengths are easy to reason about


def test_fit_prompt_keeps_the_first_k_shots():
  # MMLU's and CMMLU's scripts (and Baichuan's) keep the FIRST k shots when a prompt is too long.
  d = _subject("ceval", "computer_network", shots=5)
  q = d.questions[0]
  full = len(prompt_text(q, d.shots))
  three = len(prompt_text(q, d.shots[:3]))
  assert three < len(prompt_text(q, d.shots[:4])) < full
  p = fit_prompt(q, d.shots, _chars, max_len=three + 1, bos=[1])  # +1 for the BOS
  assert (p.shots_used, p.shots_dropped, p.truncated) == (3, 2, False)
  assert p.tokens == (1,) + tuple(_chars(prompt_text(q, d.shots[:3])))  # the FIRST three kept
  p = fit_prompt(q, d.shots, _chars, max_len=full + 1, bos=[1])
  assert (p.shots_used, p.shots_dropped) == (5, 0)


def test_fit_prompt_truncates_from_the_left_when_nothing_fits():
  d = _subject("ceval", "computer_network", shots=5)
  q = d.questions[0]
  zero = _chars(prompt_text(q, []))
  p = fit_prompt(q, d.shots, _chars, max_len=12, reserve=1, bos=[1])
  assert p.truncated and p.shots_used == 0 and p.shots_dropped == 5
  assert p.tokens == (1,) + tuple(zero[-10:])  # 1 BOS + 10 tokens + 1 reserved = 12


def test_letter_tokens_single_and_multi_token_letters():
  vocab = {"答案": 10, "：": 11, "A": 20, "B": 21, "C": 22, "D": 23, "Answer": 30, ":": 31, "▁": 32,
           "▁C": 33}

  def encode(text):  # greedy longest match over the toy vocabulary; " " -> "▁"
    text, out = text.replace(" ", "▁"), []
    while text:
      piece = max((p for p in vocab if text.startswith(p)), key=len)
      out.append(vocab[piece])
      text = text[len(piece):]
    return out

  lt = letter_tokens(encode, "答案：", "", "ABCD")
  assert lt.conts == ((20,), (21,), (22,), (23,)) and lt.max_len == 1
  lt = letter_tokens(encode, "Answer:", " ", "ABCD")  # " A" -> "▁" "A", but " C" -> "▁C"
  assert lt.conts == ((32, 20), (32, 21), (33,), (32, 23)) and lt.max_len == 2


def test_letter_tokens_rejects_indistinct_letters():
  encode = lambda text: [5] * len(text)  # every character the same token
  with pytest.raises(ValueError, match="tokenize the same"):
    letter_tokens(encode, "答案：", "", "ABCD")


def test_question_without_answer_cannot_be_a_shot():
  q = Question("ceval", "law", "0", "问题", ("a", "b", "c", "d"), None, "x.csv:2")
  with pytest.raises(ValueError, match="x.csv:2"):
    prompt_text(q, [q])


# ---- the baichuan protocol: Baichuan's evaluate_zh.py / evaluate_mmlu.py -----------------------

def test_baichuan_ceval_golden_one_newline_and_shuffled_dev():
  d = load_benchmark("ceval", FIXTURES / "ceval", shots=2, protocol="baichuan").subjects[
      "high_school_history"]
  # dataset['dev'].shuffle(seed=123) on 5 rows = numpy default_rng(123).permutation(5) = 4,0,2,3,1:
  # the first two shots are dev rows 4 (丝绸之路) and 0 (秦始皇).
  assert prompt_text(d.questions[0], d.shots, "baichuan") == (
      "以下是中国关于高中历史考试的单项选择题，请选出其中的正确答案。\n"
      "\n丝绸之路的开辟与____有关。\nA. 张骞\nB. 郑和\nC. 玄奘\nD. 鉴真\n答案：A"
      "\n秦始皇统一六国是在公元前____年。\nA. 221\nB. 206\nC. 202\nD. 230\n答案：A"
      "\n唐朝的都城是____。\nA. 洛阳\nB. 长安\nC. 开封\nD. 南京\n答案：")
  # evaluate_zh.py's zero-shot prompt: the header, a blank line, the question.
  assert prompt_text(d.questions[0], [], "baichuan") == (
      "以下是中国关于高中历史考试的单项选择题，请选出其中的正确答案。\n\n"
      "唐朝的都城是____。\nA. 洛阳\nB. 长安\nC. 开封\nD. 南京\n答案：")


def test_baichuan_gaokao_golden_uses_the_baichuan_layout():
  d = _subject("gaokao", "Biology", shots=2)
  assert prompt_text(d.questions[0], d.shots, "baichuan") == (
      "以下是中国高考生物考试的单项选择题，请选出其中的正确答案。\n"
      "\n1．下列关于细胞的叙述，正确的是（\u3000\u3000）\nA. 病毒具有细胞结构\nB. 蓝藻没有细胞核\n"
      "C. 所有细胞都有叶绿体\nD. 细胞膜不含蛋白质\n答案：B"
      "\n2．光合作用的场所是（\u3000\u3000）\nA. 线粒体\nB. 叶绿体\nC. 核糖体\nD. 高尔基体\n答案：B"
      "\n3．DNA的基本组成单位是（\u3000\u3000）\nA. 氨基酸\nB. 葡萄糖\nC. 脱氧核苷酸\nD. 脂肪酸\n答案：")


def test_baichuan_mmlu_is_hendrycks_text_and_cmmlu_is_cmmlu_text():
  d = _subject("mmlu", "world_religions", shots=1)
  assert prompt_text(d.questions[0], d.shots, "baichuan") == prompt_text(
      d.questions[0], d.shots, "official")
  d = _subject("cmmlu", "chinese_history", shots=1)
  assert prompt_text(d.questions[0], d.shots, "baichuan") == (
      "以下是关于中国历史的单项选择题，请直接给出正确答案的选项。\n\n"
      "题目：中国历史上第一个统一的中央集权国家是____。\nA. 夏\nB. 商\nC. 周\nD. 秦\n答案是：D\n\n"
      "题目：北宋的都城是____。\nA. 临安\nB. 开封\nC. 洛阳\nD. 北京\n答案是：")


def test_rules_of_both_protocols():
  # (BOS, truncation, letter token, headline average), from the scripts (prompts module docstring).
  table = {(p, t): tuple(dataclasses.astuple(rules(t, p))) for p in ("baichuan", "official")
           for t in ("ceval", "cmmlu", "mmlu", "gaokao", "agieval")}
  assert table == {
      ("baichuan", "ceval"): (False, "none", "last_id", "macro"),
      ("baichuan", "cmmlu"): (False, "drop_longest", "last_id", "macro"),
      ("baichuan", "mmlu"): (False, "first_k", "last_id", "micro"),
      ("baichuan", "gaokao"): (False, "first_k", "last_id", "macro"),
      ("baichuan", "agieval"): (False, "first_k", "last_id", "macro"),
      ("official", "ceval"): (True, "none", "first_id", "macro"),
      ("official", "cmmlu"): (False, "drop_longest", "piece", "macro"),
      ("official", "mmlu"): (False, "first_k", "continuation", "micro"),
      ("official", "gaokao"): (True, "first_k", "first_id", "macro"),
      ("official", "agieval"): (False, "agieval", "continuation", "micro"),
  }
  with pytest.raises(ValueError, match="protocol='lm-eval' is invalid"):
    rules("ceval", "lm-eval")


class _ToyTokenizer:
  """SentencePiece-like: a dummy-prefix "▁" before text, and a piece table."""
  pieces = {"▁": 5, "A": 10, "B": 11, "C": 12, "D": 13, "▁A": 20, "▁B": 21, "▁C": 22, "▁D": 23}

  def encode(self, text):
    return [self.pieces["▁" + text]] if "▁" + text in self.pieces else [5, self.pieces[text]]

  def piece_to_id(self, piece):
    return self.pieces[piece]


def test_single_letter_token_rules():
  tok = _ToyTokenizer()
  assert single_letter_tokens(tok, "last_id", "ABCD").conts == ((20,), (21,), (22,), (23,))
  assert single_letter_tokens(tok, "first_id", "ABCD").conts == ((20,), (21,), (22,), (23,))
  assert single_letter_tokens(tok, "piece", "ABCD").conts == ((10,), (11,), (12,), (13,))
  tok.pieces = {k: v for k, v in tok.pieces.items() if k not in ("▁C", "▁D")}
  # Now encode("C") = ["▁", "C"]: its first id is "▁" (the same for D), its last id "C".
  assert single_letter_tokens(tok, "last_id", "ABCD").conts == ((20,), (21,), (12,), (13,))
  with pytest.raises(ValueError, match="same token ids"):
    single_letter_tokens(tok, "first_id", "ABCD")


def _q(task, subject, question, answer="A", options=("a", "b", "c", "d"), passage=None):
  return Question(task, subject, "0", question, options, answer, "x:1", passage=passage,
                  raw_options=tuple(f"({L}){o}" for L, o in zip("ABCDE", options)))


def test_cmmlu_drops_every_shot_of_the_longest_length():
  q = _q("cmmlu", "chinese_history", "问")
  shots = [_q("cmmlu", "chinese_history", "一" * n) for n in (1, 3, 3, 2)]
  parts = [len(prompt_text(q, [s])) - len(prompt_text(q, [])) for s in shots]
  assert parts[1] == parts[2] == parts[0] + 2 == parts[3] + 1
  start_end = len(prompt_text(q, []))
  # mp_utils: while sum(shots) >= max_length - start_end: drop all shots of the longest length.
  p = fit_prompt(q, shots, _chars, max_len=start_end + sum(parts) - 1, protocol="official")
  assert (p.shots_used, p.shots_dropped) == (2, 2)
  assert p.tokens == tuple(_chars(prompt_text(q, [shots[0], shots[3]])))
  # ">=": exactly filling the budget still drops (the two 3-character shots, then the 2-character).
  p = fit_prompt(q, shots, _chars, max_len=start_end + parts[0] + parts[3], protocol="official")
  assert p.tokens == tuple(_chars(prompt_text(q, [shots[0]])))
  p = fit_prompt(q, shots, _chars, max_len=start_end + sum(parts), protocol="official")
  assert p.shots_used == 2  # sum == budget: the longest go even though everything would fit
  # Header + question alone too long: CMMLU returns the question without the header.
  p = fit_prompt(q, shots, _chars, max_len=start_end - 3, protocol="official")
  assert p.truncated and p.shots_used == 0


def _agieval_dir(tmp_path):
  rows = [{"passage": None, "question": "甲比乙高，乙比丙高。谁最矮？",
           "options": ["(A)甲", "(B)乙", "(C)丙", "(D)无法确定"], "label": "C"},
          {"passage": "A ship sails.", "question": "Where does it sail?",
           "options": ["(A)north", "(B)south", "(C)east", "(D)west"], "label": ["B"]}]
  (tmp_path / "logiqa-zh.jsonl").write_text(json.dumps(rows[0], ensure_ascii=False) + "\n",
                                            encoding="utf-8")
  (tmp_path / "gaokao-english.jsonl").write_text(json.dumps(rows[1]) + "\n", encoding="utf-8")
  shot_zh = {"passage": None, "question": "所有的鸟都会飞，企鹅是鸟。由此可以推出：",
             "options": ["(A)企鹅会飞", "(B)企鹅不会飞", "(C)有些鸟不会飞", "(D)企鹅不是鸟"],
             "label": "A"}
  shot_en = {"passage": "Tom has two cats.", "question": "How many cats does Tom have?",
             "options": ["(A)one", "(B)two", "(C)three", "(D)four"], "label": "B"}
  with open(tmp_path / "few_shot_prompts.csv", "w", encoding="utf-8", newline="") as f:
    w = csv.writer(f)
    w.writerow(["logiqa-zh", "gaokao-english"])
    w.writerow([repr(shot_zh), repr(shot_en)])
    w.writerow(["解析一", "Explanation one"])
  return tmp_path


def test_agieval_official_golden_from_few_shot_prompts_csv(tmp_path):
  bench = load_benchmark("agieval", _agieval_dir(tmp_path), shots=5, protocol="official")
  zh = bench.subjects["logiqa-zh"]
  assert len(zh.shots) == 1 and len(zh.questions) == 1  # every test item scored
  assert prompt_text(zh.questions[0], zh.shots, "official") == (
      "以下是考试中各个问题的答案。\n"
      "问题 1.    所有的鸟都会飞，企鹅是鸟。由此可以推出：\n"
      "从以下选项中选择:    (A)企鹅会飞 (B)企鹅不会飞 (C)有些鸟不会飞 (D)企鹅不是鸟\n答案是 A\n\n"
      "问题 2.    甲比乙高，乙比丙高。谁最矮？\n"
      "从以下选项中选择:    (A)甲 (B)乙 (C)丙 (D)无法确定\n答案是")
  en = bench.subjects["gaokao-english"]  # AGIEval lists gaokao-english with the English tasks
  assert prompt_text(en.questions[0], en.shots, "official") == (
      "Here are the answers for the problems in the exam.\n"
      "Problem 1.   Tom has two cats. How many cats does Tom have?\n"
      "Choose from the following options:    (A)one (B)two (C)three (D)four\n"
      "The answer is therefore B\n\n"
      "Problem 2.   A ship sails. Where does it sail?\n"
      "Choose from the following options:    (A)north (B)south (C)east (D)west\n"
      "The answer is therefore")


def test_agieval_baichuan_golden_passage_on_its_own_line(tmp_path):
  folder = _agieval_dir(tmp_path)
  rows = [{"passage": "P1 text.", "question": f"Q{i}?", "options": ["(A)w", "(B)x", "(C)y", "(D)z"],
           "label": "ABCD"[i % 4]} for i in range(3)]
  rows.append({"passage": "P2 text.", "question": "Q3?", "options": ["A w", "B x", "C y", "D z"],
               "label": "d"})
  (folder / "sat-en.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
  bench = load_benchmark("agieval", folder, shots=2, protocol="baichuan")
  sat = bench.subjects["sat-en"]
  # Shots have distinct passages: Q0 (P1) and Q3 (P2); Q1 and Q2 are scored.
  assert [s.question for s in sat.shots] == ["Q0?", "Q3?"]
  assert [q.question for q in sat.questions] == ["Q1?", "Q2?"]
  assert prompt_text(sat.questions[0], sat.shots[1:], "baichuan") == (
      "Here are the answers for the problems in the exam.\n\n"
      "P2 text.\nQ3?\nA. w\nB. x\nC. y\nD. z\nAnswer: D\n\n"
      "P1 text.\nQ1?\nA. w\nB. x\nC. y\nD. z\nAnswer:")
  zh = bench.subjects["logiqa-zh"]
  assert prompt_text(zh.questions[0] if zh.questions else zh.shots[0], [], "baichuan") == (
      "以下是考试中各个问题的答案。\n\n甲比乙高，乙比丙高。谁最矮？\nA. 甲\nB. 乙\nC. 丙\nD. 无法确定\n答案：")


def test_agieval_official_keeps_demos_while_under_the_budget(tmp_path):
  bench = load_benchmark("agieval", _agieval_dir(tmp_path), shots=5, protocol="official")
  d = bench.subjects["gaokao-english"]
  q = d.questions[0]
  head, demos, tail = prompt_parts(q, d.shots, "official")
  assert tail.startswith("Problem 2.") and demos[0].startswith("Problem 1.")
  head_and_demo, tail = len(head + demos[0]), len(tail)
  # concat_prompt keeps a demo while len(header + demos) < the budget left after the question.
  p = fit_prompt(q, d.shots, _chars, max_len=head_and_demo + tail + 1, protocol="official")
  assert p.shots_used == 1
  p = fit_prompt(q, d.shots, _chars, max_len=head_and_demo + tail, protocol="official")
  assert p.shots_used == 0 and not p.truncated
