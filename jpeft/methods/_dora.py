"""DoRA: weight-decomposed low-rank adaptation, LoRA with ``use_dora=True``."""

from __future__ import annotations

import dataclasses

from jpeft.methods._lora import LoRA


@dataclasses.dataclass(frozen=True, kw_only=True)
class DoRA(LoRA):
    """LoRA with ``use_dora=True``: weight-decomposed low-rank adaptation.

    ``W' = m * (W + s A B) / ||W + s A B||_c``, the norm per output feature and held constant in
    the backward pass. See :class:`LoRA` for the arguments.

    Example:
      >>> import jpeft
      >>> jpeft.DoRA(targets=("query", "value")).use_dora
      True

    References:
      Liu et al., "DoRA: Weight-Decomposed Low-Rank Adaptation", 2024.
    """

    use_dora: bool = True
