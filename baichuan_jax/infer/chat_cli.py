"""Interactive terminal chat with a Baichuan chat model, keeping the conversation history.

    python -m baichuan_jax.chat --checkpoint WORKDIR
    python -m baichuan_jax.chat --hf Baichuan2-7B-Chat --quantize int8 --system "Be concise."

Each reply is streamed token by token. The conversation is rendered with the Baichuan template
(195 before user turns, 196 before assistant turns) and left-truncated to the context minus
`--max-new-tokens`; a reply ends at `</s>` or at a turn marker, so the model never writes the
user's next turn. Sampling defaults are Baichuan 2's chat generation config (temperature 0.3,
top-k 5, top-p 0.85, repetition penalty 1.05).

Commands at the prompt: /reset (forget the history), /quit (or Ctrl-D) to leave.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Optional, TextIO

from baichuan_jax.infer.generate_cli import add_sampling_flags, resolve_max_new
from baichuan_jax.infer import chat_template
from baichuan_jax.infer import loading


class ChatSession:
  """A conversation: history of messages and the sampling settings for the next replies."""

  def __init__(self, model: loading.LoadedModel, max_new_tokens: int, system: str = "",
               **sampling):
    self.model = model
    self.max_new_tokens = max_new_tokens
    self.system = system
    self.sampling = sampling
    self.messages: list[dict] = []
    self.reset()

  def reset(self) -> None:
    self.messages = [{"role": "system", "content": self.system}] if self.system else []

  def send(self, text: str, on_text: Optional[Callable[[str], None]] = None):
    """Adds a user turn, generates the assistant's reply (streamed to `on_text`) and records it.

    Returns:
      The `infer.Completion` of the reply.
    """
    self.messages.append({"role": "user", "content": text})
    stream = (lambda ev: on_text(ev.text) if ev.text else None) if on_text else None
    try:
      out = chat_template.chat_reply(self.model.cfg, self.model.params, self.model.tokenizer,
                                     self.messages, max_new_tokens=self.max_new_tokens,
                                     stream=stream, **self.sampling)
    except Exception:
      self.messages.pop()  # a failed turn leaves the history as it was
      raise
    self.messages.append({"role": "assistant", "content": out.text})
    return out


def repl(session: ChatSession, inp: TextIO = sys.stdin, out: TextIO = sys.stdout) -> None:
  """Reads user lines from `inp` until /quit or end of input; streams replies to `out`."""
  interactive = inp.isatty()
  while True:
    if interactive:
      out.write("\nuser> ")
      out.flush()
    line = inp.readline()
    if not line:
      break
    text = line.rstrip("\n")
    if text.strip() == "/quit":
      break
    if text.strip() == "/reset":
      session.reset()
      out.write("[history cleared]\n")
      continue
    if not text.strip():
      continue
    out.write("assistant> ")
    out.flush()

    def show(piece: str) -> None:
      out.write(piece)
      out.flush()

    try:
      res = session.send(text, on_text=show)
    except ValueError as e:
      out.write(f"\n[error: {e}]\n")
      continue
    out.write("\n" if res.finish_reason == "stop" else " [length limit]\n")
    out.flush()


def main(argv: Optional[list[str]] = None) -> int:
  p = argparse.ArgumentParser(prog="python -m baichuan_jax.chat", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  loading.add_model_flags(p)
  p.add_argument("--system", default="", help="system prompt placed before the first turn")
  defaults = dict(chat_template.DEFAULT_SAMPLING)
  defaults["max_new_tokens"] = None
  add_sampling_flags(p, defaults)
  args = p.parse_args(argv)
  try:
    model = loading.from_args(args)
    max_new = resolve_max_new(args.max_new_tokens, model.cfg)
  except (ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  session = ChatSession(model, max_new, system=args.system, temperature=args.temperature,
                        top_k=args.top_k, top_p=args.top_p,
                        repetition_penalty=args.repetition_penalty, seed=args.seed,
                        stop_strings=args.stop or None)
  if sys.stdin.isatty():
    print(f"Chatting with {model.source} ({model.cfg.position_embedding}, "
          f"{model.cfg.num_layers} layers). /reset clears the history, /quit leaves.")
  repl(session)
  return 0


if __name__ == "__main__":
  sys.exit(main())
