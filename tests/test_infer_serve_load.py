"""The server under load and abuse, on 127.0.0.1 with a tiny random-init model: request smuggling,
malformed and hostile bodies, API keys, 429 under a full queue, cancellation on disconnect,
slow clients, metrics, and a bounded soak with the official `openai` client."""

import functools
import http.client
import json
import socket
import threading
import time

import jax
import pytest

from baichuan_jax import configs
from baichuan_jax import serve
from baichuan_jax.infer import generate
from baichuan_jax.infer.loading import LoadedModel
from baichuan_jax.model import init_params
from baichuan_jax.tokenizer import Tokenizer
from infer_helpers import train_sp_model

openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
  tok = Tokenizer(train_sp_model(tmp_path_factory.mktemp("tok") / "tokenizer.model"))
  cfg = configs.get("tiny", num_layers=2, dtype="float32", vocab_size=tok.vocab_size)
  cfg.init_std = 0.08
  params = jax.jit(functools.partial(init_params, cfg))(jax.random.PRNGKey(0))
  return LoadedModel(cfg, params, tok, "/some/where/tiny-workdir/checkpoints")


def _start(model, **kw):
  httpd, srv = serve.make_server(model, "127.0.0.1", 0, **kw)
  threading.Thread(target=httpd.serve_forever, daemon=True).start()
  return httpd, srv, httpd.server_address[1]


@pytest.fixture(scope="module")
def running(model):
  httpd, srv, port = _start(model, max_batch=4, batch_wait_ms=0, max_queue=64, workers=12,
                            request_timeout=3.0, idle_timeout=1.0)
  yield srv, port
  httpd.shutdown()
  httpd.server_close()
  srv.close()


def _raw(port, data: bytes, timeout=30.0) -> bytes:
  """Sends raw bytes and returns everything the server sends until it closes (or times out)."""
  with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
    s.sendall(data)
    s.shutdown(socket.SHUT_WR)
    chunks = []
    try:
      while True:
        c = s.recv(65536)
        if not c:
          break
        chunks.append(c)
    except socket.timeout:
      pass
  return b"".join(chunks)


def _responses(raw: bytes) -> list:
  """(status, json body) of each HTTP response in `raw`."""
  out = []
  while raw.startswith(b"HTTP/1."):
    head, _, rest = raw.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = int([ln.split(b":", 1)[1] for ln in head.split(b"\r\n")
                  if ln.lower().startswith(b"content-length:")][0])
    out.append((status, json.loads(rest[:length])))
    raw = rest[length:]
  assert raw == b"", raw[:200]
  return out


def _post(port, path, body, headers=None):
  conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
  data = body if isinstance(body, bytes) else json.dumps(body).encode()
  conn.request("POST", path, body=data, headers={"Content-Type": "application/json",
                                                 **(headers or {})})
  r = conn.getresponse()
  out = r.status, dict(r.getheaders()), json.loads(r.read())
  conn.close()
  return out


def test_early_replies_never_parse_the_body_as_a_request(running):
  _, port = running
  smuggled = b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n"
  # A POST to an unknown path on a kept-alive connection: its body is consumed, so the only
  # second response is to the real follow-up request (the body is never executed).
  req = (b"POST /v1/nope HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(smuggled)
         + smuggled + b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
  got = _responses(_raw(port, req))
  assert [s for s, _ in got] == [404, 200] and got[1][1]["status"] == "ok"
  # Chunked bodies are refused and the connection closed: the chunk data is never parsed.
  req = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
         b"%x\r\n%s\r\n0\r\n\r\n" % (len(smuggled), smuggled))
  got = _responses(_raw(port, req))
  assert [s for s, _ in got] == [411] and "Content-Length" in got[0][1]["error"]["message"]
  # An oversized body is answered 413 without reading it, and the connection closes.
  req = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999\r\n\r\n" + smuggled
  assert [s for s, _ in _responses(_raw(port, req))] == [413]
  # Two different Content-Length headers: 400 and close.
  req = (b"POST /v1/nope HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 40\r\n\r\n"
         + smuggled)
  assert [s for s, _ in _responses(_raw(port, req))] == [400]


def test_hostile_bodies_and_methods_get_json_errors(running):
  _, port = running
  deep = b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
  status, _, body = _post(port, "/v1/completions", deep)
  assert status == 400 and "nested too deeply" in body["error"]["message"]
  lone = b'{"messages": [{"role": "user", "content": "a\\ud800b"}]}'
  status, _, body = _post(port, "/v1/chat/completions", lone)
  assert status == 400 and body["error"]["param"] == "messages"
  assert "surrogate" in body["error"]["message"]
  for n in (True, 2, "1"):
    status, _, body = _post(port, "/v1/completions", {"prompt": "x", "n": n})
    assert status == 400 and body["error"]["param"] == "n", n
  for method in ("PUT", "DELETE", "PATCH"):
    got = _responses(_raw(port, f"{method} /v1/completions HTTP/1.1\r\nHost: x\r\n"
                                "Connection: close\r\n\r\n".encode()))
    assert got[0][0] == 405 and "only accepts POST" in got[0][1]["error"]["message"]
  got = _responses(_raw(port, b"FROB / HTTP/1.1\r\nHost: x\r\n\r\n"))
  assert got[0][0] == 501 and got[0][1]["error"]["type"] == "invalid_request_error"
  long_header = b"GET /health HTTP/1.1\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n"
  got = _responses(_raw(port, long_header))
  assert got[0][0] == 431 and "too large" in got[0][1]["error"]["message"]
  many = b"GET /health HTTP/1.1\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(120)) + b"\r\n"
  assert _responses(_raw(port, many))[0][0] == 431


def test_api_key_is_a_bearer_token(model):
  httpd, srv, port = _start(model, api_key="s3cret", workers=2)
  try:
    base = f"http://127.0.0.1:{port}/v1"
    bad = openai.OpenAI(base_url=base, api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
      bad.models.list()
    status, headers, body = _post(port, "/v1/completions", {"prompt": "x"})
    assert status == 401 and body["error"]["code"] == "invalid_api_key"
    assert headers["WWW-Authenticate"] == "Bearer"
    good = openai.OpenAI(base_url=base, api_key="s3cret", max_retries=0)
    assert [m.id for m in good.models.list().data] == ["tiny-workdir"]
    # /health stays open (for load balancers); /metrics needs the key.
    assert _responses(_raw(port, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"))[0][0] == 200
    assert _responses(_raw(port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"))[0][0] == 401
  finally:
    httpd.shutdown()
    httpd.server_close()
    srv.close()


def test_model_id_usage_and_metrics(running, model):
  srv, port = running
  client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0)
  r = client.completions.create(model="/etc/passwd", prompt="The object", max_tokens=5,
                                temperature=0)
  assert r.model == "tiny-workdir" == serve.short_name("/a/b/tiny-workdir/checkpoints/")
  ids = [model.cfg.bos_id] + model.tokenizer.encode("The object")
  ref = generate(model.cfg, model.params, [ids], max_new_tokens=5, decode=model.tokenizer.decode)
  assert r.choices[0].text == ref[0].text
  assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), len(ref[0].tokens))
  chunks = list(client.chat.completions.create(
      model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=4, stream=True,
      stream_options={"include_usage": True}))
  assert chunks[-1].usage.completion_tokens >= 1 and not chunks[-1].choices
  assert all(c.usage is None for c in chunks[:-1]) and {c.model for c in chunks} == {"tiny-workdir"}
  conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
  conn.request("GET", "/metrics")
  text = conn.getresponse().read().decode()
  conn.close()
  values = {ln.split(" ")[0]: float(ln.split(" ")[1]) for ln in text.splitlines()
            if ln and not ln.startswith("#")}
  assert values["baichuan_jax_slots"] == 4 and values["baichuan_jax_queue_depth"] == 0
  assert values["baichuan_jax_generated_tokens_total"] >= len(ref[0].tokens) + 1
  assert values["baichuan_jax_time_to_first_token_seconds_count"] >= 2
  assert "baichuan_jax_tokens_per_second" in values and "baichuan_jax_active_slots" in values


def _wait_for(cond, timeout=120.0):
  end = time.monotonic() + timeout
  while not cond():
    assert time.monotonic() < end, "timed out"
    time.sleep(0.01)


def test_full_queue_gets_429_and_disconnects_cancel(model):
  httpd, srv, port = _start(model, max_batch=1, batch_wait_ms=0, max_queue=1, workers=6)
  eng = srv.engine
  try:
    long = {"prompt": "The object", "max_tokens": 240, "temperature": 0}
    # A streaming client takes the only slot, a second request waits in the queue.
    stream = socket.create_connection(("127.0.0.1", port), timeout=120)
    data = json.dumps({**long, "stream": True}).encode()
    stream.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                   b"\r\nContent-Length: %d\r\n\r\n%s" % (len(data), data))
    got = b""
    while b"data: " not in got:
      got += stream.recv(4096)
    assert got.startswith(b"HTTP/1.1 200")
    waiting = []
    t = threading.Thread(target=lambda: waiting.append(_post(port, "/v1/completions", long)))
    t.start()
    _wait_for(lambda: eng.queue_depth() == 1)
    status, headers, body = _post(port, "/v1/completions", long)
    assert status == 429 and headers["Retry-After"] == "1"
    assert body["error"]["code"] == "rate_limit_exceeded"
    # The streaming client hangs up: its slot goes to the waiting request.
    stream.close()
    _wait_for(lambda: eng.metrics.cancelled == 1 and eng.queue_depth() == 0)
    # A non-streaming client that gives up cancels too.
    with socket.create_connection(("127.0.0.1", port)) as s:
      data = json.dumps(long).encode()
      s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (len(data), data))
      _wait_for(lambda: eng.queue_depth() == 1)
    _wait_for(lambda: eng.metrics.cancelled == 2)
    t.join(timeout=120)
    assert waiting[0][0] == 200 and waiting[0][2]["usage"]["completion_tokens"] >= 1
    _wait_for(lambda: eng.active_slots() == 0)
  finally:
    httpd.shutdown()
    httpd.server_close()
    srv.close()


def test_slow_clients_cannot_hold_the_workers(running):
  srv, port = running
  threads_before = threading.active_count()
  socks = []
  for _ in range(40):  # more half-sent requests than workers (12) and their waiting queue (24)
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Le")
    socks.append(s)
  try:
    assert threading.active_count() <= threads_before + 1  # no thread per connection
    start = time.monotonic()
    _wait_for(lambda: _health_ok(port), timeout=60)
    # Served once the slow clients time out (request timeout 3 s, idle timeout 1 s), not never.
    assert time.monotonic() - start < 30
    statuses = set()
    for s in socks:
      s.settimeout(30)
      got = s.recv(65536)
      statuses.add(int(got.split(b" ", 2)[1]) if got else None)
    assert statuses <= {408, 429}, statuses
  finally:
    for s in socks:
      s.close()


def _health_ok(port) -> bool:
  try:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    conn.request("GET", "/health")
    ok = conn.getresponse().status == 200
    conn.close()
    return ok
  except OSError:
    return False


def _rss_mb() -> float:
  with open("/proc/self/statm", encoding="ascii") as f:
    return int(f.read().split()[1]) * 4096 / 2**20


def test_soak_200_mixed_requests(running, model):
  srv, port = running
  client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0,
                         timeout=300)
  questions = ["What is a list?", "Define a tuple.", "Where is the loop?", "Why use a class?"]
  errors, finishes = [], []

  def one(i):
    msgs = [{"role": "user", "content": questions[i % 4]}]
    kw = dict(max_tokens=1 + i % 6, temperature=0.0 if i % 3 else 0.8, seed=i)
    try:
      if i % 4 == 0:
        chunks = list(client.chat.completions.create(model="m", messages=msgs, stream=True, **kw))
        finishes.append(chunks[-1].choices[0].finish_reason)
      elif i % 4 == 1:
        finishes.append(client.completions.create(model="m", prompt=questions[i % 4],
                                                  **kw).choices[0].finish_reason)
      else:
        finishes.append(client.chat.completions.create(model="m", messages=msgs,
                                                       **kw).choices[0].finish_reason)
    except Exception as e:  # pylint: disable=broad-except
      errors.append(repr(e))

  def run(indices):
    threads = [threading.Thread(target=lambda k=k: [one(i) for i in indices[k::8]])
               for k in range(8)]
    for t in threads:
      t.start()
    for t in threads:
      t.join()

  run(list(range(40)))  # warm-up: every compiled shape exists afterwards
  rss, threads = _rss_mb(), threading.active_count()
  run(list(range(40, 240)))
  assert errors == [] and len(finishes) == 240
  assert set(finishes) <= {"stop", "length"}
  assert _rss_mb() - rss < 64, (rss, _rss_mb())
  assert threading.active_count() <= threads + 1
  _wait_for(lambda: srv.engine.active_slots() == 0 and srv.engine.queue_depth() == 0)


def test_cli_flags_and_the_open_bind_warning(tmp_path, capsys, monkeypatch):
  monkeypatch.delenv(serve.API_KEY_ENV, raising=False)
  with pytest.raises(SystemExit):
    serve.main(["--checkpoint", str(tmp_path), "--workers", "0"])
  assert "--workers=0 must be >= 1" in capsys.readouterr().err
  # Binding beyond localhost without a key warns (the missing checkpoint then fails cleanly).
  assert serve.main(["--checkpoint", str(tmp_path / "none"), "--host", "0.0.0.0"]) == 2
  err = capsys.readouterr().err
  assert "warning: listening on 0.0.0.0 without an API key" in err and "error:" in err
  monkeypatch.setenv(serve.API_KEY_ENV, "k")
  assert serve.main(["--checkpoint", str(tmp_path / "none"), "--host", "0.0.0.0"]) == 2
  assert "warning" not in capsys.readouterr().err
  args = serve._parser().parse_args(["--hf", "d", "--slots", "3", "--max-queue", "5"])  # pylint: disable=protected-access
  assert (args.max_batch, args.max_queue, args.api_key) == (3, 5, "k")


def test_kv_cache_is_sized_to_the_served_context_not_the_declared_maximum(model):
  """A config may declare a context far beyond what fits (max_seq_len 2**20 here): the engine's
  cache holds DEFAULT_MAX_CONTEXT tokens per slot, requests past it get a 400 naming the context,
  and --max-context picks another size (never above max_seq_len)."""
  cfg = model.cfg.copy_and_resolve_references()
  cfg.max_seq_len = 2**20
  big = LoadedModel(cfg, model.params, model.tokenizer, model.source)
  srv = serve.Server(big, max_batch=2)
  try:
    assert srv.max_context == serve.DEFAULT_MAX_CONTEXT == 4096
    k = srv.engine.state.cache.k[0]
    assert k.shape[0] == 2 and k.shape[2] == 4096  # [slots, kv_heads, len, head_dim]
    kv_heads, head_dim = cfg.num_kv_heads, cfg.hidden_size // cfg.num_heads
    assert serve.kv_cache_bytes(cfg, 2, 4096) == 2 * cfg.num_layers * 2 * 4096 * kv_heads * head_dim * 4
    with pytest.raises(serve.RequestError, match=r"allowed \[1, 4095\]"):
      srv.parse_completion({"prompt": "hi", "max_tokens": 5000})
    with pytest.raises(serve.RequestError, match="exceed the model context of 4096 tokens"):
      srv.parse_completion({"prompt": "hello there", "max_tokens": 4095})
  finally:
    srv.close()
  small = serve.Server(big, max_batch=1, max_context=64)
  try:
    assert small.engine.state.cache.k[0].shape[2] == 64
  finally:
    small.close()
  with pytest.raises(ValueError, match="--max-context=99 exceeds the model's max_seq_len=32"):
    cfg2 = model.cfg.copy_and_resolve_references()
    cfg2.max_seq_len = 32
    serve.context_length(cfg2, 99)
