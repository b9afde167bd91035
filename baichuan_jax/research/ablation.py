"""RoPE vs ALiBi: paired training runs, length extrapolation and speed, summarised into tables.

`run_ablation(cfg, workdir)` runs one training per (scheme, seed) from
`experiments/configs/ablation_positions.py` (resumable: finished runs are kept in
``WORKDIR/runs/<scheme>_s<seed>/result.json``), then writes ``ablation_results.{md,json}``,
``ablation_loss_curves.png`` and ``ablation_extrapolation.png`` to the workdir (and `docs_dir`).

Pairing: for seed s, both schemes start from `PRNGKey(s)` (the parameter trees are identical;
position schemes have no parameters) and read the training data in the same order (loader seed
``data.seed + s``), so per-seed differences isolate the position scheme.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import ml_collections
import numpy as np

from baichuan_jax import configs
from baichuan_jax import workdir_lock
from baichuan_jax import train as engine
from baichuan_jax.research import extrapolation, plots, report, runner
from baichuan_jax.research.sweep import Sweep

OUTPUTS = ("ablation_results.md", "ablation_results.json", "ablation_loss_curves.png",
           "ablation_extrapolation.png")


def model_config(cfg: ml_collections.ConfigDict, scheme: str) -> ml_collections.ConfigDict:
  """The model of one run: identical for every scheme except `position_embedding`."""
  m = cfg.model
  return configs.get(
      m.preset, vocab_size=m.vocab_size, hidden_size=m.hidden_size, num_layers=m.num_layers,
      num_heads=m.num_heads, num_kv_heads=m.num_heads, intermediate_size=m.intermediate_size,
      dtype=m.dtype, position_embedding=scheme,
      # Room for the longest extrapolation window; the model has no length-dependent weights.
      max_seq_len=cfg.train.seq_len * max(cfg.extrapolation.factors))


def train_config(cfg: ml_collections.ConfigDict, seed: int) -> ml_collections.ConfigDict:
  """The engine train config of one run (Baichuan AdamW settings, the experiment's schedule)."""
  t = engine.default_train_config()
  for k in ("batch_size", "seq_len", "total_steps", "warmup_steps", "peak_lr", "min_lr_ratio"):
    t[k] = cfg.train[k]
  t.seed = int(seed)
  return engine.validate_train_config(t)


def run_specs(cfg: ml_collections.ConfigDict) -> dict[str, dict]:
  """run name -> JSON spec of everything that determines the run."""
  if len(set(cfg.schemes)) != len(cfg.schemes) or not cfg.schemes:
    raise ValueError(f"schemes={cfg.schemes!r} must be distinct position schemes")
  specs = {}
  for seed in cfg.seeds:
    for scheme in cfg.schemes:
      specs[f"{scheme}_s{seed}"] = {
          "scheme": scheme, "seed": int(seed), "data_seed": int(cfg.data.seed + seed),
          "model": model_config(cfg, scheme).to_dict(),
          "train": json.loads(train_config(cfg, seed).to_json()),
          "eval_every": cfg.eval_every, "eval_batches": cfg.eval_batches,
          "extrapolation": cfg.extrapolation.to_dict(), "decode": cfg.decode.to_dict()}
  return specs


def _windows(dataset_path: str, cfg) -> np.ndarray:
  from baichuan_jax.data import tokenized  # pylint: disable=import-outside-toplevel
  src = tokenized.open_split(dataset_path, "validation")
  length = cfg.train.seq_len * max(cfg.extrapolation.factors) + 1
  docs = (np.asarray(src[i]["tokens"]) for i in range(len(src)))
  return extrapolation.document_windows(docs, length, cfg.extrapolation.max_windows)


def _bar(total: int, desc: str):
  from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel
  bar = tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)

  def update(rec):
    if "val_loss" in rec:
      bar.set_postfix(val=f"{rec['val_loss']:.3f}")
    else:
      bar.update(rec["step"] - bar.n)
      bar.set_postfix(loss=f"{rec['loss']:.3f}")
  return bar, update


def run_one(spec: dict, cfg, dataset_path: str, val_batches: list, windows: np.ndarray,
            prompt: list, progress: bool = True) -> dict:
  """Trains one (scheme, seed) run and measures it; returns the JSON result."""
  model_cfg = ml_collections.ConfigDict(spec["model"])
  train_cfg = train_config(cfg, spec["seed"])
  bar, update = _bar(train_cfg.total_steps, f"{spec['scheme']} seed {spec['seed']}") \
      if progress else (None, None)
  try:
    res = runner.train_lm(model_cfg, train_cfg, dataset_path, data_seed=spec["data_seed"],
                          eval_every=cfg.eval_every, val_batches=val_batches,
                          log_every=cfg.log_every, progress=update)
  finally:
    if bar is not None:
      bar.close()
  bucket = cfg.extrapolation.bucket_len or cfg.train.seq_len
  extra = extrapolation.length_extrapolation(
      model_cfg, res.params, windows, cfg.train.seq_len, tuple(cfg.extrapolation.factors),
      bucket_len=bucket, batch_size=cfg.extrapolation.batch_size)
  decode = runner.decode_tokens_per_s(model_cfg, res.params, prompt,
                                      new_tokens=cfg.decode.new_tokens, batch=cfg.decode.batch)
  counts = configs.param_counts(model_cfg)
  return {**res.summary(), "extrapolation": extra, "decode_tokens_per_s": decode,
          "params_total": counts["total"],
          "params_non_embedding": counts["total"] - counts["embedding"] - counts["head"]}


def summarize(cfg, results: dict[str, dict]) -> dict:
  """Aggregates finished runs per scheme: final loss mean/std/min/max over seeds, paired
  differences, mean extrapolation buckets, speeds."""
  out = {"schemes": {}, "paired": []}
  factors = [int(f) for f in cfg.extrapolation.factors]
  for scheme in cfg.schemes:
    runs = [r for n, r in results.items() if n.startswith(f"{scheme}_s")]
    if not runs:
      continue
    final = np.array([r["final_val_loss"] for r in runs])
    ex = [r["extrapolation"] for r in runs]
    out["schemes"][scheme] = {
        "seeds": len(runs), "final_val_loss": final.tolist(),
        "mean": float(final.mean()), "std": float(final.std(ddof=1)) if len(runs) > 1 else 0.0,
        "min": float(final.min()), "max": float(final.max()),
        "train_tokens_per_s": float(np.mean([r["train_tokens_per_s"] for r in runs])),
        "decode_tokens_per_s": float(np.mean([r["decode_tokens_per_s"] for r in runs])),
        "flops_per_token": runs[0]["flops_per_token"],
        "params_total": runs[0]["params_total"],
        "params_non_embedding": runs[0]["params_non_embedding"],
        "tokens": runs[0]["evals"][-1]["tokens"],
        "num_windows": runs[0]["extrapolation"]["num_windows"],
        "window_mean": {f: [_get(e["mean"], f) for e in ex] for f in factors},
        "buckets": {f: np.mean([_get(e["buckets"], f) for e in ex], 0).tolist()
                    for f in factors},
        "buckets_per_seed": {f: [_get(e["buckets"], f) for e in ex] for f in factors},
    }
  a, b = (list(cfg.schemes) + [None, None])[:2]
  for seed in cfg.seeds:
    ra, rb = results.get(f"{a}_s{seed}"), results.get(f"{b}_s{seed}")
    if ra and rb:
      out["paired"].append({"seed": int(seed), a: ra["final_val_loss"], b: rb["final_val_loss"],
                            f"{b}-{a}": rb["final_val_loss"] - ra["final_val_loss"]})
  return out


def _get(d: dict, f: int):
  # JSON round trips turn int keys into strings.
  return d[str(f)] if str(f) in d else d[f]


def markdown(cfg, summary: dict, complete: bool, env: dict) -> str:
  """The results page (tables) for docs/results/ablation_results.md."""
  factors = [int(f) for f in cfg.extrapolation.factors]
  L = cfg.train.seq_len
  lines = ["# RoPE vs ALiBi ablation", ""]
  if not complete:
    lines += ["**PARTIAL: not every run of the sweep has finished; numbers cover finished runs "
              "only.**", ""]
  s0 = next(iter(summary["schemes"].values()))
  lines += [
      f"Config `{cfg.size}`: {cfg.model.num_layers} layers, hidden {cfg.model.hidden_size}, "
      f"{cfg.model.num_heads} heads, vocab {cfg.model.vocab_size}; "
      f"{s0['params_non_embedding']:,} non-embedding / {s0['params_total']:,} total parameters. "
      f"{cfg.train.total_steps} steps x {cfg.train.batch_size} rows x {L} tokens = "
      f"{s0['tokens']:,} tokens, {s0['flops_per_token'] * s0['tokens']:.3g} FLOPs per run "
      "(identical for both schemes). Seeds: " + ", ".join(map(str, cfg.seeds)) + ".",
      "", report.env_line(env), "",
      "## Final validation loss (nats/token; std over seeds, ddof=1)", "",
      report.table(["scheme", "seeds", "mean", "std", "min", "max", "per seed",
                    "train tok/s", "decode tok/s"],
                   [[k, v["seeds"], f"{v['mean']:.4f}", f"{v['std']:.4f}", f"{v['min']:.4f}",
                     f"{v['max']:.4f}", ", ".join(f"{x:.4f}" for x in v["final_val_loss"]),
                     f"{v['train_tokens_per_s']:,.0f}", f"{v['decode_tokens_per_s']:,.1f}"]
                    for k, v in summary["schemes"].items()]), ""]
  if summary["paired"]:
    keys = [k for k in summary["paired"][0] if k != "seed"]
    diffs = np.array([p[keys[2]] for p in summary["paired"]])
    lines += ["Paired by seed (same initialisation and data order):", "",
              report.table(["seed"] + keys, [[p["seed"]] + [f"{p[k]:+.4f}" if k == keys[2]
                                                            else f"{p[k]:.4f}" for k in keys]
                                             for p in summary["paired"]]),
              "", f"Mean paired difference {keys[2]}: {diffs.mean():+.4f}"
              + (f" (std {diffs.std(ddof=1):.4f})" if diffs.size > 1 else ""), ""]
  fmax = max(factors)
  lines += [f"## Length extrapolation (trained at L = {L})", "",
            "Validation loss over whole windows of f x L tokens (mean over seeds). The "
            f"{s0['num_windows']} windows of {fmax * L + 1} tokens are cut from single validation "
            "documents and truncated for smaller f, so positions are true in-document positions "
            "and the first L positions are identical at every f:", "",
            report.table(["scheme"] + [f"{f}x ({f * L})" for f in factors],
                         [[k] + [f"{np.mean(v['window_mean'][f]):.4f}" for f in factors]
                          for k, v in summary["schemes"].items()]), ""]
  nb = len(next(iter(summary["schemes"].values()))["buckets"][fmax])
  bl = cfg.extrapolation.bucket_len or L
  lines += [f"Loss per position bucket of {bl} at {fmax}x (positions [k*{bl}, (k+1)*{bl})):", "",
            report.table(["scheme"] + [f"{k * bl}-{(k + 1) * bl - 1}" for k in range(nb)],
                         [[k] + [f"{x:.4f}" for x in v["buckets"][fmax]]
                          for k, v in summary["schemes"].items()]), "",
            "![validation loss curves](ablation_loss_curves.png)", "",
            "![loss per position bucket](ablation_extrapolation.png)", ""]
  return "\n".join(lines)


@workdir_lock.locked("workdir", "ablation")  # one writer per workdir
def run_ablation(cfg: ml_collections.ConfigDict, workdir: str | os.PathLike, *,
                 progress: bool = True) -> dict:
  """Runs the missing runs of the ablation sweep, then writes tables and plots.

  Returns:
    the summary dict (also in WORKDIR/ablation_results.json), with "complete": bool.
  """
  workdir = Path(workdir)
  specs = run_specs(cfg)
  sweep = Sweep(workdir, specs)
  cols = [("final val", lambda n, s, r: f"{r['final_val_loss']:.4f}" if r else "-"),
          ("train tok/s", lambda n, s, r: f"{r['train_tokens_per_s']:,.0f}" if r else "-"),
          ("wall s", lambda n, s, r: f"{r['wall_s']:.0f}" if r else "-")]
  print(sweep.progress_table(cols), flush=True)
  pending = sweep.pending()
  if pending:
    runner.enable_compilation_cache(workdir / "jax_cache")
    dataset_path, tokenizer_path = runner.resolve_data(cfg.data)
    from baichuan_jax.tokenizer import Tokenizer  # pylint: disable=import-outside-toplevel
    tok = Tokenizer(tokenizer_path)
    if tok.vocab_size != cfg.model.vocab_size:
      raise ValueError(f"model.vocab_size={cfg.model.vocab_size} but the tokenizer "
                       f"{tokenizer_path} has {tok.vocab_size} pieces")
    val = runner.validation_batches(dataset_path, cfg.train.batch_size, cfg.train.seq_len,
                                    cfg.eval_batches)
    windows = _windows(dataset_path, cfg)
    # The decode prompt: the opening of the first extrapolation window (real validation text).
    prompt = windows[0, :cfg.decode.prompt_len].tolist()
    for name in pending:
      sweep.record(name, run_one(specs[name], cfg, dataset_path, val, windows, prompt, progress))
      print(sweep.progress_table(cols), flush=True)
  results = sweep.results()
  complete = len(results) == len(specs)
  summary = summarize(cfg, results)
  summary["complete"] = complete
  env = report.environment()
  summary["environment"] = env
  (workdir / "ablation_results.json").write_text(json.dumps(summary, indent=1))
  (workdir / "ablation_results.md").write_text(markdown(cfg, summary, complete, env))
  plots.loss_curves({n: {"evals": r["evals"], "group": specs[n]["scheme"],
                         "linestyle": ["-", "--", ":", "-."][specs[n]["seed"] % 4]}
                     for n, r in results.items()},
                    workdir / "ablation_loss_curves.png", title="RoPE vs ALiBi: validation loss")
  fmax = max(int(f) for f in cfg.extrapolation.factors)
  # The plot uses buckets of L/4 for a finer picture than the table.
  fine = max(cfg.train.seq_len // 4, 1)
  plots.extrapolation(
      {k: {"train_len": cfg.train.seq_len, "bucket_len": fine,
           "buckets": [extrapolation.bucket_means(_get(r["extrapolation"]["per_position"], fmax),
                                                  fine)
                       for n, r in results.items() if specs[n]["scheme"] == k]}
       for k in summary["schemes"]},
      workdir / "ablation_extrapolation.png",
      title=f"Loss per position at {fmax}x the training length")
  if cfg.docs_dir:
    os.makedirs(cfg.docs_dir, exist_ok=True)
    for f in OUTPUTS:
      shutil.copy(workdir / f, Path(cfg.docs_dir) / f)
  return summary
