# %% [markdown]
# # Adapters, AdapterFusion and AdapterDrop on a small BERT classifier
#
# Bottleneck adapters add a small `f(h W_down) W_up` after a layer's output projection, starting
# at `W_up = 0` so the model is unchanged at init. This notebook trains two named Pfeiffer
# adapters on two toy tasks, fuses them with AdapterFusion (only the fusion weights train), and
# skips the lowest layer's adapters at inference with AdapterDrop. The BERT classifier is built
# from a small config: nothing is downloaded.

# %%
# Install jpeft on Colab; where jpeft is already installed (a local checkout, CI) this does nothing.
import importlib.util
import subprocess
import sys

if importlib.util.find_spec("jpeft") is None:
    subprocess.check_call([sys.executable, "-m", "pip", "install", "-q", "jpeft[hf] @ git+https://github.com/jpeft/jpeft"])

# %%
import os
import re

import jax
import jax.numpy as jnp
import optax
from transformers import BertConfig, FlaxBertForSequenceClassification

import jpeft

STEPS = int(os.environ.get("JPEFT_NOTEBOOK_STEPS", "200"))  # CI sets a small number
print(jax.devices())

# %% [markdown]
# A 2-layer BERT with hidden size 32 and a 3-way classification head, and two toy tasks on random
# token sequences: task `a` labels a sequence by its first token mod 3, task `b` by its first
# token's tens digit mod 3. The classification head stays frozen at its random init; the adapters
# learn to steer the encoder into it.

# %%
config = BertConfig(
    vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
    max_position_embeddings=64, num_labels=3,
)
model = FlaxBertForSequenceClassification(config, seed=0)
params = model.params
ids = jax.random.randint(jax.random.key(0), (64, 8), 0, config.vocab_size)
tasks = {"a": ids[:, 0] % 3, "b": (ids[:, 0] // 10) % 3}


def logits(apply, tree, tokens):
    """The bare Flax module takes masks, token types and positions explicitly."""
    ones = jnp.ones_like(tokens)
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    return apply({"params": tree}, tokens, ones, jnp.zeros_like(tokens), positions, None)[0]


def train(method, tree, active, labels, lr=1e-2):
    """Trains the leaves `method` labels trainable on one task; returns the tree and the losses."""
    apply_fn = jpeft.wrap(model.module.apply, method, active=active)
    trainable, frozen = jpeft.split(method, tree)
    tx = jpeft.optimizer(optax.adam(lr), method, trainable)
    opt_state = tx.init(trainable)

    def loss_fn(trainable):
        out = logits(apply_fn, jpeft.combine(trainable, frozen), ids)
        return optax.softmax_cross_entropy_with_integer_labels(out, labels).mean()

    @jax.jit
    def step(trainable, opt_state):
        loss, grads = jax.value_and_grad(loss_fn)(trainable)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, loss

    losses = []
    for _ in range(STEPS):
        trainable, opt_state, loss = step(trainable, opt_state)
        losses.append(float(loss))
    print(f"{active}: loss first {losses[0]:.3f}, last {losses[-1]:.3f}")
    return jpeft.combine(trainable, frozen), losses


# %% [markdown]
# ## Two named adapters, one per task
# `jpeft.apply(..., name=...)` puts each adapter's leaves at `<module>/__jpeft__/<name>/`, so
# several live on one tree; `jpeft.wrap(..., active=name)` picks the one to run. The adapter is
# identity at init: the wrapped model gives the base model's logits.

# %%
adapter = jpeft.PfeifferAdapter(reduction_factor=4)
tree = jpeft.apply(adapter, params, key=jax.random.key(1), name="a")
assert jnp.allclose(
    logits(jpeft.wrap(model.module.apply, adapter, active="a"), tree, ids), logits(model.module.apply, params, ids),
    atol=1e-6,
)
print(jpeft.summary(adapter, tree))
tree, losses_a = train(adapter, tree, "a", tasks["a"])
assert losses_a[-1] < losses_a[0]

# %% [markdown]
# Adapter `b` goes on the same tree. Every delta leaf is labelled trainable, but `a` is not in
# the forward pass when `b` is active: its gradient is zero and Adam leaves it exactly as it was.

# %%
trained_a = tree
tree = jpeft.apply(adapter, tree, key=jax.random.key(2), name="b")
tree, losses_b = train(adapter, tree, "b", tasks["b"])
assert losses_b[-1] < losses_b[0]
assert jpeft.adapters(tree) == ["a", "b"]
unchanged = zip(jax.tree.leaves(jpeft.remove(tree, "b")), jax.tree.leaves(trained_a), strict=True)
assert all(jnp.array_equal(x, y) for x, y in unchanged)

# %% [markdown]
# ## AdapterFusion on top
# `jpeft.AdapterFusion` adds, at every adapter site, an attention over the adapters' outputs
# (query, key and value matrices, `d x d` each, with value starting at the identity). Only the
# fusion weights train: the base, the head and both adapters are frozen. The count is
# `layers * (3 d^2 + 2 d)`.

# %%
fusion = jpeft.AdapterFusion(adapters=("a", "b"), adapter=adapter)
tree = jpeft.apply(fusion, tree, key=jax.random.key(3), name="fusion")
text = jpeft.summary(fusion, tree)
print(text)
d, layers = config.hidden_size, config.num_hidden_layers
assert int(re.search(r"trainable params: ([\d,]+)", text).group(1).replace(",", "")) == layers * (3 * d * d + 2 * d)

before = tree
tree, losses_f = train(fusion, tree, "fusion", tasks["b"], lr=3e-3)
assert losses_f[-1] < losses_f[0]
for name in ("a", "b"):  # the adapters did not move
    kept = jpeft.remove(jpeft.remove(before, "fusion"), "b" if name == "a" else "a")
    now = jpeft.remove(jpeft.remove(tree, "fusion"), "b" if name == "a" else "a")
    assert all(jnp.array_equal(x, y) for x, y in zip(jax.tree.leaves(now), jax.tree.leaves(kept), strict=True))

# %% [markdown]
# ## AdapterDrop at inference
# `jpeft.wrap(..., drop_layers=range(1))` runs layer 0 without any deltas (the work is skipped,
# not computed and discarded). An independent check: zeroing layer 0's fusion value projection
# makes its fused output 0, which must give the same logits.

# %%
dropped = logits(jpeft.wrap(model.module.apply, fusion, active="fusion", drop_layers=range(1)), tree, ids)
full = logits(jpeft.wrap(model.module.apply, fusion, active="fusion"), tree, ids)


def zero_layer0_value(path, x):
    keys = [getattr(k, "key", None) for k in path]
    layer0 = keys[:4] == ["bert", "encoder", "layer", "0"]
    return jnp.zeros_like(x) if layer0 and "fusion" in keys and keys[-1] == "value" else x


silenced = jax.tree_util.tree_map_with_path(zero_layer0_value, tree)
reference = logits(jpeft.wrap(model.module.apply, fusion, active="fusion"), silenced, ids)
print("max |dropped - reference| =", float(jnp.abs(dropped - reference).max()))
print("max |dropped - full|      =", float(jnp.abs(dropped - full).max()))
assert jnp.allclose(dropped, reference, atol=1e-5)
assert not jnp.allclose(dropped, full, atol=1e-5)  # layer 0's fusion did change the output
accuracy = float((jnp.argmax(full, -1) == tasks["b"]).mean())
print(f"task b accuracy with fusion: {accuracy:.2f}")
