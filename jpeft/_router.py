"""Dynamic selection: a router that picks one named adapter per example from the input.

A :class:`Router` maps pooled features of the frozen model (for example the mean of the base
model's last hidden states over the real tokens) to one of several named adapters, and
:func:`run_routed` runs a mixed stream with one adapter per row: in one call through
``adapter_index=`` where the method allows mixed batches (LoRA, adapters, (IA)³, ...), or one call
per routed adapter where it does not (prompt and prefix methods), with the rows put back in order.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jpeft import _nnx
from jpeft._errors import JpeftError
from jpeft._method import Method
from jpeft._tree import PyTree

KINDS = ("linear", "centroid")
MODES = ("auto", "mixed", "grouped")


@dataclasses.dataclass(frozen=True, eq=False)
class Router:
    """Picks one of ``names`` per example from its pooled features ``(N, d)``.

    * ``"centroid"``: the nearest class mean, ``argmin_k ||x - c_k||^2`` (``c_k``: the mean
      feature of task ``k``'s training examples); the baseline.
    * ``"linear"``: multinomial logistic regression on standardised features,
      ``argmax_k ((x - mu) / sigma) W + b`` with ``W: (d, K)``, ``b: (K,)``.

    Build one with :func:`fit_router`. ``route`` and ``scores`` are plain ``jnp`` and trace under
    ``jit``; the index is into ``names``, the order :func:`run_routed` passes as ``active=``.

    Attributes:
      names: the adapters, one per class.
      kind: ``"linear"`` or ``"centroid"``.
      arrays: ``centroids (K, d)``, or ``mean (d,)``, ``scale (d,)``, ``kernel (d, K)``, ``bias (K,)``.

    Example:
      >>> import numpy as np, jpeft
      >>> router = jpeft.fit_router(np.array([[0.0, 0], [0, 1], [5, 5], [5, 6]]), np.array([0, 0, 1, 1]),
      ...                           ("news", "tweets"), kind="centroid")
      >>> router.route(np.array([[4.0, 4.0], [0.0, -1.0]])).tolist()
      [1, 0]
    """

    names: tuple[str, ...]
    kind: str
    arrays: dict[str, Any]

    @property
    def dim(self) -> int:
        """The feature width ``d`` the router reads."""
        return int((self.arrays["centroids"] if self.kind == "centroid" else self.arrays["kernel"].T).shape[1])

    def scores(self, features: Any) -> jax.Array:
        """``(N, K)`` scores, larger is closer: ``-||x - c_k||^2`` or the logits."""
        x = self._check(features, "Router.scores")
        if self.kind == "centroid":
            c = jnp.asarray(self.arrays["centroids"])
            return -(jnp.sum(x * x, -1, keepdims=True) - 2 * x @ c.T + jnp.sum(c * c, -1)[None])
        a = {k: jnp.asarray(v) for k, v in self.arrays.items()}
        return ((x - a["mean"][None]) / a["scale"][None]) @ a["kernel"] + a["bias"][None]

    def route(self, features: Any) -> jax.Array:
        """``(N,)`` int32: the index into ``names`` of each example's adapter (its ``adapter_index``)."""
        return jnp.argmax(self.scores(features), -1).astype(jnp.int32)

    def _check(self, features: Any, where: str) -> jax.Array:
        shape = getattr(features, "shape", None)
        if shape is None or len(shape) != 2 or shape[1] != self.dim:
            raise JpeftError(
                f"{where}: features must be (N, {self.dim}), the width this router was fitted on; got "
                f"{type(features).__name__} with shape {shape}. Pool the same model output you fitted on."
            )
        return jnp.asarray(features, jnp.float32)


def fit_router(
    features: Any,
    task_ids: Any,
    names: Sequence[str],
    *,
    kind: str = "linear",
    steps: int = 300,
    learning_rate: float = 0.1,
    l2: float = 1e-3,
) -> Router:
    """Fits a :class:`Router` on pooled features labelled with the task (adapter) they belong to.

    ``"linear"`` standardises each feature (training mean and standard deviation) and trains
    ``W, b`` from zero by full-batch Adam for ``steps`` steps on the mean cross-entropy plus
    ``l2 * ||W||^2`` (deterministic: no random init). ``"centroid"`` stores each task's mean.

    Args:
      features: ``(N, d)`` floats, e.g. the frozen base model's mean-pooled last hidden states.
      task_ids: ``(N,)`` ints in ``0..len(names)-1``: the task of each row.
      names: the adapter of each task, as the params or NNX model name them.
      kind: ``"linear"`` or ``"centroid"``.
      steps, learning_rate, l2: the linear router's optimisation.

    Raises:
      JpeftError: for features that are not 2-D finite floats, ``task_ids`` not 1-D ints with one
        entry per row or outside ``0..K-1``, names that are not distinct strings, a task without
        rows (an empty class), an unknown ``kind`` or bad optimisation settings.

    Example:
      >>> import numpy as np, jpeft
      >>> x = np.array([[1.0, 0], [2, 0], [0, 1], [0, 2]])
      >>> router = jpeft.fit_router(x, np.array([0, 0, 1, 1]), ("a", "b"))
      >>> router.route(x).tolist(), router.names
      ([0, 0, 1, 1], ('a', 'b'))
    """
    where = "jpeft.fit_router"
    if kind not in KINDS:
        raise JpeftError(f"{where}(kind={kind!r}): expected one of {KINDS}.")
    names = (names,) if isinstance(names, str) else tuple(names) if isinstance(names, Sequence) else None
    if not names or not all(isinstance(n, str) and n for n in names) or len(set(names)) != len(names):
        raise JpeftError(f"{where}: names must be distinct non-empty adapter names, one per task; got {names!r}.")
    x = np.asarray(features) if hasattr(features, "shape") else None
    if x is None or x.ndim != 2 or not np.issubdtype(x.dtype, np.floating) or not np.isfinite(x).all():
        raise JpeftError(
            f"{where}: features must be a finite float array (N, d), one pooled vector per example; got "
            f"{type(features).__name__} with shape {getattr(features, 'shape', None)}."
        )
    y = np.asarray(task_ids) if hasattr(task_ids, "shape") else None
    if y is None or y.shape != (x.shape[0],) or not np.issubdtype(y.dtype, np.integer):
        raise JpeftError(
            f"{where}: task_ids must be a 1-D int array with one entry per feature row ({x.shape[0]}); got "
            f"{type(task_ids).__name__} with shape {getattr(task_ids, 'shape', None)}."
        )
    bad = sorted({int(i) for i in y if not 0 <= i < len(names)})
    if bad:
        raise JpeftError(f"{where}: task_ids holds {bad}; valid are 0..{len(names) - 1}, one per name in {names}.")
    counts = np.bincount(y, minlength=len(names))
    if (counts == 0).any():
        empty = [n for n, c in zip(names, counts, strict=True) if c == 0]
        raise JpeftError(
            f"{where}: no example of task(s) {empty} (rows per task: {dict(zip(names, counts.tolist(), strict=True))}); "
            "every adapter the router can pick needs training examples. Add them, or drop the name."
        )
    x = x.astype(np.float32)
    if kind == "centroid":
        centroids = np.stack([x[y == k].mean(0) for k in range(len(names))])
        return Router(names, kind, {"centroids": centroids})
    for field, value in (("steps", steps), ("learning_rate", learning_rate), ("l2", l2)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < (1 if field == "steps" else 0):
            raise JpeftError(
                f"{where}({field}={value!r}): expected a {'positive int' if field == 'steps' else 'number >= 0'}."
            )
    mean, scale = x.mean(0), x.std(0) + 1e-6
    kernel, bias = _train_linear(
        jnp.asarray((x - mean) / scale), jnp.asarray(y), len(names), int(steps), learning_rate, l2
    )
    arrays = {"mean": mean, "scale": scale, "kernel": np.asarray(kernel), "bias": np.asarray(bias)}
    return Router(names, kind, arrays)


def _train_linear(x: jax.Array, y: jax.Array, k: int, steps: int, lr: float, l2: float) -> tuple[jax.Array, jax.Array]:
    tx = optax.adam(lr)
    params = (jnp.zeros((x.shape[1], k)), jnp.zeros((k,)))

    def loss(p):
        logits = x @ p[0] + p[1][None]
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean() + l2 * jnp.sum(p[0] ** 2)

    def step(carry, _):
        p, opt = carry
        g = jax.grad(loss)(p)
        updates, opt = tx.update(g, opt, p)
        return (optax.apply_updates(p, updates), opt), None

    (params, _), _ = jax.jit(lambda p: jax.lax.scan(step, (p, tx.init(p)), None, length=steps))(params)
    return params


def _mixable(method: Method) -> bool:
    from jpeft.methods._prompt import virtual_part

    return bool(method.mixed_batches) and virtual_part(method) is None


def run_routed(
    router: Router,
    features: Any,
    fn: Callable[..., Any],
    *args: Any,
    method: Method | None = None,
    variables: PyTree | None = None,
    mode: str = "auto",
    **kwargs: Any,
) -> tuple[Any, jax.Array]:
    """Runs a mixed batch with the adapter the router picks for each row; returns ``(output, index)``.

    Linen: ``fn`` is the apply function, with ``method`` and ``variables`` (``{'params': peft}``);
    NNX: ``fn`` is the model from ``jpeft.apply`` (``method`` and ``variables`` stay ``None``).
    ``index = router.route(features)`` indexes ``router.names``. ``mode="mixed"`` runs one call
    with ``adapter_index=index`` and ``active=router.names``; ``"grouped"`` runs one call per
    routed adapter on its rows (every array argument with the batch's leading size is sliced) and
    puts the output rows back in order; ``"auto"`` mixes where every method allows it and groups for
    prompt and prefix methods, whose virtual tokens cannot differ per row. Grouping needs a concrete
    index (not under ``jit``) and compiles once per group size.

    Raises:
      JpeftError: before any model call, for a router naming an adapter the params or model do not
        hold, features whose rows differ from the batch's, ``mode="mixed"`` with a method that
        cannot mix rows, an unknown mode, or linen arguments missing.

    Example:
      >>> import jax, jax.numpy as jnp, numpy as np, flax.linen as nn, jpeft
      >>> model, x = nn.Dense(3), jnp.ones((4, 2))
      >>> m = jpeft.LoRA(targets=".*", rank=1)
      >>> peft = jpeft.apply(m, model.init(jax.random.key(0), x)["params"], key=jax.random.key(1), name="a")
      >>> peft = jpeft.apply(m, peft, key=jax.random.key(2), name="b")
      >>> router = jpeft.fit_router(np.array([[0.0], [1.0]]), np.array([0, 1]), ("a", "b"), kind="centroid")
      >>> y, index = jpeft.run_routed(router, np.array([[0.1], [0.9], [1.2], [-3.0]]), model.apply, x,
      ...                             method=m, variables={"params": peft})
      >>> y.shape, index.tolist()
      ((4, 3), [0, 1, 1, 0])
    """
    where = "jpeft.run_routed"
    if not isinstance(router, Router):
        raise JpeftError(
            f"{where}: router must be a jpeft.Router (from jpeft.fit_router); got {type(router).__name__}."
        )
    if mode not in MODES:
        raise JpeftError(f"{where}(mode={mode!r}): expected one of {MODES}.")
    nnx_model = _nnx.is_model(fn)
    if nnx_model:
        from jpeft import _nnx_apply

        if method is not None or variables is not None:
            raise JpeftError(
                f"{where}: an NNX model carries its method and variables; pass neither method= nor variables=."
            )
        held = _nnx_apply.adapter_names(fn)
        methods = [m for _, m in _nnx_apply.methods(fn)]
    else:
        if not isinstance(method, Method) or not isinstance(variables, dict) or "params" not in variables:
            raise JpeftError(
                f"{where}: a linen apply function needs method=<the jpeft method> and variables={{'params': peft}}; "
                f"got method={type(method).__name__}, variables={type(variables).__name__}."
            )
        from jpeft._named import adapters

        held = set(adapters(variables["params"]))
        methods = [method]
    missing = [n for n in router.names if n not in held]
    if missing:
        raise JpeftError(
            f"{where}: the router names adapter(s) {missing} that the {'model' if nnx_model else 'params'} do not hold "
            f"(it holds {sorted(held) or 'none'}). Fit the router with names of applied adapters "
            "(jpeft.apply(..., name=...)), or apply the missing ones."
        )
    first = next((a for a in (*args, *kwargs.values()) if hasattr(a, "shape") and len(a.shape) >= 1), None)
    rows = getattr(features, "shape", (None,))[0]
    if first is None or rows != first.shape[0]:
        raise JpeftError(
            f"{where}: features have {rows} rows but the batch's first array input has shape "
            f"{getattr(first, 'shape', None)}; pass one feature row per example of the batch."
        )
    mixable = all(_mixable(m) for m in methods)
    if mode == "mixed" and not mixable:
        raise JpeftError(
            f"{where}(mode='mixed'): {', '.join(sorted({type(m).__name__ for m in methods if not _mixable(m)}))} cannot "
            "run one adapter per row in one call (prompt and prefix methods, or mixed_batches=False). Use mode='grouped' "
            "(one call per routed adapter) or 'auto'."
        )
    index = router.route(features)
    if mode == "mixed" or (mode == "auto" and mixable):
        if nnx_model:
            from jpeft._nnx_api import call

            return call(fn, *args, adapter_index=index, active=router.names, **kwargs), index
        from jpeft._wrap import wrap

        return wrap(fn, method, active=router.names)(variables, *args, adapter_index=index, **kwargs), index
    return _grouped(router, np.asarray(index), fn, nnx_model, method, variables, first.shape[0], args, kwargs), index


def _grouped(router, index, fn, nnx_model, method, variables, n, args, kwargs) -> Any:
    def take(rows: np.ndarray) -> Callable[[Any], Any]:
        return lambda a: a[rows] if hasattr(a, "shape") and len(a.shape) >= 1 and a.shape[0] == n else a

    parts, order = [], []
    for k, name in enumerate(router.names):
        rows = np.flatnonzero(index == k)
        if not rows.size:
            continue
        sub_args = tuple(take(rows)(a) for a in args)
        sub_kwargs = {key: take(rows)(v) for key, v in kwargs.items()}
        if nnx_model:
            from jpeft._nnx_api import call

            parts.append(call(fn, *sub_args, active=name, **sub_kwargs))
        else:
            from jpeft._wrap import wrap

            parts.append(wrap(fn, method, active=name)(variables, *sub_args, **sub_kwargs))
        order.append(rows)
    inverse = np.argsort(np.concatenate(order), kind="stable")
    for rows, part in zip(order, parts, strict=True):
        for leaf in jax.tree.leaves(part):
            if getattr(leaf, "ndim", 0) < 1 or leaf.shape[0] != rows.size:
                raise JpeftError(
                    f"jpeft.run_routed(mode='grouped'): an output leaf of shape {getattr(leaf, 'shape', None)} has no "
                    f"leading batch axis of the group's {rows.size} rows, so the rows cannot be put back in order. "
                    "Route a function whose outputs are per example (reduce over the batch afterwards)."
                )

    def join(*leaves: Any) -> Any:
        return jnp.concatenate([jnp.asarray(leaf) for leaf in leaves])[inverse]

    return jax.tree.map(join, *parts)
