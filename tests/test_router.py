"""Dynamic selection (jpeft.fit_router, jpeft.Router, jpeft.run_routed).

Oracles: nearest-centroid routing by hand in NumPy; a routed LoRA batch against each row run alone
through the base model with its adapter merged by hand (W + s A B, NumPy); a routed prompt batch
against each row run alone with its prompt; an NNX model against the same hand merge.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jpeft
from jpeft._tree import RESERVED
from tests._hf_models import VOCAB, make

NAMES = ("news", "movies", "tweets")
N, SEQ = 6, 8


def _blobs(n_per: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centers = np.array([[4.0, 0, 0, 0], [0, 4.0, 0, 0], [0, 0, 4.0, 0]])
    x = np.concatenate([c + rng.normal(size=(n_per, 4)) for c in centers]).astype(np.float32)
    return x, np.repeat(np.arange(3), n_per).astype(np.int32)


def test_centroid_routing_by_hand():
    x = np.array([[0.0, 0], [2, 0], [10, 10], [12, 10], [0, 9], [0, 11]], np.float32)
    y = np.array([0, 0, 1, 1, 2, 2])
    router = jpeft.fit_router(x, y, NAMES, kind="centroid")
    centroids = np.array([[1.0, 0], [11, 10], [0, 10]])
    np.testing.assert_allclose(router.arrays["centroids"], centroids)
    q = np.array([[1.0, 1], [9, 9], [1, 8], [6, 5.5], [5.9, 5.0]], np.float32)
    dist = ((q[:, None, :] - centroids[None]) ** 2).sum(-1)
    assert np.asarray(router.route(q)).tolist() == dist.argmin(1).tolist() == [0, 1, 2, 1, 0]
    np.testing.assert_allclose(np.asarray(router.scores(q)), -dist, rtol=1e-5)
    assert jax.jit(router.route)(q).tolist() == [0, 1, 2, 1, 0]  # traces


def test_linear_router_learns_a_separable_case():
    x, y = _blobs(40, 0)
    router = jpeft.fit_router(x, y, NAMES, kind="linear")
    held_x, held_y = _blobs(30, 1)
    assert (np.asarray(router.route(x)) == y).all()
    assert (np.asarray(router.route(held_x)) == held_y).mean() >= 0.98
    # separable along one axis only, with a large nuisance axis the centroid rule cannot discount
    rng = np.random.default_rng(2)
    label = rng.integers(0, 2, 400)
    z = np.stack([label * 1.0 + 0.05 * rng.normal(size=400), 30 * rng.normal(size=400)], 1).astype(np.float32)
    linear = jpeft.fit_router(z, label.astype(np.int32), ("a", "b"), steps=500)
    centroid = jpeft.fit_router(z, label.astype(np.int32), ("a", "b"), kind="centroid")
    assert (np.asarray(linear.route(z)) == label).mean() == 1.0
    assert (np.asarray(centroid.route(z)) == label).mean() < 0.9


@pytest.fixture(scope="module")
def bert():
    hf = make("bert")
    ids = np.random.default_rng(0).integers(3, VOCAB, (N, SEQ)).astype(np.int32)
    mask = np.ones((N, SEQ), np.int32)
    mask[1, -2:] = 0
    inputs = {
        "input_ids": jnp.asarray(ids),
        "attention_mask": jnp.asarray(mask),
        "token_type_ids": jnp.zeros((N, SEQ), jnp.int32),
        "position_ids": jnp.asarray(np.broadcast_to(np.arange(SEQ), (N, SEQ)).astype(np.int32)),
    }
    # rows 0..5 sit near the centroids of tasks 2, 0, 1, 1, 0, 2
    centroids = np.eye(3, dtype=np.float32) * 5
    router = jpeft.fit_router(centroids, np.arange(3, dtype=np.int32), NAMES, kind="centroid")
    features = centroids[[2, 0, 1, 1, 0, 2]] + 0.1
    return hf, inputs, router, features


def _random_b(tree, seed):
    leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
    rng = np.random.default_rng(seed)
    out = [
        jnp.asarray(rng.normal(0, 0.3, v.shape), v.dtype) if "lora_b" in jax.tree_util.keystr(p) else v
        for p, v in leaves
    ]
    return jax.tree_util.tree_unflatten(treedef, out)


def _merged_by_hand(peft, name, scale):
    """The base tree with ``W + scale * A @ B`` for adapter ``name``, in NumPy."""

    def walk(node):
        if not isinstance(node, dict):
            return node
        out = {k: walk(v) for k, v in node.items() if k != RESERVED}
        if RESERVED in node:
            d = node[RESERVED][name]
            out["kernel"] = jnp.asarray(
                np.asarray(node["kernel"]) + scale * np.asarray(d["lora_a"]) @ np.asarray(d["lora_b"])
            )
        return out

    return walk(peft)


def test_routed_lora_batch_equals_each_row_alone(bert):
    hf, inputs, router, features = bert
    method = jpeft.LoRA(targets=("query", "value"), rank=2, alpha=4.0)
    peft = hf.params
    for i, name in enumerate(NAMES):
        peft = jpeft.apply(method, peft, key=jax.random.key(i), name=name)
    peft = _random_b(peft, 0)
    out, index = jpeft.run_routed(router, features, hf.apply, **inputs, method=method, variables={"params": peft})
    assert index.tolist() == [2, 0, 1, 1, 0, 2]
    grouped, _ = jpeft.run_routed(
        router, features, hf.apply, **inputs, method=method, variables={"params": peft}, mode="grouped"
    )
    base = jax.jit(hf.apply)  # one compile for every row and adapter
    for i, k in enumerate(index.tolist()):
        row = {key: v[i : i + 1] for key, v in inputs.items()}
        alone = hf.logits(base({"params": _merged_by_hand(peft, NAMES[k], 2.0)}, **row))
        np.testing.assert_allclose(hf.logits(out)[i : i + 1], alone, atol=1e-5)
        np.testing.assert_allclose(hf.logits(grouped)[i : i + 1], alone, atol=1e-5)
    others = [hf.logits(base({"params": _merged_by_hand(peft, n, 2.0)}, **inputs)) for n in NAMES]
    assert min(float(jnp.abs(others[0] - o).max()) for o in others[1:]) > 1e-3  # the adapters differ


def test_routed_prompt_batch_groups_rows(bert):
    hf, inputs, router, features = bert
    method = jpeft.PromptTuning(num_virtual_tokens=2)
    peft = hf.params
    for i, name in enumerate(NAMES):
        peft = jpeft.apply(method, peft, key=jax.random.key(10 + i), name=name)
    out, index = jpeft.run_routed(router, features, hf.apply, **inputs, method=method, variables={"params": peft})
    for i, k in enumerate(index.tolist()):
        row = {key: v[i : i + 1] for key, v in inputs.items()}
        alone = hf.logits(jpeft.wrap(hf.apply, method, active=NAMES[k])({"params": peft}, **row))
        np.testing.assert_allclose(hf.logits(out)[i : i + 1], alone, atol=1e-5)
    with pytest.raises(jpeft.JpeftError, match=r"mode='mixed'.*PromptTuning cannot run one adapter per row"):
        jpeft.run_routed(router, features, hf.apply, **inputs, method=method, variables={"params": peft}, mode="mixed")


class _Mlp(nnx.Module):
    def __init__(self):
        self.up = nnx.Linear(4, 8, rngs=nnx.Rngs(0))
        self.down = nnx.Linear(8, 3, rngs=nnx.Rngs(1))

    def __call__(self, x):
        return self.down(jax.nn.gelu(self.up(x)))


def test_routed_nnx_model_against_hand_merge():
    method = jpeft.LoRA(targets=".*", rank=2, alpha=2.0)
    model = _Mlp()
    w = {
        k: (np.asarray(getattr(model, k).kernel[...]), np.asarray(getattr(model, k).bias[...])) for k in ("up", "down")
    }
    for i, name in enumerate(NAMES):
        model = jpeft.apply(method, model, key=jax.random.key(i), name=name)
    rng = np.random.default_rng(3)
    for k in ("up", "down"):
        for name in NAMES:
            b = getattr(model, k).__jpeft__[name]["lora_b"]
            b[...] = jnp.asarray(rng.normal(0, 0.5, b.shape), jnp.float32)
    x = jnp.asarray(rng.normal(size=(5, 4)), jnp.float32)
    router = jpeft.fit_router(np.eye(3, dtype=np.float32), np.arange(3, dtype=np.int32), NAMES, kind="centroid")
    out, index = jpeft.run_routed(router, np.eye(3, dtype=np.float32)[[1, 2, 0, 0, 2]], model, x)
    assert index.tolist() == [1, 2, 0, 0, 2]
    for i, k in enumerate(index.tolist()):
        d = {m: getattr(model, m).__jpeft__[NAMES[k]] for m in ("up", "down")}
        kern = {m: w[m][0] + np.asarray(d[m]["lora_a"][...]) @ np.asarray(d[m]["lora_b"][...]) for m in ("up", "down")}
        h = np.asarray(jax.nn.gelu(jnp.asarray(np.asarray(x[i]) @ kern["up"] + w["up"][1])))
        np.testing.assert_allclose(np.asarray(out[i]), h @ kern["down"] + w["down"][1], atol=1e-5)
    with pytest.raises(jpeft.JpeftError, match=r"adapter\(s\) \['gone'\] that the model do not hold"):
        bad = jpeft.fit_router(np.eye(2, dtype=np.float32), np.arange(2, dtype=np.int32), ("news", "gone"))
        jpeft.run_routed(bad, np.eye(2, dtype=np.float32)[[0, 1, 0, 1, 0]], model, x)


def test_bad_inputs_are_clear_errors(bert):
    hf, inputs, router, features = bert
    method = jpeft.LoRA(targets=("query",), rank=2)
    peft = jpeft.apply(
        method, jpeft.apply(method, hf.params, key=jax.random.key(0), name="news"), key=jax.random.key(1), name="movies"
    )
    v = {"params": peft}
    x, y = _blobs(3, 0)
    E = jpeft.JpeftError
    with pytest.raises(
        E, match=r"router names adapter\(s\) \['tweets'\] that the params do not hold \(it holds \['movies', 'news'\]\)"
    ):
        jpeft.run_routed(router, features, hf.apply, **inputs, method=method, variables=v)
    with pytest.raises(E, match=r"no example of task\(s\) \['tweets'\]"):
        jpeft.fit_router(x[:6], y[:6], NAMES)
    with pytest.raises(E, match=r"features must be \(N, 3\).*shape \(6, 4\)"):
        router.route(np.zeros((6, 4), np.float32))
    with pytest.raises(E, match=r"features have 5 rows but the batch's first array input has shape \(6, 8\)"):
        two = jpeft.fit_router(np.eye(2, dtype=np.float32), np.arange(2, dtype=np.int32), ("news", "movies"))
        jpeft.run_routed(two, np.zeros((5, 2), np.float32), hf.apply, **inputs, method=method, variables=v)
    with pytest.raises(E, match=r"task_ids must be a 1-D int array with one entry per feature row \(9\)"):
        jpeft.fit_router(x, y[:5], NAMES)
    with pytest.raises(E, match=r"task_ids holds \[3\]"):
        jpeft.fit_router(x, np.where(y == 2, 3, y), NAMES)
    with pytest.raises(E, match=r"features must be a finite float array \(N, d\)"):
        jpeft.fit_router(x[:, 0], y, NAMES)
    with pytest.raises(E, match=r"names must be distinct"):
        jpeft.fit_router(x, y, ("a", "a", "b"))
    with pytest.raises(E, match=r"kind='knn'"):
        jpeft.fit_router(x, y, NAMES, kind="knn")
    with pytest.raises(E, match=r"steps=0"):
        jpeft.fit_router(x, y, NAMES, steps=0)
    with pytest.raises(E, match=r"mode='all'"):
        jpeft.run_routed(router, features, hf.apply, **inputs, method=method, variables=v, mode="all")
    with pytest.raises(E, match=r"needs method=<the jpeft method> and variables="):
        jpeft.run_routed(router, features, hf.apply, **inputs)


def test_grouped_outputs_need_a_batch_axis():
    import flax.linen as nn

    model, x = nn.Dense(3), jnp.ones((4, 2))
    method = jpeft.LoRA(targets=".*", rank=1)
    peft = jpeft.apply(method, model.init(jax.random.key(0), x)["params"], key=jax.random.key(1), name="a")
    peft = jpeft.apply(method, peft, key=jax.random.key(2), name="b")
    router = jpeft.fit_router(np.array([[0.0], [1.0]]), np.array([0, 1]), ("a", "b"), kind="centroid")
    feats = np.array([[0.0], [1.0], [1.0], [0.0]])
    total = lambda variables, x: model.apply(variables, x).sum()  # noqa: E731
    with pytest.raises(
        jpeft.JpeftError, match=r"output leaf of shape \(\) has no leading batch axis of the group's 2 rows"
    ):
        jpeft.run_routed(router, feats, total, x, method=method, variables={"params": peft}, mode="grouped")
    y, _ = jpeft.run_routed(router, feats, model.apply, x, method=method, variables={"params": peft}, mode="grouped")
    mixed, _ = jpeft.run_routed(router, feats, model.apply, x, method=method, variables={"params": peft})
    np.testing.assert_allclose(y, mixed, atol=1e-6)
