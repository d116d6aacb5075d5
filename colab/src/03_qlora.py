# %% [markdown]
# # QLoRA: LoRA on a 4-bit NF4 GPT-2, on CPU
#
# QLoRA stores the frozen base kernels in 4-bit NormalFloat (NF4) with double-quantised block
# scales (about 4.127 bits per weight) and trains LoRA factors on top; the forward pass
# dequantises each kernel on the fly. This notebook quantises a small GPT-2 (built from a config,
# no download), compares the stored bytes with bf16, trains a few steps and merges back to plain
# float parameters.

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
# A byte-level GPT-2 (vocabulary 256) with 2 layers of width 128, and a little text to learn.

# %%
text = (
    "Alice was beginning to get very tired of sitting by her sister on the bank, and of having nothing to do: "
    "once or twice she had peeped into the book her sister was reading, but it had no pictures or conversations in it."
)
data = jnp.frombuffer(text.encode(), dtype=jnp.uint8).astype(jnp.int32)
config = GPT2Config(vocab_size=256, n_positions=128, n_embd=128, n_layer=2, n_head=4)
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
# ## Quantise the kernels to NF4
# `jpeft.quantize(params, method)` replaces the kernels the method targets by `jpeft.NF4Array`
# pytree nodes (packed 4-bit codes, int8 block scales, one float32 scale per 256 blocks) at the
# kernels' own paths. Everything else stays the same array objects.

# %%
method = jpeft.QLoRA(targets=("c_attn", "c_proj", "c_fc"), rank=8, alpha=16.0, quant=jpeft.NF4())
quantized = jpeft.quantize(params, method)
print(quantized["transformer"]["h"]["0"]["attn"]["c_attn"]["kernel"])


def nbytes(tree):
    return sum(int(x.nbytes) for x in jax.tree.leaves(tree))


def bf16_bytes(tree):
    return sum(2 * x.size for x in jax.tree.leaves(tree))


is_q = lambda x: isinstance(x, jpeft.NF4Array)  # noqa: E731
kernels_q = [x for x in jax.tree.leaves(quantized, is_leaf=is_q) if is_q(x)]
kernel_bytes, kernel_bf16 = sum(x.nbytes for x in kernels_q), sum(2 * x.size for x in kernels_q)
print(f"quantised kernels: {kernel_bytes:,} bytes stored vs {kernel_bf16:,} in bf16 ({kernel_bytes / kernel_bf16:.3f}x)")
print(f"whole tree:        {nbytes(quantized):,} bytes stored (NF4 kernels, float32 rest) vs {bf16_bytes(params):,} all in bf16")
print(f"bits per quantised weight: {8 * kernel_bytes / sum(x.size for x in kernels_q):.3f}")
# 4.127 bits per weight plus one float32 per tensor, against 16.
assert kernel_bytes / kernel_bf16 < 0.27
assert nbytes(quantized) < bf16_bytes(params)

# NF4 keeps the weights close: relative error around 0.1 for Gaussian weights.
w = params["transformer"]["h"]["0"]["mlp"]["c_fc"]["kernel"]
w_q = jpeft.dequantize(quantized["transformer"]["h"]["0"]["mlp"]["c_fc"]["kernel"])
error = float(jnp.linalg.norm(w_q - w) / jnp.linalg.norm(w))
print(f"relative quantisation error of one kernel: {error:.3f}")
assert error < 0.15

# %% [markdown]
# ## Add LoRA and train
# The LoRA factors are float32; the quantised kernels are labelled frozen, and `jpeft.split`
# keeps them out of differentiation. The base matmul runs in bf16 (`compute_dtype`). At init
# (`B = 0`) the wrapped model equals the dequantised base model.

# %%
peft = jpeft.apply(method, quantized, key=jax.random.key(1))
print(jpeft.summary(method, peft))
apply_fn = jpeft.wrap(model.module.apply, method)
tokens = batch(10_000)[:, :-1]
base_logits = run(model.module.apply, jpeft.dequantize(quantized), tokens)
init_logits = run(apply_fn, peft, tokens)
gap = float(jnp.linalg.norm(init_logits - base_logits) / jnp.linalg.norm(base_logits))
print(f"init: relative gap to the dequantised base (bf16 matmuls) {gap:.2e}")
assert gap < 1e-2

trainable, frozen = jpeft.split(method, peft)
assert not any(is_q(x) for x in jax.tree.leaves(trainable, is_leaf=is_q))
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


fixed = batch(0)
losses = []
for i in range(STEPS):
    trainable, opt_state, loss = step(trainable, opt_state, batch(i) if i % 2 else fixed)
    losses.append(float(loss))
print(f"loss: first {losses[0]:.3f}, last on the same batch {float(loss_fn(trainable, fixed)):.3f}")
assert float(loss_fn(trainable, fixed)) < losses[0]

# %% [markdown]
# ## Merge to plain float parameters
# `jpeft.merge` returns `dequant(W) + s A B` in the original dtype (float32) with exactly the
# original structure: a plain GPT-2 tree that needs neither jpeft nor the quantised format.
# (Re-quantising the merged kernel would be lossy.) The merged model computes in float32 and
# the wrapped one in bf16, so they agree to bf16 precision.

# %%
peft = jpeft.combine(trainable, frozen)
merged = jpeft.merge(method, peft)
assert jax.tree.structure(merged) == jax.tree.structure(params)
assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(merged))
wrapped_logits = run(apply_fn, peft, tokens)
merged_logits = run(model.module.apply, merged, tokens)
rel = float(jnp.linalg.norm(merged_logits - wrapped_logits) / jnp.linalg.norm(wrapped_logits))
print(f"relative |merged - wrapped| = {rel:.2e}")
assert rel < 2e-2

# The same comparison with a float32 base matmul agrees to float32 precision.
exact = jpeft.QLoRA(targets=method.targets, rank=8, alpha=16.0, quant=method.quant, compute_dtype="float32")
exact_logits = run(jpeft.wrap(model.module.apply, exact), peft, tokens)
print("max |merged - wrapped(float32)| =", float(jnp.abs(merged_logits - exact_logits).max()))
assert jnp.allclose(merged_logits, exact_logits, atol=1e-4)
print(f"merged tree: {nbytes(merged):,} bytes in float32")
