# %% [markdown]
# # jpeft quickstart: LoRA on a small GPT-2, on CPU
#
# `jpeft` adds parameter-efficient fine-tuning to any Flax model as pure functions on the
# parameter tree. This notebook fine-tunes a small GPT-2 (built from a config, no download) with
# LoRA on a few lines of text, then merges the adapter for zero-overhead inference.

# %%
# Install jpeft on Colab; where jpeft is already installed (a local checkout, CI) this does nothing.
import importlib.util
import subprocess
import sys

if importlib.util.find_spec("jpeft") is None:
    subprocess.check_call([sys.executable, "-m", "pip", "install", "-q", "jpeft[hf] @ git+https://github.com/jpeft/jpeft"])

# %%
import os

import jax
import jax.numpy as jnp
import optax
from transformers import FlaxGPT2LMHeadModel, GPT2Config

import jpeft

STEPS = int(os.environ.get("JPEFT_NOTEBOOK_STEPS", "150"))  # CI sets a small number
print(jax.devices())

# %% [markdown]
# A byte-level GPT-2 (vocabulary 256) with 2 layers, and a little text to learn.

# %%
text = (
    "Alice was beginning to get very tired of sitting by her sister on the bank, and of having nothing to do: "
    "once or twice she had peeped into the book her sister was reading, but it had no pictures or conversations in it."
)
data = jnp.frombuffer(text.encode(), dtype=jnp.uint8).astype(jnp.int32)
config = GPT2Config(vocab_size=256, n_positions=128, n_embd=64, n_layer=2, n_head=4)
model = FlaxGPT2LMHeadModel(config, seed=0)
params = model.params


def run(apply, tree, tokens):
    """The bare Flax module takes the attention mask and positions explicitly."""
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    return apply({"params": tree}, tokens, jnp.ones_like(tokens), positions)[0]


def batch(step, size=8, length=32):
    starts = jax.random.randint(jax.random.key(step), (size,), 0, data.shape[0] - length - 1)
    return jax.vmap(lambda s: jax.lax.dynamic_slice(data, (s,), (length + 1,)))(starts)


# %% [markdown]
# ## Add LoRA
# `jpeft.apply` adds the LoRA factors next to the kernels they modify; the base leaves are the same
# objects. The GPT-2 profile knows that its `Conv1D` kernels are stored (out, in).

# %%
method = jpeft.LoRA(targets=("c_attn", "c_proj", "c_fc"), rank=8, alpha=16.0)
peft = jpeft.apply(method, params, key=jax.random.key(1))
print(jpeft.summary(method, peft))
apply_fn = jpeft.wrap(model.module.apply, method)

# %% [markdown]
# ## Train only the deltas
# `jpeft.split` separates trainable and frozen leaves; differentiating with respect to the
# trainable half is the lean path (no weight gradients for frozen kernels).

# %%
trainable, frozen = jpeft.split(method, peft)
tx = jpeft.optimizer(optax.adam(3e-3), method, trainable)
opt_state = tx.init(trainable)


def loss_fn(trainable, tokens):
    logits = run(apply_fn, jpeft.combine(trainable, frozen), tokens[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()


@jax.jit
def step(trainable, opt_state, tokens):
    loss, grads = jax.value_and_grad(loss_fn)(trainable, tokens)
    updates, opt_state = tx.update(grads, opt_state, trainable)
    return optax.apply_updates(trainable, updates), opt_state, loss


losses = []
for i in range(STEPS):
    trainable, opt_state, loss = step(trainable, opt_state, batch(i))
    losses.append(float(loss))
print(f"loss: first {losses[0]:.3f}, last {losses[-1]:.3f}")
assert losses[-1] < losses[0]

# %% [markdown]
# ## Merge for inference
# `jpeft.merge` folds `W + s A B` into the kernels and returns exactly the original structure.

# %%
peft = jpeft.combine(trainable, frozen)
merged = jpeft.merge(method, peft)
tokens = batch(10_000)[:, :-1]
wrapped_logits = run(apply_fn, peft, tokens)
merged_logits = run(model.module.apply, merged, tokens)
print("max |merged - wrapped| =", float(jnp.abs(merged_logits - wrapped_logits).max()))
assert jnp.allclose(merged_logits, wrapped_logits, atol=1e-4)
assert jax.tree.structure(merged) == jax.tree.structure(params)

# %% [markdown]
# ## Greedy continuation with the merged model

# %%
next_token = jax.jit(lambda tree, window: jnp.argmax(run(model.module.apply, tree, window[None])[0, -1]))
out = list(text[:32].encode())  # a fixed 32-byte window keeps one compiled shape
for _ in range(40):
    out.append(int(next_token(merged, jnp.array(out[-32:]))))
print(bytes(out).decode(errors="replace"))
