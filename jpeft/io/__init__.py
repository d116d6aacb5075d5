"""Interop and files: orbax checkpoints of the deltas, and the HF PEFT adapter format."""
