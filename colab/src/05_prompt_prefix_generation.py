# %% [markdown]
# # Prompt tuning and prefix tuning on a small GPT-2, with cached generation
#
# Prompt tuning learns `P` input embeddings placed in front of the tokens; prefix tuning learns
# `P` keys and values per layer that every query can attend to. Both leave the whole model
# frozen. This notebook trains each on a small GPT-2 (built from a config, no download) and
# decodes greedily with `jpeft.generate`, which runs the prompt once and then one token per step
# with the model's KV cache.

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
from transformers import FlaxGPT2LMHeadModel, GPT2Config

import jpeft

STEPS = int(os.environ.get("JPEFT_NOTEBOOK_STEPS", "300"))  # CI sets a small number
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
d, layers = config.n_embd, config.n_layer


def run(apply, tree, tokens):
    """The bare Flax module takes the attention mask and positions explicitly."""
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    return apply({"params": tree}, tokens, jnp.ones_like(tokens), positions)[0]


def batch(step, size=8, length=32):
    starts = jax.random.randint(jax.random.key(step), (size,), 0, data.shape[0] - length - 1)
    return jax.vmap(lambda s: jax.lax.dynamic_slice(data, (s,), (length + 1,)))(starts)


def trainable_count(method, tree):
    return int(re.search(r"trainable params: ([\d,]+)", jpeft.summary(method, tree)).group(1).replace(",", ""))


def train(method, tree, lr):
    """Trains the method's leaves on the text; the whole model stays frozen."""
    apply_fn = jpeft.wrap(model.module.apply, method)
    trainable, frozen = jpeft.split(method, tree)
    tx = jpeft.optimizer(optax.adam(lr), method, trainable)
    opt_state = tx.init(trainable)

    def loss_fn(trainable, tokens):
        logits = run(apply_fn, jpeft.combine(trainable, frozen), tokens[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

    @jax.jit
    def step(trainable, opt_state, tokens):
        loss, grads = jax.value_and_grad(loss_fn)(trainable, tokens)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, loss

    fixed, first = batch(0), None
    for i in range(STEPS):
        trainable, opt_state, loss = step(trainable, opt_state, fixed if i % 2 == 0 else batch(i))
        first = float(loss) if first is None else first
    last = float(loss_fn(trainable, fixed))
    print(f"{type(method).__name__}: loss on a fixed batch, first {first:.3f}, last {last:.3f}")
    assert last < first
    return jpeft.combine(trainable, frozen)


def check_greedy(method, tree, out, prompt_len):
    """The reference, without a cache: one causal forward pass over the whole generated sequence
    must pick every generated token as its arg-max (what a cache-free greedy loop computes)."""
    logits = run(jpeft.wrap(model.module.apply, method), tree, out[:, :-1])
    assert jnp.array_equal(jnp.argmax(logits[:, prompt_len - 1 :], axis=-1), out[:, prompt_len:])


# jpeft.generate is not jitted inside; jit it whole (the apply function, method and length are static).
generate = jax.jit(jpeft.generate, static_argnums=(0, 1, 4))
prompts = jnp.stack([data[:12], data[40:52]])  # two 12-byte prompts
NEW = 12

# %% [markdown]
# ## Prompt tuning
# `P = 8` virtual tokens of width `d`, initialised from the embeddings of a piece of text
# (`init="text"`). They live at `<embedding>/__jpeft__/<name>/prompt`; the wrapped model returns
# logits for the caller's tokens only. Trainable: `P d`.
#
# A randomly initialised model barely responds to its input, so a few learnt input embeddings
# move its loss only a little (prompt tuning shines on large pretrained models); prefix tuning,
# which reaches into every layer's attention, moves it further. The point here is the mechanics.

# %%
prompt_method = jpeft.PromptTuning(num_virtual_tokens=8, init="text", init_ids=tuple(text[:8].encode()))
prompt_tree = jpeft.apply(prompt_method, params, key=jax.random.key(1))
print(jpeft.summary(prompt_method, prompt_tree))
assert trainable_count(prompt_method, prompt_tree) == 8 * d
assert run(jpeft.wrap(model.module.apply, prompt_method), prompt_tree, prompts).shape == (2, 12, config.vocab_size)
prompt_tree = train(prompt_method, prompt_tree, lr=3e-2)

# %% [markdown]
# `jpeft.generate` writes the virtual tokens into the KV cache with the prompt, then feeds one
# token per step. It must give exactly the tokens a cache-free greedy loop gives: each generated
# token is the arg-max of the wrapped model's logits over everything before it.

# %%
out = generate(model.module.apply, prompt_method, prompt_tree, prompts, NEW)
for row in out:
    print(repr(bytes(row.tolist()).decode(errors="replace")))
assert out.shape == (2, 12 + NEW)
assert jnp.array_equal(out[:, :12], prompts)
check_greedy(prompt_method, prompt_tree, out, 12)

# %% [markdown]
# ## Prefix tuning
# With `prefix_projection=True` (the paper's reparameterisation) a small MLP maps `P` embeddings
# to every layer's key and value prefixes: `tanh(E W1 + b1) W2 + b2`. Trainable:
# `P d + d k + k + 2 L d k + 2 L d`.

# %%
k = 32
prefix_method = jpeft.PrefixTuning(num_virtual_tokens=8, projection_hidden_size=k)
prefix_tree = jpeft.apply(prefix_method, params, key=jax.random.key(2))
print(jpeft.summary(prefix_method, prefix_tree))
assert trainable_count(prefix_method, prefix_tree) == 8 * d + d * k + k + 2 * layers * d * k + 2 * layers * d
prefix_tree = train(prefix_method, prefix_tree, lr=1e-2)

out = generate(model.module.apply, prefix_method, prefix_tree, prompts, NEW)
for row in out:
    print(repr(bytes(row.tolist()).decode(errors="replace")))
check_greedy(prefix_method, prefix_tree, out, 12)

# %% [markdown]
# ## Folding the reparameterisation away
# After training only the prefixes matter: `jpeft.merge` runs the MLP once and returns a tree of
# plain per-layer prefixes (P-tuning v2, `2 L P d` numbers) for `prefix_method.folded_method()`,
# with the same outputs.

# %%
folded_method = prefix_method.folded_method()
folded_tree = jpeft.merge(prefix_method, prefix_tree)
print(jpeft.summary(folded_method, folded_tree))
assert trainable_count(folded_method, folded_tree) == 2 * layers * 8 * d
full = run(jpeft.wrap(model.module.apply, prefix_method), prefix_tree, prompts)
folded = run(jpeft.wrap(model.module.apply, folded_method), folded_tree, prompts)
print("max |folded - reparameterised| =", float(jnp.abs(folded - full).max()))
assert jnp.allclose(folded, full, atol=1e-4)
folded_out = generate(model.module.apply, folded_method, folded_tree, prompts, NEW)
assert jnp.array_equal(folded_out, out)
