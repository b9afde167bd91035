"""SFT rendering/masks/packing, preference records, the category sampler and malformed-line reports."""

import json

import numpy as np
import pytest

from baichuan_jax.align import preference, records, sft_data
from tests.align_helpers import CharTokenizer


def _ids(tok, s):
  return tok.encode(s)


def test_render_chat_masks_only_assistant_tokens_and_end_of_turn():
  tok = CharTokenizer()
  msgs = sft_data.validate_chat({"messages": [
      {"role": "user", "content": "ab"}, {"role": "assistant", "content": "cd"},
      {"role": "user", "content": "e"}, {"role": "assistant", "content": "f"}]})
  ex = sft_data.render_chat(msgs, tok)
  a, b, c, d, e, f = (_ids(tok, ch)[0] for ch in "abcdef")
  # Rendered: <user> a b <assistant> c d <user> e <assistant> f </s>; inputs drop the final </s>.
  np.testing.assert_array_equal(ex.tokens, [195, a, b, 196, c, d, 195, e, 196, f])
  # Where each reply ends, the target is </s> (not the next <user>).
  np.testing.assert_array_equal(ex.targets, [a, b, 196, c, d, 2, e, 196, f, 2])
  np.testing.assert_array_equal(ex.loss_mask, [0, 0, 0, 1, 1, 1, 0, 0, 1, 1])


def test_render_chat_system_prefix_has_no_loss():
  tok = CharTokenizer()
  msgs = sft_data.validate_chat({"messages": [
      {"role": "system", "content": "S"}, {"role": "user", "content": "u"},
      {"role": "assistant", "content": "v"}]})
  ex = sft_data.render_chat(msgs, tok)
  s, u, v = (_ids(tok, ch)[0] for ch in "Suv")
  np.testing.assert_array_equal(ex.tokens, [s, 195, u, 196, v])
  np.testing.assert_array_equal(ex.targets, [195, u, 196, v, 2])
  np.testing.assert_array_equal(ex.loss_mask, [0, 0, 0, 1, 1])


def _ex(n, start):
  t = np.arange(start, start + n, dtype=np.int32)
  return sft_data.ChatExample(t, t + 1, np.ones(n, np.int32))


def test_pack_first_fit_segments_and_positions():
  packed = sft_data.pack_examples([_ex(5, 10), _ex(4, 20), _ex(3, 30)], seq_len=8)
  # 5 + 4 > 8 opens a second row; the 3-token example fills the first row exactly.
  np.testing.assert_array_equal(packed["inputs"][0], [10, 11, 12, 13, 14, 30, 31, 32])
  np.testing.assert_array_equal(packed["segment_ids"][0], [1, 1, 1, 1, 1, 2, 2, 2])
  np.testing.assert_array_equal(packed["positions"][0], [0, 1, 2, 3, 4, 0, 1, 2])
  np.testing.assert_array_equal(packed["inputs"][1], [20, 21, 22, 23, 0, 0, 0, 0])
  np.testing.assert_array_equal(packed["segment_ids"][1], [1, 1, 1, 1, 0, 0, 0, 0])
  np.testing.assert_array_equal(packed["loss_mask"][1], [1, 1, 1, 1, 0, 0, 0, 0])


def test_batches_cover_every_row_once_per_epoch():
  packed = sft_data.pack_examples([_ex(6, 10 * i) for i in range(1, 6)], seq_len=8)  # 5 rows
  seen = [b["inputs"][:, 0] for b in sft_data.batches(packed, batch_size=2, seed=0, epochs=1)]
  firsts = np.concatenate(seen)
  assert len(seen) == 3
  assert sorted(firsts[firsts > 0].tolist()) == [10, 20, 30, 40, 50]
  assert (firsts == 0).sum() == 1  # one padding row fills the last batch


def test_malformed_chat_lines_reported_with_line_numbers(tmp_path):
  good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
  lines = [json.dumps(good), "{not json", "", json.dumps({"messages": [{"role": "bot", "content": "x"}]}),
           json.dumps({"messages": [{"role": "user"}]}),
           json.dumps({"messages": [{"role": "user", "content": "a"}]}), json.dumps(good)]
  path = tmp_path / "chat.jsonl"
  path.write_text("\n".join(lines) + "\n", encoding="utf-8")
  report = records.ReadReport(str(path))
  exs = sft_data.load_chat_examples(str(path), CharTokenizer(), max_len=64, report=report)
  assert len(exs) == 2 and report.read == 2
  assert [b.line for b in report.bad] == [2, 4, 5, 6]
  assert "not valid JSON" in report.bad[0].reason
  assert "'bot'" in report.bad[1].reason and "allowed" in report.bad[1].reason
  assert "content" in report.bad[2].reason
  assert "end with an assistant turn" in report.bad[3].reason
  assert str(report.bad[0]).startswith(f"{path}:2:")


def test_mostly_malformed_file_raises(tmp_path):
  path = tmp_path / "bad.jsonl"
  path.write_text("\n".join(["[1, 2]"] * 12) + "\n", encoding="utf-8")
  with pytest.raises(records.RecordError, match="12 of 12 lines are malformed"):
    list(records.read_jsonl(str(path), sft_data.validate_chat))


def test_malformed_preference_lines(tmp_path):
  rows = [{"prompt": "p", "chosen": "a", "rejected": "b", "category": "x/y/z"},
          {"prompt": "p", "chosen": "a"},
          {"prompt": "p", "chosen": "a", "rejected": "a"},
          {"prompt": "p", "chosen": "a", "rejected": "b", "category": "1/2/3/4"},
          {"prompt": 3, "chosen": "a", "rejected": "b"},
          {"prompt": "", "chosen": "a", "rejected": "b", "category": ["x", "w"]}]
  path = tmp_path / "pref.jsonl"
  path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
  report = records.ReadReport(str(path))
  pairs = preference.load_preferences(str(path), report=report)
  assert [p.category for p in pairs] == [("x", "y", "z"), ("x", "w")]
  assert [(b.line, b.reason.split(" ")[0]) for b in report.bad] == [
      (2, "missing"), (3, "'chosen'"), (4, "field"), (5, "field")]
  assert "1 to 3" in report.bad[2].reason


def test_encode_sequence_templates_and_truncation():
  tok = CharTokenizer()
  p, r = _ids(tok, "pq"), _ids(tok, "rs")
  assert preference.encode_sequence(tok, "pq", "rs", 16, "chat") == [195, *p, 196, *r, 2]
  assert preference.encode_sequence(tok, "pq", "rs", 16, "plain") == [1, *p, *r, 2]
  long_p = "abcdefghij"
  out = preference.encode_sequence(tok, long_p, "klmnopqrst", 12, "chat")
  # Prompt left-cut to max_len // 2 - 2 = 4 tokens, response cut to fill, </s> kept.
  assert out == [195, *_ids(tok, "ghij"), 196, *_ids(tok, "klmno"), 2] and len(out) == 12


def test_category_sampler_balances_each_level():
  cats = [("a", "x")] * 90 + [("a", "y")] * 5 + [("b",)] * 5
  sampler = preference.CategoryBalancedSampler(cats, seed=0)
  probs = sampler.probabilities()
  # Level 1: a and b get 1/2 each; level 2: x and y get 1/4 each regardless of 90 vs 5 records.
  np.testing.assert_allclose(probs[:90], 0.25 / 90)
  np.testing.assert_allclose(probs[90:95], 0.25 / 5)
  np.testing.assert_allclose(probs[95:], 0.5 / 5)
  draws = sampler.sample(20000)
  share = np.array([(draws < 90).mean(), ((draws >= 90) & (draws < 95)).mean(), (draws >= 95).mean()])
  np.testing.assert_allclose(share, [0.25, 0.25, 0.5], atol=0.015)


def test_category_sampler_direct_records_and_uncategorized():
  cats = [("a",), ("a", "x"), ()]
  probs = preference.CategoryBalancedSampler(cats).probabilities()
  # Root: a, (uncategorized) -> 1/2 each; inside a: its direct record and child x -> 1/4 each.
  np.testing.assert_allclose(probs, [0.25, 0.25, 0.5])
