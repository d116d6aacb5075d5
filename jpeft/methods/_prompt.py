"""Virtual tokens: the extend-and-overwrite machinery that prompt and prefix methods share.

The methods built on it: ``_prompt_tuning.py`` (prompt tuning), ``_ptuning.py`` (P-tuning) and
``_prefix.py`` (prefix tuning).

The wrapped apply extends the token inputs by ``P`` placeholder positions at the front, the
embedding interceptor overwrites those positions with the prompt, and the outputs come back at the
caller's length. The model's own code computes masks, positions and caches; nothing is copied.

Position ids: the extended call gives the virtual tokens the positions ``p0 .. p0+P-1``, where
``p0`` is the caller's first position (0, or ``pad + 1`` for RoBERTa), and shifts the caller's
positions by ``P``. For inputs without left padding that is the model on ``[t_1..t_P] + x``.

Query positions (prefix methods): the ``P`` placeholder positions are overwritten in every key and
value, so real positions read them only as prefix keys and values; their own hidden states are
meaningless. For a single-stack model (BERT, RoBERTa, GPT-2, Llama) ``_positions.exits`` drops them at the
exit of the layer stack, so no head ever reads them (BERT's pooler reads the real ``[CLS]``). They
stay in *front*, so that the real tokens' positions are ``P .. P+T-1`` however the caller's model
computes them, exactly as HF PEFT's ``past_key_values`` shift BERT's and RoBERTa's position ids by
``past_key_values_length = P``. Prompt tuning is different: its virtual tokens are real inputs
(HF PEFT prepends them, and BERT's pooler reads the first one), so nothing is dropped inside.

Encoder-decoders (BART): the encoder inputs grow by ``P``; the decoder inputs grow by ``P`` only
for methods that put virtual tokens on the decoder too (prefix tuning; prompt tuning prepends to
the encoder only, as HF PEFT does for seq2seq). :func:`regions` sets how many positions are
overwritten inside the encoder stack, the decoder stack and the cross-attention (whose keys and
values come from the encoder's ``P + T`` positions).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import re
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from jpeft import _errors, _tree
from jpeft._errors import JpeftError
from jpeft._method import Method
from jpeft._tree import Path, PyTree, join
from jpeft.methods._positions import _REAL, _SIDE, exits, module_calls, real_positions
from jpeft.profiles import Profile

_WRITE: contextvars.ContextVar[int | None] = contextvars.ContextVar("jpeft_virtual_tokens", default=None)
"""How many leading positions the interceptors overwrite in the current call; ``None``: none."""


@contextlib.contextmanager
def writing(n: int | None) -> Iterator[None]:
    """Within the block, prompt and prefix interceptors overwrite the first ``n`` positions."""
    token = _WRITE.set(n)
    try:
        yield
    finally:
        _WRITE.reset(token)


def overwrite(y: jax.Array, rows: jax.Array, n: int, features: slice = slice(None)) -> jax.Array:
    """``y: (B, S, ..., F)`` with ``y[:, :n, ..., features]`` set to ``rows: (n, ..., f)`` in every example."""
    rows = jnp.broadcast_to(rows.astype(y.dtype), (y.shape[0],) + rows.shape)
    return y.at[:, :n, ..., features].set(rows)


def regions(
    profile: Profile, encoder: int | None, decoder: int | None, root: Any = None
) -> contextlib.AbstractContextManager[None]:
    """Within the block, an encoder-decoder's interceptors overwrite ``encoder`` positions in the encoder.

    Inside the module that ``profile.encoder_prefix`` names, and inside every cross-attention module
    (its keys and values project encoder positions), the first ``encoder`` positions are overwritten;
    inside the decoder stack, elsewhere, the first ``decoder`` (``None``: none). ``root``: see
    ``_positions.module_calls`` (``None`` on linen).
    """
    query = ("cross", profile.query.rsplit("/", 1)[-1])
    sides = [
        (profile.cross_attention, encoder, query),
        (profile.encoder_prefix, encoder, "encoder"),
        (profile.decoder_prefix, decoder, "decoder"),
    ]
    sides = [(re.compile(pattern), n, side) for pattern, n, side in sides if pattern is not None]

    def side_of(path: tuple) -> tuple[int | None, Any] | None:
        joined = join(path)
        return next(((n, side) for pattern, n, side in sides if pattern.fullmatch(joined)), None)

    def around(path: tuple, next_fun: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        n, side = side_of(path)
        token = _SIDE.set(side)
        try:
            with writing(n):
                return next_fun(*args, **kwargs)
        finally:
            _SIDE.reset(token)

    return module_calls(root, lambda path: side_of(path) is not None, around)


ROLES = {"input_tokens": "input_ids", "last_tokens": "input_ids", "positions": "position_ids"}
"""Input names of families that spell them otherwise (tunix: ``model(input_tokens, positions, cache,
attention_mask)``; its Gemma 3: ``model(last_tokens, ...)``), by the HF name of the role they play."""


def role(name: str) -> str:
    """The HF name of the role an input plays (``'positions'`` -> ``'position_ids'``); ``decoder_*`` alike."""
    side = "decoder_" if name.startswith("decoder_") else ""
    name = name.removeprefix(side)
    return side + ROLES.get(name, name)


def _extend(name: str, x: Any, n: int) -> Any:
    """One token input, extended by ``n`` leading positions (``x`` is ``(B, T)``); ``decoder_*`` alike.

    A ``(B, T, T)`` attention mask (tunix's, query by key) grows on both axes: the ``n`` virtual
    positions see each other causally and every caller's position sees them.
    """
    name = role(name).removeprefix("decoder_")
    if x is None or not n or name not in ("input_ids", "attention_mask", "token_type_ids", "position_ids"):
        return x
    x = jnp.asarray(x)
    if name == "attention_mask" and x.ndim == 3:
        b, t, s = x.shape
        if t != s:
            raise JpeftError(
                f"A prompt or prefix method got a {(b, t, s)} attention mask (query by key); it extends masks of "
                "a call on the whole sequence, (batch, T, T). Decode with a KV cache through jpeft.generate(model, "
                "input_ids, max_new_tokens)."
            )
        virtual = jnp.broadcast_to(jnp.tri(n, dtype=x.dtype), (b, n, n))  # the virtual rows: causal among themselves
        top = jnp.concatenate([virtual, jnp.zeros((b, n, s), x.dtype)], 2)
        return jnp.concatenate([top, jnp.concatenate([jnp.ones((b, t, n), x.dtype), x], 2)], 1)
    if name == "position_ids":
        first = x[:, :1]
        return jnp.concatenate([first + jnp.arange(n, dtype=x.dtype)[None, :], x + n], axis=1)
    fill = jnp.ones if name == "attention_mask" else jnp.zeros  # placeholder token 0, type 0
    return jnp.concatenate([fill((x.shape[0], n), x.dtype), x], axis=1)


@dataclasses.dataclass(frozen=True, kw_only=True)
class VirtualTokens(Method):
    """The shared base of prompt and prefix methods: ``P`` virtual positions at the front.

    Not identity at init, and not mergeable into the weights; ``jpeft.merge`` only folds a
    reparameterisation (P-tuning's encoder, prefix tuning's MLP) into plain prompts or prefixes.
    On an encoder-decoder the encoder gets the ``P`` positions, and the decoder too when
    :attr:`on_decoder` (prefix tuning); see :meth:`counts`.

    Attributes:
      num_virtual_tokens: P.
      profile: the architecture profile; ``None`` detects a shipped one from the tree.
      dtype: dtype of the trainable leaves; by default the base's, promoted to at least float32
        (a bf16 base gets float32 prompts). The forward casts them to the activation dtype.
    """

    num_virtual_tokens: int = 20
    profile: Profile | None = None
    dtype: str | None = None

    identity_at_init = False
    mergeable = False
    virtual_queries = True  # the virtual positions are inputs the heads may read (prompts), not only keys
    site_role = "overwrite"  # prompts and prefixes overwrite positions: outermost in jpeft.compose
    on_decoder = False  # an encoder-decoder's decoder gets the P positions too (prefix tuning)

    def __post_init__(self) -> None:
        super().__post_init__()
        _errors.positive_int(self._name(), "num_virtual_tokens", self.num_virtual_tokens)
        object.__setattr__(self, "dtype", _errors.float_dtype(self._name(), "dtype", self.dtype))
        if self.profile is not None and not isinstance(self.profile, Profile):
            raise JpeftError(
                f"{self._name()}(profile={self.profile!r}): profile must be a jpeft.profiles.Profile, "
                "such as jpeft.profiles.GPT2, or None to detect one."
            )

    def delta_dtype(self, base: Any) -> jnp.dtype:
        """The dtype of the trainable leaves on a base of dtype ``base``: :attr:`dtype`, or ``base``'s
        promoted to at least float32."""
        return jnp.dtype(self.dtype) if self.dtype is not None else jnp.promote_types(base, jnp.float32)

    # --- the architecture ----------------------------------------------------------------------
    def profile_of(self, params: PyTree) -> Profile:
        """The profile this method uses on ``params``; raises when there is none or it is unsupported."""
        from jpeft import profiles

        profile = self.profile
        if profile is None:
            found = profiles.matching(params)
            if len(found) != 1:
                paths = _tree.list_paths(params)[:3] if isinstance(params, Mapping) else []
                what = f"several families, {[p.name for p in found]}" if found else "no known family"
                raise JpeftError(
                    f"{self._name()}: the parameter tree matches {what} (paths look like {paths}); the "
                    "method needs the embedding and attention sites. Pass profile=jpeft.profiles.GPT2 "
                    "(or a jpeft.profiles.Profile of your own)."
                )
            profile = found[0]
        if (profile.encoder_prefix is None) != (profile.decoder_prefix is None):
            raise JpeftError(
                f"{self._name()}: profile {profile.name!r} sets only one of encoder_prefix "
                f"({profile.encoder_prefix!r}) and decoder_prefix ({profile.decoder_prefix!r}); an "
                "encoder-decoder needs both, any other model neither."
            )
        return profile

    def counts(self, profile: Profile) -> tuple[int, int]:
        """How many positions the wrapper adds in front of the encoder and the decoder inputs.

        ``(P, P)`` for a decoder-only or encoder-only model (one stack), ``(P, 0)`` for an
        encoder-decoder unless :attr:`on_decoder`.
        """
        n = self.num_virtual_tokens
        return n, n if self.on_decoder or profile.encoder_prefix is None else 0

    def sites(self, params: PyTree, field: str) -> list[Path]:
        """The module paths of ``params`` that the profile's regex ``field`` matches, sorted."""
        import re

        pattern = getattr(self.profile_of(params), field)
        return sorted(p for p in _tree.modules(params) if pattern is not None and re.fullmatch(pattern, join(p)))

    def embedding_site(self, params: PyTree) -> tuple[Path, jax.Array]:
        """The one token embedding module and its ``(V, d)`` table."""
        hits = self.sites(params, "embedding")
        if len(hits) != 1:
            raise JpeftError(
                f"{self._name()}: expected exactly one token embedding matching "
                f"{self.profile_of(params).embedding!r}; found {[join(p) for p in hits]}. Pass a profile "
                "whose embedding regex names one nn.Embed."
            )
        own = _tree.modules(params)[hits[0]]
        table = own.get("embedding")
        if table is None or getattr(table, "ndim", 0) != 2:
            raise JpeftError(
                f"{self._name()}: {join(hits[0])} has leaves {sorted(own)}; expected an nn.Embed with a "
                "2-D 'embedding' table (vocab, d)."
            )
        return hits[0], table

    # --- the call ------------------------------------------------------------------------------
    def active_name(self, active: Any) -> str:
        names = (active,) if isinstance(active, str) else tuple(active)
        if len(names) != 1:
            raise JpeftError(
                f"{self._name()}: jpeft.wrap(active={active!r}) names several adapters; prompt and prefix "
                "methods run one adapter at a time. Pass active='<name>'."
            )
        return names[0]

    def materialize(self, params: PyTree, active: str, component: str | None = None) -> PyTree:
        """The tree the interceptors read; prefix tuning's MLP computes its prefixes here.

        ``component``: the method's key inside a :func:`jpeft.compose` (its deltas sit one level
        deeper, at ``__jpeft__/<active>/<component>``); ``None`` for the bare method.
        """
        return params

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
        """Extends the token inputs by P positions, runs ``apply_fn``, slices the outputs back.

        An encoder-decoder's encoder inputs grow by ``P`` and its decoder inputs (``decoder_*``)
        by ``counts(profile)[1]``; outputs named ``encoder_*`` are cut by the encoder's count and
        the others by the decoder's (unnamed outputs by their length, see :meth:`cut`). For a
        method without :attr:`virtual_queries` (prefixes) on a single-stack model, the outputs of
        the layer stack are cut already (``_positions.exits``), before any head reads them.
        ``component``: see :meth:`materialize`.
        """
        name = self.active_name(active)
        if "adapter_index" in kwargs:
            raise JpeftError(f"{self._name()}: adapter_index (mixed batches) is not supported by prompt methods.")
        params = variables["params"]
        profile = self.profile_of(params)
        inputs = profile.inputs
        seq2seq = profile.encoder_prefix is not None
        n, m = self.counts(profile)

        def given(key: str) -> Any:  # the input playing the role ``key`` (see ROLES)
            key = next((k for k in inputs if role(k) == key), key)
            i = inputs.index(key) if key in inputs else len(args)
            return args[i] if i < len(args) else kwargs.get(key)

        lengths, roles = {}, [role(k) for k in inputs]
        for key in ("input_ids", "decoder_input_ids") if seq2seq else ("input_ids",):
            ids = given(key)
            if ids is None or getattr(ids, "ndim", 0) != 2:
                raise JpeftError(
                    f"{self._name()}: the wrapped call needs {key} of shape (batch, seq) as argument "
                    f"{roles.index(key) if key in roles else len(args)} or {key}=...; got {getattr(ids, 'shape', ids)!r}. "
                    "The model's inputs "
                    f"are {inputs}."
                )
            lengths[key] = ids.shape
        batch, length = lengths["input_ids"]
        amount = {k: m if k.startswith("decoder_") else n for k in inputs}
        mask = given("attention_mask")
        mask = mask.any(1) if getattr(mask, "ndim", 0) == 3 else mask  # query by key (tunix): the keys anyone sees
        real = {"encoder": real_positions(mask, batch, length, n)}
        real["decoder"] = (
            real_positions(given("decoder_attention_mask"), batch, lengths["decoder_input_ids"][1], m)
            if seq2seq
            else real["encoder"]
        )
        args = tuple(_extend(inputs[i], a, amount[inputs[i]]) if i < len(inputs) else a for i, a in enumerate(args))
        kwargs = {k: _extend(k, v, amount[k]) if k in inputs else v for k, v in kwargs.items()}
        variables = {**variables, "params": self.materialize(params, name, component)}
        spans = {"encoder": (n, length)}
        spans["decoder"] = (m, lengths["decoder_input_ids"][1]) if seq2seq else (n, length)
        cut = lambda path, x: self.cut(path, x, batch, spans)  # noqa: E731
        root = getattr(apply_fn, "jpeft_root", None)  # an NNX model's root (jpeft._nnx_root); None on linen
        with contextlib.ExitStack() as stack:
            stack.enter_context(writing(n))
            if seq2seq:
                stack.enter_context(regions(profile, n, m or None, root))
            elif not self.virtual_queries:
                stack.enter_context(exits(profile, cut, params, root))
            token = _REAL.set(real)
            stack.callback(_REAL.reset, token)
            out = apply_fn(variables, *args, **kwargs)
        if kwargs.get("mutable") and isinstance(out, tuple) and len(out) == 2:
            return jax.tree_util.tree_map_with_path(cut, out[0]), out[1]
        return jax.tree_util.tree_map_with_path(cut, out)

    def cut(self, path: tuple, x: Any, batch: int, spans: Mapping[str, tuple[int, int]]) -> Any:
        """One output leaf without its virtual positions on axis 1.

        ``spans`` maps ``'encoder'`` and ``'decoder'`` to ``(added, caller's length)``. A leaf of a
        named output field (``FlaxSeq2SeqLMOutput.encoder_last_hidden_state``) is cut by its side's
        count (``encoder_*`` fields: the encoder; others: the decoder); an unnamed one by whichever
        extended length its axis 1 has. Attention weights (``*attentions``) are returned whole.
        """
        shape = getattr(x, "shape", ())
        if len(shape) < 2 or shape[0] != batch:
            return x
        field = next((str(getattr(k, "name", getattr(k, "key", ""))) for k in path if not hasattr(k, "idx")), None)
        if field is not None and field.endswith("attentions"):
            return x
        if field is not None and spans["encoder"] != spans["decoder"]:
            sides = [spans["encoder" if field.startswith("encoder") else "decoder"]]
        else:
            sides = list(spans.values())
        added = {k for k, t in sides if shape[1] == k + t}
        if len(added) > 1:
            raise JpeftError(
                f"{self._name()}: an unnamed output of shape {tuple(shape)} could be encoder-length "
                f"({spans['encoder'][0]} + {spans['encoder'][1]}) or decoder-length ({spans['decoder'][0]} + "
                f"{spans['decoder'][1]}); pass return_dict=True so that outputs are cut by their names."
            )
        return x[:, added.pop() :] if added else x


def virtual_part(method: Method) -> tuple[VirtualTokens, str | None] | None:
    """The virtual-token method of ``method`` and its component key: ``(method, None)`` for a bare one,
    ``(component, key)`` inside a :func:`jpeft.compose` (MAM, UniPELT), ``None`` if there is none."""
    if isinstance(method, VirtualTokens):
        return method, None
    for key, part in zip(getattr(method, "keys", None) or (), getattr(method, "methods", ()), strict=False):
        if isinstance(part, VirtualTokens):
            return part, key
    return None


def _uniform(key: jax.Array, shape: tuple[int, ...], bound: float, dtype: Any) -> jax.Array:
    return jax.random.uniform(key, shape, dtype, -bound, bound)
