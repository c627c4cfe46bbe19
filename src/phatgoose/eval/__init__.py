"""Evaluation: rank classification and greedy generation, with tables."""

from phatgoose.eval.evaluate import (
    EvalConfig,
    TaskResult,
    choice_nll,
    evaluate,
    evaluate_task,
    generate,
    markdown_table,
    predictions_path,
    summary,
    write_predictions,
)

__all__ = [
    "EvalConfig",
    "TaskResult",
    "choice_nll",
    "evaluate",
    "evaluate_task",
    "generate",
    "markdown_table",
    "predictions_path",
    "summary",
    "write_predictions",
]
