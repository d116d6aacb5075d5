"""Trainable deltas on a bf16 base: float32 by default for every method, ``dtype=`` on each (issue 10, finding 9).

Every method that adds delta leaves (BitFit, Freeze and Full train base leaves and add none), on
the tiny HF GPT-2 in bfloat16 (parameters and computation). Output dtypes are read with
``jax.eval_shape`` (a trace, no compile).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jpeft
from tests import _hf_models as H

BF16, F32 = jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32)
TARGETS, R = ("c_attn", "c_fc"), 2
FUSED = ("fa", "fb")
NF4 = jpeft.NF4(block_size=8, dq_block_size=4)

# name -> (make(**kw) -> method, how the base tree is prepared: "", "quantize" or "fusion")
METHODS: dict[str, tuple[Callable[..., jpeft.Method], str]] = {
    "LoRA": (lambda **kw: jpeft.LoRA(targets=TARGETS, rank=R, **kw), ""),
    "DoRA": (lambda **kw: jpeft.DoRA(targets=TARGETS, rank=R, **kw), ""),
    "LoRAFA": (lambda **kw: jpeft.LoRAFA(targets=TARGETS, rank=R, **kw), ""),
    "LoRAPlus": (lambda **kw: jpeft.LoRAPlus(targets=TARGETS, rank=R, **kw), ""),
    "AdaLoRA": (lambda **kw: jpeft.AdaLoRA(targets=TARGETS, init_r=3, target_r=2, tinit=2, tfinal=2, total_step=10, **kw), ""),
    "LoRADrop": (lambda **kw: jpeft.LoRADrop(targets=TARGETS, rank=R, **kw), ""),
    "QLoRA": (lambda **kw: jpeft.QLoRA(targets=TARGETS, rank=R, quant=NF4, **kw), "quantize"),
    "IA3": (lambda **kw: jpeft.IA3(**kw), ""),
    "DiffPruning": (lambda **kw: jpeft.DiffPruning(targets=TARGETS, **kw), ""),
    "PromptTuning": (lambda **kw: jpeft.PromptTuning(num_virtual_tokens=2, **kw), ""),
    "PTuning-mlp": (lambda **kw: jpeft.PTuning(num_virtual_tokens=2, encoder_hidden_size=8, **kw), ""),
    "PTuning-lstm": (lambda **kw: jpeft.PTuning(num_virtual_tokens=2, encoder="lstm", encoder_hidden_size=8, **kw), ""),
    "PrefixTuning": (lambda **kw: jpeft.PrefixTuning(num_virtual_tokens=2, projection_hidden_size=8, **kw), ""),
    "PTuningV2": (lambda **kw: jpeft.PTuningV2(num_virtual_tokens=2, **kw), ""),
    "Houlsby": (lambda **kw: jpeft.HoulsbyAdapter(reduction_factor=8, **kw), ""),
    "Pfeiffer": (lambda **kw: jpeft.PfeifferAdapter(reduction_factor=8, **kw), ""),
    "Parallel": (lambda **kw: jpeft.ParallelAdapter(bottleneck=4, **kw), ""),
    "ScaledParallel": (lambda **kw: jpeft.ScaledParallelAdapter(bottleneck=4, scaling="learned", **kw), ""),
    "MultiHeadParallel": (lambda **kw: jpeft.MultiHeadParallelAdapter(bottleneck=2, num_heads=4, **kw), ""),
    "AdapterFusion": (
        lambda **kw: jpeft.AdapterFusion(adapters=FUSED, adapter=jpeft.PfeifferAdapter(reduction_factor=8), **kw),
        "fusion",
    ),
    "MAM": (lambda **kw: jpeft.MAM(prefix_tokens=2, adapter_bottleneck=4, **kw), ""),
    "MAM-projection": (lambda **kw: jpeft.MAM(prefix_tokens=2, adapter_bottleneck=4, prefix_projection=True, **kw), ""),
    "UniPELT": (lambda **kw: jpeft.UniPELT(lora_targets=TARGETS, rank=R, prefix_tokens=2, reduction_factor=8, **kw), ""),
    "Prompt+LoRA": (  # a compose has no dtype of its own: each component has its field
        lambda **kw: jpeft.compose(jpeft.PromptTuning(num_virtual_tokens=2, **kw), jpeft.LoRA(targets=TARGETS, rank=R, **kw)),
        "",
    ),
}


@functools.cache
def model() -> H.HFModel:
    return H.make("gpt2", dtype=jnp.bfloat16)


def method_of(name: str, dtype: str | None = None) -> jpeft.Method:
    return METHODS[name][0](**({} if dtype is None else {"dtype": dtype}))


@functools.cache
def base(setup: str) -> Any:
    """The bf16 GPT-2 params prepared for the case: NF4-quantised (QLoRA), or with two trained-
    looking Pfeiffer adapters (AdapterFusion)."""
    params = model().params
    if setup == "quantize":
        return jpeft.quantize(params, NF4, targets=TARGETS)
    if setup == "fusion":
        for i, n in enumerate(FUSED):
            params = jpeft.apply(jpeft.PfeifferAdapter(reduction_factor=8), params, key=jax.random.key(10 + i), name=n)
    return params


def abstract_tree(method: jpeft.Method, params: Any) -> Any:
    """``jpeft.apply``'s tree as shapes and dtypes (traced, not computed)."""
    return jax.eval_shape(lambda: jpeft.apply(method, params, key=jax.random.key(0)))


def trainable_deltas(method: jpeft.Method, tree: Any) -> dict[str, jax.Array]:
    """The trainable delta leaves (AdapterFusion's fused adapters are frozen, so not among them)."""
    out = {}
    for path, label in jax.tree_util.tree_flatten_with_path(jpeft.labels(method, tree))[0]:
        keys = [str(k.key) for k in path]
        if jpeft.RESERVED in keys and label != "frozen":
            out["/".join(keys)] = functools.reduce(lambda node, k: node[k], keys, tree)
    assert out, f"{method!r} added no trainable delta leaves"
    return out


def output_dtype(method: jpeft.Method, tree: Any) -> jnp.dtype:
    m = model()
    out = jax.eval_shape(lambda p: m.logits(jpeft.wrap(m.apply, method)({"params": p}, **m.inputs)), tree)
    return out.dtype


@pytest.mark.parametrize("name", list(METHODS))
def test_deltas_default_to_float32_and_output_keeps_the_base_dtype(name: str) -> None:
    method = method_of(name)
    tree = abstract_tree(method, base(METHODS[name][1]))
    dtypes = {p: x.dtype for p, x in trainable_deltas(method, tree).items()}
    assert set(dtypes.values()) == {F32}, {p: str(d) for p, d in dtypes.items() if d != F32}
    assert output_dtype(method, tree) == BF16


@pytest.mark.parametrize("name", list(METHODS))
def test_dtype_field_sets_every_delta_leaf(name: str) -> None:
    method = method_of(name, "bfloat16")
    tree = abstract_tree(method, base(METHODS[name][1]))
    dtypes = {p: x.dtype for p, x in trainable_deltas(method, tree).items()}
    assert set(dtypes.values()) == {BF16}, {p: str(d) for p, d in dtypes.items() if d != BF16}
    assert output_dtype(method, tree) == BF16


def test_float32_on_a_float32_base_with_bf16_requested_keeps_float32_outputs() -> None:
    """The forward casts the deltas to the activations, both ways: bf16 prompts on a float32 model."""
    m = H.make("gpt2")
    for method in (jpeft.PromptTuning(num_virtual_tokens=2, dtype="bfloat16"), jpeft.PTuningV2(num_virtual_tokens=2, dtype="bfloat16")):
        tree = jpeft.apply(method, m.params, key=jax.random.key(0))
        assert {x.dtype for x in trainable_deltas(method, tree).values()} == {BF16}
        out = jax.eval_shape(lambda p, method=method: m.logits(jpeft.wrap(m.apply, method)({"params": p}, **m.inputs)), tree)
        assert out.dtype == F32


def changed_by_one_adam_step(method: jpeft.Method) -> float:
    """The fraction of the prompt's entries that one Adam(1e-4) step changes (bf16 GPT-2, CE loss)."""
    m = model()
    tree = jpeft.apply(method, m.params, key=jax.random.key(0))
    trainable, frozen = jpeft.split(method, tree)
    wrapped = jpeft.wrap(m.apply, method)

    def loss(t: Any) -> jax.Array:
        logits = wrapped({"params": jpeft.combine(t, frozen)}, **m.inputs).logits.astype(jnp.float32)
        return optax.softmax_cross_entropy_with_integer_labels(logits, jnp.full(logits.shape[:2], 7)).mean()

    tx = optax.adam(1e-4)

    @jax.jit
    def step(t: Any) -> Any:
        updates, _ = tx.update(jax.grad(loss)(t), tx.init(t), t)
        return optax.apply_updates(t, updates)  # casts back to each leaf's dtype, as training does

    after = step(trainable)
    before = trainable["transformer"]["wte"][jpeft.RESERVED]["default"]["prompt"]
    after_ = after["transformer"]["wte"][jpeft.RESERVED]["default"]["prompt"]
    assert after_.dtype == before.dtype
    return float(np.mean(np.asarray(before != after_)))


def test_one_adam_step_moves_a_float32_prompt_but_not_a_bf16_one() -> None:
    """Adam's first step is ~lr * sign(g) = 1e-4 per entry: below half a bf16 ulp of most entries of a
    prompt uniform in +-0.5, so a bf16 prompt barely trains; the float32 default takes every step."""
    f32 = changed_by_one_adam_step(jpeft.PromptTuning(num_virtual_tokens=4))
    bf16 = changed_by_one_adam_step(jpeft.PromptTuning(num_virtual_tokens=4, dtype="bfloat16"))
    assert f32 > 0.99, f32
    assert bf16 < 0.1, bf16


@pytest.mark.parametrize(
    "make",
    [
        lambda d: jpeft.PromptTuning(dtype=d),
        lambda d: jpeft.PTuning(dtype=d),
        lambda d: jpeft.PrefixTuning(dtype=d),
        lambda d: jpeft.PTuningV2(dtype=d),
        lambda d: jpeft.AdapterFusion(adapters=("a", "b"), adapter=jpeft.PfeifferAdapter(), dtype=d),
        lambda d: jpeft.MAM(dtype=d),
        lambda d: jpeft.UniPELT(dtype=d),
    ],
    ids=["PromptTuning", "PTuning", "PrefixTuning", "PTuningV2", "AdapterFusion", "MAM", "UniPELT"],
)
def test_non_float_dtype_is_refused(make: Any) -> None:
    for bad in ("int32", "bool", "no-such-dtype"):
        with pytest.raises(jpeft.JpeftError, match=r"\(dtype='[\w-]+'\): dtype must name a float dtype, e\.g\. 'float32'"):
            make(bad)
    assert make(jnp.bfloat16).dtype == "bfloat16"  # normalised to the name, so methods stay hashable and JSON-able


def test_hf_peft_import_gives_the_dtype_apply_gives(tmp_path: Any) -> None:
    """On a bf16 base, an imported prompt or prefix adapter gets float32 leaves, as jpeft.apply gives."""
    m = model()
    for i, method in enumerate((jpeft.PromptTuning(num_virtual_tokens=2), jpeft.PTuningV2(num_virtual_tokens=2))):
        tree = jpeft.apply(method, m.params, key=jax.random.key(0))
        jpeft.export_hf(str(tmp_path / str(i)), method, tree)
        back_method, back = jpeft.import_hf(str(tmp_path / str(i)), m.params)
        want, got = trainable_deltas(method, tree), trainable_deltas(back_method, back)
        assert want.keys() == got.keys()
        for p in want:
            assert got[p].dtype == want[p].dtype == F32, p
            np.testing.assert_array_equal(np.asarray(got[p]), np.asarray(want[p]), err_msg=p)
