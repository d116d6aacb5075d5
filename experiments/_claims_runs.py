"""The extra cells of ``python -m experiments.claims``: configurations the comparison grid does not run.

Every cell goes through ``experiments.compare``'s own runner (:func:`experiments.compare.run_grid`,
its :class:`~experiments.compare.Trainer`, its keys and its resumable JSONL scheme) into the claims'
own cells file. Three groups, all on one task (Rotten Tomatoes by default), at compare's budget
(800 / 200 / 300 rows, 50 steps of batch 16 × 32 tokens) unless noted:

* ``rank``: LoRA (``alpha / r``) and rsLoRA (``alpha / sqrt(r)``) on query and value, alpha 16, at
  r ∈ {4, 16, 64, 256}, all at one learning rate (:data:`RANK_LR`), on the first :data:`SMALL_LAYERS`
  encoder layers;
* ``lora_plus``: LoRA and LoRA+ (ratio 16) at rank 8 and the same base rate, the per-step training
  loss kept in each cell (``result.losses``), on the first :data:`SMALL_LAYERS` layers;
* ``size``: full fine-tuning and prompt tuning (20 tokens) at compare's central rates, on the first
  :data:`SMALL_LAYERS` layers and on all 6 (the 6-layer cells have compare's exact keys);
* ``pairs``: compare's rows that its pair claims read (:data:`PAIR_ROWS`), at their central rates on the
  first :data:`SMALL_LAYERS` layers: a cheaper, fixed-rate preview of those claims.

The extra rows are added to ``_compare_specs``' tables (``SPECS``, ``LEARNING_RATES``) in this process
only, under names that start with ``claims_``, so that compare's runner can build them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import jax

from experiments import compare
from experiments._compare_specs import LEARNING_RATES, QV, SPECS

RANKS = (4, 16, 64, 256)
RANK_LR = 1e-3  # LoRA's central rate in compare; the same for every rank and both scalings
PLUS_LR = 1e-3  # the base rate (A's) of LoRA and LoRA+ in the loss-curve group
SMALL_LAYERS = 2  # the cheaper encoder (first 2 of MiniLM's 6 layers) of the extra groups

#: name -> (label, class, kwargs given steps, learning rate): the rows this module adds.
EXTRA: dict[str, tuple[str, str, Any, float]] = {}
for _r in RANKS:
    EXTRA[f"claims_lora_r{_r}"] = (f"LoRA r={_r} (α/r)", "LoRA", dict(targets=QV, rank=_r, alpha=16.0), RANK_LR)
    EXTRA[f"claims_rslora_r{_r}"] = (
        f"rsLoRA r={_r} (α/√r)",
        "LoRA",
        dict(targets=QV, rank=_r, alpha=16.0, use_rslora=True),
        RANK_LR,
    )
EXTRA["claims_lora_r8"] = ("LoRA r=8", "LoRA", dict(targets=QV, rank=8, alpha=16.0), PLUS_LR)
EXTRA["claims_lora_plus_r8"] = (
    "LoRA+ r=8 (λ=16)",
    "LoRAPlus",
    dict(targets=QV, rank=8, alpha=16.0, lr_ratio=16.0),
    PLUS_LR,
)

#: compare's rows that the pair claims read, also run at the small budget (LoRA and Full come from the other groups).
PAIR_ROWS = (
    "bitfit", "dora", "adalora", "qlora", "lora_bf16", "prefix", "lora_r15", "mam", "mam_prefix", "mam_adapter", "ptuning",
)  # fmt: skip
#: compare's row name -> the extra row that stands for it at the small budget.
ALIAS = {"lora": "claims_lora_r8"}

#: group -> [(method name, layers)]; layers 0 is the whole encoder.
GROUPS: dict[str, list[tuple[str, int]]] = {
    "rank": [(f"claims_{k}_r{r}", SMALL_LAYERS) for r in RANKS for k in ("lora", "rslora")],
    "lora_plus": [("claims_lora_r8", SMALL_LAYERS), ("claims_lora_plus_r8", SMALL_LAYERS)],
    "size": [("full", SMALL_LAYERS), ("prompt", SMALL_LAYERS), ("prompt", 0)],
    "pairs": [(n, SMALL_LAYERS) for n in PAIR_ROWS],
}


def register() -> None:
    """Adds :data:`EXTRA`'s rows to compare's tables (idempotent); compare's own rows are left as they are.

    >>> register(); SPECS["claims_rslora_r64"][0]
    'rsLoRA r=64 (α/√r)'
    """
    for name, (lab, cls, kw, lr) in EXTRA.items():
        SPECS.setdefault(name, (lab, cls, lambda n, kw=kw: dict(kw)))
        LEARNING_RATES.setdefault(name, lr)


def fixed_lr(name: str) -> float:
    """The one learning rate a group's row runs at: its :data:`EXTRA` rate, or compare's centre for its rows."""
    return EXTRA[name][3] if name in EXTRA else LEARNING_RATES[name]


def group_args(cells_path: str, task: str, layers: int, seeds: int, base: list[str] | None = None) -> Any:
    """compare's arguments at its full budget (or ``base``'s), one task, one rate per row (factor 1), ``seeds``."""
    args = compare.parse_args([*(base or []), "--tasks", task, "--no-probe", "--methods", "full"])
    args.layers, args.seeds, args.lr_factors, args.cells = layers, seeds, [1.0], cells_path
    return args


class CurveTrainer(compare.Trainer):
    """compare's :class:`~experiments.compare.Trainer` that also keeps each step's training loss in the cell."""

    def run(self, lr: float, seed: int) -> dict[str, Any]:
        losses: list[float] = []
        compiled = self.compiled

        def recording(*a: Any) -> Any:
            state, loss = compiled(*a)
            losses.append(float(jax.block_until_ready(loss)))
            return state, loss

        self.compiled = recording
        try:
            row = super().run(lr, seed)
        finally:
            self.compiled = compiled
        return {**row, "losses": losses}


@contextlib.contextmanager
def curve_trainer() -> Iterator[None]:
    """compare's runner builds :class:`CurveTrainer` inside the block."""
    saved = compare.Trainer
    compare.Trainer = CurveTrainer  # type: ignore[misc]
    try:
        yield
    finally:
        compare.Trainer = saved  # type: ignore[misc]


def run_groups(
    cells: dict[str, dict[str, Any]],
    cells_path: str,
    task: str,
    groups: list[str],
    seeds: int,
    max_minutes: float = 0,
    base: list[str] | None = None,
) -> int:
    """Runs the missing cells of ``groups``, and those that ended in an error: two seeds of every row first, then
    the rest; returns how many it added."""
    import time

    register()
    for key in [k for k, c in cells.items() if c["result"]["status"].startswith("error")]:
        del cells[key]  # an error cell (e.g. a bug fixed since) runs again; its new line supersedes the old one
    t0, added = time.perf_counter(), 0
    for n_seeds in sorted({min(2, seeds), seeds}):
        for g in groups:
            for name, layers in GROUPS[g]:
                left = max_minutes - (time.perf_counter() - t0) / 60 if max_minutes else 0
                if max_minutes and left <= 0:
                    return added
                args = group_args(cells_path, task, layers, n_seeds, base)
                args.methods, args.max_minutes = [name], left
                with curve_trainer():
                    added += compare.run_grid(args, cells)
    return added
