"""Public functions of the NNX backend: choosing adapters and running mixed batches."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from jpeft import _nnx, _nnx_apply
from jpeft._errors import JpeftError


def _check_model(model: Any, where: str) -> None:
    if not _nnx.is_model(model):
        raise JpeftError(
            f"{where} expects a flax.nnx.Module returned by jpeft.apply; got {type(model).__name__}. For linen "
            "models, pass active=/adapter_index= to the function jpeft.wrap returns."
        )


def set_adapter(model: Any, active: str | Sequence[str]) -> None:
    """Chooses which adapter(s) an NNX model from ``jpeft.apply`` runs when called (in place).

    The NNX counterpart of ``jpeft.wrap(..., active=)``: one name, or several names whose changes
    stack. It sets a static attribute on every adapted module, like ``model.eval()`` sets
    ``deterministic``, so ``nnx.jit`` retraces for the new choice instead of reusing a stale trace.
    The first adapter applied is active; later ``jpeft.apply(..., name=)`` calls add adapters
    without activating them (as HF PEFT's ``add_adapter`` does).

    Raises:
      JpeftError: for a name the model does not hold, or no name.

    Example:
      >>> import jax, jax.numpy as jnp, jpeft
      >>> from flax import nnx
      >>> model = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
      >>> method = jpeft.LoRA(targets=".*", rank=2)
      >>> peft = jpeft.apply(method, model, key=jax.random.key(1), name="a")
      >>> peft = jpeft.apply(method, peft, key=jax.random.key(2), name="b")
      >>> jpeft.set_adapter(peft, ("a", "b"))
      >>> peft.__jpeft__["b"]["lora_a"].shape
      (4, 2)
    """
    _check_model(model, "jpeft.set_adapter")
    _nnx_apply.set_adapter(model, active)


def call(model: Any, *args: Any, adapter_index: Any = None, active: str | Sequence[str] | None = None, **kwargs: Any) -> Any:
    """Calls an NNX model from ``jpeft.apply`` with one adapter per example (a mixed batch).

    ``adapter_index`` holds one int per example: row ``i`` runs only adapter
    ``active[adapter_index[i]]`` (``-1``: the base model), as if it ran alone. ``active`` defaults
    to the adapters chosen by :func:`jpeft.set_adapter`. Call it inside your jitted function, with
    the index as an argument: it is read during this call only, never kept on the model.

    Raises:
      JpeftError: for an index that is not a 1-D int array with one entry per example, values
        outside ``-1..len(active)-1`` (when concrete), or a method without mixed batches.

    Example:
      >>> import jax, jax.numpy as jnp, jpeft
      >>> from flax import nnx
      >>> model = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
      >>> method = jpeft.LoRA(targets=".*", rank=2)
      >>> peft = jpeft.apply(method, model, key=jax.random.key(1), name="a")
      >>> y = jpeft.call(peft, jnp.ones((2, 4)), adapter_index=jnp.array([0, -1]), active=("a",))
      >>> y.shape
      (2, 3)
    """
    from jpeft._wrap import _check_adapter_index

    _check_model(model, "jpeft.call")
    names = None if active is None else _nnx_apply.held_names(model, active, "jpeft.call")
    if adapter_index is not None:
        shown = names or _nnx_apply.active_names(model)
        for _, m in _nnx_apply.methods(model):
            if not m.mixed_batches:
                raise JpeftError(
                    f"jpeft.call({type(m).__name__}): adapter_index= (a mixed batch) is not supported: "
                    f"{m.mixed_batches_why or 'the method cannot run one adapter per row'}. Run one adapter per call (jpeft.set_adapter), or merge each adapter and batch the merged models."
                )
        _check_adapter_index(adapter_index, shown, args, kwargs, "jpeft.call")
    with _nnx_apply.calling(adapter_index, names):
        return model(*args, **kwargs)
