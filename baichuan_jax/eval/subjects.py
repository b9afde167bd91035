"""Subject lists of each benchmark: display names and the category every subject is reported under.

Written from the public subject lists of C-Eval (52 subjects, 4 categories), CMMLU (67 subjects,
5 categories including "China specific", whose 15 subjects also count in a second category as
in CMMLU's categories.py) and MMLU (57 subjects; Hendrycks et al.'s 4 groups).
Gaokao and AGIEval publish no category split; the groupings below for them are ours.
"""

from __future__ import annotations

# C-Eval: subject -> (Chinese name used in the prompt, category).
CEVAL = {
    # STEM (20)
    "computer_network": ("计算机网络", "STEM"),
    "operating_system": ("操作系统", "STEM"),
    "computer_architecture": ("计算机组成", "STEM"),
    "college_programming": ("大学编程", "STEM"),
    "college_physics": ("大学物理", "STEM"),
    "college_chemistry": ("大学化学", "STEM"),
    "advanced_mathematics": ("高等数学", "STEM"),
    "probability_and_statistics": ("概率统计", "STEM"),
    "discrete_mathematics": ("离散数学", "STEM"),
    "electrical_engineer": ("注册电气工程师", "STEM"),
    "metrology_engineer": ("注册计量师", "STEM"),
    "high_school_mathematics": ("高中数学", "STEM"),
    "high_school_physics": ("高中物理", "STEM"),
    "high_school_chemistry": ("高中化学", "STEM"),
    "high_school_biology": ("高中生物", "STEM"),
    "middle_school_mathematics": ("初中数学", "STEM"),
    "middle_school_biology": ("初中生物", "STEM"),
    "middle_school_physics": ("初中物理", "STEM"),
    "middle_school_chemistry": ("初中化学", "STEM"),
    "veterinary_medicine": ("兽医学", "STEM"),
    # Social Science (10)
    "college_economics": ("大学经济学", "Social Science"),
    "business_administration": ("工商管理", "Social Science"),
    "marxism": ("马克思主义基本原理", "Social Science"),
    "mao_zedong_thought": ("毛泽东思想和中国特色社会主义理论体系概论", "Social Science"),
    "education_science": ("教育学", "Social Science"),
    "teacher_qualification": ("教师资格", "Social Science"),
    "high_school_politics": ("高中政治", "Social Science"),
    "high_school_geography": ("高中地理", "Social Science"),
    "middle_school_politics": ("初中政治", "Social Science"),
    "middle_school_geography": ("初中地理", "Social Science"),
    # Humanities (11)
    "modern_chinese_history": ("近代史纲要", "Humanities"),
    "ideological_and_moral_cultivation": ("思想道德修养与法律基础", "Humanities"),
    "logic": ("逻辑学", "Humanities"),
    "law": ("法学", "Humanities"),
    "chinese_language_and_literature": ("中国语言文学", "Humanities"),
    "art_studies": ("艺术学", "Humanities"),
    "professional_tour_guide": ("导游资格", "Humanities"),
    "legal_professional": ("法律职业资格", "Humanities"),
    "high_school_chinese": ("高中语文", "Humanities"),
    "high_school_history": ("高中历史", "Humanities"),
    "middle_school_history": ("初中历史", "Humanities"),
    # Other (11)
    "civil_servant": ("公务员", "Other"),
    "sports_science": ("体育学", "Other"),
    "plant_protection": ("植物保护", "Other"),
    "basic_medicine": ("基础医学", "Other"),
    "clinical_medicine": ("临床医学", "Other"),
    "urban_and_rural_planner": ("注册城乡规划师", "Other"),
    "accountant": ("注册会计师", "Other"),
    "fire_engineer": ("注册消防工程师", "Other"),
    "environmental_impact_assessment_engineer": ("环境影响评价工程师", "Other"),
    "tax_accountant": ("税务师", "Other"),
    "physician": ("医师资格", "Other"),
}

# CMMLU: subject -> (Chinese name used in the prompt, category).
CMMLU = {
    "agronomy": ("农学", "Other"),
    "anatomy": ("解剖学", "STEM"),
    "ancient_chinese": ("古汉语", "China specific"),
    "arts": ("艺术学", "Humanities"),
    "astronomy": ("天文学", "STEM"),
    "business_ethics": ("商业伦理", "Social Science"),
    "chinese_civil_service_exam": ("中国公务员考试", "China specific"),
    "chinese_driving_rule": ("中国驾驶规则", "China specific"),
    "chinese_food_culture": ("中国饮食文化", "China specific"),
    "chinese_foreign_policy": ("中国外交政策", "China specific"),
    "chinese_history": ("中国历史", "China specific"),
    "chinese_literature": ("中国文学", "China specific"),
    "chinese_teacher_qualification": ("中国教师资格", "China specific"),
    "clinical_knowledge": ("临床知识", "Other"),
    "college_actuarial_science": ("大学精算学", "STEM"),
    "college_education": ("大学教育学", "Social Science"),
    "college_engineering_hydrology": ("大学工程水文学", "STEM"),
    "college_law": ("大学法律", "Humanities"),
    "college_mathematics": ("大学数学", "STEM"),
    "college_medical_statistics": ("大学医学统计", "STEM"),
    "college_medicine": ("大学医学", "Other"),
    "computer_science": ("计算机科学", "STEM"),
    "computer_security": ("计算机安全", "Other"),
    "conceptual_physics": ("概念物理学", "STEM"),
    "construction_project_management": ("建设工程管理", "China specific"),
    "economics": ("经济学", "Social Science"),
    "education": ("教育学", "Social Science"),
    "electrical_engineering": ("电气工程", "STEM"),
    "elementary_chinese": ("小学语文", "China specific"),
    "elementary_commonsense": ("小学常识", "China specific"),
    "elementary_information_and_technology": ("小学信息技术", "Other"),
    "elementary_mathematics": ("初等数学", "STEM"),
    "ethnology": ("民族学", "China specific"),
    "food_science": ("食品科学", "Other"),
    "genetics": ("遗传学", "STEM"),
    "global_facts": ("全球事实", "Humanities"),
    "high_school_biology": ("高中生物", "STEM"),
    "high_school_chemistry": ("高中化学", "STEM"),
    "high_school_geography": ("高中地理", "Social Science"),
    "high_school_mathematics": ("高中数学", "STEM"),
    "high_school_physics": ("高中物理学", "STEM"),
    "high_school_politics": ("高中政治", "China specific"),
    "human_sexuality": ("人类性行为", "Other"),
    "international_law": ("国际法学", "Humanities"),
    "journalism": ("新闻学", "Social Science"),
    "jurisprudence": ("法理学", "Humanities"),
    "legal_and_moral_basis": ("法律与道德基础", "Other"),
    "logical": ("逻辑学", "Humanities"),
    "machine_learning": ("机器学习", "STEM"),
    "management": ("管理学", "Social Science"),
    "marketing": ("市场营销", "Social Science"),
    "marxist_theory": ("马克思主义理论", "Humanities"),
    "modern_chinese": ("现代汉语", "China specific"),
    "nutrition": ("营养学", "Other"),
    "philosophy": ("哲学", "Humanities"),
    "professional_accounting": ("专业会计", "Social Science"),
    "professional_law": ("专业法学", "Humanities"),
    "professional_medicine": ("专业医学", "Other"),
    "professional_psychology": ("专业心理学", "Social Science"),
    "public_relations": ("公共关系", "Social Science"),
    "security_study": ("安全研究", "Social Science"),
    "sociology": ("社会学", "Social Science"),
    "sports_science": ("体育学", "Other"),
    "traditional_chinese_medicine": ("中医中药", "China specific"),
    "virology": ("病毒学", "STEM"),
    "world_history": ("世界历史", "Humanities"),
    "world_religions": ("世界宗教", "Humanities"),
}

_MMLU_GROUPS = {
    "STEM": [
        "abstract_algebra", "astronomy", "college_biology", "college_chemistry",
        "college_computer_science", "college_mathematics", "college_physics", "computer_security",
        "conceptual_physics", "electrical_engineering", "elementary_mathematics",
        "high_school_biology", "high_school_chemistry", "high_school_computer_science",
        "high_school_mathematics", "high_school_physics", "high_school_statistics",
        "machine_learning"],
    "Humanities": [
        "formal_logic", "high_school_european_history", "high_school_us_history",
        "high_school_world_history", "international_law", "jurisprudence", "logical_fallacies",
        "moral_disputes", "moral_scenarios", "philosophy", "prehistory", "professional_law",
        "world_religions"],
    "Social Science": [
        "econometrics", "high_school_geography", "high_school_government_and_politics",
        "high_school_macroeconomics", "high_school_microeconomics", "high_school_psychology",
        "human_sexuality", "professional_psychology", "public_relations", "security_studies",
        "sociology", "us_foreign_policy"],
    "Other": [
        "anatomy", "business_ethics", "clinical_knowledge", "college_medicine", "global_facts",
        "human_aging", "management", "marketing", "medical_genetics", "miscellaneous", "nutrition",
        "professional_accounting", "professional_medicine", "virology"],
}

# MMLU: subject -> (English name used in the prompt, category).
MMLU = {s: (s.replace("_", " "), cat) for cat, subs in _MMLU_GROUPS.items() for s in subs}

# GAOKAO-Bench objective files are named `2010-2022_{Subject}_MCQs.json` (or without the suffix,
# e.g. `2010-2022_Chinese_Modern_Lit.json`); key = the {Subject} part.
GAOKAO = {
    "Biology": ("生物", "STEM"),
    "Chemistry": ("化学", "STEM"),
    "Physics": ("物理", "STEM"),
    "Math_I": ("数学", "STEM"),
    "Math_II": ("数学", "STEM"),
    "Geography": ("地理", "Social Science"),
    "Political_Science": ("政治", "Social Science"),
    "History": ("历史", "Humanities"),
    "Chinese_Lang_and_Usage": ("语文", "Humanities"),
    "Chinese_Modern_Lit": ("语文", "Humanities"),
    "English": ("英语", "English"),
    "English_Fill_in_Blanks": ("英语", "English"),
    "English_Reading_Comp": ("英语", "English"),
    "English_Cloze_Test": ("英语", "English"),
}

# AGIEval v1 multiple-choice tasks (file stem -> (display name, language group)).
AGIEVAL = {
    "aqua-rat": ("AQuA-RAT", "English"),
    "logiqa-en": ("LogiQA (en)", "English"),
    "lsat-ar": ("LSAT analytical reasoning", "English"),
    "lsat-lr": ("LSAT logical reasoning", "English"),
    "lsat-rc": ("LSAT reading comprehension", "English"),
    "sat-en": ("SAT English", "English"),
    "sat-en-without-passage": ("SAT English (no passage)", "English"),
    "sat-math": ("SAT math", "English"),
    "gaokao-biology": ("高考生物", "Chinese"),
    "gaokao-chemistry": ("高考化学", "Chinese"),
    "gaokao-chinese": ("高考语文", "Chinese"),
    "gaokao-english": ("高考英语", "Chinese"),
    "gaokao-geography": ("高考地理", "Chinese"),
    "gaokao-history": ("高考历史", "Chinese"),
    "gaokao-mathqa": ("高考数学", "Chinese"),
    "gaokao-physics": ("高考物理", "Chinese"),
    "jec-qa-ca": ("JEC-QA 案例分析", "Chinese"),
    "jec-qa-kd": ("JEC-QA 知识驱动", "Chinese"),
    "logiqa-zh": ("LogiQA (zh)", "Chinese"),
}

# AGIEval's own `english_qa_datasets` (src/dataset_loader.py): these get the English template,
# gaokao-english included; every other multiple-choice task is in its `chinese_qa_datasets`.
AGIEVAL_ENGLISH = frozenset({"lsat-ar", "lsat-lr", "lsat-rc", "logiqa-en", "sat-math", "sat-en",
                             "aqua-rat", "sat-en-without-passage", "gaokao-english"})

# CMMLU's `src/categories.py` gives each China-specific subject a first subcategory too, so it also
# counts in that subcategory's category (9 Social Science, 2 Humanities, 4 Other).
CMMLU_CHINA_SPECIFIC_ALSO = {
    "ancient_chinese": "Social Science",  # linguistics
    "chinese_civil_service_exam": "Social Science",  # politics
    "chinese_driving_rule": "Other",
    "chinese_food_culture": "Social Science",  # culture
    "chinese_foreign_policy": "Social Science",  # politics
    "chinese_history": "Humanities",  # history
    "chinese_literature": "Humanities",  # literature
    "chinese_teacher_qualification": "Social Science",  # education
    "construction_project_management": "Other",
    "elementary_chinese": "Social Science",  # linguistics
    "elementary_commonsense": "Other",
    "ethnology": "Social Science",  # culture
    "high_school_politics": "Social Science",  # politics
    "modern_chinese": "Social Science",  # linguistics
    "traditional_chinese_medicine": "Other",
}

TABLES = {"ceval": CEVAL, "cmmlu": CMMLU, "mmlu": MMLU, "gaokao": GAOKAO, "agieval": AGIEVAL}


def category(task: str, subject: str) -> str:
  """The category `subject` is reported under in `task` ("Unlisted" for subjects we do not know)."""
  entry = TABLES[task].get(subject)
  return entry[1] if entry else "Unlisted"


def categories(task: str, subject: str) -> tuple:
  """Every category `subject` counts in: one, or two for CMMLU's China-specific subjects."""
  first = category(task, subject)
  if task == "cmmlu" and subject in CMMLU_CHINA_SPECIFIC_ALSO:
    return (CMMLU_CHINA_SPECIFIC_ALSO[subject], first)
  return (first,)


def display_name(task: str, subject: str) -> str:
  """The subject name written into prompts (falls back to the subject key, underscores spaced)."""
  entry = TABLES[task].get(subject)
  return entry[0] if entry else subject.replace("_", " ")
