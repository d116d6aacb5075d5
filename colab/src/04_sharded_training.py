# %% [markdown]
# # Sharded LoRA training on a device mesh
#
# `jpeft.partition_specs` derives a `PartitionSpec` for every delta leaf from the spec of the
# kernel it modifies: LoRA's `A: (in, r)` keeps the kernel's input sharding and `B: (r, out)`
# its output sharding, with the rank axis replicated. This notebook trains LoRA on a small GPT-2
# with the base sharded over a `('data', 'model')` mesh, and checks that a sharded step gives the
# loss and parameters of the same step on one device.
#
# On a CPU runtime the mesh has 8 simulated devices; on a TPU runtime it uses the real ones.

# %%
# Simulated CPU devices must be requested before jax is imported (TPUs and GPUs ignore this flag).
import os

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

# %%
# Install jpeft on Colab; where jpeft is already installed (a local checkout, CI) this does nothing.
import importlib.util
import subprocess
import sys

if importlib.util.find_spec("jpeft") is None:
    subprocess.check_call([sys.executable, "-m", "pip", "install", "-q", "jpeft[hf] @ git+https://github.com/jpeft/jpeft"])

# %%
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P
from transformers import FlaxGPT2LMHeadModel, GPT2Config

import jpeft

STEPS = int(os.environ.get("JPEFT_NOTEBOOK_STEPS", "20"))  # CI sets a small number
jax.config.update("jax_default_matmul_precision", "float32")  # so the sharded and single-device runs agree closely
devices = jax.devices()
print(devices)
if jax.default_backend() == "cpu":
    assert len(devices) == 8, f"expected 8 simulated CPU devices, got {len(devices)}: restart the runtime"

# %% [markdown]
# The mesh: 2-way data parallel times `n / 2`-way model parallel (8 devices: 2 x 4).

# %%
n = len(devices)
data_size = 2 if n % 2 == 0 else 1
mesh = jax.make_mesh((data_size, n // data_size), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
print(mesh.shape)

# %% [markdown]
# A byte-level GPT-2 (vocabulary 256) with 2 layers, built from a config, and a little text.

# %%
text = (
    "Alice was beginning to get very tired of sitting by her sister on the bank, and of having nothing to do: "
    "once or twice she had peeped into the book her sister was reading, but it had no pictures or conversations in it."
)
data = jnp.frombuffer(text.encode(), dtype=jnp.uint8).astype(jnp.int32)
config = GPT2Config(vocab_size=256, n_positions=128, n_embd=64, n_layer=2, n_head=4)
model = FlaxGPT2LMHeadModel(config, seed=0)
params = jax.tree.map(jnp.asarray, model.params)


def run(apply, tree, tokens):
    """The bare Flax module takes the attention mask and positions explicitly."""
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    return apply({"params": tree}, tokens, jnp.ones_like(tokens), positions)[0]


def batch(step, size=8, length=32):
    starts = jax.random.randint(jax.random.key(step), (size,), 0, data.shape[0] - length - 1)
    return jax.vmap(lambda s: jax.lax.dynamic_slice(data, (s,), (length + 1,)))(starts)


# %% [markdown]
# ## Specs for the base, derived specs for the deltas
# Megatron-style base specs by hand: the embedding table split over its vocabulary, `c_attn` and
# `c_fc` over their output features, `c_proj` over its input features; the rest replicated.
# GPT-2's `Conv1D` kernels are stored `(out, in)`, so "output" is axis 0 there.

# %%
def base_spec(path, leaf):
    names = [str(getattr(k, "key", k)) for k in path]
    if names[-1] == "embedding" and names[-2] == "wte":
        return P("model", None)
    if names[-1] == "kernel" and names[-2] in ("c_attn", "c_fc"):
        return P("model", None)
    if names[-1] == "kernel" and names[-2] == "c_proj":
        return P(None, "model")
    return None


base_specs = jax.tree_util.tree_map_with_path(base_spec, params)
method = jpeft.LoRA(targets=("c_attn", "c_proj", "c_fc"), rank=8, alpha=16.0)
peft = jpeft.apply(method, params, key=jax.random.key(1))
specs = jpeft.partition_specs(method, peft, base_specs, mesh=mesh)
attn = specs["transformer"]["h"]["0"]["attn"]
print("c_attn:", attn["c_attn"]["kernel"], attn["c_attn"][jpeft.RESERVED]["default"])
print("c_proj:", attn["c_proj"]["kernel"], attn["c_proj"][jpeft.RESERVED]["default"])
# B of c_attn: (r, out) follows the kernel's output sharding; A of c_proj: (in, r) its input sharding.
assert attn["c_attn"][jpeft.RESERVED]["default"] == {"lora_a": P(None, None), "lora_b": P(None, "model")}
assert attn["c_proj"][jpeft.RESERVED]["default"] == {"lora_a": P("model", None), "lora_b": P(None, None)}

# %% [markdown]
# ## One training step, jitted with shardings
# `jpeft.split` works on the sharding tree as on the parameters, so the trainable and frozen
# halves get matching shardings. The optimizer moments are initialised under `jit` and come out
# sharded like their parameters.

# %%
shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))
trainable, frozen = jpeft.split(method, peft)
t_sh, f_sh = jpeft.split(method, shardings)
d_sh = NamedSharding(mesh, P("data"))
replicated = NamedSharding(mesh, P())
apply_fn = jpeft.wrap(model.module.apply, method)
tx = jpeft.optimizer(optax.adam(3e-3), method, trainable)


def loss_fn(trainable, frozen, tokens):
    logits = run(apply_fn, jpeft.combine(trainable, frozen), tokens[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()


def step(trainable, opt_state, frozen, tokens):
    loss, grads = jax.value_and_grad(loss_fn)(trainable, frozen, tokens)
    updates, opt_state = tx.update(grads, opt_state, trainable)
    return optax.apply_updates(trainable, updates), opt_state, loss


t = jax.device_put(trainable, t_sh)
f = jax.device_put(frozen, f_sh)
opt_state = jax.jit(tx.init)(t)
s_sh = jax.tree.map(lambda x: x.sharding if isinstance(x.sharding, NamedSharding) else replicated, opt_state)
opt_state = jax.device_put(opt_state, s_sh)
sharded_step = jax.jit(step, in_shardings=(t_sh, s_sh, f_sh, d_sh), out_shardings=(t_sh, s_sh, replicated))

sharded_losses = []
for i in range(STEPS):
    t, opt_state, loss = sharded_step(t, opt_state, f, jax.device_put(batch(i), d_sh))
    sharded_losses.append(float(loss))
print(f"sharded loss: first {sharded_losses[0]:.4f}, last {sharded_losses[-1]:.4f}")
lora_b = t["transformer"]["h"]["0"]["attn"]["c_attn"][jpeft.RESERVED]["default"]["lora_b"]
print("c_attn lora_b", lora_b.shape, "is stored as", lora_b.sharding.spec, "with shards of shape", lora_b.addressable_shards[0].data.shape)
split_leaves = sum(not x.sharding.is_fully_replicated for x in jax.tree.leaves((t, f)))
print(f"{split_leaves} leaves are split across devices")
if n > 1:
    assert split_leaves > 0

# %% [markdown]
# ## The same steps on one device
# Identical math: the losses and the trained factors agree to float32 rounding.

# %%
single_step = jax.jit(step)
trainable_1, opt_state_1 = trainable, tx.init(trainable)
single_losses = []
for i in range(STEPS):
    trainable_1, opt_state_1, loss = single_step(trainable_1, opt_state_1, frozen, batch(i))
    single_losses.append(float(loss))
print("max |sharded - single| loss:", max(abs(a - b) for a, b in zip(sharded_losses, single_losses, strict=True)))
np.testing.assert_allclose(sharded_losses, single_losses, rtol=1e-5)
for x, y in zip(jax.tree.leaves(t), jax.tree.leaves(trainable_1), strict=True):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-5)
if STEPS > 1:
    assert sharded_losses[-1] < sharded_losses[0]
