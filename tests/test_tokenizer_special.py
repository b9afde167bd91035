"""The Baichuan special ids are defined once and every reader agrees with the released values."""

import inspect

from baichuan_jax import configs, tokenizer
from baichuan_jax.infer import chat_template
from baichuan_jax.tokenizer import special, training


def test_released_baichuan_ids():
  # Baichuan 1/2 tokenizer.model: <unk>=0 (also padding), <s>=1, </s>=2, user 195, assistant 196.
  assert (special.PAD_ID, special.BOS_ID, special.EOS_ID) == (0, 1, 2)
  assert (special.USER_ID, special.ASSISTANT_ID) == (195, 196)
  assert tokenizer.USER_ID == 195 and tokenizer.Tokenizer.__module__ == "baichuan_jax.tokenizer.runtime"


def test_every_preset_and_the_chat_template_read_them():
  for name in configs.names():
    c = configs.get(name)
    assert (c.pad_id, c.bos_id, c.eos_id, c.user_token_id, c.assistant_token_id) == (0, 1, 2, 195, 196)
  sig = inspect.signature(chat_template.build_chat_prompt).parameters
  assert (sig["user_id"].default, sig["assistant_id"].default, sig["eos_id"].default) == (195, 196, 2)
  assert chat_template.chat_stop_ids() == [2, 195, 196]


def test_trained_control_pieces_put_the_turn_markers_at_195_196():
  # Ids 0..2 are unk/bos/eos, then the control symbols in order from id 3.
  assert training.CONTROL_SYMBOLS[0] == "<reserved_3>" and training.N_RESERVED == 192
  assert training.CONTROL_SYMBOLS.index("<user>") + 3 == 195
  assert training.CONTROL_SYMBOLS.index("<assistant>") + 3 == 196
