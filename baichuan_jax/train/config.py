"""The training-engine config: optimiser, schedule, batch geometry, ZeRO stage, loss splitting, mesh.

`default_train_config()` returns an `ml_collections.ConfigDict` with a comment above every key.
Experiment configs start from it and override fields; `validate_train_config` checks every field
and raises a ValueError naming the field, its value and what is allowed.
"""

from __future__ import annotations

import math
from typing import Any

import ml_collections

ZERO_STAGES = (0, 1, 2, 3)


def default_train_config() -> ml_collections.ConfigDict:
  """Baichuan's published pretraining hyper-parameters with CPU-sized batch geometry."""
  c = ml_collections.ConfigDict()
  # Global batch in sequences per optimiser step (summed over data-parallel replicas and
  # micro-batches). Must be divisible by microbatches * (mesh.data * mesh.fsdp).
  c.batch_size = 8
  # Tokens per sequence (Baichuan: 4096). Must not exceed the model's max_seq_len.
  c.seq_len = 256
  # Gradient-accumulation steps per optimiser step; each micro-batch is batch_size / microbatches.
  c.microbatches = 1
  # Peak learning rate after warm-up (Baichuan: 2e-4 for 7B, 1.5e-4 for 13B).
  c.peak_lr = 2e-4
  # Linear warm-up steps from 0 to peak_lr (Baichuan: 2,000).
  c.warmup_steps = 2000
  # Steps of the whole schedule; cosine decays from peak_lr to min_lr_ratio * peak_lr by then.
  c.total_steps = 100_000
  # Floor of the cosine as a fraction of peak_lr (unpublished for Baichuan; 0.1 as in LLaMA).
  c.min_lr_ratio = 0.1
  # AdamW (beta1, beta2) (Baichuan: 0.9, 0.95).
  c.betas = (0.9, 0.95)
  # AdamW epsilon (Baichuan-7B config: 1e-8).
  c.eps = 1e-8
  # Decoupled weight decay, applied to every parameter except the RMSNorm scales.
  c.weight_decay = 0.1
  # Clip gradients to this global L2 norm (Baichuan: 0.5); 0 disables clipping.
  c.grad_clip = 0.5
  # ZeRO stage over the data axis: 0 replicate everything, 1 shard optimizer state,
  # 2 also gradients, 3 also parameters (FSDP). The `fsdp` mesh axis always shards all three.
  c.zero_stage = 1
  # Sequence positions per chunk of the split output layer + loss (a chunk covers every row of
  # the micro-batch); 0 materialises the full [tokens, vocab] fp32 logits (memory-hungry at
  # vocab 125,696).
  c.loss_chunk_size = 1024
  # Vocabulary chunks per device inside each token chunk (online log-sum-exp); must divide
  # vocab_size / mesh.model.
  c.loss_vocab_chunks = 1
  # Consecutive non-finite steps (skipped updates) after which the loop should roll back to the
  # last checkpoint.
  c.max_bad_steps = 5
  # Seed for parameter initialisation and the per-step RNG passed to the loss.
  c.seed = 0
  # Device mesh. Axes: data (pure data parallel / ZeRO), fsdp (always shards params, grads and
  # optimizer state), model (Megatron tensor parallel). -1 means "all remaining devices"
  # (at most one axis may be -1).
  c.mesh = ml_collections.ConfigDict()
  # Data-parallel ways (-1: the rest of the devices).
  c.mesh.data = -1
  # Fully-sharded data-parallel ways (1 = off).
  c.mesh.fsdp = 1
  # Tensor-parallel ways; keep inside a host/slice (fast links). Must divide heads, mlp and vocab.
  c.mesh.model = 1
  # How many slices/hosts the data axis spans over the slow network (DCN); >1 builds a hybrid
  # mesh with tensor parallelism inside each slice and data parallelism across them.
  c.mesh.dcn_data = 1
  return c


def _fail(field: str, value: Any, allowed: str) -> None:
  raise ValueError(f"train config {field}={value!r} is invalid: {allowed}")


def validate_train_config(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Checks the device-independent fields of a train config (mesh divisibility is checked by
  `baichuan_jax.sharding.make_mesh` / `check_divisibility`)."""
  for field in ("batch_size", "seq_len", "microbatches", "total_steps", "max_bad_steps"):
    v = cfg[field]
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
      _fail(field, v, "must be a positive integer")
  for field in ("warmup_steps", "loss_chunk_size"):
    v = cfg[field]
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
      _fail(field, v, "must be an integer >= 0")
  # inf / NaN pass every `>` test below (`not nan > 0` aside), and an lr of inf turns the first
  # update into 0 * inf = NaN: every number must be finite first.
  for field in ("peak_lr", "min_lr_ratio", "eps", "weight_decay", "grad_clip"):
    v = cfg[field]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
      _fail(field, v, "must be a finite number")
  if isinstance(cfg.betas, (str, bytes)) or not all(
      isinstance(b, (int, float)) and not isinstance(b, bool) and math.isfinite(b)
      for b in tuple(cfg.betas)):
    _fail("betas", cfg.betas, "must be two finite numbers in [0, 1)")
  if not isinstance(cfg.loss_vocab_chunks, int) or cfg.loss_vocab_chunks < 1:
    _fail("loss_vocab_chunks", cfg.loss_vocab_chunks, "must be an integer >= 1")
  if cfg.batch_size % cfg.microbatches:
    _fail("microbatches", cfg.microbatches, f"must divide batch_size={cfg.batch_size}")
  if cfg.warmup_steps > cfg.total_steps:
    _fail("warmup_steps", cfg.warmup_steps, f"must be <= total_steps={cfg.total_steps}")
  if not cfg.peak_lr > 0:
    _fail("peak_lr", cfg.peak_lr, "must be > 0")
  if not 0 <= cfg.min_lr_ratio <= 1:
    _fail("min_lr_ratio", cfg.min_lr_ratio, "must be in [0, 1]")
  betas = tuple(cfg.betas)
  if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
    _fail("betas", cfg.betas, "must be two numbers in [0, 1)")
  if not cfg.eps > 0:
    _fail("eps", cfg.eps, "must be > 0")
  if not cfg.weight_decay >= 0:
    _fail("weight_decay", cfg.weight_decay, "must be >= 0")
  if not cfg.grad_clip >= 0:
    _fail("grad_clip", cfg.grad_clip, "must be >= 0 (0 disables clipping)")
  if cfg.zero_stage not in ZERO_STAGES:
    _fail("zero_stage", cfg.zero_stage, f"allowed: {ZERO_STAGES}")
  return cfg
