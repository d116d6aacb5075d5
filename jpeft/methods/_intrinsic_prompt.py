"""Intrinsic prompt tuning (Qin et al. 2021): a prompt ``P x d`` computed from a ``d_I``-dim trainable vector.

Two stages. *Subspace finding* (:func:`fit_intrinsic_projection`) learns, from prompts trained on
source tasks, an up-projection ``z -> prompt`` from a ``d_I``-dimensional intrinsic vector to the
prompt space: PCA (a linear map ``mean + z B``, the baseline) or the paper's auto-encoder (a linear
down-projection and a two-layer tanh MLP up-projection, fitted to reconstruct the source prompts,
plus an optional task loss). *Intrinsic subspace tuning* (:class:`IntrinsicPromptTuning`) then
trains only ``z`` on a new task, with the up-projection stored in the tree as frozen delta leaves.

The prompt path (extended inputs, positions, the embedding overwrite, NNX, ``jpeft.generate``) is
:class:`~jpeft.methods._prompt_tuning.PromptTuning`'s: this method only changes how the ``(P, d)``
prompt is made from the delta leaves (:meth:`IntrinsicPromptTuning.prompt`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jpeft import _errors
from jpeft._errors import JpeftError
from jpeft._method import Context
from jpeft._tree import Path, PyTree, join
from jpeft.methods._prompt_tuning import PromptTuning

_LINEAR = ("up_mean", "up_basis")
_MLP = ("up_w1", "up_b1", "up_w2", "up_b2")


class IntrinsicProjection:
    """A frozen up-projection from a ``dim``-vector to a ``(P, d)`` prompt, as :func:`fit_intrinsic_projection` returns.

    ``kind="linear"``: ``prompt = mean + z @ basis`` (``basis: (dim, P d)``). ``kind="mlp"``: the
    paper's ``prompt = tanh(z W1 + b1) W2 + b2``. ``init`` is the intrinsic vector a new task starts
    from (PCA: zeros, i.e. the mean source prompt; auto-encoder: the mean code of the source prompts).
    ``down`` (auto-encoder only) holds the learned down-projection ``(W, b)``. Compared and hashed by
    identity, so a method holding it stays a valid static ``jit`` argument.

    Example:
      >>> import numpy as np, jpeft
      >>> proj = jpeft.IntrinsicProjection("linear", {"up_mean": np.zeros(6), "up_basis": np.eye(2, 6)}, shape=(2, 3))
      >>> proj.dim, proj.shape, proj.up(np.array([1.0, 2.0])).tolist()
      (2, (2, 3), [[1.0, 2.0, 0.0], [0.0, 0.0, 0.0]])
    """

    def __init__(
        self,
        kind: str,
        weights: Mapping[str, Any],
        *,
        shape: tuple[int, int],
        init: Any = None,
        down: Mapping[str, Any] | None = None,
    ) -> None:
        _errors.one_of("IntrinsicProjection", "kind", kind, ("linear", "mlp"))
        names = _LINEAR if kind == "linear" else _MLP
        if sorted(weights) != sorted(names):
            raise JpeftError(
                f"IntrinsicProjection(kind={kind!r}): weights must have exactly {names}; got {sorted(weights)}."
            )
        self.kind, self.shape = kind, (int(shape[0]), int(shape[1]))
        self.weights = {k: np.asarray(v, np.float32) for k, v in weights.items()}
        w = self.weights["up_basis" if kind == "linear" else "up_w1"]
        width = self.weights["up_mean" if kind == "linear" else "up_b2"].shape
        if w.ndim != 2 or width != (self.shape[0] * self.shape[1],):
            raise JpeftError(
                f"IntrinsicProjection(kind={kind!r}, shape={self.shape}): expected a 2-D (dim, ...) first matrix "
                f"and an output of width P*d = {self.shape[0] * self.shape[1]}; got {w.shape} and {width}."
            )
        self.dim = int(w.shape[0])
        self.init = np.zeros(self.dim, np.float32) if init is None else np.asarray(init, np.float32).reshape(self.dim)
        self.down = None if down is None else {k: np.asarray(v, np.float32) for k, v in down.items()}

    def up(self, z: Any) -> Any:
        """The ``(..., P, d)`` prompts of intrinsic vectors ``z: (..., dim)`` (NumPy or JAX)."""
        return _up(self.weights, z, self.shape)

    def __repr__(self) -> str:
        return f"IntrinsicProjection({self.kind!r}, dim={self.dim}, shape={self.shape})"


def _up(w: Mapping[str, Any], z: Any, shape: tuple[int, int]) -> Any:
    xp = jnp if isinstance(z, jax.Array) or any(isinstance(v, jax.Array) for v in w.values()) else np
    if "up_basis" in w:
        flat = _add(z @ w["up_basis"], w["up_mean"])
    else:
        flat = _add(xp.tanh(_add(z @ w["up_w1"], w["up_b1"])) @ w["up_w2"], w["up_b2"])
    return flat.reshape(flat.shape[:-1] + tuple(shape))


def _add(x: Any, bias: Any) -> Any:
    """``x + bias`` over the last axis, with the rank made explicit (jax_numpy_rank_promotion='raise')."""
    return x + bias.reshape((1,) * (x.ndim - 1) + bias.shape)


@dataclasses.dataclass(frozen=True, kw_only=True)
class IntrinsicPromptTuning(PromptTuning):
    """Intrinsic prompt tuning: only a ``dim``-vector ``z`` trains; the prompt is ``up(z)`` with ``up`` frozen.

    The delta leaves sit where :class:`PromptTuning`'s prompt does (``<embedding>/__jpeft__/<name>``):
    ``intrinsic: (dim,)``, labelled ``'trainable'``, and the up-projection (``up_mean``, ``up_basis``
    or ``up_w1``, ``up_b1``, ``up_w2``, ``up_b2``), labelled ``'frozen'`` (``jpeft.split`` leaves it in
    the frozen half, so no gradient is computed for it). Everything else is prompt tuning's.

    Args:
      dim: d_I, the size of the intrinsic vector.
      projection: an :class:`IntrinsicProjection` (from :func:`fit_intrinsic_projection`); a
        ``(dim, P d)`` matrix ``B`` (``prompt = z B`` from ``z = 0``, ``num_virtual_tokens`` required;
        kept as a linear :class:`IntrinsicProjection`); or ``None``: a
        random Gaussian ``B`` (entries ``N(0, 1/dim)``, drawn at ``jpeft.apply``), the random-subspace
        baseline. ``num_virtual_tokens`` defaults to the projection's P.
      num_virtual_tokens, profile, dtype, extra_trainable: as :class:`PromptTuning`.

    ``jpeft.save`` writes methods as JSON, so it refuses a method holding a fitted or matrix
    projection (a clear ``JpeftError``); ``projection=None`` (drawn at ``apply``) saves and restores.

    Raises:
      JpeftError: on ``dim < 1``, a projection whose ``dim`` differs, a matrix that is not 2-D, a
        projection whose width is not ``P d`` of the model (raised at ``jpeft.apply``), or
        PromptTuning's ``init`` options (the start is the projection's ``init`` vector).

    Example:
      >>> import jax, jax.numpy as jnp, numpy as np, jpeft, transformers
      >>> config = transformers.GPT2Config(vocab_size=50, n_embd=8, n_layer=1, n_head=2, n_positions=32)
      >>> with jax.numpy_rank_promotion("allow"):
      ...   model = transformers.FlaxGPT2LMHeadModel(config, seed=0)
      >>> sources = np.random.default_rng(0).normal(size=(10, 4, 8))  # 10 source prompts, P=4, d=8
      >>> proj = jpeft.fit_intrinsic_projection(sources, dim=3, kind="pca")
      >>> method = jpeft.IntrinsicPromptTuning(dim=3, projection=proj)
      >>> peft = jpeft.apply(method, model.params, key=jax.random.key(0))
      >>> sorted(jpeft.labels(method, peft)["transformer"]["wte"]["__jpeft__"]["default"].items())
      [('intrinsic', 'trainable'), ('up_basis', 'frozen'), ('up_mean', 'frozen')]
      >>> method.param_count(model.params)
      3
      >>> ids = jnp.ones((1, 3), jnp.int32)
      >>> with jax.numpy_rank_promotion("allow"):
      ...   out = jpeft.wrap(model.module.apply, method)({"params": peft}, ids, jnp.ones((1, 3)), jnp.arange(3)[None])
      >>> out.logits.shape
      (1, 3, 50)

    References:
      Qin et al., "Exploring Universal Intrinsic Task Subspace via Prompt Tuning", 2021 (arXiv:2110.07867).
    """

    dim: int = 0
    projection: Any = None
    num_virtual_tokens: int | None = None  # type: ignore[assignment]

    def __post_init__(self) -> None:
        name = self._name()
        if isinstance(self.dim, bool) or not isinstance(self.dim, int) or self.dim < 1:
            raise JpeftError(f"{name}(dim={self.dim!r}): dim (d_I, the intrinsic vector's size) must be an int >= 1.")
        if self.init != "random" or self.init_ids is not None or self.init_text is not None:
            raise JpeftError(
                f"{name}: init/init_ids/init_text are PromptTuning's prompt inits; here only the intrinsic vector "
                "trains and it starts at the projection's init vector. Leave them unset."
            )
        proj = self.projection
        if isinstance(proj, IntrinsicProjection):
            if self.num_virtual_tokens not in (None, proj.shape[0]):
                raise JpeftError(
                    f"{name}(num_virtual_tokens={self.num_virtual_tokens}): the projection makes prompts of "
                    f"shape {proj.shape} (P = {proj.shape[0]}); leave num_virtual_tokens unset or pass {proj.shape[0]}."
                )
            object.__setattr__(self, "num_virtual_tokens", proj.shape[0])
            if proj.dim != self.dim:
                raise JpeftError(
                    f"{name}(dim={self.dim}): the projection maps a {proj.dim}-vector; pass dim={proj.dim}."
                )
        elif proj is not None:
            shape = getattr(proj, "shape", None)
            if shape is None or len(shape) != 2 or shape[0] != self.dim:
                raise JpeftError(
                    f"{name}(dim={self.dim}): projection must be a jpeft.IntrinsicProjection or a (dim, P*d) = "
                    f"({self.dim}, P*d) matrix; got {type(proj).__name__} of shape {shape}."
                )
            if self.num_virtual_tokens is None:
                raise JpeftError(f"{name}: a matrix projection needs num_virtual_tokens=P (its width is P*d).")
            if shape[1] % self.num_virtual_tokens:
                raise JpeftError(
                    f"{name}(num_virtual_tokens={self.num_virtual_tokens}): the projection's width {shape[1]} is not "
                    "a multiple of P; expected (dim, P*d)."
                )
            weights = {"up_mean": np.zeros(shape[1]), "up_basis": np.asarray(proj)}
            shape = (self.num_virtual_tokens, shape[1] // self.num_virtual_tokens)
            object.__setattr__(self, "projection", IntrinsicProjection("linear", weights, shape=shape))
        elif self.num_virtual_tokens is None:
            object.__setattr__(self, "num_virtual_tokens", 20)
        super().__post_init__()

    def _projection(self, key: jax.Array, path: Path, d: int, dtype: Any) -> tuple[dict[str, jax.Array], jax.Array]:
        n, proj = self.num_virtual_tokens, self.projection
        if proj is None:
            kb, kz = jax.random.split(key)
            basis = jax.random.normal(kb, (self.dim, n * d), dtype) / np.sqrt(self.dim)
            return {"up_mean": jnp.zeros((n * d,), dtype), "up_basis": basis}, jax.random.uniform(
                kz, (self.dim,), dtype, -0.5, 0.5
            )
        weights, init, shape = proj.weights, proj.init, proj.shape
        if shape != (n, d):
            raise JpeftError(
                f"{self._name()}: the projection makes prompts of shape {shape} (P*d = {shape[0] * shape[1]}), but "
                f"{join(path)} embeds tokens in d = {d}, so prompts are ({n}, {d}) (P*d = {n * d}). Fit the "
                "projection on prompts of this model."
            )
        return {k: jnp.asarray(v, dtype) for k, v in weights.items()}, jnp.asarray(init, dtype)

    def init_module(self, key: jax.Array, path: Path, own: Mapping[str, Any], ctx: Context) -> dict[str, jax.Array]:
        table = own["embedding"]
        dtype = self.delta_dtype(table.dtype)
        weights, z = self._projection(key, path, int(table.shape[1]), dtype)
        return {"intrinsic": z, **weights}

    def param_count(self, params: PyTree) -> int:
        return self.dim

    def delta_label(self, leaf: str) -> str:
        return "trainable" if leaf == "intrinsic" else "frozen"

    def prompt(self, deltas: Any) -> jax.Array:
        """``up(z)``: the ``(P, d)`` prompt of one adapter's intrinsic vector."""
        width = (deltas["up_mean"] if "up_mean" in deltas else deltas["up_b2"]).shape[0]
        return _up(deltas, deltas["intrinsic"], (self.num_virtual_tokens, width // self.num_virtual_tokens))


def fit_intrinsic_projection(
    prompts: Any,
    dim: int,
    kind: str = "pca",
    *,
    hidden: int = 256,
    steps: int = 2000,
    lr: float = 1e-3,
    task_loss: Callable[[jax.Array], jax.Array] | None = None,
    task_weight: float = 1.0,
    seed: int = 0,
) -> IntrinsicProjection:
    """Learns the up-projection of :class:`IntrinsicPromptTuning` from source prompts ``(N, P, d)``.

    ``kind="pca"``: ``prompt = mean + z B`` with ``B`` the top ``dim`` principal directions of the
    flattened prompts (``dim <= min(N, P d)``); ``init`` is ``z = 0`` (the mean prompt). A prompt in
    the span of the mean and those directions is recovered exactly. ``kind="autoencoder"`` (Qin et
    al.): a linear down-projection ``z = x W + b`` and the two-layer up-projection
    ``tanh(z W1 + b1) W2 + b2`` (``hidden`` units), trained together with Adam (``steps``, ``lr``,
    full batch) on the mean squared reconstruction error, plus ``task_weight * task_loss(recon)`` when
    ``task_loss`` is given (the paper's task term: a function of the ``(N, P, d)`` reconstructed
    prompts, e.g. the source tasks' losses through the frozen model); ``init`` is the mean code.

    Raises:
      JpeftError: on prompts that are not ``(N, P, d)``, ``dim < 1``, a PCA ``dim`` above
        ``min(N, P d)``, or an unknown ``kind``.

    Example:
      >>> import numpy as np, jpeft
      >>> rng = np.random.default_rng(0)
      >>> basis = rng.normal(size=(2, 12))
      >>> prompts = (rng.normal(size=(8, 2)) @ basis).reshape(8, 3, 4)  # 8 prompts in a 2-D span
      >>> proj = jpeft.fit_intrinsic_projection(prompts, dim=2)
      >>> target = (np.array([0.3, -1.0]) @ basis).reshape(3, 4)
      >>> z = (target.ravel() - proj.weights["up_mean"]) @ proj.weights["up_basis"].T
      >>> bool(np.allclose(proj.up(z), target, atol=1e-4))
      True
    """
    where = f"jpeft.fit_intrinsic_projection(dim={dim!r}, kind={kind!r})"
    x = np.asarray(prompts, np.float32)
    if x.ndim != 3 or 0 in x.shape:
        raise JpeftError(f"{where}: prompts must be a non-empty (N, P, d) array of N prompts; got shape {x.shape}.")
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
        raise JpeftError(f"{where}: dim (d_I) must be an int >= 1.")
    _errors.one_of("jpeft.fit_intrinsic_projection", "kind", kind, ("pca", "autoencoder"))
    n, shape = x.shape[0], x.shape[1:]
    flat = x.reshape(n, -1)
    if kind == "pca":
        if dim > min(flat.shape):
            raise JpeftError(
                f"{where}: PCA of {n} prompts of width P*d = {flat.shape[1]} has at most {min(flat.shape)} "
                "directions; pass more prompts, a smaller dim, or kind='autoencoder'."
            )
        mean = flat.mean(0)
        _, _, vt = np.linalg.svd((flat - mean).astype(np.float64), full_matrices=False)
        return IntrinsicProjection("linear", {"up_mean": mean, "up_basis": vt[:dim]}, shape=shape)
    return _fit_autoencoder(flat, shape, dim, hidden, steps, lr, task_loss, task_weight, seed)


def _fit_autoencoder(
    flat: np.ndarray,
    shape: tuple[int, int],
    dim: int,
    hidden: int,
    steps: int,
    lr: float,
    task_loss: Callable[[jax.Array], jax.Array] | None,
    task_weight: float,
    seed: int,
) -> IntrinsicProjection:
    width = flat.shape[1]
    k = jax.random.split(jax.random.key(seed), 3)
    glorot = jax.nn.initializers.glorot_uniform()
    params = {
        "down_w": glorot(k[0], (width, dim)),
        "down_b": jnp.zeros((dim,)),
        "up_w1": glorot(k[1], (dim, hidden)),
        "up_b1": jnp.zeros((hidden,)),
        "up_w2": glorot(k[2], (hidden, width)),
        "up_b2": jnp.asarray(flat.mean(0)),
    }
    data = jnp.asarray(flat)

    def loss_fn(p: dict[str, jax.Array]) -> jax.Array:
        recon = _up(p, _add(data @ p["down_w"], p["down_b"]), tuple(shape))
        loss = jnp.mean((recon.reshape(data.shape) - data) ** 2)
        return loss if task_loss is None else loss + task_weight * task_loss(recon)

    tx = optax.adam(lr)

    @jax.jit
    def step(p: dict[str, jax.Array], opt: Any) -> tuple[dict[str, jax.Array], Any]:
        grads = jax.grad(loss_fn)(p)
        updates, opt = tx.update(grads, opt, p)
        return optax.apply_updates(p, updates), opt

    opt = tx.init(params)
    for _ in range(steps):
        params, opt = step(params, opt)
    codes = np.asarray(_add(data @ params["down_w"], params["down_b"]))
    return IntrinsicProjection(
        "mlp",
        {name: params[name] for name in _MLP},
        shape=tuple(shape),
        init=codes.mean(0),
        down={"w": params["down_w"], "b": params["down_b"]},
    )
