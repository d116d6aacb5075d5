"""PEFT methods, one per file. The public names are re-exported from ``jpeft``."""
