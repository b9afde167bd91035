"""Perplexity / bits per byte: windowing, a uniform model's exact value, bad lines reported."""

import math

import jax
import numpy as np
import pytest

from baichuan_jax.eval import evaluate_text, nll_from_logits, read_texts, windows
from test_eval_support import FIXTURES, make_tokenizer

PPL_FILE = FIXTURES / "ppl" / "validation.jsonl"


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  return make_tokenizer(tmp_path_factory)


@pytest.mark.parametrize("n,max_len,stride", [(2, 4, 4), (10, 4, 4), (10, 4, 1), (37, 8, 3),
                                              (9, 8, 8), (64, 16, 5)])
def test_windows_score_every_token_once(n, max_len, stride):
  ids = list(range(100, 100 + n))
  seen = []
  for inputs, targets, first in windows(ids, max_len, stride):
    assert 1 <= len(inputs) <= max_len and len(targets) == len(inputs)
    assert targets == [t + 1 for t in inputs]  # targets are the inputs shifted by one
    assert inputs[0] == ids[0] or len(inputs) == max_len  # as much context as fits
    seen.extend(targets[first:])
  assert seen == ids[1:]


def test_read_texts_reports_bad_lines(caplog):
  got = list(read_texts(PPL_FILE))
  assert [line for line, _ in got] == [1, 2, 4, 7]  # line 6 is an empty text: nothing to score
  assert f"{PPL_FILE}:3: no string 'text' field" in caplog.text
  assert f"{PPL_FILE}:5: not valid JSON" in caplog.text


def test_uniform_model_bits_per_byte(tok):
  texts = [t for _, t in read_texts(PPL_FILE)]
  vocab = 4096
  uniform = nll_from_logits(lambda batch: np.zeros(batch.tokens.shape + (vocab,), np.float32))
  res = evaluate_text(texts, tok.encode, tok.bos_id, uniform, max_len=16, stride=5,
                      batch_size=3, progress=False)
  n_tokens = sum(len(tok.encode(t)) for t in texts)
  n_bytes = sum(len(t.encode("utf-8")) for t in texts)
  assert (res["tokens"], res["bytes"]) == (n_tokens, n_bytes)
  # Every token costs log2(V) bits: bits/byte = log2(V) / (bytes per token).
  assert res["bits_per_byte"] == pytest.approx(math.log2(vocab) / (n_bytes / n_tokens), rel=1e-12)
  assert res["bits_per_token"] == pytest.approx(12.0, rel=1e-12)
  assert res["perplexity"] == pytest.approx(vocab, rel=1e-9)


def test_nll_from_logits_matches_jax_log_softmax():
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(2, 5, 11)).astype(np.float32) * 4
  targets = rng.integers(0, 11, size=(2, 5))
  got = nll_from_logits(lambda batch: logits)(None, targets)
  ref = -np.take_along_axis(np.asarray(jax.nn.log_softmax(logits, -1)), targets[..., None], -1)[..., 0]
  np.testing.assert_allclose(got, ref, rtol=1e-5)


def test_stride_must_fit_the_window():
  with pytest.raises(ValueError, match="stride=9 is invalid"):
    windows([1, 2, 3], max_len=8, stride=9)


def test_ppl_defaults_to_the_validation_split_the_main_job_uses(tmp_path, monkeypatch):
  from baichuan_jax import data as data_lib  # pylint: disable=import-outside-toplevel
  from baichuan_jax.eval.__main__ import _ppl_path  # pylint: disable=import-outside-toplevel
  (tmp_path / "train.jsonl").write_text("{}\n")
  (tmp_path / "validation.jsonl").write_text("{}\n")
  calls = []
  monkeypatch.setattr(data_lib, "default_corpus", lambda: calls.append(1) or tmp_path)
  assert _ppl_path(None) == tmp_path / "validation.jsonl"
  assert calls == [1]
  assert _ppl_path(str(tmp_path / "train.jsonl")) == tmp_path / "train.jsonl"
