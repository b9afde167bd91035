"""Decode throughput: `baichuan_jax.infer.generate` vs Hugging Face `transformers` `generate`.

    python benchmarks/decode.py                      # tiny shape, batch 1 and 16, 128 new tokens
    python benchmarks/decode.py --batches 1 4 16 --new-tokens 256 --layers 4

Both run the same-shaped LLaMA-style model (RoPE, SwiGLU, RMSNorm, untied plain head: a
Baichuan-7B-shaped model scaled down to the `tiny` preset) in float32 on the CPU, greedy, with a
KV cache, for exactly `--new-tokens` tokens (no early stop). The Llama model gets our weights
(W_pack split into q/k/v), so the run also checks that both produce the same greedy tokens.

Ours runs with both decode loops (`decode_loop="device"`, the CPU default, and "host"), which
must produce the same tokens. Each setting is run once to warm up (our jit compile, torch's first-call overhead), then timed
`--repeats` times; the best time is reported. tokens/s = batch * new tokens / wall seconds
(prefill of the `--prompt-len`-token prompts included for both).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import sys
import time

import jax
import numpy as np


def _ours(cfg, params, prompts, n_new, loop):
  from baichuan_jax.infer import generate  # pylint: disable=import-outside-toplevel
  outs = generate(cfg, params, prompts, max_new_tokens=n_new, stop_token_ids=[], decode_loop=loop)
  return [o.tokens for o in outs]


def _llama(cfg, params):
  import torch  # pylint: disable=import-outside-toplevel
  from transformers import LlamaConfig, LlamaForCausalLM  # pylint: disable=import-outside-toplevel
  e, h = cfg.hidden_size, cfg.num_heads
  d = e // h
  hf_cfg = LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=e, intermediate_size=cfg.intermediate_size,
                       num_hidden_layers=cfg.num_layers, num_attention_heads=h, num_key_value_heads=h,
                       max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.rms_norm_eps,
                       rope_theta=cfg.rope_theta, tie_word_embeddings=False, pad_token_id=0,
                       bos_token_id=1, eos_token_id=2, attention_bias=False, mlp_bias=False)
  model = LlamaForCausalLM(hf_cfg).eval().to(torch.float32)
  p = jax.tree.map(np.asarray, params)
  t = lambda a: torch.from_numpy(np.array(a, dtype=np.float32))  # a writable copy
  sd = {"model.embed_tokens.weight": t(p["embed_tokens"]), "model.norm.weight": t(p["norm"]["weight"]),
        "lm_head.weight": t(p["lm_head"].T)}
  lay = p["layers"]
  for i in range(cfg.num_layers):
    pre = f"model.layers.{i}."
    w = lay["self_attn"]["W_pack"]["kernel"][i]  # [E, 3, H, D]
    for j, name in enumerate(("q_proj", "k_proj", "v_proj")):
      sd[pre + f"self_attn.{name}.weight"] = t(w[:, j].reshape(e, h * d).T)
    sd[pre + "self_attn.o_proj.weight"] = t(lay["self_attn"]["o_proj"]["kernel"][i].reshape(h * d, e).T)
    for name in ("gate_proj", "up_proj", "down_proj"):
      sd[pre + f"mlp.{name}.weight"] = t(lay["mlp"][name]["kernel"][i].T)
    sd[pre + "input_layernorm.weight"] = t(lay["input_layernorm"]["weight"][i])
    sd[pre + "post_attention_layernorm.weight"] = t(lay["post_attention_layernorm"]["weight"][i])
  missing, unexpected = model.load_state_dict(sd, strict=False)
  missing = [m for m in missing if "rotary" not in m]
  if missing or unexpected:
    raise RuntimeError(f"Llama weight mapping: missing {missing}, unexpected {unexpected}")
  return model


def _hf_generate(model, prompts, n_new):
  import torch  # pylint: disable=import-outside-toplevel
  width = max(len(p) for p in prompts)
  ids = torch.zeros((len(prompts), width), dtype=torch.long)
  mask = torch.zeros_like(ids)
  for i, p in enumerate(prompts):  # left padding, as decoder-only generation needs
    ids[i, width - len(p):] = torch.tensor(p)
    mask[i, width - len(p):] = 1
  with torch.inference_mode():
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n_new,
                         min_new_tokens=n_new, do_sample=False, use_cache=True, pad_token_id=0)
  return out[:, width:].tolist()


def _best(fn, repeats):
  fn()  # warm-up: compilation / first-call overhead
  times = []
  result = None
  for _ in range(repeats):
    t0 = time.perf_counter()
    result = fn()
    times.append(time.perf_counter() - t0)
  return min(times), result


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--batches", type=int, nargs="+", default=[1, 16])
  p.add_argument("--new-tokens", type=int, default=128)
  p.add_argument("--prompt-len", type=int, default=32)
  p.add_argument("--layers", type=int, default=4, help="decoder layers of the tiny shape")
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch CPU threads")
  p.add_argument("--json", default=None, help="also write the results here")
  args = p.parse_args(argv)

  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  from baichuan_jax import configs  # pylint: disable=import-outside-toplevel
  from baichuan_jax.model import init_params  # pylint: disable=import-outside-toplevel
  torch.set_num_threads(args.threads)
  cfg = configs.get("tiny", num_layers=args.layers, dtype="float32", norm_head=False,
                    position_embedding="rope")
  params = jax.jit(functools.partial(init_params, cfg))(jax.random.PRNGKey(0))
  llama = _llama(cfg, params)
  rng = np.random.default_rng(0)
  env = {"device": f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores",
         "jax": jax.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
         "python": platform.python_version(), "command": "python " + " ".join(sys.argv)}
  print(json.dumps(env))
  rows = []
  for b in args.batches:
    prompts = [rng.integers(3, cfg.vocab_size, args.prompt_len).tolist() for _ in range(b)]
    t_ours, toks_ours = _best(lambda: _ours(cfg, params, prompts, args.new_tokens, "device"),
                              args.repeats)
    t_host, toks_host = _best(lambda: _ours(cfg, params, prompts, args.new_tokens, "host"),
                              args.repeats)
    if toks_host != toks_ours:
      raise RuntimeError("the host and device decode loops generated different tokens")
    t_hf, toks_hf = _best(lambda: _hf_generate(llama, prompts, args.new_tokens), args.repeats)
    # Greedy paths agree until float noise flips a near-tie; report the agreeing prefix.
    agree = min(next((k for k, (a, c) in enumerate(zip(x, y)) if a != c), len(x))
                for x, y in zip(toks_ours, toks_hf))
    row = {"batch": b, "new_tokens": args.new_tokens,
           "ours_tok_s": b * args.new_tokens / t_ours,
           "ours_host_loop_tok_s": b * args.new_tokens / t_host,
           "hf_tok_s": b * args.new_tokens / t_hf,
           "speedup": t_hf / t_ours, "ours_s": t_ours, "hf_s": t_hf,
           "same_greedy_prefix": agree}
    rows.append(row)
    print(json.dumps(row), flush=True)
  print("\n| batch | baichuan-jax tok/s (device loop, CPU default) | baichuan-jax tok/s (host loop) "
        "| transformers tok/s | speed-up (default) | identical greedy tokens |")
  print("|---|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['batch']} | {r['ours_tok_s']:.0f} | {r['ours_host_loop_tok_s']:.0f} "
          f"| {r['hf_tok_s']:.0f} | {r['speedup']:.2f}x | "
          f"first {r['same_greedy_prefix']} of {r['new_tokens']} |")
  if args.json:
    with open(args.json, "w", encoding="utf-8") as f:
      json.dump({"env": env, "rows": rows}, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
