"""Few-shot prompts of the two protocols, byte for byte as the published scripts write them.

A prompt is `head + shot_1 + ... + shot_k + tail`; the tail ends on the answer cue, and the model's
next-token scores for the option letters are read right after it. `{...}` is filled per item;
options are one per line as `A. {A}` unless said otherwise.

protocol "baichuan" (Baichuan's `evaluation/evaluate_zh.py` and `evaluate_mmlu.py`; no BOS; the
  letter scored is the last id of `tokenizer("A")`):
  ceval   以下是中国关于{科目}考试的单项选择题，请选出其中的正确答案。\n  then per shot
          \n{question}\nA. {A}\n...\nD. {D}\n答案：{X}     then  \n{question}\nA. ...\n答案：
          (one newline between items). Shots: the dev rows in `dataset['dev'].shuffle(seed=123)`
          order; no truncation in the script.
  mmlu    The following are multiple choice questions (with answers) about  {sub ject words}.\n\n
          {question}\nA. {A}\n...\nAnswer: {X}\n\n ... {question}\n...\nAnswer:
          (Hendrycks' text; `format_subject` puts a space before every word, hence two spaces).
          Too long: keep the first k shots.
  cmmlu   Baichuan published no CMMLU script: CMMLU's own text and drop-the-longest rule (below),
          with Baichuan's no-BOS and last-id scoring.
  gaokao  no published script: the ceval layout with 以下是中国高考{科目}考试的单项选择题，请选出其中的正确答案。
  agieval no published script: four-option single-choice items only; Chinese tasks in the ceval
          layout headed 以下是考试中各个问题的答案。, English tasks (gaokao-english included, as in
          AGIEval's own lists) in the mmlu layout headed Here are the answers for the problems in
          the exam.; a passage goes on its own line before the question.
protocol "official" (each benchmark's own script):
  ceval   C-Eval `code/evaluator_series/evaluators/llama.py`: 以下是中国关于{科目}考试的单项选择题，请选出其中的正确答案。\n\n
          {question}\nA. {A}\n...\n答案：{X}\n\n ... {question}\n...\n答案：   BOS; letter id
          `encode("A")[0]`; k fixed (no truncation).
  cmmlu   CMMLU `src/mp_utils.py`: 以下是关于{科目}的单项选择题，请直接给出正确答案的选项。\n\n
          题目：{question}\nA. {A}\n...\n答案是：{X}\n\n ... 题目：{question}\n...\n答案是：
          letter = the piece "A" (`convert_tokens_to_ids`); too long: drop every shot of the longest
          length until the shots fit (`>=` test), and if header + question alone do not fit, the
          question alone.
  mmlu    Hendrycks `test.py`: the text above; the letter scored is " A" after "Answer:"; first k.
  gaokao  GAOKAO-Bench publishes generation prompts only: the C-Eval llama.py layout with the
          GAOKAO header.
  agieval AGIEval `src/dataset_loader.py` few-shot (no explanations): Here are the answers for
          the problems in the exam.\n  then per example  Problem {i}.   {passage} {question}\n
          Choose from the following options:    {options as written, space-joined}\n
          The answer is therefore {label}\n\n  then  Problem {k+1}.   {passage} {question}\n
          Choose from ...\n  (Chinese: 以下是考试中各个问题的答案。\n, 问题 {i}.   , 从以下选项中选择:    ,
          答案是 {label}). AGIEval generates the answer; we append the demos' cue
          "The answer is therefore" / "答案是" and score " A". Examples are added while the
          header plus examples stay under the budget (first k).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

from baichuan_jax.eval import subjects as subject_tables
from baichuan_jax.eval.readers import LETTERS, PROTOCOLS, Question

DEFAULT_PROTOCOL = "baichuan"


def _check_protocol(protocol: str) -> None:
  if protocol not in PROTOCOLS:
    raise ValueError(f"protocol={protocol!r} is invalid: allowed {', '.join(PROTOCOLS)}")


def language(q_or_task, subject: str = "") -> str:
  """"zh" or "en": the language of the prompt format used for a task/subject."""
  task = q_or_task.task if isinstance(q_or_task, Question) else q_or_task
  subject = q_or_task.subject if isinstance(q_or_task, Question) else subject
  if task == "mmlu":
    return "en"
  if task == "agieval":
    if subject in subject_tables.AGIEVAL_ENGLISH:
      return "en"
    if subject in subject_tables.AGIEVAL:
      return "zh"
    return "zh" if subject.startswith(("gaokao", "jec-qa", "logiqa-zh")) else "en"
  return "zh"


def _mmlu_subject(subject: str) -> str:
  return "".join(" " + w for w in subject.split("_"))  # Hendrycks' format_subject


def header(task: str, subject: str, protocol: str = DEFAULT_PROTOCOL) -> str:
  """The text before the first shot (instruction line and its newlines)."""
  _check_protocol(protocol)
  name = subject_tables.display_name(task, subject)
  if task == "ceval":
    line = f"以下是中国关于{name}考试的单项选择题，请选出其中的正确答案。"
  elif task == "gaokao":
    line = f"以下是中国高考{name}考试的单项选择题，请选出其中的正确答案。"
  elif task == "cmmlu":
    return f"以下是关于{name}的单项选择题，请直接给出正确答案的选项。\n\n"
  elif task == "mmlu":
    return f"The following are multiple choice questions (with answers) about {_mmlu_subject(subject)}.\n\n"
  elif task == "agieval":
    zh = language(task, subject) == "zh"
    line = "以下是考试中各个问题的答案。" if zh else "Here are the answers for the problems in the exam."
    if protocol == "official":
      return line + "\n"
    if not zh:
      return line + "\n\n"
  else:
    raise ValueError(f"task={task!r} has no prompt format")
  return line + ("\n" if protocol == "baichuan" else "\n\n")


def _style(task: str, subject: str, protocol: str) -> str:
  """Which layout a (protocol, task) uses: zh_baichuan, en_hendrycks, ceval, cmmlu or agieval."""
  if task == "cmmlu":
    return "cmmlu"
  if task == "mmlu" or (task == "agieval" and protocol == "baichuan" and
                        language(task, subject) == "en"):
    return "en_hendrycks"
  if task == "agieval" and protocol == "official":
    return "agieval"
  return "zh_baichuan" if protocol == "baichuan" else "ceval"


def answer_cue(task: str, subject: str = "", protocol: str = DEFAULT_PROTOCOL) -> tuple[str, str]:
  """(cue ending the prompt, text between the cue and the letter in an answered shot)."""
  style = _style(task, subject, protocol)
  if style == "cmmlu":
    return "答案是：", ""
  if style == "en_hendrycks":
    return "Answer:", " "
  if style == "agieval":
    return ("答案是" if language(task, subject) == "zh" else "The answer is therefore"), " "
  return "答案：", ""


def _options_block(q: Question) -> str:
  return "".join(f"\n{L}. {o}" for L, o in zip(LETTERS, q.options))


def _stem(q: Question) -> str:
  return f"{q.passage.strip()}\n{q.question}" if q.passage else q.question


def _agieval_block(q: Question, number: int) -> str:
  """AGIEval's `question_input` for problem `number` (1-based)."""
  opts = " ".join(q.raw_options or [f"({L}){o}" for L, o in zip(LETTERS, q.options)])
  passage = q.passage or ""
  if language(q) == "zh":
    return f"问题 {number}.   {passage} {q.question}\n从以下选项中选择:    {opts}\n"
  return f"Problem {number}.   {passage} {q.question}\nChoose from the following options:    {opts}\n"


def question_block(q: Question, with_answer: bool, protocol: str = DEFAULT_PROTOCOL,
                   number: int = 1) -> str:
  """One item as it appears in the prompt: a shot (with its answer) or the final question."""
  _check_protocol(protocol)
  if with_answer and not q.answer:
    raise ValueError(f"{q.source}: a few-shot example needs an answer")
  style = _style(q.task, q.subject, protocol)
  cue, sep = answer_cue(q.task, q.subject, protocol)
  if style == "agieval":
    text = _agieval_block(q, number)
    return text + (f"{cue}{sep}{q.answer}\n\n" if with_answer else cue)
  body = ("题目：" if style == "cmmlu" else "") + _stem(q) + _options_block(q) + "\n" + cue
  if style == "zh_baichuan":  # evaluate_zh.py: "\n" before every item, nothing after the answer
    return "\n" + body + (q.answer if with_answer else "")
  return body + (f"{sep}{q.answer}\n\n" if with_answer else "")


def prompt_parts(q: Question, shots: Sequence[Question], protocol: str = DEFAULT_PROTOCOL):
  """(head, [one text per shot], tail): the prompt is head + ''.join(shot texts) + tail."""
  shot_texts = [question_block(s, True, protocol, i + 1) for i, s in enumerate(shots)]
  return header(q.task, q.subject, protocol), shot_texts, \
      question_block(q, False, protocol, len(shots) + 1)


def prompt_text(q: Question, shots: Sequence[Question], protocol: str = DEFAULT_PROTOCOL) -> str:
  """The full few-shot prompt for `q` with the given shots (no truncation)."""
  head, shot_texts, tail = prompt_parts(q, shots, protocol)
  return head + "".join(shot_texts) + tail


@dataclasses.dataclass(frozen=True)
class Rules:
  """How a (protocol, task) builds and scores prompts."""
  bos: bool  # start the prompt with BOS
  truncation: str  # "none" | "first_k" | "drop_longest" | "agieval"
  letters: str  # "last_id" | "first_id" | "piece" | "continuation"
  headline: str  # "macro" (mean over subjects) or "micro" (over questions): the script's average


def rules(task: str, protocol: str = DEFAULT_PROTOCOL) -> Rules:
  """The protocol's rules for `task` (see the module docstring)."""
  _check_protocol(protocol)
  trunc = {"ceval": "none", "cmmlu": "drop_longest"}.get(task, "first_k")
  if protocol == "baichuan":
    # evaluate_zh.py prints both averages (its C-Eval number is the subject mean, as CMMLU's);
    # evaluate_mmlu.py reports the mean over questions.
    return Rules(False, trunc, "last_id", "micro" if task == "mmlu" else "macro")
  if task == "agieval":
    return Rules(False, "agieval", "continuation", "micro")
  letters = {"cmmlu": "piece", "mmlu": "continuation"}.get(task, "first_id")
  return Rules(task in ("ceval", "gaokao"), trunc, letters, "micro" if task == "mmlu" else "macro")


@dataclasses.dataclass(frozen=True)
class Prompt:
  """A tokenized prompt and how it was fitted to the context."""
  tokens: tuple  # token ids, ending right before the answer letter
  shots_used: int
  shots_dropped: int  # left out to fit the context (which ones: the protocol's rule)
  truncated: bool  # even zero shots did not fit: the tokens were cut from the left


def _keep_first_k(q, shots, encode, budget, protocol):
  """The most leading shots whose prompt fits (MMLU's `while len > max: k -= 1`)."""
  for k in range(len(shots), -1, -1):
    if len(encode(prompt_text(q, shots[:k], protocol))) <= budget:
      return list(shots[:k])
  return []


def _drop_longest(q, shots, encode, budget, protocol):
  """CMMLU's gen_prompt: None (question alone) when header + question do not fit."""
  head, shot_texts, tail = prompt_parts(q, shots, protocol)
  start_end = len(encode(head)) + len(encode(tail))
  if start_end > budget:
    return None
  kept = [(s, len(encode(t))) for s, t in zip(shots, shot_texts)]
  while kept and sum(n for _, n in kept) >= budget - start_end:
    longest = max(n for _, n in kept)
    kept = [(s, n) for s, n in kept if n != longest]
  return [s for s, _ in kept]


def _agieval_demos(q, shots, encode, budget, protocol):
  """AGIEval's concat_prompt: add examples while header + examples stay under the budget left
  after the question."""
  head, shot_texts, tail = prompt_parts(q, shots, protocol)
  room = budget - len(encode(tail))
  k = 0
  while k < len(shots) and len(encode(head + "".join(shot_texts[:k + 1]))) < room:
    k += 1
  return list(shots[:k])


def fit_prompt(q: Question, shots: Sequence[Question], encode: Callable[[str], list],
               max_len: int, reserve: int = 0, bos: Sequence[int] = (),
               protocol: str = DEFAULT_PROTOCOL) -> Prompt:
  """Tokenizes the prompt for `q`, leaving out shots by the protocol's rule until it fits.

  Args:
    encode: text -> token ids (no BOS/EOS).
    max_len: the model context; `bos + tokens` plus `reserve` is kept within it.
    reserve: tokens kept free after the prompt (letters spanning several tokens are scored by
      feeding their first tokens back in).
    bos: tokens put before the prompt (e.g. [bos_id]).
    protocol: whose truncation rule: first k shots (MMLU, GAOKAO, AGIEval), CMMLU's
      drop-the-longest, or none (C-Eval: its scripts never shorten a prompt; if one does not fit
      here, the first k that fit are kept and counted in `shots_dropped`).
  Returns:
    a `Prompt`; if even the zero-shot prompt is too long, its tokens are cut from the left (the
    question's end and the cue are what the answer depends on most) and `truncated` is set.
  """
  budget = max_len - len(bos) - reserve
  if budget <= 0:
    raise ValueError(f"max_len={max_len} leaves no room for a prompt")
  rule = rules(q.task, protocol).truncation
  if rule == "drop_longest":
    kept = _drop_longest(q, shots, encode, budget, protocol)
    if kept is None:  # CMMLU: the question without header or shots
      ids = encode(prompt_parts(q, [], protocol)[2])
      return Prompt(tuple(bos) + tuple(ids[-budget:]), 0, len(shots), True)
  elif rule == "agieval":
    kept = _agieval_demos(q, shots, encode, budget, protocol)
  else:
    kept = list(shots)
  ids = encode(prompt_text(q, kept, protocol))
  if len(ids) > budget:  # the rule's estimate from parts was off, or the rule is "none"
    kept = _keep_first_k(q, kept, encode, budget, protocol)
    ids = encode(prompt_text(q, kept, protocol))
  if len(ids) > budget:
    return Prompt(tuple(bos) + tuple(ids[-budget:]), 0, len(shots), True)
  return Prompt(tuple(bos) + tuple(ids), len(kept), len(shots) - len(kept), False)


@dataclasses.dataclass(frozen=True)
class LetterTokens:
  """The tokens scored for each option letter.

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


def single_letter_tokens(tokenizer, rule: str, letters: str = LETTERS) -> LetterTokens:
  """One id per letter, as the scripts take it.

  Args:
    rule: "last_id" (`tokenizer("A").input_ids[-1]`, Baichuan's scripts), "first_id"
      (`encode("A")[0]`, C-Eval's llama.py) or "piece" (`convert_tokens_to_ids("A")`, CMMLU; the
      last id of `encode("A")` for a tokenizer without `piece_to_id`).
  """
  conts = []
  for letter in letters:
    ids = list(tokenizer.encode(letter))
    if not ids:
      raise ValueError(f"tokenizer encodes {letter!r} to no tokens")
    if rule == "piece" and hasattr(tokenizer, "piece_to_id"):
      conts.append((int(tokenizer.piece_to_id(letter)),))
    else:
      conts.append((int(ids[0] if rule == "first_id" else ids[-1]),))
  if len(set(conts)) != len(conts):
    raise ValueError(f"letters {letters} map to the same token ids under rule {rule!r}: {conts}")
  return LetterTokens(tuple(conts))
