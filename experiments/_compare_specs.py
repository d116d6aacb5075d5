"""The method table of ``python -m experiments.compare``: each row's method, its learning-rate grid and priority.

Kept apart from the run itself (``experiments/compare.py`` re-exports every name here).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

QV = ("query", "value")
#: The encoder's linear modules (BERT profile names), for methods that act on all of them.
ALL_LINEAR = (
    r".*encoder/layer/\d+/(attention/self/(query|key|value)|attention/output/dense|intermediate/dense|output/dense)"
)
DIFF_PRUNING_LAMBDA = 1.25e-7  # Guo et al.'s lambda on the expected L0 norm
MINILM_HEADS = 12  # all-MiniLM-L6-v2's attention heads (ladder side tuning needs them)

# name -> (label, jpeft class name, keyword arguments given the number of steps). Hyperparameters
# follow each paper's defaults for BERT-sized models where they give one.
SPECS: dict[str, tuple[str, str, Callable[[int], dict[str, Any]]]] = {
    "full": ("Full", "Full", lambda n: {}),
    "freeze": ("Freeze(3)", "Freeze", lambda n: dict(trainable_layers=3)),
    "bitfit": ("BitFit", "BitFit", lambda n: {}),
    "prompt": ("Prompt tuning (20)", "PromptTuning", lambda n: dict(num_virtual_tokens=20, init="vocab")),
    "ptuning": ("P-tuning (20, MLP)", "PTuning", lambda n: dict(num_virtual_tokens=20, encoder_hidden_size=128)),
    "prefix": (
        "Prefix tuning (20, MLP 128)",
        "PrefixTuning",
        lambda n: dict(num_virtual_tokens=20, projection_hidden_size=128),
    ),
    "ptuning_v2": ("P-tuning v2 (20)", "PTuningV2", lambda n: dict(num_virtual_tokens=20)),
    "houlsby": ("Houlsby (r=24)", "HoulsbyAdapter", lambda n: dict(reduction_factor=16)),
    "pfeiffer": ("Pfeiffer (r=24)", "PfeifferAdapter", lambda n: dict(reduction_factor=16)),
    "parallel": ("Parallel (r=24)", "ParallelAdapter", lambda n: dict(bottleneck=24)),
    "scaled_parallel": ("Scaled parallel (r=24, s=4)", "ScaledParallelAdapter", lambda n: dict(bottleneck=24)),
    "lora": ("LoRA (q,v r=8)", "LoRA", lambda n: dict(targets=QV, rank=8, alpha=16.0)),
    "rslora": ("rsLoRA (q,v r=8)", "LoRA", lambda n: dict(targets=QV, rank=8, alpha=16.0, use_rslora=True)),
    "dora": ("DoRA (q,v r=8)", "DoRA", lambda n: dict(targets=QV, rank=8, alpha=16.0)),
    "lora_fa": ("LoRA-FA (q,v r=8)", "LoRAFA", lambda n: dict(targets=QV, rank=8, alpha=16.0)),
    "lora_plus": (
        "LoRA+ (q,v r=8, ratio 16)",
        "LoRAPlus",
        lambda n: dict(targets=QV, rank=8, alpha=16.0, lr_ratio=16.0),
    ),
    "ia3": ("(IA)³", "IA3", lambda n: {}),
    "adalora": (
        "AdaLoRA (q,v r 12→8)",
        "AdaLoRA",
        lambda n: dict(targets=QV, init_r=12, target_r=8, alpha=16.0, total_step=n, tinit=n // 10, tfinal=n // 5),
    ),
    "qlora": ("QLoRA (NF4, q,v r=8)", "QLoRA", lambda n: dict(targets=QV, rank=8, alpha=16.0)),
    # He et al.'s l = 30, s = 4 and r = d / 2 (their 512 on BART-large's d = 1024; d = 384 here).
    "mam": ("MAM (l=30, r=192, s=4)", "MAM", lambda n: dict(prefix_tokens=30, adapter_bottleneck=192)),
    # MAM's two parts alone, as MAM builds them: plain prefixes (no MLP) and the scaled parallel FFN adapter.
    "mam_prefix": (
        "Prefix (l=30, no MLP; MAM's part)",
        "PrefixTuning",
        lambda n: dict(num_virtual_tokens=30, prefix_projection=False),
    ),
    "mam_adapter": (
        "Scaled parallel (r=192, s=4; MAM's part)",
        "ScaledParallelAdapter",
        lambda n: dict(bottleneck=192),
    ),
    # LoRA on a bf16 base (BASE_DTYPES): QLoRA's reference, the same LoRA without the NF4 quantisation.
    "lora_bf16": ("LoRA (bf16 base, q,v r=8)", "LoRA", lambda n: dict(targets=QV, rank=8, alpha=16.0)),
    # LoRA at exactly the plain prefix's (mam_prefix, l = 30) trainable count: 6 layers x 2 targets x 15 x (384 + 384)
    # = 138,240 = 6 layers x 2 (keys, values) x 30 x 384; alpha / r = 2 as the r = 8 row. For "prefix tuning vs
    # LoRA at equal trainable parameters" (He et al.).
    "lora_r15": ("LoRA (q,v r=15; the plain prefix's count)", "LoRA", lambda n: dict(targets=QV, rank=15, alpha=30.0)),
    "unipelt": ("UniPELT (LoRA 8, prefix 10, adapter r=24)", "UniPELT", lambda n: {}),
    "diff_pruning": ("Diff pruning", "DiffPruning", lambda n: dict(targets=ALL_LINEAR)),
    # Sung et al.'s reduction 8 (side width 48); num_heads is MiniLM's 12 (the tree does not hold it).
    "lst": ("LST (r=8)", "LadderSideTuning", lambda n: dict(num_heads=MINILM_HEADS, reduction=8)),
    # LoRA through jpeft.on_quantized on a base whose 36 encoder linear kernels are INT8 / INT4 (QUANTIZED_BASES).
    "lora_int8": ("LoRA (INT8 base, q,v r=8)", "LoRA", lambda n: dict(targets=QV, rank=8, alpha=16.0)),
    "lora_int4": ("LoRA (INT4 base, q,v r=8)", "LoRA", lambda n: dict(targets=QV, rank=8, alpha=16.0)),
    # Lester et al.'s ensemble of k = 5 prompts, each as the "prompt" row; evaluated by majority vote.
    "prompt_ensemble": (
        "Prompt ensemble (5 × 20, vote)",
        "PromptEnsemble",
        lambda n: dict(k=5, num_virtual_tokens=20, init="vocab"),
    ),
    # Qin et al.'s intrinsic subspace tuning without source tasks: a random Gaussian up-projection
    # (projection=None), the random-subspace baseline; d_I = 100, the largest of the issue's {5, 20, 100}.
    "intrinsic_prompt": (
        "Intrinsic prompt (20, random proj., d_I=100)",
        "IntrinsicPromptTuning",
        lambda n: dict(dim=100, num_virtual_tokens=20),
    ),
}

#: Rows whose encoder linear kernels are quantised by ``jpeft.quantize`` (format: a jpeft class name)
#: and whose method runs on that base through ``jpeft.on_quantized`` (compute dtype bf16, as QLoRA).
QUANTIZED_BASES: dict[str, str] = {"lora_int8": "Int8", "lora_int4": "Int4"}
#: Rows whose encoder (not the head) is cast to this dtype before ``jpeft.apply``.
BASE_DTYPES: dict[str, str] = {"lora_bf16": "bfloat16"}

#: The centre of each method's learning-rate grid (:func:`lr_grid`), the peak learning rate of the
#: encoder's trainable leaves (the head uses ``--head-lr``).
#: Full/Freeze: BERT fine-tuning's 2e-5..1e-4; BitFit 1e-3 (Ben Zaken et al. 1e-4..1e-3); the
#: adapters 1e-3 (Houlsby 3e-4..3e-3); LoRA and its variants 1e-3 (Hu et al. 4e-4..5e-4 for
#: RoBERTa-base, larger for this short budget), LoRA+ a lower base rate (its B factor runs 16x);
#: (IA)³ 3e-3 (Liu et al.); prompt tuning 3e-2 and P-tuning 1e-2 (soft prompts need large rates:
#: Lester et al. 0.3 with Adafactor); prefix tuning 1e-3 through its MLP, P-tuning v2 5e-3 (Liu et
#: al. 5e-3..1e-2); diff pruning 1e-3; LST 3e-3 (Sung et al.); LoRA on INT8/INT4 bases as LoRA;
#: the prompt ensemble as prompt tuning; AdaLoRA 1e-2 (its update starts ~100x smaller than LoRA's: lambda = 0
#: between P, Q ~ N(0, 0.02), as HF PEFT; on LoRA's grid, 3.3e-4..3e-3, it chose the top rate on every task and
#: its test scores equalled the probe's on two of them); intrinsic prompt tuning 3e-2 (with entries N(0, 1/d_I) in the
#: up-projection, an Adam step on z moves the prompt by about as much as prompt tuning's step does).
LEARNING_RATES: dict[str, float] = {
    "full": 1e-4,
    "freeze": 1e-4,
    "bitfit": 1e-3,
    "prompt": 3e-2,
    "ptuning": 1e-2,
    "prefix": 1e-3,
    "ptuning_v2": 5e-3,
    "houlsby": 1e-3,
    "pfeiffer": 1e-3,
    "parallel": 1e-3,
    "scaled_parallel": 1e-3,
    "lora": 1e-3,
    "rslora": 1e-3,
    "dora": 1e-3,
    "lora_fa": 1e-3,
    "lora_plus": 2.5e-4,
    "ia3": 3e-3,
    "adalora": 1e-2,
    "qlora": 1e-3,
    "mam": 1e-3,
    "mam_prefix": 1e-3,
    "mam_adapter": 1e-3,
    "lora_bf16": 1e-3,
    "lora_r15": 1e-3,
    "unipelt": 1e-3,
    "diff_pruning": 1e-3,
    "lst": 3e-3,
    "lora_int8": 1e-3,
    "lora_int4": 1e-3,
    "prompt_ensemble": 3e-2,
    "intrinsic_prompt": 3e-2,
}

#: Each method's grid: its :data:`LEARNING_RATES` entry times these factors (a half decade either side).
LR_FACTORS = (1 / 3, 1.0, 3.0)

#: The order the grid runs in, so that issue 15's claims can be checked first: Full, LoRA, BitFit,
#: prompt and prefix tuning, MAM and its parts, rsLoRA, LoRA+, DoRA, AdaLoRA, QLoRA against bf16
#: LoRA, P-tuning, LoRA at the plain prefix's count; then every other method in SPECS order.
PRIORITY: tuple[str, ...] = (
    "full", "lora", "bitfit", "prompt", "prefix", "mam", "mam_prefix", "mam_adapter", "rslora", "lora_plus",
    "dora", "adalora", "qlora", "lora_bf16", "ptuning", "lora_r15",
)  # fmt: skip
ORDER: tuple[str, ...] = PRIORITY + tuple(n for n in SPECS if n not in PRIORITY)


def lr_grid(name: str, factors: Sequence[float] = LR_FACTORS) -> tuple[float, ...]:
    """The learning rates swept for method ``name``: its rate times ``factors``, to two significant digits.

    >>> lr_grid("lora")
    (0.00033, 0.001, 0.003)
    """
    return tuple(float(f"{LEARNING_RATES[name] * f:.2g}") for f in factors)
