"""P-tuning: the virtual tokens are the output of a prompt encoder (an MLP or an LSTM) over learned inputs.

A :class:`~jpeft.methods._prompt_tuning.PromptTuning` whose prompt is computed; ``jpeft.merge``
caches the encoder output into a plain prompt.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from jpeft import _errors, _tree
from jpeft._errors import JpeftError
from jpeft._method import Context
from jpeft._tree import RESERVED, Path, PyTree, join
from jpeft.methods._prompt import _uniform
from jpeft.methods._prompt_tuning import PromptTuning


def _linear(deltas: Any, name: str, x: jax.Array) -> jax.Array:
    return x @ deltas[f"{name}_kernel"] + deltas[f"{name}_bias"][None, :]


def _lstm(x: jax.Array, wi: jax.Array, wh: jax.Array, b: jax.Array) -> jax.Array:
    """One LSTM direction over ``x: (P, in)``; gates ``i, f, g, o`` as in torch; returns ``(P, h)``."""

    def step(carry: tuple[jax.Array, jax.Array], xt: jax.Array) -> tuple[tuple[jax.Array, jax.Array], jax.Array]:
        h, c = carry
        i, f, g, o = jnp.split(xt @ wi + h @ wh + b, 4)
        c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
        h = jax.nn.sigmoid(o) * jnp.tanh(c)
        return (h, c), h

    zero = jnp.zeros(wh.shape[:1], x.dtype)
    return lax.scan(step, (zero, zero), x)[1]


@dataclasses.dataclass(frozen=True, kw_only=True)
class PTuning(PromptTuning):
    """P-tuning: the virtual tokens come from a prompt encoder over trainable inputs ``h: (P, d)``.

    As HF PEFT's ``PromptEncoder`` (hidden size ``k``, default ``d``):

    - ``"mlp"``: ``prompt = relu(relu(h W0 + b0) W1 + b1) W2 + b2`` with ``W0: (d, k)``,
      ``W1: (k, k)``, ``W2: (k, d)``;
    - ``"lstm"``: a 2-layer bidirectional LSTM (gates ``i, f, g, o``; one bias per gate set), then
      ``relu(z W0 + b0) W1 + b1`` with ``W0: (2k, 2k)``, ``W1: (2k, d)``.

    All of it sits at ``<embedding>/__jpeft__/<name>/``. Trainable parameters: ``P d`` plus the
    encoder: ``d k + k + k k + k + k d + d`` (mlp) or ``Σ_l 2 (4k in_l + 4k k + 4k) + 2k 2k + 2k +
    2k d + d`` with ``in_0 = d``, ``in_1 = 2k`` (lstm). ``jpeft.merge(method, tree)`` caches the
    encoder output: it returns a tree for :meth:`prompt_method` (a :class:`PromptTuning`) with the
    same outputs and ``P d`` parameters.

    Args:
      num_virtual_tokens: P.
      encoder: ``"mlp"`` or ``"lstm"``.
      encoder_hidden_size: k; ``None`` means the embedding width d.
      profile: the architecture profile; ``None`` detects one.
      dtype: dtype of ``h`` and the encoder; by default the embedding table's, promoted to at least
        float32.
      extra_trainable: regex over base leaf paths that train fully.

    :class:`PromptTuning`'s ``init``, ``init_ids``, ``init_text`` and ``tokenizer`` do not apply:
    the encoder's inputs ``h`` are learned embeddings of pseudo tokens, ``N(0, 1)`` at init as in
    the paper and HF PEFT's ``PromptEncoder`` (which has no init from text), and the prompt is the
    encoder's output, so there is no prompt to initialise from vocabulary rows.

    Raises:
      JpeftError: on an unknown ``encoder``, ``encoder_hidden_size <= 0``, a non-float ``dtype``, or
        any of ``init``, ``init_ids``, ``init_text``, ``tokenizer`` (PromptTuning's fields).

    Example:
      >>> import jax, jax.numpy as jnp, jpeft, transformers
      >>> config = transformers.GPT2Config(vocab_size=50, n_embd=16, n_layer=1, n_head=2, n_positions=32)
      >>> with jax.numpy_rank_promotion("allow"):  # HF's Flax code relies on implicit rank promotion
      ...   model = transformers.FlaxGPT2LMHeadModel(config, seed=0)
      >>> method = jpeft.PTuning(num_virtual_tokens=4, encoder="mlp", encoder_hidden_size=8)
      >>> peft = jpeft.apply(method, model.params, key=jax.random.key(0))
      >>> method.param_count(model.params) == 4 * 16 + (16 * 8 + 8) + (8 * 8 + 8) + (8 * 16 + 16)
      True
      >>> cached = jpeft.merge(method, peft)  # for method.prompt_method()
      >>> sorted(cached["transformer"]["wte"]["__jpeft__"]["default"])
      ['prompt']

    References:
      Liu et al., "GPT Understands, Too", 2021.
    """

    encoder: str = "mlp"
    encoder_hidden_size: int | None = None

    def __post_init__(self) -> None:
        given = [f for f in ("init_ids", "init_text", "tokenizer") if getattr(self, f) is not None]
        given = (["init"] if self.init != "random" else []) + given
        if given:
            field = given[0]
            raise JpeftError(
                f"{self._name()}({field}={getattr(self, field)!r}): P-tuning has no {field}; its prompt is the "
                "output of the prompt encoder over learned N(0, 1) input embeddings (as HF PEFT's "
                "PromptEncoder). Drop the argument, or use jpeft.PromptTuning(init=...) for a prompt "
                "initialised from vocabulary rows or text."
            )
        super().__post_init__()
        _errors.one_of(self._name(), "encoder", self.encoder, ("mlp", "lstm"))
        if self.encoder_hidden_size is not None:
            _errors.positive_int(self._name(), "encoder_hidden_size", self.encoder_hidden_size)

    def _shapes(self, d: int) -> dict[str, tuple[int, ...]]:
        k = self.encoder_hidden_size or d
        shapes: dict[str, tuple[int, ...]] = {"input_embeds": (self.num_virtual_tokens, d)}
        if self.encoder == "mlp":
            dims = [(d, k), (k, k), (k, d)]
        else:
            for layer, n_in in enumerate((d, 2 * k)):
                for side in ("fwd", "bwd"):
                    p = f"lstm{layer}_{side}"
                    shapes.update({f"{p}_wi": (n_in, 4 * k), f"{p}_wh": (k, 4 * k), f"{p}_b": (4 * k,)})
            dims = [(2 * k, 2 * k), (2 * k, d)]
        for i, (a, b) in enumerate(dims):
            shapes.update({f"mlp{i}_kernel": (a, b), f"mlp{i}_bias": (b,)})
        return shapes

    def init_module(self, key: jax.Array, path: Path, own: Mapping[str, Any], ctx: Context) -> dict[str, jax.Array]:
        table = own["embedding"]
        shapes, dtype = self._shapes(int(table.shape[1])), self.delta_dtype(table.dtype)
        out = {}
        for i, (leaf, shape) in enumerate(sorted(shapes.items())):
            k = jax.random.fold_in(key, i)
            if leaf == "input_embeds":  # torch.nn.Embedding's N(0, 1)
                out[leaf] = jax.random.normal(k, shape, dtype)
                continue
            # torch's defaults: uniform in ±1/sqrt(hidden) for the LSTM, ±1/sqrt(fan_in) for Linear
            fan = shape[-1] // 4 if leaf.startswith("lstm") else shapes[leaf.replace("bias", "kernel")][0]
            out[leaf] = _uniform(k, shape, 1 / math.sqrt(fan), dtype)
        return out

    def param_count(self, params: PyTree) -> int:
        d = int(self.embedding_site(params)[1].shape[1])
        return sum(math.prod(s) for s in self._shapes(d).values())

    def prompt(self, deltas: Any) -> jax.Array:
        x = deltas["input_embeds"]
        if self.encoder == "mlp":
            h = jax.nn.relu(_linear(deltas, "mlp0", x))
            return _linear(deltas, "mlp2", jax.nn.relu(_linear(deltas, "mlp1", h)))
        for layer in range(2):
            p = f"lstm{layer}"
            fwd = _lstm(x, deltas[f"{p}_fwd_wi"], deltas[f"{p}_fwd_wh"], deltas[f"{p}_fwd_b"])
            bwd = _lstm(x[::-1], deltas[f"{p}_bwd_wi"], deltas[f"{p}_bwd_wh"], deltas[f"{p}_bwd_b"])[::-1]
            x = jnp.concatenate([fwd, bwd], axis=-1)
        return _linear(deltas, "mlp1", jax.nn.relu(_linear(deltas, "mlp0", x)))

    def prompt_method(self) -> PromptTuning:
        """The :class:`PromptTuning` that runs the tree ``jpeft.merge(self, tree)`` returns."""
        return PromptTuning(
            num_virtual_tokens=self.num_virtual_tokens,
            profile=self.profile,
            dtype=self.dtype,
            extra_trainable=self.extra_trainable,
        )

    def merge_tree(self, peft_params: PyTree, name: str) -> PyTree:
        path, _ = self.embedding_site(peft_params)
        out = _tree.as_dicts(peft_params)
        store = _tree.get(out, path).get(RESERVED, {})
        if name not in store:
            raise JpeftError(
                f"jpeft.merge({self._name()}): {join(path)} holds no deltas of adapter {name!r}. Pass the "
                "tree returned by jpeft.apply (and trained), not the base params."
            )
        store[name] = {"prompt": self.prompt(store[name])}
        return out
