"""Baichuan / Baichuan 2 causal LM in torch for transformers (written by baichuan-jax).

The project's own implementation of the architecture, from its formulas:

* pre-norm decoder: `x = x + attn(rmsnorm(x)); x = x + mlp(rmsnorm(x))`, final RMSNorm (eps from
  the config), no biases, untied embedding and head;
* attention: q, k, v from one fused `W_pack` [3E, E] (rows q | k | v), `o_proj`; scores scaled by
  1/sqrt(head_dim); positions by RoPE (rotate-half, base `rope_theta`, 7B models) or ALiBi (bias
  `-slope_h * (i - j)`, 13B models; slopes `2^(-8k/n)` for a power-of-two n, else those of the
  lower power of two plus every other slope of the doubled set);
* SwiGLU MLP `down(silu(gate(x)) * up(x))`;
* Baichuan 2's NormHead: logits = h . (W / ||W||_row).

Norms, positions, attention softmax and the logits are computed in fp32 whatever the weight
dtype (the released bf16 ALiBi code keeps its mask and softmax in bf16). Baichuan-7B's classes
(`BaiChuanForCausalLM`) carry the persistent `rotary_emb.inv_freq` buffers of the released
checkpoints so its state dict loads strictly; the rotation itself is always computed from
`rope_theta`.
"""

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from .configuration_baichuan import BaiChuanConfig, BaichuanConfig


def _with_cache(cls, cache, **fields):
  """An output of `cls` carrying `cache` (transformers >= 5.2x names the field `cache`, earlier
  versions `past_key_values`)."""
  names = {f.name for f in dataclasses.fields(cls)}
  return cls(**fields, **({"cache": cache} if "cache" in names else {"past_key_values": cache}))


def alibi_slopes(n: int) -> torch.Tensor:
  """ALiBi head slopes [n] (fp32)."""
  def power_of_two(m):
    return [2.0 ** (-8.0 * k / m) for k in range(1, m + 1)]
  m = 2 ** int(math.floor(math.log2(n)))
  slopes = power_of_two(m)
  if m < n:
    slopes += power_of_two(2 * m)[0::2][: n - m]
  return torch.tensor(slopes, dtype=torch.float32)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
  a, b = x.chunk(2, dim=-1)
  return torch.cat((-b, a), dim=-1)


class RMSNorm(nn.Module):
  """RMSNorm in fp32, scaled by a learned weight."""

  def __init__(self, dim: int, eps: float):
    super().__init__()
    self.weight = nn.Parameter(torch.ones(dim))
    self.eps = eps

  def forward(self, x):
    x32 = x.float()
    y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
    return (y * self.weight.float()).to(x.dtype)


class RotaryEmbedding(nn.Module):
  """Holds Baichuan-7B's persistent `inv_freq` buffer (state-dict compatibility only)."""

  def __init__(self, head_dim: int, theta: float):
    super().__init__()
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    self.register_buffer("inv_freq", inv, persistent=True)


class Attention(nn.Module):
  """Fused-QKV multi-head attention with RoPE or ALiBi and an optional KV cache."""

  def __init__(self, config: BaichuanConfig, layer_idx: int):
    super().__init__()
    e, h = config.hidden_size, config.num_attention_heads
    self.heads, self.head_dim, self.layer_idx = h, e // h, layer_idx
    self.rope = config.position_embedding == "rope"
    self.theta = config.rope_theta
    self.W_pack = nn.Linear(e, 3 * e, bias=False)
    self.o_proj = nn.Linear(e, e, bias=False)
    if self.rope and config.persistent_inv_freq:
      self.rotary_emb = RotaryEmbedding(self.head_dim, config.rope_theta)

  def _rotate(self, x, positions):
    d = self.head_dim
    inv = 1.0 / (self.theta ** (torch.arange(0, d, 2, device=x.device, dtype=torch.float32) / d))
    freqs = positions.float()[..., None] * inv  # [batch, seq, d/2]
    emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # [batch, 1, seq, d]
    x32 = x.float()
    return (x32 * emb.cos() + rotate_half(x32) * emb.sin()).to(x.dtype)

  def forward(self, x, positions, key_positions, mask, cache):
    b, s, e = x.shape
    q, k, v = self.W_pack(x).split(e, dim=-1)
    q, k, v = (t.view(b, s, self.heads, self.head_dim).transpose(1, 2) for t in (q, k, v))
    if self.rope:
      q, k = self._rotate(q, positions), self._rotate(k, positions)
    if cache is not None:
      k, v = cache.update(k, v, self.layer_idx)
    # [batch, heads, q, k] fp32 scores
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) / math.sqrt(self.head_dim)
    if not self.rope:
      dist = (positions[:, :, None] - key_positions[:, None, :]).float()  # [batch, q, k]
      slopes = alibi_slopes(self.heads).to(x.device)
      scores = scores - slopes[None, :, None, None] * dist[:, None]
    scores = scores.masked_fill(~mask[:, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(v.dtype)
    out = torch.matmul(probs, v).transpose(1, 2).reshape(b, s, e)
    return self.o_proj(out)


class MLP(nn.Module):
  """SwiGLU feed-forward."""

  def __init__(self, config: BaichuanConfig):
    super().__init__()
    e, f = config.hidden_size, config.intermediate_size
    self.gate_proj = nn.Linear(e, f, bias=False)
    self.up_proj = nn.Linear(e, f, bias=False)
    self.down_proj = nn.Linear(f, e, bias=False)

  def forward(self, x):
    return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class BaichuanLayer(nn.Module):
  """One pre-norm decoder layer."""

  def __init__(self, config: BaichuanConfig, layer_idx: int):
    super().__init__()
    self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
    self.self_attn = Attention(config, layer_idx)
    self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
    self.mlp = MLP(config)

  def forward(self, x, positions, key_positions, mask, cache):
    x = x + self.self_attn(self.input_layernorm(x), positions, key_positions, mask, cache)
    return x + self.mlp(self.post_attention_layernorm(x))


class NormHead(nn.Module):
  """Baichuan 2's output head: rows of the weight L2-normalised, logits in fp32."""

  def __init__(self, hidden_size: int, vocab_size: int):
    super().__init__()
    self.weight = nn.Parameter(torch.empty(vocab_size, hidden_size))

  def forward(self, h):
    w = self.weight.float()
    return torch.matmul(h.float(), w.t()) / w.norm(dim=1)


class BaichuanPreTrainedModel(PreTrainedModel):
  """Weight init and the transformers class wiring shared by the Baichuan classes."""
  config_class = BaichuanConfig
  base_model_prefix = "model"
  _no_split_modules = ["BaichuanLayer"]
  supports_gradient_checkpointing = False

  def _init_weights(self, module):
    super()._init_weights(module)
    if isinstance(module, NormHead):
      nn.init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)


class BaichuanModel(BaichuanPreTrainedModel):
  """Embedding, decoder layers and the final norm."""

  def __init__(self, config: BaichuanConfig):
    super().__init__(config)
    self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
    self.layers = nn.ModuleList(BaichuanLayer(config, i) for i in range(config.num_hidden_layers))
    self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
    self.post_init()

  def get_input_embeddings(self):
    return self.embed_tokens

  def set_input_embeddings(self, value):
    self.embed_tokens = value

  def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
              inputs_embeds=None, use_cache=None, cache=None, **kwargs):
    past_key_values = cache if cache is not None else past_key_values
    x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
    b, s = x.shape[:2]
    use_cache = getattr(self.config, "use_cache", True) if use_cache is None else use_cache
    if use_cache and past_key_values is None:
      past_key_values = DynamicCache()
    past = past_key_values.get_seq_length() if past_key_values is not None else 0
    total = past + s
    key_positions = torch.arange(total, device=x.device)[None].expand(b, total)
    if attention_mask is None:
      attention_mask = torch.ones(b, total, dtype=torch.bool, device=x.device)
    keep = attention_mask[:, -total:].bool()  # [batch, total] padding mask
    if position_ids is None:
      # Left padding: count real tokens so the first one is position 0.
      position_ids = (keep.long().cumsum(-1) - 1).clamp(min=0)[:, past:]
    positions = position_ids
    key_pos = (keep.long().cumsum(-1) - 1).clamp(min=0) if not keep.all() else key_positions
    q_abs = torch.arange(past, total, device=x.device)
    causal = q_abs[:, None] >= torch.arange(total, device=x.device)[None, :]  # [q, k]
    mask = causal[None] & keep[:, None, :]
    for layer in self.layers:
      x = layer(x, positions, key_pos, mask, past_key_values if use_cache else None)
    return _with_cache(BaseModelOutputWithPast, past_key_values if use_cache else None,
                       last_hidden_state=self.norm(x))


class BaichuanForCausalLM(BaichuanPreTrainedModel, GenerationMixin):
  """Baichuan / Baichuan 2 causal LM (Baichuan-13B, Baichuan2-7B, Baichuan2-13B)."""

  def __init__(self, config: BaichuanConfig):
    super().__init__(config)
    self.model = BaichuanModel(config)
    if config.norm_head:
      self.lm_head = NormHead(config.hidden_size, config.vocab_size)
    else:
      self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
    self.post_init()

  def get_input_embeddings(self):
    return self.model.embed_tokens

  def set_input_embeddings(self, value):
    self.model.embed_tokens = value

  def get_output_embeddings(self):
    return self.lm_head

  def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
              inputs_embeds=None, labels=None, use_cache=None, logits_to_keep=0, cache=None,
              **kwargs):
    out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                     past_key_values=cache if cache is not None else past_key_values,
                     inputs_embeds=inputs_embeds, use_cache=use_cache)
    names = {f.name for f in dataclasses.fields(type(out))}
    kv = out.cache if "cache" in names else out.past_key_values
    h = out.last_hidden_state
    if logits_to_keep:
      h = h[:, -logits_to_keep:]
    logits = self.lm_head(h).float()
    loss = None
    if labels is not None:
      loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                             labels[:, 1:].reshape(-1), ignore_index=-100)
    return _with_cache(CausalLMOutputWithPast, kv, loss=loss, logits=logits)


class BaiChuanForCausalLM(BaichuanForCausalLM):
  """Baichuan-7B's causal LM (the released model spells the class `BaiChuan`)."""
  config_class = BaiChuanConfig
