"""The Baichuan decoder: embedding, a scanned stack of pre-norm blocks, final norm and head."""

from __future__ import annotations

from typing import Optional

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name
import ml_collections

from baichuan_jax import configs
from baichuan_jax.model.attention import AttnContext, write_cache
from baichuan_jax.model import layers as layers_lib  # its trace-time switches
from baichuan_jax.model.layers import (MLP, Attention, RMSNorm, checked_decode_stack, dtype_of,
                                       head_logits)

REMAT_POLICIES = {
    "full": None,  # save nothing: recompute the whole block in the backward pass
    "save_dots": jax.checkpoint_policies.checkpoint_dots,
    "save_dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
    "save_attn_out": jax.checkpoint_policies.save_only_these_names("attn_out"),
}


@flax.struct.dataclass
class KVCache:
  """Pre-allocated key/value cache for every layer, plus the coordinates of each slot."""
  # One array per layer, each [batch, kv_heads, max_len, head_dim]: a decode step writes one slot
  # of each in place and attention reads it as it lies (a stacked [layers, ...] array would be
  # sliced and re-stacked, and a [batch, max_len, kv_heads, ...] layout transposed, every step).
  k: tuple  # of num_layers jax.Array
  v: tuple  # of num_layers jax.Array
  positions: jax.Array  # [batch, max_len] int32 position of the token in each slot
  segment_ids: jax.Array  # [batch, max_len] int32; 0 = empty slot or padding
  # The next slot to write: a scalar int32 (all rows in step, as `infer.generate` fills them), or
  # [batch] int32, one per row (`infer.engine`: each row a request of its own length).
  index: jax.Array


def init_cache(cfg: ml_collections.ConfigDict, batch: int, max_len: int,
               dtype: Optional[str] = None) -> KVCache:
  """An empty cache for `batch` rows of up to `max_len` tokens (dtype defaults to cfg.dtype)."""
  d = cfg.hidden_size // cfg.num_heads
  shape = (batch, cfg.num_kv_heads, max_len, d)
  dt = dtype_of(dtype or cfg.dtype)
  return KVCache(k=tuple(jnp.zeros(shape, dt) for _ in range(cfg.num_layers)),
                 v=tuple(jnp.zeros(shape, dt) for _ in range(cfg.num_layers)),
                 positions=jnp.zeros((batch, max_len), jnp.int32),
                 segment_ids=jnp.zeros((batch, max_len), jnp.int32),
                 index=jnp.zeros((), jnp.int32))


class DecoderLayer(nn.Module):
  """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x))."""
  config: ml_collections.ConfigDict

  @nn.compact
  def __call__(self, x: jax.Array, ctx: AttnContext, kv):
    cfg = self.config
    attn_out, kv = Attention(cfg, name="self_attn")(RMSNorm(cfg, name="input_layernorm")(x), ctx, kv)
    x = x + checkpoint_name(attn_out, "attn_out")
    x = x + MLP(cfg, name="mlp")(RMSNorm(cfg, name="post_attention_layernorm")(x))
    x = nn.with_logical_constraint(x, ("activation_batch", "activation_length", "activation_embed"))
    return x, kv


class BaichuanLM(nn.Module):
  """Baichuan / Baichuan 2 causal language model.

  `apply({"params": p}, tokens, positions=None, segment_ids=None)` returns fp32 logits
  [batch, seq, vocab]. With `cache=KVCache`, returns `(logits, new_cache)`: the tokens are written
  at `cache.index` and attend to every filled slot of their segment.

  `unroll_layers=True` applies the same stacked `layers` parameters in an unrolled Python loop
  (static per-layer slices) instead of the layer `nn.scan`. The parameter tree and the results are
  the same; it is for decoding, where a step reads every weight once and the scan's per-layer
  copy of the stacked weights costs more than the matmuls (7B on an H100: 14.2 ms per token
  scanned, 5.8 ms unrolled). Initialisation always goes through the scan. `layers.SCAN_LAYERS =
  False` unrolls every call with remat_policy "none" (training and scoring too).
  """
  config: ml_collections.ConfigDict
  unroll_layers: bool = False

  def setup(self):
    configs.validate(self.config)

  @nn.compact
  def __call__(self, tokens: jax.Array, positions: Optional[jax.Array] = None,
               segment_ids: Optional[jax.Array] = None, cache: Optional[KVCache] = None,
               return_hidden: bool = False):
    cfg = self.config
    ctx, cache = _context(tokens, positions, segment_ids, cache)
    embed = self.param("embed_tokens", nn.with_logical_partitioning(
        nn.initializers.normal(cfg.init_std), ("vocab", "embed")),
        (cfg.vocab_size, cfg.hidden_size), dtype_of(cfg.param_dtype))
    x = jnp.take(embed, tokens, axis=0).astype(dtype_of(cfg.dtype))
    x = nn.with_logical_constraint(x, ("activation_batch", "activation_length", "activation_embed"))

    kv = None if cache is None else (cache.k, cache.v)
    unroll = self.unroll_layers or (not layers_lib.SCAN_LAYERS and cfg.remat_policy == "none")
    if unroll and not self.is_initializing():
      x, kv = _unrolled_layers(cfg, self.get_variable("params", "layers"), x, ctx, kv)
    else:
      layer = DecoderLayer
      if cfg.remat_policy != "none":
        layer = nn.remat(layer, policy=REMAT_POLICIES[cfg.remat_policy], prevent_cse=False)
      stack = nn.scan(layer, variable_axes={"params": 0}, split_rngs={"params": True},
                      in_axes=(nn.broadcast, 0), length=cfg.num_layers,
                      metadata_params={nn.PARTITION_NAME: "layers"})
      # The scan takes the cache stacked over layers (a copy; prefill and training only).
      stacked = None if kv is None else (jnp.stack(kv[0]), jnp.stack(kv[1]))
      x, stacked = stack(cfg, name="layers")(x, ctx, stacked)
      if kv is not None:
        kv = tuple(tuple(a[i] for i in range(cfg.num_layers)) for a in stacked)
    x = RMSNorm(cfg, name="norm")(x)
    head = self.param("lm_head", nn.with_logical_partitioning(
        nn.initializers.normal(cfg.init_std), ("embed", "vocab")),
        (cfg.hidden_size, cfg.vocab_size), dtype_of(cfg.param_dtype))
    out = x if return_hidden else head_logits(x, head, cfg.norm_head)
    if cache is None:
      return out
    n = tokens.shape[1]
    return out, cache.replace(k=kv[0], v=kv[1], index=cache.index + n)


def _unrolled_layers(cfg, stacked, x, ctx, kv):
  """The decoder stack as a Python loop over static slices of the stacked layer parameters.

  `stacked` is the `layers` subtree ([layers, ...] leaves; quantized weights slice the same way),
  `kv` the (k, v) cache, tuples of per-layer arrays, or None.
  """
  if stacked is None:
    raise ValueError("unroll_layers=True needs the model's `layers` parameters")
  per_layer = _is_split(stacked)
  layer = DecoderLayer(cfg, parent=None)  # unbound: applied to explicit per-layer parameters

  def run(ctx):
    h = x
    ks, vs = ([], []) if kv is None else (list(kv[0]), list(kv[1]))
    for i in range(cfg.num_layers):
      params_i = (stacked[f"{SPLIT_PREFIX}{i}"] if per_layer
                  else jax.tree.map(lambda a, i=i: a[i], stacked))
      kv_i = None if kv is None else (ks[i], vs[i])
      h, kv_i = layer.apply({"params": params_i}, h, ctx, kv_i)
      if kv is not None:
        ks[i], vs[i] = kv_i
    return h, (None if kv is None else (tuple(ks), tuple(vs)))

  if kv is None:
    return run(ctx)
  # a decode step checks its cache's spans once for the whole stack, not once per layer
  return checked_decode_stack(cfg, ctx, kv[0][0], x.shape[1], run)


SPLIT_PREFIX = "layer_"


def _is_split(layers) -> bool:
  return isinstance(layers, dict) and f"{SPLIT_PREFIX}0" in layers


def split_layers(params: dict) -> dict:
  """`params` with the stacked `layers` subtree replaced by per-layer copies
  (`{"layer_0": ..., "layer_1": ...}`), which only `BaichuanLM(cfg, unroll_layers=True)` reads.

  For a decode loop that runs on the device: slicing layer i out of the stacked weights inside the
  loop copies it on every token on the CPU (XLA does not fuse the slice into the matmul), so the
  copies are made once, before the loop. Costs one extra copy of the layer weights while it lives.
  """
  if _is_split(params["layers"]):
    return params
  stacked = params["layers"]
  n = jax.tree.leaves(stacked)[0].shape[0]
  out = dict(params)
  out["layers"] = {f"{SPLIT_PREFIX}{i}": jax.tree.map(lambda a, i=i: a[i], stacked)
                   for i in range(n)}
  return out


def _context(tokens, positions, segment_ids, cache):
  """Builds the AttnContext (and the cache with this step's coordinates written in)."""
  b, s = tokens.shape
  if segment_ids is None:
    segment_ids = jnp.ones((b, s), jnp.int32)
  if positions is None:
    start = jnp.zeros((), jnp.int32) if cache is None else cache.index
    positions = jnp.broadcast_to(start[..., None] + jnp.arange(s, dtype=jnp.int32), (b, s))
  positions = positions.astype(jnp.int32)
  segment_ids = segment_ids.astype(jnp.int32)
  if cache is None:
    idx = jnp.arange(s, dtype=jnp.int32)
    return AttnContext(positions, segment_ids, idx, positions, segment_ids, idx), None
  cache = cache.replace(positions=write_cache(cache.positions, positions, cache.index, 1),
                        segment_ids=write_cache(cache.segment_ids, segment_ids, cache.index, 1))
  # [q_len], or [batch, q_len] with one cache index per row.
  q_idx = cache.index[..., None] + jnp.arange(s, dtype=jnp.int32)
  k_idx = jnp.arange(cache.positions.shape[1], dtype=jnp.int32)
  ctx = AttnContext(positions, segment_ids, q_idx, cache.positions, cache.segment_ids, k_idx,
                    cache.index)
  return ctx, cache


def init_params(cfg: ml_collections.ConfigDict, rng: jax.Array, seq_len: int = 8):
  """Initialised fp32 (param_dtype) parameters as a plain pytree (logical-axis boxes removed)."""
  tokens = jnp.zeros((1, seq_len), jnp.int32)
  return nn.meta.unbox(BaichuanLM(cfg).init(rng, tokens)["params"])


def param_logical_axes(cfg: ml_collections.ConfigDict):
  """Pytree of logical axis-name tuples matching `init_params`, computed from abstract shapes."""
  tokens = jnp.zeros((1, 8), jnp.int32)
  boxed = jax.eval_shape(lambda: BaichuanLM(cfg).init(jax.random.PRNGKey(0), tokens))["params"]
  return nn.get_partition_spec(boxed)
