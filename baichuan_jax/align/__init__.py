"""Alignment: SFT with assistant-only loss masks, LoRA, a pairwise reward model and PPO (RLHF).

Pure pieces live in `sft_data`, `preference`, `lora`, `reward` and `ppo`; `rollout` samples with the
KV-cache generator of `baichuan_jax.infer`. The trainers (`engine`, `trainers`, `ppo_trainer`) reuse
the pretraining step of `baichuan_jax.train` and add only their loss, data and hooks; `recipes` runs
chat SFT from a config and `sentiment` is the end-to-end RLHF experiment on real reviews. Import
those modules directly (they pull in the training engine). See docs/alignment.md.
"""

from baichuan_jax.align import lora, ppo, preference, records, reward, sft_data
from baichuan_jax.align.lora import LoRAConfig, apply_lora, init_lora, merge_lora
from baichuan_jax.align.records import BadRecord, ReadReport, RecordError

__all__ = ["BadRecord", "LoRAConfig", "ReadReport", "RecordError", "apply_lora", "init_lora",
           "lora", "merge_lora", "ppo", "preference", "records", "reward", "sft_data"]
