"""Files: orbax checkpoints of the deltas (``save``, ``restore``, ``steps``)."""

from jpeft.io._checkpoint import Checkpoint as Checkpoint
from jpeft.io._checkpoint import restore as restore
from jpeft.io._checkpoint import save as save
from jpeft.io._checkpoint import steps as steps

__all__ = ["Checkpoint", "restore", "save", "steps"]
