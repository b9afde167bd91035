"""Load benchmark of the OpenAI-compatible server: concurrent clients, tokens/s, latency, TTFT.

    python benchmarks/serve_load.py                       # tiny random-init model, CPU
    python benchmarks/serve_load.py --concurrency 1 4 16 64 --new-tokens 64 --json out.json
    python benchmarks/serve_load.py --preset baichuan2-7b --slots 64 --dtype bfloat16   # GPU

The server runs in a child process (so the clients' Python threads do not compete with it for the
GIL), with a random-init model of `--preset` and a small SentencePiece tokenizer trained on the
standard library's documentation (no download). For every concurrency level C it sends
`max(C, --min-requests)` streaming `/v1/completions` requests (greedy, `--new-tokens` each, prompts
of 8-24 words) from C client threads, each thread one request after another, and reports:

* tokens/s: completion tokens of all requests (from `usage`) / wall time of the level;
* latency p50/p95: request sent -> `[DONE]`; TTFT p50/p95: request sent -> first content chunk;
* errors: any non-200 answer, reset connection or malformed stream.

Level 1 is the one-at-a-time baseline: the same requests sent sequentially. Afterwards it checks
cancellation: `--abandon` clients start 200-token streams and hang up after the first chunk, and
one normal request is timed right after them.
"""

from __future__ import annotations

import argparse
import http.client
import json
import multiprocessing as mp
import os
import platform
import sys
import threading
import time

import numpy as np

WORDS = ("the object list tuple class loop value function module string number dict set type "
         "return yield import error").split()


def _serve(args, port_q):
  if args.src:  # another version of the package (e.g. `git archive COMMIT baichuan_jax`)
    sys.path.insert(0, args.src)
  import functools  # pylint: disable=import-outside-toplevel
  import inspect  # pylint: disable=import-outside-toplevel
  import io  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  import pydoc_data.topics  # pylint: disable=import-outside-toplevel
  import sentencepiece as spm  # pylint: disable=import-outside-toplevel
  from baichuan_jax import configs, serve  # pylint: disable=import-outside-toplevel
  from baichuan_jax.infer.loading import LoadedModel  # pylint: disable=import-outside-toplevel
  from baichuan_jax.model import init_params  # pylint: disable=import-outside-toplevel
  from baichuan_jax.tokenizer import Tokenizer, training  # pylint: disable=import-outside-toplevel
  text = "".join(pydoc_data.topics.topics.values())[:60000].splitlines()
  buf = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter([t for t in text if t.strip()]), model_writer=buf, vocab_size=700,
      model_type="bpe", byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
      control_symbols=training.CONTROL_SYMBOLS,  # ids 3..194 reserved, <user> 195, <assistant> 196
      hard_vocab_limit=False, minloglevel=2)
  path = os.path.join(args.workdir, "tokenizer.model")
  with open(path, "wb") as f:
    f.write(buf.getvalue())
  tok = Tokenizer(path)
  cfg = configs.get(args.preset, dtype=args.dtype, vocab_size=max(tok.vocab_size, 700))
  params = jax.jit(functools.partial(init_params, cfg))(jax.random.PRNGKey(0))
  kw = dict(max_queue=args.max_queue, workers=args.workers, steps_per_sync=args.steps_per_sync)
  accepted = inspect.signature(serve.make_server).parameters
  kw = {k: v for k, v in kw.items() if k in accepted}  # an older server takes fewer settings
  httpd, _ = serve.make_server(LoadedModel(cfg, params, tok, args.preset), "127.0.0.1", 0,
                               max_batch=args.slots, batch_wait_ms=0, **kw)
  print(f"serving {serve.__file__}", file=sys.stderr, flush=True)
  port_q.put(httpd.server_address[1])
  httpd.serve_forever()


def _request(port, prompt, n_new, stats):
  t0 = time.perf_counter()
  conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
  body = json.dumps({"model": "m", "prompt": prompt, "max_tokens": n_new, "temperature": 0,
                     "stream": True, "stream_options": {"include_usage": True}})
  try:
    conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
    r = conn.getresponse()
    if r.status != 200:
      stats["errors"].append(f"HTTP {r.status}: {r.read()[:200]!r}")
      return
    first, tokens, done = None, 0, False
    for line in r:
      if not line.startswith(b"data: "):
        continue
      data = line[6:].strip()
      if data == b"[DONE]":
        done = True
        break
      chunk = json.loads(data)
      if chunk.get("usage"):
        tokens = chunk["usage"]["completion_tokens"]
      elif first is None and chunk["choices"] and chunk["choices"][0]["text"]:
        first = time.perf_counter() - t0
    if not done:
      stats["errors"].append("stream ended without [DONE]")
      return
    stats["latency"].append(time.perf_counter() - t0)
    stats["ttft"].append(first if first is not None else time.perf_counter() - t0)
    stats["tokens"].append(tokens)
  except (OSError, http.client.HTTPException, ValueError) as e:
    stats["errors"].append(repr(e))
  finally:
    conn.close()


def _prompt(i):
  rng = np.random.default_rng(i)
  return " ".join(rng.choice(WORDS, int(rng.integers(8, 25))))


def run_level(port, conc, n_requests, n_new):
  stats = {"latency": [], "ttft": [], "tokens": [], "errors": []}
  jobs = list(range(n_requests))
  lock = threading.Lock()

  def client():
    while True:
      with lock:
        if not jobs:
          return
        i = jobs.pop()
      _request(port, _prompt(i), n_new, stats)

  t0 = time.perf_counter()
  threads = [threading.Thread(target=client) for _ in range(conc)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  wall = time.perf_counter() - t0
  pct = lambda xs, q: round(float(np.percentile(xs, q)), 3) if xs else None
  return {"concurrency": conc, "requests": n_requests, "errors": len(stats["errors"]),
          "error_samples": stats["errors"][:3], "wall_s": round(wall, 2),
          "tokens": int(sum(stats["tokens"])),
          "tokens_per_s": round(sum(stats["tokens"]) / wall, 1),
          "latency_p50_s": pct(stats["latency"], 50), "latency_p95_s": pct(stats["latency"], 95),
          "ttft_p50_s": pct(stats["ttft"], 50), "ttft_p95_s": pct(stats["ttft"], 95)}


def abandon_then_time(port, n_abandon, n_new):
  """`n_abandon` clients hang up after their first chunk; returns the next request's latency."""
  for i in range(n_abandon):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    conn.request("POST", "/v1/completions", json.dumps(
        {"prompt": _prompt(i), "max_tokens": 200, "temperature": 0, "stream": True}),
                 {"Content-Type": "application/json"})
    r = conn.getresponse()
    r.readline()
    r.close()
    conn.close()
  stats = {"latency": [], "ttft": [], "tokens": [], "errors": []}
  _request(port, _prompt(999), n_new, stats)
  return {"abandoned": n_abandon, "next_request_latency_s": round(stats["latency"][0], 3)
          if stats["latency"] else None, "errors": stats["errors"]}


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--preset", default="tiny")
  p.add_argument("--dtype", default="float32")
  p.add_argument("--slots", type=int, default=16)
  p.add_argument("--max-queue", type=int, default=64)
  p.add_argument("--workers", type=int, default=96)
  p.add_argument("--steps-per-sync", type=int, default=1)
  p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
  p.add_argument("--min-requests", type=int, default=16)
  p.add_argument("--new-tokens", type=int, default=64)
  p.add_argument("--abandon", type=int, default=8)
  p.add_argument("--json", default=None, help="also write the results here")
  p.add_argument("--workdir", default="/tmp/serve_load")
  p.add_argument("--src", default=None,
                 help="directory holding another version of the baichuan_jax package to serve")
  args = p.parse_args(argv)
  os.makedirs(args.workdir, exist_ok=True)
  ctx = mp.get_context("spawn")
  port_q = ctx.Queue()
  server = ctx.Process(target=_serve, args=(args, port_q), daemon=True)
  server.start()
  port = port_q.get(timeout=900)
  try:
    # Warm-up: every prompt of the levels once, so each prefill bucket compiles before timing.
    run_level(port, 16, max(args.concurrency + [args.min_requests]), args.new_tokens)
    results = [run_level(port, c, max(c, args.min_requests), args.new_tokens)
               for c in args.concurrency]
    for r in results:
      print(json.dumps(r), flush=True)
    abandon = abandon_then_time(port, args.abandon, args.new_tokens)
    print(json.dumps(abandon), flush=True)
  finally:
    server.terminate()
  import jax  # pylint: disable=import-outside-toplevel
  out = {"results": results, "abandon": abandon, "args": vars(args),
         "platform": platform.platform(), "python": sys.version.split()[0],
         "jax": jax.__version__, "cpu_count": os.cpu_count(), "load_avg": os.getloadavg()}
  by_c = {r["concurrency"]: r for r in results}
  if 1 in by_c and 16 in by_c:
    out["speedup_16_vs_sequential"] = round(by_c[16]["tokens_per_s"] / by_c[1]["tokens_per_s"], 2)
    print(f"16 concurrent vs sequential: {out['speedup_16_vs_sequential']}x aggregate tokens/s")
  if args.json:
    with open(args.json, "w", encoding="utf-8") as f:
      json.dump(out, f, indent=1)


if __name__ == "__main__":
  main()
