"""Tasks (BIG-bench JSON, JSONL, Hugging Face datasets), their splits, and BIG-bench fetching."""

from phatgoose.data.bigbench import (
    BIGBENCH_VERSION,
    bigbench_task_path,
    default_cache_dir,
    fetch_bigbench,
)
from phatgoose.data.tasks import (
    GENERATION,
    MULTIPLE_CHOICE,
    PROMPT_SUFFIX,
    Example,
    Task,
    TaskSplits,
    load_examples_jsonl,
    load_task,
    task_from_hf_dataset,
)

__all__ = [
    "BIGBENCH_VERSION",
    "GENERATION",
    "MULTIPLE_CHOICE",
    "PROMPT_SUFFIX",
    "Example",
    "Task",
    "TaskSplits",
    "bigbench_task_path",
    "default_cache_dir",
    "fetch_bigbench",
    "load_examples_jsonl",
    "load_task",
    "task_from_hf_dataset",
]
