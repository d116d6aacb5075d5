"""Every method x every feature, each cell against an oracle independent of the feature under test.

The rows and the expected outcome of each cell come from ``tests/_matrix_cases.py``; the table in
``tests/README.md`` is generated from it (``python -m tests.matrix_table``) and checked here. A cell
either passes its oracle, raises a tested "not supported" ``JpeftError``, is a strict xfail for a
known bug, or is "n/a" and asserts the property that makes it so. See ``FEATURE_DOCS`` for the oracles.

Cost: one tiny model per family, built once; one compilation per (method, feature) at most.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jpeft
from tests import _hf_models as H
from tests import _matrix_cases as X
from tests import _matrix_nnx as MN
from tests import _models as M
from tests import test_generate as G

R = jpeft.RESERVED
TOL = dict(rtol=1e-5, atol=1e-5)
KEY = jax.random.key(4)


# --- models ------------------------------------------------------------------------------------------
@functools.cache
def model(family: str) -> tuple[dict[str, Any], Callable[..., Any], tuple, dict[str, Any], Callable[[Any], Any]]:
    """``(params, apply_fn, args, inputs, logits)``: call ``logits(apply_fn(variables, *args, **inputs))``."""
    if family == "synthetic":
        return M.params(), M.Model().apply, (M.inputs(),), {}, lambda out: out
    if family == "sharp":  # tests/test_generate.py's GPT-2 with well separated arg-max tokens
        return G.sharp("gpt2")[1], G.apply_of("gpt2"), (), {}, lambda out: out.logits
    hf = H.make(family.removesuffix("_bf16"), dtype=jnp.bfloat16 if family.endswith("_bf16") else jnp.float32)
    return hf.params, hf.apply, (), hf.inputs, hf.logits


def call(family: str, fn: Callable[..., Any], variables: Any, **kw: Any) -> jax.Array:
    _, _, args, inputs, logits = model(family)
    return logits(fn(variables, *args, **inputs, **kw))


def arch(family: str) -> str:
    return {"sharp": "gpt2", "gpt2_bf16": "gpt2"}.get(family, family)


def fresh(tree: Any) -> Any:
    return jax.tree.map(lambda x: x, tree)


@functools.cache
def base_tree(case_name: str, family: str) -> Any:
    """The tree the method is applied to: quantised for QLoRA, with two trained adapters for fusion."""
    case, params = X.BY_NAME[case_name], model(family)[0]
    if case.setup == "quantize":
        return jpeft.quantize(params, case.quant, targets=X.QUANTISED[arch(family)])
    if case.setup == "fusion":
        adapter = case.method(arch(family)).adapter
        for i, n in enumerate(X.FUSED):
            params = jpeft.apply(adapter, params, key=jax.random.key(10 + i), name=n)
        return M.random_deltas(params, seed=7, scale=0.3, adapters=X.FUSED)
    return params


def tree(
    case: X.Case,
    family: str = "gpt2",
    *,
    names: tuple[str, ...] = ("default",),
    seed: int = 0,
    scale: float = 0.1,
    method: jpeft.Method | None = None,
    random: bool = True,
) -> Any:
    """``method`` (by default the case's) applied under ``names``, with random deltas of those names."""
    method = method or case.method(arch(family))
    out = fresh(base_tree(case.name, family))
    for i, n in enumerate(names):
        out = jpeft.apply(method, out, key=jax.random.key(i + 1), name=n)
    if not random:
        return out
    if not method.has_deltas:  # BitFit, Freeze, Full train base leaves: perturb those
        return perturb(method, out, seed, scale)
    return M.random_deltas(out, seed, scale=scale, adapters=names)


def perturb(method: jpeft.Method, t: Any, seed: int, scale: float) -> Any:
    """``t`` with ``N(0, scale^2)`` NumPy noise added to every leaf the method trains."""
    rng = np.random.RandomState(seed)
    labels = jpeft.labels(method, t)
    return jax.tree.map(
        lambda lab, x: x if lab == "frozen" else jnp.asarray(np.asarray(x) + rng.normal(0, scale, x.shape), x.dtype),
        labels,
        t,
    )


@functools.cache
def base_output(case_name: str, family: str) -> np.ndarray:
    """The base model's output (QLoRA: on the dequantised kernels)."""
    params, apply = model(family)[:2]
    if X.BY_NAME[case_name].setup == "quantize":
        params = jpeft.dequantize(base_tree(case_name, family))
    return np.asarray(call(family, apply, {"params": params}), np.float32)


def run(family: str, method: jpeft.Method, t: Any, **kw: Any) -> np.ndarray:
    wrap_kw = {k: kw.pop(k) for k in ("active", "drop_layers", "drop_random") if k in kw}
    return np.asarray(call(family, jpeft.wrap(model(family)[1], method, **wrap_kw), {"params": t}, **kw), np.float32)


def flat(t: Any) -> dict[str, Any]:
    return {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_flatten_with_path(t)[0]}


def deltas(t: Any) -> dict[str, Any]:
    return {p: x for p, x in flat(t).items() if f"'{R}'" in p}


def differs(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape != b.shape or not np.allclose(a, b, rtol=1e-4, atol=1e-4)


def weights(shape: tuple[int, ...]) -> jax.Array:
    return jnp.asarray(np.random.RandomState(3).standard_normal(shape), jnp.float32)


def loss_fn(family: str, method: jpeft.Method, shape: tuple[int, ...], **wrap_kw: Any) -> Callable[..., jax.Array]:
    """``loss(trainable, frozen, **apply_kw)``: a fixed random projection of the wrapped output."""
    wrapped = jpeft.wrap(model(family)[1], method, **wrap_kw)
    w = weights(shape)
    return lambda t, f, **kw: jnp.sum(call(family, wrapped, {"params": jpeft.combine(t, f)}, **kw).astype(jnp.float32) * w)


# --- jit, shared with save/restore: one compiled value_and_grad per case --------------------------
@functools.cache
def compiled(case_name: str) -> tuple[Callable[..., Any], Callable[..., Any], list[None]]:
    """The case's jitted ``value_and_grad`` of a loss on GPT-2, its eager loss, and its trace log."""
    case = X.BY_NAME[case_name]
    method = case.method()
    shape = run("gpt2", method, tree(case)).shape
    loss = loss_fn("gpt2", method, shape)
    traces: list[None] = []
    rngs = {"dropout": KEY}  # DiffPruning samples its gates in training; the other methods ignore it

    def traced(t: Any, f: Any) -> Any:
        traces.append(None)
        return jax.value_and_grad(loss)(t, f, rngs=rngs)

    return jax.jit(traced), functools.partial(loss, rngs=rngs), traces


def check_jit(case: X.Case) -> None:
    jitted, eager, traces = compiled(case.name)
    values = []
    for seed in (0, 1):
        t, f = jpeft.split(case.method(), tree(case, seed=seed))
        v, g = jitted(t, f)
        np.testing.assert_allclose(v, eager(t, f), rtol=1e-4, atol=1e-4)
        assert flat(g).keys() == flat(t).keys() and all(np.isfinite(x).all() for x in jax.tree.leaves(g))
        values.append(float(v))
    assert values[0] != values[1], "the two trees must give different losses"
    assert len(traces) == 1, f"traced {len(traces)} times"


# --- nn.scan == unrolled ---------------------------------------------------------------------------
class Unrolled(nn.Module):
    """``tests/_models.py``'s Model with the scan unrolled into ``layers_0``, ``layers_1``, ..."""

    @nn.compact
    def __call__(self, ids: jax.Array) -> jax.Array:
        h = nn.Embed(M.VOCAB, M.D, name="embed")(ids)
        for i in range(M.LAYERS):
            h, _ = nn.remat(M.Block)(name=f"layers_{i}")(h, None)
        return nn.Dense(M.VOCAB, name="head")(h)


def unstack(t: Any) -> Any:
    """The scanned tree with ``layers`` split into per-layer subtrees (deltas included)."""
    out = {k: v for k, v in t.items() if k != "layers"}
    for i in range(M.LAYERS):
        out[f"layers_{i}"] = jax.tree.map(lambda x, i=i: x[i], t["layers"])
    return out


def strip_empty(t: Any) -> Any:
    """The tree without empty delta nodes (QLoRA's quantised modules that have no factors)."""
    if not isinstance(t, dict):
        return t
    return {k: strip_empty(v) for k, v in t.items() if not (k == R and not any(v.values()))}


def check_scan(case: X.Case) -> None:
    overrides = {"scan_layers": r"layers/(q|v)"} if case.name == "LoRADrop" else {}
    method = case.method("synthetic", **overrides)
    t = tree(case, "synthetic", method=method, scale=0.3)
    got = run("synthetic", method, t)
    assert differs(got, base_output(case.name, "synthetic")), "the deltas must change the output"
    twin = method
    if case.setup == "quantize" or case.name == "LoRADrop":  # QLoRA: dequantised; LoRADrop: per-layer LoRA
        if isinstance(method, jpeft.OnQuantized):  # its methods, composed, on the dequantised base
            twin = jpeft.compose(*method.methods)
        else:
            twin = jpeft.LoRA(targets=method.targets, rank=method.rank, alpha=method.alpha)
        t = strip_empty(jpeft.dequantize(t)) if case.setup == "quantize" else {k: v for k, v in t.items() if k != R}
    want = jpeft.wrap(Unrolled().apply, twin)({"params": unstack(t)}, M.inputs())
    np.testing.assert_allclose(got, np.asarray(want), **TOL)


# --- named adapters and mixed batches ---------------------------------------------------------------
def rename(t: Any, old: str, new: str) -> Any:
    if not isinstance(t, dict):
        return t
    out = {k: rename(v, old, new) for k, v in t.items()}
    if R in out:
        out[R] = {new if k == old else k: v for k, v in out[R].items()}
    return out


def check_named(case: X.Case) -> None:
    method = case.method()
    t = tree(case)
    want = run("gpt2", method, t)
    assert differs(want, base_output(case.name, "gpt2")), "the deltas must change the output"
    named = tree(case, names=("x",))
    assert deltas(named).keys() == deltas(rename(t, "default", "x")).keys()
    np.testing.assert_allclose(run("gpt2", method, rename(t, "default", "x"), active="x"), want, **TOL)


def check_mixed(case: X.Case) -> None:
    method = case.method()
    t = tree(case, names=("a", "b"))
    indices = ([0, 1], [1, -1])
    mixed = [run("gpt2", method, t, active=["a", "b"], adapter_index=jnp.asarray(i, jnp.int32)) for i in indices]
    singles = [run("gpt2", method, t, active=n) for n in ("a", "b")]
    base = base_output(case.name, "gpt2")
    assert differs(singles[0], singles[1]) and differs(singles[0], base), "the adapters must differ"
    for index, got in zip(indices, mixed, strict=True):
        for row, i in enumerate(index):
            want = base[row] if i < 0 else singles[i][row]
            np.testing.assert_allclose(got[row], want, **TOL, err_msg=f"adapter_index={index}, row {row}")


# --- AdapterDrop -------------------------------------------------------------------------------------
def without_layers(t: Any, layers: set[int], names: tuple[str, ...], pattern: str, empty: bool = False) -> Any:
    """The tree with the given layers' deltas of ``names`` removed (an independent way to drop them).

    ``empty``: keep an empty delta node instead (QLoRA's marker of a quantised module without factors)."""
    import re

    compiled_pattern = re.compile(pattern)

    def visit(node: Any, path: tuple[str, ...]) -> Any:
        if not isinstance(node, dict):
            return node
        out = {k: visit(v, (*path, k)) for k, v in node.items() if k != R}
        if R in node:
            m = compiled_pattern.search("/".join(path))
            gone = {k for k in node[R] if m and int(m.group(1)) in layers and k in names}
            keep = {k: ({} if k in gone else v) for k, v in node[R].items() if empty or k not in gone}
            if keep:
                out[R] = keep
        return out

    return visit(t, ())


def check_drop_static(case: X.Case) -> None:
    method = case.method()
    t = tree(case, scale=0.3)
    pattern = jpeft.profiles.matching(model("gpt2")[0])[0].layer_pattern
    for drop in ({0}, set(range(H.LAYERS))):
        got = run("gpt2", method, t, drop_layers=sorted(drop))
        rest = without_layers(t, drop, ("default",), pattern, empty=case.setup == "quantize")
        left = any("'default'" in p for p in deltas(rest))
        want = run("gpt2", method, rest) if left else base_output(case.name, "gpt2")
        np.testing.assert_allclose(got, want, **TOL, err_msg=f"drop_layers={sorted(drop)}")
    if deltas(rest).keys() != deltas(t).keys():  # deltas outside the layers (a prompt) are never dropped
        assert differs(got, run("gpt2", method, t)), "dropping must change the output"


def check_drop_random(case: X.Case) -> None:
    method = case.method()
    t, f = jpeft.split(method, tree(case))
    jitted, _, _ = compiled(case.name)  # the loss and gradient without AdapterDrop
    v, g = jitted(t, f)
    shape = run("gpt2", method, tree(case)).shape
    v0, g0 = jax.value_and_grad(loss_fn("gpt2", method, shape, drop_random=0))(t, f, rngs={"dropout": KEY})
    np.testing.assert_allclose(v0, v, rtol=1e-5)
    got, want = flat(g0), flat(g)
    assert got.keys() == want.keys()
    assert any(np.any(np.asarray(x) != 0) for x in want.values())
    for p in want:
        np.testing.assert_allclose(got[p], want[p], rtol=1e-4, atol=1e-5, err_msg=p)


# --- cached generation -------------------------------------------------------------------------------
def check_generate(case: X.Case) -> None:
    method = case.method()
    t = tree(case, "sharp", scale=0.5)
    ids = H.make("gpt2").inputs["input_ids"][:, :4]
    got = np.asarray(jpeft.generate(model("sharp")[1], method, t, ids, 2))
    want = G.without_cache(model("sharp")[1], method, t, ids, 2)
    np.testing.assert_array_equal(got, want)


# --- bf16 base ---------------------------------------------------------------------------------------
def check_bf16(case: X.Case) -> None:
    method = case.method()
    t16, t32 = tree(case, "gpt2_bf16"), tree(case, "gpt2")
    dtypes = {p: x.dtype for p, x in deltas(t16).items() if not any(f"'{n}'" in p for n in X.FUSED)}
    assert all(d == jnp.float32 for d in dtypes.values()), {p: d for p, d in dtypes.items() if d != jnp.float32}
    if not method.has_deltas:
        assert not dtypes
    got, want = run("gpt2_bf16", method, t16), run("gpt2", method, t32)
    scale = np.abs(want).max()
    assert np.abs(got - want).max() <= 0.05 * scale, (np.abs(got - want).max(), scale)


# --- pooled classification head ------------------------------------------------------------------------
def check_pooled(case: X.Case) -> None:
    method = case.method("bert")
    t = tree(case, "bert", method=method, scale=0.3)
    got = run("bert", method, t)
    # PromptEnsemble returns one row per member first: (k, B, 3).
    lead = (method.k,) if isinstance(method, jpeft.PromptEnsemble) else ()
    assert got.shape == (*lead, H.BATCH, 3) and np.isfinite(got).all()
    assert differs(got, base_output(case.name, "bert")), "the deltas must change the output"

    # Token 0 is jpeft's placeholder id (and BERT's padding, masked out of the one padded position).
    words = t["bert"]["embeddings"]["word_embeddings"]
    e = np.array(words["embedding"])
    e[0] = 5 * np.random.RandomState(1).standard_normal(e.shape[1])
    other = {**t, "bert": {**t["bert"], "embeddings": {**t["bert"]["embeddings"], "word_embeddings": {**words, "embedding": e}}}}
    np.testing.assert_allclose(run("bert", method, other), got, **TOL)
    if method.identity_at_init:
        init = tree(case, "bert", method=method, random=False)
        np.testing.assert_allclose(run("bert", method, init), base_output(case.name, "bert"), rtol=1e-5, atol=1e-6)


# --- tied embeddings -----------------------------------------------------------------------------------
def check_tied(case: X.Case) -> None:
    params, apply = model("gpt2")[:2]
    assert "lm_head" not in params, "tiny GPT-2's LM head is tied to wte"
    wte = params["transformer"]["wte"]["embedding"]
    if case.embedding:  # HF PEFT's semantics: the delta adapts the input lookup, the tied head reads the base table
        method = case.method("gpt2", targets=X.EMBEDDING["gpt2"])
        t = tree(case, method=method, scale=0.3)
        got = run("gpt2", method, t)
        # The adapted table, from merge on the *untied* tree (an lm_head leaf of its own).
        untied = jpeft.merge(method, {**t, "lm_head": {"kernel": wte.T}})
        adapted = {**params, "transformer": {**params["transformer"], "wte": untied["transformer"]["wte"]}}
        assert not np.allclose(adapted["transformer"]["wte"]["embedding"], wte)
        hf = H.make("gpt2")
        hidden = hf.apply({"params": adapted}, **hf.inputs, output_hidden_states=True).hidden_states[-1]
        np.testing.assert_allclose(got, np.asarray(hidden, np.float64) @ np.asarray(wte, np.float64).T, rtol=1e-4, atol=2e-4)
        with pytest.raises(jpeft.JpeftError, match="tied embedding"):
            jpeft.merge(method, t)
        return
    method = case.method()
    if not method.has_deltas:  # the lookup and the tied head read the one (trained) leaf
        check_no_deltas(case)
        return
    t = tree(case)
    assert t["transformer"]["wte"]["embedding"] is wte
    if method.mergeable and method.has_deltas:
        merged = jpeft.merge(method, t)
        assert merged["transformer"]["wte"]["embedding"] is wte
        np.testing.assert_allclose(np.asarray(call("gpt2", apply, {"params": merged})), run("gpt2", method, t), **TOL)


# --- jpeft.optimizer with a global-norm chain ----------------------------------------------------------
def check_optimizer(case: X.Case) -> None:
    method = case.method()
    t = tree(case)
    tx = jpeft.optimizer(optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(1.0)), method, t)
    rng = np.random.RandomState(5)
    grads = jax.tree.map(
        lambda x: jnp.asarray(rng.standard_normal(x.shape), x.dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x * 0,
        t,
    )
    updates, _ = tx.update(grads, tx.init(t), t)
    # A quantised kernel (NF4Array) is one labelled node: its triple holds the whole subtree.
    triples = jax.tree.map(lambda lab, g, u: (lab, g, u), jpeft.labels(method, t), grads, updates)
    pairs = jax.tree.leaves(triples, is_leaf=lambda x: isinstance(x, tuple))
    trainable = [(lab, np.asarray(g, np.float64), np.asarray(u, np.float64)) for lab, g, u in pairs if lab != "frozen"]
    for lab, _, u in pairs:
        if lab == "frozen":
            assert not any(np.any(np.asarray(x)) for x in jax.tree.leaves(u)), "a frozen leaf moved"
    norm = np.sqrt(sum(np.sum(g**2) for _, g, _ in trainable))
    assert norm > 1, "the gradient must be large enough to be clipped"
    ratio = getattr(method, "lr_ratio", 1.0)
    for lab, g, u in trainable:
        want = -g / norm * (ratio if lab == "lora_b" else 1.0)
        np.testing.assert_allclose(u, want, rtol=1e-5, atol=1e-7, err_msg=lab)


# --- save / restore ------------------------------------------------------------------------------------
def check_save_restore(case: X.Case, tmp_path: Any) -> None:
    method = case.method()
    t0, f0 = jpeft.split(method, tree(case))
    jitted, _, _ = compiled(case.name)
    adam = optax.adam(1e-2)

    def opt(m: jpeft.Method, p: Any) -> optax.GradientTransformation:
        return jpeft.optimizer(adam, m, jpeft.split(m, p)[0])

    def steps(t: Any, f: Any, state: Any, n: int) -> tuple[Any, Any]:
        tx = opt(method, jpeft.combine(t, f))
        for _ in range(n):
            _, g = jitted(t, f)
            updates, state = tx.update(g, state, t)
            t = optax.apply_updates(t, updates)
        return t, state

    init = opt(method, jpeft.combine(t0, f0)).init(t0)
    t5, _ = steps(t0, f0, init, 5)
    t3, s3 = steps(t0, f0, init, 3)
    saved = jpeft.combine(t3, f0)
    jpeft.save(tmp_path, method, saved, step=3, opt_state=s3)
    back = jpeft.restore(tmp_path, base_tree(case.name, "gpt2"), opt_state=lambda m, p: opt(m, p).init(jpeft.split(m, p)[0]))
    assert back.method == method and back.step == 3
    want, got = flat(saved), flat(back.params)
    assert jax.tree.structure(back.params) == jax.tree.structure(saved), "restore changed the tree's structure"
    assert got.keys() == want.keys()
    for p in want:
        np.testing.assert_array_equal(np.asarray(got[p]), np.asarray(want[p]), err_msg=p)
    t, f = jpeft.split(method, back.params)
    t, _ = steps(t, f, back.opt_state, 2)
    want, got = flat(t5), flat(t)
    assert got.keys() == want.keys()
    for p in want:
        np.testing.assert_array_equal(np.asarray(got[p]), np.asarray(want[p]), err_msg=p)


CHECKS: dict[str, Callable[..., None]] = {
    "jit": check_jit,
    "scan": check_scan,
    "named": check_named,
    "mixed": check_mixed,
    "drop_static": check_drop_static,
    "drop_random": check_drop_random,
    "generate": check_generate,
    "bf16": check_bf16,
    "pooled": check_pooled,
    "tied": check_tied,
    "optimizer": check_optimizer,
    "save_restore": check_save_restore,
    "nnx": MN.check_nnx,
}


def check_no_deltas(case: X.Case) -> None:
    """The n/a cells of methods without deltas: they add nothing to the tree, and wrap is the apply itself."""
    method = case.method()
    params, apply = model("gpt2")[:2]
    assert not method.has_deltas
    assert not deltas(jpeft.apply(method, params, key=jax.random.key(0), name="x"))
    t = tree(case)  # the trained base leaves perturbed
    want = np.asarray(call("gpt2", apply, {"params": t}))
    assert differs(want, base_output(case.name, "gpt2"))
    np.testing.assert_array_equal(run("gpt2", method, t, active="x"), want)


def _params() -> list[Any]:
    out = []
    for case in X.CASES:
        for feature in X.FEATURES:
            kind, detail, _ = X.status(case, feature)
            marks = [pytest.mark.xfail(strict=True, reason=detail)] if kind == "xfail" else []
            out.append(pytest.param(case.name, feature, id=f"{case.name}-{feature}", marks=marks))
    return out


@pytest.mark.parametrize("name,feature", _params())
def test_cell(name: str, feature: str, tmp_path: Any) -> None:
    case = X.BY_NAME[name]
    kind, _, error = X.status(case, feature)
    check = CHECKS[feature]
    if kind == "n/a":
        check = check_tied if feature == "tied" else check_no_deltas
    kw = {"tmp_path": tmp_path} if feature == "save_restore" else {}
    if error:
        with pytest.raises(jpeft.JpeftError, match=error):
            check(case, **kw)
        return
    check(case, **kw)


def test_every_method_is_a_row():
    classes = {
        name
        for name in jpeft.__all__
        if isinstance(getattr(jpeft, name), type)
        and issubclass(getattr(jpeft, name), jpeft.Method)
        and getattr(jpeft, name) not in (jpeft.Method, jpeft.Compose)
    }
    rows = {type(c.method()).__name__ for c in X.CASES}
    assert classes <= rows | {"LoRA"}, sorted(classes - rows)
    assert set(X.FEATURES) == set(CHECKS) == set(X.FEATURE_DOCS)


def test_readme_table_is_up_to_date():
    from tests import matrix_table

    assert matrix_table.current() == matrix_table.render(), "run: python -m tests.matrix_table"
