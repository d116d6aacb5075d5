"""LoRA and its variants: rsLoRA, DoRA, LoRA-FA and LoRA+.

Training runs the **unmerged** path, ``y = f(x; W) + s * dropout(x) @ a @ b``: the frozen kernel
gets no weight gradient and no merged copy is kept for the backward pass.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from jpeft import _errors, _layout, _tree
from jpeft._errors import JpeftError
from jpeft._intercept import linear_of
from jpeft._layout import Layout
from jpeft._method import Context, Method
from jpeft._tree import Path, PyTree, join


def _param_dtype(owner: str, path: Path, leaf: str, kernel: Any, dtype: str | None) -> jnp.dtype:
    if not jnp.issubdtype(kernel.dtype, jnp.floating):
        raise JpeftError(
            f"{owner}: {join(path + (leaf,))} has dtype {kernel.dtype}, expected a float kernel. "
            "Quantised bases need QLoRA; otherwise exclude this module from targets."
        )
    if dtype is not None:
        return jnp.dtype(dtype)
    return jnp.promote_types(kernel.dtype, jnp.float32)


def _broadcast_out(v: jax.Array, ndim: int) -> jax.Array:
    """Reshapes a per-output-feature array ``(*out)`` to broadcast against ``(..., *out)``."""
    return v.reshape((1,) * (ndim - v.ndim) + v.shape)


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoRA(Method):
    """Low-rank adaptation: ``y = x W + s * dropout(x) A B``.

    ``A: (d_in, r)`` and ``B: (r, d_out)`` in Flax's (in, out) layout; ``s = alpha / r``, or
    ``alpha / sqrt(r)`` with ``use_rslora``. ``B = 0`` at init, so training starts at the base
    model (for embeddings, as in HF PEFT, ``A = 0`` and ``B`` is Gaussian). With ``use_dora`` the
    weight is ``m * (W + s A B) / ||W + s A B||_c``, the column norm taken per output feature and
    held constant in the backward pass; ``m`` starts at ``||W||_c``. Trainable parameters per
    target: ``r (d_in + d_out)``, plus ``d_out`` for DoRA. Mergeable: ``W + s A B``.

    Dropout on the LoRA input is active when the caller passes a ``'dropout'`` rng to the wrapped
    apply, the Flax convention for training mode.

    Tied embeddings: on an embedding that an output head reads directly (GPT-2's ``wte``, BART's
    ``shared`` under their LM heads), the delta adapts only the input lookup and the head keeps the
    base table, as in HF PEFT. ``jpeft.merge`` refuses to fold it into the tied leaf (it would change
    the head too): keep ``jpeft.wrap`` for inference, or untie the head first
    (``jpeft.profiles.tied_embeddings`` lists the tied leaves). A custom model whose head calls
    ``nn.Embed.attend`` on the adapted module is tied the same way, but jpeft cannot see that from
    the tree: do not merge such a delta.

    Args:
      targets: a regex over '/'-joined module paths, matched in full (``r".*/(query|value)"``), or a
        sequence of module-name suffixes (``("query", "value")``, like HF PEFT's
        ``target_modules``; ``jpeft.profiles.GPT2.lora_default`` is one).
      rank: r.
      alpha: the scaling numerator.
      dropout: dropout rate on the LoRA input.
      use_rslora: scale by ``alpha / sqrt(r)`` (rank-stabilised LoRA).
      use_dora: weight-decomposed LoRA (DoRA).
      init: ``"kaiming"`` (A uniform in ``±1/sqrt(d_in)``, as torch's default for Linear) or
        ``"gaussian"`` (A normal with std ``1/r``).
      layouts: ``(regex, layout)`` pairs for kernels not in Flax's (in, out) layout, such as
        ``(".*/conv", "conv")``; see ``jpeft.Layout``. Profiles of known families add theirs.
      dtype: dtype of the factors; by default the kernel's, promoted to at least float32.
      extra_trainable: regex over base leaf paths that train fully (e.g. a classifier head).

    Example:
      >>> import jax, jax.numpy as jnp, flax.linen as nn, jpeft
      >>> model = nn.Dense(4)
      >>> params = model.init(jax.random.key(0), jnp.ones((1, 6)))["params"]
      >>> method = jpeft.LoRA(targets=".*", rank=2, alpha=4.0)
      >>> peft = jpeft.apply(method, {"dense": params}, key=jax.random.key(1))["dense"]
      >>> jax.tree.map(jnp.shape, peft["__jpeft__"])
      {'default': {'lora_a': (6, 2), 'lora_b': (2, 4)}}

    References:
      Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", 2021.
      Kalajdzievski, "A Rank Stabilization Scaling Factor for Fine-Tuning with LoRA", 2023.
      Liu et al., "DoRA: Weight-Decomposed Low-Rank Adaptation", 2024.
    """

    lora_factors: ClassVar[bool] = True

    targets: str | tuple[str, ...]
    rank: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    use_rslora: bool = False
    use_dora: bool = False
    init: str = "kaiming"
    layouts: tuple[tuple[str, str], ...] = ()
    dtype: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        name = self._name()
        object.__setattr__(self, "targets", _tree.normalize_targets(name, self.targets))
        _errors.positive_int(name, "rank", self.rank)
        _errors.positive_number(name, "alpha", self.alpha)
        _errors.probability(name, "dropout", self.dropout)
        _errors.one_of(name, "init", self.init, ("kaiming", "gaussian"))
        for flag in ("use_rslora", "use_dora"):
            if not isinstance(getattr(self, flag), bool):
                raise JpeftError(f"{name}({flag}={getattr(self, flag)!r}): {flag} must be a bool.")
        object.__setattr__(self, "layouts", _layout.overrides(name, self.layouts))
        object.__setattr__(self, "dtype", _errors.float_dtype(name, "dtype", self.dtype))

    @property
    def scale(self) -> float:
        """The LoRA scale ``s``."""
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)

    # --- structure -----------------------------------------------------------------------------
    def select(self, params: PyTree) -> list[Path]:
        return _tree.select(self._name(), self.targets, params)

    def _shapes(self, path: Path, own: Mapping[str, Any], ctx: Context) -> tuple[Layout, tuple, tuple, tuple]:
        layout = ctx.layout(self._name(), path, own, self.layouts)
        shape = tuple(own[layout.leaf].shape)
        stack, d_in, d_out = layout.split(shape)
        limit = min(math.prod(d_in), math.prod(d_out))
        if self.rank > limit:
            raise JpeftError(
                f"{self._name()}(rank={self.rank}): {join(path + (layout.leaf,))} has shape {shape} "
                f"(in {d_in}, out {d_out}); rank must be <= {limit}. Lower the rank or exclude this module."
            )
        if self.use_dora and layout.kind == "embed":
            raise JpeftError(
                f"{self._name()}(use_dora=True): {join(path)!r} is an embedding; DoRA applies to "
                "linear kernels only. Exclude embeddings from targets."
            )
        return layout, stack, d_in, d_out

    def init_module(self, key: jax.Array, path: Path, own: Mapping[str, Any], ctx: Context) -> dict[str, jax.Array]:
        layout, stack, d_in, d_out = self._shapes(path, own, ctx)
        kernel = own[layout.leaf]
        dtype = _param_dtype(self._name(), path, layout.leaf, kernel, self.dtype)
        a_shape, b_shape = layout.factor_shapes(tuple(kernel.shape), self.rank)
        ka, kb = jax.random.split(key)
        if layout.kind == "embed":
            a = jnp.zeros(a_shape, dtype)
            b = jax.random.normal(kb, b_shape, dtype)
        else:
            if self.init == "kaiming":
                bound = 1.0 / math.sqrt(math.prod(d_in))
                a = jax.random.uniform(ka, a_shape, dtype, -bound, bound)
            else:
                a = jax.random.normal(ka, a_shape, dtype) / self.rank
            b = jnp.zeros(b_shape, dtype)
        deltas = {"lora_a": a, "lora_b": b}
        if self.use_dora:
            if isinstance(kernel, jax.ShapeDtypeStruct):  # jpeft.on_quantized shows quantised kernels abstractly
                raise JpeftError(
                    f"{self._name()}: {join(path)!r} holds a quantised kernel; DoRA's magnitude and column norm need the "
                    "float kernel, so DoRA on quantised kernels is not supported. Leave this module out of "
                    "jpeft.quantize's targets, or use jpeft.LoRA."
                )
            w = kernel.astype(dtype)
            deltas["magnitude"] = jnp.sqrt(jnp.sum(w * w, axis=layout.reduce_axes()))
        return deltas

    def param_count(self, params: PyTree) -> int:
        ctx = Context(params)
        total = self.extra_count(params)
        modules = _tree.modules(params)
        for path in self.select(params):
            _, stack, d_in, d_out = self._shapes(path, modules[path], ctx)
            per = self.rank * (self._trains_a() * math.prod(d_in) + math.prod(d_out))
            per += math.prod(d_out) if self.use_dora else 0
            total += math.prod(stack) * per
        return total

    def _trains_a(self) -> bool:
        return True

    # --- forward -------------------------------------------------------------------------------
    def forward(self, module: nn.Module, next_fun: Any, args: tuple, kwargs: dict, deltas: Any) -> Any:
        linear = linear_of(module)
        layout = linear.layout_of(module)
        kernel = module.get_variable("params", layout.leaf)
        a, b = deltas["lora_a"], deltas["lora_b"]
        want = layout.factor_shapes(tuple(kernel.shape), a.shape[-1])
        if (tuple(a.shape), tuple(b.shape)) != want:
            raise JpeftError(
                f"{self._name()}: at {join(module.path)!r} ({type(module).__name__}, {layout.leaf} "
                f"{tuple(kernel.shape)}, layout {layout.spec()!r}) lora_a/lora_b have shapes "
                f"{tuple(a.shape)}/{tuple(b.shape)}, expected {want[0]}/{want[1]}. The deltas were made "
                f"for another layout: pass layouts=((r'{join(module.path)}', '{layout.spec()}'),) to the "
                "method and call jpeft.apply again."
            )
        y = next_fun(*args, **kwargs)
        x = linear.inputs(args, kwargs)
        dropped = self.dropout > 0 and layout.kind != "embed" and module.has_rng("dropout")
        if dropped:
            keep = jax.random.bernoulli(module.make_rng("dropout"), 1.0 - self.dropout, x.shape)
            x = jnp.where(keep, x / (1.0 - self.dropout), jnp.zeros_like(x))
        dtype = jnp.promote_types(a.dtype, y.dtype)
        if layout.kind != "embed":
            x = x.astype(dtype)
        h = linear.down(module, x, a.astype(dtype)) * jnp.asarray(self.scale, dtype)
        # Token-major 2-D product: with the 3-D ``tensordot`` XLA:CPU computes dB from a
        # transposed, re-fused copy of dY (a (d_out, tokens) buffer per layer, ~14% of the step).
        delta = (h.reshape(-1, h.shape[-1]) @ b.reshape(b.shape[0], -1).astype(dtype)).reshape(h.shape[:-1] + b.shape[1:])
        delta = linear.to_output(module, delta)  # where the module's output holds the output axes
        if not self.use_dora:
            return y + delta.astype(y.dtype)
        w = kernel.astype(dtype) + self.scale * layout.full_delta(a.astype(dtype), b.astype(dtype))
        norm = jax.lax.stop_gradient(jnp.sqrt(jnp.sum(w * w, axis=layout.reduce_axes())))
        factor = linear.to_output(module, _broadcast_out(deltas["magnitude"].astype(dtype) / norm, y.ndim))
        bias = module.get_variable("params", "bias") if module.has_variable("params", "bias") else None
        if dropped:  # x W on the dropped-out input, as HF PEFT's DoRA does
            base = linear.down(module, x, layout.as_down(kernel).astype(dtype))
            return (y + ((factor - 1) * base + factor * delta).astype(y.dtype)).astype(y.dtype)
        from jpeft.methods import _dora  # keeps the output, not y - bias and delta, for the backward

        shift = _broadcast_out(bias.astype(dtype), y.ndim) if bias is not None else jnp.zeros((1,) * y.ndim, dtype)
        return _dora.combine(y, delta, factor, shift)

    @classmethod
    def gather_forward(cls, module: nn.Module, y: Any, args: tuple, kwargs: dict, adapters: list, slot: Any) -> Any:
        """Mixed batches at one adapter's cost (the ``jpeft._gather`` hook): each row gathers its
        adapter's factors. ``None`` (the looped path runs) for DoRA, active dropout, overridden
        ``forward``, embeddings/convolutions, stacked kernels or mixed factor dtypes."""
        from jpeft import _gather

        if any(type(m).forward is not LoRA.forward or m.use_dora for m, _ in adapters):
            return None
        if any(m.dropout > 0 for m, _ in adapters) and module.has_rng("dropout"):
            return None
        linear = linear_of(module)
        layout = linear.layout_of(module)
        if layout.kind not in ("dense", "transposed", "dense_general") or linear.place is not None:
            return None
        shape = tuple(module.get_variable("params", layout.leaf).shape)
        x = linear.inputs(args, kwargs)
        rows = slot.shape[0]
        if layout.split(shape)[0] or not isinstance(y, jax.Array) or y.shape[:1] != (rows,) or x.shape[:1] != (rows,):
            return None
        factors = [(d["lora_a"], d["lora_b"], m.scale) for m, d in adapters]
        dtype = factors[0][0].dtype
        for a, b, _ in factors:
            if (tuple(a.shape), tuple(b.shape)) != layout.factor_shapes(shape, a.shape[-1]):
                return None
            if {a.dtype, b.dtype} != {dtype}:
                return None
        return _gather.low_rank(module, linear, y, x, factors, slot)

    # --- merge ---------------------------------------------------------------------------------
    def merge_module(self, path: Path, own: Mapping[str, Any], deltas: Any, ctx: Context) -> dict[str, Any]:
        layout = ctx.layout(self._name(), path, own, self.layouts)
        kernel = own[layout.leaf]
        a, b = deltas["lora_a"], deltas["lora_b"]
        dtype = jnp.promote_types(kernel.dtype, a.dtype)
        w = kernel.astype(dtype) + self.scale * layout.full_delta(a.astype(dtype), b.astype(dtype))
        if self.use_dora:
            axes = layout.reduce_axes()
            norm = jnp.sqrt(jnp.sum(w * w, axis=axes, keepdims=True))
            w = jnp.expand_dims(deltas["magnitude"].astype(dtype), axes) * w / norm
        return {layout.leaf: w.astype(kernel.dtype)}


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoRAFA(LoRA):
    """LoRA-FA: A stays frozen at its random init and only B trains.

    That halves the trainable parameters, and the backward pass keeps only ``x A`` (r features),
    not ``x``. ``jpeft.labels`` marks ``lora_a`` ``'frozen'``. See :class:`LoRA` for the arguments.

    Example:
      >>> import jpeft
      >>> jpeft.LoRAFA(targets=("query",)).delta_label("lora_a")
      'frozen'

    References:
      Zhang et al., "LoRA-FA: Memory-efficient Low-rank Adaptation for LLMs Fine-tuning", 2023.
    """

    def delta_label(self, leaf: str) -> str:
        return "frozen" if leaf == "lora_a" else "trainable"

    def _trains_a(self) -> bool:
        return False


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoRAPlus(LoRA):
    """LoRA+: B learns ``lr_ratio`` times faster than A.

    Purely an optimizer change: ``jpeft.labels`` gives ``'lora_a'`` and ``'lora_b'`` (DoRA's
    ``magnitude`` too, as in HF PEFT), and ``jpeft.optimizer`` runs the user's transform once over
    all trainable leaves, then scales the ``'lora_b'`` updates by ``lr_ratio``. For Adam-type rules
    (AdamW's decoupled decay included) that equals multiplying B's learning rate by ``lr_ratio``; a
    global-norm clip inside the transform sees A and B together. See :class:`LoRA` for the other
    arguments.

    Args:
      lr_ratio: B's learning rate over A's (the paper's lambda, about 16).

    Example:
      >>> import jpeft
      >>> jpeft.LoRAPlus(targets=("query",), lr_ratio=16.0).delta_label("lora_b")
      'lora_b'

    References:
      Hayou et al., "LoRA+: Efficient Low Rank Adaptation of Large Models", 2024.
    """

    lr_ratio: float = 16.0

    def __post_init__(self) -> None:
        super().__post_init__()
        _errors.positive_number(self._name(), "lr_ratio", self.lr_ratio)

    def delta_label(self, leaf: str) -> str:
        # DoRA's magnitude learns at B's rate, as in HF PEFT's create_loraplus_optimizer (1-D leaves).
        return "lora_b" if leaf in ("lora_b", "magnitude") else "lora_a"

    def wrap_optimizer(self, tx: optax.GradientTransformation, only: Any) -> optax.GradientTransformation:
        return optax.chain(tx, only("lora_b", optax.scale(self.lr_ratio)))
