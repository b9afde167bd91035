"""The model-backed scoring functions on a tiny random model, and end-to-end runs on the fixtures."""

import json
import shutil

import jax
import numpy as np
import pytest

from baichuan_jax import configs
from baichuan_jax.eval import (evaluate_benchmark, evaluate_text, from_sequence_logits,
                               letter_scores, load_benchmark, nll_from_logits, pad_batch,
                               read_texts)
from baichuan_jax.eval.model_fns import score_fns
from baichuan_jax.model import BaichuanLM, init_params
from test_eval_support import FIXTURES, make_tokenizer


@pytest.fixture(scope="module")
def tiny():
  cfg = configs.get("tiny", num_layers=2, dtype="float32")
  params = jax.jit(lambda rng: init_params(cfg, rng))(jax.random.PRNGKey(0))  # jit: faster init
  return cfg, params


@pytest.fixture(scope="module")
def fns(tiny):
  return score_fns(*tiny)  # (score_fn, nll_fn), jitted once for the module


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  return make_tokenizer(tmp_path_factory)


def _full_logits(cfg, params):
  apply = jax.jit(lambda p, t, pos, seg: BaichuanLM(cfg).apply({"params": p}, t, positions=pos,
                                                               segment_ids=seg))
  return lambda b: np.asarray(apply(params, b.tokens, b.positions, b.segment_ids))


def test_next_token_logits_match_full_forward_and_ignore_padding(tiny, fns):
  cfg, params = tiny
  score_fn, nll_fn = fns
  rng = np.random.default_rng(0)
  rows = [list(rng.integers(3, cfg.vocab_size, size=n)) for n in (5, 12, 9)]
  ref = from_sequence_logits(_full_logits(cfg, params))
  right = pad_batch(rows, 0, "right", length=16)
  left = pad_batch(rows, 0, "left", length=16)
  np.testing.assert_allclose(score_fn(right), ref(right), atol=1e-4, rtol=1e-4)
  # Each row alone in its batch gives the same next-token logits as beside the others.
  for i, r in enumerate(rows):
    alone = score_fn(pad_batch([r], 0, "right", length=16, batch_size=3))[0]
    np.testing.assert_allclose(score_fn(left)[i], alone, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(score_fn(right)[i], alone, atol=1e-4, rtol=1e-4)
  targets = pad_batch([r[1:] + [5] for r in rows], 0, "right", length=16).tokens
  np.testing.assert_allclose(nll_fn(right, targets),
                             nll_from_logits(_full_logits(cfg, params))(right, targets),
                             atol=1e-4, rtol=1e-4)


def test_left_and_right_padding_pick_the_same_letters(tiny, fns, tok):
  cfg, _ = tiny
  score_fn, _ = fns
  bench = load_benchmark("cmmlu", FIXTURES / "cmmlu", shots=1)
  res = {pad: evaluate_benchmark(bench, tok, score_fn, max_len=cfg.max_seq_len, batch_size=4,
                                 padding=pad, progress=False) for pad in ("left", "right")}
  a, b = res["left"]["predictions"], res["right"]["predictions"]
  assert [p["prediction"] for p in a] == [p["prediction"] for p in b]
  np.testing.assert_allclose([p["letter_scores"] for p in a], [p["letter_scores"] for p in b],
                             atol=1e-3)


def test_ppl_of_a_short_document_equals_one_forward(tiny, fns, tok):
  cfg, params = tiny
  _, nll_fn = fns
  text = [t for _, t in read_texts(FIXTURES / "ppl" / "validation.jsonl")][1]
  ids = [tok.bos_id] + tok.encode(text)
  logits = _full_logits(cfg, params)(pad_batch([ids[:-1]], 0, length=16 * -(-len(ids) // 16)))
  logp = np.asarray(jax.nn.log_softmax(logits[0], -1))  # [padded, V]
  expect = -sum(logp[i, ids[i + 1]] for i in range(len(ids) - 1))
  res = evaluate_text([text], tok.encode, tok.bos_id, nll_fn, max_len=cfg.max_seq_len,
                      batch_size=4, progress=False)
  assert res["nll_nats"] == pytest.approx(expect, rel=1e-4)
  # Short windows with overlap score the same tokens, with less context: a different total.
  short = evaluate_text([text], tok.encode, tok.bos_id, nll_fn, max_len=64, stride=16,
                        batch_size=4, progress=False)
  assert short["tokens"] == res["tokens"] == len(ids) - 1


@pytest.mark.parametrize("task", ["ceval", "cmmlu", "mmlu", "gaokao", "agieval"])
def test_every_benchmark_runs_on_the_tiny_model(task, tiny, fns, tok):
  cfg, _ = tiny
  score_fn, _ = fns
  bench = load_benchmark(task, FIXTURES / task, shots=5)
  res = evaluate_benchmark(bench, tok, score_fn, max_len=cfg.max_seq_len, batch_size=4,
                           progress=False)
  assert res["total"] == bench.num_questions
  assert 0 <= res["micro_accuracy"] <= 1
  for p in res["predictions"]:
    assert p["prompt_tokens"] <= cfg.max_seq_len
    assert p["prediction"] == "ABCDE"[int(np.argmax(p["letter_scores"]))]


def test_cli_end_to_end_on_fixtures(tiny, tok, tmp_path, capsys):
  pytest.importorskip("baichuan_jax.tokenizer")
  from baichuan_jax import hf  # pylint: disable=import-outside-toplevel
  from baichuan_jax.eval.__main__ import main  # pylint: disable=import-outside-toplevel
  cfg, params = tiny
  model_dir = tmp_path / "tiny-hf"
  hf.save(cfg, jax.device_get(params), model_dir)
  shutil.copy(tok.sp_path, model_dir / "tokenizer.model")
  out = tmp_path / "out"
  res = main(["--task", "ceval", "--data-dir", str(FIXTURES / "ceval"), "--hf", str(model_dir),
              "--dtype", "float32", "--batch-size", "4", "--out", str(out), "--no-progress"])
  saved = json.loads((out / "ceval_results.json").read_text(encoding="utf-8"))
  assert saved["total"] == res["total"] == 6 and len(saved["skipped"]) == 2
  assert set(saved["categories"]) == {"STEM", "Humanities"}
  assert "| **Average** | 2 | 6 |" in capsys.readouterr().out
  # The same model through the library gives the same predictions.
  score_fn, _ = score_fns(cfg, params)
  lib = evaluate_benchmark(load_benchmark("ceval", FIXTURES / "ceval", protocol="baichuan"), tok,
                           score_fn, max_len=cfg.max_seq_len, batch_size=4, progress=False)
  assert [p["prediction"] for p in lib["predictions"]] == [p["prediction"] for p in res["predictions"]]

  res = main(["--task", "ppl", "--data-dir", str(FIXTURES / "ppl"), "--hf", str(model_dir),
              "--dtype", "float32", "--out", str(out), "--no-progress"])
  assert res["documents"] == 4 and res["bits_per_byte"] > 0
  assert (out / "ppl_results.md").is_file()
