"""LoRA on every ``flax.nnx`` module type jpeft reads, against NumPy references.

For each type, LoRA's output must be ``x W + b + s (x A) B`` computed in NumPy, with ``A`` over the
layer's input axes and ``B`` over its output axes; ``jpeft.merge`` must equal the unmerged model.
Covered: ``nnx.Linear``, ``nnx.LinearGeneral`` (two input and two output axes), ``nnx.Einsum``,
``nnx.Embed``, ``nnx.Conv``, and einsum-style modules written like tunix's attention ``Einsum`` (found
without registration), plus a custom type registered with ``jpeft.register_linear``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jpeft

RANK, ALPHA = 2, 6.0
SCALE = ALPHA / RANK


class TunixEinsum(nnx.Module):
    """A look-alike of tunix's attention ``Einsum`` (gemma/llama/qwen ``layers.Einsum``)."""

    def __init__(self, einsum_str: str, shape: tuple[int, ...], *, rngs: nnx.Rngs):
        self.einsum_str = einsum_str
        self.shape = shape
        self.w = nnx.Param(jax.random.normal(rngs.params(), shape))

    def __call__(self, x: jax.Array) -> jax.Array:
        return jnp.einsum(self.einsum_str, x, self.w[...])


class Custom(nnx.Module):
    """A linear layer whose kernel is neither named ``kernel`` nor applied by an einsum string."""

    def __init__(self, d_in: int, d_out: int, *, rngs: nnx.Rngs):
        self.weight = nnx.Param(jax.random.normal(rngs.params(), (d_in, d_out)))

    def __call__(self, x: jax.Array) -> jax.Array:
        return x @ self.weight[...]


def _f64(x: Any) -> np.ndarray:
    return np.asarray(x, np.float64)


def _conv1d_same(x: np.ndarray, k: np.ndarray) -> np.ndarray:
    """``x (B, T, C_in)`` with ``k (K, C_in, C_out)``, stride 1, 'SAME' padding, odd ``K``."""
    pad = k.shape[0] // 2
    xp = np.pad(x, ((0, 0), (pad, pad), (0, 0)))
    return sum(np.einsum("btc,cd->btd", xp[:, i : i + x.shape[1]], k[i]) for i in range(k.shape[0]))


def _dense(x, w, a, b, bias=None):  # x (..., in), w (in, out)
    y = x @ w + SCALE * (x @ a) @ b
    return y if bias is None else y + bias


def _general(x, w, a, b, bias):  # x (..., 2, 3), w (2, 3, 4, 5), a (2, 3, r), b (r, 4, 5)
    return np.einsum("bij,ijkl->bkl", x, w) + bias + SCALE * np.einsum("bij,ijr,rkl->bkl", x, a, b)


def _einsum(x, w, a, b, bias):  # 'btd,dnh->btnh'
    return np.einsum("btd,dnh->btnh", x, w) + bias + SCALE * np.einsum("btd,dr,rnh->btnh", x, a, b)


def _embed(ids, e, a, b):
    return e[ids] + SCALE * a[ids] @ b


def _conv(x, k, a, b, bias):
    return _conv1d_same(x, k) + bias + SCALE * _conv1d_same(x, a) @ b


def _q(x, w, a, b):  # 'BTD,DNH->BTNH'
    return np.einsum("btd,dnh->btnh", x, w) + SCALE * np.einsum("btd,dr,rnh->btnh", x, a, b)


def _o(x, w, a, b):  # 'BTNH,NHD->BTD'
    return np.einsum("btnh,nhd->btd", x, w) + SCALE * np.einsum("btnh,nhr,rd->btd", x, a, b)


def _gemma_q(x, w, a, b):  # 'BTD,NDH->BTNH' (tunix Gemma 3: the contracted axis in the middle)
    return np.einsum("btd,ndh->btnh", x, w) + SCALE * np.einsum("btd,dr,rnh->btnh", x, a, b)


def _gemma_kv(x, w, a, b):  # 'BSD,CKDH->CBSKH' (the stack axis C leads the output)
    return np.einsum("bsd,ckdh->cbskh", x, w) + SCALE * np.einsum("bsd,dr,rckh->cbskh", x, a, b)


def _normal(shape: tuple[int, ...], seed: int = 7) -> jax.Array:
    return jax.random.normal(jax.random.key(seed), shape)


# name: (module factory, input, (A shape, B shape), reference(x, weights..., a, b), weight attrs)
CASES: dict[
    str, tuple[Callable[[nnx.Rngs], nnx.Module], Any, tuple[tuple[int, ...], tuple[int, ...]], Any, tuple[str, ...]]
] = {
    "Linear": (lambda r: nnx.Linear(6, 5, rngs=r), _normal((3, 6)), ((6, RANK), (RANK, 5)), _dense, ("kernel", "bias")),
    "LinearGeneral": (
        lambda r: nnx.LinearGeneral((2, 3), (4, 5), axis=(-2, -1), rngs=r),
        _normal((3, 2, 3)),
        ((2, 3, RANK), (RANK, 4, 5)),
        _general,
        ("kernel", "bias"),
    ),
    "Einsum": (
        lambda r: nnx.Einsum("btd,dnh->btnh", (6, 2, 3), (2, 3), rngs=r),
        _normal((2, 4, 6)),
        ((6, RANK), (RANK, 2, 3)),
        _einsum,
        ("kernel", "bias"),
    ),
    "Embed": (
        lambda r: nnx.Embed(7, 5, rngs=r),
        jnp.array([[0, 3, 6, 3], [1, 2, 5, 0]]),
        ((7, RANK), (RANK, 5)),
        _embed,
        ("embedding",),
    ),
    "Conv": (
        lambda r: nnx.Conv(3, 4, (3,), rngs=r),
        _normal((2, 6, 3)),
        ((3, 3, RANK), (RANK, 4)),
        _conv,
        ("kernel", "bias"),
    ),
    "tunix_q": (
        lambda r: TunixEinsum("BTD,DNH->BTNH", (6, 2, 3), rngs=r),
        _normal((2, 4, 6)),
        ((6, RANK), (RANK, 2, 3)),
        _q,
        ("w",),
    ),
    "tunix_o": (
        lambda r: TunixEinsum("BTNH,NHD->BTD", (2, 3, 6), rngs=r),
        _normal((2, 4, 2, 3)),
        ((2, 3, RANK), (RANK, 6)),
        _o,
        ("w",),
    ),
    "gemma_q": (
        lambda r: TunixEinsum("BTD,NDH->BTNH", (2, 6, 3), rngs=r),
        _normal((2, 4, 6)),
        ((6, RANK), (RANK, 2, 3)),
        _gemma_q,
        ("w",),
    ),
    "gemma_kv": (
        lambda r: TunixEinsum("BSD,CKDH->CBSKH", (2, 3, 6, 4), rngs=r),
        _normal((2, 4, 6)),
        ((6, RANK), (RANK, 2, 3, 4)),
        _gemma_kv,
        ("w",),
    ),
}


def _adapted(make: Callable[[nnx.Rngs], nnx.Module], shapes: Any) -> tuple[nnx.Module, nnx.Module]:
    """(base module, LoRA-adapted copy with random A and B of the expected shapes)."""
    base = make(nnx.Rngs(0))
    if isinstance(getattr(base, "bias", None), nnx.Param):
        base.bias[...] = _normal(base.bias.shape, 3)  # nnx initialises biases to 0
    peft = jpeft.apply(jpeft.LoRA(targets=".*", rank=RANK, alpha=ALPHA), base, key=jax.random.key(1))
    store = peft.__jpeft__["default"]
    assert (store["lora_a"].shape, store["lora_b"].shape) == shapes
    store["lora_a"][...] = _normal(shapes[0], 11)
    store["lora_b"][...] = _normal(shapes[1], 12)
    return base, peft


@pytest.mark.parametrize("name", sorted(CASES))
def test_lora_matches_numpy_and_merges(name):
    make, x, shapes, ref, attrs = CASES[name]
    base, peft = _adapted(make, shapes)
    assert type(peft).__name__ == type(base).__name__ and isinstance(peft, type(base))
    store = peft.__jpeft__["default"]
    weights = [_f64(getattr(base, k)[...]) for k in attrs]
    xs = np.asarray(x) if name == "Embed" else _f64(x)
    want = ref(xs, weights[0], _f64(store["lora_a"][...]), _f64(store["lora_b"][...]), *weights[1:])
    got = peft(x)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    a0 = np.zeros(shapes[0])  # the reference without LoRA is the base module's own output
    np.testing.assert_allclose(
        base(x), ref(xs, weights[0], a0, _f64(store["lora_b"][...]), *weights[1:]), rtol=1e-4, atol=1e-4
    )
    merged = jpeft.merge(jpeft.LoRA(targets=".*", rank=RANK, alpha=ALPHA), peft)
    assert type(merged) is type(base) and not hasattr(merged, "__jpeft__")
    np.testing.assert_allclose(merged(x), got, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(getattr(base, attrs[0])[...], weights[0])  # the base model is not changed


def test_tunix_einsum_is_found_without_registration():
    from jpeft._intercept import _REGISTRY

    assert TunixEinsum not in _REGISTRY
    base = TunixEinsum("BTD,DNH->BTNH", (6, 2, 3), rngs=nnx.Rngs(0))
    peft = jpeft.apply(jpeft.LoRA(targets=".*", rank=RANK), base, key=jax.random.key(1))
    assert jpeft.list_paths(jpeft._nnx.tree(peft)) == ["__jpeft__/default/lora_a", "__jpeft__/default/lora_b", "kernel"]
    assert sorted(k for k, _ in nnx.to_flat_state(nnx.state(peft, nnx.Param))) == [
        ("__jpeft__", "default", "lora_a"),
        ("__jpeft__", "default", "lora_b"),
        ("w",),  # the base weight keeps its own name and path
    ]


def test_register_linear_for_a_custom_nnx_type():
    base = Custom(6, 5, rngs=nnx.Rngs(0))
    method = jpeft.LoRA(targets=".*", rank=RANK, alpha=ALPHA)
    with pytest.raises(jpeft.JpeftError, match=r"register_linear"):
        jpeft.apply(method, base, key=jax.random.key(1))
    jpeft.register_linear(Custom, jpeft.Linear(jpeft.Layout("dense"), weight="weight"))
    peft = jpeft.apply(method, base, key=jax.random.key(1))
    store = peft.__jpeft__["default"]
    store["lora_b"][...] = _normal((RANK, 5), 12)
    x = _normal((3, 6))
    want = _dense(_f64(x), _f64(base.weight[...]), _f64(store["lora_a"][...]), _f64(store["lora_b"][...]))
    np.testing.assert_allclose(peft(x), want, rtol=1e-4, atol=1e-4)
    merged = jpeft.merge(method, peft)
    assert type(merged) is Custom
    np.testing.assert_allclose(merged(x), peft(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("spec", "shape"),
    [
        ("BND,NDH->BNH", (2, 6, 3)),  # a weight axis in input and output (a per-head weight)
        ("BTD,DH,HK->BTK", (6, 3)),  # not 'input,weight->output'
    ],
)
def test_einsum_that_cannot_be_factored_raises(spec, shape):
    base = TunixEinsum(spec, shape, rngs=nnx.Rngs(0))
    with pytest.raises(
        jpeft.JpeftError, match=r"Einsum module at '' .*(not a linear map jpeft can factor|expects exactly)"
    ):
        jpeft.apply(jpeft.LoRA(targets=".*", rank=RANK), base, key=jax.random.key(1))
