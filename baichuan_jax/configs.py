"""Model presets for the Baichuan family and the arithmetic researchers size runs with.

`get(name, **overrides)` returns a validated `ml_collections.ConfigDict`. The four published
presets match the Baichuan / Baichuan 2 technical reports exactly (parameter counts are checked by
tests against `jax.eval_shape` of the model); `tiny` and `small` are CPU-sized members of the same
family for tests, examples and ablations.
"""

from __future__ import annotations

import math
from typing import Any

import ml_collections

from baichuan_jax.tokenizer import special as special_ids

POSITION_EMBEDDINGS = ("rope", "alibi")
ATTENTION_IMPLS = ("xla", "pallas")
REMAT_POLICIES = ("none", "full", "save_dots", "save_dots_no_batch", "save_attn_out")
DTYPES = ("float32", "bfloat16", "float16")


def _base() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  # Vocabulary size: 64,000 for Baichuan 1, 125,696 for Baichuan 2.
  c.vocab_size = 64_000
  # Width of the residual stream.
  c.hidden_size = 4096
  # Number of decoder blocks.
  c.num_layers = 32
  # Query heads; head_dim = hidden_size // num_heads.
  c.num_heads = 32
  # Key/value heads. Baichuan uses full multi-head attention (= num_heads); fewer gives GQA/MQA.
  c.num_kv_heads = 32
  # SwiGLU width: 8/3 * hidden rounded up to a multiple of 128 (4096 -> 11008, 5120 -> 13696).
  c.intermediate_size = 11008
  # Longest sequence the model is trained / evaluated at (Baichuan: 4096).
  c.max_seq_len = 4096
  # "rope" (7B models) or "alibi" (13B models).
  c.position_embedding = "rope"
  # RoPE base frequency (10000 in every Baichuan release).
  c.rope_theta = 10000.0
  # Baichuan 2 NormHead: L2-normalise each vocabulary row of the output head in the forward pass.
  c.norm_head = False
  # RMSNorm epsilon.
  c.rms_norm_eps = 1e-6
  # Max-z loss weight (Baichuan 2 pretraining used 2e-4; the released HF configs ship 0).
  c.z_loss_weight = 0.0
  # Compute dtype of activations and matmuls; norms, softmax, positions and loss stay in fp32.
  c.dtype = "bfloat16"
  # Storage dtype of the parameters (fp32 master weights).
  c.param_dtype = "float32"
  # Attention implementation: "xla" (plain jnp) or "pallas" (fused flash-attention kernel).
  c.attention_impl = "xla"
  # Rematerialisation policy per decoder block: none, full, save_dots, save_dots_no_batch,
  # save_attn_out.
  c.remat_policy = "none"
  # Standard deviation of the normal initialiser (HF Baichuan initializer_range).
  c.init_std = 0.02
  # Special token ids (0/1/2 in the released tokenizers), from `baichuan_jax.tokenizer.special`.
  c.pad_id = special_ids.PAD_ID
  c.bos_id = special_ids.BOS_ID
  c.eos_id = special_ids.EOS_ID
  # Chat-template control tokens: before each user turn / before each assistant turn (195/196).
  c.user_token_id = special_ids.USER_ID
  c.assistant_token_id = special_ids.ASSISTANT_ID
  return c


def _preset(**kw: Any) -> ml_collections.ConfigDict:
  c = _base()
  c.update(kw)
  return c


_PRESETS = {
    "baichuan-7b": dict(),
    "baichuan-13b": dict(hidden_size=5120, num_layers=40, num_heads=40, num_kv_heads=40,
                         intermediate_size=13696, position_embedding="alibi"),
    "baichuan2-7b": dict(vocab_size=125_696, norm_head=True, z_loss_weight=2e-4),
    "baichuan2-13b": dict(vocab_size=125_696, hidden_size=5120, num_layers=40, num_heads=40,
                          num_kv_heads=40, intermediate_size=13696, position_embedding="alibi",
                          norm_head=True, z_loss_weight=2e-4),
    # CPU presets: same architecture, small widths. `tiny` has 5,507,328 parameters (5.5M),
    # `small` 34,087,424 (34M); `configs.param_counts` computes them.
    "tiny": dict(vocab_size=4096, hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=4,
                 intermediate_size=768, max_seq_len=256, norm_head=True, z_loss_weight=2e-4),
    "small": dict(vocab_size=8192, hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=8,
                  intermediate_size=1408, max_seq_len=512, norm_head=True, z_loss_weight=2e-4),
}


def names() -> list[str]:
  """Names of every preset, published models first."""
  return list(_PRESETS)


def get(name: str, **overrides: Any) -> ml_collections.ConfigDict:
  """Returns the validated preset `name` with `overrides` applied.

  Raises:
    ValueError: unknown preset, unknown override field, or an invalid value.
  """
  if name not in _PRESETS:
    raise ValueError(f"unknown preset {name!r}; allowed: {', '.join(names())}")
  cfg = _preset(**_PRESETS[name])
  for key, value in overrides.items():
    if key not in cfg:
      raise ValueError(f"unknown config field {key!r}; allowed: {', '.join(sorted(cfg.keys()))}")
    try:
      cfg[key] = value
    except TypeError:  # ml_collections keeps each field's type: hidden_size="256" lands here
      _fail(key, value, f"must be of type {type(cfg[key]).__name__}")
  validate(cfg)
  return cfg


def ffn_width(hidden_size: int) -> int:
  """SwiGLU width rule of LLaMA/Baichuan: 8/3 * hidden, rounded up to a multiple of 128."""
  return 128 * math.ceil(8 * hidden_size / 3 / 128)


def _fail(field: str, value: Any, allowed: str) -> None:
  raise ValueError(f"config.{field}={value!r} is invalid: {allowed}")


def _number(cfg: ml_collections.ConfigDict, field: str) -> float:
  """`cfg[field]` as a finite real number (inf, NaN, strings and bools are rejected by name)."""
  v = cfg[field]
  if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
    _fail(field, v, "must be a finite number")
  return v


def validate(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Checks every model field; raises ValueError naming the field, value and what is allowed."""
  for field in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
                "intermediate_size", "max_seq_len"):
    v = cfg[field]
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
      _fail(field, v, "must be a positive integer")
  for field in ("pad_id", "bos_id", "eos_id", "user_token_id", "assistant_token_id"):
    v = cfg[field]
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
      _fail(field, v, "must be an integer >= 0")
  for field in ("pad_id", "bos_id", "eos_id"):
    if cfg[field] >= cfg.vocab_size:
      _fail(field, cfg[field], f"must be < vocab_size={cfg.vocab_size}")
  for field in ("rope_theta", "rms_norm_eps", "z_loss_weight", "init_std"):
    _number(cfg, field)
  if cfg.hidden_size % cfg.num_heads:
    _fail("num_heads", cfg.num_heads, f"must divide hidden_size={cfg.hidden_size}")
  if cfg.num_heads % cfg.num_kv_heads:
    _fail("num_kv_heads", cfg.num_kv_heads, f"must divide num_heads={cfg.num_heads}")
  head_dim = cfg.hidden_size // cfg.num_heads
  if cfg.position_embedding not in POSITION_EMBEDDINGS:
    _fail("position_embedding", cfg.position_embedding, f"allowed: {POSITION_EMBEDDINGS}")
  if cfg.position_embedding == "rope" and head_dim % 2:
    _fail("num_heads", cfg.num_heads, f"RoPE needs an even head_dim, got {head_dim}")
  if not cfg.rope_theta > 0:
    _fail("rope_theta", cfg.rope_theta, "must be > 0")
  if not 0 < cfg.rms_norm_eps < 1:
    _fail("rms_norm_eps", cfg.rms_norm_eps, "must be in (0, 1)")
  if not cfg.z_loss_weight >= 0:
    _fail("z_loss_weight", cfg.z_loss_weight, "must be >= 0")
  for field in ("dtype", "param_dtype"):
    if cfg[field] not in DTYPES:
      _fail(field, cfg[field], f"allowed: {DTYPES}")
  if cfg.attention_impl not in ATTENTION_IMPLS:
    _fail("attention_impl", cfg.attention_impl, f"allowed: {ATTENTION_IMPLS}")
  if cfg.remat_policy not in REMAT_POLICIES:
    _fail("remat_policy", cfg.remat_policy, f"allowed: {REMAT_POLICIES}")
  if not cfg.init_std > 0:
    _fail("init_std", cfg.init_std, "must be > 0")
  return cfg


# ----------------------------------------------------------------------------------------------
# Model arithmetic.


def param_counts(cfg: ml_collections.ConfigDict) -> dict[str, int]:
  """Exact parameter count, split by part. Keys: embedding, attention, mlp, norms, head, total."""
  h, L = cfg.hidden_size, cfg.num_layers
  head_dim = h // cfg.num_heads
  qkv = h * (cfg.num_heads + 2 * cfg.num_kv_heads) * head_dim
  counts = {
      "embedding": cfg.vocab_size * h,
      "attention": L * (qkv + cfg.num_heads * head_dim * h),
      "mlp": L * 3 * h * cfg.intermediate_size,
      "norms": (2 * L + 1) * h,
      "head": cfg.vocab_size * h,
  }
  counts["total"] = sum(counts.values())
  return counts


def flops_per_token(cfg: ml_collections.ConfigDict, seq_len: int | None = None) -> dict[str, float]:
  """Training FLOPs per token (forward + backward = 3x forward).

  `dense` = 6 * N_matmul where N_matmul counts every weight used in a matmul (all but the input
  embedding, a lookup). `attention` = 12 * layers * heads * head_dim * seq for QK^T and AV,
  forward+backward, without the causal halving (the PaLM / MaxText MFU convention).
  """
  seq = cfg.max_seq_len if seq_len is None else seq_len
  c = param_counts(cfg)
  n_matmul = c["attention"] + c["mlp"] + c["head"]
  head_dim = cfg.hidden_size // cfg.num_heads
  dense = 6.0 * n_matmul
  attention = 12.0 * cfg.num_layers * cfg.num_heads * head_dim * seq
  return {"dense": dense, "attention": attention, "total": dense + attention}


def param_bytes(cfg: ml_collections.ConfigDict) -> dict[str, int]:
  """Bytes to hold the parameters in bf16 and fp32, and AdamW training state in fp32."""
  n = param_counts(cfg)["total"]
  return {"bf16": 2 * n, "fp32": 4 * n, "fp32_adamw_train_state": 12 * n}
