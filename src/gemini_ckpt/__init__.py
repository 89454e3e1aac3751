"""Gemini: per-iteration in-memory checkpoints for distributed PyTorch training.

The public API is `Checkpointer` (see its module for the three lines a training script adds) and the
error hierarchy rooted at `GeminiError`. Everything else is internal.
"""

from gemini_ckpt.errors import (
    CorruptCheckpointError,
    GeminiError,
    MemoryBudgetError,
    RestoreError,
    SnapshotError,
)
from gemini_ckpt.snapshot.checkpointer import Checkpointer, RestoreInfo
from gemini_ckpt.snapshot.writer import SaveTiming

__version__ = "0.1.0"

__all__ = [
    "Checkpointer",
    "CorruptCheckpointError",
    "GeminiError",
    "MemoryBudgetError",
    "RestoreError",
    "RestoreInfo",
    "SaveTiming",
    "SnapshotError",
    "__version__",
]
