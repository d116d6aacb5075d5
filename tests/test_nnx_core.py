"""The NNX backend's core promises, against independent oracles (the linen twin, NumPy, the base model).

``tests/_nnx_models.py`` holds ``Synthetic`` (blocks made by ``nnx.vmap``, run by ``nnx.scan``) and
``Unrolled`` (an ``nnx.List``), both carrying the weights of the linen model of ``tests/_models.py``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jpeft
from jpeft import _nnx
from tests import _models as M
from tests import _nnx_models as N

TOL = dict(rtol=1e-5, atol=1e-5)
IDS = M.inputs()
METHOD = jpeft.LoRA(targets=M.ALL_TARGETS, rank=2, alpha=4.0, layouts=M.LAYOUTS)


@pytest.fixture(scope="module")
def linen_out() -> np.ndarray:
    return np.asarray(M.Model().apply({"params": M.params()}, IDS))


def linen_peft(names: tuple[str, ...] = ("default",), seed: int = 3) -> dict:
    t = M.params()
    for i, n in enumerate(names):
        t = jpeft.apply(METHOD, t, key=jax.random.key(i + 1), name=n)
    return M.random_deltas(t, seed)


def nnx_peft(linen: dict, names: tuple[str, ...] = ("default",), model: nnx.Module | None = None) -> nnx.Module:
    out = N.synthetic() if model is None else model
    for i, n in enumerate(names):
        out = jpeft.apply(METHOD, out, key=jax.random.key(i + 1), name=n)
    return N.load(out, linen)


def test_apply_copies_no_array_and_leaves_the_model_a_base_model(linen_out):
    base = N.synthetic()
    peft = jpeft.apply(METHOD, base, key=jax.random.key(1))
    assert peft is not base and peft.layers.q is not base.layers.q
    assert peft.layers.q.kernel[...] is base.layers.q.kernel[...]  # the same array, not a copy
    assert peft.layers.q.kernel is not base.layers.q.kernel  # but new Variables: merging cannot write through
    assert type(base.layers.q) is nnx.Linear and jpeft.RESERVED not in vars(base.layers.q)
    assert type(peft.head) is nnx.Linear and type(peft.layers.ln) is nnx.LayerNorm  # untargeted: untouched
    assert isinstance(peft.layers.q, nnx.Linear) and type(peft.layers.q).__name__ == "Linear"
    np.testing.assert_allclose(base(IDS), linen_out, **TOL)
    np.testing.assert_allclose(peft(IDS), linen_out, **TOL)  # B = 0: identity at init


def test_base_state_paths_do_not_change_and_deltas_sit_beside_them():
    base = N.synthetic()
    peft = jpeft.apply(METHOD, base, key=jax.random.key(1))
    before = {k for k, _ in nnx.to_flat_state(nnx.state(base))}
    after = {k for k, _ in nnx.to_flat_state(nnx.state(peft))}
    assert before <= after
    added = sorted("/".join(map(str, k)) for k in after - before)
    assert "layers/q/__jpeft__/default/lora_a" in added and "embed/__jpeft__/default/lora_b" in added
    assert all(f"/{jpeft.RESERVED}/default/lora_" in "/" + p for p in added)
    # the LoRA factors are Delta and LoRAParam: both filters select exactly them
    for f in (jpeft.Delta, nnx.LoRAParam):
        assert sorted("/".join(map(str, k)) for k, _ in nnx.to_flat_state(nnx.state(peft, f))) == added


def test_stacked_deltas_have_the_layer_axis_and_scan_equals_unrolled():
    linen = linen_peft()
    stacked = nnx_peft(linen)
    assert stacked.layers.q.__jpeft__["default"]["lora_a"].shape == (M.LAYERS, M.D, 2)
    assert stacked.layers.conv.__jpeft__["default"]["lora_a"].shape == (M.LAYERS, M.CONV_WINDOW, M.D, 2)
    per_layer = {
        **linen,
        "layers": {str(i): jax.tree.map(lambda x, i=i: x[i], linen["layers"]) for i in range(M.LAYERS)},
    }
    per_layer_method = jpeft.LoRA(
        targets=r"embed|layers/\d+/(q|v|o|dg_in|dg_out|conv)",
        rank=2,
        alpha=4.0,
        layouts=tuple((p.replace("layers/", r"layers/\d+/"), s) for p, s in M.LAYOUTS),
    )
    unrolled = N.load(jpeft.apply(per_layer_method, N.unrolled(), key=jax.random.key(1)), per_layer)
    assert unrolled.layers[0].q.__jpeft__["default"]["lora_a"].shape == (M.D, 2)
    got = stacked(IDS)
    np.testing.assert_allclose(unrolled(IDS), got, **TOL)
    want = jpeft.wrap(M.Model().apply, METHOD)({"params": linen}, IDS)
    np.testing.assert_allclose(got, want, **TOL)


def test_single_linear_matches_numpy():
    model = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
    method = jpeft.LoRA(targets=".*", rank=2, alpha=6.0)
    peft = jpeft.apply(method, model, key=jax.random.key(1))
    rng = np.random.RandomState(0)
    a, b = rng.standard_normal((4, 2)), rng.standard_normal((2, 3))
    peft.__jpeft__["default"]["lora_a"][...] = jnp.asarray(a, jnp.float32)
    peft.__jpeft__["default"]["lora_b"][...] = jnp.asarray(b, jnp.float32)
    x = rng.standard_normal((5, 4)).astype(np.float32)
    w, bias = np.asarray(model.kernel[...]), np.asarray(model.bias[...])
    np.testing.assert_allclose(peft(x), x @ w + bias + 3.0 * x @ a @ b, rtol=1e-5, atol=1e-5)
    merged = jpeft.merge(method, peft)
    assert type(merged) is nnx.Linear and jpeft.RESERVED not in vars(merged)
    np.testing.assert_allclose(merged.kernel[...], w + 3.0 * a @ b, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        peft(x), x @ w + bias + 3.0 * x @ a @ b, rtol=1e-5, atol=1e-5
    )  # merge did not write through


def test_named_adapters_stack_and_switch_like_linen():
    linen = linen_peft(("a", "b"))
    model = nnx_peft(linen, ("a", "b"))
    run = nnx.jit(lambda m, x: m(x))
    wrap = lambda active: np.asarray(jpeft.wrap(M.Model().apply, METHOD, active=active)({"params": linen}, IDS))  # noqa: E731
    np.testing.assert_allclose(run(model, IDS), wrap("a"), **TOL)  # the first adapter applied is active
    jpeft.set_adapter(model, "b")
    np.testing.assert_allclose(run(model, IDS), wrap("b"), **TOL)  # nnx.jit retraced for the switch
    jpeft.set_adapter(model, ("a", "b"))
    np.testing.assert_allclose(run(model, IDS), wrap(("a", "b")), **TOL)


def test_mixed_batch_rows_equal_each_adapter_alone(linen_out):
    linen = linen_peft(("a", "b"))
    model = nnx_peft(linen, ("a", "b"))
    index = jnp.asarray([1, -1], jnp.int32)
    got = nnx.jit(lambda m, x, i: jpeft.call(m, x, adapter_index=i, active=("a", "b")))(model, IDS, index)
    want_b = jpeft.wrap(M.Model().apply, METHOD, active="b")({"params": linen}, IDS)
    np.testing.assert_allclose(got[0], want_b[0], **TOL)
    np.testing.assert_allclose(got[1], linen_out[1], **TOL)
    np.testing.assert_allclose(
        model(IDS), jpeft.wrap(M.Model().apply, METHOD, active="a")({"params": linen}, IDS), **TOL
    )


def test_tree_mode_split_merge_and_plain_jax_jit():
    model = nnx_peft(linen_peft())
    graphdef, state = nnx.split(model, graph=False)
    again = nnx.merge(graphdef, state)
    want = model(IDS)
    np.testing.assert_allclose(again(IDS), want, **TOL)
    np.testing.assert_allclose(jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, IDS), want, **TOL)


def test_merge_restores_classes_and_paths_and_equals_the_linen_merge():
    linen = linen_peft()
    model = nnx_peft(linen)
    merged = jpeft.merge(METHOD, model)
    assert {k for k, _ in nnx.to_flat_state(nnx.state(merged))} == {
        k for k, _ in nnx.to_flat_state(nnx.state(N.synthetic()))
    }
    assert all(type(m) is getattr(type(m), "_jpeft_base", type(m)) for m in _nnx.modules(merged).values())
    # the oracle: the linen model on the same weights and deltas (not jpeft.merge)
    want = jpeft.wrap(M.Model().apply, METHOD)({"params": linen}, IDS)
    np.testing.assert_allclose(merged(IDS), want, **TOL)
    np.testing.assert_allclose(model(IDS), want, **TOL)  # the adapted model is left as it was
