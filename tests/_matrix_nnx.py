"""The matrix's ``nnx`` column: each method on an NNX twin equals the same method on its linen model.

The oracle is independent of the NNX backend: the linen model (already checked against NumPy and
base-model oracles by the other columns) with the same weights and the same deltas. For each case:

* ``jpeft.apply`` on the NNX twin adds exactly the delta paths it adds to the linen tree, runs as
  the base model at init (identity methods), and ``jpeft.trainable`` selects exactly the leaves
  the linen labels train;
* with the linen tree's random deltas written into the NNX model by path, the NNX output equals the
  linen ``jpeft.wrap`` output (1e-5);
* for mergeable methods, ``jpeft.merge`` returns a model of the original classes and state paths
  whose output equals the unmerged NNX model.

Methods without a profile run on the synthetic scan model (``tests/_nnx_models.py``); methods that
need one on the Llama twin (``tests/_nnx_llama.py``) of the tiny HF Flax Llama.
"""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx

import jpeft
from jpeft import _nnx
from tests import _matrix_cases as X
from tests import _nnx_models as N

TOL = dict(rtol=1e-5, atol=1e-5)


def family_of(case: X.Case) -> str:
    return "llama" if case.profile or case.name == "Freeze" else "synthetic"


def twin(family: str) -> nnx.Module:
    """A fresh NNX twin of the matrix's linen model of ``family`` (the same weights)."""
    if family == "synthetic":
        return N.synthetic()
    from tests import _nnx_llama as NL

    return NL.llama()


def nnx_base(case: X.Case, family: str) -> nnx.Module:
    """The NNX counterpart of ``test_matrix.base_tree``: quantised, or with two trained adapters."""
    from tests import test_matrix as T

    model = twin(family)
    if case.setup == "quantize":
        model = jpeft.quantize(model, case.quant, targets=X.QUANTISED[T.arch(family)])
    if case.setup == "fusion":
        adapter = case.method(T.arch(family)).adapter
        for i, n in enumerate(X.FUSED):
            model = jpeft.apply(adapter, model, key=jax.random.key(10 + i), name=n)
    return model


def nnx_output(family: str, model: nnx.Module) -> np.ndarray:
    from tests import test_matrix as T

    _, _, args, inputs, logits = T.model(family)
    return np.asarray(logits(model(*args, **inputs)), np.float32)


def check_nnx(case: X.Case) -> None:
    from tests import test_matrix as T

    family = family_of(case)
    overrides = {"scan_layers": r"layers/(q|v)"} if case.name == "LoRADrop" else {}
    method = case.method(T.arch(family), **overrides)
    linen = T.tree(case, family, method=method)
    want = T.run(family, method, linen)
    model = jpeft.apply(method, nnx_base(case, family), key=jax.random.key(1))
    if case.setup == "fusion":  # later adapters are added inactive, as HF PEFT's add_adapter: choose it
        jpeft.set_adapter(model, "default")
    assert sorted(jpeft.list_paths(_nnx.tree(model))) == sorted(jpeft.list_paths(linen)), "delta paths differ"
    if not method.has_deltas:
        assert not nnx.state(model, jpeft.Delta), "a method without deltas added NNX deltas"
    if method.identity_at_init and method.has_deltas:
        np.testing.assert_allclose(nnx_output(family, model), T.base_output(case.name, family), **TOL)
    # what trains on NNX (its filter) is what trains on linen (its labels), leaf for leaf
    trained = nnx.state(model, jpeft.trainable(method, model))
    got_paths = sorted("/".join(map(str, k)) for k, _ in nnx.to_flat_state(trained))
    labels = jax.tree_util.tree_flatten_with_path(jpeft.labels(method, linen))[0]
    want_paths = sorted("/".join(str(k.key) for k in p) for p, lab in labels if lab != "frozen")
    assert got_paths == want_paths
    N.load(model, linen)
    got = nnx_output(family, model)
    assert T.differs(want, T.base_output(case.name, family)), "the deltas must change the output"
    np.testing.assert_allclose(got, want, **TOL)
    if method.mergeable and method.has_deltas and case.setup != "quantize":
        merged = jpeft.merge(method, model)
        keys = [k for k, _ in nnx.to_flat_state(nnx.state(merged))]
        assert not any(jpeft.RESERVED in k for k in keys), "merge left delta variables"
        assert all(type(m) is getattr(type(m), "_jpeft_base", type(m)) for m in _nnx.modules(merged).values())
        np.testing.assert_allclose(nnx_output(family, merged), got, **TOL)
