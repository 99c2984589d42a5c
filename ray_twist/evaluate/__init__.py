"""Evaluation: style classifier, BLEU, G-score, per-example reports, and the study's plots."""

from ray_twist.evaluate.classifier import StyleClassifier
from ray_twist.evaluate.metrics import EvalReport, ExampleScore, bleu_scores, g_score, score
from ray_twist.evaluate.run import (
    AdapterMismatchError,
    TestSet,
    evaluate_adapter,
    evaluate_outputs,
    load_adapted,
    read_style_data,
    read_test_set,
    write_report,
)

__all__ = [
    "AdapterMismatchError",
    "EvalReport",
    "ExampleScore",
    "StyleClassifier",
    "TestSet",
    "bleu_scores",
    "evaluate_adapter",
    "evaluate_outputs",
    "g_score",
    "load_adapted",
    "read_style_data",
    "read_test_set",
    "score",
    "write_report",
]
