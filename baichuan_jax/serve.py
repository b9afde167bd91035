"""An OpenAI-compatible HTTP server: `/v1/chat/completions` and `/v1/completions`.

    python -m baichuan_jax.serve --checkpoint WORKDIR [--port 8000] [--quantize int8]
    python -m baichuan_jax.serve --hf Baichuan2-7B-Chat --host 0.0.0.0   # listen beyond localhost

Any OpenAI client works against it (`base_url="http://127.0.0.1:8000/v1"`, any api key), including
streaming (`"stream": true` gives server-sent events `data: {chunk}` ... `data: [DONE]`).

Requests accept the OpenAI fields `model`, `messages` / `prompt`, `max_tokens`
(`max_completion_tokens`), `temperature` (0 = greedy), `top_p`, `stop`, `seed`, `stream`,
`stream_options`, `n` (1 only), `user`, plus the Hugging Face / Baichuan extensions `top_k` and
`repetition_penalty`. Chat defaults are Baichuan 2's generation config (temperature 0.3, top-k 5,
top-p 0.85, repetition penalty 1.05); completions default to greedy with max_tokens 16, as OpenAI.
A chat reply ends at `</s>` or a turn marker, so the model never writes the user's next turn.

Batching: HTTP handlers run in threads (`ThreadingHTTPServer`) and put requests on a queue; one
worker thread takes whatever is waiting (up to `--max-batch`, after waiting `--batch-wait-ms` for
more to arrive) and generates them together in one left-padded batch with per-row sampling
settings. The batch is padded to a power of two rows and the KV cache to the model context, so the
server compiles a handful of shapes and then reuses them.

Bad requests get HTTP 400 (404 for unknown paths, 405 for wrong methods, 413 for oversized bodies)
with an OpenAI-style body `{"error": {"message", "type", "param", "code"}}` naming the field and
what is allowed: malformed JSON, unknown fields, out-of-range sampling values, prompts that do not
fit the context. A failure inside generation fails only the requests of that batch (HTTP 500);
the server keeps serving.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import queue
import random
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Optional

from baichuan_jax.infer import chat_template
from baichuan_jax.infer import loading

MAX_BODY_BYTES = 4 << 20
_COMMON = {"model", "max_tokens", "temperature", "top_p", "top_k", "repetition_penalty", "stop",
           "seed", "stream", "stream_options", "n", "user"}
CHAT_FIELDS = _COMMON | {"messages", "max_completion_tokens"}
COMPLETION_FIELDS = _COMMON | {"prompt", "echo"}


class RequestError(Exception):
  """A client error: HTTP status, message and the offending field."""

  def __init__(self, message: str, param: Optional[str] = None, status: int = 400,
               code: Optional[str] = None):
    super().__init__(message)
    self.status, self.param, self.code = status, param, code

  def body(self) -> dict:
    kind = "invalid_request_error" if self.status < 500 else "server_error"
    return {"error": {"message": str(self), "type": kind, "param": self.param, "code": self.code}}


@dataclasses.dataclass
class Job:
  """One prompt to generate, with its settings and where its results go."""
  ids: list
  max_new: int
  temperature: float
  top_k: int
  top_p: float
  repetition_penalty: float
  seed: int
  stop_ids: list
  stop_strings: list
  stream: bool
  events: "queue.Queue" = dataclasses.field(default_factory=queue.Queue)


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
  if body.get("n", 1) != 1:
    raise RequestError("'n' must be 1 (one choice per request)", "n")
  if not isinstance(body.get("stream", False), bool):
    raise RequestError("'stream' must be true or false", "stream")
  opts = body.get("stream_options")
  if opts is not None and (not isinstance(opts, dict) or set(opts) - {"include_usage"}):
    raise RequestError("'stream_options' may only hold 'include_usage'", "stream_options")


class Server:
  """The model, its request queue and the batching worker; `handle(path, body)` for each request."""

  def __init__(self, model: loading.LoadedModel, max_batch: int = 8, batch_wait_ms: float = 10.0,
               model_name: Optional[str] = None):
    self.model = model
    self.cfg = model.cfg
    self.max_batch = max_batch
    self.batch_wait = batch_wait_ms / 1000.0
    self.model_name = model_name or "baichuan-jax"
    self.queue: "queue.Queue[Job]" = queue.Queue()
    self.batch_sizes: list[int] = []  # real rows per generated batch (for logs and tests)
    self.verbose = False
    self._stop = threading.Event()
    self.worker = threading.Thread(target=self._work, name="batcher", daemon=True)
    self.worker.start()

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
    ctx = self.cfg.max_seq_len
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

  def parse_chat(self, body) -> Job:
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
    return Job(ids=ids, max_new=max_new, stop_ids=stops, stop_strings=_stops(body),
               stream=body.get("stream", False), **self._sampling(body, True))

  def parse_completion(self, body) -> Job:
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
    return Job(ids=ids, max_new=max_new, stop_ids=[self.cfg.eos_id], stop_strings=_stops(body),
               stream=body.get("stream", False), **self._sampling(body, False))

  # --- batching worker -------------------------------------------------------------------------
  def _take_batch(self) -> list[Job]:
    try:
      first = self.queue.get(timeout=0.1)
    except queue.Empty:
      return []
    jobs = [first]
    deadline = time.monotonic() + self.batch_wait
    while len(jobs) < self.max_batch:
      left = deadline - time.monotonic()
      try:
        jobs.append(self.queue.get(timeout=max(left, 0)) if left > 0 else self.queue.get_nowait())
      except queue.Empty:
        break
    return jobs

  def _work(self) -> None:
    while not self._stop.is_set():
      jobs = self._take_batch()
      if jobs:
        self.run_batch(jobs)

  def run_batch(self, jobs: list[Job]) -> None:
    """Generates `jobs` together; each job's queue receives ("token", text, ...) then ("done", ...)."""
    from baichuan_jax.infer import generate  # pylint: disable=import-outside-toplevel
    self.batch_sizes.append(len(jobs))
    # Pad to a power of two rows (dummy rows generate nothing) so few batch shapes get compiled.
    rows = 1 << (len(jobs) - 1).bit_length()
    pad = rows - len(jobs)
    field = lambda name, dummy: [getattr(j, name) for j in jobs] + [dummy] * pad

    def stream(ev):
      if ev.row < len(jobs) and jobs[ev.row].stream and (ev.text or ev.finish_reason):
        jobs[ev.row].events.put(("token", ev.text, ev.finish_reason))

    try:
      outs = generate(
          self.cfg, self.model.params, field("ids", [self.cfg.pad_id]),
          max_new_tokens=field("max_new", 0), temperature=field("temperature", 0.0),
          top_k=field("top_k", 0), top_p=field("top_p", 1.0),
          repetition_penalty=field("repetition_penalty", 1.0), seed=field("seed", 0),
          stop_token_ids=field("stop_ids", [self.cfg.eos_id]),
          stop_strings=field("stop_strings", []), decode=self.model.tokenizer.decode,
          stream=stream if any(j.stream for j in jobs) else None, max_len=self._cache_len(jobs))
    except Exception as e:  # pylint: disable=broad-except
      for j in jobs:
        j.events.put(("error", RequestError(f"generation failed: {e}", status=500)))
      return
    for j, o in zip(jobs, outs):
      j.events.put(("done", o))

  def _cache_len(self, jobs) -> int:
    # One cache length for (almost) every batch: the context rounded up to the padding multiple,
    # so the compiled shapes only vary with the batch and prompt buckets.
    r16 = lambda n: -(-max(n, 1) // 16) * 16
    need = r16(max(len(j.ids) for j in jobs)) + r16(max(j.max_new for j in jobs))
    return max(r16(self.cfg.max_seq_len), need)

  def submit(self, job: Job) -> Job:
    self.queue.put(job)
    return job

  def close(self) -> None:
    self._stop.set()


# ----------------------------------------------------------------------------------------------
# Responses.


def _usage(job: Job, out) -> dict:
  return {"prompt_tokens": len(job.ids), "completion_tokens": len(out.tokens),
          "total_tokens": len(job.ids) + len(out.tokens)}


def _final(kind: str, rid: str, created: int, model: str, job: Job, out) -> dict:
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
           finish: Optional[str], first: bool = False) -> dict:
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
  return {"id": rid, "object": obj, "created": created, "model": model, "choices": [choice]}


def make_handler(server: Server):
  """The request handler class bound to `server`."""

  class Handler(BaseHTTPRequestHandler):
    """Routes /v1/... requests; every error becomes a JSON error response."""
    protocol_version = "HTTP/1.1"
    server_version = "baichuan-jax"

    def log_message(self, fmt, *args):  # quiet by default; --verbose turns it on
      if getattr(server, "verbose", False):
        super().log_message(fmt, *args)

    def _send_json(self, status: int, obj: dict) -> None:
      data = json.dumps(obj, ensure_ascii=False).encode("utf-8")
      self.send_response(status)
      self.send_header("Content-Type", "application/json")
      self.send_header("Content-Length", str(len(data)))
      self.end_headers()
      self.wfile.write(data)

    def _error(self, err: RequestError) -> None:
      self._send_json(err.status, err.body())

    def do_GET(self):  # noqa: N802 (http.server naming)
      if self.path.rstrip("/") == "/v1/models":
        self._send_json(200, {"object": "list", "data": [
            {"id": server.model_name, "object": "model", "created": 0, "owned_by": "baichuan-jax"}]})
      elif self.path.rstrip("/") in ("/health", ""):
        self._send_json(200, {"status": "ok"})
      elif self.path.rstrip("/") in ("/v1/chat/completions", "/v1/completions"):
        self._error(RequestError(f"{self.path} only accepts POST", status=405))
      else:
        self._error(RequestError(f"unknown path {self.path}", status=404))

    def _read_body(self) -> Any:
      try:
        length = int(self.headers.get("Content-Length", "0"))
      except ValueError as e:
        raise RequestError("invalid Content-Length header") from e
      if length > MAX_BODY_BYTES:
        raise RequestError(f"request body of {length} bytes exceeds the {MAX_BODY_BYTES} byte limit",
                           status=413)
      raw = self.rfile.read(length) if length > 0 else b""
      try:
        return json.loads(raw.decode("utf-8"))
      except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RequestError(f"the request body is not valid JSON: {e}", code="invalid_json") from e

    def do_POST(self):  # noqa: N802
      path = self.path.rstrip("/")
      kind = {"/v1/chat/completions": "chat", "/v1/completions": "completion"}.get(path)
      try:
        if kind is None:
          raise RequestError(f"unknown path {self.path}; use /v1/chat/completions or "
                             "/v1/completions", status=404)
        body = self._read_body()
        job = server.parse_chat(body) if kind == "chat" else server.parse_completion(body)
      except RequestError as e:
        self._error(e)
        return
      model = body.get("model") or server.model_name
      rid = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
      created = int(time.time())
      server.submit(job)
      if job.stream:
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        self._stream(kind, rid, created, model, job, include_usage)
        return
      item = job.events.get()
      if item[0] == "error":
        self._error(item[1])
        return
      self._send_json(200, _final(kind, rid, created, model, job, item[1]))

    def _sse(self, obj) -> None:
      data = obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)
      self.wfile.write(f"data: {data}\n\n".encode("utf-8"))
      self.wfile.flush()

    def _stream(self, kind, rid, created, model, job, include_usage) -> None:
      self.send_response(200)
      self.send_header("Content-Type", "text/event-stream")
      self.send_header("Cache-Control", "no-cache")
      self.send_header("Connection", "close")
      self.end_headers()
      self.close_connection = True
      first = True
      try:
        if kind == "chat":
          self._sse(_chunk(kind, rid, created, model, None, None, first=True))
          first = False
        while True:
          item = job.events.get()
          if item[0] == "token":
            _, text, _ = item
            if text:
              self._sse(_chunk(kind, rid, created, model, text, None, first))
              first = False
          elif item[0] == "error":
            self._sse(item[1].body())
            break
          else:
            out = item[1]
            self._sse(_chunk(kind, rid, created, model, None, out.finish_reason))
            if include_usage:
              chunk = _chunk(kind, rid, created, model, None, None)
              chunk["choices"], chunk["usage"] = [], _usage(job, out)
              self._sse(chunk)
            break
        self._sse("[DONE]")
      except (BrokenPipeError, ConnectionResetError):
        pass  # the client went away; the batch still finishes for the others

  return Handler


def make_server(model: loading.LoadedModel, host: str = "127.0.0.1", port: int = 8000,
                max_batch: int = 8, batch_wait_ms: float = 10.0,
                model_name: Optional[str] = None) -> tuple[ThreadingHTTPServer, Server]:
  """An HTTP server (not yet serving) and its batching `Server`; port 0 picks a free port."""
  srv = Server(model, max_batch=max_batch, batch_wait_ms=batch_wait_ms, model_name=model_name)
  httpd = ThreadingHTTPServer((host, port), make_handler(srv))
  httpd.daemon_threads = True
  return httpd, srv


def main(argv: Optional[list[str]] = None) -> int:
  p = argparse.ArgumentParser(prog="python -m baichuan_jax.serve", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  loading.add_model_flags(p)
  p.add_argument("--host", default="127.0.0.1",
                 help="address to bind (default: %(default)s, this machine only)")
  p.add_argument("--port", type=int, default=8000, help="port (default: %(default)s)")
  p.add_argument("--max-batch", type=int, default=8,
                 help="most requests generated together (default: %(default)s)")
  p.add_argument("--batch-wait-ms", type=float, default=10.0,
                 help="how long the batcher waits for more requests (default: %(default)s)")
  p.add_argument("--model-name", default=None, help="name reported by /v1/models")
  p.add_argument("--verbose", action="store_true", help="log every request")
  args = p.parse_args(argv)
  if args.max_batch < 1:
    p.error(f"--max-batch={args.max_batch} must be >= 1")
  try:
    model = loading.from_args(args)
  except (ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  httpd, srv = make_server(model, args.host, args.port, args.max_batch, args.batch_wait_ms,
                           args.model_name or model.source)
  srv.verbose = args.verbose
  print(f"serving {model.source} on http://{args.host}:{httpd.server_address[1]}/v1 "
        f"(max batch {args.max_batch})", file=sys.stderr)
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
