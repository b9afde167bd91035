"""Chat SFT on your own JSONL data, from a training run's checkpoint or a Hugging Face folder.

Run with, for example:

  python -m experiments.align --config=experiments/configs/sft.py --workdir=/tmp/sft \
      --config.tokenizer=TOK.model --config.init=/tmp/pretrain_run \
      --config.data.train=chat_train.jsonl --config.data.validation=chat_val.jsonl

Records are `{"messages": [{"role": "user"|"assistant"|"system", "content": "..."}]}`; the loss is
on assistant tokens (and the `</s>` that ends each reply) only. See docs/alignment.md.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  # Which recipe experiments/align.py runs.
  c.task = "sft"
  # Starting weights: a work directory with checkpoints (python -m experiments.train, or an
  # alignment stage) or a Hugging Face Baichuan folder (config.json + safetensors/bin).
  c.init = ""
  # Model preset and overrides describing a checkpoint `init`, used when `init` has no
  # model_config.json (alignment stages write one) and is not a Hugging Face folder (whose
  # config.json is read); with a saved config only the overrides apply. vocab_size defaults to
  # the tokenizer's.
  c.model = "tiny"
  c.model_overrides = ml_collections.ConfigDict({"dtype": "float32"})
  # SentencePiece model of the starting weights.
  c.tokenizer = ""
  c.data = ml_collections.ConfigDict()
  # Chat JSONL for training, and an optional held-out file whose loss is reported before/after.
  c.data.train = ""
  c.data.validation = ""
  # Optimizer steps, packed rows per step and row length (conversations are cut to seq_len).
  c.steps = 500
  c.batch_size = 8
  c.seq_len = 256
  # Peak learning rate (cosine decay) and warm-up steps. LoRA tolerates larger rates than full FT.
  c.lr = 2e-4
  c.warmup_steps = 50
  # Seed of the batch order and adapter initialisation.
  c.seed = 0
  # Train LoRA adapters (optimizer state for adapters only) instead of every weight.
  c.use_lora = True
  c.lora = ml_collections.ConfigDict()
  # Adapter rank, scale numerator (update = alpha / rank * A @ B), dropout and target modules.
  c.lora.rank = 8
  c.lora.alpha = 16.0
  c.lora.dropout = 0.05
  c.lora.targets = ("W_pack", "o_proj", "gate_proj", "up_proj", "down_proj")
  # Also write the merged model as a Hugging Face checkpoint into this folder ("" = no).
  c.export_hf = ""
  return c
