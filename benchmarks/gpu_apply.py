"""Turns one benchmarks/gpu_suite.py run into the project's GPU defaults, by rule, not by hand.

  python3 benchmarks/gpu_apply.py docs/results/gpu_suite_h200.json            # the decisions
  python3 benchmarks/gpu_apply.py docs/results/gpu_suite_h200.json --write    # and the edits

The suite's A/Bs decide nine things; this prints each decision with its evidence and, with
`--write`, edits the constants in the sources (and prints the diff), so what a GPU run found
becomes the default the same way every time:

* the tiling of the attention kernels at head_dim 128 (blocks, launch settings, and whether the
  backward is the fused one-kernel form, "fused_backward"), per kernel path: "plain" (no RoPE inside:
  the attention benchmarks, rope-first) and "rope" (RoPE inside the kernels: the model's
  training step), into `kernels_pallas.attention.MEASURED_TUNING[path]`: the `tiles` section's
  fastest fwd+bwd tiling of that path at seq 4096, kept only when it beat the defaults by at
  least `--min-gain`; used from seq 2048 up (the suite ran it at 2k-8k);
* `baichuan_jax.model.layers.ROPE_IN_KERNEL`: the `rope-first` or `rope in kernel` train A/B
  (RoPE in the kernels or applied to q and k first; the suite runs the arm the default is not);
* `baichuan_jax.model.layers.FUSED_RMS_NORM`: the `xla RMSNorm` train A/B (the Pallas RMSNorm
  kernel or the jnp formula XLA fuses with its neighbours);
* `baichuan_jax.model.layers.SCAN_LAYERS`: the `unrolled layers` train A/B (the layer scan or
  the unrolled stack, without remat);
* `baichuan_jax.model.layers.SWIGLU_VJP`: the `swiglu autodiff` or `swiglu vjp` train A/B (the
  SwiGLU product's backward by jax's autodiff of the formula, or `layers.swiglu`'s own, which
  keeps half as many [batch, seq, ffn] arrays; the suite runs the arm the default is not);
* `kernels_pallas.flash_mgpu.DEFAULT_BLOCKS`: the Mosaic GPU kernels' blocks, stages and
  compute warpgroups, from the suite's `mosaic_blocks_used` (the fastest fwd+bwd setting at seq
  4096, which the run then checked and used for the ~1B step on those kernels), when it passed
  the checks and beat the run's defaults by `--min-gain`;
* `baichuan_jax.model.layers.FLASH_MOSAIC`: the `mosaic attention` or `triton attention` train
  A/B (the step's attention on the Hopper kernels, kernels_pallas.flash_mgpu, or on the Triton
  ones), only when the `attention mosaic` section's check of those kernels passed;
* `baichuan_jax.train.step.GUARD_RECOMPUTE`: the NaN/inf guard's two forms, timed as the
  optimizer update alone on the default train step's state; written only when the two gave the
  same new state bit for bit;
* `benchmarks/gpu_suite.py` COST, the budget guard's estimates: each rescaled by its sections'
  seconds over the estimates the run used (`section_times`, `cost`) plus 10%, where the run
  missed it by more than 15% (sections with an error are left out: their time is no measure),
  so a rerun skips what it must and nothing more; applied whatever `--min-gain`;
* reported only, never written: the decode kernel's settings (`kernels_pallas.decode.
  GPU_DEFAULTS`; its variants are timed at batch 1 only), the whole-logit loss and batch x2
  train variants (memory trade-offs, config fields rather than defaults), the decode span
  check (`layers.DECODE_SPAN_CHECK`, a correctness guard whatever it costs) and the sections
  whose time was off the budget guard's estimate by more than 1.5x.

A setting changes only when the faster arm wins by at least `--min-gain` (default 3%: on the
H100 a re-timed attention point differed by several percent between runs, docs/kernels.md); a
closer result keeps what is there. `--write` refuses a run made with `--small` (interpret mode
on a CPU: its times mean nothing) and a run whose kernel checks did not all pass (a wrong
kernel's speed is no evidence), naming the reason, and leaves every file as it was, unless each
failed check is waived by name (`--waive-check TEXT`, a judgement the docs must give the reason
for: the H200's first run was applied so, its decode-step check having failed on a bf16-vs-bf16
tolerance that covers none of the settings written). `--copy-to
docs/results/gpu_suite_h200` also copies the run's gpu_suite.json / .md next to the docs, the
record the edits cite.
"""

from __future__ import annotations

import argparse
import ast
import difflib
import json
import math
import pprint
import re
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ATTENTION = "kernels_pallas/attention.py"
LAYERS = "baichuan_jax/model/layers.py"
STEP = "baichuan_jax/train/step.py"
# The file of each switch gpu_apply may flip (the layers module unless named here).
SWITCH_FILES = {"GUARD_RECOMPUTE": STEP}
SUITE = "benchmarks/gpu_suite.py"
MOSAIC = "kernels_pallas/flash_mgpu.py"
MOSAIC_BEGIN, MOSAIC_END = "# BEGIN MOSAIC_BLOCKS", "# END MOSAIC_BLOCKS"
MOSAIC_SETTING = "kernels_pallas.flash_mgpu.DEFAULT_BLOCKS"
COST_BEGIN, COST_END = "# BEGIN COST", "# END COST"
COST_CHANGE = 0.15  # an estimate the run's time missed by more than 15% is rescaled ...
COST_MARGIN = 1.1  # ... to that time plus 10%
# The COST entries each of the suite's sections spends ("train <variant>" sections: their own).
COST_KEYS = {"env": ("env",), "ceilings": ("ceilings",), "check": ("check",),
             "tiles": ("tiles item",), "tiles rope": ("tiles item",),
             "attention": ("attention item",), "train": ("train",),
             "decode": ("decode_step", "decode first step"),
             "decode_kernel": ("decode_kernel item",), "decode no-check": ("decode_step",),
             "attention mosaic": ("attention mosaic check", "attention mosaic item"),
             "attention mosaic blocks": ("attention mosaic item",),
             "attention mosaic extra": ("attention mosaic item",)}
TUNING_BEGIN = "# BEGIN MEASURED_TUNING"
TUNING_END = "# END MEASURED_TUNING"
MIN_SEQ = 2048  # the attention section's shortest sequence, where the tiling was also run
# The train A/B (gpu_suite.TRAIN_VARIANTS) that flips each switch: whichever of its variants
# ran (the suite runs the one that is not the default).
SWITCH_VARIANTS = {"ROPE_IN_KERNEL": ("rope-first", "rope in kernel"),
                   "FUSED_RMS_NORM": ("xla RMSNorm",), "SCAN_LAYERS": ("unrolled layers",),
                   "SWIGLU_VJP": ("swiglu autodiff", "swiglu vjp"),
                   "FLASH_MOSAIC": ("mosaic attention", "triton attention")}


class ApplyError(ValueError):
  """A results file or source file this tool cannot use; the message names it and why."""


def load_results(path) -> dict:
  path = Path(path)
  if path.is_dir():
    raise ApplyError(f"{path}: a folder; pass the gpu_suite.json in it"
                     + (f" ({path / 'gpu_suite.json'})" if (path / "gpu_suite.json").is_file()
                        else ""))
  try:
    result = json.loads(path.read_text())
  except FileNotFoundError:
    raise ApplyError(f"{path}: no such file (a gpu_suite.py run writes $OUT/gpu_suite.json)")
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ApplyError(f"{path}: not JSON ({e})") from None
  if not isinstance(result, dict):
    raise ApplyError(f"{path}: not a gpu_suite.json (a JSON {type(result).__name__}, not an "
                     "object)")
  missing = [k for k in ("env", "train", "tiles", "summary") if k not in result]
  if missing:
    raise ApplyError(f"{path}: not a gpu_suite.json (missing {', '.join(missing)})")
  wrong = [f"{k} (a {type(result[k]).__name__})" for k, want in (
      ("env", dict), ("train", list), ("tiles", list), ("summary", dict))
           if not isinstance(result[k], want)]
  if wrong:
    raise ApplyError(f"{path}: not a gpu_suite.json (env and summary must be objects, train "
                     f"and tiles lists: {', '.join(wrong)})")
  return result


def failed_checks(result) -> list:
  """The kernel names of the run's checks that did not pass."""
  return [r.get("kernel", "?") for r in result.get("check", []) if not r.get("ok")]


def write_refusals(result, waived=()) -> list:
  """Why this run must not set defaults (empty: it may).

  `waived`: texts naming failed checks (a check is waived when its kernel name contains one)
  that the caller has judged and takes the responsibility for (`--waive-check`); a waiver that
  names no failed check is itself a refusal, so a typo cannot pass for a judgement.
  """
  out = []
  if result["env"].get("small"):
    out.append("the run used --small (tiny shapes, interpret mode): its times mean nothing")
  ok = result["summary"].get("checks_ok")
  failed = failed_checks(result)
  unused = [w for w in waived if not any(w in name for name in failed)]
  if unused:
    out.append(f"--waive-check {', '.join(map(repr, unused))}: names no failed check (failed: "
               f"{', '.join(failed) or 'none'})")
  left = [name for name in failed if not any(w in name for w in waived)]
  if ok is None or (ok is not True and (left or not failed)):
    out.append("the kernel checks " + ("did not run" if ok is None else
                                       f"failed ({', '.join(left or failed)})")
               + ": a kernel that is wrong has no speed worth keeping")
  return out


# ----------------------------------------------------------------------------------------------
# what the sources hold now


def _read(root, rel) -> str:
  path = Path(root) / rel
  if not path.is_file():
    raise ApplyError(f"{path}: missing (run from a baichuan-jax checkout or pass --root)")
  return path.read_text()


def _switch_pattern(name):
  return re.compile(rf"^{name} = (True|False)$", re.M)


def current_switch(root, name) -> bool:
  rel = SWITCH_FILES.get(name, LAYERS)
  found = _switch_pattern(name).findall(_read(root, rel))
  if len(found) != 1:
    raise ApplyError(f"{Path(root) / rel}: expected one line '{name} = True|False', "
                     f"found {len(found)}")
  return found[0] == "True"


def _tuning_block(text, path):
  return _block(text, path, TUNING_BEGIN, TUNING_END)


def current_tuning(root) -> dict:
  text = _read(root, ATTENTION)
  a, b = _tuning_block(text, Path(root) / ATTENTION)
  body = text[a:b].strip()
  if not body.startswith("MEASURED_TUNING = "):
    raise ApplyError(f"{Path(root) / ATTENTION}: the block must hold 'MEASURED_TUNING = {{...}}'")
  try:
    return ast.literal_eval(body[len("MEASURED_TUNING = "):])
  except (ValueError, SyntaxError) as e:
    raise ApplyError(f"{Path(root) / ATTENTION}: MEASURED_TUNING is not a literal ({e})") from None


def _block(text, path, begin, end):
  start, stop = text.find(begin), text.find(end)
  if start < 0 or stop < start:
    raise ApplyError(f"{path}: the '{begin}' ... '{end}' block is missing")
  return text.index("\n", start) + 1, stop


def _block_literal(root, rel, begin, end, name, block):
  """The literal `name = {...}` the `begin` ... `end` block of `rel` holds (`block`: the block's
  name in the error)."""
  text = _read(root, rel)
  a, b = _block(text, Path(root) / rel, begin, end)
  body, head = text[a:b].strip(), f"{name} = "
  try:
    if not body.startswith(head):
      raise ValueError(f"no '{head}{{...}}'")
    return ast.literal_eval(body[len(head):])
  except (ValueError, SyntaxError) as e:
    raise ApplyError(f"{Path(root) / rel}: the {block} block must hold one literal "
                     f"'{head}{{...}}' ({e})") from None


def _with_block_literal(text, path, begin, end, name, value, width):
  """`text` with the `begin` ... `end` block rewritten to hold `name = <value>` (pprint, its
  continuation lines aligned after the '=')."""
  a, b = _block(text, path, begin, end)
  body = f"{name} = " + pprint.pformat(value, width=width, sort_dicts=True)
  return text[:a] + body.replace("\n", "\n" + " " * (len(name) + 3)) + "\n" + text[b:]


def current_mosaic_blocks(root) -> dict:
  """flash_mgpu.DEFAULT_BLOCKS as the sources hold it."""
  return _block_literal(root, MOSAIC, MOSAIC_BEGIN, MOSAIC_END, "DEFAULT_BLOCKS", "MOSAIC_BLOCKS")


def current_cost(root) -> dict:
  """gpu_suite.COST as the sources hold it."""
  return _block_literal(root, SUITE, COST_BEGIN, COST_END, "COST", "COST")


# ----------------------------------------------------------------------------------------------
# decisions


def _decision(setting, current, proposed, evidence, write=True):
  return dict(setting=setting, current=current, proposed=proposed,
              change=write and proposed != current, writes=write, evidence=evidence)


def decide_tiling(result, root, min_gain, rope=False) -> dict:
  """MEASURED_TUNING[path] from the `tiles` rows of one kernel path (`rope`: RoPE inside)."""
  path = "rope" if rope else "plain"
  cur = current_tuning(root).get(path, {})
  setting = f"kernels_pallas.attention.MEASURED_TUNING[{path!r}]"
  used = result.get("tuning_used_rope" if rope else "tuning_used") or {}
  rows = {r.get("variant"): r for r in result["tiles"]
          if "ms" in r and r.get("path", "plain") == path}
  best = rows.get(used.get("variant"))
  if not used or best is None or "default" not in rows:
    return _decision(setting, cur, cur, f"not measured (the {path} tiles did not time the "
                                        "default and a variant)")
  d = int(best["head_dim"])
  gain = rows["default"]["ms"] / best["ms"] - 1
  evidence = (f"{path} tiles at seq {best['seq']}, head_dim {d}: fastest {used['variant']!r} "
              f"{best['ms']:.3f} ms vs default {rows['default']['ms']:.3f} ms ({gain:+.1%})")
  proposed = cur
  if used["variant"] != "default" and gain >= min_gain:
    # per-phase tables as written ("blocks" as tuples); flags ("fused_backward") as they are
    tuning = {part: ({ph: (tuple(v) if part == "blocks" else dict(v)) for ph, v in table.items()}
                     if isinstance(table, dict) else table)
              for part, table in (best.get("tuning") or {}).items()}
    env = result["env"]
    proposed = dict(cur)
    proposed[d] = dict(tuning=tuning, min_seq=MIN_SEQ, variant=used["variant"],
                       speedup_over_default=round(1 + gain, 4),
                       measured=f"{env.get('device')}, {env.get('date_utc')} UTC, "
                                f"git {env.get('git_commit')}")
  elif used["variant"] == "default":
    evidence += "; the defaults are fastest"
  else:
    evidence += f"; below the {min_gain:.0%} margin, kept"
  return _decision(setting, cur, proposed, evidence)


def decide_switch(result, root, name, min_gain) -> dict:
  cur = current_switch(root, name)
  steps = {r.get("variant"): r for r in result["train"] if r.get("step_s")}
  variant = next((v for v in SWITCH_VARIANTS[name] if v in steps), SWITCH_VARIANTS[name][0])
  base, other = steps.get("default"), steps.get(variant)
  setting = f"baichuan_jax.model.layers.{name}"
  if base is None or other is None or any(name not in r.get("layers_switches", {})
                                          for r in (base, other)):
    return _decision(setting, cur, cur, f"not measured (train 'default' and {variant!r} rows "
                                        f"with step times and the {name} they ran are needed)")
  if name == "FLASH_MOSAIC" and not (result["summary"].get("attention_mosaic") or {}).get(
      "check_ok"):
    return _decision(setting, cur, cur, "the Mosaic kernels' check (attention mosaic section) "
                                        "did not pass: their speed is no evidence, kept")
  # each arm's value as it ran (the suite records it in every train row)
  v_base, v_other = base["layers_switches"][name], other["layers_switches"][name]
  evidence = (f"train step {base['step_s']:.4f} s with {name}={v_base} (default) vs "
              f"{other['step_s']:.4f} s with {name}={v_other} ({variant!r})")
  if v_base == v_other:
    return _decision(setting, cur, cur, evidence + "; both arms ran with the same value: no A/B")
  return _faster_arm(setting, name, cur, [(base["step_s"], v_base), (other["step_s"], v_other)],
                     evidence, min_gain)


def _faster_arm(setting, name, cur, arms, evidence, min_gain) -> dict:
  """The decision between a switch's two timed arms, [(seconds, value)] x 2: the faster value
  when it wins by `min_gain`, else the current one."""
  (fast_s, fast), (slow_s, _) = sorted(arms)
  gain = slow_s / fast_s - 1
  evidence += f"; {name}={fast} faster by {gain:.1%}"
  if gain < min_gain:
    return _decision(setting, cur, cur, evidence + f", below the {min_gain:.0%} margin, kept")
  return _decision(setting, cur, fast, evidence)


def decide_mosaic_blocks(result, root, min_gain) -> dict:
  """flash_mgpu.DEFAULT_BLOCKS from the run's `mosaic_blocks_used`: the fastest block setting
  of the Mosaic kernels' fwd+bwd at one seq, written only when it passed the kernels' checks
  and beat the blocks the run started from by `min_gain`."""
  cur = current_mosaic_blocks(root)
  used = result.get("mosaic_blocks_used")
  if not used:
    return _decision(MOSAIC_SETTING, cur, cur, "not measured (the attention mosaic blocks "
                                               "stage did not time the settings)")
  gain = used["default_ms"] / used["ms"] - 1
  evidence = (f"Mosaic fwd+bwd at seq {used['seq']}: fastest {used['variant']!r} "
              f"{used['ms']:.3f} ms vs the run's defaults {used['default_ms']:.3f} ms "
              f"({gain:+.1%})")
  if used["variant"] == "default":
    return _decision(MOSAIC_SETTING, cur, cur, evidence + "; the defaults are fastest")
  if not used.get("checked") or not used.get("blocks"):
    return _decision(MOSAIC_SETTING, cur, cur, evidence + "; it failed the kernels' checks, kept")
  if gain < min_gain:
    return _decision(MOSAIC_SETTING, cur, cur, evidence + f"; below the {min_gain:.0%} margin, "
                                                          "kept")
  return _decision(MOSAIC_SETTING, cur, {ph: tuple(v) for ph, v in used["blocks"].items()},
                   evidence)


def decide_guard(result, root, min_gain) -> dict:
  """`train.step.GUARD_RECOMPUTE` from the default train row's optimizer update alone: the
  guard's two forms timed on the step's own state, applied only when they gave the same new
  state bit for bit."""
  cur = current_switch(root, "GUARD_RECOMPUTE")
  setting = "baichuan_jax.train.step.GUARD_RECOMPUTE"
  base = next((r for r in result["train"] if r.get("variant") == "default"), None)
  need = ("optimizer_guarded_ms", "optimizer_guarded_other_ms", "optimizer_guard_recompute")
  if base is None or any(k not in base for k in need):
    return _decision(setting, cur, cur, "not measured (the default train row's optimizer "
                                        "update with both guard forms is needed)")
  ran, ms = base["optimizer_guard_recompute"], base["optimizer_guarded_ms"]
  other_ms = base["optimizer_guarded_other_ms"]
  evidence = (f"optimizer update alone {ms:.2f} ms with GUARD_RECOMPUTE={ran} (the step's) vs "
              f"{other_ms:.2f} ms with {not ran}")
  if base.get("optimizer_guard_forms_equal") is not True:
    return _decision(setting, cur, cur, evidence + "; the two forms' new states differ: kept (a "
                                                   "form that changes the result is no evidence)")
  return _faster_arm(setting, "GUARD_RECOMPUTE", cur, [(ms, ran), (other_ms, not ran)],
                     evidence + "; same bits", min_gain)


def decide_cost(result, root) -> dict:
  """gpu_suite.COST rescaled by the run's section_times against the estimates it ran with."""
  cur = current_cost(root)
  ran, setting = result.get("cost"), "gpu_suite.COST"
  times = result.get("section_times") or []
  if not ran or not times:
    return _decision(setting, cur, cur, "not measured (the run recorded no section_times or no "
                                        "cost, the estimates its guard used)")
  spent, left_out = {}, []
  for t in times:
    name = t["section"]
    keys = COST_KEYS.get(name) or ((name,) if name.startswith("train ") else ())
    if t.get("errors"):  # the errors the section recorded: its time is no measure
      left_out.append(name)
      continue
    for key in keys:
      sec, est = spent.get(key, (0.0, 0.0))
      spent[key] = (sec + t["seconds"], est + t["estimate_s"])
  proposed, moved = dict(cur), []
  for key, (sec, est) in sorted(spent.items()):
    if key not in ran or key not in cur or est <= 0:
      continue
    if abs(sec / est - 1) > COST_CHANGE:  # the run's time over the estimate it ran with
      proposed[key] = max(1, math.ceil(round(ran[key] * sec / est * COST_MARGIN, 6)))
      moved.append(f"{key} {cur[key]} -> {proposed[key]} ({sec:.0f} s against {est:.0f} s)")
  evidence = (f"{len(spent)} estimates timed; those off by more than {COST_CHANGE:.0%} rescaled "
              f"to the time (+{COST_MARGIN - 1:.0%}): " + ("; ".join(moved) or "none"))
  if left_out:
    evidence += "; left out (an error in the section): " + ", ".join(left_out)
  return _decision(setting, cur, proposed, evidence)


def report_only(result, min_gain=0.03) -> list:
  """Decisions this tool never writes, with their evidence."""
  out = []
  rows = [r for r in result.get("decode_kernel", []) if r.get("kernel_us") and r["fill"] == "full"]
  b1 = {r["variant"]: r for r in rows if r["batch"] == min((x["batch"] for x in rows), default=0)}
  if "default" in b1:
    best = min(b1.values(), key=lambda r: r["kernel_us"])
    gain = b1["default"]["kernel_us"] / best["kernel_us"] - 1
    choice = best["variant"] if gain >= min_gain else "default"
    # a variant timed at the other batches too: its time over the default's at each
    others = {}
    for r in rows:
      if r["batch"] != best["batch"] and r["variant"] != "default":
        base = next((x for x in rows if x["batch"] == r["batch"] and x["variant"] == "default"),
                    None)
        if base:
          others.setdefault(r["variant"], []).append(
              f"batch {r['batch']} {base['kernel_us'] / r['kernel_us'] - 1:+.1%}")
    out.append(_decision("kernels_pallas.decode.GPU_DEFAULTS", "default", choice,
                         f"decode_attention at batch {best['batch']}: fastest {best['variant']!r} "
                         f"{best['kernel_us']:.1f} us vs default {b1['default']['kernel_us']:.1f}"
                         f" us ({gain:+.1%}); the variants are timed at this batch only"
                         + "".join(f"; {v!r} against the default at {', '.join(o)}"
                                   for v, o in others.items()),
                         write=False))
  steps = {r.get("variant"): r for r in result["train"] if r.get("tokens_per_s")}
  base = steps.get("default")
  for variant, what in (("whole-logit loss", "loss_chunk_size=0 (config)"),
                        ("batch x2", "batch 8 x 4096 (config)")):
    if base and variant in steps:
      r = steps[variant]
      out.append(_decision(what, "as is", "as is",
                           f"{variant!r}: {r['tokens_per_s'] / base['tokens_per_s']:.3f}x the "
                           f"default's tokens/s, peak {r.get('peak_gib', '?')} GiB", write=False))
  times = result.get("section_times") or []
  if times:  # the budget guard's estimates against the run: what to set gpu_suite.COST from
    off = [f"{t['section']} {t['seconds']:.0f} s (est. {t['estimate_s']:.0f})" for t in times
           if not 0.5 <= t["seconds"] / max(t["estimate_s"], 1e-9) <= 1.5]
    total = sum(t["seconds"] for t in times)
    out.append(_decision("benchmarks/gpu_suite.py COST", "as is", "as is",
                         f"sections took {total:.0f} s in all (estimates "
                         f"{sum(t['estimate_s'] for t in times):.0f} s); off by more than 1.5x: "
                         + (", ".join(off) or "none"), write=False))
  dec = {(r.get("label"), r.get("batch")): r for r in result.get("decode", [])}
  b = next((r for (label, _), r in dec.items() if label == "pallas_no_span_check"), None)
  a = dec.get(("pallas", b and b.get("batch")))
  if a and b:
    out.append(_decision("baichuan_jax.model.layers.DECODE_SPAN_CHECK", True, True,
                         f"batch {b.get('batch')}: {a.get('tokens_per_s', 0):.1f} tok/s with the "
                         f"check, {b.get('tokens_per_s', 0):.1f} without (kept: a guard)",
                         write=False))
  return out


def decide(result, root=ROOT, min_gain=0.03) -> list:
  if not 0 <= min_gain < 1:
    raise ApplyError(f"min_gain={min_gain} is invalid: must be in [0, 1)")
  return ([decide_tiling(result, root, min_gain, rope) for rope in (False, True)]
          + [decide_mosaic_blocks(result, root, min_gain)]
          + [decide_switch(result, root, n, min_gain) for n in SWITCH_VARIANTS]
          + [decide_guard(result, root, min_gain)]
          + [decide_cost(result, root)] + report_only(result, min_gain))


# ----------------------------------------------------------------------------------------------
# edits


def edited_sources(decisions, root=ROOT) -> dict:
  """{relative path: (old text, new text)} for the decisions that change something."""
  texts, tuning = {}, None
  for dcs in decisions:
    if not dcs["change"]:
      continue
    setting = dcs["setting"]
    rel = (ATTENTION if ".MEASURED_TUNING[" in setting else SUITE if setting == "gpu_suite.COST"
           else MOSAIC if setting == MOSAIC_SETTING
           else SWITCH_FILES.get(setting.rsplit(".", 1)[1], LAYERS))
    if rel not in texts:
      texts[rel] = [_read(root, rel)] * 2
    if rel == MOSAIC:
      texts[rel][1] = _with_block_literal(texts[rel][1], Path(root) / MOSAIC, MOSAIC_BEGIN,
                                          MOSAIC_END, "DEFAULT_BLOCKS", dcs["proposed"], 100)
    elif rel == SUITE:
      texts[rel][1] = _with_block_literal(texts[rel][1], Path(root) / SUITE, COST_BEGIN,
                                          COST_END, "COST", dcs["proposed"], 80)
    elif rel == ATTENTION:  # every path's decision goes into the one literal
      tuning = current_tuning(root) if tuning is None else tuning
      tuning[setting.split("[")[1].strip("]'\"")] = dcs["proposed"]
    else:
      name = setting.rsplit(".", 1)[1]
      texts[rel][1] = _switch_pattern(name).sub(f"{name} = {dcs['proposed']}", texts[rel][1],
                                                count=1)
  if tuning is not None:
    texts[ATTENTION][1] = _with_block_literal(texts[ATTENTION][1], Path(root) / ATTENTION,
                                              TUNING_BEGIN, TUNING_END, "MEASURED_TUNING",
                                              tuning, 80)
  return {rel: tuple(pair) for rel, pair in texts.items()}


def apply(decisions, root=ROOT) -> str:
  """Writes the edits; returns their unified diff."""
  edits = edited_sources(decisions, root)
  diff = []
  for rel, (old, new) in edits.items():
    (Path(root) / rel).write_text(new)
    diff += difflib.unified_diff(old.splitlines(True), new.splitlines(True), f"a/{rel}", f"b/{rel}")
  return "".join(diff)


def _show(value) -> str:
  """A setting's value for the table: a MEASURED_TUNING path as its tilings' names."""
  if isinstance(value, dict) and all(isinstance(v, (int, float)) for v in value.values()):
    return f"{len(value)} estimates"  # COST: which moved is in the evidence
  if isinstance(value, dict) and all(isinstance(v, (tuple, list)) for v in value.values()):
    return ", ".join(f"{ph} {tuple(v)}" for ph, v in sorted(value.items()))  # Mosaic blocks
  if isinstance(value, dict):
    return ", ".join(f"head_dim {hd}: {e.get('variant', 'measured')}"
                     for hd, e in sorted(value.items())) or "{} (the code's defaults)"
  return str(value)


def table(decisions) -> str:
  lines = ["| setting | now | measured choice | action | evidence |", "|---|---|---|---|---|"]
  for d in decisions:
    action = ("change" if d["change"] else "keep") if d["writes"] else "report only"
    lines.append(f"| {d['setting']} | {_show(d['current'])} | {_show(d['proposed'])} | {action} "
                 f"| {d['evidence']} |")
  return "\n".join(lines)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("results", help="a gpu_suite.json (benchmarks/gpu_suite.py --out DIR writes it)")
  p.add_argument("--write", action="store_true", help="edit the sources (default: only print)")
  p.add_argument("--min-gain", type=float, default=0.03,
                 help="least speed-up a change must show, as a fraction (default 0.03)")
  p.add_argument("--copy-to", metavar="PREFIX",
                 help="also copy the run's gpu_suite.json/.md to PREFIX.json/.md")
  p.add_argument("--root", default=str(ROOT), help="the checkout to edit (default: this one)")
  p.add_argument("--waive-check", action="append", default=[], metavar="TEXT",
                 help="write although the failed check whose kernel name contains TEXT failed\n"
                      "(repeatable; say why in the docs: e.g. a tolerance the run showed too\n"
                      "tight, on a check that covers none of the settings written)")
  args = p.parse_args(argv)
  try:
    result = load_results(args.results)
    decisions = decide(result, args.root, args.min_gain)
    print(table(decisions))
    if args.write:
      refusals = write_refusals(result, args.waive_check)
      if refusals:
        raise ApplyError(f"{args.results}: not written: " + "; ".join(refusals))
      for name in failed_checks(result):
        print(f"waived: the failed check {name!r} (--waive-check)")
      diff = apply(decisions, args.root)
      print("\n" + (diff or "nothing to change: the sources already hold the measured choices"))
    if args.copy_to:
      src = Path(args.results)
      for ext in (".json", ".md"):
        if src.with_suffix(ext).is_file():
          shutil.copyfile(src.with_suffix(ext), args.copy_to + ext)
          print(f"copied {src.with_suffix(ext)} -> {args.copy_to + ext}")
  except ApplyError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
