"""The registry of the method x feature matrix (``tests/test_matrix.py``; table in ``tests/README.md``).

Each :class:`Case` builds one method for a model family (``'gpt2'``: tiny HF GPT-2 with tied
embeddings, ``'bert'``: tiny HF BERT sequence classifier, ``'synthetic'``: the ``nn.scan`` model of
``tests/_models.py``) and says what the matrix expects of each feature: by default the feature's
oracle; otherwise an entry of ``Case.expect``: ``("error", regex)`` for a tested "not supported"
``JpeftError``, or ``("xfail", reason)`` for a known bug (strict: the mark fails once it is fixed).
Cells that cannot apply get ``"n/a"`` from :func:`status`, with a reason computed from the case's
properties (and :mod:`tests.test_matrix` still asserts the property that makes it n/a).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jpeft

FEATURES = (
    "jit",
    "scan",
    "named",
    "mixed",
    "drop_static",
    "drop_random",
    "generate",
    "bf16",
    "pooled",
    "tied",
    "optimizer",
    "save_restore",
    "nnx",
)
"""The features, in the table's column order."""

FEATURE_DOCS = {
    "jit": "jit(value_and_grad) == eager, and a second tree does not retrace",
    "scan": "`nn.scan` stack == the unrolled model with the same per-layer deltas",
    "named": "adapter `'x'` == the same deltas under `'default'`",
    "mixed": "`adapter_index=` rows == each adapter run alone; `-1` == the base model",
    "drop_static": "`drop_layers=` == the tree with those layers' deltas removed (all layers: the base model)",
    "drop_random": "`drop_random=0` with a dropout rng == no drop, in value and gradient",
    "generate": "`jpeft.generate` == an uncached greedy arg-max loop of the wrapped model",
    "bf16": "bf16 base: trainable deltas are float32, output close to the float32 run",
    "pooled": "BERT classifier: invariant to the placeholder token's embedding row; == base at identity",
    "tied": "GPT-2's tied `wte`: wrap adapts the lookup only (the base model's last hidden state with the adapted table "
    "@ the base table), merge refuses; methods that never touch it leave it untouched",
    "optimizer": "`jpeft.optimizer(chain(clip_by_global_norm(1), sgd(1)))` == the NumPy global-norm update",
    "save_restore": "restore == saved tree, and 3 + 2 Adam steps == 5 steps bit for bit",
    "nnx": "the NNX twin (`tests/_nnx_models.py`, `tests/_nnx_llama.py`) with the same weights and deltas == the linen "
    "model; same delta paths; == base at init; `jpeft.trainable` == the linen labels; merge == unmerged with the "
    "original classes and paths",
}

# Targets per model family for the weight methods: a few linear modules of every layer.
LORA_TARGETS = {"gpt2": ("c_attn", "c_fc"), "bert": ("query", "value"), "synthetic": ("q", "v"), "llama": ("q_proj", "v_proj")}
EMBEDDING = {"gpt2": ("wte",), "bert": ("word_embeddings",), "synthetic": ("embed",), "llama": ("embed_tokens",)}
QUANTISED = {
    "gpt2": ("c_attn", "c_proj", "c_fc"),
    "bert": r".*/encoder/layer/\d+/(attention/self/(query|key|value)|attention/output/dense|intermediate/dense|output/dense)",
    "synthetic": r"layers/(q|k|v|o)",
    "llama": ("q_proj", "k_proj", "v_proj", "o_proj"),
}
NF4 = jpeft.NF4(block_size=8, dq_block_size=4)
INT8 = jpeft.Int8()
R, A = 2, 4.0
FUSED = ("fa", "fb")
"""The names of the trained Pfeiffer adapters that AdapterFusion fuses."""


def _lora(cls: type, **fixed: Any) -> Callable[..., jpeft.Method]:
    def make(family: str, **kw: Any) -> jpeft.Method:
        return cls(**{"targets": LORA_TARGETS[family], "rank": R, "alpha": A, **fixed, **kw})

    return make


def _ia3(family: str, **kw: Any) -> jpeft.Method:
    if family == "synthetic":
        return jpeft.IA3(**{"targets": ("k", "v", "o"), "feedforward": ("o",), **kw})
    return jpeft.IA3(**kw)


def _fixed(factory: Callable[..., jpeft.Method]) -> Callable[..., jpeft.Method]:
    return lambda family, **kw: factory(**kw)


def _synthetic_targets(cls: type, **fixed: Any) -> Callable[..., jpeft.Method]:
    """Methods with a ``targets`` field that profiles fill in; the synthetic model has no profile."""

    def make(family: str, **kw: Any) -> jpeft.Method:
        targets = {"targets": LORA_TARGETS[family]} if family == "synthetic" else {}
        return cls(**{**fixed, **targets, **kw})

    return make


@dataclasses.dataclass(frozen=True)
class Case:
    """One row of the matrix.

    Attributes:
      name: the row id.
      make: ``make(family, **overrides) -> Method``.
      setup: how the base tree is prepared: ``''``, ``'quantize'`` (QLoRA, ``jpeft.on_quantized``: the
        :data:`QUANTISED` kernels in the format ``quant``) or ``'fusion'`` (two trained Pfeiffer
        adapters :data:`FUSED` first).
      quant: the format of a ``'quantize'`` setup.
      embedding: the method can target an embedding through ``targets=``.
      profile: the method needs an architecture profile (the synthetic model has none).
      expect: feature -> ``("error", regex)`` or ``("xfail", reason)``.
    """

    name: str
    make: Callable[..., jpeft.Method]
    setup: str = ""
    quant: Any = NF4
    embedding: bool = False
    profile: bool = False
    expect: dict[str, tuple[str, str]] = dataclasses.field(default_factory=dict)

    def method(self, family: str = "gpt2", **kw: Any) -> jpeft.Method:
        return self.make(family, **kw)

    @property
    def has_deltas(self) -> bool:
        return self.method().has_deltas


def _f(n: int, what: str) -> tuple[str, str]:
    return ("xfail", f"issue 10 finding {n}: {what}")


def _new(what: str) -> tuple[str, str]:
    return ("xfail", f"new finding: {what}")


NO_PROFILE = ("error", r"no known architecture|profile")
ONE_AT_A_TIME = ("error", "prompt and prefix methods run one adapter at a time", r"one adapter at a time")
PARALLEL: dict[str, tuple[str, ...]] = {}  # mixed and drop_random re-run the block (Method.reenters)
REQUANTISE = (
    "error",
    "jpeft.merge into an INT base refuses (it would re-quantise); jpeft.quant.merge_requantized re-quantises and "
    "reports the error (tests/quant/test_int.py)",
    r"merging into the quantised kernel .* would re-quantise",
)
DROP_4 = ("error", "AdapterDrop with a prefix (a dropped layer would attend to the placeholders)", r"AdapterDrop is not supported with prefixes")

CASES: tuple[Case, ...] = (
    Case("LoRA", _lora(jpeft.LoRA), embedding=True),
    Case("rsLoRA", _lora(jpeft.LoRA, use_rslora=True), embedding=True),
    Case("DoRA", _lora(jpeft.DoRA), embedding=True, expect={"tied": ("error", "DoRA.*embedding|embedding.*DoRA")}),
    Case("LoRAFA", _lora(jpeft.LoRAFA), embedding=True),
    Case("LoRAPlus", _lora(jpeft.LoRAPlus, lr_ratio=16.0), embedding=True),
    Case(
        "AdaLoRA",
        lambda family, **kw: jpeft.AdaLoRA(
            **{"targets": LORA_TARGETS[family], "init_r": 3, "target_r": 2, "tinit": 2, "tfinal": 2, "total_step": 10, **kw}
        ),
        embedding=True,
    ),
    Case(
        "LoRADrop",
        _lora(jpeft.LoRADrop),
        embedding=True,
        expect={
            "mixed": ("error", "shared pairs are published by the root's call, not per row", r"adapter_index= \(a mixed batch\) is not supported"),
        },
    ),
    Case(
        "QLoRA",
        _lora(jpeft.QLoRA, quant=NF4, compute_dtype="float32"),
        setup="quantize",
    ),
    Case(
        "LoRA@Int8",
        lambda family, **kw: jpeft.on_quantized(
            jpeft.LoRA(**{"targets": LORA_TARGETS[family], "rank": R, "alpha": A, **kw}), compute_dtype="float32"
        ),
        setup="quantize",
        quant=INT8,
        expect={"tied": REQUANTISE},
    ),
    Case("IA3", _ia3),
    Case("BitFit", _fixed(jpeft.BitFit)),
    Case(
        "DiffPruning",
        lambda family, **kw: jpeft.DiffPruning(**{"targets": LORA_TARGETS[family], **kw}),
        embedding=True,
    ),
    Case("Freeze", lambda family, **kw: jpeft.Freeze(**{"trainable_layers": 1, **kw})),
    Case("Full", _fixed(jpeft.Full)),
    Case("PromptTuning", lambda family, **kw: jpeft.PromptTuning(**{"num_virtual_tokens": 2, **kw}), profile=True, expect={"mixed": ONE_AT_A_TIME}),
    Case("IntrinsicPrompt", lambda family, **kw: jpeft.IntrinsicPromptTuning(**{"dim": 4, "num_virtual_tokens": 2, **kw}), profile=True, expect={"mixed": ONE_AT_A_TIME}),
    Case("PTuning", lambda family, **kw: jpeft.PTuning(**{"num_virtual_tokens": 2, "encoder_hidden_size": 8, **kw}), profile=True, expect={"mixed": ONE_AT_A_TIME}),
    Case(
        "PrefixTuning",
        lambda family, **kw: jpeft.PrefixTuning(**{"num_virtual_tokens": 2, "projection_hidden_size": 8, **kw}),
        profile=True,
        expect={"mixed": ONE_AT_A_TIME, "drop_static": DROP_4, "drop_random": DROP_4},
    ),
    Case("PTuningV2", lambda family, **kw: jpeft.PTuningV2(**{"num_virtual_tokens": 2, **kw}), profile=True, expect={"mixed": ONE_AT_A_TIME, "drop_static": DROP_4, "drop_random": DROP_4}),
    Case("Houlsby", _fixed(lambda **kw: jpeft.HoulsbyAdapter(**{"reduction_factor": 8, **kw})), profile=True),
    Case("Pfeiffer", _fixed(lambda **kw: jpeft.PfeifferAdapter(**{"reduction_factor": 8, **kw})), profile=True),
    Case("Parallel", _fixed(lambda **kw: jpeft.ParallelAdapter(**{"bottleneck": 4, **kw})), profile=True, expect=PARALLEL),
    Case("ScaledParallel", _fixed(lambda **kw: jpeft.ScaledParallelAdapter(**{"bottleneck": 4, **kw})), profile=True, expect=PARALLEL),
    Case("MultiHeadParallel", _fixed(lambda **kw: jpeft.MultiHeadParallelAdapter(**{"bottleneck": 4, "num_heads": 2, **kw})), profile=True, expect=PARALLEL),
    Case(
        "AdapterFusion",
        _fixed(lambda **kw: jpeft.AdapterFusion(**{"adapters": FUSED, "adapter": jpeft.PfeifferAdapter(reduction_factor=8), **kw})),
        setup="fusion",
        profile=True,
    ),
    Case(
        "MAM",
        lambda family, **kw: jpeft.MAM(**{"prefix_tokens": 2, "adapter_bottleneck": 4, **kw}),
        profile=True,
        expect={
            "mixed": ONE_AT_A_TIME,
            "drop_static": DROP_4,
            "drop_random": DROP_4,
        },
    ),
    Case(
        "UniPELT",
        lambda family, **kw: jpeft.UniPELT(
            **{"lora_targets": LORA_TARGETS[family], "rank": R, "prefix_tokens": 2, "reduction_factor": 8, **kw}
        ),
        profile=True,
        expect={
            "mixed": ONE_AT_A_TIME,
            # sequence-mean gates (the paper's): a token's output depends on later tokens, so no cached decoding
            # equals the full-sequence model; force_open=True generates (tests/test_generate.py)
            "generate": ("error", r"generate\(UniPELT\): its gates average over the whole sequence"),
            "drop_static": DROP_4,
            "drop_random": DROP_4,
        },
    ),
    Case(
        "PromptEnsemble",
        lambda family, **kw: jpeft.PromptEnsemble(**{"k": 2, "num_virtual_tokens": 2, **kw}),
        profile=True,
        expect={
            "mixed": ("error", "the member axis is the ensemble's own mix of rows", r"adapter_index= \(a mixed batch\) is not supported"),
            "generate": ("error", "generate one member (PromptEnsemble.unstack)", r"the embedding ran without the ensemble's call"),
        },
    ),
    Case(
        "Prompt+LoRA",
        lambda family, **kw: jpeft.compose(
            jpeft.PromptTuning(num_virtual_tokens=2), jpeft.LoRA(targets=LORA_TARGETS[family], rank=R, alpha=A)
        ),
        profile=True,
        expect={
            "mixed": ONE_AT_A_TIME,
        },
    ),
    Case(
        "LST",
        lambda family, **kw: jpeft.LadderSideTuning(**{"num_heads": 4, "reduction": 4, **kw}),
        profile=True,
        expect={
            "mixed": ("error", "the side state passes from layer to layer within one call", r"adapter_index= \(a mixed batch\) is not supported"),
            "drop_static": ("error", "a dropped layer breaks the side network's chain", r"ran without the side state"),
            "generate": ("error", "the side network attends over the full sequence, no KV cache", r"cached decoding .* is not supported"),
        },
    ),
)
BY_NAME = {c.name: c for c in CASES}


BASE_ONLY = "trains base leaves, no deltas (`has_deltas=False`): asserted that apply adds none and wrap == the model"
PROFILE_ERROR = r"no known (architecture|family)|matches no known family"


def status(case: Case, feature: str) -> tuple[str, str, str]:
    """``(kind, detail, error)``: kind is ``'oracle'``, ``'error'``, ``'xfail'`` or ``'n/a'``; ``error``
    is the regex of the ``JpeftError`` the cell expects ('' for none)."""
    if feature in case.expect:
        kind, detail, *error = case.expect[feature]
        return (kind, detail, error[0] if error else (detail if kind == "error" else ""))
    if not case.has_deltas:
        if feature in ("named", "scan"):
            return ("n/a", BASE_ONLY, "")
        if feature == "mixed":
            return ("error", "a method without deltas has no adapters to mix", r"adapter_index=.*needs named delta adapters")
        if feature in ("drop_static", "drop_random"):
            return ("error", "a method without deltas has nothing to drop", r"drop_layers=/drop_random=.*trains base leaves")
    if feature == "scan" and case.profile:
        return ("error", "needs an architecture profile; the synthetic scan model has none", PROFILE_ERROR)
    if feature == "tied" and not case.has_deltas:
        return ("n/a", "no deltas: the lookup and the tied head read the one trained leaf (asserted: wrap == the model)", "")
    if feature == "tied" and not case.embedding:
        return ("n/a", "never targets an embedding (asserted: `wte` untouched, wrap == base on it)", "")
    return ("oracle", "", "")


def cell(case: Case, feature: str) -> str:
    """The table's text for one cell."""
    kind, detail, _ = status(case, feature)
    if kind == "error":
        return "error (tested)"
    if kind == "xfail":
        return "xfail: " + detail.split(":")[0].replace("issue 10 ", "")
    if kind == "n/a":
        return f"n/a: {detail}"
    return "oracle"
