"""Bad inputs of the ``flax.nnx`` backend: each raises a clear ``JpeftError`` before tracing.

Rows 55-69 of the catalogue (69, an einsum jpeft cannot factor, is in ``test_nnx_layers.py``) in ``tests/README.md``.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from flax import nnx

import jpeft
from jpeft import JpeftError

KEY = jax.random.key(0)
X = jnp.ones((2, 4))


class Custom(nnx.Module):
    """A linear layer of a type jpeft has no layout for (no einsum string, kernel not named ``kernel``)."""

    def __init__(self, rngs: nnx.Rngs):
        self.weight = nnx.Param(jax.random.normal(rngs.params(), (4, 3)))

    def __call__(self, x: jax.Array) -> jax.Array:
        return x @ self.weight[...]


class Net(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.proj = Custom(rngs)
        self.ln = nnx.LayerNorm(3, rngs=rngs)
        self.lin = nnx.Linear(4, 3, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.ln(self.proj(x)) + self.lin(x)


def lora(targets=("lin",), **kw) -> jpeft.LoRA:
    return jpeft.LoRA(targets=targets, rank=2, **kw)


@pytest.fixture(scope="module")
def peft() -> nnx.Module:
    return jpeft.apply(lora(), Net(nnx.Rngs(0)), key=KEY, name="a")


# 55: not a model and not a tree
@pytest.mark.parametrize("obj", [object(), 3, "model"])
def test_apply_to_an_object_that_is_neither_a_module_nor_a_tree(obj):
    with pytest.raises(
        JpeftError, match=r"jpeft.apply expects the 'params' collection .* or a flax.nnx.Module instance"
    ):
        jpeft.apply(lora(), obj, key=KEY)


def test_apply_to_an_nnx_class():
    with pytest.raises(JpeftError, match=r"got the NNX class Linear, not a model. Pass an instance"):
        jpeft.apply(lora(), nnx.Linear, key=KEY)


def test_apply_to_a_linen_module_object():
    with pytest.raises(JpeftError, match=r"got a flax.linen module object \(Dense\), which holds no weights"):
        jpeft.apply(lora(), nn.Dense(3), key=KEY)


# 56: a target whose NNX type has no layout
@pytest.mark.parametrize(
    ("target", "kind"),
    [("proj", r"tests\.test_nnx_errors\.Custom"), ("ln", r"flax\.nnx\.nn\.normalization\.LayerNorm")],
)
def test_target_of_an_nnx_type_without_a_layout(target, kind):
    with pytest.raises(
        JpeftError,
        match=rf"LoRA: target '{target}' \({kind}\) is not an NNX module type jpeft knows a layout for\. .*"
        r"jpeft\.register_linear\(T, jpeft\.Linear\(jpeft\.Layout\('dense'\), weight=\.\.\.\)\)",
    ):
        jpeft.apply(lora((target,)), Net(nnx.Rngs(0)), key=KEY)


# 57: the same adapter name twice
def test_apply_twice_under_one_name(peft):
    with pytest.raises(JpeftError, match=r"adapter 'a' already exists at 'lin'\. Pass another name="):
        jpeft.apply(lora(), peft, key=KEY, name="a")
    jpeft.apply(lora(), peft, key=KEY, name="b")  # another name is fine


# 58: set_adapter with names the model does not hold
@pytest.mark.parametrize("active", ["b", (), ("a", "a"), ("a", "zz")])
def test_set_adapter_with_unknown_names(peft, active):
    with pytest.raises(JpeftError, match=r"jpeft.set_adapter\(active=.*\): the model holds adapters \['a'\]"):
        jpeft.set_adapter(peft, active)


def test_set_adapter_on_a_model_without_adapters():
    with pytest.raises(JpeftError, match=r"the model holds adapters none"):
        jpeft.set_adapter(Net(nnx.Rngs(0)), "a")


# 59: set_adapter and call on something that is not an NNX model
@pytest.mark.parametrize("fn", [lambda m: jpeft.set_adapter(m, "a"), lambda m: jpeft.call(m, X)])
def test_set_adapter_and_call_need_an_nnx_model(fn):
    with pytest.raises(JpeftError, match=r"expects a flax.nnx.Module returned by jpeft.apply; got dict\. For linen"):
        fn({"lin": {"kernel": jnp.ones((4, 3))}})


# 60: call with unknown adapter names
def test_call_with_unknown_names(peft):
    with pytest.raises(JpeftError, match=r"jpeft.call\(active='b'\): the model holds adapters \['a'\]"):
        jpeft.call(peft, X, active="b")


# 61: call with a bad adapter_index
@pytest.mark.parametrize(
    ("index", "message"),
    [
        (jnp.array([[0, 0]]), r"must be a 1-D int array, .* got ArrayImpl with shape \(1, 2\) and dtype int32"),
        (jnp.array([0.0, 1.0]), r"must be a 1-D int array, .* got ArrayImpl with shape \(2,\) and dtype float32"),
        ([0, 0], r"must be a 1-D int array, .* got list"),
        (jnp.array([0, 0, 0]), r"has 3 entries but the batch has 2 examples \(first input shape \(2, 4\)\)"),
        (jnp.array([0, 1]), r"holds \[1\]; valid are -1 \(base\) and 0\.\.0 for active=\['a'\]"),
        (jnp.array([-2, 0]), r"holds \[-2\]; valid are -1 \(base\) and 0\.\.0"),
    ],
)
def test_call_with_a_bad_adapter_index(peft, index, message):
    with pytest.raises(JpeftError, match=r"jpeft.call: adapter_index " + message):
        jpeft.call(peft, X, adapter_index=index, active=("a",))


# 62: methods that NNX refuses
def test_mixed_batch_refused_for_lora_drop():
    method = jpeft.LoRADrop(targets=("lin",), rank=2, keep=("lin",))
    model = jpeft.apply(method, Net(nnx.Rngs(0)), key=KEY)
    with pytest.raises(JpeftError, match=r"jpeft.call\(LoRADrop\): adapter_index= \(a mixed batch\) is not supported"):
        jpeft.call(model, X, adapter_index=jnp.array([0, -1]))


# 63: key and name
@pytest.mark.parametrize("key", [None, 0, jnp.ones(3)])
def test_apply_needs_a_random_key(key):
    with pytest.raises(JpeftError, match=r"jpeft.apply\(key=.*\): key must be a jax.random key"):
        jpeft.apply(lora(), Net(nnx.Rngs(0)), key=key)


@pytest.mark.parametrize("name", ["", "a/b", 3])
def test_apply_needs_a_valid_name(name):
    with pytest.raises(JpeftError, match=r"Adapter name must be a non-empty str without '/'"):
        jpeft.apply(lora(), Net(nnx.Rngs(0)), key=KEY, name=name)


# 64: merge without the adapter
@pytest.mark.parametrize("name", ["default", "zz"])
def test_merge_without_deltas_of_the_adapter(peft, name):
    with pytest.raises(JpeftError, match=rf"jpeft.merge\(LoRA\): the NNX model holds no deltas of adapter '{name}'"):
        jpeft.merge(lora(), peft if name == "zz" else Net(nnx.Rngs(0)), name=name)


# 65: NNX layers whose variants jpeft cannot factor
def test_linear_general_with_batch_axis():
    layer = nnx.LinearGeneral(4, 3, batch_axis={0: 2}, rngs=nnx.Rngs(0))
    with pytest.raises(JpeftError, match=r"nnx.LinearGeneral at '' has batch_axis=\{0: 2\}; .* Exclude it"):
        jpeft.apply(lora(".*"), layer, key=KEY)


def test_grouped_conv():
    layer = nnx.Conv(4, 4, (3,), feature_group_count=2, rngs=nnx.Rngs(0))
    with pytest.raises(JpeftError, match=r"nnx.Conv at '' has feature_group_count=2 .* not supported"):
        jpeft.apply(lora(".*"), layer, key=KEY)


def test_rank_too_large_for_an_nnx_layer():
    with pytest.raises(JpeftError, match=r"LoRA\(rank=9\): lin/kernel has shape \(4, 3\) .* rank must be <= 3"):
        jpeft.apply(jpeft.LoRA(targets=("lin",), rank=9), Net(nnx.Rngs(0)), key=KEY)


# 66: QLoRA and quantisation on NNX models
def test_quantize_nnx_targets_that_match_nothing_or_a_bias():
    with pytest.raises(JpeftError, match=r"jpeft.quantize\(targets='nope'\) matched 0 of 5 parameter paths"):
        jpeft.quantize(Net(nnx.Rngs(0)), jpeft.NF4(block_size=4), targets="nope")
    with pytest.raises(
        JpeftError, match=r"jpeft.quantize: 'lin/bias' has shape \(3,\); NF4 quantises arrays of rank >= 2"
    ):
        jpeft.quantize(Net(nnx.Rngs(0)), jpeft.NF4(block_size=4), targets="lin/.*")


def test_qlora_on_an_nnx_model_without_quantised_kernels():
    with pytest.raises(JpeftError, match=r"QLoRA: params hold no NF4-quantised kernel\. Quantise first"):
        jpeft.apply(jpeft.QLoRA(targets=("lin",), rank=2), Net(nnx.Rngs(0)), key=KEY)


def test_qlora_on_a_quantised_nnx_conv():
    conv = jpeft.quantize(nnx.Conv(4, 4, (2,), rngs=nnx.Rngs(0)), jpeft.NF4(block_size=8), targets="kernel")
    with pytest.raises(JpeftError, match=r"QLoRA: '' holds a quantised kernel of layout 'conv:1'; .* Do not quantise"):
        jpeft.apply(jpeft.QLoRA(targets=".*", rank=2), conv, key=KEY)


# 67: LoRA-drop's importance on NNX models
def test_lora_drop_importance_on_nnx_needs_a_plain_lora_and_batches(peft):
    with pytest.raises(JpeftError, match=r"measures a trained plain LoRA .* got DoRA"):
        jpeft.lora_drop_importance(jpeft.DoRA(targets=("lin",), rank=2), peft, None, [X])
    with pytest.raises(JpeftError, match=r"targets \['lin'\] never ran on the batches"):
        jpeft.lora_drop_importance(lora(), peft, None, [], name="a")


# 68: register_linear with something that is not a module type
@pytest.mark.parametrize("obj", [int, nnx.Linear(2, 2, rngs=nnx.Rngs(0))])
def test_register_linear_needs_a_module_type(obj):
    with pytest.raises(JpeftError, match=r"register_linear expects a flax.linen.Module or flax.nnx.Module subclass"):
        jpeft.register_linear(obj, jpeft.Linear(jpeft.Layout("dense")))


def test_capture_of_an_adapted_model():
    """``nnx.capture`` adds ``__captures__`` to every module, jpeft's delta stores included."""
    model = jpeft.apply(lora(), Net(nnx.Rngs(0)), key=KEY)
    y, _ = nnx.capture(model, nnx.Intermediate)(X)
    assert bool((y == model(X)).all())


# 72
def test_wrap_refuses_an_nnx_model_and_names_the_nnx_way():
    with pytest.raises(JpeftError, match=r"jpeft.wrap\(Net, \.\.\.\): an NNX model needs no wrapper.*jpeft.set_adapter"):
        jpeft.wrap(Net(nnx.Rngs(0)), lora())


# 73
def test_a_select_that_names_no_module_of_the_nnx_model():
    import dataclasses

    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Stray(jpeft.LoRA):
        def select(self, params):
            return [("nowhere",)]

    with pytest.raises(JpeftError, match=r"jpeft.apply: target 'nowhere' is not a module of the NNX model"):
        jpeft.apply(Stray(targets=("lin",), rank=2), Net(nnx.Rngs(0)), key=KEY)


def test_the_view_draws_no_dropout_rng_where_the_module_has_none():
    from jpeft import _nnx

    view = _nnx.View(nnx.Linear(4, 3, rngs=nnx.Rngs(0)), ("lin",), None)
    assert not view.has_rng("dropout")
    with pytest.raises(JpeftError, match=r"jpeft on NNX draws no 'dropout' rng at 'lin'"):
        view.make_rng("dropout")
