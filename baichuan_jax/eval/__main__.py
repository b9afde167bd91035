"""Command line: `python -m baichuan_jax.eval --task ceval --data-dir DIR --hf DIR [...]`.

Scores 5-shot multiple choice (C-Eval, CMMLU, MMLU, GAOKAO, AGIEval) by the next-token scores of
the option letters, or perplexity / bits per byte (`--task ppl`) on a JSONL text file, and writes
results JSON, a markdown table and per-question predictions under `--out`. `--inspect` reads and
validates the benchmark files without a model.
"""

from __future__ import annotations

import argparse
import logging
import platform
import sys
from pathlib import Path

import jax

from baichuan_jax.eval import harness, model_fns, perplexity, prompts, readers

log = logging.getLogger("baichuan_jax.eval")

EPILOG = """examples:
  python -m baichuan_jax.eval --task ceval --data-dir ~/data/ceval --hf ~/models/Baichuan2-7B-Base
  python -m baichuan_jax.eval --task mmlu --data-dir ~/data/mmlu --hf DIR --quantize int8 --limit 20
  python -m baichuan_jax.eval --task ppl --checkpoint runs/tiny --config tiny --tokenizer tok.model
  python -m baichuan_jax.eval --task agieval --data-dir ~/AGIEval/data/v1 --inspect

data layouts: ceval {dev,val,test}/{subject}_{split}.csv; cmmlu {dev,test}/{subject}.csv;
mmlu {dev,val,test}/{subject}_{split}.csv (no header); gaokao GAOKAO-Bench 2010-2022_*.json;
agieval {task}.jsonl; ppl a JSONL file with a "text" field (or a folder holding validation*.jsonl).
"""


def parse_args(argv=None):
  p = argparse.ArgumentParser(prog="python -m baichuan_jax.eval", description=__doc__.split("\n\n")[1],
                              epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--task", required=True, choices=list(readers.TASKS) + ["ppl"])
  p.add_argument("--data-dir", help="benchmark folder in its published layout; for ppl a JSONL "
                 "file or folder (default: the built corpus's validation split)")
  src = p.add_mutually_exclusive_group()
  src.add_argument("--hf", metavar="DIR", help="Hugging Face Baichuan checkpoint folder")
  src.add_argument("--checkpoint", metavar="DIR", help="training workdir (orbax checkpoints)")
  p.add_argument("--step", type=int, help="checkpoint step (default: latest)")
  p.add_argument("--config", help="model preset for --checkpoint when the workdir stores none")
  p.add_argument("--tokenizer", help="SentencePiece tokenizer.model (default: beside the model)")
  p.add_argument("--protocol", default=prompts.DEFAULT_PROTOCOL, choices=list(readers.PROTOCOLS),
                 help="prompt/scoring rules: baichuan (Baichuan's evaluate_zh.py / "
                 "evaluate_mmlu.py; the default) or official (each benchmark's own script)")
  p.add_argument("--inspect", action="store_true", help="read and validate the benchmark files "
                 "only (no model): per-subject counts, multi-answer and skipped items")
  p.add_argument("--shots", type=int, default=5, help="few-shot examples per prompt (default 5)")
  p.add_argument("--split", help="split to score (default: val for ceval, test otherwise)")
  p.add_argument("--subjects", help="comma-separated subjects to score (default: all found)")
  p.add_argument("--quantize", choices=["int8", "int4"], help="weight-only quantization")
  p.add_argument("--dtype", help="compute dtype override, e.g. float32 (default: the config's)")
  p.add_argument("--position-embedding", default="auto", choices=["auto", "rope", "alibi"],
                 help="position scheme of an --hf checkpoint (default: inferred from its shape)")
  p.add_argument("--limit", type=int, help="score at most N questions per subject (N documents "
                 "for ppl); the report says the run is partial")
  p.add_argument("--batch-size", type=int, default=8)
  p.add_argument("--max-len", type=int, help="context length (default: the config's max_seq_len)")
  p.add_argument("--padding", default="right", choices=["left", "right"],
                 help="pad side of a batch; both give the same scores (default right)")
  bos = p.add_mutually_exclusive_group()
  bos.add_argument("--bos", dest="bos", action="store_const", const=True,
                   help="start prompts with BOS (default: the protocol's rule)")
  bos.add_argument("--no-bos", dest="bos", action="store_const", const=False,
                   help="do not start prompts with BOS")
  p.add_argument("--stride", type=int, help="ppl: new tokens per window (default: max-len)")
  p.add_argument("--out", default="eval_results", help="output folder (default eval_results/)")
  p.add_argument("--no-progress", action="store_true", help="hide progress bars")
  args = p.parse_args(argv)
  if args.shots < 0:
    p.error(f"--shots={args.shots} must be >= 0")
  if args.limit is not None and args.limit <= 0:
    p.error(f"--limit={args.limit} must be > 0")
  if args.task != "ppl" and not args.data_dir:
    p.error(f"--task {args.task} needs --data-dir (the benchmark's published files)")
  if args.inspect and args.task == "ppl":
    p.error("--inspect reads a benchmark's files; it does not apply to --task ppl")
  if not args.inspect and not (args.hf or args.checkpoint):
    p.error("one of --hf DIR or --checkpoint DIR is required (or --inspect, which needs no model)")
  return args


def inspect_text(bench) -> str:
  """What `--inspect` prints: per-subject counts, then every multi-answer, left-out and skipped
  item with its file:line and reason."""
  lines = [f"{bench.task} {bench.split} split, {bench.protocol} protocol: "
           f"{bench.num_questions} questions to score in {len(bench.subjects)} subjects", "",
           "| subject | shots | questions | unlabeled |", "|---|---:|---:|---:|"]
  for name, d in bench.subjects.items():
    lines.append(f"| {name} | {len(d.shots)} | {len(d.questions)} | "
                 f"{sum(q.answer is None for q in d.questions)} |")
  files = {q.source.rsplit(":", 1)[0] for d in bench.subjects.values() for q in d.questions}
  own_shots = sum(s.source.rsplit(":", 1)[0] in files for d in bench.subjects.values()
                  for s in d.shots)  # GAOKAO / AGIEval shots come from the scored files
  lines += ["", f"single-choice items in the scored files: {bench.num_questions + own_shots} "
            f"({own_shots} of them used as shots); multi-answer: "
            f"{len(bench.multi_answer)}; left out by the protocol: {len(bench.excluded)}; "
            f"malformed (skipped): {len(bench.skipped)}"]
  for title, items in (("multi-answer items", bench.multi_answer),
                       ("left out by the protocol", bench.excluded),
                       ("skipped (malformed)", bench.skipped)):
    if items:
      lines += ["", f"{title} ({len(items)}):"] + [f"  {s}" for s in items]
  if bench.notes:
    lines += ["", "notes:"] + [f"  {n}" for n in bench.notes]
  return "\n".join(lines) + "\n"


def _load_bench(args):
  return readers.load_benchmark(args.task, args.data_dir, args.split, args.shots,
                                args.subjects.split(",") if args.subjects else None,
                                protocol=args.protocol)


def _ppl_path(data_dir):
  """The JSONL file to score: given, or the validation split of the built corpus."""
  if data_dir is None:
    try:
      from baichuan_jax import data as data_lib  # pylint: disable=import-outside-toplevel
    except ImportError as e:
      raise RuntimeError("--task ppl without --data-dir needs baichuan_jax.data (the corpus "
                         "builder), which is not available; pass --data-dir FILE.jsonl") from e
    data_dir = data_lib.default_corpus()  # what the main job trains on (cleaned)
  path = Path(data_dir).expanduser()
  if path.is_dir():
    found = sorted(path.glob("validation*.jsonl")) + sorted(path.glob("*/validation*.jsonl"))
    if not found:
      raise FileNotFoundError(f"no validation*.jsonl under {path}")
    return found[0]
  return path


def main(argv=None) -> dict:
  args = parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
  bench = None if args.task == "ppl" else _load_bench(args)  # bad files fail before the model loads
  if args.inspect:
    print(inspect_text(bench), end="")
    return {"task": bench.task, "questions": bench.num_questions,
            "subjects": {k: len(v.questions) for k, v in bench.subjects.items()},
            "multi_answer": len(bench.multi_answer), "excluded": len(bench.excluded),
            "skipped": len(bench.skipped)}
  if bench is not None and not bench.num_questions:
    raise ValueError(f"{args.task}: no scorable questions under {args.data_dir} "
                     f"({len(bench.skipped)} malformed rows skipped, e.g. "
                     f"{bench.skipped[0] if bench.skipped else 'none'}; "
                     f"{len(bench.multi_answer)} multi-answer items); run with --inspect to see "
                     "every item left out and why")
  tokenizer = model_fns.load_tokenizer(args.tokenizer, args.hf, args.checkpoint)
  cfg, params = model_fns.load_model(hf=args.hf, checkpoint=args.checkpoint, config=args.config,
                                     step=args.step, quantize=args.quantize, dtype=args.dtype,
                                     position_embedding=args.position_embedding)
  if tokenizer.vocab_size > cfg.vocab_size:
    raise ValueError(f"tokenizer vocab_size={tokenizer.vocab_size} exceeds the model's "
                     f"vocab_size={cfg.vocab_size}: wrong --tokenizer for this model?")
  max_len = args.max_len or cfg.max_seq_len
  score_fn, nll_fn = model_fns.score_fns(cfg, params)
  model_name = args.hf or args.checkpoint
  if args.quantize:
    model_name += f" ({args.quantize})"
  out = Path(args.out)
  env = {"jax": jax.__version__, "device": jax.devices()[0].device_kind,
         "devices": jax.device_count(), "python": platform.python_version()}

  if args.task == "ppl":
    path = _ppl_path(args.data_dir)
    texts = [t for _, t in perplexity.read_texts(path)]
    if args.limit:
      texts = texts[:args.limit]
    res = perplexity.evaluate_text(texts, tokenizer.encode, tokenizer.bos_id, nll_fn, max_len,
                                   stride=args.stride, batch_size=args.batch_size,
                                   pad_id=tokenizer.pad_id, progress=not args.no_progress)
    res.update(path=str(path), model=model_name, limit=args.limit, environment=env)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ppl_results.json").write_text(harness.to_json(res, indent=2) + "\n", encoding="utf-8")
    (out / "ppl_results.md").write_text(harness.ppl_markdown(res, model_name))
    print(harness.ppl_markdown(res, model_name))
    return res

  res = harness.evaluate_benchmark(bench, tokenizer, score_fn, max_len,
                                   batch_size=args.batch_size, padding=args.padding,
                                   add_bos=args.bos, limit=args.limit,
                                   progress=not args.no_progress, protocol=args.protocol)
  res["environment"] = env
  paths = harness.write_reports(res, out, model_name)
  print(harness.markdown(res, model_name))
  print("wrote " + ", ".join(paths.values()))
  return res


if __name__ == "__main__":
  try:
    main()
  except (ValueError, FileNotFoundError, RuntimeError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
