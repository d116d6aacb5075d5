"""Invalid configurations drawn from just outside each method's valid space raise ``jpeft.JpeftError``.

Never a raw exception from JAX, Flax or Python, and before any tracing: method fields are checked by the
constructors (pure Python), and the tree-dependent checks of ``jpeft.apply`` run on trees whose leaves
are ``jax.ShapeDtypeStruct`` (no array to compute on), with a ``jax.monitoring`` listener asserting that
no jaxpr was traced during the call.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import re

import jax
import jax.numpy as jnp
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

import jpeft
from tests.properties import _strategies as S

_TRACES: list[str] = []
_ACTIVE = [False]


def _listen(event: str, *args, **kwargs) -> None:
    if _ACTIVE[0] and "trace" in event:
        _TRACES.append(event)


jax.monitoring.register_event_listener(_listen)
jax.monitoring.register_event_duration_secs_listener(_listen)
# jpeft.apply folds the key per target (one cached XLA computation on the key, not on the tree): warm it up
# so that the listener sees only computations on the tree's own shapes.
jax.random.fold_in(jax.random.key(0), 0)


@contextlib.contextmanager
def _raises_before_tracing():
    """Expects a ``JpeftError`` (exactly that type or a subclass) and no jaxpr traced meanwhile."""
    _TRACES.clear()
    _ACTIVE[0] = True
    try:
        with pytest.raises(jpeft.JpeftError) as info:
            yield info
    finally:
        _ACTIVE[0] = False
    assert issubclass(info.type, jpeft.JpeftError)
    assert str(info.value).strip(), "an empty message"
    assert not _TRACES, f"traced before raising: {_TRACES}"


NAN, INF = math.nan, math.inf
BAD_INTS = (0, -1, -8, True, False, 2.0, "8", None, INF)
BAD_POSITIVE = (0, 0.0, -0.5, -1, NAN, INF, -INF, True, "1", None)
BAD_PROBABILITY = (-0.01, 1.0, 1.5, NAN, INF, -INF, True, "0.1", None)
BAD_DTYPES = ("int32", "int8", "uint8", "bool", "complex64", "floaty", "i4", 3, ["float32"], object)
BAD_REGEX = ("(", "[a-", "*", "a{2,1}", "(?P<x>a)(?P<x>b)")
BAD_TARGETS = BAD_REGEX + ((), [], [""], [1], ("q", 2), 3, b"q", {"q"}, None)
BAD_FLAGS = (1, 0, "yes", None, 1.0)
BAD_LAYOUTS = (
    "conv",
    None,
    (("q", "dense", "x"),),
    (("(", "dense"),),
    (("q", "bogus"),),
    (("q", "conv:-1"),),
    ((".*", "dense_general:1"),),
)

LORA = {
    "rank": BAD_INTS,
    "alpha": BAD_POSITIVE,
    "dropout": BAD_PROBABILITY,
    "init": ("xavier", "", None, 1, ["kaiming"]),
    "use_rslora": BAD_FLAGS,
    "use_dora": BAD_FLAGS,
    "dtype": BAD_DTYPES,
    "targets": BAD_TARGETS,
    "layouts": BAD_LAYOUTS,
    "extra_trainable": BAD_REGEX + (3, ["x"]),
}
FIELDS: dict[str, tuple[object, dict]] = {
    "LoRA": (jpeft.LoRA, LORA),
    "DoRA": (jpeft.DoRA, {k: v for k, v in LORA.items() if k != "use_dora"}),
    "LoRAFA": (jpeft.LoRAFA, LORA),
    "LoRAPlus": (jpeft.LoRAPlus, {**LORA, "lr_ratio": BAD_POSITIVE}),
    "LoRADrop": (jpeft.LoRADrop, {**LORA, "keep": ("q", [1]), "scan_layers": BAD_REGEX, "freeze_a": BAD_FLAGS}),
    "AdaLoRA": (
        jpeft.AdaLoRA,
        {
            "targets": BAD_TARGETS,
            "init_r": BAD_INTS,
            "target_r": BAD_INTS + (13,),
            "total_step": BAD_INTS,
            "tinit": (-1, 1.5, True, "0", 10),
            "tfinal": (-1, 1.5, True, 10),
            "delta_t": BAD_INTS,
            "beta1": BAD_PROBABILITY,
            "beta2": BAD_PROBABILITY,
            "orth_reg_weight": (-0.1, NAN, INF, True, "0.5"),
            "alpha": BAD_POSITIVE,
            "dropout": BAD_PROBABILITY,
            "dtype": BAD_DTYPES,
        },
    ),
    "DiffPruning": (
        jpeft.DiffPruning,
        {
            "targets": BAD_TARGETS,
            "beta": BAD_POSITIVE,
            "gamma": (0, 0.0, 0.1, NAN, -INF, True, "-0.1"),
            "zeta": (1, 1.0, 0.5, NAN, INF, True, "1.1"),
            "log_alpha_init": (NAN, INF, -INF, True, "5"),
            "dtype": BAD_DTYPES,
        },
    ),
    "IA3": (jpeft.IA3, {"targets": BAD_TARGETS[:-1], "feedforward": BAD_TARGETS[:-1], "dtype": BAD_DTYPES}),
    "BitFit": (jpeft.BitFit, {"variant": ("some", None, ["all"]), "targets": BAD_TARGETS[:-1]}),
    "Freeze": (
        jpeft.Freeze,
        {
            "trainable_layers": (-1, True, 1.5, "1", None),
            "layer_pattern": BAD_REGEX + (r"layers/\d+", r"(a)(\d+)"),
            "scan_layers": BAD_REGEX,
        },
    ),
    "PromptTuning": (
        jpeft.PromptTuning,
        {"num_virtual_tokens": BAD_INTS, "dtype": BAD_DTYPES, "init": ("words", None), "profile": ("llama", 3)},
    ),
    "PTuning": (
        jpeft.PTuning,
        {"num_virtual_tokens": BAD_INTS, "encoder": ("gru", None), "encoder_hidden_size": BAD_INTS[:-2]},
    ),
    "PrefixTuning": (
        jpeft.PrefixTuning,
        {
            "num_virtual_tokens": BAD_INTS,
            "prefix_projection": BAD_FLAGS,
            "projection_hidden_size": BAD_INTS,
            "dtype": BAD_DTYPES,
        },
    ),
    "PTuningV2": (jpeft.PTuningV2, {"num_virtual_tokens": BAD_INTS, "dtype": BAD_DTYPES}),
    "Houlsby": (
        jpeft.HoulsbyAdapter,
        {"reduction_factor": BAD_INTS, "nonlinearity": ("sigmoid2", None, 1), "dtype": BAD_DTYPES},
    ),
    "Pfeiffer": (
        jpeft.PfeifferAdapter,
        {"reduction_factor": BAD_INTS, "nonlinearity": ("sigmoid2", None), "dtype": BAD_DTYPES},
    ),
    "Parallel": (jpeft.ParallelAdapter, {"bottleneck": BAD_INTS, "scaling": BAD_POSITIVE[:-1] + ("fixed",)}),
    "ScaledParallel": (jpeft.ScaledParallelAdapter, {"bottleneck": BAD_INTS, "scaling": BAD_POSITIVE}),
    "MultiHeadParallel": (jpeft.MultiHeadParallelAdapter, {"bottleneck": BAD_INTS, "num_heads": BAD_INTS}),
    "PromptEnsemble": (jpeft.PromptEnsemble, {"k": BAD_INTS, "num_virtual_tokens": BAD_INTS}),
    "MAM": (jpeft.MAM, {"prefix_tokens": BAD_INTS, "adapter_bottleneck": BAD_INTS, "adapter_scaling": BAD_POSITIVE}),
    "UniPELT": (
        jpeft.UniPELT,
        {"rank": BAD_INTS, "alpha": BAD_POSITIVE, "prefix_tokens": BAD_INTS, "force_open": BAD_FLAGS},
    ),
    "AdapterFusion": (
        jpeft.AdapterFusion,
        {"temperature": BAD_POSITIVE, "adapters": ((), "a", (1,)), "dtype": BAD_DTYPES},
    ),
}
VALID = {  # the fields each constructor needs; the drawn field replaces its entry
    "LoRA": {"targets": "q"},
    "DoRA": {"targets": "q"},
    "LoRAFA": {"targets": "q"},
    "LoRAPlus": {"targets": "q"},
    "LoRADrop": {"targets": "q"},
    "AdaLoRA": {"targets": "q", "total_step": 10, "init_r": 12, "target_r": 8},
    "DiffPruning": {"targets": "q"},
    "IA3": {"targets": ("q",)},
    "Freeze": {"trainable_layers": 1},
    "Parallel": {"bottleneck": 2},
    "ScaledParallel": {"bottleneck": 2},
    "MultiHeadParallel": {"bottleneck": 2, "num_heads": 2},
    "AdapterFusion": {"adapters": ("a", "b"), "adapter": jpeft.PfeifferAdapter()},
}


@st.composite
def bad_fields(draw):
    kind = draw(st.sampled_from(sorted(FIELDS)))
    cls, fields = FIELDS[kind]
    field = draw(st.sampled_from(sorted(fields)))
    return kind, field, draw(st.sampled_from(fields[field]))


@S.examples(300)
@given(bad_fields())
@example(("LoRA", "alpha", INF))  # regression: positive_number took inf (scale inf: every output inf or NaN)
@example(("LoRAPlus", "lr_ratio", INF))
@example(("DiffPruning", "zeta", INF))  # regression: an infinite stretch interval made every gate NaN
@example(("DiffPruning", "gamma", -INF))
@example(("AdaLoRA", "orth_reg_weight", INF))
@example(("AdapterFusion", "temperature", INF))
@example(("ScaledParallel", "scaling", INF))
def test_a_field_just_outside_its_valid_space_raises(case):
    kind, field, value = case
    cls = FIELDS[kind][0]
    with _raises_before_tracing() as info:
        cls(**{**VALID.get(kind, {}), field: value})
    assert field in str(info.value) or repr(value) in str(info.value), str(info.value)


def _shapes(tree):
    """The tree with ``jax.ShapeDtypeStruct`` leaves: apply's checks must need nothing but shapes and dtypes."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


@S.examples(25)
@given(S.generic_trees(), st.data())
def test_targets_that_match_nothing_raise(tree, data):
    names = {m.path[-1] for m in tree.modules} | {c for m in tree.modules for c in m.path}
    missing = data.draw(st.sampled_from(sorted(set(S.NAMES + ("nothere", "x")) - names)))
    partial = data.draw(
        st.sampled_from(sorted({m.path[-1][:-1] for m in tree.modules if len(m.path[-1]) > 1} - names) or ["zz"])
    )
    targets = data.draw(st.sampled_from((missing, (missing,), (partial,), ".*/" + missing, "")))
    cls = data.draw(st.sampled_from((jpeft.LoRA, jpeft.DoRA, jpeft.LoRAFA, jpeft.DiffPruning, jpeft.IA3)))
    method = cls(targets=targets) if cls is not jpeft.IA3 else jpeft.IA3(targets=targets)
    params, key = _shapes(tree.params), jax.random.key(0)
    with _raises_before_tracing() as info:
        jpeft.apply(method, params, key=key)
    assert "matched 0" in str(info.value)


@S.examples(25)
@given(
    S.generic_trees().flatmap(
        lambda t: st.tuples(st.just(t), S.weight_methods(t, ("LoRA", "LoRAFA", "DoRA", "AdaLoRA")))
    ),
    st.integers(1, 4),
)
def test_a_rank_larger_than_every_target_raises(tm, over):
    tree, drawn = tm
    field = "init_r" if drawn.kind == "AdaLoRA" else "rank"
    rank = max(m.rank_limit for m in drawn.targets) + over
    fields = {field: rank, "target_r": 1} if field == "init_r" else {field: rank}
    method = dataclasses.replace(drawn.method, **fields)
    params, key = _shapes(tree.params), jax.random.key(0)
    with _raises_before_tracing() as info:
        jpeft.apply(method, params, key=key)
    assert field in str(info.value) and str(rank) in str(info.value), str(info.value)


@S.examples(20)
@given(S.generic_trees(), st.data())
def test_method_tree_mismatches_raise(tree, data):
    """DoRA on embeddings only, LoRA on integer kernels, BitFit without biases, profile methods without a profile."""
    mods = list(tree.modules)
    case = data.draw(st.sampled_from(("dora_embed", "int_kernel", "bitfit_no_bias", "no_profile")))
    params = _shapes(tree.params)
    if case == "dora_embed":
        embeds = [m for m in mods if m.kind == "embed"] or [S.Module(("emb",), "embed", (), (5, 4), False, "float32")]
        params = {
            **params,
            **({} if embeds[0] in mods else {"emb": {"embedding": jax.ShapeDtypeStruct((5, 4), jnp.float32)}}),
        }
        method = jpeft.DoRA(targets="|".join(re.escape(m.joined) for m in embeds), rank=1)  # exactly the embeddings
    elif case == "int_kernel":
        dtype = data.draw(st.sampled_from(("int8", "int32", "uint8", "bool")))
        params = {**params, "quantised": {"kernel": jax.ShapeDtypeStruct((4, 4), dtype)}}
        method = jpeft.LoRA(targets=("quantised",), rank=1)
    elif case == "bitfit_no_bias":
        params = _drop_biases(params)
        method = jpeft.BitFit()
    else:
        method = data.draw(
            st.sampled_from(
                (
                    jpeft.PromptTuning(num_virtual_tokens=2),
                    jpeft.PrefixTuning(num_virtual_tokens=2),
                    jpeft.HoulsbyAdapter(reduction_factor=2),
                    jpeft.ParallelAdapter(bottleneck=2),
                    jpeft.IA3(),
                    jpeft.Freeze(trainable_layers=1),
                    jpeft.MAM(prefix_tokens=2),
                )
            )
        )
    key = jax.random.key(0)
    with _raises_before_tracing():
        jpeft.apply(method, params, key=key)


def _drop_biases(tree):
    if isinstance(tree, dict):
        return {k: _drop_biases(v) for k, v in tree.items() if k != "bias"}
    return tree


@S.examples(25)
@given(S.generic_trees(), S.bad_names)
def test_bad_adapter_names_raise(tree, name):
    linear = [m for m in tree.modules if m.linear]
    method = jpeft.LoRA(targets="|".join(re.escape(m.joined) for m in linear), rank=1, layouts=tree.layouts)
    params, key = _shapes(tree.params), jax.random.key(0)
    with _raises_before_tracing():
        jpeft.apply(method, params, key=key, name=name)


@S.examples(10)
@given(
    S.generic_trees(), st.sampled_from((None, 0, 3, "key", (1, 2), jnp.zeros(2, jnp.float32), jnp.zeros(3, jnp.uint32)))
)
def test_bad_keys_raise(tree, key):
    linear = [m for m in tree.modules if m.linear]
    method = jpeft.LoRA(targets="|".join(re.escape(m.joined) for m in linear), rank=1, layouts=tree.layouts)
    params = _shapes(tree.params)
    with _raises_before_tracing():
        jpeft.apply(method, params, key=key)


@S.examples(6)
@given(S.generic_trees().flatmap(lambda t: st.tuples(st.just(t), S.weight_methods(t))), S.names, S.names)
def test_unknown_and_duplicate_adapter_names_raise(tm, name, other):
    tree, drawn = tm
    peft = jpeft.apply(drawn.method, tree.params, key=jax.random.key(0), name=name)
    key = jax.random.key(1)
    if drawn.method.has_deltas:
        with _raises_before_tracing():
            jpeft.apply(drawn.method, peft, key=key, name=name)
    if other == name:
        return
    with _raises_before_tracing():
        jpeft.remove(peft, other)
    if drawn.method.has_deltas:
        with _raises_before_tracing():
            jpeft.merge(drawn.method, peft, name=other)
