"""The OpenAI-compatible server, driven by the official `openai` client on localhost: results equal
direct generation, streaming equals the whole reply, concurrent requests share a batch, and bad
requests get a 4xx while the server keeps serving."""

import functools
import http.client
import json
import threading

import jax
import pytest

from baichuan_jax import configs
from baichuan_jax import serve
from baichuan_jax.infer import build_chat_prompt, chat_reply, generate
from baichuan_jax.infer.loading import LoadedModel
from baichuan_jax.model import init_params
from baichuan_jax.tokenizer import Tokenizer
from infer_helpers import train_sp_model

openai = pytest.importorskip("openai")

CTX = 256  # tiny model context; the server's cache length
GREEDY_CHAT = {"temperature": 0.0, "repetition_penalty": 1.05}  # the server's chat default penalty


@pytest.fixture(scope="module")
def running(tmp_path_factory):
  tok = Tokenizer(train_sp_model(tmp_path_factory.mktemp("tok") / "tokenizer.model"))
  # The model's vocabulary is the tokenizer's, so every sampled id decodes.
  cfg = configs.get("tiny", num_layers=2, dtype="float32", vocab_size=tok.vocab_size)
  cfg.init_std = 0.08
  params = jax.jit(functools.partial(init_params, cfg))(jax.random.PRNGKey(0))
  model = LoadedModel(cfg, params, tok, "tiny")
  httpd, srv = serve.make_server(model, "127.0.0.1", 0, max_batch=4, batch_wait_ms=400,
                                 model_name="tiny")
  thread = threading.Thread(target=httpd.serve_forever, daemon=True)
  thread.start()
  port = httpd.server_address[1]
  client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0,
                         timeout=300)
  yield model, srv, client, port
  httpd.shutdown()
  srv.close()


def _chat_ref(model, msgs, n):
  return chat_reply(model.cfg, model.params, model.tokenizer, msgs, max_new_tokens=n,
                    max_len=CTX, **GREEDY_CHAT)


def test_chat_completion_equals_direct_generation(running):
  model, _, client, _ = running
  msgs = [{"role": "user", "content": "What is a list?"}]
  resp = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=8, temperature=0)
  ref = _chat_ref(model, msgs, 8)
  assert resp.choices[0].message.content == ref.text
  assert resp.choices[0].finish_reason == ref.finish_reason
  prompt = build_chat_prompt(msgs, model.tokenizer.encode)
  assert resp.usage.prompt_tokens == len(prompt)
  assert resp.usage.completion_tokens == len(ref.tokens)
  assert resp.object == "chat.completion" and resp.model == "tiny"


def test_streaming_deltas_add_up_to_the_reply(running):
  model, _, client, _ = running
  msgs = [{"role": "user", "content": "What is a list?"}]
  chunks = list(client.chat.completions.create(
      model="tiny", messages=msgs, max_tokens=8, temperature=0, stream=True,
      stream_options={"include_usage": True}))
  text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
  ref = _chat_ref(model, msgs, 8)
  assert text == ref.text
  finals = [c.choices[0].finish_reason for c in chunks if c.choices]
  assert finals[-1] == ref.finish_reason and all(f is None for f in finals[:-1])
  assert chunks[-1].usage.completion_tokens == len(ref.tokens)


def test_completions_with_stop_string(running):
  model, _, client, _ = running
  cfg, tok = model.cfg, model.tokenizer
  ids = [cfg.bos_id] + tok.encode("The object")
  free = generate(cfg, model.params, [ids], max_new_tokens=8, decode=tok.decode, max_len=CTX)[0]
  resp = client.completions.create(model="tiny", prompt="The object", max_tokens=8, temperature=0)
  assert resp.choices[0].text == free.text
  stop = free.text[2:4]
  resp = client.completions.create(model="tiny", prompt="The object", max_tokens=8, temperature=0,
                                   stop=[stop])
  assert resp.choices[0].text == free.text[:free.text.find(stop)]
  assert resp.choices[0].finish_reason == "stop"


def test_concurrent_requests_are_batched(running):
  model, srv, client, _ = running
  questions = ["What is a list?", "Define a tuple.", "Where is the loop?", "Why use a class?"]
  results = [None] * 4
  before = len(srv.batch_sizes)

  def ask(i):
    r = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": questions[i]}], max_tokens=8,
        temperature=0)
    results[i] = r.choices[0].message.content

  threads = [threading.Thread(target=ask, args=(i,)) for i in range(4)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert max(srv.batch_sizes[before:]) > 1  # at least two requests shared one batch
  # Greedy decoding of a row does not depend on its batch mates.
  expect = [o.text for o in generate(
      model.cfg, model.params,
      [build_chat_prompt([{"role": "user", "content": q}], model.tokenizer.encode)
       for q in questions],
      max_new_tokens=8, stop_token_ids=[2, 195, 196], decode=model.tokenizer.decode,
      max_len=CTX, **GREEDY_CHAT)]
  assert results == expect


def _raw_post(port, path, body: bytes):
  conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
  conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
  r = conn.getresponse()
  out = r.status, json.loads(r.read())
  conn.close()
  return out


def test_bad_requests_get_4xx_and_the_server_keeps_serving(running):
  _, _, client, port = running
  msgs = [{"role": "user", "content": "hi"}]
  status, body = _raw_post(port, "/v1/chat/completions", b'{"messages": [')
  assert status == 400 and "not valid JSON" in body["error"]["message"]
  status, body = _raw_post(port, "/v1/nope", b"{}")
  assert status == 404
  with pytest.raises(openai.BadRequestError, match="frobnicate"):
    client.chat.completions.create(model="tiny", messages=msgs, extra_body={"frobnicate": 1})
  with pytest.raises(openai.BadRequestError, match=r"'temperature'=3\.0 is out of range"):
    client.chat.completions.create(model="tiny", messages=msgs, temperature=3.0)
  with pytest.raises(openai.BadRequestError, match="top_p"):
    client.completions.create(model="tiny", prompt="x", top_p=0)
  with pytest.raises(openai.BadRequestError, match=r"messages\[0\].role"):
    client.chat.completions.create(model="tiny", messages=[{"role": "robot", "content": "x"}])
  with pytest.raises(openai.BadRequestError, match="context"):
    client.completions.create(model="tiny", prompt="word " * 400, max_tokens=4)
  with pytest.raises(openai.BadRequestError, match="exceed the model context"):
    client.completions.create(model="tiny", prompt="hello", max_tokens=CTX - 2)
  ok = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=4, temperature=0)
  assert ok.choices[0].finish_reason in ("stop", "length")
  assert [m.id for m in client.models.list().data] == ["tiny"]
