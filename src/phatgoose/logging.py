"""Metrics to a JSONL file (one object per line) and, when installed, TensorBoard."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path


class MetricLogger:
    def __init__(self, path: Path | str | None, tensorboard_dir: Path | str | None = None):
        self.path = Path(path) if path else None
        if self.path:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self.writer = None
        if tensorboard_dir:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # TensorBoard is optional
                pass
            else:
                self.writer = SummaryWriter(str(tensorboard_dir))

    def log(self, step: int, **values: float) -> None:
        if self.path:
            with self.path.open("a") as f:
                f.write(json.dumps({"time": round(time.time(), 3), "step": step, **values}) + "\n")
        if self.writer:
            for key, value in values.items():
                self.writer.add_scalar(key, value, step)

    def drop_after(self, step: int) -> None:
        """Forget the records of the steps after ``step`` (and lines cut short): a training
        resumed from its step-N checkpoint logs steps N+1... again."""
        if not self.path or not self.path.exists():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    kept.append(line + "\n")
            except json.JSONDecodeError:  # a line cut short when a run was killed
                continue
        partial = self.path.with_name(self.path.name + ".partial")
        partial.write_text("".join(kept))
        os.replace(partial, self.path)

    def close(self) -> None:
        if self.writer:
            self.writer.close()
