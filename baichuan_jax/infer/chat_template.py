"""The Baichuan chat templates: turn markers as token ids, left truncation, turn-ending stops.

Baichuan chat models see a conversation as one token sequence, with every user turn prefixed by
the user token (195) and every assistant turn by the assistant token (196); a prompt gets a
trailing 196 so the model writes the assistant's answer next. The markers are inserted as ids,
never as text, and `baichuan_jax.tokenizer.Tokenizer` never encodes text to them (even with the
released Baichuan 2 tokenizer, where they are user-defined pieces), so user text cannot forge a
turn. Two templates, as the released code builds them:

* **Baichuan 2** (`build_chat_input` of the Baichuan 2 chat models), `template="baichuan2"`:

      [system tokens] 195 <user> 196 <assistant> 195 <user> 196

  The budget is `max_length - max_new_tokens`. The system prompt is kept; whole rounds (a user
  turn and the replies after it) are taken newest first while the history fits
  `budget - len(system)` (the newest round always), the trailing 196 is appended only when the
  last message is not an assistant's, and the result is cut from the left to the budget. The
  trailing 196 is not counted when rounds are chosen: when the history exactly fills its share,
  the round is kept and the cut takes the first token of the system prompt (or of the history).

* **Baichuan-13B-Chat** (`_build_chat_input` of that model), `template="baichuan-13b-chat"`:

      195 <user> 196 <assistant> 2 195 <user> 196

  Each assistant turn is followed by `</s>` (2); there is no system role (a system message is an
  error); rounds are taken newest first within `max(max_length // 2, max_length -
  max_new_tokens)` tokens (an assistant turn older than every user turn is dropped), the result is
  cut from the left to that budget and 196 is always appended.

`template_for(cfg)` picks the template from the model config: Baichuan 1 ALiBi models with a plain
head (Baichuan-13B) get the Baichuan-13B-Chat template, everything else (Baichuan 2, and
Baichuan-7B, which has no released chat model) the Baichuan 2 one.

A chat model ends its turn with `</s>` (2). A base model, or a chat model that misses the end of
its turn, goes on to write the next "user:" turn itself (the failure users saw with
Baichuan-13B-Chat). `chat_stop_ids` therefore also stops on the turn markers 195 and 196, so
generation never writes a turn that is not the assistant's.

Works with any tokenizer object with `encode(str) -> list[int]`: `baichuan_jax.tokenizer.Tokenizer`
(ours or a released Baichuan `tokenizer.model`) or a bare `sentencepiece.SentencePieceProcessor`.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

from baichuan_jax.tokenizer.special import ASSISTANT_ID, EOS_ID, USER_ID

ROLES = ("system", "user", "assistant")

# The published Baichuan 2 chat generation_config.json; Baichuan-13B-Chat's has repetition_penalty 1.1.
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


TEMPLATES = ("baichuan2", "baichuan-13b-chat")


def build_chat_prompt(messages: Sequence[Mapping[str, str]], encode: Callable[[str], list],
                      *, user_id: int = USER_ID, assistant_id: int = ASSISTANT_ID,
                      max_length: int = 4096,
                      max_new_tokens: int = 2048, template: str = "baichuan2",
                      eos_id: int = EOS_ID) -> list[int]:
  """Token ids of a conversation in a Baichuan chat format (see the module doc for the rules).

  Args:
    messages: [{"role": "system" | "user" | "assistant", "content": str}, ...]; a system message
      may only come first (and not at all for "baichuan-13b-chat").
    encode: text -> token ids without BOS/EOS (e.g. `Tokenizer.encode`).
    user_id, assistant_id: the turn-marker ids (195 / 196 in Baichuan).
    max_length: the model context (`cfg.max_seq_len`).
    max_new_tokens: room kept for the reply.
    template: "baichuan2" or "baichuan-13b-chat".
    eos_id: the id that ends each assistant turn in "baichuan-13b-chat" (2).
  Returns:
    list[int]: "baichuan2": at most max_length - max_new_tokens ids, ending in `assistant_id`
    when the last message is not an assistant turn; "baichuan-13b-chat": at most
    max(max_length // 2, max_length - max_new_tokens) + 1 ids, always ending in `assistant_id`.
  Raises:
    ValueError: malformed messages, an unknown template, a system message for
      "baichuan-13b-chat", or max_new_tokens leaving no room for a prompt.
  """
  messages = validate_messages(messages)
  if template == "baichuan-13b-chat":
    return _baichuan13b_prompt(messages, encode, user_id, assistant_id, eos_id, max_length,
                               max_new_tokens)
  if template != "baichuan2":
    raise ValueError(f"template={template!r} is invalid: allowed {', '.join(TEMPLATES)}")
  budget = max_length - max_new_tokens
  if budget < 1:
    raise ValueError(f"max_new_tokens={max_new_tokens} leaves no room for the prompt in a "
                     f"context of {max_length} tokens")
  system, rounds = _rounds(messages)
  system_ids = list(encode(system)) if system else []
  history_budget = budget - len(system_ids)
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
  if messages[-1]["role"] != "assistant":
    prompt.append(assistant_id)
  return prompt[-budget:]


def _baichuan13b_prompt(messages: list[dict], encode, user_id: int, assistant_id: int,
                        eos_id: int, max_length: int, max_new_tokens: int) -> list[int]:
  """Baichuan-13B-Chat's layout and truncation (module doc)."""
  for i, m in enumerate(messages):
    if m["role"] == "system":
      raise ValueError(f"messages[{i}]: the Baichuan-13B-Chat template has no system role "
                       "(allowed roles: user, assistant)")
  budget = max(max_length // 2, max_length - max_new_tokens)
  if budget < 1:
    raise ValueError(f"max_length={max_length} leaves no room for the prompt")
  total: list[int] = []
  pending: list[int] = []  # the round being built, newest message first
  for m in reversed(messages):
    ids = list(encode(m["content"]))
    if m["role"] == "assistant":
      pending = [assistant_id] + ids + [eos_id] + pending
      continue
    pending = [user_id] + ids + pending
    if total and len(total) + len(pending) > budget:
      break
    total = pending + total
    if len(total) >= budget:
      break
    pending = []
  return total[-budget:] + [assistant_id]


def template_for(cfg) -> str:
  """The chat template of a model config (module doc): Baichuan-13B's for ALiBi plain-head models."""
  if cfg.position_embedding == "alibi" and not cfg.norm_head:
    return "baichuan-13b-chat"
  return "baichuan2"


def chat_stop_ids(eos_id: int = EOS_ID, user_id: int = USER_ID,
                  assistant_id: int = ASSISTANT_ID) -> list[int]:
  """Tokens that end an assistant turn: end of sequence and either turn marker."""
  return [eos_id, user_id, assistant_id]


def for_config(cfg) -> dict:
  """`build_chat_prompt` keywords for a model config: {user_id, assistant_id, eos_id, template}."""
  return {"user_id": int(cfg.user_token_id), "assistant_id": int(cfg.assistant_token_id),
          "eos_id": int(cfg.eos_id), "template": template_for(cfg)}


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
  from baichuan_jax.infer.generation import generate  # pylint: disable=import-outside-toplevel
  max_new_tokens = min(int(max_new_tokens), cfg.max_seq_len - 1)
  prompt = build_chat_prompt(messages, tokenizer.encode, max_length=cfg.max_seq_len,
                             max_new_tokens=max_new_tokens, **for_config(cfg))
  # Baichuan-13B-Chat keeps at least half the context for history: the reply gets what is left.
  max_new_tokens = max(1, min(max_new_tokens, cfg.max_seq_len - len(prompt)))
  stops = chat_stop_ids(cfg.eos_id, cfg.user_token_id, cfg.assistant_token_id)
  return generate(cfg, params, [prompt], max_new_tokens=max_new_tokens, stop_token_ids=stops,
                  decode=tokenizer.decode, stream=stream, **sampling)[0]
