"""Tests for baichuan_jax.research: scaling-law fits, compute-optimal sizes, position-bucket
evaluation, sweep bookkeeping, experiment specs, the measured training run and the plots."""

import json
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from baichuan_jax import configs, losses, sharding
from baichuan_jax import train as engine
from baichuan_jax.model import BaichuanLM, init_params
from baichuan_jax.research import (Sweep, ablation, bucket_means, compute_optimal_sizes,
                                   document_windows, fit_loss_vs_compute, fit_power_law,
                                   length_extrapolation, loss_at_compute, per_position_loss, plots,
                                   prediction_error, runner, scaling, scaling_law)
from experiments.configs import ablation_positions as ablation_config
from experiments.configs import scaling as scaling_config

# ------------------------------------------------------------------------------ scaling-law math


@pytest.mark.parametrize("a,b,l_inf", [(3.1e3, -0.3, 1.8), (40.0, -0.12, 0.5), (2e5, -0.45, 3.2)])
def test_fit_recovers_known_law(a, b, l_inf):
  c = np.geomspace(1e11, 1e15, 7)
  fit = fit_loss_vs_compute(c, a * c**b + l_inf)
  assert fit.b == pytest.approx(b, rel=1e-4)
  assert fit.l_inf == pytest.approx(l_inf, rel=1e-4, abs=1e-5)
  assert fit.a == pytest.approx(a, rel=1e-3)
  assert fit.rmse < 1e-6
  # Extrapolation one decade beyond the fitted range.
  assert float(fit.predict(1e16)) == pytest.approx(a * 1e16**b + l_inf, rel=1e-5)


def test_fit_with_noise_predicts_held_out_point():
  rng = np.random.default_rng(0)
  a, b, l_inf = 500.0, -0.25, 2.0
  c = np.geomspace(1e11, 1e14, 6)
  noisy = a * c**b + l_inf + rng.normal(0, 0.005, c.size)
  fit = fit_loss_vs_compute(c, noisy)
  true_next = a * 1e15**b + l_inf
  err = prediction_error(float(fit.predict(1e15)), true_next)
  assert abs(err["rel_error"]) < 0.02
  assert err["abs_error"] == pytest.approx(err["predicted"] - true_next)
  assert 0 < fit.rmse < 0.01


def test_fit_rejects_bad_input():
  with pytest.raises(ValueError, match="at least 3"):
    fit_loss_vs_compute([1e10, 1e11], [3.0, 2.9])
  with pytest.raises(ValueError, match="distinct"):
    fit_loss_vs_compute([1e10, 1e10, 1e11], [3.0, 2.9, 2.8])
  with pytest.raises(ValueError, match="> 0"):
    fit_loss_vs_compute([0.0, 1e10, 1e11], [3.0, 2.9, 2.8])
  with pytest.raises(ValueError, match="same length"):
    fit_loss_vs_compute([1e9, 1e10, 1e11], [3.0, 2.9])


def test_power_law_and_interpolation_by_hand():
  pl = fit_power_law([1.0, 4.0, 16.0], [3.0, 6.0, 12.0])  # y = 3 x^0.5
  assert pl.coef == pytest.approx(3.0) and pl.exponent == pytest.approx(0.5)
  # Linear in log C: 1e11 is halfway between 1e10 and 1e12.
  assert loss_at_compute([1e10, 1e12], [4.0, 2.0], 1e11) == pytest.approx(3.0)
  assert loss_at_compute([1e12, 1e10], [2.0, 4.0], 1e12) == pytest.approx(2.0)
  assert loss_at_compute([1e10, 1e12], [4.0, 2.0], 1e13) is None


def _chinchilla_loss(n, d):
  # Hoffmann et al. (2022) fitted parametric loss.
  return 1.69 + 406.4 / n**0.34 + 410.7 / d**0.28


def test_compute_optimal_sizes_match_dense_grid_optimum():
  ladder = np.geomspace(1e6, 1e9, 13)  # factor ~1.78 between rungs
  curves = {}
  for n in ladder:
    d = np.geomspace(1e7, 1e12, 60)
    curves[f"n{n:.0f}"] = {"params": n, "compute": 6 * n * d, "loss": _chinchilla_loss(n, d)}
  budgets = [1e17, 1e18, 1e19, 1e20]
  rows = compute_optimal_sizes(curves, budgets)
  assert [r["budget"] for r in rows] == budgets
  dense = np.geomspace(1e5, 1e10, 20001)
  for r in rows:
    truth = dense[np.argmin(_chinchilla_loss(dense, r["budget"] / (6 * dense)))]
    # The best measured rung is the one nearest the true optimum in log space (or its neighbour
    # when the optimum sits between two rungs), and the parabola refinement is closer still.
    assert abs(math.log(r["best_params"] / truth)) <= math.log(1.78)
    assert abs(math.log(r["n_opt"] / truth)) < abs(math.log(r["best_params"] / truth)) + 1e-9
    assert abs(math.log(r["n_opt"] / truth)) < math.log(1.2)
  # The optimum grows with compute with Chinchilla's exponent beta / (alpha + beta) = 0.45.
  pl = fit_power_law([r["budget"] for r in rows], [r["n_opt"] for r in rows])
  assert pl.exponent == pytest.approx(0.28 / (0.34 + 0.28), abs=0.05)


def test_envelope_holds_final_loss_of_finished_runs():
  curves = {"a": {"params": 1.0, "compute": [1.0, 10.0], "loss": [5.0, 3.0]},
            "b": {"params": 2.0, "compute": [1.0, 100.0], "loss": [6.0, 2.0]}}
  assert loss_at_compute([1.0, 10.0], [5.0, 3.0], 50.0, hold_final=True) == 3.0
  # Budget 50 is past a's end: without hold_final only b covers it (no comparison).
  assert compute_optimal_sizes(curves, [50.0]) == []
  (at50,) = compute_optimal_sizes(curves, [50.0], hold_final=True)
  # b at 50: 6 - 4 * log(50) / log(100) = 2.602 < a's held 3.0.
  assert at50["best_run"] == "b" and at50["best_loss"] == pytest.approx(6 - 4 * math.log(50, 100))
  (at5,) = compute_optimal_sizes(curves, [5.0], hold_final=True)
  # a at 5: 5 - 2 log10(5) = 3.60; b: 6 - 4 log100(5) = 4.60.
  assert at5["best_run"] == "a" and at5["best_loss"] == pytest.approx(5 - 2 * math.log10(5))
  assert at5["candidates"] == 2 and at5["n_opt"] == 1.0


# ------------------------------------------------------------------------------ position buckets


def test_document_windows_by_hand():
  docs = [[5, 6, 7], [8, 9, 10, 11, 12, 13], [20]]
  w = document_windows(docs, length=4, max_windows=10, bos_id=1, eos_id=2)
  # [1,5,6,7,2] -> one window; [1,8,...,13,2] (8 tokens) -> two; [1,20,2] too short.
  np.testing.assert_array_equal(w, [[1, 5, 6, 7], [1, 8, 9, 10], [11, 12, 13, 2]])
  assert document_windows(docs, 4, 2).shape == (2, 4)
  with pytest.raises(ValueError, match="no document has 9 tokens"):
    document_windows(docs, 9, 4)


def test_bucket_means_by_hand():
  np.testing.assert_allclose(bucket_means(np.arange(10.0), 4), [1.5, 5.5, 8.5])


@pytest.fixture(scope="module", params=["rope", "alibi"])
def small_model(request):
  cfg = configs.get("tiny", vocab_size=64, hidden_size=32, num_layers=1, num_heads=2,
                    num_kv_heads=2, intermediate_size=96, dtype="float32", max_seq_len=64,
                    position_embedding=request.param)
  # Jitted: op-by-op initialisation of the scanned model is slow on CPU.
  return cfg, jax.jit(lambda k: init_params(cfg, k))(jax.random.PRNGKey(0))


def test_per_position_loss_matches_reference(small_model):
  cfg, params = small_model
  rng = np.random.default_rng(1)
  windows = rng.integers(3, cfg.vocab_size, (5, 17)).astype(np.int32)
  got = per_position_loss(cfg, params, windows, batch_size=2)  # 3 batches, last one padded
  logits = jax.jit(lambda p, t: BaichuanLM(cfg).apply({"params": p}, t))(
      params, jnp.asarray(windows[:, :-1]))
  for t in (0, 7, 15):
    mask = np.zeros((5, 16), np.float32)
    mask[:, t] = 1
    total, count = losses.cross_entropy(logits, jnp.asarray(windows[:, 1:]), jnp.asarray(mask))
    assert got[t] == pytest.approx(float(total / count), rel=1e-5)


def test_length_extrapolation_first_bucket_is_causal(small_model):
  cfg, params = small_model
  rng = np.random.default_rng(2)
  windows = rng.integers(3, cfg.vocab_size, (3, 4 * 4 + 1)).astype(np.int32)
  rep = length_extrapolation(cfg, params, windows, train_len=4, factors=(1, 2, 4), batch_size=4)
  assert rep["factors"] == [1, 2, 4] and rep["num_windows"] == 3
  assert [len(rep["buckets"][f]) for f in (1, 2, 4)] == [1, 2, 4]
  # Causal attention: the first L positions see the same tokens at every evaluation length.
  for f in (2, 4):
    assert rep["buckets"][f][0] == pytest.approx(rep["buckets"][1][0], rel=1e-5)
    assert rep["buckets"][f][:f // 2] == pytest.approx(rep["buckets"][f // 2], rel=1e-5)
  assert rep["mean"][4] == pytest.approx(np.mean(rep["buckets"][4]), rel=1e-6)
  with pytest.raises(ValueError, match="need 33"):
    length_extrapolation(cfg, params, windows, train_len=4)  # default factors go to 8


# ------------------------------------------------------------------------------ sweep bookkeeping


def test_sweep_resumes_with_missing_runs(tmp_path):
  specs = {"a": {"n": 1}, "b": {"n": 2}, "c": {"n": 3}}
  sweep = Sweep(tmp_path, specs)
  assert sweep.pending() == ["a", "b", "c"]
  sweep.record("b", {"loss": 2.5})
  # A fresh object (an interrupted and restarted sweep) sees the finished run.
  again = Sweep(tmp_path, specs)
  assert again.pending() == ["a", "c"]
  assert again.result("b") == {"loss": 2.5}
  assert list(again.results()) == ["b"]
  assert [p.name for p in (tmp_path / "runs" / "b").iterdir()] == ["result.json"]
  table = again.progress_table([("loss", lambda n, s, r: f"{r['loss']:.1f}" if r else "-")])
  lines = table.splitlines()
  assert lines[0].split() == ["run", "status", "loss"]
  assert lines[3].split() == ["b", "done", "2.5"] and lines[2].split() == ["a", "pending", "-"]
  assert lines[-1] == "1/3 runs done"
  with pytest.raises(KeyError):
    again.result("a")


def test_sweep_refuses_changed_spec_and_bad_names(tmp_path):
  Sweep(tmp_path, {"a": {"lr": 1e-3}}).record("a", {"loss": 1.0})
  with pytest.raises(ValueError, match=r"run 'a' .* different spec \(fields \['lr'\]\)"):
    Sweep(tmp_path, {"a": {"lr": 2e-3}}).pending()
  with pytest.raises(ValueError, match="file name"):
    Sweep(tmp_path, {"x/y": {}})


# ------------------------------------------------------------------------------ experiment specs


def test_ablation_runs_differ_only_in_position_scheme():
  cfg = ablation_config.get_config()
  specs = ablation.run_specs(cfg)
  assert sorted(specs) == sorted(f"{s}_s{k}" for s in ("rope", "alibi") for k in cfg.seeds)
  for seed in cfg.seeds:
    r, a = specs[f"rope_s{seed}"], specs[f"alibi_s{seed}"]
    diff = {k for k in r if r[k] != a[k]}
    assert diff == {"scheme", "model"}
    assert {k for k in r["model"] if r["model"][k] != a["model"][k]} == {"position_embedding"}
    mr, ma = (ml_collections.ConfigDict(x["model"]) for x in (r, a))
    assert configs.flops_per_token(mr, 64) == configs.flops_per_token(ma, 64)
  assert specs["rope_s0"]["data_seed"] != specs["rope_s1"]["data_seed"]
  with pytest.raises(ValueError, match="unknown"):
    ablation_config.get_config("tpu-pod")


def test_scaling_specs_schedule_per_budget():
  cfg = scaling_config.get_config()
  specs = scaling.run_specs(cfg)
  assert len(specs) >= 6
  items = list(specs.values())
  sizes = [s["params_non_embedding"] for s in items]
  assert sizes == sorted(sizes) and [s["held_out"] for s in items] == [False] * 5 + [True]
  for s, rung in zip(items, scaling.parse_ladder(cfg.ladder)):
    t = s["train"]
    assert t["total_steps"] == round(rung["tokens"] / (cfg.batch_size * cfg.seq_len))
    assert t["warmup_steps"] == max(1, round(0.1 * t["total_steps"]))
    assert t["peak_lr"] == pytest.approx(3e-3 * (s["params_non_embedding"] / 1e5) ** -0.25)
    assert s["compute"] == s["tokens"] * s["flops_per_token"]
  cfg.budget_multipliers = (0.5, 1.0)
  two = scaling.run_specs(cfg)
  assert len(two) == 2 * len(specs)
  half, full = two["n0.027M_x0.5"], two["n0.027M_x1"]
  assert half["train"]["total_steps"] * 2 == pytest.approx(full["train"]["total_steps"], abs=1)
  with pytest.raises(ValueError, match=r"ladder rung '64,2' must be"):
    scaling.parse_ladder("32,2,1,100; 64,2")
  cfg.ladder = "64,2,2,100; 32,2,1,100; 96,2,3,100; 128,2,4,100"
  with pytest.raises(ValueError, match="grow strictly"):
    scaling.run_specs(cfg)


def test_scaling_analysis_predicts_held_out_from_known_law(tmp_path):
  cfg = scaling_config.get_config()
  specs = scaling.run_specs(cfg)
  a, b, l_inf = 80.0, -0.1, 3.0
  results = {}
  for name, s in specs.items():
    cs = np.geomspace(s["compute"] / 8, s["compute"], 4)
    results[name] = {"evals": [{"flops": c, "val_loss": a * c**b + l_inf} for c in cs],
                     "final_val_loss": a * s["compute"]**b + l_inf,
                     "train_tokens_per_s": 1000.0, "wall_s": 60.0}
  out = scaling.analyze(cfg, specs, results)
  assert out["fit"]["num_points"] == len(specs) - 1
  assert out["fit"]["b"] == pytest.approx(b, rel=1e-3)
  (pred,) = out["predictions"]
  assert pred["name"] == list(specs)[-1] and abs(pred["rel_error"]) < 1e-5
  md = scaling.markdown(cfg, specs, results, out, True, {
      "device": "cpu", "num_devices": 1, "cpu_cores": 2, "jax": "x", "flax": "y",
      "python": "3", "date": "today"})
  assert "held out" in md and f"{pred['actual']:.4f}" in md and "PARTIAL" not in md
  # The figures are real PNGs.
  f1 = plots.scaling_fit(out["points"], scaling_law.LossFit(**out["fit"]), tmp_path / "f.png",
                         curves=out["curves"])
  f2 = plots.optimal_size(out["optimal"], tmp_path / "o.png")
  for f in (f1, f2):
    with open(f, "rb") as fh:
      assert fh.read(8) == b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------------ measured run


def test_train_lm_learns_and_counts_tokens_and_flops():
  cfg = configs.get("tiny", vocab_size=32, hidden_size=32, num_layers=1, num_heads=2,
                    num_kv_heads=2, intermediate_size=64, dtype="float32", max_seq_len=16)
  t = engine.default_train_config()
  t.batch_size, t.seq_len, t.total_steps, t.warmup_steps, t.peak_lr = 8, 16, 40, 4, 1e-2
  # A deterministic cycle 3,4,...,10,3,4,...: every next token is predictable.
  row = (np.arange(17) % 8 + 3).astype(np.int32)
  batch = {"inputs": np.tile(row[:-1], (8, 1)), "targets": np.tile(row[1:], (8, 1)),
           "positions": np.tile(np.arange(16, dtype=np.int32), (8, 1)),
           "segment_ids": np.ones((8, 16), np.int32), "loss_mask": np.ones((8, 16), np.int32)}
  seen = []
  # One device: the fake 8-device CPU mesh of the test session only slows compilation here.
  mesh = sharding.make_mesh(t.mesh, devices=jax.devices()[:1])
  res = runner.train_lm(cfg, t, None, eval_every=20, val_batches=[batch], log_every=10,
                        train_batches=iter([batch] * 40), progress=seen.append, mesh=mesh)
  assert [e["step"] for e in res.evals] == [20, 40]
  assert [h["step"] for h in res.history] == [1, 10, 20, 30, 40]
  assert res.evals[-1]["tokens"] == 40 * 8 * 16
  fpt = configs.flops_per_token(cfg, 16)["total"]
  assert res.flops_per_token == fpt and res.evals[-1]["flops"] == 40 * 8 * 16 * fpt
  assert res.evals[-1]["val_loss"] < 0.5 * math.log(32)  # from ~log V towards 0
  assert res.train_tokens_per_s > 0 and len(seen) == len(res.history) + len(res.evals)
  assert json.loads(json.dumps(res.summary()))["final_val_loss"] == res.evals[-1]["val_loss"]
