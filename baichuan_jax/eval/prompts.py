"""Few-shot prompts in each benchmark's customary answer-only format, fitted to the context.

A prompt is `header + shot_1 + ... + shot_k + question`, where each shot is a question block followed
by its answer letter and a blank line, and the question block ends on the answer cue (`答案：`,
`Answer:`, ...). The model's next-token scores for the option letters are read right after the cue.

Formats (`{...}` filled per item; options one per line):
  ceval   以下是中国关于{科目}考试的单项选择题，请选出其中的正确答案。\n\n
          {question}\nA. {A}\nB. {B}\nC. {C}\nD. {D}\n答案：{X}\n\n        (C-Eval's released code)
  cmmlu   以下是关于{科目}的单项选择题，请直接给出正确答案的选项。\n\n
          题目：{question}\nA. {A}\n...\n答案是：{X}\n\n                     (CMMLU's released code)
  mmlu    The following are multiple choice questions (with answers) about {subject}.\n\n
          {question}\nA. {A}\n...\nAnswer: {X}\n\n                          (Hendrycks et al.)
  gaokao  以下是中国高考{科目}考试的单项选择题，请选出其中的正确答案。\n\n  + the C-Eval block
  agieval (zh) 以下是考试中各个问题的答案。\n\n问题：{passage}{question}\n选项：(A){A} (B){B} ...\n答案：{X}\n\n
          (en) Here are the answers for the problems in the exam.\n\n
               Question: {passage}{question}\nAnswer Choices: (A){A} (B){B} ...\nAnswer: {X}\n\n
          (our answer-only variant of AGIEval's few-shot prompt; its instruction lines)
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable, Sequence

from baichuan_jax.eval import subjects as subject_tables
from baichuan_jax.eval.readers import LETTERS, Question

_CJK = re.compile(r"[\u4e00-\u9fff]")


def language(q_or_task, subject: str = "") -> str:
  """"zh" or "en": the language of the prompt format used for a task/subject."""
  task = q_or_task.task if isinstance(q_or_task, Question) else q_or_task
  subject = q_or_task.subject if isinstance(q_or_task, Question) else subject
  if task == "mmlu":
    return "en"
  if task == "agieval":
    entry = subject_tables.AGIEVAL.get(subject)
    if entry:
      return "zh" if entry[1] == "Chinese" else "en"
    return "zh" if subject.startswith(("gaokao", "jec-qa", "logiqa-zh")) else "en"
  return "zh"


def header(task: str, subject: str) -> str:
  """The instruction line (and blank line) that opens every prompt of `subject`."""
  name = subject_tables.display_name(task, subject)
  if task == "ceval":
    return f"以下是中国关于{name}考试的单项选择题，请选出其中的正确答案。\n\n"
  if task == "cmmlu":
    return f"以下是关于{name}的单项选择题，请直接给出正确答案的选项。\n\n"
  if task == "mmlu":
    return f"The following are multiple choice questions (with answers) about {name}.\n\n"
  if task == "gaokao":
    return f"以下是中国高考{name}考试的单项选择题，请选出其中的正确答案。\n\n"
  if task == "agieval":
    if language(task, subject) == "zh":
      return "以下是考试中各个问题的答案。\n\n"
    return "Here are the answers for the problems in the exam.\n\n"
  raise ValueError(f"task={task!r} has no prompt format")


def answer_cue(task: str, subject: str = "") -> tuple[str, str]:
  """(cue ending a question block, text between the cue and the letter in an answered shot)."""
  if task == "cmmlu":
    return "答案是：", ""
  if task == "mmlu" or (task == "agieval" and language(task, subject) == "en"):
    return "Answer:", " "
  return "答案：", ""


def question_block(q: Question, with_answer: bool) -> str:
  """One question in the task's format, ending on the answer cue (plus answer and blank line)."""
  letters = LETTERS[:len(q.options)]
  cue, sep = answer_cue(q.task, q.subject)
  if q.task == "agieval":
    zh = language(q) == "zh"
    body = ("问题：" if zh else "Question: ") + (q.passage or "") + q.question
    body += "\n选项：" if zh else "\nAnswer Choices: "
    # AGIEval's released prompts put the options on one line, space-separated.
    body += " ".join(f"({L}){o}" for L, o in zip(letters, q.options))
  else:
    body = ("题目：" if q.task == "cmmlu" else "") + q.question
    body += "".join(f"\n{L}. {o}" for L, o in zip(letters, q.options))
  text = f"{body}\n{cue}"
  if with_answer:
    if q.answer is None:
      raise ValueError(f"{q.source}: a few-shot example needs an answer")
    text += f"{sep}{q.answer}\n\n"
  return text


def prompt_text(q: Question, shots: Sequence[Question]) -> str:
  """The full few-shot prompt for `q` with the given shots (no truncation)."""
  return header(q.task, q.subject) + "".join(question_block(s, True) for s in shots) + \
      question_block(q, False)


@dataclasses.dataclass(frozen=True)
class Prompt:
  """A tokenized prompt and how it was fitted to the context."""
  tokens: tuple  # token ids, ending right before the answer letter
  shots_used: int
  shots_dropped: int  # dropped from the front to fit the context
  truncated: bool  # even zero shots did not fit: the tokens were cut from the left


def fit_prompt(q: Question, shots: Sequence[Question], encode: Callable[[str], list],
               max_len: int, reserve: int = 0, bos: Sequence[int] = ()) -> Prompt:
  """Tokenizes the prompt for `q`, dropping shots from the front until it fits `max_len` tokens.

  Args:
    encode: text -> token ids (no BOS/EOS).
    max_len: the model context; `bos + tokens` plus `reserve` is kept within it.
    reserve: tokens kept free after the prompt (letters spanning several tokens are scored by
      feeding their first tokens back in).
    bos: tokens put before the prompt (e.g. [bos_id]).
  Returns:
    a `Prompt`; if even the zero-shot prompt is too long, its tokens are cut from the left (the
    question's end and the cue are what the answer depends on most) and `truncated` is set.
  """
  budget = max_len - len(bos) - reserve
  if budget <= 0:
    raise ValueError(f"max_len={max_len} leaves no room for a prompt")
  for k in range(len(shots), -1, -1):
    ids = encode(prompt_text(q, shots[len(shots) - k:]))
    if len(ids) <= budget:
      return Prompt(tuple(bos) + tuple(ids), k, len(shots) - k, False)
  return Prompt(tuple(bos) + tuple(ids[-budget:]), 0, len(shots), True)


@dataclasses.dataclass(frozen=True)
class LetterTokens:
  """The tokens that follow the answer cue for each option letter.

  Usually one token per letter ("A" or "▁A"); a tokenizer may split some letters (" A" -> "▁" "A")
  while merging others ("▁C"), so each letter keeps its whole continuation and is scored by the
  log-probability of all of it.
  """
  conts: tuple  # per letter, in letter order: tuple of token ids

  @property
  def max_len(self) -> int:
    return max(len(c) for c in self.conts)


def letter_tokens(encode: Callable[[str], list], cue: str, sep: str,
                  letters: str = LETTERS) -> LetterTokens:
  """The tokens an answered shot puts after `cue` for each letter (`cue + sep + letter`).

  Raises:
    ValueError: when the cue's tokens change once a letter follows, or two letters tokenize the same.
  """
  base = encode(cue)
  conts = []
  for letter in letters:
    full = encode(cue + sep + letter)
    if full[:len(base)] != base or len(full) == len(base):
      raise ValueError(f"tokenizing {cue + sep + letter!r} does not extend the tokens of {cue!r}; "
                       "cannot locate the answer-letter tokens")
    conts.append(tuple(full[len(base):]))
  if len(set(conts)) != len(conts):
    raise ValueError(f"letters {letters} tokenize the same after {cue!r}: {conts}")
  return LetterTokens(tuple(conts))
