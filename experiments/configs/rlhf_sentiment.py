"""RLHF on real reviews: policy pretraining, reward model, PPO and chat SFT (see docs/alignment.md).

Run with `python -m experiments.align --config=experiments/configs/rlhf_sentiment.py --workdir=DIR`;
override any key on the command line, e.g. `--config.ppo.iterations=100`. PPO keys default to the
values published in the Baichuan 2 report through `ppo_trainer.default_ppo_config()`; this file
changes only the learning rate, batch and lengths to fit a 1.5M-parameter policy on 2 CPU cores.
"""

import ml_collections

from baichuan_jax.align import ppo_trainer


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  # Model preset shared by policy, reference, reward model and critic.
  c.model = "tiny"
  # Preset overrides (vocab_size defaults to the tokenizer's): a 1.5M-parameter policy (2 layers,
  # hidden 128) so that all four stages finish in about 8 minutes on an idle 2-core CPU. fp32
  # compute: bf16 matmuls are slow on CPU; the frozen models still run in ppo.frozen_dtype.
  c.model_overrides = ml_collections.ConfigDict({
      "num_layers": 2, "hidden_size": 128, "num_heads": 4, "num_kv_heads": 4,
      "intermediate_size": 384, "dtype": "float32", "max_seq_len": 256})
  # SentencePiece model path; "" trains one on the train-split reviews (cached in the workdir).
  c.tokenizer = ""
  # Vocabulary size of that trained tokenizer (Baichuan options and special ids).
  c.tokenizer_vocab_size = 4096
  # Reviews longer than this many characters are left out (keeps sequences short on CPU).
  c.max_review_chars = 120
  # Share of each label's reviews held out for evaluation.
  c.validation_fraction = 0.05
  # Seed of splits, pairs, initialisation and sampling.
  c.seed = 0
  # Sample generations written into the summaries.
  c.samples_shown = 8
  # Held-out review openings used to compare the policy before and after PPO.
  c.ppo_eval_prompts = 64

  # Stage 1: next-token pretraining of the policy on review text.
  c.pretrain = ml_collections.ConfigDict()
  # Optimizer steps.
  c.pretrain.steps = 300
  # Packed rows per step and their length.
  c.pretrain.batch_size = 8
  c.pretrain.seq_len = 128
  # Peak learning rate (cosine decay after warm-up) and warm-up steps.
  c.pretrain.lr = 2e-3
  c.pretrain.warmup_steps = 30

  # Stage 2: reward model (pretrained backbone + scalar head, pairwise loss).
  c.rm = ml_collections.ConfigDict()
  # Optimizer steps.
  c.rm.steps = 400
  # Pairs per step.
  c.rm.batch_size = 32
  # Tokens per scored sequence (<s> review </s>; longer reviews keep their first 46 tokens).
  c.rm.seq_len = 48
  # Peak learning rate and warm-up steps.
  c.rm.lr = 1e-3
  c.rm.warmup_steps = 15
  # Training pairs drawn from the train split, held-out pairs from the validation split.
  c.rm.train_pairs = 16000
  c.rm.eval_pairs = 512
  # Evaluate held-out accuracy every this many steps (and at the end).
  c.rm.eval_every = 100

  # Stage 3: PPO. Starts from the published Baichuan 2 values (350 iterations, critic warm-up 20,
  # clip 0.1, KL 0.2 -> 0.005, gradient clip 0.5); CPU-sized batch and lengths.
  c.ppo = ppo_trainer.default_ppo_config()
  # Learning rate: Baichuan 2's 5e-6 is for 7B/13B models. This 1.5M-parameter policy was
  # pretrained at 2e-3 (10x Baichuan's 2e-4), so PPO uses 10x the published rate as well.
  c.ppo.lr = 5e-5
  # Responses per iteration and sequences per optimizer step (two PPO steps per rollout batch,
  # so the second one is off-policy and the ratio clip can act).
  c.ppo.rollout_batch = 8
  c.ppo.minibatch = 4
  # Review opening given as the prompt (tokens incl. <s>) and the continuation length.
  c.ppo.prompt_len = 8
  c.ppo.max_new_tokens = 16

  # Stage 4: chat SFT on records built from the reviews.
  c.sft = ml_collections.ConfigDict()
  # Optimizer steps.
  c.sft.steps = 150
  # Packed rows per step and their length.
  c.sft.batch_size = 8
  c.sft.seq_len = 128
  # Peak learning rate and warm-up (LoRA tolerates a larger rate than full fine-tuning).
  c.sft.lr = 2e-3
  c.sft.warmup_steps = 20
  # Conversations built from the train split.
  c.sft.train_records = 12000
  # Train LoRA adapters (base frozen) instead of every weight.
  c.sft.use_lora = True
  c.sft.lora = ml_collections.ConfigDict()
  # Adapter rank, scale numerator (update = alpha / rank * A @ B), dropout and target modules.
  c.sft.lora.rank = 8
  c.sft.lora.alpha = 16.0
  c.sft.lora.dropout = 0.0
  c.sft.lora.targets = ("W_pack", "o_proj", "gate_proj", "up_proj", "down_proj")
  # Evaluation: held-out reviews to classify, prompt length, and reply lengths.
  c.sft.eval_records = 256
  c.sft.prompt_len = 96
  c.sft.class_tokens = 6
  c.sft.write_tokens = 48
  return c
