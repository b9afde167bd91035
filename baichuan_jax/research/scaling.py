"""The scaling-law study: train a ladder of sizes, fit ``L(C) = a C^b + L_inf`` on all but the
largest, predict the largest, and read compute-optimal sizes off the training curves.

`run_scaling(cfg, workdir)` (config: `experiments/configs/scaling.py`) trains the missing runs of
the sweep (resumable; one ``WORKDIR/runs/<name>/result.json`` per finished run), printing a progress
table, then writes ``scaling_results.{md,json}``, ``scaling_fit.png`` and
``scaling_optimal_size.png`` to the workdir (and `docs_dir`).

C is the training compute of a run: tokens x `configs.flops_per_token` (every matmul including the
output head, attention at the training length, forward + backward). Sizes N are non-embedding
parameters (attention, MLP, norms), as in Kaplan et al.; the output head counts in C but not in N.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import ml_collections

from baichuan_jax import configs
from baichuan_jax import workdir_lock
from baichuan_jax import train as engine
from baichuan_jax.research import plots, report, runner, scaling_law
from baichuan_jax.research.sweep import Sweep

OUTPUTS = ("scaling_results.md", "scaling_results.json", "scaling_fit.png",
           "scaling_optimal_size.png")


def parse_rung(text: str) -> dict:
  """ "hidden,layers,heads,tokens" -> dict (raises naming the rung on a malformed entry)."""
  parts = str(text).split(",")
  try:
    hidden, layers, heads, tokens = (int(float(p)) for p in parts)
  except ValueError:
    parts = None
  if parts is None or min(hidden, layers, heads, tokens) <= 0:
    raise ValueError(f"ladder rung {text!r} must be 'hidden,layers,heads,tokens' with positive "
                     "integers, e.g. '64,2,2,190000'")
  return {"hidden": hidden, "layers": layers, "heads": heads, "tokens": tokens}


def parse_ladder(ladder) -> list[dict]:
  """The ladder string "h,l,n,t; h,l,n,t; ..." (or a sequence of rung strings) -> rung dicts."""
  items = ladder.split(";") if isinstance(ladder, str) else list(ladder)
  return [parse_rung(r.strip()) for r in items if str(r).strip()]


def model_config(cfg, rung: dict) -> ml_collections.ConfigDict:
  """The rung's model: the preset with the rung's shape (SwiGLU 8/3 x hidden rounded up to 32)."""
  return configs.get(
      cfg.preset, vocab_size=cfg.vocab_size, hidden_size=rung["hidden"],
      num_layers=rung["layers"], num_heads=rung["heads"], num_kv_heads=rung["heads"],
      intermediate_size=32 * math.ceil(8 * rung["hidden"] / 3 / 32), dtype=cfg.dtype,
      max_seq_len=cfg.seq_len)


def non_embedding_params(model_cfg) -> int:
  c = configs.param_counts(model_cfg)
  return c["total"] - c["embedding"] - c["head"]


def train_config(cfg, model_cfg, tokens: int) -> ml_collections.ConfigDict:
  """Engine config for one budget: steps from the token budget, warm-up and cosine over exactly
  those steps, peak LR from the size rule."""
  t = engine.default_train_config()
  t.batch_size, t.seq_len = cfg.batch_size, cfg.seq_len
  t.total_steps = max(1, round(tokens / (cfg.batch_size * cfg.seq_len)))
  t.warmup_steps = max(1, round(cfg.warmup_fraction * t.total_steps))
  t.peak_lr = float(cfg.lr_ref * (non_embedding_params(model_cfg) / cfg.lr_ref_params)
                    ** cfg.lr_exponent)
  t.min_lr_ratio = cfg.min_lr_ratio
  t.seed = cfg.seed
  return engine.validate_train_config(t)


def run_specs(cfg) -> dict[str, dict]:
  """run name -> spec, smallest rung first; the last rung's runs are marked held out."""
  rungs = parse_ladder(cfg.ladder)
  if len(rungs) < 4:
    raise ValueError(f"ladder has {len(rungs)} rungs; the fit needs >= 3 plus one held out")
  sizes = [non_embedding_params(model_config(cfg, r)) for r in rungs]
  if sizes != sorted(sizes) or len(set(sizes)) != len(sizes):
    raise ValueError(f"ladder rungs must grow strictly in size; non-embedding params {sizes}")
  specs = {}
  for i, rung in enumerate(rungs):
    m = model_config(cfg, rung)
    n = sizes[i]
    for mult in cfg.budget_multipliers:
      tokens = int(round(rung["tokens"] * mult))
      t = train_config(cfg, m, tokens)
      real_tokens = t.total_steps * t.batch_size * t.seq_len
      fpt = configs.flops_per_token(m, cfg.seq_len)["total"]
      name = f"n{n / 1e6:.3f}M" + (f"_x{mult:g}" if len(cfg.budget_multipliers) > 1 else "")
      specs[name] = {"rung": i, "held_out": i == len(rungs) - 1, "multiplier": float(mult),
                     "params_non_embedding": n, "params_total": configs.param_counts(m)["total"],
                     "tokens": real_tokens, "flops_per_token": fpt,
                     "compute": fpt * real_tokens, "model": m.to_dict(),
                     "train": json.loads(t.to_json()), "data_seed": int(cfg.data.seed),
                     "evals_per_run": cfg.evals_per_run, "eval_batches": cfg.eval_batches}
  return specs


def analyze(cfg, specs: dict, results: dict) -> dict:
  """Fit on finished non-held-out runs, prediction for finished held-out runs, optimal sizes."""
  out = {"points": [], "fit": None, "predictions": [], "optimal": [], "optimal_power_law": None}
  for name, spec in specs.items():
    if name in results:
      out["points"].append({"name": name, "compute": results[name]["evals"][-1]["flops"],
                            "loss": results[name]["final_val_loss"],
                            "params_non_embedding": spec["params_non_embedding"],
                            "held_out": spec["held_out"]})
  fit_pts = [p for p in out["points"] if not p["held_out"]]
  if len({p["compute"] for p in fit_pts}) >= 3:
    fit = scaling_law.fit_loss_vs_compute([p["compute"] for p in fit_pts],
                                          [p["loss"] for p in fit_pts])
    out["fit"] = fit.to_dict()
    for p in out["points"]:
      p["fit_prediction"] = float(fit.predict(p["compute"]))
      if p["held_out"]:
        out["predictions"].append({"name": p["name"], "compute": p["compute"],
                                   **scaling_law.prediction_error(p["fit_prediction"], p["loss"])})
  curves = {n: {"params": specs[n]["params_non_embedding"],
                "compute": [e["flops"] for e in r["evals"]],
                "loss": [e["val_loss"] for e in r["evals"]]} for n, r in results.items()}
  if len(curves) >= 2:
    # One budget per size: read the envelope where each run ends (annealed), holding smaller
    # runs at their final loss.
    budgets = sorted(c["compute"][-1] for c in curves.values())
    out["optimal"] = scaling_law.compute_optimal_sizes(curves, budgets, hold_final=True)
    opt = [r for r in out["optimal"] if r["candidates"] >= 2]
    if len({r["budget"] for r in opt}) >= 2:
      pl = scaling_law.fit_power_law([r["budget"] for r in opt], [r["n_opt"] for r in opt])
      out["optimal_power_law"] = {"coef": pl.coef, "exponent": pl.exponent}
  out["curves"] = curves
  return out


def markdown(cfg, specs, results, analysis, complete: bool, env: dict) -> str:
  """The results page for docs/results/scaling_results.md."""
  lines = ["# Scaling law: fit on the small runs, predict the largest", ""]
  if not complete:
    lines += ["**PARTIAL: not every run of the sweep has finished; the fit and prediction cover "
              "finished runs only.**", ""]
  lines += [f"Config `{cfg.size}`: {len(parse_ladder(cfg.ladder))} sizes x budgets {tuple(cfg.budget_multipliers)}"
            f"; {cfg.batch_size} rows x {cfg.seq_len} tokens per step; peak LR "
            f"{cfg.lr_ref:g} x (N / {cfg.lr_ref_params:g})^{cfg.lr_exponent:g}, warm-up "
            f"{cfg.warmup_fraction:.0%} of each run's steps, cosine to {cfg.min_lr_ratio:g} x peak "
            "at the run's last step. N = non-embedding parameters; C = tokens x FLOPs/token "
            "(all matmuls incl. the output head, attention, forward + backward).",
            "", report.env_line(env), "", "## Runs", ""]
  rows = []
  for name, s in specs.items():
    r = results.get(name)
    p = next((q for q in analysis["points"] if q["name"] == name), None)
    pred = p.get("fit_prediction") if p else None
    rows.append([name + (" (held out)" if s["held_out"] else ""), f"{s['params_non_embedding']:,}",
                 f"{s['params_total']:,}", s["model"]["hidden_size"], s["model"]["num_layers"],
                 s["model"]["num_heads"], f"{s['tokens']:,}", s["train"]["total_steps"],
                 f"{s['train']['peak_lr']:.2e}", f"{s['compute']:.3g}",
                 f"{r['final_val_loss']:.4f}" if r else "pending",
                 f"{pred:.4f}" if pred is not None else "-",
                 f"{r['train_tokens_per_s']:,.0f}" if r else "-",
                 f"{r['wall_s']:.0f}" if r else "-"])
  lines += [report.table(["run", "N (non-emb)", "params", "hidden", "layers", "heads", "tokens",
                          "steps", "peak LR", "C (FLOPs)", "final val loss", "fit L(C)",
                          "train tok/s", "wall s"], rows), ""]
  fit = analysis["fit"]
  if fit:
    lines += ["## Fit", "",
              f"L(C) = {fit['a']:.4g} * C^({fit['b']:.4f}) + {fit['l_inf']:.4f}, fitted on "
              f"{fit['num_points']} runs (RMSE {fit['rmse']:.4f} nats).", ""]
    for pr in analysis["predictions"]:
      lines += [f"**Held-out {pr['name']}** (C = {pr['compute']:.3g}): predicted "
                f"{pr['predicted']:.4f}, actual {pr['actual']:.4f}, error "
                f"{pr['abs_error']:+.4f} nats ({pr['rel_error']:+.2%}).", ""]
  if analysis["optimal"]:
    lines += ["## Compute-optimal size per budget", "",
              "Lower envelope of the validation curves (each run's loss vs FLOPs spent so far; "
              "Chinchilla approach 1), read at each run's final compute, where that run is fully "
              "annealed; smaller runs count at their final loss (held flat: more training could "
              "only lower it) and larger runs at their mid-schedule loss, which handicaps them "
              "(their learning rate has not decayed yet). The best size is refined by a parabola "
              "in log N through it and its neighbours.", "",
              report.table(["budget C", "best measured run", "N of best run", "loss",
                            "N_opt (refined)", "runs compared"],
                           [[f"{o['budget']:.3g}", o["best_run"], f"{o['best_params']:,.0f}",
                             f"{o['best_loss']:.4f}", f"{o['n_opt']:,.0f}", o["candidates"]]
                            for o in analysis["optimal"]]), ""]
    pl = analysis["optimal_power_law"]
    if pl:
      lines += [f"Power law through the optima: N_opt ≈ {pl['coef']:.3g} * C^{pl['exponent']:.3f}.",
                ""]
  lines += ["![scaling-law fit with the held-out run](scaling_fit.png)", "",
            "![compute-optimal size](scaling_optimal_size.png)", ""]
  return "\n".join(lines)


def _bar(total: int, desc: str):
  from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel
  bar = tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)

  def update(rec):
    if "val_loss" in rec:
      bar.set_postfix(val=f"{rec['val_loss']:.3f}")
    else:
      bar.update(rec["step"] - bar.n)
  return bar, update


@workdir_lock.locked("workdir", "scaling")  # one writer per workdir
def run_scaling(cfg: ml_collections.ConfigDict, workdir: str | os.PathLike, *,
                progress: bool = True) -> dict:
  """Runs the missing runs of the ladder, then fits, predicts and writes tables and plots.

  Returns:
    the analysis dict (also in WORKDIR/scaling_results.json), with "complete": bool.
  """
  workdir = Path(workdir)
  specs = run_specs(cfg)
  sweep = Sweep(workdir, specs)
  cols = [("N", lambda n, s, r: f"{s['params_non_embedding']:,}"),
          ("C", lambda n, s, r: f"{s['compute']:.3g}"),
          ("held out", lambda n, s, r: "yes" if s["held_out"] else ""),
          ("final val", lambda n, s, r: f"{r['final_val_loss']:.4f}" if r else "-"),
          ("tok/s", lambda n, s, r: f"{r['train_tokens_per_s']:,.0f}" if r else "-"),
          ("wall s", lambda n, s, r: f"{r['wall_s']:.0f}" if r else "-")]
  print(sweep.progress_table(cols), flush=True)
  pending = sweep.pending()
  if pending:
    runner.enable_compilation_cache(workdir / "jax_cache")
    dataset_path, _ = runner.resolve_data(cfg.data)
    val = runner.validation_batches(dataset_path, cfg.batch_size, cfg.seq_len, cfg.eval_batches)
    for name in pending:
      spec = specs[name]
      m = ml_collections.ConfigDict(spec["model"])
      t = ml_collections.ConfigDict(spec["train"])
      every = max(1, t.total_steps // cfg.evals_per_run)
      bar, update = _bar(t.total_steps, name) if progress else (None, None)
      try:
        res = runner.train_lm(m, t, dataset_path, data_seed=spec["data_seed"], eval_every=every,
                              val_batches=val, log_every=max(1, every // 5), progress=update)
      finally:
        if bar is not None:
          bar.close()
      sweep.record(name, res.summary())
      print(sweep.progress_table(cols), flush=True)
  results = sweep.results()
  complete = len(results) == len(specs)
  analysis = analyze(cfg, specs, results)
  analysis["complete"] = complete
  env = report.environment()
  analysis["environment"] = env
  (workdir / "scaling_results.json").write_text(json.dumps(analysis, indent=1))
  (workdir / "scaling_results.md").write_text(
      markdown(cfg, specs, results, analysis, complete, env))
  if analysis["fit"]:
    plots.scaling_fit(analysis["points"], scaling_law.LossFit(**analysis["fit"]),
                      workdir / "scaling_fit.png", curves=analysis["curves"],
                      title="Final loss vs compute: fit and held-out run")
  if analysis["optimal"]:
    pl = analysis["optimal_power_law"]
    plots.optimal_size(analysis["optimal"], workdir / "scaling_optimal_size.png",
                       power_law=scaling_law.PowerLaw(**pl) if pl else None,
                       title="Compute-optimal non-embedding size")
  if cfg.docs_dir:
    os.makedirs(cfg.docs_dir, exist_ok=True)
    for f in OUTPUTS:
      if (workdir / f).exists():
        shutil.copy(workdir / f, Path(cfg.docs_dir) / f)
  return analysis
