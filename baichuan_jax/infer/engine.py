"""Continuous batching: a fixed set of decode slots over one pre-allocated KV cache.

The way vLLM and JetStream serve many requests at once, in the simplest form that keeps every
shape static:

* One KV cache of `num_slots` rows x `max_len` slots is allocated when the `Engine` starts
  (`init_cache(cfg, num_slots, max_len)`), with one write index per row
  (`KVCache.index` of shape [num_slots]), so every row holds a request of its own length.
* A new request is prefilled alone (a batch-1 forward pass over its prompt, right-padded to a
  power-of-two bucket so a few shapes are compiled), and the prefilled keys/values, positions and
  segment ids are copied into a free row between two decode steps. The rest of the row is marked
  empty (segment 0), so nothing of the row's previous request is ever attended to.
* One jitted decode step advances every slot by one token (the layers unrolled as in
  `infer.generate`'s decode), each slot with its own temperature / top-k / top-p / repetition
  penalty, seed, stop ids and `max_new`; rows without a request compute a token nobody reads.
  Slots are sampled with `PRNGKey(seed)` folded with the number of tokens the slot has generated,
  exactly as a lone `infer.generate` call samples, so a request's tokens do not depend on what
  shares the batch.
* After each step the host gets the new tokens, decodes text, looks for stop strings, streams
  deltas, and frees the slot of a request that finished or was cancelled at once; queued
  requests move into free slots before the next step. A cancelled request therefore stops within
  one decode step (`steps_per_sync` steps, default 1).

The cache and the per-slot state are updated in place (buffer donation, which the CPU backend
supports too in jax 0.10). Only one thread (the engine's) runs the model.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import queue
import threading
import time
from typing import Callable, Optional

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from baichuan_jax.infer import generation as gen_lib
from baichuan_jax.infer.sampling import next_token
from baichuan_jax.model import KVCache, init_cache
from baichuan_jax.model.transformer import split_layers



class QueueFull(Exception):
  """The admission queue is full; the caller should retry later."""


@dataclasses.dataclass
class Request:
  """One generation request: prompt ids, settings, and a queue of events for the caller.

  Events put on `events`: ("token", text_delta, finish_reason_or_None) for every new token when
  `stream` is set, then ("done", Completion), or ("error", Exception).
  """
  ids: list
  max_new: int
  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0
  repetition_penalty: float = 1.0
  seed: int = 0
  stop_ids: list = dataclasses.field(default_factory=list)
  stop_strings: list = dataclasses.field(default_factory=list)
  stream: bool = False
  events: "queue.Queue" = dataclasses.field(default_factory=queue.Queue)
  cancelled: threading.Event = dataclasses.field(default_factory=threading.Event)
  submitted: float = 0.0  # time.monotonic() of submission
  first_token: Optional[float] = None  # time of the first generated token
  finished: Optional[float] = None

  def cancel(self) -> None:
    """Stops the request: dropped from the queue, or its slot freed after the current step."""
    self.cancelled.set()


@flax.struct.dataclass
class SlotState:
  """Device state of every slot ([slots] arrays unless noted)."""
  cache: KVCache  # [slots, kv_heads, max_len, head_dim] per layer; index [slots]
  last: jax.Array  # int32 token to feed next
  pos: jax.Array  # int32 position of `last` in its request
  lengths: jax.Array  # int32 tokens generated so far
  present: jax.Array  # [slots, vocab] bool tokens seen (repetition penalty)
  active: jax.Array  # bool: the slot holds a running request
  temperature: jax.Array
  top_k: jax.Array
  top_p: jax.Array
  repetition_penalty: jax.Array
  max_new: jax.Array
  seeds: jax.Array  # uint32
  stop_ids: jax.Array  # [slots, MAX_STOP_IDS] int32, -1 = unused


MAX_STOP_IDS = 8


def _pow2_bucket(n: int, lo: int, hi: int) -> int:
  return min(hi, max(lo, 1 << (max(n, 1) - 1).bit_length()))


def _init_state(cfg, slots: int, max_len: int) -> SlotState:
  z = lambda dt: jnp.zeros((slots,), dt)
  return SlotState(
      cache=init_cache(cfg, slots, max_len).replace(index=jnp.zeros((slots,), jnp.int32)),
      last=z(jnp.int32), pos=z(jnp.int32), lengths=z(jnp.int32),
      present=jnp.zeros((slots, cfg.vocab_size), bool), active=z(bool),
      temperature=z(jnp.float32), top_k=z(jnp.int32), top_p=jnp.ones((slots,), jnp.float32),
      repetition_penalty=jnp.ones((slots,), jnp.float32), max_new=z(jnp.int32),
      seeds=z(jnp.uint32), stop_ids=jnp.full((slots, MAX_STOP_IDS), -1, jnp.int32))


def _pick(s: SlotState, logits, present, lengths, do_sample, rows=None, use_kernels=False):
  """Next token per row; `rows` selects the slots the logits belong to (default: all).
  `use_kernels` (cfg.attention_impl == "pallas") picks with the Pallas top-k kernels."""
  take = (lambda a: a) if rows is None else (lambda a: a[rows])
  keys = jax.vmap(lambda seed, n: jax.random.fold_in(jax.random.PRNGKey(seed), n))(
      take(s.seeds), lengths)
  return next_token(logits, present, keys, take(s.temperature), take(s.top_k), take(s.top_p),
                    take(s.repetition_penalty), do_sample, use_kernels=use_kernels)


def _admit(cfg, do_sample, params, state: SlotState, tokens, n, slot, settings):
  """Prefills one prompt and moves it into row `slot`; returns (state, first token).

  tokens: [1, P] right-padded prompt; n: its real length; settings: per-request scalars.
  """
  p_len = tokens.shape[1]
  idx = jnp.arange(p_len, dtype=jnp.int32)
  segs = (idx < n).astype(jnp.int32)[None]
  logits, row = gen_lib.forward_last(
      cfg, params, tokens, idx[None], segs, init_cache(cfg, 1, p_len), last=n[None] - 1)
  present = jnp.zeros((1, cfg.vocab_size), jnp.int32).at[0, tokens[0]].add(segs[0]) > 0
  state = state.replace(**{k: getattr(state, k).at[slot].set(v) for k, v in settings.items()})
  tok = _pick(state, logits, present, jnp.zeros((1,), jnp.int32), do_sample, rows=slot[None],
              use_kernels=cfg.attention_impl == "pallas")[0]
  max_len = state.cache.positions.shape[1]
  full = jnp.arange(max_len, dtype=jnp.int32)
  put = lambda big, small: jax.lax.dynamic_update_slice_in_dim(big, small, slot, 0)
  cache = state.cache.replace(
      k=tuple(put(b, s) for b, s in zip(state.cache.k, row.k)),
      v=tuple(put(b, s) for b, s in zip(state.cache.v, row.v)),
      positions=put(state.cache.positions, jnp.where(full < n, full, 0)[None]),
      segment_ids=put(state.cache.segment_ids, (full < n).astype(jnp.int32)[None]),
      index=state.cache.index.at[slot].set(n))
  stop = jnp.any(tok == state.stop_ids[slot])
  present = present[0].at[tok].set(True)
  state = state.replace(
      cache=cache, last=state.last.at[slot].set(tok), pos=state.pos.at[slot].set(n),
      lengths=state.lengths.at[slot].set(1), present=state.present.at[slot].set(present),
      active=state.active.at[slot].set(~stop & (state.max_new[slot] > 1)))
  return state, tok


def _decode(cfg, do_sample, n_steps, params, state: SlotState, keep):
  """Up to `n_steps` (static) single-token steps for every slot.

  `keep` ([slots] bool) deactivates the slots the host freed (stop strings, cancellation). With
  several steps the device loop ends early when a slot finishes (so the host can refill it) or
  none is active. Returns (state, tokens [slots, n_steps], -1 where a slot produced none).
  """
  state = state.replace(active=state.active & keep)
  slots = state.last.shape[0]
  rows = jnp.arange(slots)

  def body(c):
    i, s, out, n_active = c
    run = s.active
    logits, cache = gen_lib.forward_last(
        cfg, params, s.last[:, None], s.pos[:, None], run.astype(jnp.int32)[:, None], s.cache,
        unroll=True)
    cache = cache.replace(index=jnp.where(run, cache.index, s.cache.index))
    tok = jnp.where(run, _pick(s, logits, s.present, s.lengths, do_sample,
                               use_kernels=cfg.attention_impl == "pallas"), cfg.pad_id)
    lengths = s.lengths + run.astype(jnp.int32)
    stop = run & jnp.any(tok[:, None] == s.stop_ids, axis=-1)
    present = s.present.at[rows, tok].set(s.present[rows, tok] | run)
    s = s.replace(cache=cache, last=jnp.where(run, tok, s.last), pos=s.pos + run, lengths=lengths,
                  present=present, active=run & ~stop & (lengths < s.max_new))
    out = jax.lax.dynamic_update_slice_in_dim(out, jnp.where(run, tok, -1)[:, None], i, 1)
    return i + 1, s, out, n_active

  def cond(c):
    i, s, _, n_active = c
    return (i < n_steps) & (jnp.sum(s.active) == n_active) & (n_active > 0)

  init = (jnp.zeros((), jnp.int32), state, jnp.full((slots, n_steps), -1, jnp.int32),
          jnp.sum(state.active))
  # One step runs without a loop: on GPUs a device loop around the unrolled layers makes XLA
  # copy the weight slices (see `infer.generate.Generator`).
  _, state, out, _ = body(init) if n_steps == 1 else jax.lax.while_loop(cond, body, init)
  return state, out


class _Live:
  """Host-side bookkeeping of a running request: its tokens, text, stop strings, stream deltas."""

  def __init__(self, req: Request, decode: Optional[Callable[[list], str]]):
    self.req, self.decode = req, decode
    self.tokens: list[int] = []
    self.emitted = ""  # text already streamed

  def _text(self, toks) -> str:
    return self.decode(toks) if self.decode is not None else ""

  def add(self, tok: int) -> Optional[gen_lib.Completion]:
    """Takes the next token; returns the Completion when the request is finished by it."""
    req = self.req
    if tok in req.stop_ids:  # the stop token itself is not part of the reply
      return self._finish(self.tokens, "stop", self._text(self.tokens))
    self.tokens.append(tok)
    # The text so far is only needed for stop strings and streaming (else once, at the end).
    text = self._text(self.tokens) if req.stream or req.stop_strings else None
    if req.stop_strings:
      hits = [text.find(s) for s in req.stop_strings if s in text]
      if hits:
        return self._finish(self.tokens, "stop", text[:min(hits)])
    if len(self.tokens) >= req.max_new:
      return self._finish(self.tokens, "length", self._text(self.tokens) if text is None else text)
    if req.stream:
      self._emit(self._safe(text), None)
    return None

  def _safe(self, text: str) -> str:
    # Hold back an incomplete UTF-8 character and any tail that could begin a stop string.
    if "\ufffd" in text[-1:]:
      text = text[:text.rfind("\ufffd")]
    for s in self.req.stop_strings:
      for k in range(min(len(s) - 1, len(text)), 0, -1):
        if text.endswith(s[:k]):
          text = text[:-k]
          break
    return text

  def _emit(self, text: str, reason: Optional[str]) -> None:
    delta = text[len(self.emitted):] if text.startswith(self.emitted) else ""
    self.emitted += delta
    if delta or reason:
      self.req.events.put(("token", delta, reason))

  def _finish(self, toks, reason, text) -> gen_lib.Completion:
    if self.req.stream:
      self._emit(text, reason)
    return gen_lib.Completion(list(toks), reason, text if self.decode else None, len(self.req.ids))


def _split_for_decode(params):
  """Per-layer weight copies for the CPU decode (as `infer.generate`'s device loop makes them)."""
  layer_bytes = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(params["layers"]))
  if jax.default_backend() == "cpu" and layer_bytes <= gen_lib.SPLIT_LAYERS_MAX_BYTES:
    return split_layers(params)
  return params


class Metrics:
  """Counters and recent timings for `/metrics` (everything bounded in memory)."""

  WINDOW_S = 10.0  # tokens/s is measured over the last this many seconds

  def __init__(self):
    self.lock = threading.Lock()
    self.tokens_total = 0
    self.finished = collections.Counter()  # finish reason -> requests
    self.rejected = 0
    self.cancelled = 0
    self.failed = 0
    self.ttft = collections.deque(maxlen=1024)  # seconds, most recent requests
    self.ttft_sum, self.ttft_count = 0.0, 0
    self._recent = collections.deque()  # (time, tokens) per decode step within WINDOW_S

  def add_tokens(self, n: int, now: float) -> None:
    with self.lock:
      self.tokens_total += n
      self._recent.append((now, n))
      while self._recent and self._recent[0][0] < now - self.WINDOW_S:
        self._recent.popleft()

  def add_ttft(self, seconds: float) -> None:
    with self.lock:
      self.ttft.append(seconds)
      self.ttft_sum += seconds
      self.ttft_count += 1

  def tokens_per_second(self, now: float) -> float:
    with self.lock:
      recent = [n for t, n in self._recent if t >= now - self.WINDOW_S]
    return sum(recent) / self.WINDOW_S


_COMPILED: dict = {}


def _compiled(cfg):
  """The jitted (admit, decode) pair for a config, shared by every engine of that config."""
  key = cfg.to_json()
  if key not in _COMPILED:
    _COMPILED[key] = (
        jax.jit(functools.partial(_admit, cfg), static_argnums=(0,), donate_argnums=(2,)),
        jax.jit(functools.partial(_decode, cfg), static_argnums=(0, 1), donate_argnums=(3,)))
  return _COMPILED[key]


class Engine:
  """Continuous-batching generation over `num_slots` decode slots (see the module doc).

  Args:
    cfg: model config; params: its parameters (plain or quantized).
    decode: token ids -> text (for `Completion.text`, stop strings and streaming).
    num_slots: requests decoded together (rows of the KV cache).
    max_len: cache slots per row (default: cfg.max_seq_len rounded up to 16); a request needs
      len(ids) + max_new <= max_len.
    max_queue: requests waiting for a slot; `submit` raises `QueueFull` beyond it.
    batch_wait_ms: when idle, how long the first arriving request waits for others to arrive
      before decoding starts (so a burst starts together).
    steps_per_sync: decode steps per host round trip (1: stops and cancellation act at once).
  """

  def __init__(self, cfg, params, decode: Optional[Callable[[list], str]] = None, *,
               num_slots: int = 8, max_len: Optional[int] = None, max_queue: int = 64,
               batch_wait_ms: float = 0.0, steps_per_sync: int = 1):
    if num_slots < 1 or max_queue < 0 or steps_per_sync < 1:
      raise ValueError(f"num_slots={num_slots} and steps_per_sync={steps_per_sync} must be >= 1, "
                       f"max_queue={max_queue} >= 0")
    self.cfg, self.decode = cfg, decode
    self.num_slots, self.max_queue, self.steps = num_slots, max_queue, steps_per_sync
    self.max_len = max_len or -(-cfg.max_seq_len // 16) * 16
    self.batch_wait = batch_wait_ms / 1000.0
    self.params, self.decode_params = params, _split_for_decode(params)
    self._admit, self._decode = _compiled(cfg)
    self.state = _init_state(cfg, num_slots, self.max_len)
    self.slots: list[Optional[_Live]] = [None] * num_slots
    self.metrics = Metrics()
    # Active slots of each decode step, the most recent 100k (under 1 MB).
    self.step_sizes: collections.deque = collections.deque(maxlen=100_000)
    self.steps_total = 0
    self._pending: collections.deque = collections.deque()
    self._cv = threading.Condition()
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._loop, name="engine", daemon=True)
    self._thread.start()

  # --- public ------------------------------------------------------------------------------------
  def submit(self, req: Request) -> Request:
    """Queues `req` (its events arrive on `req.events`).

    Raises:
      ValueError: an empty prompt, too long for the cache, or too many stop ids.
      QueueFull: `max_queue` requests are already waiting.
    """
    n = len(req.ids)
    if n == 0 or n + req.max_new > self.max_len or req.max_new < 1:
      raise ValueError(f"a prompt of {n} tokens with max_new={req.max_new} does not fit the cache "
                       f"of {self.max_len} slots per request (need 1 <= prompt + max_new <= "
                       f"{self.max_len}, prompt >= 1)")
    if len(req.stop_ids) > MAX_STOP_IDS:
      raise ValueError(f"{len(req.stop_ids)} stop ids: at most {MAX_STOP_IDS}")
    with self._cv:
      if self._stop.is_set():
        raise QueueFull("the engine is shutting down")
      for r in [r for r in self._pending if r.cancelled.is_set()]:
        self._pending.remove(r)
        self._count_cancel(r)
      if len(self._pending) >= self.max_queue:
        with self.metrics.lock:
          self.metrics.rejected += 1
        raise QueueFull(f"{len(self._pending)} requests are waiting (the limit)")
      req.submitted = time.monotonic()
      self._pending.append(req)
      self._cv.notify()
    return req

  def queue_depth(self) -> int:
    with self._cv:
      return sum(not r.cancelled.is_set() for r in self._pending)

  def active_slots(self) -> int:
    return sum(s is not None for s in self.slots)

  def warmup(self, prompt_lens=(16,), sample: bool = True) -> None:
    """Compiles the admission of the given prompt-length buckets and the decode step."""
    for n in prompt_lens:
      for do_sample in ((False, True) if sample else (False,)):
        req = Request(ids=[self.cfg.bos_id] * n, max_new=2, temperature=float(do_sample))
        self.submit(req)
        while req.events.get()[0] == "token":
          pass

  def close(self) -> None:
    """Stops the engine; waiting and running requests get an error event."""
    with self._cv:
      self._stop.set()
      self._cv.notify_all()
    self._thread.join(timeout=60)
    err = RuntimeError("the server is shutting down")
    for r in list(self._pending) + [s.req for s in self.slots if s is not None]:
      r.events.put(("error", err))
    self._pending.clear()

  # --- the loop ----------------------------------------------------------------------------------
  def _loop(self) -> None:
    while not self._stop.is_set():
      self._wait_for_work()
      if self._stop.is_set():
        return
      self._fill_slots()
      if any(s is not None for s in self.slots):
        self._step()

  def _wait_for_work(self) -> None:
    with self._cv:
      while not self._stop.is_set() and not self._pending and self.active_slots() == 0:
        self._cv.wait(0.5)
      if self.active_slots() or not self._pending or self.batch_wait <= 0:
        return
      deadline = self._pending[0].submitted + self.batch_wait
      while (not self._stop.is_set() and len(self._pending) < self.num_slots
             and time.monotonic() < deadline):
        self._cv.wait(max(deadline - time.monotonic(), 0))

  def _next_pending(self) -> Optional[Request]:
    with self._cv:
      while self._pending:
        req = self._pending.popleft()
        if not req.cancelled.is_set():
          return req
        self._count_cancel(req)
    return None

  def _fill_slots(self) -> None:
    for slot in range(self.num_slots):
      if self.slots[slot] is not None:
        continue
      req = self._next_pending()
      if req is None:
        return
      try:
        self._start(slot, req)
      except Exception as e:  # pylint: disable=broad-except
        self._fail([req], e, reset=self._state_lost())

  def _start(self, slot: int, req: Request) -> None:
    """Prefills `req` into `slot` and handles its first token."""
    n = len(req.ids)
    p_len = _pow2_bucket(n, 16, self.max_len)
    tokens = np.full((1, p_len), self.cfg.pad_id, np.int32)
    tokens[0, :n] = req.ids
    stops = np.full((MAX_STOP_IDS,), -1, np.int32)
    stops[:len(req.stop_ids)] = req.stop_ids
    settings = {"temperature": np.float32(req.temperature), "top_k": np.int32(req.top_k),
                "top_p": np.float32(req.top_p),
                "repetition_penalty": np.float32(req.repetition_penalty),
                "max_new": np.int32(req.max_new), "seeds": np.uint32(req.seed % 2**32),
                "stop_ids": stops}
    self.state, tok = self._admit(req.temperature > 0, self.params, self.state, tokens,
                                  np.int32(n), np.int32(slot), settings)
    tok = int(tok)
    now = time.monotonic()
    req.first_token = now
    self.metrics.add_ttft(now - req.submitted)
    self.metrics.add_tokens(1, now)
    live = _Live(req, self.decode)
    done = live.add(tok)
    if done is None:
      self.slots[slot] = live
    else:
      self._deliver(req, done)

  def _step(self) -> None:
    for slot, live in enumerate(self.slots):
      if live is not None and live.req.cancelled.is_set():
        self.slots[slot] = None
        self._count_cancel(live.req)
    keep = np.array([s is not None for s in self.slots])
    if not keep.any():
      return
    do_sample = any(s.req.temperature > 0 for s in self.slots if s is not None)
    self.step_sizes.append(int(keep.sum()))
    self.steps_total += 1
    try:
      self.state, out = self._decode(do_sample, self.steps, self.decode_params, self.state,
                                     keep)
      out = np.asarray(out)
    except Exception as e:  # pylint: disable=broad-except
      self._fail([s.req for s in self.slots if s is not None], e, reset=True)
      return
    self.metrics.add_tokens(int((out >= 0).sum()), time.monotonic())
    for slot, live in enumerate(self.slots):
      if live is None:
        continue
      for tok in out[slot]:
        if tok < 0:
          break
        done = live.add(int(tok))
        if done is not None:
          self.slots[slot] = None  # free at once; the next step's `keep` deactivates the row
          self._deliver(live.req, done)
          break

  def _deliver(self, req: Request, completion: gen_lib.Completion) -> None:
    req.finished = time.monotonic()
    with self.metrics.lock:
      self.metrics.finished[completion.finish_reason] += 1
    req.events.put(("done", completion))

  def _count_cancel(self, req: Request) -> None:
    with self.metrics.lock:
      self.metrics.cancelled += 1
    req.events.put(("error", RuntimeError("cancelled")))

  def _state_lost(self) -> bool:
    return any(getattr(a, "is_deleted", lambda: False)() for a in jax.tree.leaves(self.state))

  def _fail(self, reqs, err: Exception, reset: bool) -> None:
    """Fails `reqs` (a generation error); `reset` drops every running request and the state."""
    if reset:
      reqs = list(reqs) + [s.req for s in self.slots if s is not None and s.req not in reqs]
      self.slots = [None] * self.num_slots
      self.state = _init_state(self.cfg, self.num_slots, self.max_len)
    with self.metrics.lock:
      self.metrics.failed += len(reqs)
    for r in reqs:
      r.events.put(("error", err))
