"""benchmarks/trace_phases.py on a hand-built GPU trace whose parts are known in advance, and on
the committed H200 trace (the figures docs/gpu.md quotes)."""

import gzip
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import trace_phases  # noqa: E402


def _trace(path, names_us):
  events = [{"ph": "M", "pid": 1, "name": "process_name", "args": {"name": "/device:GPU:0"}},
            {"ph": "M", "pid": 9, "name": "process_name", "args": {"name": "/host:CPU"}},
            {"ph": "X", "pid": 9, "tid": 1, "name": "PjitFunction", "ts": 0, "dur": 1e6}]
  events += [{"ph": "X", "pid": 1, "tid": 14, "name": n, "ts": 10 * i, "dur": d}
             for i, (n, d) in enumerate(names_us)]
  with gzip.open(path, "wt") as f:
    json.dump({"traceEvents": events}, f)
  return path


STEP = [("loop_broadcast_fusion_6", 4000), ("loop_convert_fusion", 300),  # head: 4.3 ms
        ("baichuan_flash_fwd", 900), ("nvjet_sm90_tst", 700), ("baichuan_flash_dkdv", 800),
        ("baichuan_rms_norm_bwd", 100),  # the last backward kernel
        ("input_reduce_fusion_26", 500), ("input_reduce_fusion_45", 2),  # gradient norm
        ("loop_add_fusion_15", 600), ("loop_add_fusion_17", 3),  # an update; a small add: other
        ("input_reduce_fusion_19", 350), ("loop_add_fusion_12", 900),  # finiteness; update
        ("loop_select_fusion_1", 1500), ("memcpy32_post", 1)]


def test_phases_of_a_hand_built_step(tmp_path):
  path = _trace(tmp_path / "t.json.gz", STEP * 2)
  steps = trace_phases.main([str(path), "--steps", "2"])
  assert len(steps) == 2 and steps[0] == steps[1]
  r = steps[0]
  assert r["head_ms"] == pytest.approx(4.3) and r["head_broadcast_ms"] == pytest.approx(4.0)
  assert r["optimizer_parts_ms"] == pytest.approx({
      "gradient norm": 0.502, "AdamW update": 1.5, "finiteness reductions": 0.35,
      "guard selects": 1.5, "other": 0.004})
  assert r["optimizer_ms"] == pytest.approx(0.502 + 1.5 + 0.35 + 1.5 + 0.004)


def test_bad_traces_are_named(tmp_path, capsys):
  with pytest.raises(SystemExit):
    trace_phases.main([str(tmp_path / "missing.json.gz")])
  assert "missing.json.gz: no such file" in capsys.readouterr().err
  (tmp_path / "plain.json.gz").write_text("not gzip")
  with pytest.raises(SystemExit):
    trace_phases.main([str(tmp_path / "plain.json.gz")])
  assert "not a gzipped JSON trace" in capsys.readouterr().err
  path = _trace(tmp_path / "t.json.gz", STEP * 2)
  with pytest.raises(SystemExit):
    trace_phases.main([str(path), "--steps", "3"])
  assert "do not split into that many equal steps" in capsys.readouterr().err


def test_the_committed_h200_trace():
  steps = trace_phases.main([str(ROOT / "docs/results/gpu_suite_h200_train_trace.json.gz")])
  r = steps[0]
  assert round(r["optimizer_ms"], 2) == 18.96 and round(r["head_broadcast_ms"], 2) == 7.52
  assert {k: round(v, 2) for k, v in r["optimizer_parts_ms"].items()} == {
      "gradient norm": 1.08, "AdamW update": 5.41, "finiteness reductions": 3.38,
      "guard selects": 8.73, "other": 0.35}
