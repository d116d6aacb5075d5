"""Prefix tuning and P-tuning v2: learned key and value prefixes in every attention layer.

The wrapped apply extends the inputs by ``P`` placeholder positions (as prompt tuning does, see
``_prompt.py``). At every layer the key and value projection interceptors overwrite the outputs at
those positions with the layer's prefixes; for a fused QKV projection (GPT-2's ``c_attn``) the key
and value thirds are overwritten. Real positions only ever *read* the prefix positions through their
keys and values, which are overwritten in every layer, so they see exactly
``Attn(x W_q, [P_k; x W_k], [P_v; x W_v])``.

The prefixes live in *projection-output* space: for Llama they are pre-RoPE keys, rotated by the
model like the keys of real tokens at positions ``0 .. P-1``. Setting them to the base model's own
key and value projections of real tokens ``t_1..t_P`` reproduces the base model on ``[t; x]``.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jpeft import _errors, _tree
from jpeft._errors import JpeftError
from jpeft._method import Context
from jpeft._tree import RESERVED, Path, PyTree, join
from jpeft.methods._prompt import _WRITE, VirtualTokens, _uniform, overwrite


@dataclasses.dataclass(frozen=True)
class _Site:
    """One prefix leaf: a module, the leaf's name, and its ``(stack, features)`` shape around ``P``."""

    path: Path
    leaf: str
    stack: tuple[int, ...]
    features: tuple[int, ...]

    @property
    def size(self) -> int:
        return math.prod(self.stack) * math.prod(self.features)


@dataclasses.dataclass(frozen=True, kw_only=True)
class PrefixTuning(VirtualTokens):
    """Prefix tuning: per-layer key and value prefixes, ``K = [P_k; x W_k]``, ``V = [P_v; x W_v]``.

    Per layer ``l`` the prefixes are ``P_k^l, P_v^l: (P, d_kv)``, where ``d_kv`` is the key
    projection's output width (``d``, or fewer with grouped-query attention); ``L`` is the number
    of attention layers.

    - ``prefix_projection=True`` (the paper's reparameterisation): ``[P_k; P_v] = tanh(E W1 + b1)
      W2 + b2`` with ``E: (P, d)``, ``W1: (d, k)``, ``W2: (k, 2 L d_kv)``, all stored at
      ``<embedding>/__jpeft__/<name>/``. Trainable: ``P d + d k + k + 2 L d_kv k + 2 L d_kv``.
      ``jpeft.merge`` folds the MLP into plain prefixes: it returns the tree of
      :meth:`folded_method` (P-tuning v2), with identical outputs and ``2 L P d_kv`` parameters.
    - ``prefix_projection=False``: the prefixes themselves are the parameters (``N(0, 1)`` init, as
      HF PEFT's ``nn.Embedding``), at ``<key module>/__jpeft__/<name>/prefix`` (and ``prefix_key``,
      ``prefix_value`` at a fused QKV module). Trainable: ``2 L P d_kv``. ``jpeft.merge`` raises.

    Not identity at init, and never mergeable into the weights.

    Encoder-decoders (BART), as in Li and Liang: prefixes on the encoder self-attention, the decoder
    self-attention and the cross-attention (its own per-layer ``P_k, P_v``, overwriting the keys and
    values of the encoder's ``P`` extra output positions), so ``L`` counts all three kinds.

    Args:
      num_virtual_tokens: P.
      prefix_projection: train the MLP reparameterisation.
      projection_hidden_size: k.
      profile: the architecture profile; ``None`` detects one.
      dtype: dtype of the prefixes (or of the MLP and ``E``); by default the base's, promoted to at
        least float32. The forward casts the prefixes to the key and value projections' dtype.
      extra_trainable: regex over base leaf paths that train fully.

    Raises:
      JpeftError: on ``num_virtual_tokens <= 0``, ``projection_hidden_size <= 0``, a non-float
        ``dtype``, a tree whose profile cannot be detected, or key and value modules of a layout it
        cannot slice.

    Example:
      >>> import jax, jax.numpy as jnp, jpeft, transformers
      >>> config = transformers.GPT2Config(vocab_size=50, n_embd=16, n_layer=2, n_head=2, n_positions=32)
      >>> with jax.numpy_rank_promotion("allow"):  # HF's Flax code relies on implicit rank promotion
      ...   model = transformers.FlaxGPT2LMHeadModel(config, seed=0)
      >>> method = jpeft.PrefixTuning(num_virtual_tokens=3, projection_hidden_size=8)
      >>> peft = jpeft.apply(method, model.params, key=jax.random.key(0))
      >>> method.param_count(model.params) == 3 * 16 + 16 * 8 + 8 + 8 * (2 * 2 * 16) + 2 * 2 * 16
      True
      >>> folded = jpeft.merge(method, peft)  # for method.folded_method()
      >>> folded["transformer"]["h"]["1"]["attn"]["c_attn"]["__jpeft__"]["default"]["prefix_value"].shape
      (3, 16)

    References:
      Li and Liang, "Prefix-Tuning: Optimizing Continuous Prompts for Generation", 2021.
    """

    num_virtual_tokens: int = 30
    prefix_projection: bool = True
    projection_hidden_size: int = 512

    on_decoder = True  # an encoder-decoder's decoder self-attention gets prefixes too
    virtual_queries = False  # placeholders are keys and values only: dropped before any head

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.prefix_projection, bool):
            raise JpeftError(f"{self._name()}(prefix_projection={self.prefix_projection!r}): must be a bool.")
        _errors.positive_int(self._name(), "projection_hidden_size", self.projection_hidden_size)

    # --- where the prefixes go -----------------------------------------------------------------
    def prefix_sites(self, params: PyTree) -> list[_Site]:
        """The prefix leaves, ordered by layer, key before value: the column order of the MLP output."""
        profile = self.profile_of(params)
        ctx = Context(params)
        mods = _tree.modules(params)
        found: list[tuple[int, int, _Site]] = []
        # An encoder-decoder's cross-attention key and value projections: the children of a
        # cross-attention module named like the self-attention ones (BART: encoder_attn/k_proj).
        names = {
            field: {p[-1] for p in mods if p and re.fullmatch(getattr(profile, field), join(p))} for field in ("key", "value")
        }

        def cross(path: Path, field: str) -> bool:
            return (
                profile.cross_attention is not None
                and len(path) > 1
                and path[-1] in names[field]
                and re.fullmatch(profile.cross_attention, join(path[:-1])) is not None
            )

        for path, own in mods.items():
            joined = join(path)
            fused = profile.qkv_fused is not None and re.fullmatch(profile.qkv_fused, joined)
            kinds = [("prefix_key", 0), ("prefix_value", 1)] if fused else []
            if not fused:
                kinds += [("prefix", 0)] if re.fullmatch(profile.key, joined) or cross(path, "key") else []
                kinds += [("prefix", 1)] if re.fullmatch(profile.value, joined) or cross(path, "value") else []
            if not kinds:
                continue
            if not fused and len(kinds) == 2:
                raise JpeftError(
                    f"{self._name()}: {joined} is both the key and the value projection of profile "
                    f"{profile.name!r} (a stacked key-value weight, such as tunix Gemma 3's kv_einsum with its "
                    "(2, B, T, K, H) output); prefixes need separate key and value projections or a fused "
                    "[q; k; v] Dense. Use prompt tuning or LoRA on this model."
                )
            layout = ctx.layout(self._name(), path, own, profile.layouts)
            if layout.kind not in ("dense", "transposed", "dense_general"):
                raise JpeftError(
                    f"{self._name()}: {joined} has a {layout.kind!r} kernel; key and value projections must "
                    "be dense (nn.Dense, nn.DenseGeneral or a transposed Conv1D)."
                )
            stack, _, out = layout.split(tuple(own[layout.leaf].shape))
            if fused:
                if len(out) != 1 or out[0] % 3:
                    raise JpeftError(
                        f"{self._name()}: fused QKV module {joined} has output features {out}; expected one "
                        "axis of 3 equal parts [q; k; v]."
                    )
                out = (out[0] // 3,)
            layer = re.search(profile.layer_pattern, joined)
            for leaf, order in kinds:
                found.append((int(layer.group(1)) if layer else 0, order, _Site(path, leaf, stack, out)))
        if not found:
            raise JpeftError(
                f"{self._name()}: profile {profile.name!r} finds no key or value projection in the tree "
                f"(key={profile.key!r}). Pass a profile whose key/value regexes name the modules."
            )
        found.sort(key=lambda t: (t[0], t[1], t[2].path))
        return [s for _, _, s in found]

    def select(self, params: PyTree) -> list[Path]:
        if self.prefix_projection:
            return [self.embedding_site(params)[0]]
        return sorted({s.path for s in self.prefix_sites(params)})

    def init_module(self, key: jax.Array, path: Path, own: Mapping[str, Any], ctx: Context) -> dict[str, jax.Array]:
        n = self.num_virtual_tokens
        if not self.prefix_projection:
            sites = [s for s in self.prefix_sites(ctx.params) if s.path == path]
            dtype = self.delta_dtype(next(v.dtype for v in own.values()))
            return {
                s.leaf: jnp.moveaxis(
                    jax.random.normal(jax.random.fold_in(key, i), (n,) + s.stack + s.features, dtype), 0, len(s.stack)
                )
                for i, s in enumerate(sites)
            }
        table = own["embedding"]
        d, k = int(table.shape[1]), self.projection_hidden_size
        total = sum(s.size for s in self.prefix_sites(ctx.params))
        keys, dtype = jax.random.split(key, 5), self.delta_dtype(table.dtype)
        return {  # torch's defaults: N(0, 1) embeddings, Linear uniform in ±1/sqrt(fan_in)
            "prefix_embedding": jax.random.normal(keys[0], (n, d), dtype),
            "w1": _uniform(keys[1], (d, k), 1 / math.sqrt(d), dtype),
            "b1": _uniform(keys[2], (k,), 1 / math.sqrt(d), dtype),
            "w2": _uniform(keys[3], (k, total), 1 / math.sqrt(k), dtype),
            "b2": _uniform(keys[4], (total,), 1 / math.sqrt(k), dtype),
        }

    def param_count(self, params: PyTree) -> int:
        n, total = self.num_virtual_tokens, sum(s.size for s in self.prefix_sites(params))
        if not self.prefix_projection:
            return n * total
        d, k = int(self.embedding_site(params)[1].shape[1]), self.projection_hidden_size
        return n * d + d * k + k + k * total + total

    # --- the reparameterisation ----------------------------------------------------------------
    def prefixes(self, params: PyTree, name: str, component: str | None = None) -> dict[Path, dict[str, jax.Array]]:
        """The MLP's per-module prefix leaves ``{path: {leaf: (*stack, P, *features)}}``.

        ``component``: this method's key inside a :func:`jpeft.compose` (MAM), whose deltas sit at
        ``__jpeft__/<name>/<component>``; ``None`` for the bare method.
        """
        path, _ = self.embedding_site(params)
        store = _tree.get(params, path).get(RESERVED, {})
        mlp = store.get(name)
        if component is not None and isinstance(mlp, Mapping):
            mlp = mlp.get(component)
        if not isinstance(mlp, Mapping) or "w2" not in mlp:
            where = name if component is None else f"{name}/{component}"
            raise JpeftError(
                f"{self._name()}: {join(path)} holds no prefix MLP of adapter {where!r}. Pass the tree "
                "returned by jpeft.apply(method, params, key=..., name=...)."
            )
        flat = jnp.tanh(mlp["prefix_embedding"] @ mlp["w1"] + mlp["b1"][None, :]) @ mlp["w2"] + mlp["b2"][None, :]
        out: dict[Path, dict[str, jax.Array]] = {}
        start = 0
        for s in self.prefix_sites(params):
            block = flat[:, start : start + s.size].reshape((self.num_virtual_tokens,) + s.stack + s.features)
            out.setdefault(s.path, {})[s.leaf] = jnp.moveaxis(block, 0, len(s.stack))
            start += s.size
        return out

    def materialize(self, params: PyTree, active: str, component: str | None = None) -> PyTree:
        if not self.prefix_projection:
            return params
        out = _tree.as_dicts(params)
        for path, leaves in self.prefixes(params, active, component).items():
            node = _tree.get(out, path)
            store = dict(node.get(RESERVED, {}))
            if component is None:
                store[active] = leaves
            else:  # a composed tree: this component's leaves beside the others' on the module
                store[active] = {**store.get(active, {}), component: leaves}
            node[RESERVED] = store
        return out

    def folded_method(self) -> PTuningV2:
        """The method (plain prefixes) that runs the tree ``jpeft.merge(self, tree)`` returns."""
        return PTuningV2(
            num_virtual_tokens=self.num_virtual_tokens, profile=self.profile, dtype=self.dtype, extra_trainable=self.extra_trainable
        )

    def merge_tree(self, peft_params: PyTree, name: str) -> PyTree | None:
        if not self.prefix_projection:
            return None
        out = self.materialize(peft_params, name)
        node = _tree.get(out, self.embedding_site(peft_params)[0])
        store = {k: v for k, v in node[RESERVED].items() if k != name}
        if store:
            node[RESERVED] = store
        else:
            del node[RESERVED]
        return out

    def merge_module(self, path: Path, module_params: Mapping[str, Any], deltas: Any, ctx: Context) -> dict[str, Any]:
        raise JpeftError(
            f"{self._name()}(prefix_projection=False) cannot be merged: its prefixes are extra keys and values, "
            "not a change of weights, and there is no reparameterisation to fold. Keep using "
            "jpeft.wrap(apply_fn, method) for inference."
        )

    # --- forward -------------------------------------------------------------------------------
    def forward(self, module: nn.Module, next_fun: Any, args: tuple, kwargs: dict, deltas: Any) -> Any:
        y = next_fun(*args, **kwargs)
        n = _WRITE.get()
        if n is None:
            return y
        if "prefix" in deltas:
            return overwrite(y, deltas["prefix"], n)
        if "prefix_key" in deltas:
            third = y.shape[-1] // 3
            y = overwrite(y, deltas["prefix_key"], n, slice(third, 2 * third))
            return overwrite(y, deltas["prefix_value"], n, slice(2 * third, None))
        return y  # the embedding, which holds the MLP (read by ``materialize``)


@dataclasses.dataclass(frozen=True, kw_only=True)
class PTuningV2(PrefixTuning):
    """P-tuning v2: deep prompts, i.e. per-layer key and value prefixes without reparameterisation.

    The same forward pass as :class:`PrefixTuning`, with ``prefix_projection=False`` by default.
    Trainable parameters: ``2 L P d_kv`` (plus a task head through ``extra_trainable``).

    Args:
      num_virtual_tokens: P (the paper uses 20 to 100 depending on the task).
      prefix_projection: optional MLP reparameterisation, off by default.
      projection_hidden_size: its hidden width.
      profile: the architecture profile; ``None`` detects one.
      dtype: dtype of the prefixes; by default the base's, promoted to at least float32.
      extra_trainable: regex over base leaf paths that train fully, such as a classifier head.

    Example:
      >>> import jax, jpeft, transformers
      >>> config = transformers.GPT2Config(vocab_size=50, n_embd=16, n_layer=2, n_head=2, n_positions=32)
      >>> with jax.numpy_rank_promotion("allow"):  # HF's Flax code relies on implicit rank promotion
      ...   params = transformers.FlaxGPT2LMHeadModel(config, seed=0).params
      >>> jpeft.PTuningV2(num_virtual_tokens=4).param_count(params) == 2 * 2 * 4 * 16
      True

    References:
      Liu et al., "P-Tuning v2: Prompt Tuning Can Be Comparable to Fine-tuning Universally Across
      Scales and Tasks", ACL 2022.
    """

    num_virtual_tokens: int = 20
    prefix_projection: bool = False
