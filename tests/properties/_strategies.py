"""Hypothesis strategies for the property tests: random parameter trees, method configurations and names.

Trees are plain nested dicts, as ``model.init(...)['params']`` gives them, with tiny shapes (dims 2-8):

* :func:`generic_trees`: 1-5 modules with random '/'-joined paths, each a dense ``kernel`` (with or
  without ``bias``), an ``embedding``, a 2-D convolution ``kernel (h, w, in, out)`` or a norm
  (``scale``, ``bias``; never a target), some under a stacked ``nn.scan`` group whose leaves carry a
  leading layer axis, in float32 or bfloat16 (per module). :class:`Tree` records what the strategy
  built, so the properties compute their expectations from it rather than from jpeft.
* :func:`profile_trees`: a Llama, BERT or GPT-2 tree with the paths of the HF Flax models (1-3
  layers, optionally under a task head), for the methods that find their sites through a profile.

:func:`weight_methods` and :func:`profile_methods` draw a method from each method's valid space for a
given tree. ``examples(n)`` is the settings of a property: deterministic (``derandomize=True``), no
deadline, ``n`` examples times ``JPEFT_HYPOTHESIS_SCALE`` (default 1; set it to 10 to hunt bugs
locally, and ``JPEFT_HYPOTHESIS_RANDOM=1`` for fresh random examples instead of the fixed sequence).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from typing import Any

import jax.numpy as jnp
import numpy as np
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

import jpeft

SCALE = float(os.environ.get("JPEFT_HYPOTHESIS_SCALE", "1"))
RANDOM = os.environ.get("JPEFT_HYPOTHESIS_RANDOM", "") not in ("", "0")

settings.register_profile(
    "jpeft-ci",
    deadline=None,
    derandomize=not RANDOM,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)
CI = settings.get_profile("jpeft-ci")


def examples(n: int) -> settings:
    """The settings of one property: the ``jpeft-ci`` profile with ``n * JPEFT_HYPOTHESIS_SCALE`` examples."""
    return settings(CI, max_examples=max(1, round(n * SCALE)))


DTYPES = ("float32", "bfloat16")
NAMES = ("q", "k", "v", "o", "up", "down", "proj", "wte", "conv", "mix", "gate", "ln")
GROUPS = ((), ("enc",), ("dec", "blk"), ("stack",))
STACKED = ("stack",)
"""Modules under this group carry a leading layer axis (``nn.scan``'s ``variable_axes={'params': 0}``)."""

dims = st.sampled_from((2, 3, 4))
windows = st.sampled_from((1, 2))
"""Tiny dims from a small set (profile trees add 8): every new shape costs eager XLA compiles (initialisers, merges)."""


@dataclasses.dataclass(frozen=True)
class Module:
    """One module the strategy built: its path, kind, layer axes, core kernel shape and dtype."""

    path: tuple[str, ...]
    kind: str  # 'dense', 'embed', 'conv' or 'norm'
    stack: tuple[int, ...]
    core: tuple[int, ...]
    bias: bool
    dtype: str
    out_axis: int = -1  # the kernel's output axis: 0 for GPT-2's (out, in) FlaxConv1D

    @property
    def joined(self) -> str:
        return "/".join(self.path)

    def __repr__(self) -> str:
        bias = "+bias" if self.bias else ""
        return f"{self.kind}{bias}:{self.joined}{self.stack + self.core}:{self.dtype}"

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:
        p.text(repr(self))

    @property
    def leaf(self) -> str:
        return "embedding" if self.kind == "embed" else "kernel"

    @property
    def fan(self) -> tuple[int, int]:
        """``(d_in, d_out)`` as LoRA sees them: a conv's input is its window times its channels."""
        return math.prod(self.core[:-1]), self.core[-1]

    @property
    def rank_limit(self) -> int:
        return min(self.fan)

    @property
    def linear(self) -> bool:
        return self.kind != "norm"


@dataclasses.dataclass(frozen=True)
class Tree:
    """A random parameter tree and what it holds."""

    params: dict[str, Any]
    modules: tuple[Module, ...]
    family: str = "generic"
    layers: int = 0

    @property
    def layouts(self) -> tuple[tuple[str, str], ...]:
        """The layout overrides the conv modules need (``conv:2``: two window axes, the rest stack)."""
        return tuple((re.escape(m.joined), "conv:2") for m in self.modules if m.kind == "conv")

    def __repr__(self) -> str:
        return f"Tree({self.family}, layers={self.layers}, modules={list(self.modules)})"

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:
        p.text(repr(self))

    def base_paths(self) -> dict[tuple[str, ...], Any]:
        return {p: x for p, x in leaves(self.params)}


def leaves(tree: Any, prefix: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], Any]]:
    """``(path, leaf)`` of a nested dict, in key order; ``None`` holes included (an independent walk)."""
    if isinstance(tree, dict):
        return [pl for k in sorted(tree) for pl in leaves(tree[k], prefix + (k,))]
    return [(prefix, tree)]


def _array(rng: np.random.RandomState, shape: tuple[int, ...], dtype: str, scale: float = 0.5) -> Any:
    return jnp.asarray(scale * rng.standard_normal(shape), dtype)


def _module_leaves(m: Module, rng: np.random.RandomState) -> dict[str, Any]:
    if m.kind == "norm":
        return {"scale": _array(rng, m.stack + m.core, m.dtype), "bias": _array(rng, m.stack + m.core, m.dtype)}
    out = {m.leaf: _array(rng, m.stack + m.core, m.dtype)}
    if m.bias:
        out["bias"] = _array(rng, m.stack + (m.core[m.out_axis],), m.dtype)
    return out


def build(modules: list[Module], seed: int, family: str = "generic", layers: int = 0) -> Tree:
    """The plain-dict tree of ``modules`` with seeded random values."""
    rng = np.random.RandomState(seed)
    params: dict[str, Any] = {}
    for m in modules:
        node = params
        for k in m.path:
            node = node.setdefault(k, {})
        node.update(_module_leaves(m, rng))
    return Tree(params, tuple(modules), family, layers)


@st.composite
def modules(draw: Any) -> Module:
    group = draw(st.sampled_from(GROUPS))
    name = draw(st.sampled_from(NAMES))
    kind = draw(st.sampled_from(("dense", "dense", "embed", "conv", "norm")))
    dtype = draw(st.sampled_from(DTYPES))
    if kind == "conv":
        core = (draw(windows), draw(windows), draw(dims), draw(dims))
    elif kind == "norm":
        core = (draw(dims),)
    else:
        core = (draw(dims), draw(dims))
    return Module(group + (name,), kind, (), core, kind in ("dense", "conv") and draw(st.booleans()), dtype)


@st.composite
def generic_trees(draw: Any, min_linear: int = 1) -> Tree:
    """A random tree of 1-5 modules (at least ``min_linear`` linear ones), some stacked."""
    mods = draw(st.lists(modules(), min_size=1, max_size=5, unique_by=lambda m: m.path))
    if sum(m.linear for m in mods) < min_linear:
        mods.append(draw(modules().filter(lambda m: m.linear and m.path not in {n.path for n in mods})))
    layers = draw(st.integers(1, 2))
    mods = [dataclasses.replace(m, stack=(layers,) if m.path[: len(STACKED)] == STACKED else ()) for m in mods]
    return build(mods, draw(st.integers(0, 2**16)), layers=layers)


def _llama(L: int, D: int, F: int, V: int, head: bool, dtype: str) -> list[Module]:
    pre = ("model",) if head else ()
    out = [Module(pre + ("embed_tokens",), "embed", (), (V, D), False, dtype)]
    for i in range(L):
        at = pre + ("layers", str(i))
        out += [
            Module(at + ("self_attn", n), "dense", (), (D, D), False, dtype)
            for n in ("q_proj", "k_proj", "v_proj", "o_proj")
        ]
        out += [Module(at + ("mlp", n), "dense", (), (D, F), False, dtype) for n in ("gate_proj", "up_proj")]
        out += [Module(at + ("mlp", "down_proj"), "dense", (), (F, D), False, dtype)]
    return out + ([Module(("lm_head",), "dense", (), (D, V), False, dtype)] if head else [])


def _bert(L: int, D: int, F: int, V: int, head: bool, dtype: str) -> list[Module]:
    pre = ("bert",) if head else ()
    out = [Module(pre + ("embeddings", "word_embeddings"), "embed", (), (V, D), False, dtype)]
    out += [Module(pre + ("embeddings", "LayerNorm"), "norm", (), (D,), False, dtype)]
    for i in range(L):
        at = pre + ("encoder", "layer", str(i))
        out += [
            Module(at + ("attention", "self", n), "dense", (), (D, D), True, dtype) for n in ("query", "key", "value")
        ]
        out += [Module(at + ("attention", "output", "dense"), "dense", (), (D, D), True, dtype)]
        out += [Module(at + ("attention", "output", "LayerNorm"), "norm", (), (D,), False, dtype)]
        out += [Module(at + ("intermediate", "dense"), "dense", (), (D, F), True, dtype)]
        out += [Module(at + ("output", "dense"), "dense", (), (F, D), True, dtype)]
        out += [Module(at + ("output", "LayerNorm"), "norm", (), (D,), False, dtype)]
    return out + ([Module(("classifier",), "dense", (), (D, 2), True, dtype)] if head else [])


def _gpt2(L: int, D: int, F: int, V: int, head: bool, dtype: str) -> list[Module]:
    # FlaxConv1D kernels are (out, in): the GPT-2 profile's 'transposed' layout. Module.fan is for (in, out)
    # kernels, so the properties never draw LoRA ranks from these; the profile methods size themselves.
    pre = ("transformer",)
    out = [
        Module(pre + ("wte",), "embed", (), (V, D), False, dtype),
        Module(pre + ("wpe",), "embed", (), (V, D), False, dtype),
    ]
    for i in range(L):
        at = pre + ("h", str(i))
        out += [Module(at + ("ln_1",), "norm", (), (D,), False, dtype)]
        out += [Module(at + ("attn", "c_attn"), "dense", (), (3 * D, D), True, dtype, 0)]
        out += [Module(at + ("attn", "c_proj"), "dense", (), (D, D), True, dtype, 0)]
        out += [Module(at + ("mlp", "c_fc"), "dense", (), (F, D), True, dtype, 0)]
        out += [Module(at + ("mlp", "c_proj"), "dense", (), (D, F), True, dtype, 0)]
    out += [Module(pre + ("ln_f",), "norm", (), (D,), False, dtype)]
    return out + ([Module(("score",), "dense", (), (D, 2), False, dtype)] if head else [])


FAMILIES = {"llama": _llama, "bert": _bert, "gpt2": _gpt2}


@st.composite
def profile_trees(draw: Any, families: tuple[str, ...] = tuple(FAMILIES)) -> Tree:
    """A tiny Llama, BERT or GPT-2 tree with the HF Flax paths, in float32 or bfloat16."""
    family = draw(st.sampled_from(families))
    L = draw(st.integers(1, 3))
    D = draw(st.sampled_from((4, 8)))
    F, V = draw(st.sampled_from((4, 8))), draw(st.sampled_from((3, 5)))
    mods = FAMILIES[family](L, D, F, V, draw(st.booleans()), draw(st.sampled_from(DTYPES)))
    return build(mods, draw(st.integers(0, 2**16)), family, L)


# --- method configurations ---------------------------------------------------------------------------------
alphas = st.floats(0.01, 64.0, allow_nan=False, allow_infinity=False)
dropouts = st.sampled_from((0.0, 0.0, 0.1, 0.5, 0.95))
delta_dtypes = st.sampled_from((None, None, "float32", "bfloat16"))


@st.composite
def targets_for(draw: Any, chosen: list[Module], tree: Tree) -> Any:
    """``targets`` that select exactly ``chosen``: a regex, or a sequence of suffixes (unique last names, or
    full paths), each used only where it ends no other module's path at a '/' boundary."""
    form = draw(st.sampled_from(("regex", "paths", "names")))

    def only(suffix: str, m: Module) -> bool:
        return all(n is m or not (n.joined == suffix or n.joined.endswith("/" + suffix)) for n in tree.modules)

    if form == "names" and all(only(m.path[-1], m) for m in chosen):
        return tuple(m.path[-1] for m in chosen)
    if form != "regex" and all(only(m.joined, m) for m in chosen):
        return tuple(m.joined for m in chosen)
    return "|".join(re.escape(m.joined) for m in chosen)


@st.composite
def extra_trainable(draw: Any, tree: Tree, chosen: list[Module]) -> tuple[str | None, set[tuple[str, ...]]]:
    """``None`` or a regex over some base leaves that are not targets, and the leaf paths it selects."""
    others = [m for m in tree.modules if m not in chosen]
    if not others or draw(st.booleans()):
        return None, set()
    m = draw(st.sampled_from(others))
    picked = {m.path + (k,) for k in _module_leaves(m, np.random.RandomState(0))}
    return re.escape(m.joined) + "/.*", picked


WEIGHT_KINDS = (
    "LoRA",
    "rsLoRA",
    "DoRA",
    "LoRAFA",
    "LoRAPlus",
    "LoRADrop",
    "AdaLoRA",
    "DiffPruning",
    "IA3",
    "BitFit",
    "Full",
)


@dataclasses.dataclass(frozen=True)
class Drawn:
    """A method drawn for a tree, with what the strategy expects of it."""

    method: jpeft.Method
    kind: str
    targets: tuple[Module, ...]
    trained_base: frozenset[tuple[str, ...]]  # base leaf paths the method itself trains (BitFit, Full)
    extra: frozenset[tuple[str, ...]]  # base leaf paths extra_trainable selects

    def __repr__(self) -> str:
        return f"Drawn({self.kind}: {self.method!r})"

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:
        p.text(repr(self))


@st.composite
def weight_methods(draw: Any, tree: Tree, kinds: tuple[str, ...] = WEIGHT_KINDS) -> Drawn:
    """A weight method (LoRA family, AdaLoRA, diff pruning, (IA)^3, BitFit, Full) valid for a generic tree."""
    kind = draw(st.sampled_from(kinds))
    linear = [m for m in tree.modules if m.linear]
    if kind == "DoRA" or kind == "IA3":
        linear = [m for m in linear if m.kind != "embed"] or linear
        if not any(m.kind != "embed" for m in linear):
            kind = "LoRA"
    if kind == "BitFit":
        with_bias = [m for m in tree.modules if m.bias or m.kind == "norm"]
        if not with_bias:
            kind = "Full"
    if kind == "Full":
        return Drawn(jpeft.Full(), kind, (), frozenset(tree.base_paths()), frozenset())
    if kind == "BitFit":
        chosen = draw(st.lists(st.sampled_from(with_bias), min_size=1, max_size=len(with_bias), unique=True))
        extra, picked = draw(extra_trainable(tree, chosen))
        every = draw(st.booleans()) and len(chosen) == len(with_bias)
        targets = None if every else draw(targets_for(chosen, tree))
        biases = frozenset(m.path + ("bias",) for m in (with_bias if every else chosen))
        return Drawn(jpeft.BitFit(targets=targets, extra_trainable=extra), kind, (), biases, frozenset(picked))
    chosen = draw(st.lists(st.sampled_from(linear), min_size=1, max_size=len(linear), unique=True))
    targets = draw(targets_for(chosen, tree))
    extra, picked = draw(extra_trainable(tree, chosen))
    limit = min(m.rank_limit for m in chosen)
    common = {"targets": targets, "layouts": tree.layouts, "dtype": draw(delta_dtypes), "extra_trainable": extra}
    if kind == "IA3":
        ff = draw(st.lists(st.sampled_from(chosen), max_size=len(chosen), unique=True))
        method = jpeft.IA3(**common, feedforward="|".join(re.escape(m.joined) for m in ff) or None)  # exactly ff
    elif kind == "DiffPruning":
        method = jpeft.DiffPruning(
            **common,
            beta=draw(st.floats(0.05, 2.0)),
            gamma=draw(st.floats(-1.0, -0.01)),
            zeta=draw(st.floats(1.01, 2.0)),
            log_alpha_init=draw(st.floats(-5.0, 5.0)),
        )
    elif kind == "AdaLoRA":
        init_r = draw(st.integers(1, limit))
        total = draw(st.integers(2, 20))
        tinit = draw(st.integers(0, total - 1))
        method = jpeft.AdaLoRA(
            **common,
            init_r=init_r,
            target_r=draw(st.integers(1, init_r)),
            total_step=total,
            tinit=tinit,
            tfinal=draw(st.integers(0, total - 1 - tinit)),
            delta_t=draw(st.integers(1, 4)),
            alpha=draw(alphas),
            dropout=draw(dropouts),
            beta1=draw(st.floats(0.0, 0.99)),
            beta2=draw(st.floats(0.0, 0.99)),
            orth_reg_weight=draw(st.floats(0.0, 2.0)),
        )
    else:
        lora = {
            "rank": draw(st.integers(1, limit)),
            "alpha": draw(alphas),
            "dropout": draw(dropouts),
            "init": draw(st.sampled_from(("kaiming", "gaussian"))),
            "use_rslora": kind == "rsLoRA" or draw(st.booleans()),
            "use_dora": kind == "DoRA",
        }
        if kind == "DoRA":
            chosen = [m for m in chosen if m.kind != "embed"] or [m for m in linear if m.kind != "embed"][:1]
            common["targets"] = draw(targets_for(chosen, tree))
            lora["rank"] = min(lora["rank"], min(m.rank_limit for m in chosen))
        cls = {"LoRAFA": jpeft.LoRAFA, "LoRAPlus": jpeft.LoRAPlus, "LoRADrop": jpeft.LoRADrop}.get(kind, jpeft.LoRA)
        if kind == "LoRAPlus":
            lora["lr_ratio"] = draw(st.floats(0.5, 32.0))
        if kind == "LoRADrop":
            lora.update(_lora_drop_fields(draw, chosen))
        method = cls(**common, **lora)
    return Drawn(method, kind, tuple(chosen), frozenset(), frozenset(picked))


def _lora_drop_fields(draw: Any, chosen: list[Module]) -> dict[str, Any]:
    """``keep`` and ``scan_layers`` for LoRA-drop: stacked targets are named by ``scan_layers`` (with kept
    slices ``path[i]``); unkept unstacked targets share one pair per last name, so such a group must have
    one kernel shape (a target that would mix shapes is kept)."""
    stacked = [m for m in chosen if m.stack]
    keep, shapes = [], {}
    for m in chosen:
        if m.stack:
            keep += [f"{m.joined}[{i}]" for i in range(m.stack[0]) if draw(st.booleans())]
        elif draw(st.booleans()) or shapes.setdefault(m.path[-1], m.stack + m.core) != m.stack + m.core:
            keep.append(m.joined)
    scan = "|".join(re.escape(m.joined) for m in stacked) or None
    return {"keep": tuple(keep), "scan_layers": scan, "use_rslora": False, "use_dora": False}


PROFILE_KINDS = (
    "PromptTuning",
    "PTuning",
    "PrefixTuning",
    "PTuningV2",
    "Houlsby",
    "Pfeiffer",
    "Parallel",
    "ScaledParallel",
    "MultiHeadParallel",
    "IA3",
    "Freeze",
    "BitFitQF",
    "MAM",
    "UniPELT",
    "PromptEnsemble",
    "LoRADefault",
)


def _layer_of(path: tuple[str, ...]) -> int | None:
    for a, b in zip(path, path[1:], strict=False):
        if a in ("layers", "layer", "h") and b.isdigit():
            return int(b)
    return None


@st.composite
def profile_methods(draw: Any, tree: Tree, kinds: tuple[str, ...] = PROFILE_KINDS) -> Drawn:
    """A method that finds its sites through the tree's profile, with fields from its valid space."""
    kind = draw(st.sampled_from(kinds))
    d = min(m.core[-1] for m in tree.modules if m.kind == "embed")
    if kind == "BitFitQF" and tree.family != "bert":  # GPT-2 fuses qkv, Llama has no biases
        kind = "Freeze"
    dtype = draw(delta_dtypes)
    P = draw(st.integers(1, 3))
    trained: frozenset[tuple[str, ...]] = frozenset()
    if kind == "PromptTuning":
        method = jpeft.PromptTuning(num_virtual_tokens=P, dtype=dtype)
    elif kind == "PromptEnsemble":
        method = jpeft.PromptEnsemble(num_virtual_tokens=P, k=draw(st.integers(1, 3)), dtype=dtype)
    elif kind == "PTuning":
        method = jpeft.PTuning(
            num_virtual_tokens=P,
            encoder=draw(st.sampled_from(("mlp", "lstm"))),
            encoder_hidden_size=draw(st.one_of(st.none(), st.integers(1, 8))),
            dtype=dtype,
        )
    elif kind == "PrefixTuning":
        method = jpeft.PrefixTuning(
            num_virtual_tokens=P,
            prefix_projection=draw(st.booleans()),
            projection_hidden_size=draw(st.integers(1, 8)),
            dtype=dtype,
        )
    elif kind == "PTuningV2":
        method = jpeft.PTuningV2(num_virtual_tokens=P, dtype=dtype)
    elif kind in ("Houlsby", "Pfeiffer"):
        cls = jpeft.HoulsbyAdapter if kind == "Houlsby" else jpeft.PfeifferAdapter
        method = cls(
            reduction_factor=draw(st.integers(1, d)),
            nonlinearity=draw(st.sampled_from(("relu", "swish", "gelu", "tanh"))),
            dtype=dtype,
        )
    elif kind in ("Parallel", "ScaledParallel"):
        cls = jpeft.ParallelAdapter if kind == "Parallel" else jpeft.ScaledParallelAdapter
        method = cls(bottleneck=draw(st.integers(1, 8)), scaling=draw(st.floats(0.1, 8.0)), dtype=dtype)
    elif kind == "MultiHeadParallel":
        heads = draw(st.sampled_from([h for h in (1, 2, 4) if d % h == 0]))
        method = jpeft.MultiHeadParallelAdapter(
            bottleneck=heads * draw(st.integers(1, 2)), num_heads=heads, dtype=dtype
        )
    elif kind == "IA3":
        method = jpeft.IA3(dtype=dtype)
    elif kind == "Freeze":
        k = draw(st.integers(0, tree.layers))
        method = jpeft.Freeze(trainable_layers=k)
        top = set(range(tree.layers - k, tree.layers))
        trained = frozenset(p for p in tree.base_paths() if _layer_of(p) in top)
    elif kind == "BitFitQF":
        method = jpeft.BitFit(variant="query_ffn")
        trained = frozenset(
            p
            for p in tree.base_paths()
            if p[-4:] == ("attention", "self", "query", "bias") or p[-3:] == ("intermediate", "dense", "bias")
        )
    elif kind == "MAM":
        method = jpeft.MAM(
            prefix_tokens=P, adapter_bottleneck=draw(st.integers(1, 8)), adapter_scaling=draw(st.floats(0.5, 8.0))
        )
    elif kind == "UniPELT":
        method = jpeft.UniPELT(
            lora_targets=_lora_default(tree),
            rank=draw(st.integers(1, 2)),
            alpha=draw(alphas),
            prefix_tokens=P,
            reduction_factor=draw(st.integers(1, d)),
            force_open=draw(st.booleans()),
        )
    else:  # LoRADefault: LoRA on the profile's default targets (GPT-2's transposed c_attn included)
        method = jpeft.LoRA(targets=_lora_default(tree), rank=draw(st.integers(1, 2)), alpha=draw(alphas), dtype=dtype)
    return Drawn(method, kind, (), trained, frozenset())


def _lora_default(tree: Tree) -> tuple[str, ...]:
    return {"bert": jpeft.profiles.BERT, "gpt2": jpeft.profiles.GPT2, "llama": jpeft.profiles.LLAMA}[
        tree.family
    ].lora_default


# --- adapter names -------------------------------------------------------------------------------------------
names = st.text(
    alphabet=st.characters(codec="utf-8", exclude_characters="/", exclude_categories=("Cs",)), min_size=1, max_size=12
)
"""Valid adapter names: any non-empty str without '/' (unicode, spaces and dots included)."""

bad_names = st.one_of(
    st.just(""),
    st.text(min_size=0, max_size=5).map(lambda s: s + "/" + s),
    st.sampled_from((None, 3, b"x", ("a",))),
)
"""Invalid adapter names: empty, containing '/', or not a str."""
