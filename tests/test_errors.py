"""Every ``raise`` in jpeft's core, tree, layout, intercept, error, method and LoRA code, with its message.

Configuration and tree errors are raised eagerly, in Python: by a method's constructor or by
``jpeft.apply`` / ``merge`` / ``optimizer`` / ``combine``, with no ``jit`` involved. Only errors
that depend on the intercepted module (its type, its call) surface at the wrapped forward pass.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jpeft
from jpeft import JpeftError

KEY = jax.random.key(0)
X = jnp.ones((2, 4))


def tree() -> dict[str, Any]:
    """A Dense ``q`` (4 -> 4), a LayerNorm ``ln`` and an embedding ``emb``."""
    return {
        "q": {"kernel": jnp.ones((4, 4)), "bias": jnp.zeros(4)},
        "ln": {"scale": jnp.ones(4), "bias": jnp.zeros(4)},
        "emb": {"embedding": jnp.ones((10, 4))},
    }


def lora(**kw: Any) -> jpeft.LoRA:
    return jpeft.LoRA(**{"targets": ("q",), "rank": 2, **kw})


class Q(nn.Module):
    """Runs a submodule named ``q`` on its input."""

    layer: nn.Module

    def __call__(self, *args: Any, **kwargs: Any) -> jax.Array:
        return self.layer(*args, **kwargs)


def forward(layer: nn.Module, method: jpeft.Method, *args: Any, **kwargs: Any) -> Any:
    """Initialises ``Q(layer)``, applies ``method`` and runs the wrapped forward pass."""
    model = Q(layer)
    params = model.init(jax.random.key(1), *args, **kwargs)["params"]
    peft = jpeft.apply(method, params, key=KEY)
    return jpeft.wrap(model.apply, method)({"params": peft}, *args, **kwargs)


# --- jpeft/_errors.py: the shared field validators, through the constructors ------------------
@pytest.mark.parametrize("rank", [0, -1, True, 2.0, "2", None])
def test_rank_must_be_a_positive_int(rank):
    with pytest.raises(JpeftError, match=re.escape(f"LoRA(rank={rank!r}): rank must be a positive int; got {rank!r}.")):
        lora(rank=rank)


@pytest.mark.parametrize("alpha", [-1, 0, 0.0, True, "8", float("nan")])
def test_alpha_must_be_a_positive_number(alpha):
    with pytest.raises(JpeftError, match=re.escape(f"alpha must be a number > 0; got {alpha!r}")):
        lora(alpha=alpha)


def test_lr_ratio_must_be_a_positive_number():
    with pytest.raises(JpeftError, match=re.escape("LoRAPlus(lr_ratio=0): lr_ratio must be a number > 0")):
        jpeft.LoRAPlus(targets=("q",), lr_ratio=0)


@pytest.mark.parametrize("dropout", [1.0, 1, -0.1, True, "0.1"])
def test_dropout_must_be_a_probability(dropout):
    with pytest.raises(JpeftError, match=re.escape("dropout must be a float in [0, 1)")):
        lora(dropout=dropout)


def test_init_must_be_a_known_choice():
    with pytest.raises(
        JpeftError, match=re.escape("LoRA(init='x'): init must be one of ('kaiming', 'gaussian'); got 'x'.")
    ):
        lora(init="x")


def test_extra_trainable_must_be_a_regex_str():
    with pytest.raises(
        JpeftError, match=re.escape("LoRA(extra_trainable=5): extra_trainable must be a regex str; got int.")
    ):
        lora(extra_trainable=5)


def test_extra_trainable_must_compile():
    with pytest.raises(
        JpeftError, match=r"LoRA\(extra_trainable='\('\): not a valid regular expression .*re\.escape\(\)"
    ):
        lora(extra_trainable="(")


def test_layout_pattern_must_compile():
    with pytest.raises(JpeftError, match=r"LoRA\(layouts='\('\): not a valid regular expression"):
        lora(layouts=(("(", "dense"),))


# --- jpeft/methods/_lora.py: the remaining fields --------------------------------------------
@pytest.mark.parametrize("flag", ["use_rslora", "use_dora"])
def test_flags_must_be_bool(flag):
    with pytest.raises(JpeftError, match=re.escape(f"LoRA({flag}=1): {flag} must be a bool.")):
        lora(**{flag: 1})


@pytest.mark.parametrize("layouts", [(("q",),), 5, (("q", "dense", "x"),)])
def test_layouts_must_be_pairs(layouts):
    with pytest.raises(JpeftError, match=r"layouts must be a sequence of \(regex, layout\) pairs"):
        lora(layouts=layouts)


def test_layouts_must_name_a_known_kind():
    with pytest.raises(JpeftError, match=r"LoRA\(layouts=\.\.\.\): unknown layout 'diagonal' for 'q'\. Use 'dense'"):
        lora(layouts=(("q", "diagonal"),))


@pytest.mark.parametrize("spec", ["dense_general", "conv:x"])
def test_malformed_layout_spelling_is_refused_at_construction(spec):
    # STYLE.md: config fields are validated in __post_init__. A spelling with a known prefix but a
    # bad suffix must not wait until jpeft.apply.
    with pytest.raises(JpeftError, match=re.escape(repr(spec))):
        lora(layouts=(("q", spec),))


def test_malformed_layout_spelling_is_refused_before_tracing():
    with pytest.raises(JpeftError, match=r"(?i)unknown layout 'conv:x'"):
        jpeft.apply(lora(layouts=(("q", "conv:x"),)), tree(), key=KEY)


@pytest.mark.parametrize("dtype", ["int8", "foo", jnp.int32])
def test_dtype_must_be_float(dtype):
    with pytest.raises(JpeftError, match=r"LoRA\(dtype=.*\): dtype must name a float dtype, e\.g\. 'float32'\."):
        lora(dtype=dtype)


def test_dtype_is_normalised():
    assert lora(dtype=jnp.bfloat16).dtype == "bfloat16"


def test_rank_larger_than_the_layer():
    with pytest.raises(
        JpeftError, match=re.escape("LoRA(rank=5): q/kernel has shape (4, 4) (in (4,), out (4,)); rank must be <= 4.")
    ):
        jpeft.apply(lora(rank=5), tree(), key=KEY)


def test_rank_larger_than_a_stacked_layer():
    params = {"layers": {"q": {"kernel": jnp.ones((12, 8, 3))}}}  # 12 stacked (8, 3) kernels
    with pytest.raises(JpeftError, match=re.escape("has shape (12, 8, 3) (in (8,), out (3,)); rank must be <= 3")):
        jpeft.apply(lora(rank=4), params, key=KEY)


def test_non_float_kernel():
    params = {"q": {"kernel": jnp.ones((4, 4), jnp.int32)}}
    with pytest.raises(JpeftError, match=r"LoRA: q/kernel has dtype int32, expected a float kernel\. .*QLoRA"):
        jpeft.apply(lora(), params, key=KEY)


def test_dora_refuses_embeddings():
    with pytest.raises(JpeftError, match=r"DoRA\(use_dora=True\): 'emb' is an embedding; DoRA applies to linear"):
        jpeft.apply(jpeft.DoRA(targets=("emb",), rank=2), tree(), key=KEY)


def test_forward_layout_mismatch_names_layouts():
    # nn.Conv's kernel (3, 4, 5) defaults to 'dense' in the tree (a stack of 3 dense kernels); at the
    # forward pass the module says 'conv', and the message names the layouts= fix.
    with pytest.raises(
        JpeftError,
        match=r"at 'layer' \(Conv, kernel \(3, 4, 5\), layout 'conv:1'\).*layouts=\(\(r'layer', 'conv:1'\),\)",
    ):
        forward(nn.Conv(5, (3,)), jpeft.LoRA(targets=("layer",), rank=2), jnp.ones((2, 6, 4)))


# --- jpeft/_tree.py ----------------------------------------------------------------------------
def test_list_paths_needs_a_mapping():
    with pytest.raises(
        JpeftError, match=r"list_paths expects a nested mapping of arrays; got list\. Pass variables\['params'\]"
    ):
        jpeft.list_paths([jnp.ones(3)])


def test_targets_must_compile():
    with pytest.raises(JpeftError, match=r"LoRA\(targets='q\('\): not a valid regular expression"):
        jpeft.LoRA(targets="q(")


@pytest.mark.parametrize("targets", [5, [], [""], ["q", 3], None])
def test_targets_must_be_regex_or_suffixes(targets):
    with pytest.raises(JpeftError, match=r"targets must be a regex str over '/'-joined module paths"):
        jpeft.LoRA(targets=targets)


def test_target_matching_nothing_names_the_count_and_an_example():
    params = {
        "transformer": {"h": {"0": {"attn": {"c_attn": {"kernel": jnp.ones((4, 12))}}}}},
        "ln_f": {"scale": jnp.ones(4)},
    }
    with pytest.raises(JpeftError) as info:
        jpeft.apply(jpeft.LoRA(targets=".*/qkv"), params, key=KEY)
    message = str(info.value)
    assert message.startswith("LoRA(targets='.*/qkv') matched 0 of 2 module paths.\n")
    assert "'transformer/h/0/attn/c_attn'" in message and "jpeft.list_paths(params)" in message


def test_suffix_target_matching_nothing():
    with pytest.raises(JpeftError, match=re.escape("LoRA(targets=('query',)) matched 0 of 3 module paths")):
        jpeft.apply(jpeft.LoRA(targets=["query"]), tree(), key=KEY)


# --- jpeft/_layout.py --------------------------------------------------------------------------
def test_target_without_kernel():
    with pytest.raises(JpeftError, match=r"target 'ln' has leaves \['bias', 'scale'\] but no 'kernel' or 'embedding'"):
        jpeft.apply(lora(targets=("ln",)), tree(), key=KEY)


def test_layout_needs_its_leaf():
    with pytest.raises(
        JpeftError, match=r"layout 'embed' for 'q' needs a 'embedding' leaf; the module has \['bias', 'kernel'\]"
    ):
        jpeft.apply(lora(layouts=(("q", "embed"),)), tree(), key=KEY)


def test_bare_conv_layout_needs_rank_3():
    with pytest.raises(JpeftError, match=re.escape("Layout 'conv' needs a kernel of rank >= 3 (*window, c_in, c_out); got shape (4, 4).")):
        jpeft.apply(lora(layouts=(("q", "conv"),)), tree(), key=KEY)


def test_layout_needs_enough_axes():
    with pytest.raises(
        JpeftError, match=re.escape("q/kernel has shape (4, 4), but layout 'dense_general:2,2' needs at least 4 axes")
    ):
        jpeft.apply(lora(layouts=(("q", "dense_general:2,2"),)), tree(), key=KEY)


# --- jpeft/_core.py ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "call,where",
    [
        (lambda m: jpeft.apply(m, tree(), key=KEY), "jpeft.apply"),
        (lambda m: jpeft.wrap(nn.Dense(3).apply, m), "jpeft.wrap"),
        (lambda m: jpeft.merge(m, tree()), "jpeft.merge"),
        (lambda m: jpeft.labels(m, tree()), "jpeft.labels"),
        (lambda m: jpeft.optimizer(optax.adam(1e-3), m, tree()), "jpeft.optimizer"),
        (lambda m: jpeft.split(m, tree()), "jpeft.split"),
        (lambda m: jpeft.summary(m, tree()), "jpeft.summary"),
    ],
)
def test_method_must_be_a_method(call, where):
    with pytest.raises(
        JpeftError, match=re.escape(f"{where} expects a jpeft method such as jpeft.LoRA(targets=...); got str.")
    ):
        call("lora")


@pytest.mark.parametrize("params", [[1, 2], jnp.ones(3), None])
def test_params_must_be_a_mapping(params):
    with pytest.raises(
        JpeftError, match=r"jpeft.apply expects the 'params' collection as a nested mapping of arrays; got"
    ):
        jpeft.apply(lora(), params, key=KEY)


def test_variables_dict_instead_of_params():
    with pytest.raises(
        JpeftError,
        match=re.escape("jpeft.apply got a variables dict {'params': ...}; pass variables['params'] instead."),
    ):
        jpeft.apply(lora(), {"params": tree()}, key=KEY)
    with pytest.raises(JpeftError, match=r"jpeft.merge got a variables dict"):
        jpeft.merge(lora(), {"params": tree()})


@pytest.mark.parametrize("name", ["", "a/b", 5, None])
def test_adapter_name(name):
    with pytest.raises(JpeftError, match=re.escape(f"Adapter name must be a non-empty str without '/'; got {name!r}.")):
        jpeft.apply(lora(), tree(), key=KEY, name=name)


def test_wrap_active_name():
    with pytest.raises(JpeftError, match=r"Adapter name must be a non-empty str"):
        jpeft.wrap(nn.Dense(3).apply, lora(), active="")


@pytest.mark.parametrize("key", [0, None, np.zeros(2, np.uint32), jnp.ones(2), jnp.zeros(3, jnp.uint32)])
def test_key_must_be_a_jax_random_key(key):
    with pytest.raises(
        JpeftError, match=r"jpeft.apply\(key=.*\): key must be a jax.random key, e.g. key=jax.random.key\(0\)."
    ):
        jpeft.apply(lora(), tree(), key=key)


def test_key_accepts_typed_and_raw_keys():
    typed = jpeft.apply(lora(), tree(), key=jax.random.key(3))
    raw = jpeft.apply(lora(), tree(), key=jax.random.PRNGKey(3))
    assert typed["q"][jpeft.RESERVED]["default"]["lora_a"].shape == raw["q"][jpeft.RESERVED]["default"]["lora_a"].shape


def test_key_is_required():
    with pytest.raises(TypeError, match="key"):
        jpeft.apply(lora(), tree())  # no default seed is substituted


def test_duplicate_adapter_name():
    peft = jpeft.apply(lora(), tree(), key=KEY)
    with pytest.raises(JpeftError, match=r"jpeft.apply: adapter 'default' already exists at 'q'\. Pass another name="):
        jpeft.apply(lora(), peft, key=KEY)
    assert "other" in jpeft.apply(lora(), peft, key=KEY, name="other")["q"][jpeft.RESERVED]


def test_wrap_needs_a_callable():
    with pytest.raises(JpeftError, match=r"jpeft.wrap expects a callable apply function; got int\."):
        jpeft.wrap(5, lora())


def test_wrap_without_deltas():
    params = nn.Dense(4).init(KEY, X)["params"]
    wrapped = jpeft.wrap(nn.Dense(4).apply, jpeft.LoRA(targets=".*", rank=2))
    message = (
        r"jpeft.wrap\(LoRA\): variables\['params'\] holds no deltas of adapter 'default' \(it holds none\)\. "
        r"Call peft = jpeft.apply"
    )
    with pytest.raises(JpeftError, match=message):
        wrapped({"params": params}, X)
    peft = jpeft.apply(jpeft.LoRA(targets=".*", rank=2), params, key=KEY)
    with pytest.raises(JpeftError, match=message):
        wrapped(peft, X)  # the params tree itself, not {'params': peft}
    with pytest.raises(JpeftError, match=r"holds no deltas of adapter 'other'"):
        jpeft.wrap(nn.Dense(4).apply, jpeft.LoRA(targets=".*", rank=2), active="other")({"params": peft}, X)


def test_merge_without_deltas():
    with pytest.raises(
        JpeftError,
        match=r"jpeft.merge\(LoRA\): the tree holds no deltas of adapter 'default'\. Pass the tree returned by jpeft.apply",
    ):
        jpeft.merge(lora(), tree())
    peft = jpeft.apply(lora(), tree(), key=KEY)
    with pytest.raises(JpeftError, match=r"holds no deltas of adapter 'other'"):
        jpeft.merge(lora(), peft, name="other")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Activations(jpeft.Method):
    """A method that changes activations only, so it cannot be merged."""

    mergeable: ClassVar[bool] = False


def test_merge_of_a_non_mergeable_method():
    with pytest.raises(JpeftError, match=r"Activations cannot be merged into the base weights: it changes activations"):
        jpeft.merge(Activations(), tree())


def test_optimizer_needs_an_optax_transform():
    peft = jpeft.apply(lora(), tree(), key=KEY)
    with pytest.raises(JpeftError, match=r"jpeft.optimizer expects an optax.GradientTransformation first; got str\."):
        jpeft.optimizer("adam", lora(), peft)


def test_optimizer_with_no_trainable_leaf():
    with pytest.raises(
        JpeftError,
        match=r"jpeft.optimizer\(LoRA\): no leaf of the tree is trainable\. Pass the tree returned by jpeft.apply",
    ):
        jpeft.optimizer(optax.adam(1e-3), lora(), tree())
    # LoRA-FA on a tree whose only trainable leaf would be B, after split, is fine:
    method = jpeft.LoRAFA(targets=("q",), rank=2)
    trainable, _ = jpeft.split(method, jpeft.apply(method, tree(), key=KEY))
    jpeft.optimizer(optax.adam(1e-3), method, trainable)


def test_combine_keys_differ():
    with pytest.raises(
        JpeftError, match=re.escape("jpeft.combine: keys differ at '<root>': ['a', 'b']. Both halves must come")
    ):
        jpeft.combine({"a": 1}, {"b": 2})
    with pytest.raises(JpeftError, match=re.escape("keys differ at 'm/n': ['y']")):
        jpeft.combine({"m": {"n": {"x": 1, "y": None}}}, {"m": {"n": {"x": None}}})


def test_combine_both_halves_hold_a_leaf():
    with pytest.raises(
        JpeftError, match=re.escape("jpeft.combine: both halves hold a leaf at 'm/x'; expected exactly one.")
    ):
        jpeft.combine({"m": {"x": 1}}, {"m": {"x": 2}})


def test_combine_of_two_split_halves_from_different_methods():
    peft = jpeft.apply(jpeft.LoRA(targets=("q",), rank=2), tree(), key=KEY)
    trainable, _ = jpeft.split(jpeft.LoRA(targets=("q",), rank=2), peft)
    _, frozen_fa = jpeft.split(jpeft.LoRAFA(targets=("q",), rank=2), peft)
    with pytest.raises(JpeftError, match=r"both halves hold a leaf at 'q/__jpeft__/default/lora_a'"):
        jpeft.combine(trainable, frozen_fa)


# --- jpeft/_method.py --------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True, kw_only=True)
class Bare(jpeft.Method):
    """A method that overrides no structural hook."""

    def select(self, params: Any) -> list[tuple[str, ...]]:
        return [("q",)]


def test_bare_method_hooks_are_not_implemented():
    with pytest.raises(NotImplementedError):
        jpeft.apply(Bare(), tree(), key=KEY)
    with pytest.raises(NotImplementedError):
        Bare().param_count(tree())


# --- jpeft/_intercept.py -----------------------------------------------------------------------
class Unregistered(nn.Module):
    """A linear module with a 'kernel' that jpeft has no record of."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return x @ self.param("kernel", nn.initializers.normal(), (x.shape[-1], 3))


def test_unknown_module_type_names_register_linear():
    with pytest.raises(
        JpeftError,
        match=r"Module 'layer' of type .*Unregistered holds jpeft deltas, but jpeft has no layout .*jpeft.register_linear\(",
    ):
        forward(Unregistered(), jpeft.LoRA(targets=("layer",), rank=2), X)


class KeywordOnly(nn.Module):
    """A registered linear module whose input is a keyword argument jpeft cannot find."""

    @nn.compact
    def __call__(self, *, z: jax.Array) -> jax.Array:
        return z @ self.param("kernel", nn.initializers.normal(), (z.shape[-1], 3))


jpeft.register_linear(KeywordOnly, jpeft.Linear(jpeft.Layout("dense")))


def test_input_not_found():
    with pytest.raises(JpeftError, match=re.escape("cannot find a linear module's input among 0 positional args and kwargs ['z']. Register")):
        forward(KeywordOnly(), jpeft.LoRA(targets=("layer",), rank=2), z=X)


def test_register_linear_custom_input():
    # The fix the message above points to: tell jpeft where the input is.
    class KeywordDense(KeywordOnly):
        pass

    jpeft.register_linear(KeywordDense, jpeft.Linear(jpeft.Layout("dense"), inputs=lambda args, kwargs: kwargs["z"]))
    y = forward(KeywordDense(), jpeft.LoRA(targets=("layer",), rank=2), z=X)
    assert y.shape == (2, 3)


@pytest.mark.parametrize("module_type", [int, nn.Dense(3), "Dense", None])
def test_register_linear_needs_a_module_class(module_type):
    with pytest.raises(JpeftError, match=r"register_linear expects a flax.linen.Module or flax.nnx.Module subclass; got"):
        jpeft.register_linear(module_type, jpeft.Linear(jpeft.Layout("dense")))


def test_dense_general_batch_dims_is_refused():
    layer = nn.DenseGeneral(3, axis=-1, batch_dims=(0,))
    with pytest.raises(
        JpeftError,
        match=r"DenseGeneral at 'layer' has batch_dims=\(0,\); jpeft supports DenseGeneral without batch_dims only",
    ):
        forward(layer, jpeft.LoRA(targets=("layer",), rank=2), jnp.ones((2, 5, 4)))


def test_grouped_conv_is_refused():
    method = jpeft.LoRA(targets=("layer",), rank=2, layouts=(("layer", "conv"),))
    with pytest.raises(
        JpeftError, match=r"nn.Conv at 'layer' has feature_group_count=2; LoRA on grouped convolutions is not supported"
    ):
        forward(nn.Conv(4, (3,), feature_group_count=2), method, jnp.ones((2, 6, 4)))


def test_check_names_non_finite_delta_leaves():
    params = {"q": {"kernel": jnp.ones((4, 4))}}
    peft = jpeft.apply(jpeft.LoRA(targets=["q"], rank=2), params, key=jax.random.key(0))
    jpeft.check(peft)
    bad = jax.tree_util.tree_map_with_path(
        lambda p, x: x.at[0, 0].set(jnp.nan) if "lora_a" in str(p) else x, peft
    )
    with pytest.raises(jpeft.JpeftError, match=r"q/__jpeft__/default/lora_a \(4, 2\): 1 non-finite of 8"):
        jpeft.check(bad)
    with pytest.raises(jpeft.JpeftError, match="outside jax.jit"):
        jax.jit(jpeft.check)(peft)


@pytest.mark.parametrize("method", [jpeft.BitFit(), jpeft.Full()], ids=["bitfit", "full"])
def test_methods_without_deltas_refuse_adapterdrop_and_mixed_batches(method):
    """BitFit, Freeze and Full train base leaves in place: AdapterDrop and adapter_index= used to be
    silently ignored (or reached the model as an unknown keyword)."""
    model = nn.Dense(3)
    params = model.init(KEY, X)["params"]
    with pytest.raises(JpeftError, match=r"nothing to drop.*remove drop_layers="):
        jpeft.wrap(model.apply, method, drop_layers=[0])
    with pytest.raises(JpeftError, match=r"nothing to drop"):
        jpeft.wrap(model.apply, method, drop_random=2)
    apply_fn = jpeft.wrap(model.apply, method)
    with pytest.raises(JpeftError, match=r"adapter_index= \(a mixed batch\) needs named delta adapters"):
        apply_fn({"params": params}, X, adapter_index=jnp.zeros((2,), jnp.int32))
    np.testing.assert_array_equal(np.asarray(apply_fn({"params": params}, X)), np.asarray(model.apply({"params": params}, X)))
