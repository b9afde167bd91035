"""Runs a multiple-choice benchmark end to end and writes its reports.

`evaluate_benchmark` builds every prompt by the chosen protocol's rules (`prompts.rules`: BOS or
not, which shots are left out when a prompt would not fit, which token is scored per letter),
scores the option letters in batches, and aggregates accuracy per subject, per category and
overall (both the mean over questions and the mean over subjects). `write_reports` writes results
JSON (always valid JSON: null, never NaN), a markdown table, one JSONL line per question, and for
unlabeled rows (the C-Eval test split) a submission file.
"""

from __future__ import annotations

import collections
import json
import logging
import math
import re
import time
from pathlib import Path
from typing import Optional

from baichuan_jax.eval import prompts as prompt_lib
from baichuan_jax.eval import scoring, subjects as subject_tables
from baichuan_jax.eval.readers import LETTERS, Benchmark

log = logging.getLogger(__name__)

TITLES = {"ceval": "C-Eval", "cmmlu": "CMMLU", "mmlu": "MMLU", "gaokao": "GAOKAO-Bench (single choice)",
          "agieval": "AGIEval (single choice)"}


def _letters(bench: Benchmark, tokenizer, encode, protocol: str, rule: str):
  """subject -> LetterTokens for every subject of `bench` (shared objects per cue)."""
  n = max((len(x.options) for s in bench.subjects.values() for x in s.questions + s.shots),
          default=4)
  if rule != "continuation":
    lt = prompt_lib.single_letter_tokens(tokenizer, rule, LETTERS[:n])
    return {subject: lt for subject in bench.subjects}
  by_cue, out = {}, {}
  for subject in bench.subjects:
    cue = prompt_lib.answer_cue(bench.task, subject, protocol)
    if cue not in by_cue:
      by_cue[cue] = prompt_lib.letter_tokens(encode, cue[0], cue[1], LETTERS[:n])
    out[subject] = by_cue[cue]
  return out


def _shots_for(q, shots):
  """The subject's shots minus any that repeat `q`'s reading passage (AGIEval lsat-rc, sat-en)."""
  return [s for s in shots if not (q.passage and s.passage == q.passage)]


def _build_prompts(bench, encode, letters, max_len, bos, protocol, limit):
  """[(question, Prompt, LetterTokens)] and per-subject prompting statistics."""
  items, prompting = [], collections.OrderedDict()
  for subject, data in bench.subjects.items():
    qs = data.questions[:limit] if limit else data.questions
    stats = {"prompts": len(qs), "shots": len(data.shots), "prompts_with_dropped_shots": 0,
             "shots_dropped": 0, "truncated": 0, "shots_sharing_passage": 0}
    lt = letters[subject]
    for q in qs:
      shots = _shots_for(q, data.shots)
      stats["shots_sharing_passage"] += len(data.shots) - len(shots)
      p = prompt_lib.fit_prompt(q, shots, encode, max_len, reserve=lt.max_len - 1, bos=bos,
                                protocol=protocol)
      stats["prompts_with_dropped_shots"] += p.shots_dropped > 0
      stats["shots_dropped"] += p.shots_dropped
      stats["truncated"] += p.truncated
      items.append((q, p, lt))
    prompting[subject] = stats
    if stats["prompts_with_dropped_shots"]:
      log.warning("%s/%s: %d of %d prompts dropped shots to fit %d tokens (%s rule; %d shots "
                  "dropped in all; %d prompts cut even at zero shots)", bench.task, subject,
                  stats["prompts_with_dropped_shots"], len(qs), max_len,
                  prompt_lib.rules(bench.task, protocol).truncation, stats["shots_dropped"],
                  stats["truncated"])
  return items, prompting


def _score(items, score_fn, tokenizer, batch_size, padding, max_len, progress, task):
  """[(chosen option index, letter scores)] per item, scoring items that share letters together."""
  preds = [None] * len(items)
  for lt in {id(it[2]): it[2] for it in items}.values():
    idx = [i for i, it in enumerate(items) if it[2] is lt]
    scores = scoring.letter_scores([items[i][1].tokens for i in idx], lt.conts, score_fn,
                                   pad_id=tokenizer.pad_id, batch_size=batch_size,
                                   padding=padding, max_len=max_len, progress=progress,
                                   desc=f"{task} ({len(idx)} questions)")
    choice = scoring.pick(scores, [len(items[i][0].options) for i in idx])
    for j, i in enumerate(idx):
      preds[i] = (int(choice[j]), scores[j, :len(items[i][0].options)])
  return preds


def _prediction_rows(task, items, preds):
  rows, records = [], []
  for (q, p, _), (c, sc) in zip(items, preds):
    pred = LETTERS[c]
    row = {"subject": q.subject, "id": q.qid, "source": q.source, "prediction": pred,
           "answer": q.answer, "correct": None if q.answer is None else pred == q.answer,
           "letter_scores": [round(float(x), 5) if math.isfinite(x) else None for x in sc],
           "shots": p.shots_used, "prompt_tokens": len(p.tokens)}
    rows.append(row)
    if q.answer is not None:
      cats = subject_tables.categories(task, q.subject)
      records.append({"subject": q.subject, "correct": row["correct"], "category": cats[-1],
                      "categories": list(cats)})
  return rows, records


def _prompting_summary(prompting):
  keys = ("prompts_with_dropped_shots", "shots_dropped", "truncated", "shots_sharing_passage")
  out = {k: sum(s[k] for s in prompting.values()) for k in keys}
  out["per_subject"] = prompting
  return out


def evaluate_benchmark(bench: Benchmark, tokenizer, score_fn: scoring.ScoreFn, max_len: int,
                       batch_size: int = 8, padding: str = "right",
                       add_bos: Optional[bool] = None, limit: Optional[int] = None,
                       progress: bool = True, protocol: Optional[str] = None) -> dict:
  """Scores every question of `bench` and returns the results dict.

  Args:
    bench: from `readers.load_benchmark` (read with the same `protocol` for its shot choice).
    tokenizer: has `encode(text) -> ids`, `bos_id`, `pad_id`.
    score_fn: `TokenBatch -> [batch, vocab]` next-token logits (see `scoring`).
    max_len: context length; longer prompts leave out shots by the protocol's rule.
    add_bos: start prompts with BOS (default: the protocol's rule; Baichuan's scripts use none).
    limit: score at most this many questions per subject (a quick look, flagged in the results).
    protocol: "baichuan" or "official" (default: the one `bench` was read with, else baichuan).
  Returns:
    dict with the aggregate accuracies (`scoring.aggregate`), `headline` (the script's own
    average), `predictions` (one dict per question), `prompting` (shots left out / truncated
    counts) and the `skipped` / `multi_answer` / `excluded` items.
  """
  protocol = protocol or bench.protocol or prompt_lib.DEFAULT_PROTOCOL
  rule = prompt_lib.rules(bench.task, protocol)
  add_bos = rule.bos if add_bos is None else add_bos
  encode = lambda text: list(tokenizer.encode(text))
  letters = _letters(bench, tokenizer, encode, protocol, rule.letters)
  items, prompting = _build_prompts(bench, encode, letters, max_len,
                                    (tokenizer.bos_id,) if add_bos else (), protocol, limit)
  t0 = time.perf_counter()
  preds = _score(items, score_fn, tokenizer, batch_size, padding, max_len, progress, bench.task)
  seconds = time.perf_counter() - t0
  predictions, records = _prediction_rows(bench.task, items, preds)
  results = {"task": bench.task, "split": bench.split, "protocol": protocol,
             "shots": max((len(s.shots) for s in bench.subjects.values()), default=0),
             "max_len": max_len, "padding": padding, "add_bos": add_bos,
             "letter_rule": rule.letters, "truncation": rule.truncation, "limit": limit,
             "questions": len(items), "unlabeled": sum(q.answer is None for q, _, _ in items),
             "scoring_seconds": round(seconds, 3),
             "prompt_tokens": sum(len(p.tokens) for _, p, _ in items)}
  results.update(scoring.aggregate(records))
  metric = f"{rule.headline}_accuracy"
  results["headline"] = {"metric": metric, "value": results[metric]}
  results["prompting"] = _prompting_summary(prompting)
  results["skipped"] = [str(s) for s in bench.skipped]
  results["multi_answer"] = [str(s) for s in bench.multi_answer]
  results["excluded"] = [str(s) for s in bench.excluded]
  results["notes"] = list(bench.notes)
  if bench.protocol not in (None, protocol):
    results["notes"].append(f"benchmark read with protocol {bench.protocol!r}, scored with "
                            f"{protocol!r}: shots as read")
  results["predictions"] = predictions
  if results["prompting"]["prompts_with_dropped_shots"]:
    log.warning("%s: %d prompts in all dropped shots to fit the context (see results 'prompting')",
                bench.task, results["prompting"]["prompts_with_dropped_shots"])
  if bench.skipped:
    log.warning("%s: %d malformed rows were skipped (listed in results 'skipped')", bench.task,
                len(bench.skipped))
  return results


def _pct(x) -> str:
  return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.2f}"


def markdown(results: dict, model: str = "") -> str:
  """A markdown report: category table, per-subject table, prompting and left-out items."""
  task = results["task"]
  title = f"## {TITLES.get(task, task)}: {results['split']} split, {results['shots']}-shot"
  title += f", {results.get('protocol', prompt_lib.DEFAULT_PROTOCOL)} protocol"
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
  lines += ["", "Accuracy is over questions; \"mean of subjects\" averages per-subject accuracies."]
  if results.get("headline"):
    which = "mean of subjects" if results["headline"]["metric"] == "macro_accuracy" else \
        "accuracy over questions"
    lines.append(f"The protocol's headline number is the {which}: "
                 f"**{_pct(results['headline']['value'])}**.")
  if task == "cmmlu":
    lines.append("China-specific subjects also count in their second CMMLU category "
                 "(categories.py), so category rows overlap.")
  lines.append("")
  if results.get("unlabeled"):
    lines += [f"{results['unlabeled']} questions carry no answer (public test split): predictions "
              "only, written to the submission file.", ""]
  pr = results["prompting"]
  lines += [f"Prompts that dropped shots to fit {results['max_len']} tokens "
            f"({results.get('truncation', 'first_k')} rule): "
            f"{pr['prompts_with_dropped_shots']} ({pr['shots_dropped']} shots dropped); "
            f"cut even at zero shots: {pr['truncated']}.", ""]
  lines += ["| subject | category | correct / total | accuracy (%) |", "|---|---|---:|---:|"]
  for s, d in results["subjects"].items():
    cat = " + ".join(d.get("categories") or [d["category"]])
    lines.append(f"| {s} | {cat} | {d['correct']} / {d['total']} | {_pct(d['accuracy'])} |")
  for key, what in (("multi_answer", "Multi-answer items (not single-choice, not scored)"),
                    ("excluded", "Left out by the protocol")):
    if results.get(key):  # genuine items, possibly many: counted per file (listed in the JSON)
      per_file = collections.Counter(re.match(r"(.*?):\d+: ", s).group(1) for s in results[key])
      lines += ["", f"{what} ({len(results[key])}; each listed in the results JSON):", ""]
      lines += [f"- `{f}`: {n}" for f, n in per_file.items()]
  if results.get("skipped"):
    lines += ["", f"Skipped malformed rows ({len(results['skipped'])}):", ""]
    lines += [f"- `{s}`" for s in results["skipped"]]
  if results.get("notes"):
    lines += ["", "Notes:", ""] + [f"- {n}" for n in results["notes"]]
  return "\n".join(lines) + "\n"


def _finite(x):
  """`x` with every non-finite float replaced by None (JSON has no NaN or Infinity)."""
  if isinstance(x, float) and not math.isfinite(x):
    return None
  if isinstance(x, dict):
    return {k: _finite(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_finite(v) for v in x]
  return x


def to_json(obj, **kw) -> str:
  """Strict JSON (`allow_nan=False`) with NaN/inf written as null."""
  return json.dumps(_finite(obj), ensure_ascii=False, allow_nan=False, **kw)


def write_reports(results: dict, out_dir, model: str = "") -> dict:
  """Writes `{task}_results.json`, `{task}_results.md`, `{task}_predictions.jsonl` and, for
  unlabeled rows, `{task}_submission.json` (`{subject: {id: letter}}`, C-Eval's submission format).
  Returns {kind: path}."""
  out = Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  task = results["task"]
  paths = {"json": out / f"{task}_results.json", "markdown": out / f"{task}_results.md",
           "predictions": out / f"{task}_predictions.jsonl"}
  summary = {k: v for k, v in results.items() if k != "predictions"}
  summary["model"] = model
  paths["json"].write_text(to_json(summary, indent=2) + "\n", encoding="utf-8")
  paths["markdown"].write_text(markdown(results, model), encoding="utf-8")
  with open(paths["predictions"], "w", encoding="utf-8") as f:
    for row in results["predictions"]:
      f.write(to_json(row) + "\n")
  if results.get("unlabeled"):
    sub = collections.defaultdict(dict)
    for row in results["predictions"]:
      if row["answer"] is None:
        sub[row["subject"]][row["id"]] = row["prediction"]
    paths["submission"] = out / f"{task}_submission.json"
    paths["submission"].write_text(to_json(sub, indent=1) + "\n", encoding="utf-8")
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
