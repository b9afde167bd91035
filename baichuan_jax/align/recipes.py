"""Config-driven alignment runs on your own data: chat SFT (full or LoRA) from a checkpoint.

`run_sft(cfg, workdir)` (what `python -m experiments.align --config experiments/configs/sft.py`
calls) loads a tokenizer and starting weights (a training run's work directory, read with
`baichuan_jax.checkpoint.load_params`, or a Hugging Face Baichuan folder via `baichuan_jax.hf.load`),
reads chat JSONL (`{"messages": [{role, content}, ...]}`; malformed lines are reported with their
line number and skipped), renders the Baichuan chat template with assistant-only loss, packs rows
with segment ids, trains, evaluates the held-out loss, and writes the merged weights as a verified
checkpoint (and, if asked, as a Hugging Face checkpoint).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from typing import Any, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from baichuan_jax import checkpoint, configs, sharding, train
from baichuan_jax import workdir_lock
from baichuan_jax.align import lora, sft_data, trainers
from baichuan_jax.train import loop as train_loop

_LOG = logging.getLogger(__name__)


def engine_config(c: ml_collections.ConfigDict, steps: int) -> ml_collections.ConfigDict:
  """The shared step's train config for a stage with batch_size, seq_len, lr, warmup_steps."""
  tc = train.default_train_config()
  tc.batch_size, tc.seq_len = c.batch_size, c.seq_len
  tc.peak_lr, tc.warmup_steps, tc.total_steps = c.lr, min(c.warmup_steps, steps), steps
  tc.zero_stage, tc.loss_chunk_size = 0, 0
  return tc


def single_device_mesh():
  """A one-device mesh with the engine's axis names (alignment runs here are single-host)."""
  return sharding.make_mesh(train.default_train_config().mesh, jax.devices()[:1])


MODEL_CONFIG_FILE = "model_config.json"


def save_params(directory: str, params: Any, step: int,
                model_cfg: Optional[ml_collections.ConfigDict] = None,
                tokenizer_path: Optional[str] = None) -> None:
  """Writes a parameter tree as a verified checkpoint (`baichuan_jax.checkpoint`) under `directory`,
  and the model config (`model_config.json`) and tokenizer beside it when given, so the folder
  loads on its own (`baichuan_jax.infer.loading`).

  Earlier checkpoints there are removed first: a stage that is re-run replaces its output.
  """
  if model_cfg is not None:
    from baichuan_jax.infer import loading  # pylint: disable=import-outside-toplevel
    loading.describe_workdir(directory, model_cfg, tokenizer_path)
  ckpt = checkpoint.checkpoint_dir(directory)
  if os.path.isdir(ckpt):
    shutil.rmtree(ckpt)
  mgr = checkpoint.CheckpointManager(ckpt, save_every=max(1, step), keep_last=1, async_save=False)
  mgr.save(step, {"params": params, "step": jnp.asarray(step, jnp.int32)})
  mgr.close()


def load_params(directory: str) -> Any:
  """The newest verified parameters saved under `directory` (a stage's output or a training run)."""
  try:
    return checkpoint.load_params(directory)
  except FileNotFoundError as e:
    raise FileNotFoundError(f"{e}; run the stage or training job that writes {directory} first") \
        from None


def load_start(cfg: ml_collections.ConfigDict, vocab_size: int) -> tuple[ml_collections.ConfigDict, Any]:
  """(model config, parameters) to fine-tune from `cfg.init`: a training work directory, a
  checkpoint step or a Hugging Face folder, read by the project's one loader
  (`baichuan_jax.infer.loading`) with the config those weights record. A work directory that
  records none uses the preset `cfg.model` (vocab_size: the tokenizer's); `cfg.model_overrides`
  apply on top of either."""
  from baichuan_jax.infer import loading  # pylint: disable=import-outside-toplevel
  if not cfg.init:
    raise ValueError("config field init is empty: give a training work directory (checkpoints) or "
                     "a Hugging Face Baichuan folder (config.json + weights)")
  overrides = dict(cfg.model_overrides)
  fallback = configs.get(cfg.model, **dict({"vocab_size": vocab_size}, **overrides))
  try:
    model = loading.load_model(path=cfg.init, default_config=fallback, overrides=overrides,
                               with_tokenizer=False, device_put=False)
  except FileNotFoundError as e:
    raise FileNotFoundError(f"{e}; run the stage or training job that writes {cfg.init} first") \
        from None
  return model.cfg, model.params


def _eval_loss(model_cfg, tc, params, packed: dict, batch_size: int) -> dict:
  """Token-weighted next-token loss over every packed validation row."""
  loss_fn = train.lm_loss_fn(model_cfg, tc)
  fn = jax.jit(lambda p, b: loss_fn(p, b, jax.random.PRNGKey(0))[1])
  mean, tokens = train_loop.weighted_mean(
      fn, params, sft_data.batches(packed, batch_size, seed=0, epochs=1))
  return {"loss": 0.0 if mean is None else mean, "tokens": int(tokens)}


@workdir_lock.locked("workdir", "sft")  # one writer per workdir
def run_sft(cfg: ml_collections.ConfigDict, workdir: str) -> dict:
  """Chat SFT from `cfg` (see experiments/configs/sft.py); returns and writes a summary.

  Writes `workdir/sft_metrics.jsonl`, `workdir/sft.png`, `workdir/sft_summary.json`, the merged
  weights under `workdir/sft` (checkpoint) and, if `cfg.export_hf` is set, a Hugging Face folder.
  """
  from baichuan_jax import tokenizer as tokmod  # pylint: disable=import-outside-toplevel
  from baichuan_jax.align import ppo_trainer  # pylint: disable=import-outside-toplevel
  if not cfg.tokenizer:
    raise ValueError("config field tokenizer is empty: give a SentencePiece .model file")
  if not cfg.data.train:
    raise ValueError("config field data.train is empty: give a chat JSONL file")
  os.makedirs(workdir, exist_ok=True)
  tok = tokmod.Tokenizer(cfg.tokenizer)
  model_cfg, params = load_start(cfg, tok.vocab_size)
  if model_cfg.vocab_size < tok.vocab_size:
    raise ValueError(f"tokenizer has {tok.vocab_size} pieces but the model's vocab_size is "
                     f"{model_cfg.vocab_size}")
  if cfg.seq_len > model_cfg.max_seq_len:
    raise ValueError(f"seq_len={cfg.seq_len} exceeds the model's max_seq_len={model_cfg.max_seq_len}")
  report, stats = sft_data.ReadReport(cfg.data.train), sft_data.SFTStats()
  exs = sft_data.load_chat_examples(cfg.data.train, tok, cfg.seq_len, report=report, stats=stats)
  if not exs:
    raise ValueError(f"{cfg.data.train}: no usable conversations ({report.summary()})")
  packed = sft_data.pack_examples(exs, cfg.seq_len)
  lcfg = (lora.LoRAConfig(rank=cfg.lora.rank, alpha=cfg.lora.alpha, dropout=cfg.lora.dropout,
                          targets=tuple(cfg.lora.targets)) if cfg.use_lora else None)
  tc = engine_config(cfg, cfg.steps)
  tuned, rows = trainers.train_sft(model_cfg, params, sft_data.batches(packed, cfg.batch_size,
                                                                       cfg.seed),
                                   tc, single_device_mesh(), cfg.steps, lora_cfg=lcfg,
                                   log_path=os.path.join(workdir, "sft_metrics.jsonl"),
                                   seed=cfg.seed)
  save_params(os.path.join(workdir, "sft"), tuned, cfg.steps, model_cfg, cfg.tokenizer)
  ppo_trainer.plot_metrics(rows, ["loss", "ce", "grad_norm", "lr"], os.path.join(workdir, "sft.png"),
                           x="step", title="chat SFT" + (" (LoRA)" if lcfg else ""))
  summary = {"records_read": report.read, "malformed_skipped": report.skipped,
             "malformed": [str(b) for b in report.bad[:20]], "truncated": stats.truncated,
             "loss_tokens": stats.loss_tokens, "tokens": stats.tokens,
             "packed_rows": int(packed["inputs"].shape[0]), "lora": bool(lcfg),
             "final_train_loss": rows[-1]["ce"], "steps": cfg.steps}
  if cfg.data.validation:
    vexs = sft_data.load_chat_examples(cfg.data.validation, tok, cfg.seq_len)
    vpacked = sft_data.pack_examples(vexs, cfg.seq_len)
    summary["validation_before"] = _eval_loss(model_cfg, tc, params, vpacked, cfg.batch_size)
    summary["validation_after"] = _eval_loss(model_cfg, tc, tuned, vpacked, cfg.batch_size)
  if cfg.export_hf:
    from baichuan_jax import hf  # pylint: disable=import-outside-toplevel
    hf.save(model_cfg, jax.tree.map(np.asarray, tuned), cfg.export_hf, overwrite=True,
            tokenizer=cfg.tokenizer)
    summary["export_hf"] = cfg.export_hf
  with open(os.path.join(workdir, "sft_summary.json"), "w", encoding="utf-8") as f:
    json.dump(summary, f, ensure_ascii=False, indent=2)
  return summary
