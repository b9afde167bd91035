"""The Beam cleaning pipeline end to end on a small planted corpus (DirectRunner)."""

import json

import numpy as np
import pytest

from baichuan_jax.data import clean, mixture

# Common characters for synthetic Chinese: random text has no repeated n-grams, no symbols, and
# passes the language check, so only the planted problems trigger rules.
_CHARS = ("的一是不了人我在有他这中大来上国个到说们为子和你地出道也时年得就那要下以生会自着去之过家学对可"
          "她里后小么心多天而能好都然没日于起还发成事只作当想看文无开手十用主行方又如前所本见经头面公同三")


def _zh(rng, sentences=6):
  out = []
  for _ in range(sentences):
    n = int(rng.integers(18, 30))
    out.append("".join(_CHARS[i] for i in rng.integers(0, len(_CHARS), n)) + "。")
  return "".join(out)


def _rec(i, text, lang="zh", source="zh_news", category="news"):
  return {"id": f"{source}-{i:04d}", "text": text, "lang": lang, "source": source,
          "category": category}


BOILER = "本报讯欢迎订阅人民日报海外版电子版每日更新。"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  rng = np.random.default_rng(0)
  d = tmp_path_factory.mktemp("corpus")
  a = _zh(rng, 8)
  near1 = a[:40] + "天" + a[41:]          # one character changed
  near2 = a[:100] + "地" + a[101:]
  h = [_zh(rng, 4) for _ in range(3)]
  en = ("The library opens at nine and the reading room stays open until late in the evening, "
        "so that students and families can use it after work and school.")
  train = [
      json.dumps(_rec(1, a)),                                          # line 1: dup of val doc
      json.dumps(_rec(2, near1)),                                      # line 2: dup
      json.dumps(_rec(3, h[0] + BOILER)),                              # line 3: boilerplate kept
      json.dumps(_rec(4, h[1] + BOILER)),                              # line 4: boilerplate cut
      '{"text": "unterminated',                                        # line 5: malformed
      json.dumps(_rec(6, h[2] + BOILER)),                              # line 6: boilerplate cut
      json.dumps(_rec(7, "电话１３９１２３４５６７８，１３８８７６５４３２１，价格１２３４５６元")),  # digits
      json.dumps(_rec(8, "   ")),                                      # line 8: empty text
      json.dumps(_rec(9, en, "en", "en_prose", "docs")),
      json.dumps(_rec(10, "def f(x):\n    return x + 1\n", "code", "code", "code")),
  ]
  # line 11: not UTF-8; line 12: a JSON escape that decodes to a lone surrogate.
  (d / "train.jsonl").write_bytes(("\n".join(train) + "\n").encode() + b'{"text": "\xff\xfe"}\n'
                                  + b'{"text": "ok \\ud800 ok"}\n')
  (d / "validation.jsonl").write_text(json.dumps(_rec(11, near2)) + "\n", encoding="utf-8")
  return {"dir": d, "a": a, "h": h, "en": en}


def _read(path):
  return [json.loads(l) for l in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def cleaned(corpus, tmp_path_factory):
  out = tmp_path_factory.mktemp("clean")
  report = clean.run(str(corpus["dir"]), str(out))
  return out, report


def test_documents_kept_removed_and_cut(corpus, cleaned):
  out, _ = cleaned
  train = {r["id"]: r for r in _read(out / "train.jsonl")}
  val = {r["id"]: r for r in _read(out / "validation.jsonl")}
  # The near-duplicate cluster {1, 2, 11} keeps the validation copy; the digit table is removed.
  assert sorted(train) == ["code-0010", "en_prose-0009", "zh_news-0003", "zh_news-0004",
                           "zh_news-0006"]
  assert sorted(val) == ["zh_news-0011"]
  # The repeated sentence stays in the first document only.
  h = corpus["h"]
  assert train["zh_news-0003"]["text"] == h[0] + BOILER
  assert train["zh_news-0004"]["text"] == h[1]
  assert train["zh_news-0006"]["text"] == h[2]
  # Weights: cluster of 3 -> 3 ** -0.5, everything else 1.
  assert val["zh_news-0011"]["weight"] == pytest.approx(3 ** -0.5, rel=1e-5)
  assert val["zh_news-0011"]["cluster_size"] == 3
  assert {r["weight"] for r in train.values()} == {1.0}
  # Input fields survive.
  assert train["en_prose-0009"]["text"] == corpus["en"]
  assert train["en_prose-0009"]["category"] == "docs"


def test_report_counts(cleaned):
  _, report = cleaned
  s = report["stats"]
  assert s["in/docs"] == {"code": 1, "en_prose": 1, "zh_news": 7}
  assert s["doc/digit_ratio"] == {"zh_news": 1}
  assert s["doc/near_duplicate"] == {"zh_news": 2}
  assert s["sentence/near_duplicate"] == {"zh_news": 2}
  assert s["dedup/doc/cluster_size=3"] == {"all": 1}
  assert s["dedup/sentence/cluster_size=3"] == {"all": 1}
  assert s["out/docs"] == {"code": 1, "en_prose": 1, "zh_news": 4}
  assert report["rejected"]["count"] == 4


def test_bad_lines_reported_with_file_and_line(corpus, cleaned):
  out, _ = cleaned
  rows = _read(out / "rejected.jsonl")
  path = str(corpus["dir"] / "train.jsonl")
  assert [(r["file"], r["line"]) for r in rows] == [(path, 5), (path, 8), (path, 11), (path, 12)]
  assert rows[0]["reason"].startswith("malformed JSON")
  assert rows[1]["reason"] == "empty text"
  assert rows[2]["reason"] == "not UTF-8: byte 0xff at offset 10"
  assert rows[3]["reason"].startswith("text holds a lone surrogate")


def test_rerun_is_byte_identical(corpus, cleaned, tmp_path):
  out, _ = cleaned
  clean.run(str(corpus["dir"]), str(tmp_path), beam_args=["--direct_num_workers=1"])
  for name in ("train.jsonl", "validation.jsonl", "rejected.jsonl", "clean_report.json"):
    assert (out / name).read_bytes() == (tmp_path / name).read_bytes(), name


def test_proportion_mixture_and_shards(corpus, cleaned, tmp_path):
  out, _ = cleaned
  cfg = clean.default_config()
  cfg.mixture.mode = "proportion"
  cfg.mixture.weights = {"zh/*": 3.0, "*": 1.0}
  cfg.num_shards = 2
  clean.run(str(corpus["dir"]), str(tmp_path), cfg)
  shards = sorted(p.name for p in tmp_path.glob("train-*.jsonl"))
  assert shards == ["train-00000-of-00002.jsonl", "train-00001-of-00002.jsonl"]
  docs = [r for p in tmp_path.glob("*-of-*.jsonl") for r in _read(p)]
  single = _read(out / "train.jsonl") + _read(out / "validation.jsonl")
  assert sorted(r["id"] for r in docs) == sorted(r["id"] for r in single)
  # Each group gets its own target: zh/news 3, en/docs 1, code/code 1 (via "*"), so sampling by
  # weight x length gives them 3/5, 1/5 and 1/5 of the characters.
  mass = {}
  for r in docs:
    g = r["lang"] + "/" + r["category"]
    mass[g] = mass.get(g, 0.0) + r["weight"] * len(r["text"])
  total = sum(mass.values())
  assert {g: m / total for g, m in mass.items()} == pytest.approx(
      {"zh/news": 0.6, "en/docs": 0.2, "code/code": 0.2}, rel=1e-4)


def test_group_factors_hand_worked():
  cfg = mixture.default_config()
  cfg.mode = "proportion"
  cfg.weights = {"zh/news": 1.0, "*": 1.0}
  # zh/news has 300 of 400 weighted chars but should get half: factor 0.5/0.75; code 0.5/0.25.
  f = mixture.group_factors(cfg, {"zh/news": 300.0, "code/code": 100.0})
  assert f == pytest.approx({"zh/news": 2 / 3, "code/code": 2.0})
  cfg.weights = {"zh/news": 1.0}
  with pytest.raises(ValueError, match="code/code"):
    mixture.group_factors(cfg, {"zh/news": 300.0, "code/code": 100.0})
  assert mixture.cluster_factor(100, 0.5, 0.05) == pytest.approx(0.1)
  assert mixture.cluster_factor(10_000, 0.5, 0.05) == 0.05


def test_cli_rejects_bad_config(corpus, tmp_path, capsys):
  with pytest.raises(SystemExit):
    clean.main(["--corpus", str(corpus["dir"]), "--out", str(tmp_path),
                "--config.dedup.threshold=1.5"])
  assert "dedup.threshold" in capsys.readouterr().err
  with pytest.raises(SystemExit):
    clean.main(["--corpus", str(corpus["dir"]), "--out", str(tmp_path), "--config.dedup.nope=1"])
  assert "nope" in capsys.readouterr().err
  with pytest.raises(FileNotFoundError, match="not a directory"):
    clean.run(str(tmp_path / "missing"), str(tmp_path / "o"))
