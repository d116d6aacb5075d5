"""Intrinsic prompt tuning (``jpeft.IntrinsicPromptTuning``, ``jpeft.fit_intrinsic_projection``).

Oracles: a plain ``jpeft.PromptTuning`` whose prompt is written by hand (the identity projection's
prompt, and a NumPy up-projection of the intrinsic vector for the linear and MLP kinds); the
gradient of the intrinsic vector against ``B @ grad(prompt)`` from the plain prompt; PCA against
NumPy's SVD and a prompt that lies in the span.
"""

from __future__ import annotations

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jpeft
from jpeft._tree import RESERVED
from tests import _hf_models as H

P, D = 2, H.HIDDEN
EMBED = {"gpt2": ("transformer", "wte"), "bert": ("bert", "embeddings", "word_embeddings")}


def _store(tree: dict, family: str) -> dict:
    node = tree
    for k in EMBED[family]:
        node = node[k]
    return node[RESERVED]["default"]


def _set(tree: dict, family: str, leaf: str, value: jax.Array) -> dict:
    flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(tree))
    flat[EMBED[family] + (RESERVED, "default", leaf)] = value
    return flax.traverse_util.unflatten_dict(flat)


def _plain_tree(model: H.HFModel, family: str, prompt: jax.Array) -> tuple[jpeft.PromptTuning, dict]:
    one = jpeft.PromptTuning(num_virtual_tokens=P)
    return one, _set(jpeft.apply(one, model.params, key=jax.random.key(9)), family, "prompt", jnp.asarray(prompt))


def _plain(model: H.HFModel, family: str, prompt: jax.Array) -> np.ndarray:
    one, tree = _plain_tree(model, family, prompt)
    return np.asarray(model.logits(jpeft.wrap(model.apply, one)({"params": tree}, **model.inputs)))


def _run(model: H.HFModel, method: jpeft.Method, tree: dict) -> np.ndarray:
    return np.asarray(model.logits(jpeft.wrap(model.apply, method)({"params": tree}, **model.inputs)))


@pytest.mark.parametrize("family", ["gpt2", "bert"])
def test_identity_projection_equals_prompt_tuning(family: str) -> None:
    model = H.make(family)
    method = jpeft.IntrinsicPromptTuning(dim=P * D, projection=np.eye(P * D), num_virtual_tokens=P)
    prompt = np.random.default_rng(1).normal(0, 0.5, (P, D)).astype(np.float32)
    tree = _set(jpeft.apply(method, model.params, key=jax.random.key(0)), family, "intrinsic", prompt.ravel())
    np.testing.assert_array_equal(_run(model, method, tree), _plain(model, family, prompt))


@pytest.mark.parametrize("kind", ["pca", "autoencoder"])
def test_projection_prompt_equals_numpy_up_projection(kind: str) -> None:
    model = H.make("gpt2")
    sources = np.random.default_rng(2).normal(0, 0.3, (12, P, D))
    proj = jpeft.fit_intrinsic_projection(sources, 3, kind=kind, hidden=16, steps=50)
    method = jpeft.IntrinsicPromptTuning(dim=3, projection=proj)
    tree = jpeft.apply(method, model.params, key=jax.random.key(0))
    z = np.asarray([0.4, -0.7, 1.1], np.float32)
    tree = _set(tree, "gpt2", "intrinsic", z)
    w = proj.weights
    if kind == "pca":  # the start is the mean prompt
        np.testing.assert_array_equal(np.asarray(_store(tree, "gpt2")["up_mean"]), w["up_mean"])
        flat = w["up_mean"] + z @ w["up_basis"]
    else:
        flat = np.tanh(z @ w["up_w1"] + w["up_b1"]) @ w["up_w2"] + w["up_b2"]
    np.testing.assert_allclose(
        _run(model, method, tree), _plain(model, "gpt2", flat.reshape(P, D)), rtol=1e-5, atol=1e-5
    )


def test_only_the_intrinsic_vector_trains_and_its_gradient_is_b_times_the_prompts() -> None:
    model = H.make("gpt2")
    basis = np.random.default_rng(3).normal(0, 0.2, (5, P * D)).astype(np.float32)
    method = jpeft.IntrinsicPromptTuning(dim=5, projection=basis, num_virtual_tokens=P)
    peft = jpeft.apply(method, model.params, key=jax.random.key(0))
    z = np.random.default_rng(4).normal(size=5).astype(np.float32)
    peft = _set(peft, "gpt2", "intrinsic", z)
    labels = _store(jpeft.labels(method, peft), "gpt2")
    assert labels == {"intrinsic": "trainable", "up_mean": "frozen", "up_basis": "frozen"}
    trainable, frozen = jpeft.split(method, peft)
    assert [p for p, _ in jpeft._tree.leaves(trainable)] == [EMBED["gpt2"] + (RESERVED, "default", "intrinsic")]
    assert _store(frozen, "gpt2")["up_basis"] is not None and _store(trainable, "gpt2")["up_basis"] is None
    wrapped = jpeft.wrap(model.apply, method)
    loss = lambda t: model.logits(wrapped({"params": jpeft.combine(t, frozen)}, **model.inputs)).sum()  # noqa: E731
    g = jax.grad(loss)(trainable)
    assert [p for p, _ in jpeft._tree.leaves(g)] == [EMBED["gpt2"] + (RESERVED, "default", "intrinsic")]
    # oracle: the plain prompt's gradient, pulled back through prompt = z B
    one, tree = _plain_tree(model, "gpt2", (z @ basis).reshape(P, D))
    plain = jpeft.wrap(model.apply, one)
    gp = jax.grad(lambda t: model.logits(plain({"params": t}, **model.inputs)).sum())(tree)
    expected = basis @ np.asarray(_store(gp, "gpt2")["prompt"]).ravel()
    np.testing.assert_allclose(np.asarray(_store(g, "gpt2")["intrinsic"]), expected, rtol=1e-4, atol=1e-5)
    assert method.param_count(model.params) == 5 and jpeft.summary(method, peft) is not None


def test_random_projection_default() -> None:
    model = H.make("bert")
    method = jpeft.IntrinsicPromptTuning(dim=4, num_virtual_tokens=P)
    store = _store(jpeft.apply(method, model.params, key=jax.random.key(0)), "bert")
    assert store["intrinsic"].shape == (4,) and store["up_basis"].shape == (4, P * D)
    assert not np.allclose(store["up_basis"], 0) and np.abs(store["intrinsic"]).max() <= 0.5


def test_pca_recovers_a_prompt_in_the_span() -> None:
    rng = np.random.default_rng(5)
    mean, span = rng.normal(size=P * D), rng.normal(size=(3, P * D))
    prompts = (mean + rng.normal(size=(20, 3)) @ span).reshape(20, P, D)
    proj = jpeft.fit_intrinsic_projection(prompts, 3, kind="pca")
    b = proj.weights["up_basis"]
    np.testing.assert_allclose(b @ b.T, np.eye(3), atol=1e-5)  # orthonormal directions
    flat = prompts.reshape(20, -1)
    _, _, vt = np.linalg.svd(flat - flat.mean(0), full_matrices=False)
    np.testing.assert_allclose(b.T @ b, vt[:3].T @ vt[:3], atol=1e-5)  # the same subspace as NumPy's SVD
    target = mean + np.array([0.5, -2.0, 1.0]) @ span  # a new prompt in the span
    z = (target - proj.weights["up_mean"]) @ b.T
    np.testing.assert_allclose(proj.up(z), target.reshape(P, D), rtol=1e-4, atol=1e-4)
    assert np.abs(proj.init).max() == 0.0


def test_autoencoder_reconstructs_and_takes_a_task_loss() -> None:
    rng = np.random.default_rng(6)
    prompts = (rng.normal(size=(16, 2)) @ rng.normal(size=(2, P * D))).reshape(16, P, D) * 0.3
    proj = jpeft.fit_intrinsic_projection(prompts, 2, kind="autoencoder", hidden=32, steps=400, lr=1e-2)
    codes = prompts.reshape(16, -1) @ proj.down["w"] + proj.down["b"]
    err = np.mean((proj.up(codes) - prompts) ** 2) / np.mean((prompts - prompts.mean(0)) ** 2)
    assert err < 0.1, err
    np.testing.assert_allclose(proj.init, codes.mean(0), rtol=1e-5, atol=1e-6)
    seen = []
    target = jnp.full((P, D), 0.7)

    def task(recon: jax.Array) -> jax.Array:
        seen.append(recon.shape)
        return jnp.mean((recon - target[None]) ** 2)

    pulled = jpeft.fit_intrinsic_projection(
        prompts, 2, kind="autoencoder", hidden=32, steps=400, lr=1e-2, task_loss=task, task_weight=100.0
    )
    assert seen[0] == (16, P, D)
    dist = lambda p: np.mean((p.up(p.init) - 0.7) ** 2)  # noqa: E731
    assert dist(pulled) < dist(proj)  # the task term moves the reconstructions


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"dim": 0}, r"dim=0\): dim .* must be an int >= 1"),
        ({"dim": -2}, r"must be an int >= 1"),
        ({"dim": True}, r"must be an int >= 1"),
        (
            {"dim": 3, "projection": np.zeros((4, 8)), "num_virtual_tokens": 2},
            r"\(dim, P\*d\) = \(3, P\*d\) matrix; got ndarray of shape \(4, 8\)",
        ),
        ({"dim": 3, "projection": np.zeros(8)}, r"got ndarray of shape \(8,\)"),
        ({"dim": 3, "projection": np.zeros((3, 8))}, r"needs num_virtual_tokens=P"),
        ({"dim": 3, "projection": np.zeros((3, 9)), "num_virtual_tokens": 2}, r"width 9 is not a multiple of P"),
        ({"dim": 3, "init": "vocab"}, r"init/init_ids/init_text are PromptTuning's"),
    ],
)
def test_bad_method_inputs(kwargs: dict, match: str) -> None:
    with pytest.raises(jpeft.JpeftError, match=match):
        jpeft.IntrinsicPromptTuning(**kwargs)


def test_projection_mismatches(tmp_path) -> None:
    proj = jpeft.fit_intrinsic_projection(np.random.default_rng(0).normal(size=(6, P, D + 1)), 2)
    with pytest.raises(jpeft.JpeftError, match=r"pass dim=2"):
        jpeft.IntrinsicPromptTuning(dim=3, projection=proj)
    with pytest.raises(jpeft.JpeftError, match=r"prompts of shape \(2, 33\) \(P = 2\); leave num_virtual_tokens unset"):
        jpeft.IntrinsicPromptTuning(dim=2, projection=proj, num_virtual_tokens=4)
    model = H.make("gpt2")
    with pytest.raises(
        jpeft.JpeftError, match=r"shape \(2, 33\) \(P\*d = 66\), but transformer/wte embeds tokens in d = 32"
    ):
        jpeft.apply(jpeft.IntrinsicPromptTuning(dim=2, projection=proj), model.params, key=jax.random.key(0))
    fitted = jpeft.IntrinsicPromptTuning(dim=2, projection=jpeft.fit_intrinsic_projection(np.zeros((4, P, D)), 2))
    with pytest.raises(jpeft.JpeftError, match=r"jpeft.save: the method field IntrinsicPromptTuning.projection"):
        jpeft.save(str(tmp_path / "ckpt"), fitted, jpeft.apply(fitted, model.params, key=jax.random.key(0)), step=0)
    wide = jpeft.IntrinsicPromptTuning(dim=2, projection=np.zeros((2, 4 * D)), num_virtual_tokens=P)  # P*d = 2*64
    with pytest.raises(jpeft.JpeftError, match=r"P\*d = 128\), but .* so prompts are \(2, 32\)"):
        jpeft.apply(wide, model.params, key=jax.random.key(0))


def test_bad_fit_inputs() -> None:
    good = np.zeros((4, P, D))
    with pytest.raises(jpeft.JpeftError, match=r"non-empty \(N, P, d\) array .* got shape \(4, 64\)"):
        jpeft.fit_intrinsic_projection(np.zeros((4, 64)), 2)
    with pytest.raises(jpeft.JpeftError, match=r"must be an int >= 1"):
        jpeft.fit_intrinsic_projection(good, 0)
    with pytest.raises(jpeft.JpeftError, match=r"at most 4 directions; pass more prompts"):
        jpeft.fit_intrinsic_projection(good, 5)
    with pytest.raises(jpeft.JpeftError, match=r"kind"):
        jpeft.fit_intrinsic_projection(good, 2, kind="svd")
    with pytest.raises(jpeft.JpeftError, match=r"weights must have exactly"):
        jpeft.IntrinsicProjection("linear", {"up_mean": np.zeros(4)}, shape=(2, 2))
    with pytest.raises(jpeft.JpeftError, match=r"output of width P\*d = 4"):
        jpeft.IntrinsicProjection("linear", {"up_mean": np.zeros(5), "up_basis": np.zeros((2, 5))}, shape=(2, 2))
