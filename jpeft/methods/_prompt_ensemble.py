"""Prompt ensembling: ``k`` prompts for one task, trained and run together in one batch.

One adapter holds the ``k`` prompts as a ``(k, P, d)`` leaf. The wrapped call replicates every
example once per prompt (member-major: rows ``m B .. (m+1) B - 1`` are member ``m``), runs the one
frozen model on the ``k B`` rows, and returns every output with a leading member axis ``(k, B, ...)``:
each row ``(m, b)`` is the model with prompt ``m`` alone on example ``b``, so the gradient of prompt
``m`` comes only from its own copies. :meth:`PromptEnsemble.vote` and
:meth:`PromptEnsemble.mean_log_probs` combine the members' answers; :meth:`PromptEnsemble.stack`
and :meth:`PromptEnsemble.unstack` convert between the ensemble and ``k`` named plain
:class:`jpeft.PromptTuning` adapters.
"""

from __future__ import annotations

import contextvars
import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jpeft import _errors, _tree
from jpeft._errors import JpeftError
from jpeft._method import Context
from jpeft._tree import RESERVED, Path, PyTree, join
from jpeft.methods._prompt import _WRITE, role
from jpeft.methods._prompt_tuning import PromptTuning

_ROWS: contextvars.ContextVar[int | None] = contextvars.ContextVar("jpeft_ensemble_rows", default=None)
"""The caller's batch size B inside a :meth:`PromptEnsemble.call` (rows per member); ``None`` outside."""

_SKIP = ("rngs", "mutable", "method")  # call arguments that are not per-example inputs


@dataclasses.dataclass(frozen=True, kw_only=True)
class PromptEnsemble(PromptTuning):
    """Prompt ensembling: ``k`` prompt-tuning prompts for one task in one batch, answers combined.

    ``prompt: (k, P, d)`` at ``<embedding>/__jpeft__/<name>/prompt``, each member initialised as
    :class:`PromptTuning` with its own key. For inputs of batch ``B`` the wrapped model runs once on
    ``k B`` rows, ``[prompt_m; E(x_b)]`` for every member ``m`` and example ``b``, and every output
    leaf with ``k B`` leading rows comes back as ``(k, B, ...)``. Train with a loss over all ``k B``
    rows (each example replicated once per prompt); predict with :meth:`vote` (majority of the
    members' arg-max, as in the paper) or :meth:`mean_log_probs`. Trainable parameters: ``k P d``.

    Works on linen (``jpeft.wrap``) and NNX models (``jpeft.apply``; call the model). Not supported:
    mixed batches (``adapter_index=``: the member axis is the ensemble's own mix), ``jpeft.generate``
    (generate with one member: :meth:`unstack`), ``jpeft.merge`` and composition.

    Args:
      k: the number of prompts (members), ``>= 1``.
      num_virtual_tokens, init, init_ids, init_text, tokenizer, profile, dtype, extra_trainable:
        as :class:`PromptTuning`, for every member (``init="text"`` gives k equal prompts).

    Raises:
      JpeftError: on ``k`` that is not a positive int, and as :class:`PromptTuning`.

    Example:
      >>> import jax, jax.numpy as jnp, jpeft, transformers
      >>> config = transformers.GPT2Config(vocab_size=50, n_embd=16, n_layer=1, n_head=2, n_positions=32)
      >>> with jax.numpy_rank_promotion("allow"):
      ...   model = transformers.FlaxGPT2LMHeadModel(config, seed=0)
      >>> method = jpeft.PromptEnsemble(k=3, num_virtual_tokens=4)
      >>> peft = jpeft.apply(method, model.params, key=jax.random.key(0))
      >>> peft["transformer"]["wte"]["__jpeft__"]["default"]["prompt"].shape
      (3, 4, 16)
      >>> ids = jnp.ones((2, 5), jnp.int32)
      >>> with jax.numpy_rank_promotion("allow"):
      ...   out = jpeft.wrap(model.module.apply, method)({"params": peft}, ids, jnp.ones((2, 5)), jnp.arange(5)[None])
      >>> out.logits.shape  # (k, B, T, V)
      (3, 2, 5, 50)
      >>> jpeft.PromptEnsemble.vote(out.logits[:, :, -1]).shape  # one answer per example
      (2,)

    References:
      Lester, Al-Rfou and Constant, "The Power of Scale for Parameter-Efficient Prompt Tuning", 2021,
      section 7 ("prompt ensembling").
    """

    k: int = 5

    mixed_batches = False
    mixed_batches_why = "the member axis is the ensemble's own mix of rows (each example runs once per prompt)"

    def __post_init__(self) -> None:
        _errors.positive_int(self._name(), "k", self.k)
        super().__post_init__()

    @classmethod
    def of(cls, prompt: PromptTuning, k: int) -> PromptEnsemble:
        """The ensemble of ``k`` prompts with the settings of ``prompt`` (a plain :class:`PromptTuning`).

        Example:
          >>> import jpeft
          >>> jpeft.PromptEnsemble.of(jpeft.PromptTuning(num_virtual_tokens=8), k=5).num_virtual_tokens
          8
        """
        if type(prompt) is not PromptTuning:
            raise JpeftError(
                f"PromptEnsemble.of: expected a jpeft.PromptTuning; got {type(prompt).__name__}. Ensembles are "
                "of plain prompts (P-tuning's encoder and prefixes are not supported)."
            )
        return cls(k=k, **{f.name: getattr(prompt, f.name) for f in dataclasses.fields(PromptTuning)})

    # --- structure -----------------------------------------------------------------------------
    def init_module(self, key: jax.Array, path: Path, own: Mapping[str, Any], ctx: Context) -> dict[str, jax.Array]:
        one = [
            super(PromptEnsemble, self).init_module(key_m, path, own, ctx)["prompt"]
            for key_m in jax.random.split(key, self.k)
        ]
        return {"prompt": jnp.stack(one)}

    def param_count(self, params: PyTree) -> int:
        return self.k * super().param_count(params)

    def prompt(self, deltas: Any) -> jax.Array:
        """The ``(k, P, d)`` prompts of one adapter's delta leaves."""
        return deltas["prompt"]

    # --- the call ------------------------------------------------------------------------------
    def call(
        self,
        apply_fn: Callable[..., Any],
        variables: PyTree,
        args: tuple,
        kwargs: dict,
        *,
        active: Any,
        component: str | None = None,
    ) -> Any:
        """Replicates every per-example input ``k`` times, runs prompt tuning's call, reshapes to ``(k, B, ...)``."""
        if component is not None:
            raise JpeftError(
                f"{self._name()} inside jpeft.compose is not supported: its member axis would replicate the other "
                "methods' rows too. Ensemble a plain prompt (jpeft.PromptEnsemble(k=..., ...)) on its own."
            )
        self.active_name(active)
        inputs = self.profile_of(variables["params"]).inputs
        key = next((k for k in inputs if role(k) == "input_ids"), "input_ids")
        i = inputs.index(key) if key in inputs else len(args)
        ids = args[i] if i < len(args) else kwargs.get(key)
        if getattr(ids, "ndim", 0) != 2:
            raise JpeftError(
                f"{self._name()}: the wrapped call needs {key} of shape (batch, seq) as argument {i} or {key}=...; "
                f"got {getattr(ids, 'shape', ids)!r}. The model's inputs are {inputs}."
            )
        batch, k = int(ids.shape[0]), self.k

        def rep(x: Any) -> Any:
            if getattr(x, "ndim", 0) >= 1 and x.shape[0] == batch:
                return jnp.tile(jnp.asarray(x), (k,) + (1,) * (x.ndim - 1))
            return x

        args = tuple(jax.tree.map(rep, a) for a in args)
        kwargs = {n: v if n in _SKIP else jax.tree.map(rep, v) for n, v in kwargs.items()}
        token = _ROWS.set(batch)
        try:
            out = super().call(apply_fn, variables, args, kwargs, active=active)
        finally:
            _ROWS.reset(token)

        def split(x: Any) -> Any:
            if getattr(x, "ndim", 0) >= 1 and x.shape[0] == k * batch:
                return x.reshape((k, batch) + x.shape[1:])
            return x

        if kwargs.get("mutable") and isinstance(out, tuple) and len(out) == 2:
            return jax.tree.map(split, out[0]), out[1]
        return jax.tree.map(split, out)

    def forward(self, module: nn.Module, next_fun: Any, args: tuple, kwargs: dict, deltas: Any) -> Any:
        y = next_fun(*args, **kwargs)
        n, rows = _WRITE.get(), _ROWS.get()
        if n is None:
            return y
        if rows is None:
            raise JpeftError(
                f"{self._name()}: the embedding ran without the ensemble's call (jpeft.generate or a caller of the "
                "embedding alone). Run the ensemble through jpeft.wrap (linen) or the adapted NNX model; to generate, "
                "take one member as a plain prompt with PromptEnsemble.unstack."
            )
        prompts = self.prompt(deltas).astype(y.dtype)  # (k, P, d) -> one per row, member-major
        return y.at[:, :n].set(jnp.repeat(prompts, rows, axis=0))

    # --- combining the members' answers --------------------------------------------------------
    @staticmethod
    def vote(logits: Any) -> jax.Array:
        """Majority vote: ``(k, B, ..., C)`` scores -> ``(B, ...)`` the class most members arg-max.

        Ties go to the smallest class id among the tied ones.

        Example:
          >>> import jax.numpy as jnp, jpeft
          >>> logits = jnp.array([[[0.0, 1.0]], [[2.0, 0.0]], [[0.0, 3.0]]])  # k=3 members, B=1, C=2
          >>> jpeft.PromptEnsemble.vote(logits).tolist()
          [1]
        """
        x = _scores("PromptEnsemble.vote", logits)
        votes = jax.nn.one_hot(jnp.argmax(x, axis=-1), x.shape[-1], dtype=jnp.int32).sum(0)
        return jnp.argmax(votes, axis=-1)

    @staticmethod
    def mean_log_probs(logits: Any) -> jax.Array:
        """``(k, B, ..., C)`` scores -> ``(B, ..., C)``: the members' mean of ``log_softmax`` over ``C``.

        Example:
          >>> import jax.numpy as jnp, jpeft
          >>> logits = jnp.array([[[0.0, 1.0]], [[2.0, 0.0]], [[0.0, 3.0]]])
          >>> jpeft.PromptEnsemble.mean_log_probs(logits).argmax(-1).tolist()
          [1]
        """
        return jax.nn.log_softmax(_scores("PromptEnsemble.mean_log_probs", logits), axis=-1).mean(0)

    # --- to and from named plain prompts -------------------------------------------------------
    def stack(self, peft_params: PyTree, names: Sequence[str], *, name: str = "default") -> PyTree:
        """Adds ensemble adapter ``name`` whose member ``m`` is the :class:`PromptTuning` adapter ``names[m]``.

        The named adapters stay (remove them with ``jpeft.remove``); the base leaves are shared.

        Example:
          >>> import jax, jpeft, transformers
          >>> config = transformers.GPT2Config(vocab_size=50, n_embd=16, n_layer=1, n_head=2, n_positions=32)
          >>> with jax.numpy_rank_promotion("allow"):
          ...   params = transformers.FlaxGPT2LMHeadModel(config, seed=0).params
          >>> one = jpeft.PromptTuning(num_virtual_tokens=4)
          >>> for i, n in enumerate(("a", "b")):
          ...   params = jpeft.apply(one, params, key=jax.random.key(i), name=n)
          >>> ens = jpeft.PromptEnsemble.of(one, k=2)
          >>> ens.stack(params, ["a", "b"], name="ens")["transformer"]["wte"]["__jpeft__"]["ens"]["prompt"].shape
          (2, 4, 16)
        """
        where = f"{self._name()}.stack"
        if isinstance(names, str) or not isinstance(names, Sequence) or len(names) != self.k:
            raise JpeftError(f"{where}: names must be a list of k = {self.k} adapter names; got {names!r}.")
        path, store = self._store(peft_params, where)
        if name in store:
            raise JpeftError(f"{where}: adapter {name!r} exists already at {join(path)}. Pass another name=.")
        want = (self.num_virtual_tokens, int(self.embedding_site(peft_params)[1].shape[1]))
        prompts = []
        for n in names:
            leaf = store.get(n, {}).get("prompt") if isinstance(store.get(n), Mapping) else None
            if leaf is None:
                raise JpeftError(
                    f"{where}: {join(path)} holds no prompt-tuning adapter {n!r}; it holds {sorted(store) or 'none'}."
                )
            if tuple(leaf.shape) != want:
                raise JpeftError(
                    f"{where}: adapter {n!r} has a prompt of shape {tuple(leaf.shape)}; expected {want} "
                    f"(num_virtual_tokens={self.num_virtual_tokens}, one plain PromptTuning prompt)."
                )
            prompts.append(leaf)
        return self._with(peft_params, path, {**store, name: {"prompt": jnp.stack(prompts)}})

    def unstack(self, peft_params: PyTree, name: str = "default", names: Sequence[str] | None = None) -> PyTree:
        """Adds ``k`` plain :class:`PromptTuning` adapters, ``names[m]`` (default ``f"{name}_{m}"``) = member ``m``.

        Example:
          >>> import jax, jpeft, transformers
          >>> config = transformers.GPT2Config(vocab_size=50, n_embd=16, n_layer=1, n_head=2, n_positions=32)
          >>> with jax.numpy_rank_promotion("allow"):
          ...   params = transformers.FlaxGPT2LMHeadModel(config, seed=0).params
          >>> ens = jpeft.PromptEnsemble(k=2, num_virtual_tokens=4)
          >>> jpeft.adapters(ens.unstack(jpeft.apply(ens, params, key=jax.random.key(0))))
          ['default', 'default_0', 'default_1']
        """
        where = f"{self._name()}.unstack"
        names = [f"{name}_{m}" for m in range(self.k)] if names is None else names
        if (
            isinstance(names, str)
            or not isinstance(names, Sequence)
            or len(set(names)) != self.k
            or len(names) != self.k
        ):
            raise JpeftError(f"{where}: names must be k = {self.k} distinct adapter names; got {names!r}.")
        path, store = self._store(peft_params, where)
        leaf = store.get(name, {}).get("prompt") if isinstance(store.get(name), Mapping) else None
        if leaf is None or tuple(leaf.shape[:1]) != (self.k,) or leaf.ndim != 3:
            raise JpeftError(
                f"{where}: {join(path)} holds no ensemble adapter {name!r} with a (k={self.k}, P, d) prompt; it holds "
                f"{ {n: tuple(v['prompt'].shape) for n, v in store.items() if 'prompt' in v} or 'none' }."
            )
        clash = sorted(set(names) & set(store))
        if clash:
            raise JpeftError(f"{where}: adapters {clash} exist already at {join(path)}. Pass other names=.")
        return self._with(peft_params, path, {**store, **{n: {"prompt": leaf[m]} for m, n in enumerate(names)}})

    def _store(self, peft_params: PyTree, where: str) -> tuple[Path, dict[str, Any]]:
        from jpeft import _nnx

        if _nnx.is_model(peft_params) or not isinstance(peft_params, Mapping):
            raise JpeftError(
                f"{where}: expected a linen parameter tree from jpeft.apply; got {type(peft_params).__name__}. On an "
                "NNX model the ensemble's prompts are one Delta, model.<embedding>.__jpeft__[name]['prompt'] of shape "
                "(k, P, d): index or stack it there."
            )
        path = self.embedding_site(peft_params)[0]
        node = _tree.get(peft_params, path)
        return path, dict(node.get(RESERVED, {}))

    @staticmethod
    def _with(peft_params: PyTree, path: Path, store: dict[str, Any]) -> PyTree:
        out = _tree.as_dicts(peft_params)
        _tree.get(out, path)[RESERVED] = store
        return out


def _scores(where: str, logits: Any) -> jax.Array:
    shape = getattr(logits, "shape", None)
    if shape is None or len(shape) < 3 or not jnp.issubdtype(logits.dtype, jnp.floating):
        raise JpeftError(
            f"{where}: expected float scores of shape (k, B, ..., C): the members, the examples, the classes; got "
            f"{type(logits).__name__} with shape {shape} and dtype {getattr(logits, 'dtype', None)}. Pass the "
            "ensemble's outputs, e.g. out.logits[:, :, -1] for the last position of a causal LM."
        )
    return jnp.asarray(logits)
