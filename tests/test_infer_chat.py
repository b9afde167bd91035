"""Chat template (hand-built expectations) and the stop at the end of the assistant turn."""

import functools

import jax
import numpy as np
import pytest
import sentencepiece as spm

from baichuan_jax import configs
from baichuan_jax.infer import generate
from baichuan_jax.infer.chat_template import (build_chat_prompt, chat_reply, chat_stop_ids,
                                               for_config, template_for)
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
  # One token short: the history (without the trailing marker) still fits, so upstream keeps the
  # old round and the final left cut takes its first token.
  assert build_chat_prompt(r1 + r2, enc, max_length=len(full) + 9, max_new_tokens=10) == full[1:]
  # Two tokens short: the old round is dropped whole, not cut in the middle.
  assert build_chat_prompt(r1 + r2, enc, max_length=len(full) + 8, max_new_tokens=10) == ids2
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


# ----------------------------------------------------------------------------------------------
# Both templates at every budget, on a toy encoder (one id per character) with hand-worked ids.

enc_chars = lambda text: [ord(c) for c in text]  # "a" -> 97
CONV = [{"role": "system", "content": "ab"}, {"role": "user", "content": "c"},
        {"role": "assistant", "content": "de"}, {"role": "user", "content": "f"}]
# system [97, 98]; round 1 [U, 99, A, 100, 101]; round 2 [U, 102]; trailing A.
B2_BY_BUDGET = {
    1: [A], 2: [102, A], 3: [U, 102, A], 4: [98, U, 102, A], 5: [97, 98, U, 102, A],
    6: [97, 98, U, 102, A], 7: [97, 98, U, 102, A], 8: [97, 98, U, 102, A],
    # History exactly fills budget - len(system): the round stays, the system's first token goes.
    9: [98, U, 99, A, 100, 101, U, 102, A],
    10: [97, 98, U, 99, A, 100, 101, U, 102, A], 11: [97, 98, U, 99, A, 100, 101, U, 102, A],
}


@pytest.mark.parametrize("budget", sorted(B2_BY_BUDGET))
def test_baichuan2_template_at_every_budget(budget):
  got = build_chat_prompt(CONV, enc_chars, max_length=budget + 5, max_new_tokens=5)
  assert got == B2_BY_BUDGET[budget]


# No system role: [U, 99, A, 100, 101, 2] then [U, 102], then A always appended.
B13_BY_BUDGET = {1: [102, A], 2: [U, 102, A], 3: [U, 102, A], 7: [U, 102, A],
                 8: [U, 99, A, 100, 101, 2, U, 102, A], 9: [U, 99, A, 100, 101, 2, U, 102, A]}


@pytest.mark.parametrize("budget", sorted(B13_BY_BUDGET))
def test_baichuan13b_chat_template_at_every_budget(budget):
  msgs = CONV[1:]
  # budget = max(L // 2, L - max_new_tokens): L = 2 * budget with max_new_tokens >= budget ...
  got = build_chat_prompt(msgs, enc_chars, max_length=2 * budget, max_new_tokens=2 * budget - 1,
                          template="baichuan-13b-chat")
  assert got == B13_BY_BUDGET[budget]
  # ... or L - max_new_tokens when that is larger.
  got = build_chat_prompt(msgs, enc_chars, max_length=budget + 1, max_new_tokens=1,
                          template="baichuan-13b-chat")
  assert got == B13_BY_BUDGET[budget]


def test_baichuan13b_chat_template_rules():
  t = dict(template="baichuan-13b-chat")
  # Ends on an assistant turn: its </s> is kept and 196 is still appended.
  assert build_chat_prompt(CONV[1:3], enc_chars, **t) == [U, 99, A, 100, 101, 2, A]
  # An assistant turn older than every user turn is dropped.
  assert build_chat_prompt([{"role": "assistant", "content": "x"}, CONV[3]], enc_chars, **t) == [
      U, 102, A]
  # L // 2 wins over L - max_new_tokens: L = 10, max_new_tokens = 9 keeps 5 tokens of history.
  assert build_chat_prompt(CONV[1:], enc_chars, max_length=10, max_new_tokens=9, **t) == [U, 102, A]
  with pytest.raises(ValueError, match=r"messages\[0\]: the Baichuan-13B-Chat template has no system"):
    build_chat_prompt(CONV, enc_chars, **t)
  with pytest.raises(ValueError, match="template='chatml' is invalid"):
    build_chat_prompt(CONV, enc_chars, template="chatml")


def test_template_is_chosen_from_the_config():
  for preset, want in (("baichuan-7b", "baichuan2"), ("baichuan-13b", "baichuan-13b-chat"),
                       ("baichuan2-7b", "baichuan2"), ("baichuan2-13b", "baichuan2")):
    cfg = configs.get(preset)
    assert template_for(cfg) == want and for_config(cfg) == {
        "user_id": U, "assistant_id": A, "eos_id": 2, "template": want}


def test_baichuan13b_chat_reply_fits_the_context(sp_model):
  """A Baichuan-13B-style model (ALiBi, plain head) gets the 13B-Chat template, whose history may
  take half the context even when max_new_tokens asks for more: the reply is shortened to fit."""
  t = Tokenizer(sp_model)
  cfg = configs.get("tiny", num_layers=2, dtype="float32", position_embedding="alibi",
                    norm_head=False)
  assert template_for(cfg) == "baichuan-13b-chat"
  w1, w2 = t.encode(" the value of")[:2]
  params = _chain_model(cfg, {A: w1, w1: w2, w2: 2})
  long = " ".join(["the list of values"] * 60)
  msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"},
          {"role": "user", "content": long}]
  assert len(t.encode(long)) > cfg.max_seq_len // 2
  prompt = build_chat_prompt(msgs, t.encode, max_length=cfg.max_seq_len, max_new_tokens=200,
                             **for_config(cfg))
  # The newest round alone exceeds max(L // 2, L - 200) = 128: cut from the left to 128, then 196.
  assert prompt == ([U] + t.encode(long))[-(cfg.max_seq_len // 2):] + [A]
  out = chat_reply(cfg, params, t, msgs, max_new_tokens=200)  # 129 + 200 > 256 without the clip
  assert out.tokens == [w1, w2] and out.finish_reason == "stop"
