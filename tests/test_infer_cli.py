"""The batch `generate` and interactive `chat` command lines on a tiny model saved as a Hugging Face
directory and as a training checkpoint; outputs equal direct calls to the library."""

import functools
import io
import json
import shutil

import jax
import numpy as np
import pytest

from baichuan_jax import chat, configs, hf
from baichuan_jax import generate as generate_cli
from baichuan_jax.checkpoint import CheckpointManager, checkpoint_dir
from baichuan_jax.infer import build_chat_prompt, chat_reply, generate
from baichuan_jax.infer import loading
from baichuan_jax.model import init_params
from baichuan_jax.tokenizer import Tokenizer
from infer_helpers import train_sp_model

N = 6  # new tokens everywhere (one compilation)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  root = tmp_path_factory.mktemp("cli")
  tok_path = train_sp_model(root / "tokenizer.model")
  tok = Tokenizer(tok_path)
  cfg = configs.get("tiny", num_layers=2, dtype="float32", vocab_size=tok.vocab_size)
  params = jax.jit(functools.partial(init_params, cfg))(jax.random.PRNGKey(0))
  params = jax.tree.map(np.asarray, params)
  hf_dir = root / "hf"
  hf.save(cfg, params, hf_dir)
  shutil.copy(tok_path, hf_dir / "tokenizer.model")
  workdir = root / "run"
  mgr = CheckpointManager(checkpoint_dir(str(workdir)), async_save=False)
  mgr.save(3, {"params": params, "step": np.int32(3)})
  mgr.wait()
  mgr.close()
  shutil.copy(tok_path, workdir / "tokenizer.model")
  return cfg, params, tok, hf_dir, workdir


def test_generate_cli_jsonl_matches_library(saved, tmp_path, capsys):
  cfg, params, tok, hf_dir, _ = saved
  prompts = tmp_path / "p.jsonl"
  msgs = [{"role": "user", "content": "What is a list?"}]
  prompts.write_text(json.dumps({"id": "a", "prompt": "The object"}) + "\n\n"
                     + json.dumps({"messages": msgs}) + "\n")
  out = tmp_path / "out.jsonl"
  rc = generate_cli.main(["--hf", str(hf_dir), "--prompts", str(prompts), "--out", str(out),
                          "--max-new-tokens", str(N), "--dtype", "float32", "--no-progress"])
  assert rc == 0
  rows = [json.loads(line) for line in out.read_text().splitlines()]
  assert [r["id"] for r in rows] == ["a", 1]
  plain = generate(cfg, params, [[1] + tok.encode("The object")], max_new_tokens=N,
                   decode=tok.decode)[0]
  chat_ids = build_chat_prompt(msgs, tok.encode)
  chatted = generate(cfg, params, [chat_ids], max_new_tokens=N, stop_token_ids=[2, 195, 196],
                     decode=tok.decode)[0]
  assert rows[0]["completion"] == plain.text and rows[0]["completion_tokens"] == len(plain.tokens)
  assert rows[1]["completion"] == chatted.text and rows[1]["prompt_tokens"] == len(chat_ids)
  assert rows[1]["finish_reason"] == chatted.finish_reason


def test_generate_cli_reports_bad_line(saved, tmp_path, capsys):
  _, _, _, hf_dir, _ = saved
  prompts = tmp_path / "bad.jsonl"
  prompts.write_text('{"prompt": "ok"}\n{"prompt": \n')
  rc = generate_cli.main(["--hf", str(hf_dir), "--prompts", str(prompts)])
  assert rc == 2
  assert f"{prompts}:2: not valid JSON" in capsys.readouterr().err


def test_chat_repl_keeps_history_and_resets(saved):
  cfg, params, tok, _, workdir = saved
  model = loading.load_model(checkpoint=str(workdir), dtype="float32")  # config from shapes
  assert model.cfg.num_layers == 2 and model.cfg.vocab_size == cfg.vocab_size
  sampling = dict(temperature=0.0, repetition_penalty=1.05)
  session = chat.ChatSession(model, N, **sampling)
  out = io.StringIO()
  chat.repl(session, io.StringIO("What is a list?\nAnd a tuple?\n/reset\nWhat is a list?\n"
                                 "/quit\nnever read\n"), out)
  first = chat_reply(cfg, params, tok, [{"role": "user", "content": "What is a list?"}],
                     max_new_tokens=N, **sampling)
  second = chat_reply(cfg, params, tok, [
      {"role": "user", "content": "What is a list?"}, {"role": "assistant", "content": first.text},
      {"role": "user", "content": "And a tuple?"}], max_new_tokens=N, **sampling)
  lines = [l for l in out.getvalue().splitlines() if l.startswith("assistant> ")]
  strip = lambda l: l[len("assistant> "):].replace(" [length limit]", "")
  assert [strip(l) for l in lines] == [first.text, second.text, first.text]
  assert "[history cleared]" in out.getvalue()
  assert session.messages == [{"role": "user", "content": "What is a list?"},
                              {"role": "assistant", "content": first.text}]
