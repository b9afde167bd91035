"""Scaling-law study: a ladder of model sizes, Baichuan 2's ``L(C) = a C^b + L_inf`` fitted on all
but the largest, the largest's loss predicted and compared; compute-optimal size per budget.

    # CPU default: ~25 min on 2 idle cores (47 min measured here on shared ones).
    python experiments/scaling.py --config=experiments/configs/scaling.py \
        --workdir=/tmp/scaling --docs_dir=docs/results
    python experiments/scaling.py --config=experiments/configs/scaling.py:gpu --workdir=/tmp/sg

The sweep is resumable: re-running with the same --workdir trains only the missing runs.
Every run uses the same architecture family (Baichuan 2 tiny preset: NormHead, max-z loss) and the
engine's AdamW settings; only width/depth/heads, the token budget and the schedule change.

CPU default: the issue asks for ~0.1M to ~20M non-embedding parameters, but on 2 shared cores a 20M
model trains at ~100 tokens/s, so the CPU ladder is shrunk to 27k .. 1.27M non-embedding
parameters (0.29M .. 2.6M with the 4,096-word embedding and head). The `gpu` size is the ~0.1M to
~20M ladder.
"""

import ml_collections

SIZES = ("cpu", "gpu")


def get_config(size: str = "cpu") -> ml_collections.ConfigDict:
  """Returns the scaling config; `size` is "cpu" (default) or "gpu"."""
  if size not in SIZES:
    raise ValueError(f"scaling size {size!r} is unknown; allowed: {SIZES}")
  gpu = size == "gpu"
  c = ml_collections.ConfigDict()
  # Which size this is (recorded in the results).
  c.size = size
  # The ladder, smallest to largest: "hidden,layers,heads,tokens" per rung, rungs separated by ";"
  # (head_dim = 32 on CPU, 64 on GPU; SwiGLU width 8/3 * hidden rounded up to 32). `tokens` is
  # the rung's training budget; its compute budget is tokens x FLOPs/token. The LAST rung is held
  # out of the fit. CPU: 27k .. 1.27M non-embedding parameters, 61k .. 195k tokens.
  c.ladder = ("32,2,1,61440; 48,2,2,76800; 64,2,2,97280; 96,2,3,122880; 128,3,4,153600; "
              "160,4,5,194560") if not gpu else (
      "64,2,1,20e6; 128,4,2,40e6; 256,4,4,80e6; 384,6,6,160e6; 512,8,8,320e6; "
      "768,10,12,640e6; 1024,12,16,1280e6")
  # Extra budgets per rung as multiples of its tokens (each with its own schedule); (1.0,) = one.
  c.budget_multipliers = (1.0,)
  # Compute dtype: fp32 on CPU (bf16 is emulated there), bf16 on accelerators.
  c.dtype = "bfloat16" if gpu else "float32"
  # Preset the ladder's overrides apply to, and its vocabulary (= the tokenizer's).
  c.preset = "tiny"
  c.vocab_size = 8192 if gpu else 4096

  # Optimisation: rows per step and tokens per row (the same for every rung).
  c.batch_size = 64 if gpu else 8
  c.seq_len = 512 if gpu else 64
  # Peak LR per rung: lr_ref * (N / lr_ref_params) ** lr_exponent, N = non-embedding parameters
  # (smaller models take larger steps; the exponent follows the usual ~N^-1/4 trend).
  c.lr_ref = 3e-3 if not gpu else 1.5e-3
  c.lr_ref_params = 1e5
  c.lr_exponent = -0.25
  # Warm-up as a fraction of each run's steps; cosine to min_lr_ratio * peak at the last step,
  # so every budget gets a complete schedule.
  c.warmup_fraction = 0.1
  c.min_lr_ratio = 0.1
  # Initialisation seed and data-order seed (the same for every rung: the same data order).
  c.seed = 0

  # Evaluations per run (the validation curve feeds the compute-optimal envelope) and the number
  # of fixed validation batches per evaluation.
  c.evals_per_run = 6
  c.eval_batches = 16 if gpu else 12

  # Data: default corpus/tokenizer/tokenized dataset unless paths are given.
  c.data = ml_collections.ConfigDict()
  c.data.dataset_path = ""
  c.data.tokenizer_path = ""
  c.data.vocab_size = c.vocab_size
  c.data.seed = 0
  # Default dataset from the cleaned corpus (True, what the main job trains on) or the raw one.
  # False here: the results recorded in docs/experiments.md were measured on the raw corpus.
  c.data.clean = False

  # Where the tables and plots are copied ("" = only the workdir).
  c.docs_dir = ""
  return c
