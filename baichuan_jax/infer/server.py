"""An OpenAI-compatible HTTP server: `/v1/chat/completions` and `/v1/completions`.

    python -m baichuan_jax.serve --checkpoint WORKDIR [--port 8000] [--quantize int8]
    python -m baichuan_jax.serve --hf Baichuan2-7B-Chat --host 0.0.0.0 --api-key KEY

Any OpenAI client works against it (`base_url="http://127.0.0.1:8000/v1"`), including streaming
(`"stream": true` gives server-sent events `data: {chunk}` ... `data: [DONE]`). With `--api-key`
(or the BAICHUAN_JAX_API_KEY environment variable) every `/v1` and `/metrics` request needs
`Authorization: Bearer KEY`, as the OpenAI API does; the server binds 127.0.0.1 by default and
warns when it listens beyond this machine without a key.

Requests accept the OpenAI fields `model`, `messages` / `prompt`, `max_tokens`
(`max_completion_tokens`), `temperature` (0 = greedy), `top_p`, `stop`, `seed`, `stream`,
`stream_options`, `n` (1 only), `user`, plus the Hugging Face / Baichuan extensions `top_k` and
`repetition_penalty`. Chat defaults are Baichuan 2's generation config (temperature 0.3, top-k 5,
top-p 0.85, repetition penalty 1.05); completions default to greedy with max_tokens 16, as OpenAI.
A chat reply ends at `</s>` or a turn marker, so the model never writes the user's next turn.
Responses name the served model (`--model-name`, default the checkpoint folder's name) and carry
`usage` (streams: in a last chunk with `stream_options.include_usage`).

Generation: a continuous-batching `infer.engine.Engine` with `--max-batch` decode slots over one
KV cache; a request joins the running batch between two decode steps and leaves it the step it
ends; a client that disconnects (streaming or not) cancels its request within a decode step.

Load and robustness: at most `--max-queue` requests wait for a slot (more get 429 with
Retry-After); `--workers` threads serve connections (more connections wait, up to the listen
`--backlog`, and beyond 2 x workers waiting ones get 429); a request must arrive within
`--request-timeout` seconds and a connection idle for `--idle-timeout` seconds is closed (a slow or
half-sent request cannot hold a worker); a response sent before the request body is read closes the
connection, so a body is never parsed as a request. `GET /health` and Prometheus-style
`GET /metrics` (queue depth, active slots, tokens/s, time to first token) report the load.

Bad requests get a 4xx (400 invalid, 401 bad key, 404 unknown path, 405 wrong method, 408 timeout,
411 chunked body, 413 oversized body, 429 busy, 431 oversized headers) with an OpenAI-style body
`{"error": {"message", "type", "param", "code"}}` naming the field and what is allowed. A failure
inside generation fails only the requests it touched (HTTP 500); the server keeps serving.
"""

from __future__ import annotations

import argparse
import hmac
import io
import ipaddress
import json
import os
import queue
import random
import re
import select
import socket
import socketserver
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any, Optional

import jax.numpy as jnp
import numpy as np

from baichuan_jax.infer import chat_template
from baichuan_jax.infer import loading
from baichuan_jax.infer.engine import Engine, QueueFull, Request

MAX_BODY_BYTES = 4 << 20
API_KEY_ENV = "BAICHUAN_JAX_API_KEY"
_COMMON = {"model", "max_tokens", "temperature", "top_p", "top_k", "repetition_penalty", "stop",
           "seed", "stream", "stream_options", "n", "user"}
CHAT_FIELDS = _COMMON | {"messages", "max_completion_tokens"}
COMPLETION_FIELDS = _COMMON | {"prompt", "echo"}
RETRY_AFTER_S = 1
Job = Request  # the server's name for a generation request (kept for callers of earlier versions)


class RequestError(Exception):
  """A client error: HTTP status, message and the offending field (`close`: end the connection)."""

  def __init__(self, message: str, param: Optional[str] = None, status: int = 400,
               code: Optional[str] = None, close: bool = False, headers: Optional[dict] = None):
    super().__init__(message)
    self.status, self.param, self.code, self.close = status, param, code, close
    self.headers = headers or {}

  def body(self) -> dict:
    # 501 answers a method the client should not have sent: its error, not the server's.
    kind = "invalid_request_error" if self.status < 500 or self.status == 501 else "server_error"
    return {"error": {"message": str(self), "type": kind, "param": self.param, "code": self.code}}


# ----------------------------------------------------------------------------------------------
# Request validation.


def _number(body, name, default, lo, hi, integer=False, lo_open=False):
  v = body.get(name, default)
  if v is None:
    v = default
  kind = "an integer" if integer else "a number"
  if isinstance(v, bool) or not isinstance(v, (int, float)) or (integer and not isinstance(v, int)):
    raise RequestError(f"'{name}' must be {kind}, got {json.dumps(v)}", name)
  low_ok = v > lo if lo_open else v >= lo
  if not low_ok or v > hi:
    bounds = f"{'(' if lo_open else '['}{lo}, {hi}]"
    raise RequestError(f"'{name}'={v} is out of range: allowed {bounds}", name)
  return int(v) if integer else float(v)


def _stops(body) -> list:
  stop = body.get("stop")
  if stop is None:
    return []
  if isinstance(stop, str):
    stop = [stop]
  if (not isinstance(stop, list) or len(stop) > 4
      or not all(isinstance(s, str) and s for s in stop)):
    raise RequestError("'stop' must be a non-empty string or a list of up to 4 non-empty strings",
                       "stop")
  return stop


def _check_fields(body, allowed, endpoint):
  if not isinstance(body, dict):
    raise RequestError("the request body must be a JSON object")
  unknown = sorted(set(body) - allowed)
  if unknown:
    raise RequestError(f"unknown field(s) {', '.join(map(repr, unknown))} for {endpoint}; allowed: "
                       f"{', '.join(sorted(allowed))}", unknown[0], code="unknown_field")
  n = body.get("n", 1)
  if n is not None and (isinstance(n, bool) or n != 1):
    raise RequestError(f"'n' must be 1 (one choice per request), got {json.dumps(n)}", "n")
  if not isinstance(body.get("stream", False), bool):
    raise RequestError("'stream' must be true or false", "stream")
  opts = body.get("stream_options")
  if opts is not None and (not isinstance(opts, dict) or set(opts) - {"include_usage"}):
    raise RequestError("'stream_options' may only hold 'include_usage'", "stream_options")
  if body.get("model") is not None and not isinstance(body["model"], str):
    raise RequestError("'model' must be a string", "model")


def _check_unicode(body: dict) -> None:
  """Rejects strings that are not valid Unicode text (a lone surrogate such as "\\ud800")."""
  for field, value in body.items():
    stack = [field, value]
    while stack:
      v = stack.pop()
      if isinstance(v, str):
        try:
          v.encode("utf-8")
        except UnicodeEncodeError as e:
          raise RequestError(f"'{field}' holds a string that is not valid Unicode ({e.reason} at "
                             f"character {e.start}: a lone surrogate such as \\ud800)",
                             field) from e
      elif isinstance(v, dict):
        stack.extend(v.keys())
        stack.extend(v.values())
      elif isinstance(v, list):
        stack.extend(v)


def parse_json(raw: bytes) -> Any:
  """The request body as JSON; malformed, too deeply nested or non-Unicode bodies raise 400."""
  try:
    body = json.loads(raw.decode("utf-8"))
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise RequestError(f"the request body is not valid JSON: {e}", code="invalid_json") from e
  except RecursionError as e:
    raise RequestError("the request body is not valid JSON: nested too deeply",
                       code="invalid_json") from e
  if isinstance(body, dict):
    _check_unicode(body)
  return body


def short_name(source: str) -> str:
  """The model id to report for a checkpoint path: its folder name, not the whole path."""
  p = Path(str(source).rstrip("/"))
  if p.name in ("checkpoints", "") and p.parent.name:
    p = p.parent
  return p.name or "baichuan-jax"


DEFAULT_MAX_CONTEXT = 4096


def context_length(cfg, max_context: Optional[int] = None) -> int:
  """Tokens per request the server allows: `max_context`, else the config's `max_seq_len` capped
  at `DEFAULT_MAX_CONTEXT`; never more than `max_seq_len` (positions past it were never trained).
  """
  if max_context is None:
    return min(int(cfg.max_seq_len), DEFAULT_MAX_CONTEXT)
  if max_context > cfg.max_seq_len:
    raise ValueError(f"--max-context={max_context} exceeds the model's max_seq_len="
                     f"{cfg.max_seq_len}")
  return int(max_context)


def kv_cache_bytes(cfg, slots: int, tokens: int) -> int:
  """Bytes of the engine's KV cache: K and V for every layer, slot and token."""
  kv_heads = cfg.get("num_kv_heads", None) or cfg.num_heads
  item = np.dtype(jnp.dtype(cfg.dtype)).itemsize
  return 2 * cfg.num_layers * slots * tokens * kv_heads * (cfg.hidden_size // cfg.num_heads) * item


class Server:
  """The model, its continuous-batching engine and the server settings; parses requests."""

  def __init__(self, model: loading.LoadedModel, max_batch: int = 8, batch_wait_ms: float = 10.0,
               model_name: Optional[str] = None, *, max_queue: int = 64,
               api_key: Optional[str] = None, request_timeout: float = 30.0,
               idle_timeout: float = 5.0, steps_per_sync: int = 1,
               max_context: Optional[int] = None):
    self.model = model
    self.cfg = model.cfg
    # The KV cache is allocated once for every slot, so it is sized to the context requests may
    # use, not to the maximum a config declares (a config may declare far more than fits).
    self.max_context = context_length(model.cfg, max_context)
    self.max_batch = max_batch
    self.model_name = model_name or short_name(model.source)
    self.api_key = api_key or None
    self.request_timeout, self.idle_timeout = request_timeout, idle_timeout
    self.verbose = False
    self.engine = Engine(model.cfg, model.params, model.tokenizer.decode, num_slots=max_batch,
                         max_len=self.max_context, max_queue=max_queue, batch_wait_ms=batch_wait_ms,
                         steps_per_sync=steps_per_sync)
    self.busy_connections = 0  # connections turned away with 429 (every worker busy)
    self.started = time.time()

  @property
  def batch_sizes(self) -> list:
    """Active slots of each recent decode step (for logs and tests)."""
    return list(self.engine.step_sizes)

  # --- parsing ---------------------------------------------------------------------------------
  def _sampling(self, body, chat: bool) -> dict:
    d = chat_template.DEFAULT_SAMPLING if chat else {"temperature": 0.0, "top_k": 0, "top_p": 1.0,
                                                     "repetition_penalty": 1.0}
    return {
        "temperature": _number(body, "temperature", d["temperature"], 0, 2),
        "top_p": _number(body, "top_p", d["top_p"], 0, 1, lo_open=True),
        "top_k": _number(body, "top_k", d["top_k"], 0, self.cfg.vocab_size, integer=True),
        "repetition_penalty": _number(body, "repetition_penalty", d["repetition_penalty"], 0, 10,
                                      lo_open=True),
        # Without a seed every request samples differently, as with OpenAI's API.
        "seed": (_number(body, "seed", 0, -2**63, 2**63 - 1, integer=True) % 2**31
                 if body.get("seed") is not None else random.getrandbits(31)),
    }

  def _max_new(self, body, n_prompt: int, name: str, default: Optional[int],
               prompt_field: str) -> int:
    ctx = self.max_context
    room = ctx - n_prompt
    if room < 1:
      raise RequestError(f"the prompt has {n_prompt} tokens but the model context is {ctx} tokens; "
                         "shorten the prompt", prompt_field, code="context_length_exceeded")
    if body.get(name) is None and default is None:
      return min(room, 2048)
    n = _number(body, name, default, 1, ctx - 1, integer=True)
    if n > room:
      raise RequestError(f"the prompt ({n_prompt} tokens) plus '{name}'={n} exceed the model "
                         f"context of {ctx} tokens; at most {room} new tokens fit", name,
                         code="context_length_exceeded")
    return n

  def parse_chat(self, body) -> Request:
    _check_fields(body, CHAT_FIELDS, "/v1/chat/completions")
    if "messages" not in body:
      raise RequestError("'messages' is required", "messages")
    try:
      msgs = chat_template.validate_messages(body["messages"])
    except ValueError as e:
      raise RequestError(str(e), "messages") from e
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    tok = self.model.tokenizer
    # Rendered without truncation: a conversation that does not fit is an error, not silently cut.
    ids = chat_template.build_chat_prompt(msgs, tok.encode, max_length=10**9, max_new_tokens=0,
                                          **chat_template.for_config(self.cfg))
    max_new = self._max_new(body, len(ids), name, None, "messages")
    stops = chat_template.chat_stop_ids(self.cfg.eos_id, self.cfg.user_token_id,
                                        self.cfg.assistant_token_id)
    return Request(ids=ids, max_new=max_new, stop_ids=stops, stop_strings=_stops(body),
                   stream=body.get("stream", False), **self._sampling(body, True))

  def parse_completion(self, body) -> Request:
    _check_fields(body, COMPLETION_FIELDS, "/v1/completions")
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
      prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
      raise RequestError("'prompt' must be a non-empty string", "prompt")
    if body.get("echo", False):
      raise RequestError("'echo' is not supported (must be false)", "echo")
    ids = [self.cfg.bos_id] + self.model.tokenizer.encode(prompt)
    max_new = self._max_new(body, len(ids), "max_tokens", 16, "prompt")
    return Request(ids=ids, max_new=max_new, stop_ids=[self.cfg.eos_id], stop_strings=_stops(body),
                   stream=body.get("stream", False), **self._sampling(body, False))

  def submit(self, job: Request) -> Request:
    """Queues `job`; a full queue is a 429 with Retry-After."""
    try:
      return self.engine.submit(job)
    except QueueFull as e:
      raise RequestError(f"the server is busy ({e}); retry after {RETRY_AFTER_S} s", status=429,
                         code="rate_limit_exceeded",
                         headers={"Retry-After": str(RETRY_AFTER_S)}) from e
    except ValueError as e:
      raise RequestError(str(e), code="context_length_exceeded") from e

  def check_key(self, header: Optional[str]) -> None:
    """Raises 401 unless `header` is "Bearer <api key>" (no key configured: always passes)."""
    if self.api_key is None:
      return
    scheme, _, given = (header or "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(),
                                                             self.api_key.encode()):
      raise RequestError("invalid or missing API key: send 'Authorization: Bearer <key>'",
                         status=401, code="invalid_api_key",
                         headers={"WWW-Authenticate": "Bearer"})

  # --- observability ---------------------------------------------------------------------------
  def health(self) -> dict:
    e = self.engine
    return {"status": "ok", "model": self.model_name, "active_slots": e.active_slots(),
            "slots": e.num_slots, "queue_depth": e.queue_depth(), "max_queue": e.max_queue}

  def metrics_text(self) -> str:
    """Prometheus text exposition of the engine and server counters."""
    e, m, now = self.engine, self.engine.metrics, time.monotonic()
    with m.lock:
      ttft = sorted(m.ttft)
      finished = dict(m.finished)
      counters = (m.tokens_total, m.rejected, m.cancelled, m.failed, m.ttft_sum, m.ttft_count)
    quant = lambda q: ttft[min(len(ttft) - 1, int(q * len(ttft)))] if ttft else float("nan")
    rows = [
        ("queue_depth", "gauge", "Requests waiting for a decode slot.", [("", e.queue_depth())]),
        ("active_slots", "gauge", "Decode slots holding a request.", [("", e.active_slots())]),
        ("slots", "gauge", "Decode slots (requests generated together).", [("", e.num_slots)]),
        ("generated_tokens_total", "counter", "Tokens generated.", [("", counters[0])]),
        ("tokens_per_second", "gauge", f"Tokens generated per second over the last "
         f"{m.WINDOW_S:g} s.", [("", e.metrics.tokens_per_second(now))]),
        ("time_to_first_token_seconds", "summary", "Submission to first token, recent requests.",
         [('{quantile="0.5"}', quant(0.5)), ('{quantile="0.95"}', quant(0.95)),
          ("_sum", counters[4]), ("_count", counters[5])]),
        ("requests_finished_total", "counter", "Requests finished, by finish reason.",
         [(f'{{reason="{r}"}}', finished.get(r, 0)) for r in ("stop", "length")]),
        ("requests_rejected_total", "counter", "Requests refused with 429 (queue full).",
         [("", counters[1])]),
        ("connections_rejected_total", "counter", "Connections refused with 429 (workers busy).",
         [("", self.busy_connections)]),
        ("requests_cancelled_total", "counter", "Requests cancelled (client disconnected).",
         [("", counters[2])]),
        ("requests_failed_total", "counter", "Requests failed inside generation.",
         [("", counters[3])]),
        ("decode_steps_total", "counter", "Decode steps run.", [("", e.steps_total)]),
    ]
    out = []
    for name, kind, doc, samples in rows:
      full = f"baichuan_jax_{name}"
      out += [f"# HELP {full} {doc}", f"# TYPE {full} {kind}"]
      out += [f"{full}{suffix} {value}" for suffix, value in samples]
    return "\n".join(out) + "\n"

  def close(self) -> None:
    self.engine.close()


# ----------------------------------------------------------------------------------------------
# Responses.


def _usage(job: Request, out) -> dict:
  return {"prompt_tokens": len(job.ids), "completion_tokens": len(out.tokens),
          "total_tokens": len(job.ids) + len(out.tokens)}


def _final(kind: str, rid: str, created: int, model: str, job: Request, out) -> dict:
  if kind == "chat":
    choice = {"index": 0, "message": {"role": "assistant", "content": out.text},
              "finish_reason": out.finish_reason, "logprobs": None}
    obj = "chat.completion"
  else:
    choice = {"index": 0, "text": out.text, "finish_reason": out.finish_reason, "logprobs": None}
    obj = "text_completion"
  return {"id": rid, "object": obj, "created": created, "model": model, "choices": [choice],
          "usage": _usage(job, out)}


def _chunk(kind: str, rid: str, created: int, model: str, text: Optional[str],
           finish: Optional[str], first: bool = False, usage: bool = False) -> dict:
  if kind == "chat":
    delta: dict = {}
    if first:
      delta["role"] = "assistant"
    if text:
      delta["content"] = text
    choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
    obj = "chat.completion.chunk"
  else:
    choice = {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}
    obj = "text_completion"
  out = {"id": rid, "object": obj, "created": created, "model": model, "choices": [choice]}
  if usage:  # with stream_options.include_usage every chunk but the last has "usage": null
    out["usage"] = None
  return out




# ----------------------------------------------------------------------------------------------
# HTTP.

POLL_S = 0.02  # how often a waiting handler checks whether its client disconnected
WRITE_TIMEOUT_S = 60.0  # a client that reads nothing for this long is dropped
LINGER_S = 0.5  # after the last response, how long unread input is drained before closing
_LENGTH_RE = re.compile(r"^[0-9]{1,12}$")
_METHODS = ("GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS")
_ROUTES = {"/v1/models": "GET", "/health": "GET", "": "GET", "/metrics": "GET",
           "/v1/chat/completions": "POST", "/v1/completions": "POST"}
_OPEN_PATHS = ("/health", "")  # answered without an API key


class _DeadlineReader(io.RawIOBase):
  """A socket's input with an idle timeout per read and a deadline for the whole request."""

  def __init__(self, sock: socket.socket):
    super().__init__()
    self.sock, self.deadline, self.idle, self.got = sock, None, None, 0

  def readable(self) -> bool:
    return True

  def start(self, total_s: float, idle_s: float) -> None:
    self.deadline, self.idle, self.got = time.monotonic() + total_s, idle_s, 0

  def stop(self) -> None:
    self.deadline = None

  def readinto(self, b) -> int:
    if self.deadline is not None:
      left = self.deadline - time.monotonic()
      if left <= 0:
        raise TimeoutError("the request did not arrive in time")
      self.sock.settimeout(min(left, self.idle))
    n = self.sock.recv_into(b)
    self.got += n
    return n


class Handler(BaseHTTPRequestHandler):
  """One connection: routes /v1/... requests; every error is an OpenAI-style JSON object."""
  protocol_version = "HTTP/1.1"
  server_version = "baichuan-jax"
  disable_nagle_algorithm = True
  app: Server  # bound by `make_handler`

  def setup(self):
    super().setup()
    self.rfile.close()
    self._reader = _DeadlineReader(self.connection)
    self.rfile = io.BufferedReader(self._reader)
    self._body_pending = False

  def log_message(self, fmt, *args):  # quiet by default; --verbose turns it on
    if self.app.verbose:
      super().log_message(fmt, *args)

  # --- the request cycle -----------------------------------------------------------------------
  def handle_one_request(self):
    self._reader.start(self.app.request_timeout, self.app.idle_timeout)
    self._body_pending = False
    try:
      self.raw_requestline = self.rfile.readline(65537)
      if len(self.raw_requestline) > 65536:
        self.request_version, self.command = "HTTP/1.1", None
        self.send_error(414, "request line too long")
        return
      if not self.raw_requestline:
        self.close_connection = True
        return
      if not self.parse_request():  # sends its own (JSON) error
        return
      self._body_pending = True
      if self.command not in _METHODS:
        self.send_error(501, f"method {self.command} is not supported")
        return
      self._dispatch()
      self.wfile.flush()
    except TimeoutError:
      self.close_connection = True
      if self._reader.got:
        self._try(lambda: self._error(RequestError(
            f"the request did not arrive within {self.app.request_timeout:g} s (or stalled for "
            f"{self.app.idle_timeout:g} s)", status=408, close=True)))
    except OSError:
      self.close_connection = True

  def _try(self, fn) -> None:
    try:
      fn()
    except OSError:
      pass

  def _dispatch(self) -> None:
    path = self.path.split("?", 1)[0].rstrip("/")
    try:
      raw = self._read_body()
      self._reader.stop()
      self.connection.settimeout(WRITE_TIMEOUT_S)
      if path not in _OPEN_PATHS:
        self.app.check_key(self.headers.get("Authorization"))
      allowed = _ROUTES.get(path)
      if allowed is None:
        raise RequestError(f"unknown path {self.path}; use /v1/chat/completions, /v1/completions, "
                           "/v1/models, /health or /metrics", status=404)
      if self.command != allowed and not (self.command == "HEAD" and allowed == "GET"):
        raise RequestError(f"{path or '/'} only accepts {allowed}, not {self.command}", status=405,
                           headers={"Allow": allowed})
      if allowed == "POST":
        self._completions("chat" if path.endswith("chat/completions") else "completion", raw)
      else:
        self._get(path)
    except RequestError as e:
      self._error(e)
    except Exception as e:  # pylint: disable=broad-except
      # A bug must not drop the connection without an answer.
      self._error(RequestError(f"internal error: {type(e).__name__}: {e}", status=500))

  def _read_body(self) -> bytes:
    """Reads the declared body (every request, before routing, so none is left on the wire)."""
    if self.headers.get("Transfer-Encoding") is not None:
      raise RequestError("Transfer-Encoding is not supported: send the body with a Content-Length "
                         "header", status=411, close=True)
    values = {v.strip() for v in self.headers.get_all("Content-Length") or []}
    if not values:
      self._body_pending = False
      return b""
    if len(values) != 1 or not _LENGTH_RE.match(next(iter(values))):
      raise RequestError(f"invalid Content-Length header {sorted(values)}", close=True)
    n = int(next(iter(values)))
    if n > MAX_BODY_BYTES:
      raise RequestError(f"request body of {n} bytes exceeds the {MAX_BODY_BYTES} byte limit",
                         status=413, close=True)
    data = self.rfile.read(n)
    if len(data) < n:
      raise RequestError(f"the body ended after {len(data)} of {n} bytes", close=True)
    self._body_pending = False
    return data

  # --- responses -------------------------------------------------------------------------------
  def _send(self, status: int, data: bytes, ctype: str = "application/json",
            headers: Optional[dict] = None, close: bool = False) -> None:
    # An answer sent before the body was read ends the connection: the unread bytes must never
    # be taken for the next request.
    close = close or self._body_pending
    self.send_response(status)
    self.send_header("Content-Type", ctype)
    self.send_header("Content-Length", str(len(data)))
    for k, v in (headers or {}).items():
      self.send_header(k, v)
    if close:
      self.send_header("Connection", "close")
      self.close_connection = True
    self.end_headers()
    if self.command != "HEAD":
      self.wfile.write(data)

  def _send_json(self, status: int, obj: dict) -> None:
    self._send(status, json.dumps(obj, ensure_ascii=False).encode("utf-8"))

  def _error(self, err: RequestError) -> None:
    data = json.dumps(err.body(), ensure_ascii=False).encode("utf-8")
    self._send(err.status, data, headers=err.headers, close=err.close)

  def send_error(self, code, message=None, explain=None):
    """http.server's own errors (bad request line, oversized headers, ...) as JSON objects."""
    text = message or self.responses.get(code, ("error",))[0]
    if self.request_version == "HTTP/0.9":  # a garbled request line: answer with full headers
      self.request_version = "HTTP/1.1"
    if code == 431:
      text = f"request header fields too large ({text})"
    self._error(RequestError(f"{text}{': ' + explain if explain else ''}", status=code,
                             close=True))

  def _get(self, path: str) -> None:
    app = self.app
    if path == "/v1/models":
      self._send_json(200, {"object": "list", "data": [
          {"id": app.model_name, "object": "model", "created": int(app.started),
           "owned_by": "baichuan-jax"}]})
    elif path == "/metrics":
      self._send(200, app.metrics_text().encode(), "text/plain; version=0.0.4; charset=utf-8")
    else:
      self._send_json(200, app.health())

  def _completions(self, kind: str, raw: bytes) -> None:
    app = self.app
    body = parse_json(raw)
    job = app.parse_chat(body) if kind == "chat" else app.parse_completion(body)
    app.submit(job)
    meta = (kind, ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24],
            int(time.time()), app.model_name)
    if job.stream:
      include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
      self._stream(job, meta, include_usage)
      return
    item = self._next_event(job)
    if item is None:
      return
    if item[0] == "error":
      self._error(RequestError(f"generation failed: {item[1]}", status=500))
      return
    self._send_json(200, _final(*meta, job, item[1]))

  def _client_gone(self) -> bool:
    try:
      readable, _, _ = select.select([self.connection], [], [], 0)
      return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
    except (OSError, ValueError):
      return True

  def _next_event(self, job: Request):
    """The job's next event, or None (and the job cancelled) once the client has gone."""
    while True:
      try:
        return job.events.get(timeout=POLL_S)
      except queue.Empty:
        if self._client_gone():
          job.cancel()
          self.close_connection = True
          return None

  def _sse(self, obj) -> None:
    data = obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)
    self.wfile.write(f"data: {data}\n\n".encode("utf-8"))
    self.wfile.flush()

  def _stream(self, job: Request, meta: tuple, include_usage: bool) -> None:
    self.send_response(200)
    self.send_header("Content-Type", "text/event-stream")
    self.send_header("Cache-Control", "no-cache")
    self.send_header("Connection", "close")
    self.end_headers()
    self.close_connection = True
    chunk = lambda text, finish, first=False: _chunk(*meta, text, finish, first, include_usage)
    try:
      first = True
      if meta[0] == "chat":
        self._sse(chunk(None, None, first=True))
        first = False
      while True:
        item = self._next_event(job)
        if item is None:
          return
        if item[0] == "token":
          if item[1]:
            self._sse(chunk(item[1], None, first))
            first = False
          continue
        if item[0] == "error":
          self._sse(RequestError(f"generation failed: {item[1]}", status=500).body())
        else:
          self._sse(chunk(None, item[1].finish_reason))
          if include_usage:
            last = chunk(None, None)
            last["choices"], last["usage"] = [], _usage(job, item[1])
            self._sse(last)
        break
      self._sse("[DONE]")
    except OSError:
      job.cancel()  # the client went away: free its slot


def make_handler(server: Server):
  """The request handler class bound to `server`."""
  return type("BoundHandler", (Handler,), {"app": server})


class HTTPServer(socketserver.TCPServer):
  """A TCP server with a fixed pool of worker threads and graceful refusal when it is full.

  Accepted connections wait in a queue of 2 x `workers`; beyond that a connection gets an
  immediate 429 with Retry-After. Closing drains the client's unread input first, so a response
  is never lost to a connection reset.
  """
  allow_reuse_address = True

  def __init__(self, address, handler, app: Server, workers: int = 64, backlog: int = 128):
    self.request_queue_size = backlog  # the listen() backlog
    self.app = app
    self._conns: queue.Queue = queue.Queue(maxsize=2 * workers)
    self._refused: queue.Queue = queue.Queue(maxsize=256)
    super().__init__(address, handler)
    self._threads = [threading.Thread(target=self._serve_connections, name=f"http-{i}",
                                      daemon=True) for i in range(workers)]
    self._threads.append(threading.Thread(target=self._refuse_connections, daemon=True))
    for t in self._threads:
      t.start()

  def process_request(self, request, client_address):
    try:
      self._conns.put_nowait((request, client_address))
    except queue.Full:
      self.app.busy_connections += 1
      try:
        self._refused.put_nowait(request)
      except queue.Full:
        self.close_request(request)

  def _serve_connections(self) -> None:
    while True:
      item = self._conns.get()
      if item is None:
        return
      request, address = item
      try:
        self.finish_request(request, address)
      except Exception:  # pylint: disable=broad-except
        self.handle_error(request, address)
      finally:
        self.shutdown_request(request)

  def _refuse_connections(self) -> None:
    err = RequestError(f"the server is busy (every worker is serving a connection); retry after "
                       f"{RETRY_AFTER_S} s", status=429, code="rate_limit_exceeded")
    data = json.dumps(err.body()).encode()
    head = (f"HTTP/1.1 429 Too Many Requests\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\nRetry-After: {RETRY_AFTER_S}\r\n"
            f"Connection: close\r\n\r\n").encode()
    while True:
      request = self._refused.get()
      if request is None:
        return
      try:
        request.settimeout(2.0)
        request.sendall(head + data)
      except OSError:
        pass
      self.shutdown_request(request)

  def shutdown_request(self, request):
    try:
      request.shutdown(socket.SHUT_WR)
      request.settimeout(LINGER_S)
      deadline, drained = time.monotonic() + LINGER_S, 0
      while time.monotonic() < deadline and drained < MAX_BODY_BYTES:
        data = request.recv(65536)
        if not data:
          break
        drained += len(data)
    except OSError:
      pass
    self.close_request(request)

  def handle_error(self, request, client_address):
    if self.app.verbose:
      super().handle_error(request, client_address)

  def server_close(self):
    super().server_close()
    for _ in self._threads[:-1]:
      self._conns.put(None)
    self._refused.put(None)


def make_server(model: loading.LoadedModel, host: str = "127.0.0.1", port: int = 8000,
                max_batch: int = 8, batch_wait_ms: float = 10.0,
                model_name: Optional[str] = None, *, max_queue: int = 64, workers: int = 64,
                backlog: int = 128, request_timeout: float = 30.0, idle_timeout: float = 5.0,
                api_key: Optional[str] = None, steps_per_sync: int = 1,
                max_context: Optional[int] = None) -> tuple[HTTPServer, Server]:
  """An HTTP server (not yet serving) and its `Server`; port 0 picks a free port."""
  srv = Server(model, max_batch=max_batch, batch_wait_ms=batch_wait_ms, model_name=model_name,
               max_queue=max_queue, api_key=api_key, request_timeout=request_timeout,
               idle_timeout=idle_timeout, steps_per_sync=steps_per_sync, max_context=max_context)
  httpd = HTTPServer((host, port), make_handler(srv), srv, workers=workers, backlog=backlog)
  return httpd, srv


def _is_loopback(host: str) -> bool:
  if host == "localhost":
    return True
  try:
    return ipaddress.ip_address(host).is_loopback
  except ValueError:
    return False


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m baichuan_jax.serve", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  loading.add_model_flags(p)
  p.add_argument("--host", default="127.0.0.1",
                 help="address to bind (default: %(default)s, this machine only)")
  p.add_argument("--port", type=int, default=8000, help="port (default: %(default)s)")
  p.add_argument("--max-batch", "--slots", type=int, default=8,
                 help="decode slots: most requests generated together (default: %(default)s)")
  p.add_argument("--batch-wait-ms", type=float, default=10.0,
                 help="when idle, how long a first request waits for others to start with it "
                      "(default: %(default)s)")
  p.add_argument("--max-queue", type=int, default=64,
                 help="requests waiting for a slot before new ones get 429 (default: %(default)s)")
  p.add_argument("--workers", type=int, default=64,
                 help="threads serving connections (default: %(default)s)")
  p.add_argument("--backlog", type=int, default=128,
                 help="listen backlog of the socket (default: %(default)s)")
  p.add_argument("--request-timeout", type=float, default=30.0,
                 help="seconds for a request's headers and body to arrive (default: %(default)s)")
  p.add_argument("--idle-timeout", type=float, default=5.0,
                 help="seconds a connection may stay silent (default: %(default)s)")
  p.add_argument("--steps-per-sync", type=int, default=1,
                 help="decode steps between host round trips (default: %(default)s)")
  p.add_argument("--api-key", default=os.environ.get(API_KEY_ENV),
                 help=f"require 'Authorization: Bearer KEY' (default: ${API_KEY_ENV}, else none)")
  p.add_argument("--model-name", default=None,
                 help="model id reported by /v1/models and in responses (default: the checkpoint "
                      "folder's name)")
  p.add_argument("--max-context", type=int, default=None,
                 help="tokens per request (prompt + completion); the KV cache holds this many per "
                      f"slot (default: the model's max_seq_len, at most {DEFAULT_MAX_CONTEXT})")
  p.add_argument("--verbose", action="store_true", help="log every request")
  return p


def main(argv: Optional[list[str]] = None) -> int:
  p = _parser()
  args = p.parse_args(argv)
  for name in ("max_batch", "workers", "backlog", "steps_per_sync"):
    if getattr(args, name) < 1:
      p.error(f"--{name.replace('_', '-')}={getattr(args, name)} must be >= 1")
  if args.max_queue < 0 or args.request_timeout <= 0 or args.idle_timeout <= 0:
    p.error("--max-queue must be >= 0 and the timeouts > 0")
  if not _is_loopback(args.host) and not args.api_key:
    print(f"warning: listening on {args.host} without an API key: anyone who can reach this "
          f"port can use the model (set --api-key or ${API_KEY_ENV})", file=sys.stderr)
  if args.max_context is not None and args.max_context < 2:
    p.error(f"--max-context={args.max_context} must be >= 2")
  try:
    model = loading.from_args(args)
    context_length(model.cfg, args.max_context)
  except (ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  httpd, srv = make_server(
      model, args.host, args.port, args.max_batch, args.batch_wait_ms,
      args.model_name or short_name(model.source), max_queue=args.max_queue,
      workers=args.workers, backlog=args.backlog, request_timeout=args.request_timeout,
      idle_timeout=args.idle_timeout, api_key=args.api_key, steps_per_sync=args.steps_per_sync,
      max_context=args.max_context)
  srv.verbose = args.verbose
  gib = kv_cache_bytes(model.cfg, args.max_batch, srv.max_context) / 2**30
  print(f"serving {model.source} as {srv.model_name!r} on http://{args.host}:"
        f"{httpd.server_address[1]}/v1 ({args.max_batch} decode slots x {srv.max_context} "
        f"tokens, KV cache {gib:.2f} GiB)", file=sys.stderr)
  try:
    httpd.serve_forever()
  except KeyboardInterrupt:
    pass
  finally:
    srv.close()
    httpd.server_close()
  return 0


if __name__ == "__main__":
  sys.exit(main())
