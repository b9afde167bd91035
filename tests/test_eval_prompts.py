"""Prompt formats (golden strings), fitting prompts to the context, and answer-letter tokens."""

import pytest

from baichuan_jax.eval import fit_prompt, letter_tokens, load_benchmark, prompt_text
from baichuan_jax.eval.readers import Question
from test_eval_support import FIXTURES


def _subject(task, subject, shots=2):
  return load_benchmark(task, FIXTURES / task, shots=shots).subjects[subject]


def test_ceval_golden():
  d = _subject("ceval", "high_school_history")
  assert prompt_text(d.questions[0], d.shots) == (
      "以下是中国关于高中历史考试的单项选择题，请选出其中的正确答案。\n\n"
      "秦始皇统一六国是在公元前____年。\nA. 221\nB. 206\nC. 202\nD. 230\n答案：A\n\n"
      "中国古代四大发明不包括____。\nA. 造纸术\nB. 印刷术\nC. 火药\nD. 瓷器\n答案：D\n\n"
      "唐朝的都城是____。\nA. 洛阳\nB. 长安\nC. 开封\nD. 南京\n答案：")


def test_cmmlu_golden():
  d = _subject("cmmlu", "chinese_history", shots=1)
  assert prompt_text(d.questions[0], d.shots) == (
      "以下是关于中国历史的单项选择题，请直接给出正确答案的选项。\n\n"
      "题目：中国历史上第一个统一的中央集权国家是____。\nA. 夏\nB. 商\nC. 周\nD. 秦\n答案是：D\n\n"
      "题目：北宋的都城是____。\nA. 临安\nB. 开封\nC. 洛阳\nD. 北京\n答案是：")


def test_mmlu_golden():
  d = _subject("mmlu", "world_religions", shots=1)
  assert prompt_text(d.questions[0], d.shots) == (
      "The following are multiple choice questions (with answers) about world religions.\n\n"
      "Which religion's holy book is the Quran?\nA. Islam\nB. Hinduism\nC. Buddhism\nD. Judaism\n"
      "Answer: A\n\n"
      "The Vedas are scriptures of\nA. Hinduism\nB. Islam\nC. Shinto\nD. Baha'i\nAnswer:")


def test_gaokao_golden_splits_inline_options():
  d = _subject("gaokao", "Biology", shots=2)
  # The second shot writes its options on one line ("A．线粒体　B．叶绿体　..."); they are split out.
  assert prompt_text(d.questions[0], d.shots) == (
      "以下是中国高考生物考试的单项选择题，请选出其中的正确答案。\n\n"
      "1．下列关于细胞的叙述，正确的是（\u3000\u3000）\nA. 病毒具有细胞结构\nB. 蓝藻没有细胞核\n"
      "C. 所有细胞都有叶绿体\nD. 细胞膜不含蛋白质\n答案：B\n\n"
      "2．光合作用的场所是（\u3000\u3000）\nA. 线粒体\nB. 叶绿体\nC. 核糖体\nD. 高尔基体\n答案：B\n\n"
      "3．DNA的基本组成单位是（\u3000\u3000）\nA. 氨基酸\nB. 葡萄糖\nC. 脱氧核苷酸\nD. 脂肪酸\n答案：")


def test_agieval_golden_zh_and_en():
  d = _subject("agieval", "logiqa-zh", shots=1)
  assert prompt_text(d.questions[0], d.shots) == (
      "以下是考试中各个问题的答案。\n\n"
      "问题：所有的鸟都会飞，企鹅是鸟。由此可以推出：\n"
      "选项：(A)企鹅会飞 (B)企鹅不会飞 (C)有些鸟不会飞 (D)企鹅不是鸟\n答案：A\n\n"
      "问题：如果下雨，地面就会湿。地面没有湿。由此可知：\n"
      "选项：(A)下雨了 (B)没有下雨 (C)可能下雨 (D)无法判断\n答案：")
  d = _subject("agieval", "lsat-ar", shots=1)
  passage = "Five runners R, S, T, U, V finish a race in some order. S finishes before R. "
  assert prompt_text(d.questions[0], d.shots) == (
      "Here are the answers for the problems in the exam.\n\n"
      f"Question: {passage}Exactly how many of the five runners can finish before R?\n"
      "Answer Choices: (A)0 (B)1 (C)2 (D)3 (E)4\nAnswer: C\n\n"
      f"Question: {passage}Which one of the following could be the order of finish?\n"
      "Answer Choices: (A)RSTUV (B)SRTUV (C)TUVRS (D)RUSTV (E)VRSTU\nAnswer:")


def _chars(text):
  return [ord(c) for c in text]  # one token per character: lengths are easy to reason about


def test_fit_prompt_drops_shots_from_the_front():
  d = _subject("ceval", "computer_network", shots=5)
  q = d.questions[0]
  full = len(prompt_text(q, d.shots))
  three = len(prompt_text(q, d.shots[2:]))
  assert three < full
  p = fit_prompt(q, d.shots, _chars, max_len=three + 1, bos=[1])  # +1 for the BOS
  assert (p.shots_used, p.shots_dropped, p.truncated) == (3, 2, False)
  assert p.tokens == (1,) + tuple(_chars(prompt_text(q, d.shots[2:])))  # the LAST three kept
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
