"""jpeft.save / jpeft.restore: what is written, bit-exact resume, atomic saves under SIGKILL, errors.

The kill tests run a child process that saves step 1, then starts another save and SIGKILLs itself
at a fixed point inside it (patched in the child only): after orbax wrote the first item, just
before orbax commits the step, or between the two renames of an ``overwrite=True`` swap. The
parent then checks that the complete checkpoint restores exactly and the partial one is ignored.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jpeft

R = jpeft.RESERVED
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def flat(tree: Any) -> dict[str, Any]:
    pairs, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {jax.tree_util.keystr(p): x for p, x in pairs}


def assert_trees_equal(got: Any, want: Any) -> None:
    """Same structure, and every leaf bit-identical (with the same dtype)."""
    assert jax.tree.structure(got) == jax.tree.structure(want)
    g, w = flat(got), flat(want)
    assert g.keys() == w.keys()
    for k in w:
        assert np.asarray(g[k]).dtype == np.asarray(w[k]).dtype, k
        np.testing.assert_array_equal(np.asarray(g[k]), np.asarray(w[k]), err_msg=k)


def small(seed: int) -> tuple[jpeft.Method, dict[str, Any], dict[str, Any]]:
    """(method, base params, peft params with non-zero deltas drawn from ``seed``), from NumPy only."""
    rng = np.random.RandomState(0)
    params = {
        "q": {"kernel": jnp.asarray(rng.standard_normal((6, 8)), jnp.float32), "bias": jnp.zeros(8)},
        "head": {"kernel": jnp.asarray(rng.standard_normal((8, 3)), jnp.float32), "bias": jnp.zeros(3)},
    }
    method = jpeft.LoRA(targets=["q"], rank=2, extra_trainable=r"head/bias")
    peft = jpeft.apply(method, params, key=jax.random.key(0))
    rng = np.random.RandomState(seed)
    store = peft["q"][R]["default"]
    peft["q"][R]["default"] = {k: jnp.asarray(rng.standard_normal(v.shape), v.dtype) for k, v in store.items()}
    peft["head"]["bias"] = jnp.asarray(rng.standard_normal(3), jnp.float32)
    return method, params, peft


# --- what is written -------------------------------------------------------------------------------
def test_only_deltas_and_trainable_base_leaves_are_written(tmp_path):
    method, params, peft = small(1)
    directory = jpeft.save(tmp_path, method, peft, step=7)
    assert directory == str(tmp_path / "step_7")
    with open(tmp_path / "step_7" / "meta" / "metadata") as f:
        meta = json.load(f)
    assert [p for p, _, _ in meta["params"]] == ["head/bias", "q/__jpeft__/default/lora_a", "q/__jpeft__/default/lora_b"]
    assert meta["params"][1][1:] == [[6, 2], "float32"]
    assert meta["step"] == 7 and meta["adapter"] == "default" and meta["opt_state"] is None
    assert meta["method"]["__dataclass__"] == "jpeft.methods._lora:LoRA"
    assert [p for p, _, _ in meta["base"]["leaves"]] == ["head/bias", "head/kernel", "q/bias", "q/kernel"]
    # No pickle: no file under the checkpoint starts with a pickle protocol header.
    for dirpath, _, files in os.walk(tmp_path):
        for name in files:
            with open(os.path.join(dirpath, name), "rb") as f:
                head = f.read(2)
            assert not (len(head) == 2 and head[0] == 0x80 and head[1] <= 5), os.path.join(dirpath, name)


def test_restore_reattaches_onto_the_base_and_keeps_frozen_leaves(tmp_path):
    method, params, peft = small(1)
    jpeft.save(tmp_path, method, peft, step=3)
    restored = jpeft.restore(tmp_path, params)
    assert isinstance(restored, jpeft.io.Checkpoint)
    assert restored.method == method and type(restored.method) is jpeft.LoRA
    assert restored.step == 3 and restored.opt_state is None
    assert_trees_equal(restored.params, peft)
    assert restored.params["q"]["kernel"] is params["q"]["kernel"]  # frozen leaves: the same objects
    assert "__jpeft__" not in params["q"]  # the input is not mutated


@pytest.mark.parametrize(
    "method",
    [
        jpeft.LoRA(targets=("q",), rank=2, alpha=3.0, use_rslora=True, layouts=((r"q", "dense"),), dtype="float32"),
        jpeft.DoRA(targets=r"q", rank=1, dropout=0.1, init="gaussian"),
        jpeft.LoRAFA(targets=["q"], rank=2),
        jpeft.LoRAPlus(targets=["q"], rank=2, lr_ratio=4.0, extra_trainable=r"head/.*"),
        jpeft.compose(jpeft.LoRA(targets=["q"], rank=2), jpeft.LoRAFA(targets=["head"], rank=1)),
    ],
    ids=["lora", "dora", "lora_fa", "lora_plus", "compose"],
)
def test_methods_round_trip_through_json(tmp_path, method):
    _, params, _ = small(1)
    peft = jpeft.apply(method, params, key=jax.random.key(2))
    jpeft.save(tmp_path, method, peft, step=0)
    restored = jpeft.restore(tmp_path, params)
    assert restored.method == method and type(restored.method) is type(method)
    for m in getattr(restored.method, "methods", (restored.method,)):  # fields come back as tuples
        assert isinstance(m.targets, (str, tuple)) and isinstance(m.layouts, tuple)
    assert_trees_equal(restored.params, peft)  # LoRA-FA's frozen A is a delta leaf: saved too


# --- bit-exact resume ------------------------------------------------------------------------------
class _MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(16, name="hidden")(x))
        x = nn.relu(nn.Dense(16, name="mid")(x))
        return nn.Dense(3, name="head")(x)


def test_resume_is_bit_exact(tmp_path):
    """N steps, save, restore, M steps == N + M steps, bit for bit (LoRA + Adam, a trained head)."""
    model = _MLP()
    rng = np.random.RandomState(0)
    x = jnp.asarray(rng.standard_normal((4, 6)), jnp.float32)
    y = jnp.asarray(rng.randint(0, 3, 4), jnp.int32)
    params = model.init(jax.random.key(0), x)["params"]
    method = jpeft.LoRA(targets=["hidden", "mid"], rank=2, extra_trainable=r"head/.*")
    peft = jpeft.apply(method, params, key=jax.random.key(1))
    adam = optax.adam(1e-2)
    tx = jpeft.optimizer(adam, method, peft)
    fwd = jpeft.wrap(model.apply, method)

    @jax.jit
    def step(peft, state):
        def loss(p):
            return optax.softmax_cross_entropy_with_integer_labels(fwd({"params": p}, x), y).mean()

        grads = jax.grad(loss)(peft)
        updates, state = tx.update(grads, state, peft)
        return optax.apply_updates(peft, updates), state

    def run(peft, state, n):
        for _ in range(n):
            peft, state = step(peft, state)
        return peft, state

    straight = run(peft, tx.init(peft), 5)
    p3, s3 = run(peft, tx.init(peft), 3)
    jpeft.save(tmp_path, method, p3, step=3, opt_state=s3)
    template = lambda m, p: jpeft.optimizer(adam, m, p).init(p)  # noqa: E731
    m, p, s, n = jpeft.restore(tmp_path, params, opt_state=template)
    assert n == 3 and m == method
    assert_trees_equal(p, p3)
    assert_trees_equal(s, s3)
    resumed = run(p, s, 2)
    assert_trees_equal(resumed[0], straight[0])
    assert_trees_equal(resumed[1], straight[1])
    # A concrete template works the same way.
    _, _, s_again, _ = jpeft.restore(tmp_path, params, opt_state=tx.init(peft))
    assert_trees_equal(s_again, s3)


# --- steps, overwrite ------------------------------------------------------------------------------
def test_latest_step_and_explicit_steps(tmp_path):
    for step, seed in ((1, 1), (5, 5), (3, 3)):
        method, params, peft = small(seed)
        jpeft.save(tmp_path, method, peft, step=step)
    assert jpeft.io.steps(tmp_path) == [1, 3, 5]
    latest = jpeft.restore(tmp_path, params)
    assert latest.step == 5
    assert_trees_equal(latest.params, small(5)[2])
    assert_trees_equal(jpeft.restore(tmp_path, params, step=3).params, small(3)[2])
    with pytest.raises(jpeft.JpeftError, match=r"restore\(step=4\): no complete checkpoint of that step .*found steps \[1, 3, 5\]"):
        jpeft.restore(tmp_path, params, step=4)
    with pytest.raises(jpeft.JpeftError, match=r"no complete checkpoint under .*Save one with jpeft.save"):
        jpeft.restore(tmp_path / "empty", params)


def test_an_existing_step_is_never_overwritten_in_place(tmp_path):
    method, params, peft = small(1)
    jpeft.save(tmp_path, method, peft, step=2)
    _, _, newer = small(2)
    with pytest.raises(jpeft.JpeftError, match=r"a checkpoint of step 2 already exists at .*step_2'. .*overwrite=True"):
        jpeft.save(tmp_path, method, newer, step=2)
    assert_trees_equal(jpeft.restore(tmp_path, params).params, peft)
    jpeft.save(tmp_path, method, newer, step=2, overwrite=True)
    assert_trees_equal(jpeft.restore(tmp_path, params).params, newer)
    assert sorted(os.listdir(tmp_path)) == ["step_2"]  # no temporaries left


# --- atomicity under SIGKILL -----------------------------------------------------------------------
CHILD = textwrap.dedent(
    """
    import os, signal, sys
    import jpeft
    from jpeft.io import _checkpoint_lock
    from orbax.checkpoint._src.path import atomicity
    from tests.io.test_checkpoint import small

    path, point = sys.argv[1], sys.argv[2]
    method, params, peft = small(1)
    jpeft.save(path, method, peft, step=1)
    if point == "swap":  # overwrite=True: die between moving step_1 aside and moving the new one in
        _, _, other = small(2)
        jpeft.save(path, method, other, step=2)
        calls = []

        def rename(src, dst):
            calls.append(src)
            if len(calls) == 2:
                os.kill(os.getpid(), signal.SIGKILL)
            os.rename(src, dst)

        _checkpoint_lock.rename = rename
        jpeft.save(path, method, small(3)[2], step=1, overwrite=True)
    else:
        finalize = atomicity.AtomicRenameTemporaryPath.finalize

        async def killing_finalize(self, *args, **kwargs):
            # 'item': orbax has written the first item of step_2 and is about to commit that item;
            # 'commit': every item is written and orbax is about to commit step_2 itself.
            if point == "item" or self.get_final().name.startswith("step_2."):
                os.kill(os.getpid(), signal.SIGKILL)
            return await finalize(self, *args, **kwargs)

        atomicity.AtomicRenameTemporaryPath.finalize = killing_finalize
        jpeft.save(path, method, small(2)[2], step=2)
    print("not killed")
    """
)


@pytest.mark.parametrize("point", ["item", "commit", "swap"])
def test_a_killed_save_leaves_the_previous_checkpoint_intact(tmp_path, point):
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(tmp_path), point], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == -signal.SIGKILL, proc.stdout + proc.stderr[-3000:]
    method, params, peft1 = small(1)
    entries = sorted(os.listdir(tmp_path))
    if point == "swap":
        # step_1 was moved aside and the complete replacement not yet moved in.
        assert entries[0].startswith("step_1.jpeft-tmp-") and entries[1:] == ["step_1.replaced", "step_2"], entries
        assert jpeft.io.steps(tmp_path) == [1, 2]
    else:
        assert entries[0] == "step_1" and len(entries) == 2 and entries[1].startswith("step_2.jpeft-tmp-"), entries
        partial = os.path.join(tmp_path, entries[1])
        assert sum(len(f) for _, _, f in os.walk(partial)) > 0, "the child must die mid-write, with files written"
        assert jpeft.io.steps(tmp_path) == [1]
        assert jpeft.restore(tmp_path, params).step == 1
    assert_trees_equal(jpeft.restore(tmp_path, params, step=1).params, peft1)
    # Saving again works and cleans up: the interrupted step (or overwrite) completes.
    _, _, peft2 = small(2)
    jpeft.save(tmp_path, method, peft2, step=2 if point != "swap" else 1, overwrite=point == "swap")
    assert_trees_equal(jpeft.restore(tmp_path, params, step=2 if point != "swap" else 1).params, peft2)
    assert sorted(os.listdir(tmp_path)) == ["step_1", "step_2"]  # the dead writer's temporaries are gone


# --- errors ----------------------------------------------------------------------------------------
def test_restore_refuses_another_base_tree(tmp_path):
    method, params, peft = small(1)
    jpeft.save(tmp_path, method, peft, step=1)
    other = {**params, "head": {"kernel": jnp.ones((8, 4)), "bias": jnp.zeros(4)}}
    with pytest.raises(jpeft.JpeftError, match=r"(?s)params is not the base tree this checkpoint was saved from.*"
                       r"  head/bias: expected \(3,\) float32, found \(4,\) float32\n"
                       r"  head/kernel: expected \(8, 3\) float32, found \(8, 4\) float32"):
        jpeft.restore(tmp_path, other)
    bf16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    with pytest.raises(jpeft.JpeftError, match=r"q/kernel: expected \(6, 8\) float32, found \(6, 8\) bfloat16"):
        jpeft.restore(tmp_path, bf16)
    missing = {"q": params["q"]}
    with pytest.raises(jpeft.JpeftError, match=r"head/kernel: expected \(8, 3\) float32, found missing"):
        jpeft.restore(tmp_path, missing)
    with pytest.raises(jpeft.JpeftError, match=r"params already holds adapter 'default' at 'q'"):
        jpeft.restore(tmp_path, peft)
    with pytest.raises(jpeft.JpeftError, match=r"params must be the base parameters, a nested mapping; got list"):
        jpeft.restore(tmp_path, [params])


def test_opt_state_template_errors(tmp_path):
    method, params, peft = small(1)
    jpeft.save(tmp_path, method, peft, step=1)
    with pytest.raises(jpeft.JpeftError, match=r"step 1 was saved without an optimizer state"):
        jpeft.restore(tmp_path, params, opt_state=lambda m, p: optax.adam(1e-3).init(p))
    adam = jpeft.optimizer(optax.adam(1e-3), method, peft)
    jpeft.save(tmp_path, method, peft, step=2, opt_state=adam.init(peft))
    sgd = jpeft.optimizer(optax.sgd(1e-3, momentum=0.9), method, peft)
    with pytest.raises(jpeft.JpeftError, match=r"the opt_state template has 3 leaves, the checkpoint 7; first difference "
                       r"at leaf 0: saved \[\[\], 'int32'\], template \[\[3\], 'float32'\]"):
        jpeft.restore(tmp_path, params, opt_state=sgd.init(peft))


def test_save_errors(tmp_path):
    method, params, peft = small(1)
    for step in (-1, True, 1.5):
        with pytest.raises(jpeft.JpeftError, match=r"save\(step=.*\): step must be an int >= 0"):
            jpeft.save(tmp_path, method, peft, step=step)
    with pytest.raises(jpeft.JpeftError, match=r"jpeft.save expects a jpeft method; got dict"):
        jpeft.save(tmp_path, {}, peft, step=0)
    with pytest.raises(jpeft.JpeftError, match=r"peft_params must be the nested mapping from jpeft.apply; got list"):
        jpeft.save(tmp_path, method, [peft], step=0)
    with pytest.raises(jpeft.JpeftError, match=r"the tree holds no deltas of adapter 'other'"):
        jpeft.save(tmp_path, method, peft, step=0, name="other")
    plain = jpeft.LoRA(targets=["q"], rank=2)  # nothing in the base trains, and no deltas in params
    with pytest.raises(jpeft.JpeftError, match=r"the tree holds no deltas of adapter 'default'"):
        jpeft.save(tmp_path, plain, params, step=0)
    assert jpeft.io.steps(tmp_path) == []


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Custom(jpeft.LoRA):
    """A method jpeft does not export."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class _WithCallable(jpeft.LoRA):
    """A method with a field JSON cannot hold."""

    schedule: Callable[[int], float] = abs


def test_methods_jpeft_cannot_rebuild(tmp_path):
    _, params, _ = small(1)
    method = _Custom(targets=["q"], rank=2)
    peft = jpeft.apply(method, params, key=jax.random.key(0))
    jpeft.save(tmp_path, method, peft, step=0)
    with pytest.raises(jpeft.JpeftError, match=r"the checkpoint's _Custom is a tests.io.test_checkpoint._Custom, which "
                       r"jpeft .* does not define. For a method of your own, pass it"):
        jpeft.restore(tmp_path, params)
    restored = jpeft.restore(tmp_path, params, method=method)
    assert restored.method is method
    assert_trees_equal(restored.params, peft)
    with pytest.raises(jpeft.JpeftError, match=r"restore\(method=.*\): the checkpoint was saved with a different method config"):
        jpeft.restore(tmp_path, params, method=_Custom(targets=["q"], rank=3))
    weird = _WithCallable(targets=["q"], rank=2)
    with pytest.raises(jpeft.JpeftError, match=r"the method field _WithCallable.schedule = <built-in function abs> "
                       r"\(builtin_function_or_method\) cannot be written as JSON"):
        jpeft.save(tmp_path, weird, jpeft.apply(weird, params, key=jax.random.key(0)), step=1)


@dataclasses.dataclass(frozen=True, kw_only=True)
class _ListField(jpeft.LoRA):
    """A method whose field holds a list, which JSON gives back as a tuple."""

    milestones: Any = ()


def test_a_jpeft_method_that_does_not_round_trip_raises(tmp_path, monkeypatch):
    monkeypatch.setattr(jpeft, "_ListField", _ListField, raising=False)  # as if jpeft defined it
    _, params, _ = small(1)
    method = _ListField(targets=["q"], rank=2, milestones=[1, 2])
    with pytest.raises(jpeft.JpeftError, match=r"_ListField does not survive a JSON round trip \(it came back as "
                       r"_ListField\(.*milestones=\(1, 2\)\)\)"):
        jpeft.save(tmp_path, method, jpeft.apply(method, params, key=jax.random.key(0)), step=1)


def test_a_foreign_or_edited_checkpoint_raises(tmp_path):
    method, params, peft = small(1)
    jpeft.save(tmp_path, method, peft, step=1)
    file = tmp_path / "step_1" / "meta" / "metadata"
    meta = json.loads(file.read_text())
    file.write_text(json.dumps({**meta, "method": {"__dataclass__": "jpeft._layout:Layout", "fields": {"kind": "dense"}}}))
    with pytest.raises(jpeft.JpeftError, match=r"the checkpoint's method jpeft._layout:Layout is not a jpeft.Method"):
        jpeft.restore(tmp_path, params)
    file.write_text(json.dumps({**meta, "format": 99}))
    with pytest.raises(jpeft.JpeftError, match=r"step_1/meta/metadata' has checkpoint format 99; this jpeft reads formats \[1, 2\]"):
        jpeft.restore(tmp_path, params)


@dataclasses.dataclass(frozen=True, kw_only=True)
class _TrainsNothing(jpeft.Method):
    """A base-only method (like BitFit) whose selection trains nothing."""

    has_deltas = False

    def select(self, params):
        return []


def test_nothing_to_save_and_an_unknown_field_raise(tmp_path):
    method, params, peft = small(1)
    with pytest.raises(jpeft.JpeftError, match=r"save\(_TrainsNothing\): no leaf of the tree trains, so there is nothing"):
        jpeft.save(tmp_path, _TrainsNothing(), params, step=0)
    jpeft.save(tmp_path, method, peft, step=1)
    file = tmp_path / "step_1" / "meta" / "metadata"
    meta = json.loads(file.read_text())
    meta["method"]["fields"]["rank_schedule"] = [1, 2]  # as if written by a jpeft with another LoRA
    file.write_text(json.dumps(meta))
    with pytest.raises(jpeft.JpeftError, match=r"cannot rebuild the checkpoint's LoRA as LoRA\(\*\*\{.*'rank_schedule': "
                       r"\(1, 2\)\}\): .*unexpected keyword argument 'rank_schedule'. Pass the method yourself"):
        jpeft.restore(tmp_path, params)


def test_empty_delta_nodes_survive_a_round_trip(tmp_path):
    """QLoRA gives quantised modules it does not target an empty delta node, which tells the wrapped
    forward to run them dequantised. A node without leaves must come back from restore, or the
    untargeted module runs its own ``__call__`` on the NF4 kernel (found by the feature matrix)."""

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(8, name="out")(nn.relu(nn.Dense(16, name="hidden")(x)))

    model, x = MLP(), jnp.asarray(np.random.RandomState(1).standard_normal((2, 64)), jnp.float32)
    base = model.init(jax.random.key(0), x)["params"]
    method = jpeft.QLoRA(targets=["hidden"], rank=2, compute_dtype="float32")
    quantised = jpeft.quantize(base, method.quant, targets=("hidden", "out"))
    peft = jpeft.apply(method, quantised, key=jax.random.key(1))
    assert peft["out"][R] == {"default": {}}  # the untargeted quantised module's marker
    jpeft.save(tmp_path / "ckpt", method, peft, step=3)
    restored = jpeft.restore(tmp_path / "ckpt", quantised)
    assert restored.params["out"][R] == {"default": {}}
    apply_fn = jpeft.wrap(model.apply, method)
    np.testing.assert_array_equal(
        np.asarray(apply_fn({"params": restored.params}, x)), np.asarray(apply_fn({"params": peft}, x))
    )
    # Independent oracle: the plain model on the dequantised kernels (B = 0 at init).
    want = model.apply({"params": jpeft.dequantize(quantised)}, x)
    np.testing.assert_allclose(np.asarray(apply_fn({"params": restored.params}, x)), np.asarray(want), atol=1e-5)
