"""Experiment tracking: every metric row goes to ``metrics.jsonl``, and to TensorBoard when the
``tensorboard`` package is importable and asked for.

Rows carry ``kind``: ``"eval"`` (train/val loss estimates, written *before* the step of that
iteration, so a checkpoint of iteration k follows its eval row) or ``"step"`` (the loss of the
optimizer step taken at that iteration). Resuming from a checkpoint of iteration k drops every
row the interrupted run wrote after it (and a last row torn by a kill mid-write), so the log of a
resumed run reads like an uninterrupted one. A fresh run (no checkpoint to resume) starts a new log.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.jsonl"


def read_metrics(path: str | Path, drop_torn_tail: bool = False) -> list[dict[str, Any]]:
    """The rows of a ``metrics.jsonl`` (a file or the run directory holding it), in order. With
    ``drop_torn_tail``, a last line without its newline (a write cut short by a kill) is dropped."""
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    if not path.is_file():
        return []
    text = path.read_text()
    lines = text.split("\n")
    if drop_torn_tail:
        lines = lines[:-1]  # everything after the last newline was never completely written
    return [json.loads(line) for line in lines if line.strip()]


def _written_before(row: dict[str, Any], resume_iter: int) -> bool:
    """Was ``row`` written before the checkpoint of ``resume_iter`` was saved?"""
    return row["iter"] < resume_iter or (row["iter"] == resume_iter and row.get("kind") == "eval")


class MetricsLog:
    """Append-only JSONL log of metric rows (flushed each row) plus optional TensorBoard scalars."""

    def __init__(self, out_dir: str | Path, resume_iter: int | None = None, tensorboard: bool = False):
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.path = out / METRICS_FILE
        if resume_iter is not None and self.path.exists():
            kept = [row for row in read_metrics(self.path, drop_torn_tail=True) if _written_before(row, resume_iter)]
            tmp = self.path.with_name(self.path.name + ".tmp")
            with open(tmp, "w") as f:
                f.write("".join(json.dumps(row) + "\n" for row in kept))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)  # atomic: a crash here keeps the old log, never half of it
        # a fresh run replaces the log of any earlier run in this directory instead of extending it
        self.file = open(self.path, "a" if resume_iter is not None else "w")
        self.writer = None
        if tensorboard:
            self.writer = _tensorboard_writer(out / "tensorboard", purge_step=resume_iter)

    def write(self, row: dict[str, Any]) -> None:
        """Append ``row`` (it must hold ``iter``); numeric fields become TensorBoard scalars."""
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        if self.writer is not None:
            for key, value in row.items():
                if key not in ("iter", "kind") and isinstance(value, (int, float)):
                    self.writer.add_scalar(f"{row.get('kind', 'metrics')}/{key}", value, row["iter"])

    def sync(self) -> None:
        """fsync the log: called before each checkpoint, so after a power cut no checkpoint is newer
        than the rows written before it (a plain kill loses nothing flushed either way)."""
        os.fsync(self.file.fileno())

    def close(self) -> None:
        """Close the log (and the TensorBoard writer)."""
        self.file.close()
        if self.writer is not None:
            self.writer.close()


def _tensorboard_writer(log_dir: Path, purge_step: int | None):
    """A ``SummaryWriter``, or None with a one-line note when ``tensorboard`` is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        print("tensorboard is not installed (pip install tensorboard): metrics go to metrics.jsonl only")
        return None
    # purge_step drops events a crashed run logged past the checkpoint we resume from
    return SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)
