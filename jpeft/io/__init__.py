"""Interop and files: orbax checkpoints of the deltas, and the HF PEFT adapter format."""

from jpeft.io._checkpoint import Checkpoint as Checkpoint
from jpeft.io._checkpoint import restore as restore
from jpeft.io._checkpoint import save as save
from jpeft.io._checkpoint import steps as steps

__all__ = ["Checkpoint", "restore", "save", "steps"]
