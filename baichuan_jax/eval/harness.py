"""Runs a multiple-choice benchmark end to end and writes its reports.

`evaluate_benchmark` builds every prompt (shots dropped from the front when a prompt would not fit
the context, counted and logged), scores the option letters in batches, and aggregates accuracy per
subject, per category and overall. `write_reports` writes results JSON, a markdown table, one JSONL
line per question, and (for unlabeled C-Eval test rows) a submission file.
"""

from __future__ import annotations

import collections
import json
import logging
import math
import time
from pathlib import Path
from typing import Optional

import numpy as np

from baichuan_jax.eval import prompts as prompt_lib
from baichuan_jax.eval import scoring, subjects as subject_tables
from baichuan_jax.eval.readers import LETTERS, Benchmark

log = logging.getLogger(__name__)

TITLES = {"ceval": "C-Eval", "cmmlu": "CMMLU", "mmlu": "MMLU", "gaokao": "GAOKAO-Bench (single choice)",
          "agieval": "AGIEval (single choice)"}


def evaluate_benchmark(bench: Benchmark, tokenizer, score_fn: scoring.ScoreFn, max_len: int,
                       batch_size: int = 8, padding: str = "right", add_bos: bool = True,
                       limit: Optional[int] = None, progress: bool = True) -> dict:
  """Scores every question of `bench` and returns the results dict.

  Args:
    bench: from `readers.load_benchmark`.
    tokenizer: has `encode(text) -> ids`, `bos_id`, `pad_id`.
    score_fn: `TokenBatch -> [batch, vocab]` next-token logits (see `scoring`).
    max_len: context length; longer prompts drop shots from the front.
    limit: score at most this many questions per subject (a quick look, flagged in the results).
  Returns:
    dict with the aggregate accuracies (`scoring.aggregate`), `predictions` (one dict per
    question), `prompting` (shots dropped / truncated counts) and `skipped` rows.
  """
  encode = lambda text: list(tokenizer.encode(text))
  bos = (tokenizer.bos_id,) if add_bos else ()
  items = []  # (question, Prompt, LetterTokens)
  letters_by_cue = {}
  prompting = collections.OrderedDict()
  for subject, data in bench.subjects.items():
    qs = data.questions[:limit] if limit else data.questions
    stats = {"prompts": len(qs), "shots": len(data.shots), "prompts_with_dropped_shots": 0,
             "shots_dropped": 0, "truncated": 0}
    for q in qs:
      cue = prompt_lib.answer_cue(q.task, q.subject)
      if cue not in letters_by_cue:
        n = max(len(x.options) for s in bench.subjects.values() for x in s.questions + s.shots)
        letters_by_cue[cue] = prompt_lib.letter_tokens(encode, cue[0], cue[1], LETTERS[:n])
      lt = letters_by_cue[cue]
      p = prompt_lib.fit_prompt(q, data.shots, encode, max_len, reserve=lt.max_len - 1, bos=bos)
      stats["prompts_with_dropped_shots"] += p.shots_dropped > 0
      stats["shots_dropped"] += p.shots_dropped
      stats["truncated"] += p.truncated
      items.append((q, p, lt))
    prompting[subject] = stats
    if stats["prompts_with_dropped_shots"]:
      log.warning("%s/%s: %d of %d prompts dropped shots from the front to fit %d tokens "
                  "(%d shots dropped in all; %d prompts cut even at zero shots)", bench.task,
                  subject, stats["prompts_with_dropped_shots"], len(qs), max_len,
                  stats["shots_dropped"], stats["truncated"])

  preds = [None] * len(items)
  t0 = time.perf_counter()
  for lt in letters_by_cue.values():
    idx = [i for i, it in enumerate(items) if it[2] is lt]
    if not idx:
      continue
    scores = scoring.letter_scores([items[i][1].tokens for i in idx], lt.conts, score_fn,
                                   pad_id=tokenizer.pad_id, batch_size=batch_size,
                                   padding=padding, max_len=max_len, progress=progress,
                                   desc=f"{bench.task} ({len(idx)} questions)")
    choice = scoring.pick(scores, [len(items[i][0].options) for i in idx])
    for j, i in enumerate(idx):
      preds[i] = (int(choice[j]), scores[j, :len(items[i][0].options)])

  seconds = time.perf_counter() - t0
  predictions, records = [], []
  for (q, p, _), (c, sc) in zip(items, preds):
    pred = LETTERS[c]
    row = {"subject": q.subject, "id": q.qid, "source": q.source, "prediction": pred,
           "answer": q.answer, "correct": None if q.answer is None else pred == q.answer,
           "letter_scores": [round(float(x), 5) for x in sc], "shots": p.shots_used,
           "prompt_tokens": len(p.tokens)}
    predictions.append(row)
    if q.answer is not None:
      records.append({"subject": q.subject, "correct": row["correct"],
                      "category": subject_tables.category(bench.task, q.subject)})

  results = {"task": bench.task, "split": bench.split,
             "shots": max((len(s.shots) for s in bench.subjects.values()), default=0),
             "max_len": max_len, "padding": padding, "add_bos": add_bos, "limit": limit,
             "questions": len(items), "unlabeled": sum(q.answer is None for q, _, _ in items),
             "scoring_seconds": round(seconds, 3),
             "prompt_tokens": sum(len(p.tokens) for _, p, _ in items)}
  results.update(scoring.aggregate(records))
  results["prompting"] = {
      "prompts_with_dropped_shots": sum(s["prompts_with_dropped_shots"] for s in prompting.values()),
      "shots_dropped": sum(s["shots_dropped"] for s in prompting.values()),
      "truncated": sum(s["truncated"] for s in prompting.values()),
      "per_subject": prompting,
  }
  results["skipped"] = [str(s) for s in bench.skipped]
  results["notes"] = list(bench.notes)
  results["predictions"] = predictions
  if results["prompting"]["prompts_with_dropped_shots"]:
    log.warning("%s: %d prompts in all dropped shots to fit the context (see results 'prompting')",
                bench.task, results["prompting"]["prompts_with_dropped_shots"])
  if bench.skipped:
    log.warning("%s: %d malformed rows were skipped (listed in results 'skipped')", bench.task,
                len(bench.skipped))
  return results


def _pct(x: float) -> str:
  return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.2f}"


def markdown(results: dict, model: str = "") -> str:
  """A markdown report: category table, per-subject table, prompting and skipped rows."""
  task = results["task"]
  title = f"## {TITLES.get(task, task)}: {results['split']} split, {results['shots']}-shot"
  lines = [title + (f", {model}" if model else ""), ""]
  if results.get("limit"):
    lines += [f"**Partial run**: at most {results['limit']} questions per subject (`--limit`).", ""]
  lines += ["| category | subjects | questions | accuracy (%) | mean of subjects (%) |",
            "|---|---:|---:|---:|---:|"]
  for c, d in results["categories"].items():
    lines.append(f"| {c} | {d['subjects']} | {d['total']} | {_pct(d['accuracy'])} | "
                 f"{_pct(d['macro_accuracy'])} |")
  lines.append(f"| **Average** | {len(results['subjects'])} | {results['total']} | "
               f"**{_pct(results['micro_accuracy'])}** | {_pct(results['macro_accuracy'])} |")
  lines += ["", "Accuracy is over questions; \"mean of subjects\" averages per-subject accuracies.",
            ""]
  if results.get("unlabeled"):
    lines += [f"{results['unlabeled']} questions carry no answer (public test split): predictions "
              "only, written to the submission file.", ""]
  pr = results["prompting"]
  lines += [f"Prompts that dropped shots to fit {results['max_len']} tokens: "
            f"{pr['prompts_with_dropped_shots']} ({pr['shots_dropped']} shots dropped); "
            f"cut even at zero shots: {pr['truncated']}.", ""]
  lines += ["| subject | category | correct / total | accuracy (%) |", "|---|---|---:|---:|"]
  for s, d in results["subjects"].items():
    lines.append(f"| {s} | {d['category']} | {d['correct']} / {d['total']} | {_pct(d['accuracy'])} |")
  if results["skipped"]:
    lines += ["", f"Skipped malformed rows ({len(results['skipped'])}):", ""]
    lines += [f"- `{s}`" for s in results["skipped"]]
  if results.get("notes"):
    lines += ["", "Not single-choice (not scored):", ""] + [f"- {n}" for n in results["notes"]]
  return "\n".join(lines) + "\n"


def write_reports(results: dict, out_dir, model: str = "") -> dict:
  """Writes `{task}_results.json`, `{task}_results.md`, `{task}_predictions.jsonl` (and
  `ceval_submission.json` for unlabeled C-Eval rows). Returns {kind: path}."""
  out = Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  task = results["task"]
  paths = {"json": out / f"{task}_results.json", "markdown": out / f"{task}_results.md",
           "predictions": out / f"{task}_predictions.jsonl"}
  summary = {k: v for k, v in results.items() if k != "predictions"}
  summary["model"] = model
  paths["json"].write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n",
                           encoding="utf-8")
  paths["markdown"].write_text(markdown(results, model), encoding="utf-8")
  with open(paths["predictions"], "w", encoding="utf-8") as f:
    for row in results["predictions"]:
      f.write(json.dumps(row, ensure_ascii=False) + "\n")
  if task == "ceval" and results.get("unlabeled"):
    sub = collections.defaultdict(dict)
    for row in results["predictions"]:
      if row["answer"] is None:
        sub[row["subject"]][row["id"]] = row["prediction"]
    paths["submission"] = out / "ceval_submission.json"
    paths["submission"].write_text(json.dumps(sub, indent=1, ensure_ascii=False) + "\n",
                                   encoding="utf-8")
  return {k: str(v) for k, v in paths.items()}


def ppl_markdown(res: dict, model: str = "") -> str:
  """A markdown table for a perplexity run."""
  return "\n".join([
      f"## Perplexity: `{res['path']}`" + (f", {model}" if model else ""), "",
      "| documents | tokens | bytes | bytes/token | bits/token | bits/byte | token perplexity |",
      "|---:|---:|---:|---:|---:|---:|---:|",
      f"| {res['documents']} | {res['tokens']} | {res['bytes']} | {res['bytes_per_token']:.3f} | "
      f"{res['bits_per_token']:.4f} | {res['bits_per_byte']:.4f} | {res['perplexity']:.3f} |", "",
      f"Windows of {res['max_len']} tokens, stride {res['stride']}; each document starts with BOS.",
  ]) + "\n"
