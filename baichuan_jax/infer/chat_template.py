"""The Baichuan chat template: turn markers as token ids, left truncation, and turn-ending stops.

Baichuan chat models see a conversation as one token sequence (SPEC 2):

    [system tokens] 195 <user text> 196 <assistant text> 195 <user text> 196

Every user turn is prefixed with the user token (195), every assistant turn with the assistant
token (196), and a prompt that ends on a user turn gets a trailing 196 so the model writes the
assistant's answer next. The markers are inserted as ids, never as text, so a user typing
"<user>" cannot forge a turn (the tokenizer encodes that string as ordinary pieces).

Truncation follows the released `build_chat_input`: the budget is `max_length - max_new_tokens`;
the system prompt is kept, whole rounds (a user turn and the replies after it) are taken from the
newest backwards while they fit, and the result is finally cut from the left to the budget (which
only bites when the newest round alone is too long). One difference: the trailing assistant marker
counts against the budget when rounds are chosen, so an older round is dropped whole instead of
losing its first token to the final cut.

A chat model ends its turn with `</s>` (2). A base model, or a chat model that misses the end of
its turn, goes on to write the next "user:" turn itself (the failure users saw with
Baichuan-13B-Chat). `chat_stop_ids` therefore also stops on the turn markers 195 and 196, so
generation never writes a turn that is not the assistant's.

Works with any tokenizer object with `encode(str) -> list[int]`: `baichuan_jax.tokenizer.Tokenizer`
(ours or a released Baichuan `tokenizer.model`) or a bare `sentencepiece.SentencePieceProcessor`.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

ROLES = ("system", "user", "assistant")

# Baichuan 2 chat generation config (SPEC 7); Baichuan-13B-Chat uses repetition_penalty 1.1.
DEFAULT_SAMPLING = {"temperature": 0.3, "top_k": 5, "top_p": 0.85, "repetition_penalty": 1.05,
                    "max_new_tokens": 2048}


def validate_messages(messages: Any) -> list[dict]:
  """Checks a chat history and returns it as a list of {"role", "content"} dicts.

  Raises:
    ValueError: naming the message index and field (not a list, empty, a role outside
      system/user/assistant, a system message after the first, a non-string content).
  """
  if not isinstance(messages, (list, tuple)) or not messages:
    raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...} objects")
  out = []
  for i, m in enumerate(messages):
    if not isinstance(m, Mapping):
      raise ValueError(f"messages[{i}] must be an object with 'role' and 'content', got "
                       f"{type(m).__name__}")
    role, content = m.get("role"), m.get("content")
    if role not in ROLES:
      raise ValueError(f"messages[{i}].role={role!r} is invalid: allowed {', '.join(ROLES)}")
    if role == "system" and i != 0:
      raise ValueError(f"messages[{i}]: a system message may only be the first message")
    if not isinstance(content, str):
      raise ValueError(f"messages[{i}].content must be a string, got {type(content).__name__}")
    out.append({"role": role, "content": content})
  return out


def _rounds(messages: list[dict]) -> tuple[str, list[list[dict]]]:
  """(system text, rounds); a round starts at each user message."""
  system = ""
  rounds: list[list[dict]] = []
  for m in messages:
    if m["role"] == "system":
      system = m["content"]
    elif m["role"] == "user" or not rounds:
      rounds.append([m])
    else:
      rounds[-1].append(m)
  return system, rounds


def build_chat_prompt(messages: Sequence[Mapping[str, str]], encode: Callable[[str], list],
                      *, user_id: int = 195, assistant_id: int = 196, max_length: int = 4096,
                      max_new_tokens: int = 2048) -> list[int]:
  """Token ids of a conversation in the Baichuan chat format.

  Args:
    messages: [{"role": "system" | "user" | "assistant", "content": str}, ...]; a system message
      may only come first.
    encode: text -> token ids without BOS/EOS (e.g. `Tokenizer.encode`).
    user_id, assistant_id: the turn-marker ids (195 / 196 in Baichuan).
    max_length: the model context (`cfg.max_seq_len`).
    max_new_tokens: room kept for the reply; the prompt gets at most max_length - max_new_tokens.
  Returns:
    list[int] of at most max_length - max_new_tokens ids, ending in `assistant_id` when the last
    message is a user turn.
  Raises:
    ValueError: malformed messages, or max_new_tokens leaving no room for a prompt.
  """
  messages = validate_messages(messages)
  budget = max_length - max_new_tokens
  if budget < 1:
    raise ValueError(f"max_new_tokens={max_new_tokens} leaves no room for the prompt in a "
                     f"context of {max_length} tokens")
  system, rounds = _rounds(messages)
  system_ids = list(encode(system)) if system else []
  ends_on_user = messages[-1]["role"] != "assistant"
  # The trailing assistant marker is counted too, so whole rounds are kept only if they fit with it.
  history_budget = budget - len(system_ids) - int(ends_on_user)
  history: list[int] = []
  for rnd in reversed(rounds):
    ids: list[int] = []
    for m in rnd:
      ids.append(user_id if m["role"] == "user" else assistant_id)
      ids.extend(encode(m["content"]))
    # The newest round is always kept (then cut from the left below); older ones only whole.
    if history and len(history) + len(ids) > history_budget:
      break
    history = ids + history
    if len(history) >= history_budget:
      break
  prompt = system_ids + history
  if ends_on_user:
    prompt.append(assistant_id)
  return prompt[-budget:]


def chat_stop_ids(eos_id: int = 2, user_id: int = 195, assistant_id: int = 196) -> list[int]:
  """Tokens that end an assistant turn: end of sequence and either turn marker."""
  return [eos_id, user_id, assistant_id]


def for_config(cfg) -> dict:
  """The template's special ids for a model config ({user_id, assistant_id})."""
  return {"user_id": int(cfg.user_token_id), "assistant_id": int(cfg.assistant_token_id)}


def chat_reply(cfg, params, tokenizer, messages: Sequence[Mapping[str, str]], *,
               max_new_tokens: int = DEFAULT_SAMPLING["max_new_tokens"], stream=None, **sampling):
  """Generates the assistant's next turn for a conversation.

  Args:
    cfg: model config (its max_seq_len is the context; user/assistant/eos ids come from it).
    params: model parameters (plain or quantized).
    tokenizer: object with `encode(str) -> ids` and `decode(ids) -> str`.
    messages: the conversation (see `build_chat_prompt`).
    max_new_tokens: longest reply; the prompt is left-truncated to leave room for it.
    stream: optional per-token callback (`infer.StreamEvent`).
    **sampling: temperature, top_k, top_p, repetition_penalty, seed, stop_strings, mesh.
  Returns:
    `infer.Completion` whose `text` is the reply; it never contains a turn marker or `</s>`.
  """
  from baichuan_jax.infer.generate import generate  # pylint: disable=import-outside-toplevel
  max_new_tokens = min(int(max_new_tokens), cfg.max_seq_len - 1)
  prompt = build_chat_prompt(messages, tokenizer.encode, max_length=cfg.max_seq_len,
                             max_new_tokens=max_new_tokens, **for_config(cfg))
  stops = chat_stop_ids(cfg.eos_id, cfg.user_token_id, cfg.assistant_token_id)
  return generate(cfg, params, [prompt], max_new_tokens=max_new_tokens, stop_token_ids=stops,
                  decode=tokenizer.decode, stream=stream, **sampling)[0]
