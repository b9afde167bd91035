"""Alignment: SFT with assistant-only loss masks, LoRA, a pairwise reward model and PPO (RLHF).

Pure pieces live in `sft_data`, `preference`, `lora`, `reward` and `ppo`; the trainers reuse the
pretraining step and add only their loss, data and hooks.
"""

from baichuan_jax.align import lora, ppo, preference, records, reward, sft_data
from baichuan_jax.align.lora import LoRAConfig, apply_lora, init_lora, merge_lora
from baichuan_jax.align.records import BadRecord, ReadReport, RecordError

__all__ = ["BadRecord", "LoRAConfig", "ReadReport", "RecordError", "apply_lora", "init_lora",
           "lora", "merge_lora", "ppo", "preference", "records", "reward", "sft_data"]
