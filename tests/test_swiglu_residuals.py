"""benchmarks/swiglu_residuals.py: what the SwiGLU product's backward keeps, both ways."""

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import swiglu_residuals  # noqa: E402


def test_saved_and_run_parts(tmp_path, capsys):
  out = tmp_path / "swiglu.json"
  assert swiglu_residuals.main(["--part", "both", "--batch", "4", "--seq", "4096",
                                "--layers", "1", "--hidden", "64", "--heads", "2",
                                "--run-seq", "16", "--run-batch", "1", "--iters", "1",
                                "--json", str(out)]) == 0
  result = json.loads(out.read_text())
  auto, ours = result["saved"]["autodiff"], result["saved"]["swiglu_vjp"]
  # the ~1B step: 6 [18, 4, 4096, 5504] bf16 arrays kept by jax's autodiff, 3 by layers.swiglu
  # (gate, up, the product); nothing else changes, so the difference is exactly 3 of them
  assert (auto["ffn_arrays"], ours["ffn_arrays"]) == (6, 3)
  assert auto["stacked_bytes"] - ours["stacked_bytes"] == 3 * 18 * 4 * 4096 * 5504 * 2
  assert auto["total_bytes"] - ours["total_bytes"] == 3 * 18 * 4 * 4096 * 5504 * 2
  run = result["run"]
  assert run["same_loss_bits"] and run["config"]["ffn"] == 256  # 8/3 x 64 up to a multiple of 128
  for arm in ("autodiff", "swiglu_vjp"):
    assert run[arm]["median_s"] > 0 and 0 < run[arm]["grad_rel_err_max"] < 0.1
  text = capsys.readouterr().out
  assert "| jax autodiff | 6 | 30.98 |" in text and "| layers.swiglu | 3 | 21.25 |" in text


def test_bad_sizes_are_refused(capsys):
  with pytest.raises(SystemExit) as e:
    swiglu_residuals.main(["--layers", "0"])
  assert e.value.code == 2
  assert "--layers must be >= 1 (got 0)" in capsys.readouterr().err
