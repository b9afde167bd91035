"""Shared helpers for the evaluation tests (fixture paths, a SentencePiece tokenizer trained on the
fixtures) and checks of the subject tables against the published subject counts."""

import functools
import json
from pathlib import Path

import sentencepiece as spm

from baichuan_jax.eval import subjects

FIXTURES = Path(__file__).parent / "fixtures" / "eval"


def fixture_texts():
  """Every question/option string of the fixtures (for training a tokenizer that covers them)."""
  out = []
  for p in sorted(FIXTURES.rglob("*")):
    if p.suffix in (".csv", ".jsonl", ".json"):
      out.extend(p.read_text(encoding="utf-8").splitlines())
  return out


class SpmTokenizer:
  """The Tokenizer interface the harness uses, over a SentencePiece model."""

  def __init__(self, path):
    self.sp_path = str(path)
    self.sp = spm.SentencePieceProcessor(model_file=self.sp_path)
    self.vocab_size = self.sp.get_piece_size()
    self.pad_id, self.bos_id, self.eos_id = 0, 1, 2

  def encode(self, text, add_bos=False, add_eos=False):
    ids = self.sp.encode(text)
    return ([self.bos_id] if add_bos else []) + ids + ([self.eos_id] if add_eos else [])

  def decode(self, ids):
    return self.sp.decode(list(ids))


@functools.lru_cache(maxsize=None)
def tokenizer_model(folder: str) -> str:
  """Trains (once per folder) a small byte-fallback BPE model on the fixture text, with Baichuan's
  special-id layout; returns its path."""
  prefix = str(Path(folder) / "eval_tok")
  text = Path(folder) / "corpus.txt"
  extra = ["The following are multiple choice questions (with answers) about",
           "以下是中国关于考试的单项选择题，请选出其中的正确答案。答案：答案是：题目：问题：选项：",
           "Here are the answers for the problems in the exam. Question: Answer Choices: Answer:"]
  text.write_text("\n".join(fixture_texts() + extra * 20) + "\n", encoding="utf-8")
  spm.SentencePieceTrainer.train(
      input=str(text), model_prefix=prefix, model_type="bpe", vocab_size=1200,
      byte_fallback=True, character_coverage=1.0, pad_id=-1, bos_id=1, eos_id=2, unk_id=0,
      # Baichuan's id layout, which baichuan_jax.tokenizer expects: 3..194 reserved, 195/196 the
      # turn markers (control pieces), bytes after them.
      control_symbols=[f"<reserved_{i}>" for i in range(3, 195)] + ["<user>", "<assistant>"],
      split_digits=True, add_dummy_prefix=False, normalization_rule_name="identity",
      hard_vocab_limit=False, minloglevel=2, num_threads=1)
  return prefix + ".model"


def make_tokenizer(tmp_path_factory):
  folder = tmp_path_factory.getbasetemp() / "eval_tokenizer"
  folder.mkdir(exist_ok=True)
  return SpmTokenizer(tokenizer_model(str(folder)))


def test_subject_tables_match_published_counts():
  # C-Eval paper: 52 subjects = 20 STEM + 10 Social Science + 11 Humanities + 11 Other.
  ceval = [c for _, c in subjects.CEVAL.values()]
  assert len(ceval) == 52
  assert {c: ceval.count(c) for c in set(ceval)} == {
      "STEM": 20, "Social Science": 10, "Humanities": 11, "Other": 11}
  # MMLU (Hendrycks et al. categories.py): 57 tasks = 18 STEM, 13 humanities, 12 social, 14 other.
  mmlu = [c for _, c in subjects.MMLU.values()]
  assert len(mmlu) == 57
  assert {c: mmlu.count(c) for c in set(mmlu)} == {
      "STEM": 18, "Humanities": 13, "Social Science": 12, "Other": 14}
  # CMMLU: 67 subjects, each in one of its five reported groups.
  assert len(subjects.CMMLU) == 67
  assert {c for _, c in subjects.CMMLU.values()} == {
      "STEM", "Humanities", "Social Science", "Other", "China specific"}


def test_fixtures_use_known_subjects():
  for p in (FIXTURES / "ceval" / "val").glob("*.csv"):
    assert p.stem.rsplit("_val", 1)[0] in subjects.CEVAL
  for p in (FIXTURES / "cmmlu" / "test").glob("*.csv"):
    assert p.stem in subjects.CMMLU
  for p in (FIXTURES / "mmlu" / "test").glob("*.csv"):
    assert p.stem.rsplit("_test", 1)[0] in subjects.MMLU
  for p in (FIXTURES / "agieval").glob("*.jsonl"):
    if json.loads(p.read_text(encoding="utf-8").splitlines()[0])["options"]:
      assert p.stem in subjects.AGIEVAL


# CMMLU's src/categories.py, copied as data: subject -> subcategories, and category -> subcategories.
_CMMLU_SUBCATEGORIES = {
    "agronomy": ["other"], "anatomy": ["biology"], "ancient_chinese": ["linguistics", "china specific"],
    "arts": ["arts"], "astronomy": ["physics"], "business_ethics": ["business"],
    "chinese_civil_service_exam": ["politics", "china specific"],
    "chinese_driving_rule": ["other", "china specific"],
    "chinese_food_culture": ["culture", "china specific"],
    "chinese_foreign_policy": ["politics", "china specific"],
    "chinese_history": ["history", "china specific"],
    "chinese_literature": ["literature", "china specific"],
    "chinese_teacher_qualification": ["education", "china specific"],
    "college_actuarial_science": ["math"], "college_education": ["education"],
    "college_engineering_hydrology": ["engineering"], "college_law": ["law"],
    "college_mathematics": ["math"], "college_medical_statistics": ["statistics"],
    "clinical_knowledge": ["other"], "college_medicine": ["other"], "computer_security": ["other"],
    "conceptual_physics": ["physics"], "construction_project_management": ["other", "china specific"],
    "economics": ["economics"], "education": ["education"],
    "elementary_chinese": ["linguistics", "china specific"],
    "elementary_commonsense": ["other", "china specific"],
    "elementary_information_and_technology": ["other"], "electrical_engineering": ["engineering"],
    "elementary_mathematics": ["math"], "ethnology": ["culture", "china specific"],
    "food_science": ["other"], "genetics": ["biology"], "global_facts": ["global"],
    "high_school_biology": ["biology"], "high_school_chemistry": ["chemistry"],
    "computer_science": ["computer science"], "high_school_geography": ["geography"],
    "high_school_mathematics": ["math"], "high_school_physics": ["physics"],
    "high_school_politics": ["politics", "china specific"], "human_sexuality": ["other"],
    "international_law": ["law"], "journalism": ["sociology"], "jurisprudence": ["law"],
    "legal_and_moral_basis": ["other"], "logical": ["philosophy"], "machine_learning": ["computer science"],
    "management": ["business"], "marketing": ["business"], "marxist_theory": ["philosophy"],
    "modern_chinese": ["linguistics", "china specific"], "nutrition": ["other"],
    "philosophy": ["philosophy"], "professional_accounting": ["business"], "professional_law": ["law"],
    "professional_medicine": ["other"], "professional_psychology": ["psychology"],
    "public_relations": ["politics"], "security_study": ["politics"], "sociology": ["culture"],
    "sports_science": ["other"], "traditional_chinese_medicine": ["other", "china specific"],
    "virology": ["biology"], "world_history": ["history"], "world_religions": ["global"],
}
_CMMLU_CATEGORIES = {
    "STEM": ["physics", "chemistry", "biology", "computer science", "math", "engineering", "statistics"],
    "Humanities": ["history", "philosophy", "law", "arts", "literature", "global"],
    "Social Science": ["linguistics", "business", "politics", "culture", "economics", "geography",
                       "psychology", "education", "sociology"],
    "Other": ["other"],
    "China specific": ["china specific"],
}


def test_cmmlu_categories_follow_categories_py_with_double_membership():
  expected = {s: {c for c, subs in _CMMLU_CATEGORIES.items() if set(subs) & set(subcats)}
              for s, subcats in _CMMLU_SUBCATEGORIES.items()}
  assert set(expected) == set(subjects.CMMLU)
  assert {s: set(subjects.categories("cmmlu", s)) for s in subjects.CMMLU} == expected
  doubles = [subjects.categories("cmmlu", s)[0] for s in subjects.CMMLU
             if len(subjects.categories("cmmlu", s)) == 2]
  assert {c: doubles.count(c) for c in set(doubles)} == {
      "Social Science": 9, "Humanities": 2, "Other": 4}
  assert subjects.categories("ceval", "law") == ("Humanities",)


def test_agieval_english_template_tasks_are_agievals_own_list():
  from baichuan_jax.eval.prompts import language  # pylint: disable=import-outside-toplevel
  english = {"lsat-ar", "lsat-lr", "lsat-rc", "logiqa-en", "sat-math", "sat-en", "aqua-rat",
             "sat-en-without-passage", "gaokao-english"}
  assert {t for t in subjects.AGIEVAL if language("agieval", t) == "en"} == english
