"""Evaluation: style classifier, BLEU, G-score, per-example reports, and the study's plots."""

from ray_twist.evaluate.classifier import StyleClassifier
from ray_twist.evaluate.run import (
    AdapterMismatchError,
    JudgeOnTestError,
    TestSet,
    evaluate_adapter,
    evaluate_outputs,
    load_adapted,
    read_style_data,
    read_test_set,
    tokenizer_lowercases,
    write_report,
)
from ray_twist.metrics import EvalReport, ExampleScore, bleu_scores, detokenize, g_score, score

__all__ = [
    "AdapterMismatchError",
    "EvalReport",
    "ExampleScore",
    "JudgeOnTestError",
    "StyleClassifier",
    "TestSet",
    "bleu_scores",
    "detokenize",
    "evaluate_adapter",
    "evaluate_outputs",
    "g_score",
    "load_adapted",
    "read_style_data",
    "read_test_set",
    "score",
    "tokenizer_lowercases",
    "write_report",
]
