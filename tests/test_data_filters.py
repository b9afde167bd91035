"""Quality rules: hand-worked ratios, one crafted document per rule, sentence removal, validation."""

import collections

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from baichuan_jax.data import filters as F

CLEAN_ZH = ("今天上午，市政府召开新闻发布会，介绍了今年城市建设的主要成绩和明年的工作计划。"
            "发言人表示，全市将继续加大对公共交通和老旧小区改造的投入，让居民生活更加便利。")
CLEAN_EN = ("The committee met on Tuesday to review the budget and agreed that the new library "
            "should open with longer hours for students and families in the spring.")


def test_char_classes_hand_counted():
  # A b 1 ， € space 中 -> letters 2, digit 1, punct 1, symbol 1, space 1, cjk 1
  counts = F.class_counts("Ab1，€ 中")
  assert counts[F.LETTER] == 2 and counts[F.DIGIT] == 1 and counts[F.PUNCT] == 1
  assert counts[F.SYMBOL] == 1 and counts[F.SPACE] == 1 and counts[F.CJK] == 1
  assert counts.sum() == 7
  # Full-width digits are digits; an emoji (astral) is a symbol.
  assert F.class_counts("１２😀")[F.DIGIT] == 2 and F.class_counts("１２😀")[F.SYMBOL] == 1


def test_dup_ngram_ratio_hand_worked():
  assert F.dup_ngram_ratio("a b c a b c", 3) == 1.0
  assert F.dup_ngram_ratio("a b c d e f", 3) == 0.0
  # abc at 0 and 4 repeat: units 0-2 and 4-6 covered, x (unit 3) not: 6/7.
  assert F.dup_ngram_ratio("a b c x a b c", 3) == pytest.approx(6 / 7)
  # CJK characters are units: 好好好好 with n=2 -> "好好" three times covers all 4.
  assert F.dup_ngram_ratio("好好好好", 2) == 1.0
  assert F.dup_ngram_ratio("a b", 3) == 0.0


def test_dup_line_ratio():
  assert F.dup_line_ratio(["x", "y", "x", " x ", ""]) == pytest.approx(2 / 4)


def test_split_sentences_round_trips():
  text = "你好。再见！\nOK. Bye now? pi is 3.14 e.g.x\n\n最后……好"
  spans = F.split_sentences(text)
  assert "".join(spans) == text
  assert spans[:4] == ["你好。", "再见！\n", "OK. ", "Bye now? "]
  assert "pi is 3.14 e.g.x\n" in spans
  # List markers open the item they number instead of becoming one-token "sentences".
  assert F.split_sentences("Steps:\n1. Open it. 2. Read it.") == ["Steps:\n", "1. Open it. ",
                                                                  "2. Read it."]


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("ab 1.。！?\n）”…中") + ["\u3000", "😀"]), max_size=60))
def test_split_sentences_concatenate_back(text):
  spans = F.split_sentences(text)
  assert "".join(spans) == text
  assert all(spans)


def test_span_class_counts_match_per_span():
  text = "ab 1。\n中文！"
  spans = F.split_sentences(text)
  got = F.span_class_counts(F.char_classes(text), spans)
  want = np.stack([F.class_counts(s) for s in spans])
  np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("text,lang,rule", [
    ("好的", "zh", "length_min"),
    (CLEAN_EN, "zh", "language"),                                # declared zh, written in English
    ("Le comité se réunit mardi pour examiner le budget municipal.", "en", "language"),  # no stop words
    (CLEAN_ZH[:30] + "★☆♥♦♣♠§¤※" * 3, "zh", "symbol_ratio"),      # 27 symbols / 57 chars
    ("电话：１３９１２３４５６７８，１３８８７６５４３２１，价格１２３４５６元", "zh", "digit_ratio"),
    ("买一送一买一送一买一送一买一送一买一送一买一送一", "zh", "dup_ngram"),
    # Short repeated lines: no repeated 10-gram, but 2 of 4 lines repeat an earlier one.
    ("\n".join([CLEAN_EN, "See you then.", "See you then.", "See you then."]), "en", "dup_line"),
    ("\n".join(["Read this and that, with the rest of it.", "*****", "-----", "12345"]), "en",
     "junk_lines"),
    ("\n".join(f"- the item {w} goes to the left and that one" for w in "abcd"), "en",
     "bullet_lines"),
    ("\n".join(f"The item {w} goes on and on and..." for w in "abcd"), "en", "ellipsis_lines"),
    ("欢迎光临网上赌场，百家乐、六合彩，博彩天天送彩金，注册就送。", "zh", "safety"),
])
def test_each_document_rule_fires(text, lang, rule):
  qf = F.QualityFilter()
  assert qf.doc_rule(text, lang) == rule
  out, stats = qf(text, lang)
  assert out is None and stats == collections.Counter({f"doc/{rule}": 1})


def test_clean_documents_pass_untouched():
  qf = F.QualityFilter()
  for text, lang in ((CLEAN_ZH, "zh"), (CLEAN_EN, "en"), ("def f(x):\n  return x ** 2 + 1\n", "code")):
    out, stats = qf(text, lang)
    assert out == text and not stats


def test_sentence_rules_remove_junk_and_count():
  first, second = CLEAN_ZH.split("。", 1)
  tail = "明天将公布具体方案。"
  # 6 lines, 3 junk: at the 0.5 line limit, so the document stays and only the sentences go.
  text = (first + "。\n" + second + "\n记者将继续关注此事的进展。\n（新华社记者张三摄）\n*****\n"
          + tail + "点击这里查看详情。")
  out, stats = F.QualityFilter()(text, "zh")
  assert stats == collections.Counter({"sentence/junk_patterns": 2, "sentence/min_letters": 1})
  assert out == first + "。\n" + second + "\n记者将继续关注此事的进展。\n" + tail


def test_document_emptied_by_sentence_rules_is_removed():
  out, stats = F.QualityFilter()("好的。\n（记者李四摄）", "zh")
  assert out is None and stats["doc/too_short_after_sentences"] == 1
  assert stats["sentence/junk_patterns"] == 1


def test_rules_are_scoped_by_language_and_switchable():
  cfg = F.default_config()
  symbols = "x = y + z | w ^ v ~ u < t > s = r + q"  # 9 math symbols of 19 characters
  assert F.QualityFilter(cfg).doc_rule(symbols, "code") is None  # symbol rule is zh/en only
  cfg.symbol_ratio.langs = ()
  assert F.QualityFilter(cfg).doc_rule(symbols, "code") == "symbol_ratio"
  cfg.symbol_ratio.enabled = False
  assert F.QualityFilter(cfg).doc_rule(symbols, "code") is None


def test_safety_threshold_needs_count_and_density(tmp_path):
  qf = F.QualityFilter()
  one = CLEAN_ZH + "警方破获一起色情案件。"
  assert qf.doc_rule(one, "zh") is None  # a single mention in a news-like text stays
  words = tmp_path / "words.txt"
  words.write_text("# extra terms\n新闻发布会\n", encoding="utf-8")
  cfg = F.default_config()
  cfg.safety.words_file = str(words)
  cfg.safety.min_hits = 1
  cfg.safety.min_density = 0.5
  assert F.QualityFilter(cfg).doc_rule(CLEAN_ZH, "zh") == "safety"


@pytest.mark.parametrize("field,value,match", [
    ("digit_ratio.max_ratio", 1.5, "digit_ratio.max_ratio"),
    ("length.min_chars", -1, "length.min_chars"),
    ("repetition.ngram", 0, "repetition.ngram"),
    ("language.langs", ("zh", 3), "language.langs"),
    ("sentence.junk_patterns", ("([",), r"junk_patterns\[0\]"),
    ("safety.min_hits", 0, "safety.min_hits"),
])
def test_validation_names_the_field(field, value, match):
  cfg = F.default_config()
  section, key = field.split(".")
  cfg[section][key] = value
  with pytest.raises(ValueError, match=match):
    F.QualityFilter(cfg)


def test_missing_words_file_is_a_clear_error(tmp_path):
  cfg = F.default_config()
  cfg.safety.words_file = str(tmp_path / "nope.txt")
  with pytest.raises(ValueError, match="safety.words_file"):
    F.QualityFilter(cfg)
