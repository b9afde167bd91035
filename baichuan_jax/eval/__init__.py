"""Evaluation: 5-shot multiple choice by option-letter scores (C-Eval, CMMLU, MMLU, GAOKAO,
AGIEval) and perplexity / bits per byte, under the `baichuan` (default) or `official` protocol.
CLI: `python -m baichuan_jax.eval --help`."""

from baichuan_jax.eval.harness import evaluate_benchmark, markdown, write_reports
from baichuan_jax.eval.perplexity import evaluate_text, nll_from_logits, read_texts, windows
from baichuan_jax.eval.prompts import (DEFAULT_PROTOCOL, LetterTokens, Prompt, Rules, answer_cue,
                                       fit_prompt, header, letter_tokens, prompt_parts,
                                       prompt_text, question_block, rules, single_letter_tokens)
from baichuan_jax.eval.readers import (PROTOCOLS, Benchmark, Question, Skipped, SubjectData,
                                       classify_answer, load_benchmark, normalize_answer,
                                       split_inline_options)
from baichuan_jax.eval.scoring import (TokenBatch, aggregate, from_sequence_logits, letter_scores,
                                       pad_batch, pick)

__all__ = [
    "DEFAULT_PROTOCOL", "PROTOCOLS", "Benchmark", "LetterTokens", "Prompt", "Question", "Rules",
    "Skipped", "SubjectData", "TokenBatch", "aggregate", "answer_cue", "classify_answer",
    "evaluate_benchmark", "evaluate_text", "fit_prompt", "from_sequence_logits", "header",
    "letter_scores", "letter_tokens", "load_benchmark", "markdown", "nll_from_logits",
    "normalize_answer", "pad_batch", "pick", "prompt_parts", "prompt_text", "question_block",
    "read_texts", "rules", "single_letter_tokens", "split_inline_options", "windows",
    "write_reports",
]
