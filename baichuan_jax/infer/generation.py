"""Batched autoregressive generation on the model's pre-allocated KV cache.

Layout of one call (`generate`):

1. Prompts are left-padded to a common length P (rounded up to `pad_multiple`, so nearby lengths
   share one compilation). Padding slots get segment id 0 and real tokens segment 1, so attention
   never reads padding; positions count from 0 inside each real prompt, so RoPE phases and ALiBi
   distances are those of an unpadded prompt.
2. A jitted prefill runs the prompt through `BaichuanLM` with `cache=init_cache(cfg, B, P + N)`,
   takes the final-norm hidden state of the last slot only (the [B, P, vocab] logits are never
   built) and picks the first new token.
3. Decoding runs single-token steps: feed the previous token at its position, pick the next one
   (`sampling.next_token`), stop a row on a stop token or its `max_new_tokens`, until every row is
   done. On GPUs and TPUs the loop is on the host, one jitted step per token dispatched
   asynchronously, with the layers unrolled over static slices of the stacked weights (done rows
   are checked every `DONE_CHECK_EVERY` steps); on the CPU it is one `lax.while_loop` over the
   unrolled layers with per-layer weight copies made before the loop (`Generator` says why).
   The KV cache holds one `[batch, kv_heads, max_len, head_dim]` array per layer, written one
   slot per step in place. All shapes are static: the cache, the [B, N] output
   buffer and the [B, vocab] "token seen" mask for the repetition penalty are allocated once;
   one compilation serves every token and every prompt of the same (B, P, N).

Streaming and stop strings run on the host: the decode runs a few tokens at a time (one token
when streaming; the device loop takes the step limit as a traced argument, so this does not
recompile); after each chunk the host hands the new tokens and their text to the callback,
looks for stop strings in the decoded text, and marks finished rows done in the device state.

Sharding: with `mesh=...` the parameters are placed with the logical-axis rules of
`baichuan_jax.sharding` (heads, kv_heads, mlp and vocab over the `model` axis: Megatron tensor
parallelism), the KV cache is sharded over kv heads the same way, and the model's activation
constraints apply; XLA inserts the collectives.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Callable, Optional, Sequence, Union

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from baichuan_jax.infer import quant
from baichuan_jax.infer.sampling import next_token
from baichuan_jax.model import BaichuanLM, KVCache, init_cache
from baichuan_jax.model.transformer import split_layers

# finish_reason codes in the device state.
RUNNING, STOPPED, LENGTH = 0, 1, 2
FINISH_NAMES = {STOPPED: "stop", LENGTH: "length"}


@dataclasses.dataclass
class Completion:
  """One generated continuation."""
  tokens: list  # generated ids; stop tokens and text after a stop string are not included
  finish_reason: str  # "stop" (stop token or stop string) or "length"
  text: Optional[str] = None  # decoded continuation (when a decode function was given)
  prompt_tokens: int = 0


@dataclasses.dataclass
class StreamEvent:
  """What the streaming callback receives for every new token of a row."""
  row: int  # index of the prompt
  token: int  # the new token id
  text: str  # newly safe-to-show text ('' while a multi-byte character or stop string is pending)
  finish_reason: Optional[str] = None  # set on the row's last event


@flax.struct.dataclass
class DecodeState:
  """Device state carried by the decode loop."""
  cache: KVCache
  out: jax.Array  # [batch, max_new] int32 generated tokens (pad after the end)
  last: jax.Array  # [batch] int32 token to feed next
  pos: jax.Array  # [batch] int32 position of `last` in its row
  lengths: jax.Array  # [batch] int32 tokens generated per row
  present: jax.Array  # [batch, vocab] bool tokens seen (prompt + generated)
  done: jax.Array  # [batch] bool
  finish: jax.Array  # [batch] int32 RUNNING / STOPPED / LENGTH
  step: jax.Array  # scalar int32 tokens generated so far (max over rows)


@flax.struct.dataclass
class RowParams:
  """Per-row generation settings, [batch] each (stop_ids [batch, n_stop], -1 = unused)."""
  temperature: jax.Array
  top_k: jax.Array
  top_p: jax.Array
  repetition_penalty: jax.Array
  max_new: jax.Array
  stop_ids: jax.Array
  seeds: jax.Array


def forward_last(cfg, params, tokens, positions, segment_ids, cache, unroll=False, last=None):
  """Runs the model on `tokens` and returns fp32 logits of the last slot and the new cache.

  `last` ([batch] int32, optional) picks another slot per row than the final one (right-padded
  prompts: the slot of the last real token).

  `unroll=True` (the decode step) runs the layers as an unrolled loop over static slices of the
  stacked weights rather than the layer scan, which copies each layer's weights before using them
  (see `BaichuanLM.unroll_layers`).
  """
  dtype = jnp.dtype(cfg.dtype)
  p = dict(params)
  p["embed_tokens"] = quant.embedding_table(params["embed_tokens"], dtype)
  head = params["lm_head"]
  if quant.is_quantized(head):
    # The head is applied below, outside the model (to the last slot only); the model only
    # declares it. The unused placeholder is removed by XLA's dead-code elimination.
    p["lm_head"] = jnp.zeros((cfg.hidden_size, cfg.vocab_size), dtype)
  hidden, cache = BaichuanLM(cfg, unroll_layers=unroll).apply(
      {"params": p}, tokens, positions=positions, segment_ids=segment_ids, cache=cache,
      return_hidden=True)
  hidden = hidden[:, -1] if last is None else hidden[jnp.arange(hidden.shape[0]), last]
  return quant.head_matmul(hidden, head, cfg.norm_head), cache


_forward_last = forward_last  # the name tests/test_kernels_decode_wiring.py uses


def _pick(cfg, logits, state_present, step, rows: RowParams, do_sample):
  keys = jax.vmap(lambda s: jax.random.fold_in(jax.random.PRNGKey(s), step))(rows.seeds)
  return next_token(logits, state_present, keys, rows.temperature, rows.top_k, rows.top_p,
                    rows.repetition_penalty, do_sample,
                    use_kernels=cfg.attention_impl == "pallas")


def _advance(cfg, state: DecodeState, tok, rows: RowParams) -> DecodeState:
  """Records `tok` for the rows still running and updates their done / finish flags."""
  b = tok.shape[0]
  tok = jnp.where(state.done, cfg.pad_id, tok)
  running = ~state.done
  out = jax.lax.dynamic_update_slice_in_dim(state.out, tok[:, None], state.step, 1)
  lengths = state.lengths + running.astype(jnp.int32)
  is_stop = running & jnp.any(tok[:, None] == rows.stop_ids, axis=-1)
  at_len = running & ~is_stop & (lengths >= rows.max_new)
  finish = jnp.where(is_stop, STOPPED, jnp.where(at_len, LENGTH, state.finish))
  present = state.present.at[jnp.arange(b), tok].set(state.present[jnp.arange(b), tok] | running)
  return state.replace(out=out, last=tok, pos=state.pos + 1, lengths=lengths, present=present,
                       done=state.done | is_stop | at_len, finish=finish, step=state.step + 1)


def _prefill(cfg, do_sample, params, tokens, positions, segment_ids, rows: RowParams,
             max_new: int, cache_len: int):
  b, _ = tokens.shape
  cache = init_cache(cfg, b, cache_len)
  logits, cache = forward_last(cfg, params, tokens, positions, segment_ids, cache)
  # [batch, vocab] prompt tokens (padding excluded) for the repetition penalty.
  present = jnp.zeros((b, cfg.vocab_size), jnp.int32)
  present = present.at[jnp.arange(b)[:, None], tokens].add((segment_ids > 0).astype(jnp.int32)) > 0
  state = DecodeState(
      cache=cache, out=jnp.full((b, max_new), cfg.pad_id, jnp.int32),
      last=jnp.zeros((b,), jnp.int32), pos=jnp.max(positions, axis=1),
      lengths=jnp.zeros((b,), jnp.int32), present=present,
      done=rows.max_new <= 0, finish=jnp.where(rows.max_new <= 0, LENGTH, RUNNING),
      step=jnp.zeros((), jnp.int32))
  tok = _pick(cfg, logits, present, state.step, rows, do_sample)
  return _advance(cfg, state, tok, rows)


def _step(cfg, do_sample, params, state: DecodeState, rows: RowParams) -> DecodeState:
  """One decode step for every row: feed the last token, pick and record the next one."""
  seg = jnp.ones_like(state.last)[:, None]
  logits, cache = forward_last(cfg, params, state.last[:, None], state.pos[:, None], seg,
                                state.cache, unroll=True)
  state = state.replace(cache=cache)
  tok = _pick(cfg, logits, state.present, state.step, rows, do_sample)
  return _advance(cfg, state, tok, rows)


def _decode(cfg, do_sample, params, state: DecodeState, rows: RowParams, limit):
  """The device loop: single-token steps (unrolled layers) in one `lax.while_loop` until every
  row is done, the buffer is full, or `limit` tokens exist."""
  max_new = state.out.shape[1]
  layer_bytes = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(params["layers"]))
  if layer_bytes <= SPLIT_LAYERS_MAX_BYTES:
    params = split_layers(params)  # per-layer weight copies made once, not on every token

  def cond(s):
    return (s.step < jnp.minimum(limit, max_new)) & ~jnp.all(s.done)

  def body(s):
    seg = jnp.ones_like(s.last)[:, None]
    logits, cache = forward_last(cfg, params, s.last[:, None], s.pos[:, None], seg, s.cache,
                                  unroll=True)
    s = s.replace(cache=cache)
    tok = _pick(cfg, logits, s.present, s.step, rows, do_sample)
    return _advance(cfg, s, tok, rows)

  return jax.lax.while_loop(cond, body, state)


DECODE_LOOPS = ("host", "device")

# The device loop copies the stacked layer weights into per-layer arrays once before decoding
# when they take at most this many bytes (the copy lives for the call); larger models slice the
# stacked weights inside the loop, paying a copy per token instead of the memory.
SPLIT_LAYERS_MAX_BYTES = 2 << 30


def default_decode_loop() -> str:
  """"device" on the CPU backend, "host" on GPUs and TPUs (see `Generator`)."""
  return "device" if jax.default_backend() == "cpu" else "host"


# The host loop asks the device whether every row is done once per this many steps (a sync
# each step would stall the asynchronous dispatch); steps after that are no-ops on the result.
DONE_CHECK_EVERY = 8


class Generator:
  """Compiled prefill/decode functions for one model config (and optional mesh), reused across calls.

  Two decode loops give the same tokens:

  * "host": one jitted single-token step per token, dispatched from Python, with the layers
    unrolled over static slices of the stacked weights. On a GPU this reads each weight once per
    token; XLA copies the slices whenever the step sits inside a device loop, which made the
    "device" loop 2x slower for 7B on an H100 (docs/gpu.md). The default on GPUs and TPUs.
  * "device": the whole decode in one `lax.while_loop`, the layers unrolled over per-layer weight
    copies made once before the loop (`split_layers`, up to `SPLIT_LAYERS_MAX_BYTES`). Without
    per-token dispatch it is faster on the CPU (tiny preset: 856 vs 357 tokens/s at batch 1,
    3,142 vs 1,488 at batch 16; docs/inference.md). The default on the CPU.
  """

  def __init__(self, cfg: ml_collections.ConfigDict, mesh=None, rules=None,
               decode_loop: Optional[str] = None):
    self.cfg = cfg
    self.mesh = mesh
    self.rules = rules
    self.decode_loop = decode_loop or default_decode_loop()
    if self.decode_loop not in DECODE_LOOPS:
      raise ValueError(f"decode_loop={decode_loop!r} is invalid: allowed {DECODE_LOOPS}")
    self._prefill = jax.jit(functools.partial(_prefill, cfg), static_argnums=(0, 6, 7))
    # The decode state (KV cache included) is updated in place where the backend supports
    # donation (the CPU backend ignores it with a warning, so it is not requested there).
    donate = () if jax.default_backend() == "cpu" else (2,)
    self._step = jax.jit(functools.partial(_step, cfg), static_argnums=(0,),
                         donate_argnums=donate)
    self._decode = jax.jit(functools.partial(_decode, cfg), static_argnums=(0,),
                           donate_argnums=donate)

  def _ctx(self):
    stack = contextlib.ExitStack()
    if self.mesh is not None:
      stack.enter_context(jax.set_mesh(self.mesh))
      stack.enter_context(nn.logical_axis_rules(self.rules))
    return stack

  def prefill(self, params, tokens, positions, segment_ids, rows, max_new, cache_len, do_sample):
    with self._ctx():
      state = self._prefill(do_sample, params, tokens, positions, segment_ids, rows, max_new,
                            cache_len)
      if self.mesh is not None:
        state = state.replace(cache=jax.device_put(
            state.cache, _cache_sharding(self.cfg, self.mesh, self.rules)))
      return state

  def decode(self, params, state, rows, limit, do_sample):
    """Runs single-token steps until `limit` tokens exist, the buffer is full or all rows are done.

    With the host loop, steps after every row is done (at most `DONE_CHECK_EVERY - 1`) record
    nothing: each row's tokens end at its `lengths`.
    """
    if self.decode_loop == "device":
      with self._ctx():
        return self._decode(do_sample, params, state, rows, jnp.asarray(limit, jnp.int32))
    step, stop = int(state.step), min(int(limit), state.out.shape[1])
    with self._ctx():
      while step < stop:
        state = self._step(do_sample, params, state, rows)
        step += 1
        if step % DONE_CHECK_EVERY == 0 and step < stop and bool(jnp.all(state.done)):
          break
    return state


def _cache_sharding(cfg, mesh, rules):
  from baichuan_jax import sharding  # pylint: disable=import-outside-toplevel
  # [batch, kv_heads, len, head_dim] per layer; positions / segment ids [batch, len].
  kv = (sharding.logical_spec("activation_batch", "activation_kv_heads", "activation_length",
                              "kv"),) * cfg.num_layers
  coord = sharding.logical_spec("activation_batch", "activation_length")
  logical = KVCache(k=kv, v=kv, positions=coord, segment_ids=coord, index=sharding.logical_spec())
  return sharding.logical_to_sharding(logical, mesh, rules)


_GENERATORS: dict = {}


def get_generator(cfg, mesh=None, decode_loop: Optional[str] = None) -> Generator:
  """A cached `Generator` for (cfg, mesh, decode loop) so repeated calls reuse compiled functions."""
  decode_loop = decode_loop or default_decode_loop()
  key = (cfg.to_json(), id(mesh), decode_loop)
  if key not in _GENERATORS:
    rules = None
    if mesh is not None:
      from baichuan_jax import sharding  # pylint: disable=import-outside-toplevel
      rules = sharding.logical_axis_rules(0, "params")
    _GENERATORS[key] = Generator(cfg, mesh, rules, decode_loop)
  return _GENERATORS[key]


def shard_params(cfg, params, mesh):
  """Places `params` on `mesh` with the tensor-parallel logical-axis rules (ZeRO stage 0)."""
  from baichuan_jax import sharding  # pylint: disable=import-outside-toplevel
  shardings = sharding.param_shardings(cfg, mesh, zero_stage=0)
  return jax.tree.map(jax.device_put, params, shardings)


def _per_row(name, value, n, cast, check=None):
  vals = list(value) if isinstance(value, (list, tuple, np.ndarray)) else [value] * n
  if len(vals) != n:
    raise ValueError(f"{name}: {len(vals)} values for {n} prompts")
  out = []
  for i, v in enumerate(vals):
    v = cast(v)
    if check is not None:
      msg = check(v)
      if msg:
        raise ValueError(f"{name}={v!r} (prompt {i}) is invalid: {msg}")
    out.append(v)
  return out


def _round_up(x: int, m: int) -> int:
  return max(m, -(-x // m) * m)


def generate(cfg: ml_collections.ConfigDict, params, prompts: Sequence[Sequence[int]], *,
             max_new_tokens: Union[int, Sequence[int]] = 128,
             temperature: Union[float, Sequence[float]] = 0.0,
             top_k: Union[int, Sequence[int]] = 0,
             top_p: Union[float, Sequence[float]] = 1.0,
             repetition_penalty: Union[float, Sequence[float]] = 1.0,
             stop_token_ids: Optional[Sequence] = None,
             stop_strings: Optional[Sequence] = None,
             decode: Optional[Callable[[list], str]] = None,
             seed: Union[int, Sequence[int]] = 0,
             stream: Optional[Callable[[StreamEvent], None]] = None,
             mesh=None, pad_multiple: int = 16, max_len: Optional[int] = None,
             decode_loop: Optional[str] = None) -> list[Completion]:
  """Generates continuations of a batch of token prompts.

  Args:
    cfg: model config (`BaichuanLM(cfg)`).
    params: the model parameters (plain, quantized with `infer.quant`, and/or sharded).
    prompts: B lists of token ids (different lengths allowed; each non-empty).
    max_new_tokens: per prompt or one value; the number of tokens to generate at most.
    temperature: 0 = greedy; > 0 samples.
    top_k: 0 = off. top_p: 1 = off. repetition_penalty: 1 = off (HF semantics, see `sampling`).
    stop_token_ids: one list for all prompts or B lists; generation of a row ends when it emits
      one (default: [cfg.eos_id]). The stop token is not part of the returned tokens.
    stop_strings: one list for all or B lists; checked on the decoded text (requires `decode`).
      The text is cut before the stop string, and the tokens after the one completing it dropped.
    decode: token ids -> text (e.g. `Tokenizer.decode`); enables `Completion.text`.
    seed: per prompt or one value; row i samples with PRNGKey(seed_i) folded with the step.
    stream: called with a `StreamEvent` for every new token of every row, in order.
    mesh: a `jax.sharding.Mesh` for tensor-parallel inference (params are placed on it when they
      are not already sharded).
    pad_multiple: prompt length and new-token buffer are rounded up to a multiple of this to
      reuse compilations across calls.
    max_len: cache length override (default: padded prompt length + max new tokens).
    decode_loop: "host" (a jitted step per token, layers unrolled) or "device" (one
      `lax.while_loop`); default "device" on the CPU and "host" elsewhere (see `Generator`).
  Returns:
    B `Completion`s in prompt order.
  Raises:
    ValueError: empty prompts, out-of-range settings, a prompt plus max_new_tokens beyond
      cfg.max_seq_len, stop strings without `decode`.
  """
  b = len(prompts)
  if b == 0:
    return []
  prompts = [list(map(int, p)) for p in prompts]
  rows, max_new, stops = _row_params(cfg, prompts, max_new_tokens, temperature, top_k, top_p,
                                     repetition_penalty, seed, stop_token_ids, stop_strings)
  if any(stops) and decode is None:
    raise ValueError("stop_strings need a decode function (token ids -> text)")
  # The output buffer is rounded up too (rows still stop at their own max_new_tokens), so
  # requests with nearby lengths share one compilation.
  n_new = _round_up(max(1, max(max_new)), pad_multiple)
  plen = _round_up(max(len(p) for p in prompts), pad_multiple)
  cache_len = max_len or plen + n_new
  if cache_len < plen + n_new:
    raise ValueError(f"max_len={max_len} is too small for {plen} padded prompt tokens plus "
                     f"{n_new} new tokens")
  do_sample = bool(np.any(np.asarray(rows.temperature) > 0))
  if decode_loop is not None and decode_loop not in DECODE_LOOPS:
    raise ValueError(f"decode_loop={decode_loop!r} is invalid: allowed {DECODE_LOOPS}")
  gen = get_generator(cfg, mesh, decode_loop)
  if mesh is not None and not _is_sharded(params):
    params = shard_params(cfg, params, mesh)
  tokens, positions, segs = _left_pad(cfg, prompts, plen)
  state = gen.prefill(params, tokens, positions, segs, rows, n_new, cache_len, do_sample)
  host = _HostRows(prompts, stops, decode, stream)
  chunk = 1 if stream is not None else (16 if any(stops) else n_new)
  return _decode_chunks(gen, params, state, rows, host, chunk, n_new, do_sample,
                        [len(p) for p in prompts])


def _row_params(cfg, prompts, max_new_tokens, temperature, top_k, top_p, repetition_penalty,
                seed, stop_token_ids, stop_strings):
  """Checks the per-prompt settings; returns (RowParams, max_new list, stop-string lists)."""
  b = len(prompts)
  for i, p in enumerate(prompts):
    if not p:
      raise ValueError(f"prompt {i} is empty: at least one token is needed")
    bad = [t for t in p if not 0 <= t < cfg.vocab_size]
    if bad:
      raise ValueError(f"prompt {i} has token id {bad[0]} outside the vocabulary [0, {cfg.vocab_size})")
  max_new = _per_row("max_new_tokens", max_new_tokens, b, int,
                     lambda v: None if v >= 0 else "must be >= 0")
  temps = _per_row("temperature", temperature, b, float,
                   lambda v: None if 0 <= v <= 100 else "must be in [0, 100]")
  top_ks = _per_row("top_k", top_k, b, int, lambda v: None if v >= 0 else "must be >= 0")
  top_ps = _per_row("top_p", top_p, b, float,
                    lambda v: None if 0 < v <= 1 else "must be in (0, 1]")
  reps = _per_row("repetition_penalty", repetition_penalty, b, float,
                  lambda v: None if v > 0 else "must be > 0")
  seeds = _per_row("seed", seed, b, int)
  stop_ids = _row_lists(stop_token_ids, b, [cfg.eos_id])
  stops = _row_lists(stop_strings, b, [])
  for i, (p, n) in enumerate(zip(prompts, max_new)):
    if len(p) + n > cfg.max_seq_len:
      raise ValueError(f"prompt {i}: {len(p)} prompt tokens + max_new_tokens={n} exceed the "
                       f"model context max_seq_len={cfg.max_seq_len}")
  n_stop = max(1, max(len(s) for s in stop_ids))
  stop_arr = np.full((b, n_stop), -1, np.int32)
  for i, s in enumerate(stop_ids):
    stop_arr[i, :len(s)] = s
  rows = RowParams(temperature=jnp.asarray(temps, jnp.float32), top_k=jnp.asarray(top_ks, jnp.int32),
                   top_p=jnp.asarray(top_ps, jnp.float32),
                   repetition_penalty=jnp.asarray(reps, jnp.float32),
                   max_new=jnp.asarray(max_new, jnp.int32), stop_ids=jnp.asarray(stop_arr),
                   seeds=jnp.asarray(seeds, jnp.uint32))
  return rows, max_new, stops


def _left_pad(cfg, prompts, plen):
  """[B, plen] tokens, positions (from 0 inside each prompt) and segment ids (0 = padding)."""
  b = len(prompts)
  tokens = np.full((b, plen), cfg.pad_id, np.int32)
  positions = np.zeros((b, plen), np.int32)
  segs = np.zeros((b, plen), np.int32)
  for i, p in enumerate(prompts):
    tokens[i, plen - len(p):] = p
    positions[i, plen - len(p):] = np.arange(len(p))
    segs[i, plen - len(p):] = 1
  return jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(segs)


def _decode_chunks(gen, params, state, rows, host, chunk, n_new, do_sample, prompt_lens):
  """Decodes `chunk` tokens at a time, handing each chunk to `host` (stops, streaming)."""
  b = len(prompt_lens)
  seen = 0
  while True:
    out, lengths, finish, done, step = jax.device_get(
        (state.out, state.lengths, state.finish, state.done, state.step))
    newly_done = host.consume(out, lengths, finish, seen, int(step))
    seen = int(step)
    if newly_done:
      mask = np.zeros((b,), bool)
      mask[newly_done] = True
      state = state.replace(done=state.done | jnp.asarray(mask),
                            finish=jnp.where(jnp.asarray(mask), STOPPED, state.finish))
      done = np.asarray(done) | mask
    if bool(np.all(done | host.finished)) or seen >= n_new:
      break
    state = gen.decode(params, state, rows, seen + chunk, do_sample)
  return host.results(out, lengths, finish, prompt_lens)


def _is_sharded(params) -> bool:
  leaves = jax.tree.leaves(params)
  return bool(leaves) and all(isinstance(getattr(x, "sharding", None), jax.sharding.NamedSharding)
                              for x in leaves)


def _row_lists(value, b, default):
  if value is None:
    return [list(default) for _ in range(b)]
  value = list(value)
  if value and all(isinstance(v, (list, tuple)) for v in value):
    if len(value) != b:
      raise ValueError(f"{len(value)} stop lists for {b} prompts")
    return [list(v) for v in value]
  return [list(value) for _ in range(b)]


class _HostRows:
  """Host-side bookkeeping: incremental text, stop strings and streaming events per row."""

  def __init__(self, prompts, stops, decode, stream):
    self.stops, self.decode, self.stream = stops, decode, stream
    b = len(prompts)
    self.finished = np.zeros((b,), bool)  # ended by a stop string
    self.cut = [None] * b  # (n_tokens, text) for rows ended by a stop string
    self.emitted = [""] * b  # text already handed to the stream

  def _text(self, toks):
    return self.decode(list(map(int, toks))) if self.decode is not None else ""

  def consume(self, out, lengths, finish, start, step) -> list[int]:
    """Handles tokens [start, step) of every row; returns rows newly ended by a stop string."""
    ended = []
    for i in range(out.shape[0]):
      if self.finished[i]:
        continue
      n_i = int(lengths[i])
      for t in range(start, min(step, n_i)):
        final = (t == n_i - 1) and finish[i] != RUNNING
        hit = self._check_stop(i, out[i, :t + 1])
        if hit is not None:
          self.finished[i], self.cut[i] = True, (t + 1, hit)
          ended.append(i)
          self._emit(i, int(out[i, t]), hit, "stop")
          break
        stop_tok = final and finish[i] == STOPPED
        visible = out[i, :t] if stop_tok else out[i, :t + 1]
        text = self._text(visible) if self.decode is not None else ""
        reason = FINISH_NAMES.get(int(finish[i])) if final else None
        self._emit(i, int(out[i, t]), text if final else self._safe(i, text), reason)
    return ended

  def _check_stop(self, i, toks):
    if not self.stops[i]:
      return None
    text = self._text(toks)
    hits = [text.find(s) for s in self.stops[i] if s and s in text]
    return text[:min(hits)] if hits else None

  def _safe(self, i, text):
    # Hold back an incomplete UTF-8 character and any tail that could begin a stop string.
    if text.endswith("\ufffd"):
      text = text[:text.rfind("\ufffd")]
    for s in self.stops[i]:
      for k in range(min(len(s) - 1, len(text)), 0, -1):
        if text.endswith(s[:k]):
          text = text[:-k]
          break
    return text

  def _emit(self, i, token, text, reason):
    if self.stream is None:
      return
    delta = text[len(self.emitted[i]):] if text.startswith(self.emitted[i]) else ""
    self.emitted[i] = self.emitted[i] + delta
    self.stream(StreamEvent(i, token, delta, reason))

  def results(self, out, lengths, finish, prompt_lens) -> list[Completion]:
    res = []
    for i in range(out.shape[0]):
      if self.cut[i] is not None:
        n, text = self.cut[i]
        res.append(Completion(list(map(int, out[i, :n])), "stop", text, prompt_lens[i]))
        continue
      n = int(lengths[i])
      toks = list(map(int, out[i, :n]))
      reason = FINISH_NAMES.get(int(finish[i]), "length")
      if reason == "stop":
        toks = toks[:-1]  # the stop token itself
      text = self._text(toks) if self.decode is not None else None
      res.append(Completion(toks, reason, text, prompt_lens[i]))
    return res
