"""Chat template (hand-built expectations) and the stop at the end of the assistant turn."""

import functools

import jax
import numpy as np
import pytest
import sentencepiece as spm

from baichuan_jax import configs
from baichuan_jax.infer import generate
from baichuan_jax.infer.chat_template import build_chat_prompt, chat_reply, chat_stop_ids
from baichuan_jax.model import init_params
from baichuan_jax.tokenizer import Tokenizer
from infer_helpers import train_sp_model

U, A = 195, 196


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
  return train_sp_model(tmp_path_factory.mktemp("tok") / "tokenizer.model")


@pytest.fixture(scope="module", params=["ours", "sentencepiece"])
def tok(request, sp_model):
  if request.param == "ours":
    return Tokenizer(sp_model)
  return spm.SentencePieceProcessor(model_file=sp_model)  # what a released model ships


def test_turn_markers_are_the_baichuan_ids(sp_model):
  t = Tokenizer(sp_model)
  assert (t.id_to_piece(U), t.id_to_piece(A)) == ("<user>", "<assistant>")
  assert U not in t.encode("<user> hi <assistant>")  # text cannot forge a turn


def test_template_layout(tok):
  enc = tok.encode
  msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"},
          {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3+3?"}]
  expect = (enc("Be brief.") + [U] + enc("What is 2+2?") + [A] + enc("4") + [U] + enc("And 3+3?")
            + [A])
  assert build_chat_prompt(msgs, enc) == expect
  # Ending on an assistant turn (prefill of a reply) gets no trailing marker.
  assert build_chat_prompt(msgs[:3], enc) == expect[:len(enc("Be brief.")) + 2 + len(
      enc("What is 2+2?")) + len(enc("4"))]


def test_left_truncation_keeps_whole_recent_rounds(tok):
  enc = tok.encode
  r1 = [{"role": "user", "content": "first question here"},
        {"role": "assistant", "content": "first answer"}]
  r2 = [{"role": "user", "content": "second one"}]
  ids1 = [U] + enc(r1[0]["content"]) + [A] + enc(r1[1]["content"])
  ids2 = [U] + enc(r2[0]["content"]) + [A]
  full = ids1 + ids2
  # Room for everything.
  assert build_chat_prompt(r1 + r2, enc, max_length=len(full) + 10, max_new_tokens=10) == full
  # One token short: the old round is dropped whole, not cut in the middle.
  assert build_chat_prompt(r1 + r2, enc, max_length=len(full) + 9, max_new_tokens=10) == ids2
  # The newest round alone too long: cut from the left to max_length - max_new_tokens.
  assert build_chat_prompt(r2, enc, max_length=13, max_new_tokens=10) == ids2[-3:]


def test_bad_messages_and_budget_raise(tok):
  with pytest.raises(ValueError, match=r"messages\[1\].role='bot'"):
    build_chat_prompt([{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}],
                      tok.encode)
  with pytest.raises(ValueError, match=r"messages\[1\]: a system message"):
    build_chat_prompt([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}],
                      tok.encode)
  with pytest.raises(ValueError, match="no room"):
    build_chat_prompt([{"role": "user", "content": "a"}], tok.encode, max_length=8,
                      max_new_tokens=8)


def _chain_model(cfg, chain):
  """Params whose next token is a fixed function of the current token: `chain[a] = b`.

  Attention and MLP outputs are zeroed, so the final hidden state is the normalised embedding of
  the current token; the head column of b is the sum of the unit embeddings of the tokens a that
  lead to it, other columns random small.
  """
  params = jax.jit(functools.partial(init_params, cfg))(jax.random.PRNGKey(0))
  params = jax.tree.map(np.array, params)
  params["layers"]["self_attn"]["o_proj"]["kernel"][:] = 0
  params["layers"]["mlp"]["down_proj"]["kernel"][:] = 0
  rng = np.random.default_rng(0)
  emb = rng.standard_normal(params["embed_tokens"].shape).astype(np.float32)
  head = 0.01 * rng.standard_normal(params["lm_head"].shape).astype(np.float32)
  for a, b in chain.items():
    head[:, b] += emb[a] / np.linalg.norm(emb[a])
  params["embed_tokens"], params["lm_head"] = emb, head
  return params


def test_reply_stops_at_the_end_of_the_assistant_turn(sp_model):
  t = Tokenizer(sp_model)
  cfg = configs.get("tiny", num_layers=2, dtype="float32")
  words = t.encode(" the value of")
  assert len(set(words)) == len(words) >= 3
  w1, w2, w3 = words[:3]
  # After the assistant marker the model writes three tokens, then starts a new user turn (195)
  # and would go on with the user's text: the reported Baichuan-13B-Chat failure.
  chain = {A: w1, w1: w2, w2: w3, w3: U, U: w1}
  params = _chain_model(cfg, chain)
  msgs = [{"role": "user", "content": "Tell me something."}]
  prompt = build_chat_prompt(msgs, t.encode, max_length=cfg.max_seq_len, max_new_tokens=16)
  raw = generate(cfg, params, [prompt], max_new_tokens=16, stop_token_ids=[cfg.eos_id])[0]
  assert raw.tokens[:5] == [w1, w2, w3, U, w1]  # without the turn stop it writes the user turn
  out = chat_reply(cfg, params, t, msgs, max_new_tokens=16)
  assert out.tokens == [w1, w2, w3] and out.finish_reason == "stop"
  assert out.text == t.decode([w1, w2, w3])
  assert chat_stop_ids() == [2, U, A]
