"""Batch generation from a file of prompts.

    python -m baichuan_jax.generate --checkpoint WORKDIR --prompts prompts.jsonl --out out.jsonl
    python -m baichuan_jax.generate --hf Baichuan2-7B-Chat --prompts questions.txt --chat

Input: a `.jsonl` file whose lines are objects with either "prompt" (plain continuation) or
"messages" (a chat, rendered with the Baichuan template), and an optional "id"; or any other file,
read as one plain prompt per non-empty line. With `--chat`, plain prompts are sent as a single user
turn. Output (stdout or `--out`): one JSON object per input line, in input order:

    {"id", "prompt", "completion", "finish_reason", "prompt_tokens", "completion_tokens"}

Prompts are generated `--batch-size` at a time (left-padded in one batch; similar lengths are
grouped so padding stays small). Greedy by default; `--temperature` > 0 samples.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional

from baichuan_jax.infer import chat_template
from baichuan_jax.infer import loading
from baichuan_jax.records import decode_utf8, iter_jsonl


def read_prompts(path: str) -> list[dict]:
  """Prompt records [{"id", "prompt"} or {"id", "messages"}] from a JSONL or text file.

  Raises:
    FileNotFoundError; ValueError naming the file and line of a malformed record.
  """
  p = Path(path)
  if not p.is_file():
    raise FileNotFoundError(f"--prompts {path}: no such file")
  records = []
  if p.suffix == ".jsonl":
    for n, rec in iter_jsonl(path):
      if not isinstance(rec, dict) or ("prompt" in rec) == ("messages" in rec):
        raise ValueError(f"{path}:{n}: each line must be an object with exactly one of "
                         "'prompt' (string) or 'messages' (chat list)")
      if "prompt" in rec and not isinstance(rec["prompt"], str):
        raise ValueError(f"{path}:{n}: 'prompt' must be a string")
      if "messages" in rec:
        try:
          chat_template.validate_messages(rec["messages"])
        except ValueError as e:
          raise ValueError(f"{path}:{n}: {e}") from e
      rec.setdefault("id", len(records))
      records.append(rec)
  else:
    lines = decode_utf8(p.read_bytes(), path).splitlines()
    records = [{"id": i, "prompt": line} for i, line in enumerate(l for l in lines if l.strip())]
  if not records:
    raise ValueError(f"--prompts {path}: no prompts in the file")
  return records


def encode_records(records: list[dict], model: loading.LoadedModel, chat: bool,
                   max_new_tokens: int) -> list[list[int]]:
  """Token ids per record (chat template for "messages" and with `chat`)."""
  cfg, tok = model.cfg, model.tokenizer
  out = []
  for rec in records:
    msgs = rec.get("messages")
    if msgs is None and chat:
      msgs = [{"role": "user", "content": rec["prompt"]}]
    if msgs is not None:
      ids = chat_template.build_chat_prompt(msgs, tok.encode, max_length=cfg.max_seq_len,
                                            max_new_tokens=max_new_tokens,
                                            **chat_template.for_config(cfg))
    else:
      ids = [cfg.bos_id] + tok.encode(rec["prompt"])
      ids = ids[-(cfg.max_seq_len - max_new_tokens):]  # keep the end, like the chat template
    out.append(ids)
  return out


def add_sampling_flags(p: argparse.ArgumentParser, defaults: dict) -> None:
  """Sampling flags with the given defaults (chat: Baichuan 2's generation config)."""
  g = p.add_argument_group("sampling")
  g.add_argument("--max-new-tokens", type=int, default=None,
                 help="longest continuation (default: %s)" % (
                     defaults.get("max_new_tokens") or "half the model context"))
  g.add_argument("--temperature", type=float, default=defaults["temperature"],
                 help="0 = greedy (default: %(default)s)")
  g.add_argument("--top-k", type=int, default=defaults["top_k"], help="0 = off (default: %(default)s)")
  g.add_argument("--top-p", type=float, default=defaults["top_p"], help="1 = off (default: %(default)s)")
  g.add_argument("--repetition-penalty", type=float, default=defaults["repetition_penalty"],
                 help="HF semantics, 1 = off (default: %(default)s)")
  g.add_argument("--seed", type=int, default=0, help="sampling seed (default: %(default)s)")
  g.add_argument("--stop", action="append", default=[], metavar="TEXT",
                 help="stop string (repeatable)")


def resolve_max_new(value: Optional[int], cfg) -> int:
  n = value if value is not None else min(2048, cfg.max_seq_len // 2)
  if not 1 <= n < cfg.max_seq_len:
    raise ValueError(f"--max-new-tokens={n} is invalid: must be in [1, {cfg.max_seq_len - 1}] for "
                     f"a context of {cfg.max_seq_len}")
  return n


def main(argv: Optional[list[str]] = None) -> int:
  p = argparse.ArgumentParser(prog="python -m baichuan_jax.generate", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  loading.add_model_flags(p)
  p.add_argument("--prompts", required=True, help=".jsonl (prompt/messages per line) or text file")
  p.add_argument("--out", default=None, help="output JSONL (default: stdout)")
  p.add_argument("--chat", action="store_true", help="send plain prompts as one user turn each")
  p.add_argument("--batch-size", type=int, default=16, help="prompts per batch (default: 16)")
  p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
  add_sampling_flags(p, {"temperature": 0.0, "top_k": 0, "top_p": 1.0, "repetition_penalty": 1.0})
  args = p.parse_args(argv)
  if args.batch_size < 1:
    p.error(f"--batch-size={args.batch_size} must be >= 1")
  try:
    records = read_prompts(args.prompts)
    model = loading.from_args(args)
    max_new = resolve_max_new(args.max_new_tokens, model.cfg)
    ids = encode_records(records, model, args.chat, max_new)
  except (ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  results = run_batches(model, ids, args, max_new, chat=args.chat)
  out = open(args.out, "w", encoding="utf-8") if args.out else sys.stdout
  try:
    for rec, toks, res in zip(records, ids, results):
      row = {"id": rec["id"], "prompt": rec.get("prompt", rec.get("messages")),
             "completion": res.text, "finish_reason": res.finish_reason,
             "prompt_tokens": len(toks), "completion_tokens": len(res.tokens)}
      out.write(json.dumps(row, ensure_ascii=False) + "\n")
  finally:
    if args.out:
      out.close()
  return 0


def run_batches(model: loading.LoadedModel, ids: list[list[int]], args, max_new: int,
                chat: bool = False):
  """Generates every prompt, `args.batch_size` at a time, grouped by length; results in order."""
  from tqdm import tqdm  # pylint: disable=import-outside-toplevel
  from baichuan_jax.infer import generate  # pylint: disable=import-outside-toplevel
  cfg = model.cfg
  stops = (chat_template.chat_stop_ids(cfg.eos_id, cfg.user_token_id, cfg.assistant_token_id)
           if chat else [cfg.eos_id])
  order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
  results = [None] * len(ids)
  bar = tqdm(total=len(ids), unit="prompt", disable=args.no_progress, file=sys.stderr)
  for start in range(0, len(order), args.batch_size):
    chunk = order[start:start + args.batch_size]
    outs = generate(cfg, model.params, [ids[i] for i in chunk], max_new_tokens=max_new,
                    temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                    repetition_penalty=args.repetition_penalty,
                    seed=[args.seed + i for i in chunk], stop_token_ids=stops,
                    stop_strings=args.stop or None, decode=model.tokenizer.decode)
    for i, o in zip(chunk, outs):
      results[i] = o
    bar.update(len(chunk))
  bar.close()
  return results


if __name__ == "__main__":
  sys.exit(main())
