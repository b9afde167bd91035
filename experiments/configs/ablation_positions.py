"""RoPE vs ALiBi ablation (Baichuan 7B vs 13B position schemes) at equal size, data and FLOPs.

Every run is identical except `position_embedding`: same model shape (so the same parameters and
FLOPs per token), same schedule, and for each seed the same initialisation seed and the same
training-data order. Reported: validation curves, final loss with the spread over seeds, validation
loss per position bucket at 1x/2x/4x/8x the training length, train and decode throughput.

    # CPU default: ~20 min on 2 idle cores (40 min measured here on shared ones).
    python experiments/ablation.py --config=experiments/configs/ablation_positions.py \
        --workdir=/tmp/ablation --docs_dir=docs/results
    # The accelerator size is one override:
    python experiments/ablation.py --config=experiments/configs/ablation_positions.py:gpu \
        --workdir=/tmp/ablation_gpu

Any key can be overridden on the command line, e.g. `--config.seeds=0,1,2`.
"""

import ml_collections

SIZES = ("cpu", "gpu")


def get_config(size: str = "cpu") -> ml_collections.ConfigDict:
  """Returns the ablation config; `size` is "cpu" (default, minutes on 2 cores) or "gpu"."""
  if size not in SIZES:
    raise ValueError(f"ablation size {size!r} is unknown; allowed: {SIZES}")
  gpu = size == "gpu"
  c = ml_collections.ConfigDict()
  # Which size this is (recorded in the results).
  c.size = size
  # Position schemes compared (the only difference between paired runs).
  c.schemes = ("rope", "alibi")
  # One run per (scheme, seed); a seed sets both the initialisation and the data order.
  c.seeds = (0, 1, 2) if gpu else (0, 1)

  # Model: a `configs.get(preset, **overrides)` member of the Baichuan family.
  c.model = ml_collections.ConfigDict()
  # Preset the overrides apply to (tiny: NormHead + max-z loss as in Baichuan 2, vocab 4096).
  c.model.preset = "tiny" if not gpu else "small"
  # Width / depth / heads. CPU: 0.4M non-embedding parameters (2 layers, 4 heads of 32).
  c.model.hidden_size = 512 if gpu else 128
  c.model.num_layers = 8 if gpu else 2
  c.model.num_heads = 8 if gpu else 4
  # SwiGLU width (8/3 * hidden rounded up to 32).
  c.model.intermediate_size = 1376 if gpu else 352
  # Compute dtype: fp32 on CPU (bf16 matmuls are emulated and slow there), bf16 on accelerators.
  c.model.dtype = "bfloat16" if gpu else "float32"
  # Vocabulary of the default tokenizer (data.vocab_size); must match the dataset's tokenizer.
  c.model.vocab_size = 8192 if gpu else 4096

  # Optimisation (the engine's `default_train_config()` supplies AdamW betas 0.9/0.95, weight
  # decay 0.1, clip 0.5 as in Baichuan).
  c.train = ml_collections.ConfigDict()
  # Rows per step and tokens per row (the training length L of the extrapolation test).
  c.train.batch_size = 32 if gpu else 16
  c.train.seq_len = 512 if gpu else 64
  # Optimiser steps (CPU: 200 x 1,024 = 205k tokens per run).
  c.train.total_steps = 5000 if gpu else 200
  # Linear warm-up, then cosine to min_lr_ratio * peak_lr at total_steps.
  c.train.warmup_steps = 250 if gpu else 20
  # Peak learning rate (small models tolerate far more than Baichuan-7B's 2e-4).
  c.train.peak_lr = 6e-4 if gpu else 2e-3
  c.train.min_lr_ratio = 0.1

  # Validation curve: evaluate every this many steps on the same `eval_batches` batches.
  c.eval_every = 250 if gpu else 25
  c.eval_batches = 16 if gpu else 6
  # Training metrics are recorded every this many steps.
  c.log_every = 50 if gpu else 10

  # Length extrapolation: evaluate at these multiples of train.seq_len.
  c.extrapolation = ml_collections.ConfigDict()
  c.extrapolation.factors = (1, 2, 4, 8)
  # In-document validation windows of 8 L + 1 tokens (the same windows at every factor).
  c.extrapolation.max_windows = 64 if gpu else 24
  # Positions per reported bucket (0 = the training length L).
  c.extrapolation.bucket_len = 0
  # Windows per forward pass.
  c.extrapolation.batch_size = 8

  # Decode throughput of the KV-cache generator (greedy, no stop token).
  c.decode = ml_collections.ConfigDict()
  c.decode.prompt_len = 32
  c.decode.new_tokens = 256 if gpu else 64
  c.decode.batch = 1

  # Data: the default corpus/tokenizer/tokenized dataset (built on first use) unless paths given.
  c.data = ml_collections.ConfigDict()
  # A prepared tokenized dataset ("" = baichuan_jax.data.default_data()).
  c.data.dataset_path = ""
  # Its tokenizer ("" = the default one); used for the decode prompt.
  c.data.tokenizer_path = ""
  # Vocabulary of the default tokenizer when it has to be built.
  c.data.vocab_size = c.model.vocab_size
  # Base data-order seed; run seed s reads with data.seed + s.
  c.data.seed = 0
  # Default dataset from the cleaned corpus (True, what the main job trains on) or the raw one.
  # False here: the results recorded in docs/experiments.md were measured on the raw corpus.
  c.data.clean = False

  # Where the tables and plots are copied ("" = only the workdir).
  c.docs_dir = ""
  return c
