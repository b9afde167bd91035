"""Evaluation: 5-shot multiple choice by option-letter scores (C-Eval, CMMLU, MMLU, GAOKAO,
AGIEval) and perplexity / bits per byte. CLI: `python -m baichuan_jax.eval --help`."""

from baichuan_jax.eval.harness import evaluate_benchmark, markdown, write_reports
from baichuan_jax.eval.perplexity import evaluate_text, nll_from_logits, read_texts, windows
from baichuan_jax.eval.prompts import (LetterTokens, Prompt, answer_cue, fit_prompt, header,
                                       letter_tokens, prompt_text, question_block)
from baichuan_jax.eval.readers import (Benchmark, Question, Skipped, SubjectData, load_benchmark,
                                       split_inline_options)
from baichuan_jax.eval.scoring import (TokenBatch, aggregate, from_sequence_logits, letter_scores,
                                       pad_batch, pick)

__all__ = [
    "Benchmark", "LetterTokens", "Prompt", "Question", "Skipped", "SubjectData", "TokenBatch",
    "aggregate", "answer_cue", "evaluate_benchmark", "evaluate_text", "fit_prompt",
    "from_sequence_logits", "header", "letter_scores", "load_benchmark", "markdown",
    "nll_from_logits", "pad_batch", "pick", "prompt_text", "question_block", "read_texts",
    "split_inline_options", "windows", "write_reports",
]
