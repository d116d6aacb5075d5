"""The base class of every PEFT method.

A method is a frozen, keyword-only dataclass: hashable (a static ``jit`` argument) and
serialisable with ``dataclasses.asdict``. The public functions of ``jpeft._core`` drive it through
the hooks below; a new method overrides the ones it needs.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import flax.linen as nn
import jax
import optax

from jpeft import _errors, _layout, _tree
from jpeft._errors import JpeftError
from jpeft._layout import Layout
from jpeft._tree import Path, PyTree, join


class Context:
    """What a method sees of the whole tree while it makes or merges one module's deltas."""

    def __init__(self, params: PyTree):
        self.params = params

    @functools.cached_property
    def profile_layouts(self) -> tuple[tuple[str, str], ...]:
        """The kernel layouts of every shipped profile whose family the tree holds."""
        from jpeft import profiles

        return tuple(pair for p in profiles.matching(self.params) for pair in p.layouts)

    def layout(
        self, owner: str, path: Path, module_params: Mapping[str, Any], overrides: tuple[tuple[str, str], ...]
    ) -> Layout:
        """Resolves a module's kernel layout: ``overrides`` first, then the profile, then defaults."""
        return _layout.resolve(owner, path, module_params, tuple(overrides) + self.profile_layouts)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Method:
    """Fields and hooks shared by all methods.

    Attributes:
      extra_trainable: a regex over '/'-joined *leaf* paths of base parameters that train fully
        alongside the method, such as a task head (HF PEFT's ``modules_to_save``).

    Example:
      >>> import jpeft
      >>> method = jpeft.LoRA(targets=("query", "value"), rank=8, extra_trainable=r"classifier/.*")
      >>> isinstance(method, jpeft.Method), method.mergeable, method.site_role
      (True, True, 'weight')
    """

    extra_trainable: str | None = None

    mergeable: ClassVar[bool] = True
    identity_at_init: ClassVar[bool] = True
    #: False for methods that only choose which *base* leaves train (BitFit, Freeze, Full): they
    #: add no delta leaves, ``wrap`` runs the model unchanged and ``merge`` is the identity.
    has_deltas: ClassVar[bool] = True
    #: Where the method acts on a module it targets, which orders it in ``jpeft.compose``:
    #: ``'weight'`` (reparameterises the kernel: LoRA, diff pruning, QLoRA) runs innermost, then
    #: ``'scale'`` ((IA)^3 rescales outputs), ``'output'`` (adapters transform the output) and
    #: ``'overwrite'`` (prompts and prefixes overwrite positions) outermost. Two composed methods
    #: with the same role on one module conflict.
    site_role: ClassVar[str] = "weight"
    #: False where ``wrap(...)(..., adapter_index=)`` cannot run one adapter per row (LoRA-drop: the
    #: shared pairs live at the tree's root and are published to the layers during the root's call).
    mixed_batches: ClassVar[bool] = True
    #: Why ``mixed_batches`` is False, for the error message.
    mixed_batches_why: ClassVar[str] = ""
    #: True where ``forward`` needs the module's own call to run again inside it (parallel adapters
    #: intercept the projections of the block they wrap): the mixed-batch and runtime-drop paths
    #: then re-run the module for the method instead of handing it the precomputed base output.
    reenters: ClassVar[bool] = False
    #: True for the LoRA family: on NNX models its trainable factors are also ``nnx.LoRAParam``
    #: (``jpeft.LoRADelta``), so ``nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)`` trains them.
    lora_factors: ClassVar[bool] = False

    def __post_init__(self) -> None:
        if self.extra_trainable is not None:
            _errors.regex(self._name(), "extra_trainable", self.extra_trainable)

    def _name(self) -> str:
        return type(self).__name__

    # --- structure -----------------------------------------------------------------------------
    def select(self, params: PyTree) -> list[Path]:
        """The module paths that receive delta leaves; raises when there are none."""
        raise NotImplementedError(f"{self._name()} must implement select(params).")

    def init_module(
        self, key: jax.Array, path: Path, module_params: Mapping[str, Any], ctx: Context
    ) -> dict[str, jax.Array]:
        """Makes the delta leaves of one target module."""
        raise NotImplementedError

    def param_count(self, params: PyTree) -> int:
        """The closed-form number of trainable parameters this method gives ``params``."""
        raise NotImplementedError

    def extra_count(self, params: PyTree) -> int:
        """The number of base parameters that ``extra_trainable`` selects."""
        if self.extra_trainable is None:
            return 0
        return sum(
            _tree.size(x)
            for p, x in _tree.leaves(params)
            if _tree.RESERVED not in p and re.fullmatch(self.extra_trainable, join(p))
        )

    # --- forward -------------------------------------------------------------------------------
    def forward(self, module: nn.Module, next_fun: Any, args: tuple, kwargs: dict, deltas: Any) -> Any:
        """Runs an intercepted module call with its deltas in effect."""
        return next_fun(*args, **kwargs)

    def base_forward(self, module: nn.Module, next_fun: Any, args: tuple, kwargs: dict) -> Any:
        """The intercepted module's output without this method's change; by default ``next_fun(*args, **kwargs)``.

        ``jpeft.wrap`` hands it to :meth:`forward` as the innermost ``next_fun`` and runs it alone
        where a module skips its deltas (AdapterDrop, the ``-1`` rows of a mixed batch). QLoRA
        overrides it to compute quantised layers, whose own ``__call__`` cannot read an NF4 kernel.
        """
        return next_fun(*args, **kwargs)

    def call(self, apply_fn: Callable[..., Any], variables: PyTree, args: tuple, kwargs: dict, *, active: str) -> Any:
        """Runs the wrapped ``apply_fn``; ``jpeft.wrap`` calls it inside the interceptor context.

        The default calls through. Prompt and prefix methods override it to extend the inputs by
        their virtual positions and to slice the outputs back to the caller's length.
        """
        return apply_fn(variables, *args, **kwargs)

    # --- merge ---------------------------------------------------------------------------------
    def merge_tree(self, peft_params: PyTree, name: str) -> PyTree | None:
        """A whole-tree ``jpeft.merge``, or ``None`` (the default) for the per-module path.

        For folds that move deltas between modules, such as prefix tuning's MLP, which lives at the
        embedding, into plain per-layer prefixes at the key and value projections.
        """
        return None

    def merge_module(
        self, path: Path, module_params: Mapping[str, Any], deltas: Any, ctx: Context
    ) -> dict[str, Any]:
        """Returns the base leaves of one module with its deltas folded in."""
        raise JpeftError(
            f"{self._name()} cannot be merged into the base weights: it changes activations, not "
            "weights. Keep using jpeft.wrap(apply_fn, method) for inference (on NNX: the adapted model itself)."
        )

    # --- training ------------------------------------------------------------------------------
    def penalty(self, path: Path, module_params: Mapping[str, Any], deltas: Any) -> jax.Array | None:
        """A loss term for one module's deltas (AdaLoRA's orthogonality, diff pruning's L0).

        ``jpeft.regularizer`` sums it over the tree; ``None`` means no term. Traceable: it runs
        inside the user's loss function.
        """
        return None

    def tree_penalty(self, peft_params: PyTree, name: str) -> jax.Array | None:
        """A whole-tree loss term for ``jpeft.regularizer``, or ``None`` (the default) for the per-module sum.

        For terms that are not a sum over modules, such as AdaLoRA's mean over all factor matrices.
        """
        return None

    def delta_label_at(self, path: Path) -> str:
        """The optimizer label of the delta leaf at the full ``path``; by default by its leaf name."""
        return self.delta_label(path[-1])

    def delta_label(self, leaf: str) -> str:
        """The optimizer label of a delta leaf; ``'frozen'`` for leaves that do not train."""
        return "trainable"

    def base_label(self, path: Path) -> str:
        """The optimizer label of a base leaf at ``path``."""
        if self.extra_trainable is not None and re.fullmatch(self.extra_trainable, join(path)):
            return "trainable"
        return "frozen"

    def base_labeller(self, tree: PyTree) -> Callable[[Path], str]:
        """``path -> label`` for the base leaves of ``tree``; by default :meth:`base_label`.

        Methods whose labels depend on the whole tree (Freeze's last l layers, BitFit's profile
        sites) override it. ``tree`` may be a half of ``jpeft.split``: its ``None`` holes keep the
        paths (see ``_tree.all_paths``).
        """
        return self.base_label

    def partition_spec(
        self,
        path: Path,
        leaf: str,
        shape: tuple[int, ...],
        module_params: Mapping[str, Any],
        module_specs: Mapping[str, tuple[Any, ...]],
        ctx: Context,
    ) -> tuple[Any, ...] | None:
        """The sharding of one delta leaf for ``jpeft.partition_specs``: one mesh axis (or None) per axis.

        ``module_specs`` holds the specs of the module's own base leaves, one entry per axis.
        ``None`` (the default) lets jpeft decide: LoRA factors and per-output vectors follow the
        kernel; other leaves are replicated except for the kernel's leading stack axes.
        """
        return None

    def wrap_optimizer(
        self,
        tx: optax.GradientTransformation,
        only: Callable[[str, optax.GradientTransformation], optax.GradientTransformation],
    ) -> optax.GradientTransformation:
        """Puts this method's per-label optimizer rules around the user's transform ``tx``.

        ``jpeft.optimizer`` calls it once. ``tx`` is one instance over *all* trainable leaves (so a
        global-norm clip sees the whole tree), and ``only(label, t)`` restricts a transform ``t`` to
        the leaves labelled ``label`` (see :meth:`delta_label`). Rules go before ``tx`` (on the
        gradients) or after it (on the updates): LoRA+ scales B's updates, Freeze masks the lower
        layers of a stack. The default returns ``tx`` unchanged.
        """
        return tx
