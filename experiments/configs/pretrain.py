"""Pretraining configs: `tiny` on the built bilingual corpus, and Baichuan / Baichuan 2 at scale.

    python -m experiments.train --config experiments/configs/pretrain.py --workdir /tmp/tiny
    python -m experiments.train --config experiments/configs/pretrain.py:baichuan2-7b,h100 ...
    python -m experiments.train --config experiments/configs/pretrain.py:baichuan2-13b,v5p \
        --config.dry_run=True          # size the launch on fake CPU devices first

The argument after ':' is `PRESET[,HARDWARE]`:

* PRESET: `tiny` (default) or `baichuan-7b`, `baichuan-13b`, `baichuan2-7b`, `baichuan2-13b`.
* HARDWARE (large presets only): `h100` (nodes of 8 x H100 80GB, the default) or `v5p`
  (a TPU v5p-128 slice: 64 chips; more slices with `--config.train.mesh.dcn_data=N`).

Meshes follow Baichuan 2's published recipe: tensor parallelism (`model`) only inside a node
or slice where links are fast, ZeRO-3 (`fsdp`) inside it as well, and plain ZeRO-1 data
parallelism (`data`, size -1 = "every remaining device") across nodes. Hyper-parameters are the
published ones: AdamW (0.9, 0.95), eps 1e-8, weight decay 0.1, clip 0.5, 2,000 warm-up steps,
peak LR 2e-4 (7B) / 1.5e-4 (13B), sequence length 4096, batch of 4M tokens.

Every field can be overridden on the command line, e.g. `--config.train.total_steps=50`.
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict

from baichuan_jax import configs
from baichuan_jax import distributed
from baichuan_jax.train.config import default_train_config

LARGE = ("baichuan-7b", "baichuan-13b", "baichuan2-7b", "baichuan2-13b")
HARDWARE = ("h100", "v5p")

# Dense bf16 peak FLOP/s per device, for MFU: H100 SXM 989 TFLOP/s, TPU v5p 459 TFLOP/s.
PEAK_FLOPS = {"h100": 989e12, "v5p": 459e12}

# Tokens in the published runs: Baichuan 1.2T (7B) / 1.4T (13B), Baichuan 2 2.6T. With 4M-token
# batches (1024 x 4096) that is this many optimizer steps.
TOTAL_STEPS = {"baichuan-7b": 286_000, "baichuan-13b": 334_000, "baichuan2-7b": 620_000,
               "baichuan2-13b": 620_000}

# Per (size, hardware): mesh inside a node/slice, micro-batches per step, remat policy.
#  - h100, 7B: TP 2 x FSDP 4 over NVLink keeps the per-GPU matmuls large; 13B needs TP 4.
#  - v5p, 7B: FSDP over all 64 chips (ICI all-gathers overlap with the layer scan); 13B adds TP 2
#    so that each chip's activations fit at 4096 tokens.
LAYOUTS = {
    ("7b", "h100"): dict(fsdp=4, model=2, microbatches=16, remat="save_dots_no_batch", devices=8),
    ("13b", "h100"): dict(fsdp=2, model=4, microbatches=32, remat="full", devices=8),
    ("7b", "v5p"): dict(fsdp=-1, model=1, microbatches=4, remat="save_dots_no_batch", devices=64),
    ("13b", "v5p"): dict(fsdp=-1, model=2, microbatches=8, remat="full", devices=64),
}


def _common(model: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  # Preset name this config was built from (for the logs).
  c.preset = ""
  # Model: a `baichuan_jax.configs.get(...)` ConfigDict (every model field is overridable).
  c.model = model
  # Optimiser, schedule, batch geometry, ZeRO stage and mesh (`train.default_train_config`).
  c.train = default_train_config()

  c.data = ml_collections.ConfigDict()
  # Cache root for the corpus, tokenizer and tokenized dataset (None: $BAICHUAN_JAX_DATA or
  # ~/.cache/baichuan_jax); built on first use.
  c.data.root = config_dict.placeholder(str)
  # Train on ROOT/corpus_clean: the embedded corpus through baichuan_jax.data.clean (quality rules,
  # MinHash-LSH dedup, sampling weights; built once, about a minute). False: the raw ROOT/corpus.
  c.data.clean = True
  # A built corpus folder to train on as it is, instead of the default (e.g. one you cleaned
  # with your own settings); `clean` is then ignored.
  c.data.corpus_dir = config_dict.placeholder(str)
  # Tokenizer vocabulary; must not exceed model.vocab_size.
  c.data.vocab_size = model.vocab_size
  # Seed of the loader's global shuffle (same on every process).
  c.data.seed = 0
  # Grain reader threads per process.
  c.data.read_threads = 2

  # Evaluate the validation loss every this many steps (and at the start and the end); 0 = never.
  c.eval_every = 1000
  # Validation batches per evaluation (global batch_size rows each).
  c.eval_batches = 16
  # Print a log line every this many steps (the metrics file gets every step).
  c.log_every = 10

  c.checkpoint = ml_collections.ConfigDict()
  # Save every this many steps (also at the end and on SIGTERM).
  c.checkpoint.save_every = 1000
  # Keep the newest this many checkpoints ...
  c.checkpoint.keep_last = 3
  # ... and every step divisible by this for good (0: none), as Baichuan 2 released snapshots.
  c.checkpoint.keep_every = 0
  # Write checkpoints in a background thread while training continues (each save is checked as
  # soon as it completes, at the latest by the next save).
  c.checkpoint.async_save = True
  # A failed save is retried (with the current state) this many times before the run stops.
  c.checkpoint.save_retries = 3
  # Seconds before the first retry; doubled for each further one.
  c.checkpoint.retry_backoff_s = 2.0
  # A save needs this many times the last checkpoint's size free on disk (0: no check).
  c.checkpoint.free_space_margin = 1.1

  # Consecutive rollbacks to the last checkpoint (after max_bad_steps non-finite steps each)
  # before the run gives up ...
  c.max_rollbacks = 3
  # ... where "consecutive" ends after this many healthy (applied) steps in a row: separate
  # spikes each get their own max_rollbacks.
  c.rollback_reset_steps = 100
  # Dense peak FLOP/s of one accelerator (for MFU); 0 = measure a matmul at start-up. On CPU the
  # value is the whole host's (fake devices share its cores).
  c.peak_flops = 0.0
  # Prompt whose greedy continuation is printed at the end ("" = none).
  c.sample_prompt = "新年来临，"
  # Tokens generated for the sample.
  c.sample_tokens = 48
  # Use only the first N devices (0 = all).
  c.num_devices = 0
  # XLA flag preset applied before the backend starts: cpu | gpu | tpu (compute/comm overlap).
  c.xla_flags = "cpu"
  # Persistent compilation cache folder ("" = off): a restarted job skips recompiling.
  c.compilation_cache = "~/.cache/baichuan_jax/xla_cache"
  # Write TensorBoard event files to WORKDIR/tensorboard.
  c.tensorboard = True
  # Compile the train step ahead of time for the mesh on `dry_run_devices` fake CPU devices,
  # print per-device memory, and exit without training.
  c.dry_run = False
  # Fake devices for the dry run (the mesh's size; -1 axes take the rest of them).
  c.dry_run_devices = 8
  # Multi-host start-up (`baichuan_jax.distributed`): coordinator, process count and id.
  c.distributed = distributed.default_config()
  return c


def _tiny() -> ml_collections.ConfigDict:
  c = _common(configs.get("tiny"))
  t = c.train
  # 8 x 128 tokens per step: short steps on 2 CPU cores (the model's context is 256).
  t.batch_size, t.seq_len = 8, 128
  # A short schedule with a large LR: the 5.5M-parameter model learns visibly in ~200 steps.
  t.total_steps, t.warmup_steps, t.peak_lr = 200, 20, 3e-3
  # One CPU device: no sharding of anything; the full-logits loss is cheapest at vocab 4096.
  t.zero_stage, t.loss_chunk_size = 0, 0
  t.mesh.data, t.mesh.fsdp, t.mesh.model = -1, 1, 1
  c.eval_every, c.eval_batches, c.log_every = 50, 4, 10
  c.checkpoint.save_every, c.checkpoint.keep_last = 50, 2
  return c


def _large(name: str, hardware: str) -> ml_collections.ConfigDict:
  size = "13b" if "13b" in name else "7b"
  lay = LAYOUTS[(size, hardware)]
  c = _common(configs.get(name, remat_policy=lay["remat"],
                          attention_impl="pallas"))
  t = c.train
  # 1024 sequences x 4096 tokens = 4M tokens per optimizer step.
  t.batch_size, t.seq_len, t.microbatches = 1024, 4096, lay["microbatches"]
  t.peak_lr = 1.5e-4 if size == "13b" else 2e-4
  t.warmup_steps, t.total_steps = 2000, TOTAL_STEPS[name]
  # Split output layer: never materialise [tokens, vocab] fp32 logits (125,696-way for Baichuan 2).
  t.loss_chunk_size, t.loss_vocab_chunks = 1024, 1
  # ZeRO-1 across nodes/slices (data axis); the fsdp axis shards everything inside one.
  t.zero_stage = 1
  t.mesh.data, t.mesh.fsdp, t.mesh.model = (-1, lay["fsdp"], lay["model"]) if lay["fsdp"] != -1 \
      else (1, -1, lay["model"])
  c.peak_flops = PEAK_FLOPS[hardware]
  c.xla_flags = "gpu" if hardware == "h100" else "tpu"
  c.eval_every, c.eval_batches, c.log_every = 1000, 16, 10
  c.checkpoint.save_every, c.checkpoint.keep_last, c.checkpoint.keep_every = 1000, 3, 10_000
  c.dry_run_devices = lay["devices"]
  return c


def get_config(preset: str = "tiny") -> ml_collections.ConfigDict:
  """The pretraining config for `PRESET[,HARDWARE]` (see the module docstring)."""
  name, _, hardware = (preset or "tiny").strip().partition(",")
  name, hardware = name.strip(), hardware.strip()
  if name == "tiny":
    if hardware:
      raise ValueError(f"pretrain preset 'tiny' takes no hardware (got {hardware!r}); it runs on "
                       "whatever devices are present")
    c = _tiny()
  elif name in LARGE:
    hardware = hardware or "h100"
    if hardware not in HARDWARE:
      raise ValueError(f"pretrain hardware {hardware!r} is unknown; allowed: {HARDWARE}")
    c = _large(name, hardware)
  else:
    raise ValueError(f"pretrain preset {name!r} is unknown; allowed: tiny, {', '.join(LARGE)}")
  c.preset = f"{name},{hardware}" if hardware else name
  return c
