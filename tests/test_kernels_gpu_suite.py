"""benchmarks/gpu_suite.py --small: the prepared GPU run, on tiny shapes in interpret mode on CPU.

The device run happens once, in a short lease; this test makes sure every section of the script
runs, writes its JSON and markdown, and that the kernel checks it performs pass (they compare the
kernels with their references and the model's decode step with attention_impl="pallas" with the
"xla" one).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_suite  # noqa: E402


def _run_suite(flag, out):
  """gpu_suite.py `flag` --out `out` on the CPU; fails the test with the output's tail."""
  proc = subprocess.run(
      [sys.executable, str(ROOT / "benchmarks" / "gpu_suite.py"), flag, "--out", str(out)],
      capture_output=True, text=True, timeout=600,
      env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_gpu_suite_small_runs_every_section(tmp_path):
  _run_suite("--small", tmp_path)
  result = json.loads((tmp_path / "gpu_suite.json").read_text())
  md = (tmp_path / "gpu_suite.md").read_text()
  assert result["errors"] == [] and result["skipped"] == [], (result["errors"], result["skipped"])
  assert result["env"]["small"] is True and result["env"]["jax"]
  assert result["ceilings"]["matmul_flops"] > 0 and result["ceilings"]["copy_bandwidth"] > 0
  names = [r["kernel"] for r in result["check"]]
  assert len(names) == 5 and all(r["ok"] for r in result["check"]), result["check"]
  assert gpu_suite.FUSED_CHECK in names  # the one-kernel backward, dQ by atomic adds
  assert any("model's cached step" in n for n in names)
  # the decode step's logits are judged against an fp32 step: the pallas path may be at most
  # 1.5x (+1e-3) as far from it as the xla path, which is bf16 rounding alone
  step_check = next(r for r in result["check"] if "model's cached step" in r["kernel"])
  errs = step_check["rel_l2"]
  assert step_check["limit"] == pytest.approx(1.5 * errs["xla_logits"] + 1e-3)
  assert 0 < errs["xla_logits"] < 0.05 and 0 < errs["logits"] <= step_check["limit"]
  ours = [r for r in result["attention"] if r["impl"] == "ours"]
  assert len(ours) == 2 and all("ms" in r for r in ours)
  # the Mosaic GPU kernels (interpret mode here): checked against the reference, then timed
  # with the default blocks and the first other variant
  # (plain causal GQA, and packed: segments, positions, ALiBi), then timed: the default blocks
  # fwd+bwd, and after the step on them, the first other variant and the forward alone (ours on
  # Mosaic GPU, and cuDNN's, which has no CPU implementation: its row carries the error)
  mosaic = result["attention_mosaic"]
  assert [r["kind"] for r in mosaic] == ["check"] * 2 + ["time"] * 4
  assert [r["kernel"] for r in mosaic[:2]] == [gpu_suite.MOSAIC_CHECK,
                                               gpu_suite.MOSAIC_CHECK_PACKED]
  assert all(r["ok"] and all(0 < e < r["limit"] for e in r["rel_l2"].values())
             for r in mosaic[:2])
  assert [(r["mode"], r["impl"], r["variant"]) for r in mosaic[2:]] == [
      ("fwdbwd", "mosaic", "default"), ("fwdbwd", "mosaic", gpu_suite.MOSAIC_VARIANTS[1][0]),
      ("fwd", "mosaic", "default"), ("fwd", "cudnn", "default")]
  assert all(r["ms"] > 0 for r in mosaic[2:5]) and "error" in mosaic[5]
  assert result["summary"]["attention_mosaic"]["check_ok"] is True
  assert "## Attention on the Mosaic GPU kernels" in md
  # cuDNN has no CPU implementation: its rows carry the error instead of a time.
  assert all("error" in r for r in result["attention"] if r["impl"] == "cudnn")
  assert result["train"][0]["step_s"] > 0 and result["train"][0]["mfu_measured_matmul"] > 0
  assert result["train"][0]["profile_total_ms_per_step"] > 0  # the traced steps were summarised
  assert sum(result["train"][0]["profile_buckets_ms_per_step"].values()) == pytest.approx(
      result["train"][0]["profile_total_ms_per_step"])
  assert result["train"][0]["profile_source"].startswith("host events")
  assert (tmp_path / "train_trace.json.gz").exists()
  # the optimizer update alone, on the default step's state: least traffic of 32 bytes per fp32
  # parameter (grads read twice, params and both AdamW moments read and written once)
  base = result["train"][0]
  assert base["optimizer_min_bytes"] == 32 * base["params"]
  assert base["optimizer_bound_ms"] == pytest.approx(
      base["optimizer_min_bytes"] / result["ceilings"]["copy_bandwidth"] * 1e3)
  assert base["optimizer_guarded_ms"] > 0 and base["optimizer_plain_ms"] > 0
  assert base["optimizer_share_of_step"] == pytest.approx(
      base["optimizer_guarded_ms"] / (base["step_s"] * 1e3))
  assert base["optimizer_guarded_vs_plain_max_abs_diff"] <= 1e-6  # a good step: same update
  assert result["summary"]["train_optimizer"]["guard_ms"] == pytest.approx(
      base["optimizer_guarded_ms"] - base["optimizer_plain_ms"])
  # the guard's other form (GUARD_RECOMPUTE flipped) timed beside it: the same bits
  assert base["optimizer_guarded_other_ms"] > 0 and base["optimizer_guard_forms_equal"] is True
  assert result["summary"]["train_optimizer"]["guard_recompute"] is False
  assert "the same new state bit for bit" in md
  assert "Optimizer update alone on the default step's state" in md
  assert not (tmp_path / "_train_trace").exists()
  paths = {(r["path"].split(" ")[0], r["batch"]) for r in result["decode"]}
  assert paths == {("model", 1), ("kernels", 1)}
  for r in result["decode"]:
    # bytes of one step: bf16 matmul weights + K and V of every layer at the filled slots
    assert r["kv_bytes_filled"] == 2 * 1 * r["batch"] * 4 * (20 + 1) * 64 * 2
    assert 0 < r["fraction_of_limit"]
  dk = result["decode_kernel"]
  assert [(r["batch"], r["fill"], r["variant"]) for r in dk] == [
      (3, "full", "default"), (3, "full", "block_k 64"), (3, "ragged", "default")]
  assert all("kernel_us" in r for r in dk) and all("xla_us" in r for r in dk
                                                    if r["variant"] == "default")
  assert dk[0]["filled_bytes"] == 2 * 3 * 41 * 2 * 32 * 2  # K and V, 3 rows x 41 slots, bf16
  assert "## Decode attention alone" in md
  # one tiling per kernel path here: plain, then with RoPE inside the kernels
  assert [r["path"] for r in result["tiles"]] == ["plain", "rope"]
  assert all("ms" in r for r in result["tiles"])
  assert result["tiles"][0]["tuning"]["blocks"]["dq"] == [128, 32]
  assert result["tiles"][1]["tuning"]["blocks"]["dq"] == [128, 64]
  assert result["tiles"][1]["rope"] == "in kernel" and "rope" not in result["tiles"][0]
  # tiles runs first; its fastest (the only one here) is what attention then ran with
  used = result["tuning_used"]
  assert used["variant"] == result["tiles"][0]["variant"] and used["speedup_over_default"] is None
  assert result["tuning_used_rope"]["variant"] == result["tiles"][1]["variant"]
  assert {r["tiling"] for r in ours} == {used["variant"]}
  # the step runs attention_impl="pallas" (interpret mode here): each path's tiling labelled
  train = {r["variant"]: r for r in result["train"]}
  assert train["rope in kernel"]["tiling"] == result["tuning_used_rope"]["variant"] + (
      " (in-kernel RoPE)")
  # the A/B variants of the step: batch x2 after decode; the RoPE A/B's other arm (RoPE in the
  # kernels: the default applies it first), the SwiGLU A/B's other arm (jax's autodiff: the
  # default is layers.swiglu's own backward), the unrolled stack, and whole-logit loss; then,
  # after the Mosaic GPU kernels' section, the step on them; only the default step is profiled
  assert [r["variant"] for r in result["train"]] == [
      "default", "batch x2", "rope in kernel", "swiglu autodiff", "unrolled layers",
      "xla RMSNorm", "whole-logit loss", "mosaic attention"]
  assert all(r["step_s"] > 0 for r in result["train"])
  assert [r.get("profile_trace_file") for r in result["train"]] == [
      "train_trace.json.gz", None, None, None, None, None, None, None]
  assert [("optimizer_guarded_ms" in r) for r in result["train"]] == [True] + [False] * 7
  assert train["batch x2"]["batch"] == 2 * train["default"]["batch"] == 4
  assert "raw trace train_trace.json.gz" in md
  assert (train["default"]["rope"], train["rope in kernel"]["rope"]) == (
      "applied first", "in kernel")
  assert [train[n]["layers_switches"]["ROPE_IN_KERNEL"] for n in ("default", "rope in kernel")
          ] == [False, True]
  assert (train["whole-logit loss"]["loss_chunk_size"], train["default"]["loss_chunk_size"]) == (
      0, 1024)
  # Same data, init and steps: the whole-logit loss is the split loss up to rounding (at seq 64
  # the split path still runs: one 64-position chunk through its custom VJP). The rounding
  # differences go through the training steps' updates, as in the other arms below (1e-4); on
  # one CPU the two came out 1.04e-5 apart (11.0641298 against 11.0640144).
  assert train["whole-logit loss"]["loss"] == pytest.approx(train["default"]["loss"], rel=1e-4)
  assert train["whole-logit loss"]["loss"] != train["batch x2"]["loss"]
  summary = result["summary"]
  assert summary["train_rope_in_kernel_speedup"] == pytest.approx(
      train["default"]["step_s"] / train["rope in kernel"]["step_s"])
  assert summary["train_variants"]["batch x2"]["tokens_per_s_over_default"] == pytest.approx(
      train["batch x2"]["tokens_per_s"] / train["default"]["tokens_per_s"])
  assert set(summary["train_variants"]) == {"batch x2", "rope in kernel", "swiglu autodiff",
                                            "unrolled layers", "whole-logit loss", "xla RMSNorm",
                                            "mosaic attention"}
  # the step on the Hopper kernels (they passed their check first): the same loss within bf16
  assert train["mosaic attention"]["attention_kernels"].startswith("Mosaic GPU")
  assert {r["attention_kernels"] for n, r in train.items() if n != "mosaic attention"} == {
      "Triton (kernels_pallas.flash_attention)"}
  assert train["mosaic attention"]["loss"] == pytest.approx(train["default"]["loss"], rel=1e-2)
  assert summary["train_flash_mosaic_speedup"] == pytest.approx(
      train["default"]["step_s"] / train["mosaic attention"]["step_s"])
  assert train["default"]["tiling"] == result["tuning_used"]["variant"]
  assert {n: r["rms_norm"] for n, r in train.items()} == {
      n: "XLA (jnp formula)" if n == "xla RMSNorm" else "Pallas kernel" for n in train}
  # the same data, init and steps: RoPE first, the jnp RMSNorm and the SwiGLU backward change
  # only the rounding
  for name in ("rope in kernel", "swiglu autodiff", "unrolled layers", "xla RMSNorm"):
    assert train[name]["loss"] == pytest.approx(train["default"]["loss"], rel=1e-4), name
  assert summary["train_swiglu_vjp_speedup"] == pytest.approx(
      train["swiglu autodiff"]["step_s"] / train["default"]["step_s"])
  assert summary["train_fused_rms_norm_speedup"] == pytest.approx(
      train["xla RMSNorm"]["step_s"] / train["default"]["step_s"])
  best = max(train, key=lambda n: train[n]["tokens_per_s"])
  assert summary["train_best"]["variant"] == best
  assert "| whole-logit loss | pallas | applied first | whole logits | 2x64 |" in md
  # the four aims' verdicts: measured ones judged against their limits, the rest "not measured"
  aims = {a["aim"].split(" ")[0]: a for a in summary["aims"]}
  assert list(aims) == ["~1B", "flash", "ALiBi", "7B"]
  mfu = train["default"]["mfu_datasheet"] if "mfu_datasheet" in train["default"] else None
  assert aims["~1B"]["value"] == mfu and aims["~1B"]["met"] == (None if mfu is None else mfu >= .55)
  # --small times the forward only and has no cuDNN: neither attention aim is judged
  assert aims["flash"]["met"] is None and aims["ALiBi"]["met"] is None
  frac = next(r["fraction_of_limit"] for r in result["decode"]
              if r["label"] == "pallas" and r["batch"] == 1)
  assert aims["7B"]["value"] == frac and aims["7B"]["met"] == (frac >= 0.70)
  assert "## Aims" in md and md.count("| not measured |") >= 2
  for heading in ("## Kernel checks", "## Attention", "## ~1B training step", "## Decode step",
                  "## Backward tilings"):
    assert heading in md
  # every section's time next to the guard's estimate (--small still adds up the estimates)
  times = {t["section"]: t for t in result["section_times"]}
  assert list(times)[:5] == ["env", "ceilings", "check", "tiles", "tiles rope"]
  # one tiling per path here: one item's estimate each
  assert times["tiles"]["estimate_s"] == times["tiles rope"]["estimate_s"] == gpu_suite.COST[
      "tiles item"]
  assert times["train"]["estimate_s"] == gpu_suite.COST["train"]
  # the decode span check's A/B decides nothing: it runs before the Mosaic GPU kernels and the
  # step on them, last since no GPU has run them yet (a fault there costs no other figures)
  assert list(times)[-5:] == ["decode no-check", "attention mosaic", "attention mosaic blocks",
                              "train mosaic attention", "attention mosaic extra"]
  # the blocks stage picked the faster of the two it timed, and recorded it
  used = result["mosaic_blocks_used"]
  timed = {r["variant"]: r["ms"] for r in mosaic if r.get("mode") == "fwdbwd"}
  assert used["variant"] == min(timed, key=timed.get) and used["ms"] == min(timed.values())
  assert [r["label"] for r in result["decode"]][-1] == "pallas_no_span_check"
  assert all(t["seconds"] >= 0 for t in times.values()) and "## Section times" in md
  assert {t["guard_scale"] for t in times.values()} == {0.0}  # --small: the guard stands aside
  # each arm records the switches it ran with: what benchmarks/gpu_apply.py compares
  assert train["default"]["layers_switches"] == {"ROPE_IN_KERNEL": False, "FUSED_RMS_NORM": True,
                                                 "SCAN_LAYERS": True, "SWIGLU_VJP": True,
                                                 "FLASH_MOSAIC": False}
  assert train["mosaic attention"]["layers_switches"]["FLASH_MOSAIC"] is True
  assert train["swiglu autodiff"]["layers_switches"]["SWIGLU_VJP"] is False
  assert train["unrolled layers"]["layers_switches"]["SCAN_LAYERS"] is False
  assert train["rope in kernel"]["layers_switches"]["ROPE_IN_KERNEL"] is True
  assert train["xla RMSNorm"]["layers_switches"]["FUSED_RMS_NORM"] is False
  # gpu_apply reads this very file: it reports, and refuses to write a --small run's times
  import gpu_apply
  decisions = gpu_apply.decide(gpu_apply.load_results(tmp_path / "gpu_suite.json"))
  assert [d["setting"].rsplit(".", 1)[1] for d in decisions if d["writes"]] == [
      "MEASURED_TUNING['plain']", "MEASURED_TUNING['rope']", "DEFAULT_BLOCKS", "ROPE_IN_KERNEL",
      "FUSED_RMS_NORM",
      "SCAN_LAYERS", "SWIGLU_VJP", "FLASH_MOSAIC", "GUARD_RECOMPUTE", "COST"]
  # the guard's form is decided from this file's own optimizer rows (both forms timed)
  guard = next(d for d in decisions if d["setting"].endswith("GUARD_RECOMPUTE"))
  assert "not measured" not in guard["evidence"] and "same bits" in guard["evidence"]
  assert any("--small" in r for r in gpu_apply.write_refusals(result))


def test_gpu_suite_preflight_lowers_every_device_program_for_cuda(tmp_path):
  # The full run's programs at the device shapes, exported for CUDA on this CPU machine: the
  # Pallas -> Triton lowering of every kernel, the ~1B train step and the 7B decode steps.
  _run_suite("--preflight", tmp_path)
  result = json.loads((tmp_path / "gpu_suite_preflight.json").read_text())
  assert result["ok"] and all(r["ok"] for r in result["programs"])
  by = {(r["section"], r["program"]): r["triton_kernels"] for r in result["programs"]}
  assert {s for s, _ in by} == {"check", "attention", "train", "decode", "decode_kernel", "tiles",
                                "attention mosaic"}
  # flash attention fwd+bwd: the forward, dQ and dK/dV kernels, at every sequence and tiling;
  # the forward and the one fused backward kernel for the fused tilings and check
  flash = [n for (s, p), n in by.items() if s in ("attention", "tiles") or "flash" in p]
  assert len(flash) == (3 * 2 + len(gpu_suite.TILE_VARIANTS) + len(gpu_suite.TILE_VARIANTS_ROPE)
                        + 3) and set(flash) == {2, 3}
  fused = [p for (s, p), n in by.items() if n == 2]
  assert fused == [gpu_suite.FUSED_CHECK] + [f"plain {v}" for v, t in gpu_suite.TILE_VARIANTS
                                             if t and t.get("fused_backward")]
  assert len(fused) == 5
  # 46 before the fused backward's check and four tilings, the guard's other form, and the
  # SwiGLU A/B's autodiff arm
  # and the Mosaic GPU kernels: the default blocks fwd+bwd at 3 seqs, 4 other blocks at one,
  # the forward alone there (ours on Mosaic GPU and on Triton; cuDNN's and jax's Mosaic forward
  # ask the device when they lower), and the ~1B step on them; then 2 fused-backward settings
  # and 2 with the ping-pong forward
  assert len(by) == 46 + 5 + 1 + 1 + 9 + 1 + 2 + 2
  mosaic_counts = {(r["section"], r["program"]): r["mosaic_kernels"] for r in result["programs"]}
  mosaic = {p: n for (s, p), n in mosaic_counts.items() if s == "attention mosaic"}
  assert len(mosaic) == 13 and len(gpu_suite.mosaic_plan(gpu_suite.FULL["mosaic"])) == 15
  # fwd+bwd (3 seqs, 4 other split settings, the two-warpgroup ones among them): the fwd, dQ
  # and dK/dV Mosaic GPU kernels, no Triton kernel; the two fused-backward settings: the fwd
  # and the one backward kernel; the ping-pong forward with the split backward: 3, with the
  # fused one: 2; the forwards: one
  assert [n for p, n in mosaic.items() if "fwd+bwd" in p] == [3] * 7 + [2] * 2 + [3, 2]
  assert "mosaic fwd+bwd seq 4096 2 warpgroups, fused backward" in mosaic
  assert "mosaic fwd+bwd seq 4096 2 warpgroups" in mosaic
  assert all(by[("attention mosaic", p)] == 0 for p in mosaic if "fwd+bwd" in p)
  assert (mosaic["mosaic fwd seq 4096"], by[("attention mosaic", "mosaic fwd seq 4096")]) == (1, 0)
  assert (mosaic["ours fwd seq 4096"], by[("attention mosaic", "ours fwd seq 4096")]) == (0, 1)
  assert sum(mosaic_counts.values()) == 8 * 3 + 3 * 2 + 1 + 3  # none anywhere else
  # ~1B step (no remat), the layer scan's body once: attention 3 + two RMSNorms x (fwd, bwd) 4,
  # and the final norm's fwd + bwd 2.
  assert by[("train", "~1B step (pallas, 4x4096)")] == 9
  # the suite's variants with another program: twice the batch, and the loss on whole logits
  # (no kernel there: the same 9)
  assert by[("train", "~1B step (pallas, 8x4096) batch x2")] == 9
  assert by[("train", "~1B step (pallas, 4x4096) whole-logit loss")] == 9
  # rope in kernel: the same 9 kernels, RoPE inside them (the default applies it first, so
  # its rope-first arm is the default step and is not run); xla RMSNorm: the attention
  # kernels alone (each variant lowered with its switch set: it took effect in the program)
  assert by[("train", "~1B step (pallas, 4x4096) rope in kernel")] == 9
  assert ("train", "~1B step (pallas, 4x4096) rope-first") not in by
  # the unrolled stack: each of the 18 layers' 7 kernels appears in the program, + final norm
  assert by[("train", "~1B step (pallas, 4x4096) unrolled layers")] == 18 * 7 + 2
  assert by[("train", "~1B step (pallas, 4x4096) xla RMSNorm")] == 3
  # the SwiGLU product's backward is XLA either way: the same 9 kernels
  assert by[("train", "~1B step (pallas, 4x4096) swiglu autodiff")] == 9
  assert ("train", "~1B step (pallas, 4x4096) swiglu vjp") not in by
  # attention on the Hopper kernels: the Triton ones less the 3 attention kernels, and the 3
  # Mosaic GPU kernels (fwd, dQ, dK/dV) in their place
  assert by[("train", "~1B step (pallas, 4x4096) mosaic attention")] == 9 - 3
  assert mosaic_counts[("train", "~1B step (pallas, 4x4096) mosaic attention")] == 3
  assert ("train", "~1B step (pallas, 4x4096) triton attention") not in by
  assert sum(s == "train" and p.startswith("~1B step") for s, p in by) == 8
  # the optimizer update alone, as the step runs it and as plain optax: XLA only
  assert [by[("train", f"optimizer update ({n})")] for n in ("guarded", "plain",
                                                          "guarded, other form")] == [0, 0, 0]
  # 7B pallas decode step, 32 unrolled layers: 2 RMSNorms + decode attention each, the final
  # norm and the greedy pick, plus the span check's other branch (the stack on the XLA
  # attention path: each layer's 2 RMSNorms); the xla step has no kernel.
  assert by[("decode", "model step xla batch 1")] == 0
  for b in (1, 8, 32):
    assert by[("decode", f"model step pallas batch {b}")] == 32 * 3 + 2 + 32 * 2
  # the defaults at batch 1/8/32, four variants at batch 1, block_k 64 at 8 and 32, ragged
  assert sum(s == "decode_kernel" for s, _ in by) == 3 + 4 + 2 + 1
  assert "| train | ~1B step (pallas, 4x4096) | 9 | 0 | yes |" in (
      tmp_path / "gpu_suite_preflight.md").read_text()


def test_a_faster_mosaic_block_setting_is_checked_then_used_for_the_run(tmp_path):
  """The "blocks" stage: a variant faster than the defaults at variant_seq is checked (both
  checks, as "variant check" rows) and becomes flash_mgpu.DEFAULT_BLOCKS for the rest of the
  run (recorded as mosaic_blocks_used); main() puts the defaults back."""
  from kernels_pallas import flash_mgpu
  before = dict(flash_mgpu.DEFAULT_BLOCKS)
  cfg = gpu_suite.SMALL["mosaic"]
  name, blocks = gpu_suite.MOSAIC_VARIANTS[1]  # two compute warpgroups
  suite = gpu_suite.Suite(type("Args", (), dict(out=str(tmp_path), small=True, budget_s=1e9))(),
                          gpu_suite.SMALL)
  row = lambda variant, ms: dict(kind="time", mode="fwdbwd", seq=cfg["variant_seq"],  # noqa
                                 impl="mosaic", variant=variant, ms=ms)
  suite.result["attention_mosaic"] += [row("default", 2.0), row(name, 1.5)]
  try:
    gpu_suite._pick_mosaic_blocks(suite, "interpret", cfg)  # pylint: disable=protected-access
    used = suite.result["mosaic_blocks_used"]
    assert (used["variant"], used["ms"], used["default_ms"], used["checked"]) == (
        name, 1.5, 2.0, True)
    assert flash_mgpu.DEFAULT_BLOCKS == flash_mgpu.resolve_blocks(blocks) != before
    assert used["blocks"] == {ph: list(v) for ph, v in flash_mgpu.resolve_blocks(blocks).items()}
    checks = [r for r in suite.result["attention_mosaic"] if r["kind"] == "variant check"]
    assert [r["variant"] for r in checks] == [name, name] and all(r["ok"] for r in checks)
    assert suite.mosaic_blocks_saved == before  # what main() restores
  finally:
    flash_mgpu.DEFAULT_BLOCKS.update(before)


def _write_trace(folder, spans):
  """A jax.profiler-shaped perfetto trace: a GPU device process with kernel lines and the
  derived "XLA Modules" / "XLA Ops" lines, and a host process. spans: (line, name, dur in us)."""
  import gzip
  lines = sorted({ln for ln, _, _ in spans})
  tid = {ln: i + 1 for i, ln in enumerate(lines)}
  events = [{"ph": "M", "pid": 7, "name": "process_name", "args": {"name": "/device:GPU:0"}},
            {"ph": "M", "pid": 9, "name": "process_name", "args": {"name": "/host:CPU"}},
            {"ph": "X", "pid": 9, "tid": 1, "name": "PjitFunction(step)", "ts": 0, "dur": 9e6}]
  events += [{"ph": "M", "pid": 7, "tid": tid[ln], "name": "thread_name", "args": {"name": ln}}
             for ln in lines]
  events += [{"ph": "X", "pid": 7, "tid": tid[ln], "name": name, "ts": i * 10, "dur": dur}
             for i, (ln, name, dur) in enumerate(spans)]
  path = folder / "plugins" / "profile" / "run" / "host.trace.json.gz"
  path.parent.mkdir(parents=True)
  with gzip.open(path, "wt") as f:
    json.dump({"traceEvents": events}, f)


def test_profile_sums_one_kind_of_device_line_and_buckets_kernel_names(tmp_path):
  compute, copy = "Stream #13(Compute)", "Stream #14(MemcpyDtoD)"
  kernels = [(compute, "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n", 100_000),
             (compute, "nvjet_hsh_256x128_64x4_2x1_v_bz_coopA_NTN", 50_000),
             (compute, "baichuan_flash_fwd", 20_000), (compute, "baichuan_flash_dkdv", 30_000),
             (compute, "baichuan_rms_norm_bwd", 5_000),
             (compute, "loop_multiply_fusion_3", 10_000), (compute, "loop_multiply_fusion_4", 4_000),
             (compute, "input_reduce_fusion_1", 6_000), (compute, "loop_transpose_fusion", 8_000),
             (copy, "Memcpy DtoD (Device -> Device)", 2_000)]
  # The derived lines repeat the same time (module: the whole step; ops: per HLO op).
  derived = [("XLA Modules", "jit_step(123)", 240_000), ("XLA Ops", "fusion.12", 235_000)]
  _write_trace(tmp_path, kernels + derived)
  prof = gpu_suite.trace_top_ops(tmp_path, steps=2)
  assert prof["source"] == "kernel lines (Stream #...)"
  assert prof["total_ms"] == pytest.approx(235 / 2)  # the kernels only, per step; no host span
  assert prof["buckets"] == pytest.approx({
      "matmul (cuBLAS / CUTLASS / XLA gemm)": 75.0, "flash attention (Pallas)": 25.0,
      "RMSNorm (Pallas)": 2.5, "other Pallas kernels": 0.0, "memcpy / memset": 1.0,
      "copies / transposes": 4.0, "reductions (XLA input fusions)": 3.0,
      "elementwise (XLA loop fusions)": 7.0, "other": 0.0})
  assert sum(prof["buckets"].values()) == pytest.approx(prof["total_ms"])
  assert prof["top"]["loop_multiply_fusion"] == pytest.approx(7.0)  # numeric suffixes merged
  assert prof["lines_ms"]["XLA Modules"] == pytest.approx(120.0)
  # Without kernel lines the "XLA Ops" line is summed (not also "XLA Modules").
  _write_trace(tmp_path / "ops", derived)
  prof = gpu_suite.trace_top_ops(tmp_path / "ops", steps=2)
  assert prof["source"] == "XLA Ops line" and prof["total_ms"] == pytest.approx(117.5)
  assert prof["buckets"]["elementwise (XLA loop fusions)"] == pytest.approx(117.5)


def test_budget_guard_learns_the_estimates_within_the_run(tmp_path):
  # The guard scales every estimate by the finished sections' seconds over their estimates
  # (clamped to [0.4, 1.5]; 1 until those estimates add up to 30 s; 0 with --small).
  from types import SimpleNamespace
  suite = gpu_suite.Suite(SimpleNamespace(budget_s=100.0, small=False, out=str(tmp_path)),
                          gpu_suite.FULL)
  times = suite.result["section_times"]
  assert suite.guard_scale() == 1.0
  times.append(dict(section="env", seconds=1.0, estimate_s=2))
  assert suite.guard_scale() == 1.0  # 2 s of estimates: too little to learn from
  times.append(dict(section="check", seconds=30.0, estimate_s=60))
  assert suite.guard_scale() == pytest.approx(31 / 62)
  assert suite.fits("a", 190) and not suite.fits("b", 210)  # 95 and 105 s against ~100 left
  assert len(suite.result["skipped"]) == 1 and "estimate 210 s x 0.50" in suite.result["skipped"][0]
  times[-1]["seconds"] = 3.0  # far faster than estimated: clamped at 0.4
  assert suite.guard_scale() == 0.4
  times[-1]["seconds"] = 600.0  # far slower: clamped at 1.5
  assert suite.guard_scale() == 1.5 and not suite.fits("c", 70)
  suite.args.small = True
  assert suite.guard_scale() == 0.0 and suite.fits("d", 1e9)


@pytest.mark.parametrize("budget", ["0", "-100", "nan", "inf"])
def test_bad_budget_is_refused(tmp_path, capsys, budget):
  # a budget that is not a positive number of seconds would skip everything (or, as nan,
  # disable the watchdog): refused before anything runs, nothing written
  with pytest.raises(SystemExit) as e:
    gpu_suite.main(["--small", "--out", str(tmp_path / "o"), "--budget-s", budget])
  assert e.value.code == 2
  assert f"--budget-s {float(budget)}: must be a positive number of seconds" in \
      capsys.readouterr().err
  assert not (tmp_path / "o").exists()


def test_a_run_with_every_section_skipped_still_writes_its_files(tmp_path):
  # (--small's guard takes no time for its estimates, so 1 ms of budget skips everything, or
  # everything after `env` if that starts within the first millisecond)
  result = gpu_suite.main(["--small", "--out", str(tmp_path), "--budget-s", "0.001"])
  assert {t["section"] for t in result["section_times"]} <= {"env"}
  assert len(result["skipped"]) >= 10
  written = json.loads((tmp_path / "gpu_suite.json").read_text())
  assert written["skipped"] == result["skipped"]
  assert all(a["met"] is None for a in written["summary"]["aims"])
  assert "| not measured |" in (tmp_path / "gpu_suite.md").read_text()


def test_the_watchdog_stands_down_when_main_returns(tmp_path, monkeypatch):
  # main() called in-process (tests, a notebook) must not leave a timer that later ends the
  # caller: CI's pytest was killed with status 3, 30 s after a 1 ms-budget run returned.
  import threading
  events, exits = [], []
  start = gpu_suite.start_watchdog

  def recorded(suite, seconds):
    assert seconds == pytest.approx(0.001 + gpu_suite.WATCHDOG_GRACE_S)
    events.append(start(suite, 3600.0))  # the real thread, but not firing during this test
    return events[-1]

  monkeypatch.setattr(gpu_suite, "start_watchdog", recorded)
  monkeypatch.setattr(gpu_suite.os, "_exit", exits.append)
  gpu_suite.main(["--small", "--out", str(tmp_path), "--budget-s", "0.001"])
  assert len(events) == 1 and events[0].is_set()
  for t in threading.enumerate():
    if t.name == "gpu_suite watchdog":
      t.join(timeout=10)
  assert not [t for t in threading.enumerate() if t.name == "gpu_suite watchdog"]
  assert exits == []


def test_the_watchdog_ends_a_run_that_overruns(tmp_path, monkeypatch):
  # the hard stop itself: it records the stop, writes the files, and exits with status 3
  from types import SimpleNamespace
  import time
  exits = []
  monkeypatch.setattr(gpu_suite.os, "_exit", exits.append)
  suite = gpu_suite.Suite(SimpleNamespace(budget_s=1.0, small=True, out=str(tmp_path)),
                          gpu_suite.SMALL)
  gpu_suite.start_watchdog(suite, 0.1)
  deadline = time.time() + 10
  while not exits and time.time() < deadline:
    time.sleep(0.05)
  assert exits == [3]
  written = json.loads((tmp_path / "gpu_suite.json").read_text())
  assert [e for e in written["errors"] if e.startswith("watchdog: stopped at")]


def test_a_report_that_fails_does_not_end_the_run(tmp_path, monkeypatch):
  # The one device run must not be lost to a formatting bug on some unforeseen row: a summary
  # or markdown that raises is recorded as an error (once), the JSON keeps every row, and the
  # markdown says where the results are.
  from types import SimpleNamespace
  suite = gpu_suite.Suite(SimpleNamespace(budget_s=100.0, small=True, out=str(tmp_path)),
                          gpu_suite.SMALL)
  suite.result["train"].append(dict(variant="default", step_s=None))  # an odd row
  def broken(result):
    raise TypeError("unsupported format string passed to NoneType.__format__")
  monkeypatch.setattr(gpu_suite, "markdown", broken)
  monkeypatch.setattr(gpu_suite, "summarise", broken)
  for _ in range(2):
    suite.write(summary=True)
  errors = suite.result["errors"]
  assert len(errors) == 2 and errors[0].startswith("summary: TypeError: unsupported format")
  assert errors[1].startswith("markdown: TypeError") and "test_kernels_gpu_suite.py:" in errors[1]
  written = json.loads((tmp_path / "gpu_suite.json").read_text())
  assert written["train"] == [dict(variant="default", step_s=None)] and written["errors"] == errors
  md = (tmp_path / "gpu_suite.md").read_text()
  assert "The markdown report failed (markdown: TypeError" in md and "gpu_suite.json" in md


def test_jax_mha_rows_say_n_a_under_a_jax_without_the_bundled_triton_attention(monkeypatch):
  """jax 0.12.1 removed `jax.experimental.pallas.ops.gpu.attention` (the Pallas Triton ops):
  benchmarks/attention.py's `jax_mha` rows then say so instead of ending the run."""
  import jax.numpy as jnp
  from jax.experimental.pallas.ops import gpu as ops_gpu
  import attention as attn_bench  # benchmarks/attention.py
  monkeypatch.delattr(ops_gpu, "attention", raising=False)
  monkeypatch.setitem(sys.modules, "jax.experimental.pallas.ops.gpu.attention", None)
  row = attn_bench.bench_one("jax_mha", "fwd", b=1, s=128, h=2, d=64, dtype=jnp.bfloat16,
                             causal=True, alibi=False, iters=1)
  assert "tflops" not in row and row["impl"] == "jax_mha", row
  assert row["error"].startswith("n/a (jax ") and "removed in 0.12.1" in row["error"], row
