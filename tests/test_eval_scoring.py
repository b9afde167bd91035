"""Option-letter scoring with stub models of chosen logits; aggregation; the harness on fixtures."""

import json

import numpy as np
import pytest

from baichuan_jax.eval import (aggregate, evaluate_benchmark, from_sequence_logits, letter_scores,
                               load_benchmark, pad_batch, pick, prompt_text, write_reports)
from test_eval_support import FIXTURES, make_tokenizer

V = 64
LETTER_IDS = [40, 41, 42, 43]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  return make_tokenizer(tmp_path_factory)


def _table_score_fn(table):
  """Stub model: a row's next-token logits are table[first token - 10] on the letter ids."""
  def score(batch):
    first = batch.tokens[np.arange(len(batch.tokens)), np.argmax(batch.segment_ids, axis=1)]
    logits = np.zeros((len(first), V), np.float32)
    for b, t in enumerate(first):
      if batch.segment_ids[b].any():
        logits[b, LETTER_IDS] = table[t - 10]
    return logits
  return score


@pytest.mark.parametrize("padding", ["left", "right"])
def test_letter_scores_follow_each_prompt(padding):
  rng = np.random.default_rng(0)
  table = rng.normal(size=(7, 4)).astype(np.float32)
  prompts = [[10 + i] + [5] * (3 * i + 1) for i in range(7)]  # lengths 2..20, unsorted below
  prompts = [prompts[i] for i in (3, 0, 6, 1, 5, 2, 4)]
  got = letter_scores(prompts, LETTER_IDS, _table_score_fn(table), batch_size=3, bucket=8,
                      padding=padding, progress=False)
  rows = table[[p[0] - 10 for p in prompts]].astype(np.float64)
  # log-softmax over the vocab: V - 4 zero logits plus the four letter logits.
  lse = np.log(np.exp(rows).sum(1, keepdims=True) + (V - 4))
  np.testing.assert_allclose(got, rows - lse, rtol=1e-6)
  assert list(pick(got, [4] * 7)) == [int(np.argmax(table[p[0] - 10])) for p in prompts]


def test_multi_token_letters_sum_their_log_probs():
  # Letters: A = (32, 20), B = (32, 21), C = (33,). The stub's next-token logits depend only on the
  # last token: after the prompt (last token 5): {32: ln 3, 33: 0}; after 32: {20: ln 1, 21: ln 2}.
  def score(batch):
    last = batch.tokens[np.arange(len(batch.tokens)), batch.last_index]
    logits = np.full((len(last), V), -1e9)
    logits[last == 5, 32], logits[last == 5, 33] = np.log(3), 0.0
    logits[last == 32, 20], logits[last == 32, 21] = 0.0, np.log(2)
    return logits
  got = letter_scores([[1, 5], [1, 7, 5]], [(32, 20), (32, 21), (33,)], score, batch_size=2,
                      progress=False)
  # p(A) = 3/4 * 1/3, p(B) = 3/4 * 2/3, p(C) = 1/4.
  expect = np.log([3 / 4 * 1 / 3, 3 / 4 * 2 / 3, 1 / 4])
  np.testing.assert_allclose(got, [expect, expect], rtol=1e-9)
  assert list(pick(got, [3, 3])) == [1, 1]


def test_pick_highest_letter_and_break_ties_to_the_lowest():
  scores = np.array([[1, 3, 2, 0], [5, 5, 1, 5], [0, 0, 0, 0], [1, 2, 9, 9], [2, 7, 7, 1]])
  # Row 3 has only two options, so its large C/D scores are ignored.
  assert list(pick(scores, [4, 4, 4, 2, 4])) == [1, 0, 0, 1, 1]


def test_pad_batch_and_gather_at_last_real_position():
  rows = [[7, 8, 9], [3], [4, 5]]
  right = pad_batch(rows, pad_id=0, padding="right", length=4, batch_size=4)
  left = pad_batch(rows, pad_id=0, padding="left", length=4, batch_size=4)
  np.testing.assert_array_equal(right.tokens[:3], [[7, 8, 9, 0], [3, 0, 0, 0], [4, 5, 0, 0]])
  np.testing.assert_array_equal(left.tokens[:3], [[0, 7, 8, 9], [0, 0, 0, 3], [0, 0, 4, 5]])
  np.testing.assert_array_equal(left.positions[2], [0, 0, 0, 1])
  np.testing.assert_array_equal(right.segment_ids[3], [0, 0, 0, 0])  # the filler row
  np.testing.assert_array_equal(right.last_index, [2, 0, 1, 0])
  np.testing.assert_array_equal(left.last_index, [3, 3, 3, 0])  # filler row: index 0

  def onehot_logits(batch):  # [b, s, V]: each position "predicts" its own token
    return np.eye(V, dtype=np.float32)[batch.tokens] * 10
  for batch in (right, left):
    nxt = from_sequence_logits(onehot_logits)(batch)
    np.testing.assert_array_equal(np.argmax(nxt[:3], axis=1), [9, 3, 5])


def test_aggregate_hand_made_case():
  recs = ([{"subject": "s1", "category": "STEM", "correct": c} for c in (True, False, True)] +
          [{"subject": "s2", "category": "STEM", "correct": True}] +
          [{"subject": "s3", "category": "Humanities", "correct": c} for c in (False, False)])
  agg = aggregate(recs)
  assert {s: (d["correct"], d["total"]) for s, d in agg["subjects"].items()} == {
      "s1": (2, 3), "s2": (1, 1), "s3": (0, 2)}
  stem = agg["categories"]["STEM"]
  assert (stem["correct"], stem["total"], stem["subjects"]) == (3, 4, 2)
  assert stem["accuracy"] == pytest.approx(0.75)
  assert stem["macro_accuracy"] == pytest.approx((2 / 3 + 1) / 2)
  assert agg["categories"]["Humanities"]["accuracy"] == 0
  assert agg["micro_accuracy"] == pytest.approx(3 / 6)
  assert agg["macro_accuracy"] == pytest.approx((2 / 3 + 1 + 0) / 3)


def _constant_letter_fn(tok, letter_logits):
  """Stub model that always gives the same logits to the four letter tokens after '答案：'."""
  ids = [tok.encode("答案：" + L)[-1] for L in "ABCD"]
  ids += [tok.encode("Answer: " + L)[-1] for L in "ABCD"]
  letter_logits = list(letter_logits) * 2

  def score(batch):
    logits = np.zeros((len(batch.tokens), tok.vocab_size), np.float32)
    logits[:, ids] = letter_logits
    return logits
  return score


def test_harness_on_ceval_fixture_with_stub(tok, tmp_path):
  bench = load_benchmark("ceval", FIXTURES / "ceval", shots=5)
  res = evaluate_benchmark(bench, tok, _constant_letter_fn(tok, [0, 1, 0, 0]), max_len=1024,
                           batch_size=4, progress=False)
  # Valid val answers (by hand from the fixture files): computer_network B, B, A (two malformed
  # rows skipped); high_school_history B, D, B. Always answering B: 2/3 and 2/3.
  assert res["subjects"]["computer_network"]["correct"] == 2
  assert res["subjects"]["high_school_history"]["correct"] == 2
  assert res["categories"]["STEM"]["total"] == 3
  assert res["categories"]["Humanities"]["accuracy"] == pytest.approx(2 / 3)
  assert res["micro_accuracy"] == pytest.approx(4 / 6)
  assert len(res["skipped"]) == 2 and res["prompting"]["prompts_with_dropped_shots"] == 0
  assert all(p["prediction"] == "B" for p in res["predictions"])

  # All four letters tied: the lowest letter (A) wins: computer_network has one A answer.
  res = evaluate_benchmark(bench, tok, _constant_letter_fn(tok, [3, 3, 3, 3]), max_len=1024,
                           progress=False)
  assert {p["prediction"] for p in res["predictions"]} == {"A"}
  assert res["correct"] == 1

  paths = write_reports(res, tmp_path, model="stub")
  saved = json.loads(open(paths["json"], encoding="utf-8").read())
  assert saved["correct"] == 1 and saved["model"] == "stub" and "predictions" not in saved
  md = open(paths["markdown"], encoding="utf-8").read()
  assert "| **Average** | 2 | 6 | **16.67** |" in md
  assert "computer_network_val.csv:4: missing option B" in md
  assert sum(1 for _ in open(paths["predictions"], encoding="utf-8")) == 6


def test_harness_drops_shots_to_fit_and_says_so(tok, caplog):
  bench = load_benchmark("mmlu", FIXTURES / "mmlu", shots=5)
  res = evaluate_benchmark(bench, tok, _constant_letter_fn(tok, [0, 0, 1, 0]), max_len=120,
                           progress=False)
  pr = res["prompting"]
  assert pr["prompts_with_dropped_shots"] == res["questions"] == 5
  assert pr["shots_dropped"] > 0
  assert max(p["prompt_tokens"] for p in res["predictions"]) <= 120
  assert all(p["shots"] < 5 for p in res["predictions"])
  assert "dropped shots to fit 120 tokens (first_k rule" in caplog.text
  # MMLU keeps the first k shots: each prompt is exactly the text with the first `shots` dev rows.
  qs = [q for s in bench.subjects.values() for q in s.questions]
  for q, p in zip(qs, res["predictions"]):
    shots = bench.subjects[q.subject].shots[:p["shots"]]
    assert p["prompt_tokens"] == len(tok.encode(prompt_text(q, shots, "baichuan")))


def test_ceval_test_split_writes_a_submission(tok, tmp_path):
  bench = load_benchmark("ceval", FIXTURES / "ceval", split="test", shots=5)
  res = evaluate_benchmark(bench, tok, _constant_letter_fn(tok, [0, 0, 0, 1]), max_len=1024,
                           progress=False)
  assert res["unlabeled"] == 5 and res["total"] == 0
  paths = write_reports(res, tmp_path)
  sub = json.loads(open(paths["submission"], encoding="utf-8").read())
  assert sub == {"computer_network": {"0": "D", "1": "D"},
                 "high_school_history": {"0": "D", "1": "D", "2": "D"}}


def test_aggregate_counts_a_subject_in_each_of_its_categories():
  recs = ([{"subject": "chinese_history", "category": "China specific", "correct": c,
            "categories": ["Humanities", "China specific"]} for c in (True, False)] +
          [{"subject": "world_history", "category": "Humanities", "correct": True}])
  agg = aggregate(recs)
  hum, china = agg["categories"]["Humanities"], agg["categories"]["China specific"]
  assert (hum["correct"], hum["total"], hum["subjects"]) == (2, 3, 2)
  assert hum["macro_accuracy"] == pytest.approx((0.5 + 1) / 2)
  assert (china["correct"], china["total"], china["subjects"]) == (1, 2, 1)
  assert agg["total"] == 3  # overall counts every question once
  assert aggregate([])["micro_accuracy"] is None and aggregate([])["macro_accuracy"] is None


def _strict_json(text):
  def bad(name):
    raise ValueError(f"invalid JSON constant {name}")
  return json.loads(text, parse_constant=bad)


def test_unlabeled_export_writes_submission_and_valid_json(tok, tmp_path):
  head = "id,question,A,B,C,D,answer,explanation\n"
  for split, rows in (("test", "0,DNS的主要作用是____。,甲,乙,丙,丁,,\n7,下列属于私有IP地址的是____。,甲,乙,丙,丁,,\n"),
                      ("dev", "0,DNS的主要作用是____。,甲,乙,丙,丁,B,解析\n")):
    (tmp_path / "data" / split).mkdir(parents=True)
    (tmp_path / "data" / split / f"computer_network_{split}.csv").write_text(head + rows,
                                                                             encoding="utf-8")
  bench = load_benchmark("ceval", tmp_path / "data", split="test", shots=1, protocol="baichuan")
  res = evaluate_benchmark(bench, tok, _constant_letter_fn(tok, [0, 0, 1, 0]), max_len=1024,
                           progress=False)
  assert res["unlabeled"] == 2 and res["total"] == 0 and res["micro_accuracy"] is None
  paths = write_reports(res, tmp_path / "out")
  saved = _strict_json(open(paths["json"], encoding="utf-8").read())
  assert saved["micro_accuracy"] is None and saved["headline"] == {"metric": "macro_accuracy",
                                                                   "value": None}
  assert _strict_json(open(paths["submission"], encoding="utf-8").read()) == {
      "computer_network": {"0": "C", "7": "C"}}


def test_markdown_counts_multi_answer_items_per_file(tok, tmp_path):
  head = "id,question,A,B,C,D,answer\n"
  (tmp_path / "val").mkdir()
  (tmp_path / "val" / "law_val.csv").write_text(
      head + "0,问,甲,乙,丙,丁,A\n1,问,甲,乙,丙,丁,AB\n2,问,甲,乙,丙,丁,BCD\n3,问,甲,乙,丙,丁,X\n",
      encoding="utf-8")
  bench = load_benchmark("ceval", tmp_path, shots=0)
  res = evaluate_benchmark(bench, tok, _constant_letter_fn(tok, [1, 0, 0, 0]), max_len=256,
                           progress=False)
  assert res["total"] == 1 and res["correct"] == 1 and len(res["multi_answer"]) == 2
  md = write_reports(res, tmp_path / "out")["markdown"]
  text = open(md, encoding="utf-8").read()
  assert "Multi-answer items (not single-choice, not scored) (2; each listed" in text
  assert f"- `{tmp_path / 'val' / 'law_val.csv'}`: 2" in text
  assert "law_val.csv:5: answer 'X' not in A-D" in text


def test_protocols_differ_in_bos_and_prompt_text(tok):
  from baichuan_jax.eval.prompts import prompt_text as text  # pylint: disable=import-outside-toplevel
  out = {}
  for protocol in ("baichuan", "official"):
    bench = load_benchmark("ceval", FIXTURES / "ceval", shots=5, protocol=protocol)
    res = evaluate_benchmark(bench, tok, _constant_letter_fn(tok, [0, 1, 0, 0]), max_len=1024,
                             progress=False)
    qs = [q for s in bench.subjects.values() for q in s.questions]
    out[protocol] = [(p["prompt_tokens"], len(tok.encode(text(q, bench.subjects[q.subject].shots,
                                                              protocol))))
                     for q, p in zip(qs, res["predictions"])]
    assert res["protocol"] == protocol and res["headline"]["metric"] == "macro_accuracy"
    assert res["headline"]["value"] == pytest.approx(res["macro_accuracy"])
  assert all(n == m for n, m in out["baichuan"])  # no BOS
  assert all(n == m + 1 for n, m in out["official"])  # C-Eval's llama.py: BOS first


def test_cli_inspect_needs_no_model(capsys):
  from baichuan_jax.eval.__main__ import main  # pylint: disable=import-outside-toplevel
  res = main(["--task", "agieval", "--data-dir", str(FIXTURES / "agieval"), "--inspect"])
  text = capsys.readouterr().out
  assert "lsat-ar.jsonl:1: 5 options: Baichuan's table keeps 4-option items only" in text
  assert "logiqa-zh.jsonl:8: answer 'D' not in A-C" in text
  assert res["excluded"] == 7 and "lsat-ar" not in res["subjects"]
  res = main(["--task", "gaokao", "--data-dir", str(FIXTURES / "gaokao"), "--inspect",
              "--protocol", "official"])
  text = capsys.readouterr().out
  assert "| Biology | 5 | 3 | 0 |" in text and res["multi_answer"] == 1
  assert "answer ['A', 'C'] has 2 answers" in text


def test_cli_says_why_nothing_is_scorable_before_loading_a_model(tmp_path):
  from baichuan_jax.eval.__main__ import main  # pylint: disable=import-outside-toplevel
  (tmp_path / "test").mkdir()
  (tmp_path / "test" / "law_test.csv").write_text("q,a,b,c,d,AB\nq,a,b,c,d,E\n", encoding="utf-8")
  with pytest.raises(ValueError, match=r"no scorable questions .*\(1 malformed rows skipped, e\.g\. "
                     r".*law_test.csv:2: answer 'E' not in A-D; 1 multi-answer items\); run with "
                     r"--inspect"):
    main(["--task", "mmlu", "--data-dir", str(tmp_path), "--shots", "0", "--hf", "/no/such/model"])
