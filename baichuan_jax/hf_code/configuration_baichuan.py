"""Baichuan / Baichuan 2 model config for transformers (written by baichuan-jax).

One config class for the four families. Besides the fields the released configs carry, it holds
`position_embedding` ("rope" for the 7B models, "alibi" for the 13B models), `norm_head`
(Baichuan 2's normalised output head) and `rope_theta`, so the model code never guesses them.
"""

from transformers import PretrainedConfig


class BaichuanConfig(PretrainedConfig):
  """Config of `BaichuanForCausalLM` (Baichuan-13B, Baichuan2-7B, Baichuan2-13B and tiny models)."""
  model_type = "baichuan"
  keys_to_ignore_at_inference = ["past_key_values"]
  persistent_inv_freq = False  # Baichuan-7B stores rotary_emb.inv_freq in its state dict

  def __init__(self, vocab_size=64000, hidden_size=4096, intermediate_size=11008,
               num_hidden_layers=32, num_attention_heads=32, hidden_act="silu",
               max_position_embeddings=4096, model_max_length=4096, initializer_range=0.02,
               rms_norm_eps=1e-6, use_cache=True, pad_token_id=0, bos_token_id=1, eos_token_id=2,
               tie_word_embeddings=False, position_embedding="rope", norm_head=False,
               rope_theta=10000.0, z_loss_weight=0.0, **kwargs):
    if position_embedding not in ("rope", "alibi"):
      raise ValueError(f"position_embedding={position_embedding!r} is invalid: allowed 'rope', 'alibi'")
    if hidden_act != "silu":
      raise ValueError(f"hidden_act={hidden_act!r} is invalid: Baichuan uses 'silu'")
    self.vocab_size = vocab_size
    self.hidden_size = hidden_size
    self.intermediate_size = intermediate_size
    self.num_hidden_layers = num_hidden_layers
    self.num_attention_heads = num_attention_heads
    self.hidden_act = hidden_act
    self.max_position_embeddings = max_position_embeddings
    self.model_max_length = model_max_length
    self.initializer_range = initializer_range
    self.rms_norm_eps = rms_norm_eps
    self.use_cache = use_cache
    self.position_embedding = position_embedding
    self.norm_head = bool(norm_head)
    self.rope_theta = float(rope_theta)
    self.z_loss_weight = z_loss_weight
    super().__init__(pad_token_id=pad_token_id, bos_token_id=bos_token_id,
                     eos_token_id=eos_token_id, tie_word_embeddings=tie_word_embeddings, **kwargs)


class BaiChuanConfig(BaichuanConfig):
  """Baichuan-7B's config (the released model spells the class `BaiChuan`)."""
  persistent_inv_freq = True
