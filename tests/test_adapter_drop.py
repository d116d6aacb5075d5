"""AdapterDrop through jpeft.wrap: static drop_layers at inference, random dropping in training."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jpeft
from tests import _hf_models as H
from tests import _models as M

TOL = dict(rtol=1e-5, atol=1e-5)
R = jpeft.RESERVED


def setup():
    hf = H.make("gpt2")
    method = jpeft.LoRA(targets=("c_attn", "c_fc"), rank=2, alpha=4.0)
    tree = jpeft.apply(method, hf.params, key=jax.random.key(1))
    tree = M.random_deltas(tree, seed=0, scale=0.2)
    return hf, method, tree


def without_layers(tree, layers):
    """The tree with every delta of the given layers set to zero (an independent way to drop them)."""
    return jax.tree_util.tree_map_with_path(
        lambda p, x: jnp.zeros_like(x)
        if any(getattr(k, "key", None) == R for k in p) and any(getattr(k, "key", None) in {str(i) for i in layers} for k in p)
        else x,
        tree,
    )


def logits(hf, fn, tree, **kw):
    return hf.logits(fn({"params": tree}, **hf.inputs, **kw))


def test_drop_layers_equals_zeroed_deltas_and_skips_the_work():
    hf, method, tree = setup()
    dropped = jpeft.wrap(hf.apply, method, drop_layers=range(1))
    plain = jpeft.wrap(hf.apply, method)
    got = logits(hf, dropped, tree)
    np.testing.assert_allclose(got, logits(hf, plain, without_layers(tree, [0])), **TOL)
    assert not np.allclose(got, logits(hf, plain, tree), atol=1e-4)

    def flops(fn):
        cost = jax.jit(lambda t: logits(hf, fn, t)).lower(tree).compile().cost_analysis()
        return (cost[0] if isinstance(cost, list) else cost)["flops"]

    assert flops(dropped) < flops(plain)


def test_drop_random_uses_the_dropout_rng():
    hf, method, tree = setup()
    fn = jpeft.wrap(hf.apply, method, drop_random=H.LAYERS)
    seen = set()
    for seed in range(6):
        rng = jax.random.key(seed)
        n = int(jax.random.randint(jax.random.fold_in(rng, 0x4AD0), (), 0, H.LAYERS + 1))
        seen.add(n)
        got = logits(hf, fn, tree, rngs={"dropout": rng})
        want = logits(hf, jpeft.wrap(hf.apply, method), without_layers(tree, range(n)))
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    assert len(seen) > 1
    # without a dropout rng (evaluation) nothing is dropped
    np.testing.assert_allclose(logits(hf, fn, tree), logits(hf, jpeft.wrap(hf.apply, method), tree), **TOL)


def test_drop_errors():
    hf, method, tree = setup()
    with pytest.raises(jpeft.JpeftError, match="drop_layers=5"):
        jpeft.wrap(hf.apply, method, drop_layers=5)
    with pytest.raises(jpeft.JpeftError, match=r"drop_random=-1"):
        jpeft.wrap(hf.apply, method, drop_random=-1)
    with pytest.raises(jpeft.JpeftError, match="layer_pattern"):
        jpeft.wrap(hf.apply, method, drop_layers=[0], layer_pattern="(")
    import flax.linen as nn

    model = nn.Dense(3)
    params = {"d": model.init(jax.random.key(0), jnp.ones((1, 2)))["params"]}
    lora = jpeft.LoRA(targets=".*", rank=1)
    peft = jpeft.apply(lora, params, key=jax.random.key(0))
    with pytest.raises(jpeft.JpeftError, match="no known architecture matches"):
        jpeft.wrap(lambda v, x: model.apply({"params": v["params"]["d"]}, x), lora, drop_layers=[0])(
            {"params": peft}, jnp.ones((1, 2))
        )


@pytest.mark.parametrize(
    "method",
    [jpeft.PTuningV2(num_virtual_tokens=2), jpeft.MAM(prefix_tokens=2, adapter_bottleneck=8)],
    ids=["ptuningv2", "mam"],
)
def test_prefixes_refuse_adapterdrop(method):
    """A layer whose prefix is dropped would still attend to the P placeholder positions (the feature
    matrix measured logits 0.16 away from the base model with every layer dropped): refused, not wrong."""
    hf = H.make("gpt2")
    for kw in ({"drop_layers": [0]}, {"drop_random": 1}):
        with pytest.raises(jpeft.JpeftError, match=r"AdapterDrop is not supported with prefixes \((PTuningV2|PrefixTuning)\)"):
            jpeft.wrap(hf.apply, method, **kw)
