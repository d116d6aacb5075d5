"""The architecture profile record, its error type, and :func:`check`.

Paths here are '/'-joined. A *leaf path* names an array, such as
``'transformer/h/0/attn/c_attn/kernel'``; a *module path* names a Flax module scope, that is, any
proper prefix of a leaf path, such as ``'transformer/h/0/attn/c_attn'`` or ``'transformer/h'``.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from collections.abc import Mapping
from typing import Any

from jpeft import _tree
from jpeft._errors import JpeftError

PyTree = Any

REQUIRED = ("detect", "embedding", "query", "key", "value", "attn_out", "ffn_in", "ffn_out", "layer_pattern")
"""The regex fields every profile sets."""

OPTIONAL = ("qkv_fused", "encoder_prefix", "decoder_prefix", "cross_attention")
"""The regex fields that are ``None`` for families without that site."""

SITES = tuple(f for f in REQUIRED + OPTIONAL if f not in ("detect", "layer_pattern"))
"""The fields that hold a module-path regex (or ``None``), matched with ``re.fullmatch``."""


class ProfileError(JpeftError):
    """Raised when a profile is malformed, matches no family, or points at no module.

    Example:
        >>> from jpeft import profiles
        >>> try:
        ...   profiles.detect({"dense": {"kernel": 0}})
        ... except profiles.ProfileError as e:
        ...   print(str(e).splitlines()[0])
        jpeft.profiles.detect: no known architecture matches the 1 parameter paths, such as 'dense/kernel'.
    """


@dataclasses.dataclass(frozen=True, kw_only=True)
class TiedHead:
    r"""An output head that reads an embedding leaf directly (tied word embeddings).

    Such a head never calls the embedding module, so ``jpeft.wrap`` adapts only the input lookup
    (HF PEFT's semantics), while folding a delta into the embedding leaf would change the head too;
    ``jpeft.merge`` therefore refuses to fold into a tied embedding.

    Attributes:
      embedding: a regex over *leaf* paths, ``re.fullmatch``-ed, with a group named ``root`` that
        captures the prefix of the head model's node (``''`` at the top of the tree).
      head: the head's own kernel, a leaf path relative to ``root``; a tree that holds it is untied.
      keys: the exact keys of the head model's node when it is tied, so that another model that
        nests the same backbone under the same name is not taken for it; ``()`` checks no keys.

    Example:
        >>> from jpeft import profiles
        >>> profiles.GPT2.tied_heads[0].head
        'lm_head/kernel'
    """

    embedding: str
    head: str
    keys: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        try:
            groups = re.compile(self.embedding).groupindex if isinstance(self.embedding, str) else {}
        except re.error as e:
            raise ProfileError(
                f"TiedHead(embedding={self.embedding!r}) is not a valid regular expression ({e})."
            ) from None
        if "root" not in groups:
            raise ProfileError(
                f"TiedHead(embedding={self.embedding!r}): the regex needs a group named 'root' that captures the "
                "head model's prefix, such as r'(?P<root>(?:.*/)?)transformer/wte/embedding'."
            )
        if not isinstance(self.head, str) or not self.head:
            raise ProfileError(f"TiedHead(head={self.head!r}): head must be a non-empty leaf path relative to root.")
        if not isinstance(self.keys, tuple) or not all(isinstance(k, str) for k in self.keys):
            raise ProfileError(f"TiedHead(keys={self.keys!r}): keys must be a tuple of str.")

    def tied(self, params: PyTree) -> list[str]:
        """The leaf paths of ``params`` whose embedding this head reads, when the head is tied."""
        paths = leaf_paths(params)
        have = set(paths)
        out = []
        for path in paths:
            m = re.fullmatch(self.embedding, path)
            if m is None or m.group("root") + self.head in have:
                continue
            if self.keys:
                node = params
                for k in m.group("root").split("/")[:-1]:
                    node = node[k]
                if tuple(sorted(k for k in node if k != _tree.RESERVED)) != tuple(sorted(self.keys)):
                    continue
            out.append(path)
        return out


@dataclasses.dataclass(frozen=True, kw_only=True)
class Profile:
    r"""Where the sites of one model family sit in its Flax parameter tree.

    Every site is a regex that ``re.fullmatch``-es '/'-joined module paths. Patterns start with
    ``(.*/)?`` so they hold for the bare model (``'encoder/layer/0/...'``) and for task-head models
    that nest it (``'bert/encoder/layer/0/...'``). A profile is a plain, hashable record: it can be
    a field of a method and a static ``jit`` argument.

    Attributes:
      name: the family, such as ``'gpt2'``.
      detect: a regex over *leaf* paths; the family is detected when at least one leaf matches.
      lora_default: module-name suffixes that HF PEFT's LoRA targets by default; a module matches
        a suffix ``s`` when its path is ``s`` or ends with ``'/' + s``.
      layouts: ``(module regex, layout)`` pairs for kernels not in Flax's ``(in, out)`` layout,
        such as ``'transposed'`` for GPT-2's ``(out, in)`` ``FlaxConv1D``.
      embedding: the token embedding.
      query: the attention query projection.
      key: the attention key projection.
      value: the attention value projection.
      qkv_fused: the fused query-key-value projection, whose output is ``[q; k; v]`` in equal
        thirds, or ``None``. ``query``, ``key`` and ``value`` then name it too.
      attn_out: the attention output projection.
      ffn_in: the FFN input (intermediate) projections; Llama's gate and up projections.
      ffn_out: the FFN output projection.
      layer_pattern: a regex with one group, ``re.search``-ed on module paths, that captures the
        layer index, such as ``r'(?:^|/)h/(\d+)(?=/|$)'``.
      encoder_prefix: the module path of the encoder stack of an encoder-decoder, or ``None``; a
        module is in the encoder when one of its ancestors matches.
      decoder_prefix: the same for the decoder stack.
      cross_attention: the decoder's cross-attention modules, or ``None``.
      inputs: the names of the array arguments the family's Flax module takes, in its order.
      tied_heads: the family's output heads that read the token embedding leaf directly
        (:class:`TiedHead`); see :func:`jpeft.profiles.tied_embeddings`.
      hf_names: ``(jpeft module path, torch module name)`` pattern pairs for families whose module
        names differ from their torch twins' (tunix's), such as
        ``('layers/{i}/attn/{m}', 'model.layers.{i}.self_attn.{m}')``; each ``{field}`` stands for
        one name component. ``()`` (the ``transformers`` Flax families) means the names are the same.
        ``jpeft.import_hf`` and ``jpeft.export_hf`` translate with them.

    Example:
        >>> import dataclasses
        >>> from jpeft import profiles
        >>> print(profiles.GPT2.qkv_fused)
        (.*/)?h/\d+/attn/c_attn
        >>> mine = dataclasses.replace(profiles.LLAMA, name="mistral")
        >>> hash(mine) != hash(profiles.LLAMA)
        True
    """

    name: str
    detect: str
    lora_default: tuple[str, ...] = ()
    layouts: tuple[tuple[str, str], ...] = ()
    embedding: str
    query: str
    key: str
    value: str
    qkv_fused: str | None = None
    attn_out: str
    ffn_in: str
    ffn_out: str
    layer_pattern: str
    encoder_prefix: str | None = None
    decoder_prefix: str | None = None
    cross_attention: str | None = None
    inputs: tuple[str, ...] = ("input_ids", "attention_mask")
    tied_heads: tuple[TiedHead, ...] = ()
    hf_names: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        # Validates only: nothing compiled is stored, so the record stays hashable and comparable.
        if not isinstance(self.name, str) or not self.name:
            raise ProfileError(f"Profile(name={self.name!r}): name must be a non-empty str.")
        for field in REQUIRED + OPTIONAL:
            value = getattr(self, field)
            if value is not None or field in REQUIRED:
                self._regex(field, value)
        if re.compile(self.layer_pattern).groups != 1:
            raise ProfileError(
                f"Profile(name={self.name!r}): layer_pattern={self.layer_pattern!r} must have exactly "
                "one group, the layer index; use (?:...) for the others."
            )
        for field in ("lora_default", "inputs"):
            value = getattr(self, field)
            if not isinstance(value, tuple) or not all(isinstance(v, str) for v in value):
                raise ProfileError(
                    f"Profile(name={self.name!r}): {field} must be a tuple of str; got {value!r}. "
                    "Pass a tuple, so the profile stays hashable."
                )
        if not isinstance(self.layouts, tuple) or not all(
            isinstance(p, tuple) and len(p) == 2 and all(isinstance(s, str) for s in p) for p in self.layouts
        ):
            raise ProfileError(
                f"Profile(name={self.name!r}): layouts must be a tuple of (regex, layout) str pairs; "
                f"got {self.layouts!r}."
            )
        for i, (pattern, _) in enumerate(self.layouts):
            self._regex(f"layouts[{i}]", pattern)
        if not isinstance(self.tied_heads, tuple) or not all(isinstance(t, TiedHead) for t in self.tied_heads):
            raise ProfileError(
                f"Profile(name={self.name!r}): tied_heads must be a tuple of jpeft.profiles.TiedHead; "
                f"got {self.tied_heads!r}."
            )

    def _regex(self, field: str, value: Any) -> None:
        if not isinstance(value, str):
            raise ProfileError(f"Profile(name={self.name!r}): {field} must be a regex str; got {type(value).__name__}.")
        try:
            re.compile(value)
        except re.error as e:
            raise ProfileError(
                f"Profile(name={self.name!r}): {field}={value!r} is not a valid regular expression "
                f"({e}). Escape literal characters with re.escape()."
            ) from None


def leaf_paths(tree: PyTree) -> list[str]:
    """Returns the '/'-joined path of every leaf of a nested mapping (dict or ``FrozenDict``)."""
    return _tree.list_paths(tree) if isinstance(tree, Mapping) else []


def module_paths(tree: PyTree) -> list[str]:
    """Returns every module path of a nested mapping, sorted: each proper prefix of a leaf path."""
    out = set()
    for path in leaf_paths(tree):
        parts = path.split("/")
        out.update("/".join(parts[:i]) for i in range(1, len(parts)))
    return sorted(out)


def _nearest(pattern: str, paths: list[str], n: int = 5) -> list[str]:
    """The ``n`` module paths whose last components look most like the literal text of ``pattern``."""
    literal = pattern.replace("(.*/)?", "").replace(r"\d+", "0")
    depth = literal.count("/") + 1
    tails: dict[str, str] = {}
    for path in paths:
        tails.setdefault("/".join(path.split("/")[-depth:]), path)
    return [tails[t] for t in difflib.get_close_matches(literal, list(tails), n=n, cutoff=0)]


def check(profile: Profile, params: PyTree) -> None:
    r"""Checks that every site of ``profile`` points at a module of ``params``.

    The regex sites (``None`` ones skipped) and ``layouts`` must ``re.fullmatch`` a module path,
    ``layer_pattern`` must ``re.search`` one, and each ``lora_default`` suffix must end one.

    Args:
      profile: the profile to check.
      params: a nested mapping of arrays, such as a Flax ``params`` collection.

    Raises:
      ProfileError: naming the first field that matches nothing, its regex and the five nearest
        module paths.

    Example:
        >>> import dataclasses
        >>> from jpeft import profiles
        >>> import numpy as np
        >>> from flax.traverse_util import unflatten_dict
        >>> names = ["wte/embedding", "h/0/attn/c_attn/kernel", "h/0/attn/c_proj/kernel",
        ...          "h/0/mlp/c_fc/kernel", "h/0/mlp/c_proj/kernel"]
        >>> params = unflatten_dict({tuple(n.split("/")): np.zeros(1) for n in names})
        >>> profiles.check(profiles.GPT2, params)
        >>> broken = dataclasses.replace(profiles.GPT2, attn_out=r"(.*/)?h/\d+/attn/out_proj")
        >>> try:
        ...   profiles.check(broken, params)
        ... except profiles.ProfileError as e:
        ...   print(e)
        Profile(name='gpt2').attn_out='(.*/)?h/\\d+/attn/out_proj' matches none of the 9 module paths.
        Nearest: 'h/0/attn/c_proj', 'h/0/mlp/c_proj', 'h/0/attn', 'h/0/attn/c_attn', 'h/0/mlp'.
        Fix the regex with dataclasses.replace(profile, attn_out=...), or write a Profile of your own.
    """
    paths = module_paths(params)
    checks = [(f, getattr(profile, f), re.fullmatch) for f in SITES if getattr(profile, f) is not None]
    checks += [(f"layouts[{i}]", pattern, re.fullmatch) for i, (pattern, _) in enumerate(profile.layouts)]
    checks.append(("layer_pattern", profile.layer_pattern, re.search))
    checks += [
        (f"lora_default[{i}]", f"(.*/)?{re.escape(suffix)}", re.fullmatch)
        for i, suffix in enumerate(profile.lora_default)
    ]
    for field, pattern, match in checks:
        if not any(match(pattern, p) for p in paths):
            near = _nearest(pattern, paths)
            raise ProfileError(
                f"Profile(name={profile.name!r}).{field}={pattern!r} matches none of the {len(paths)} "
                f"module paths.\nNearest: {', '.join(repr(p) for p in near)}.\nFix the regex with "
                f"dataclasses.replace(profile, {field.split('[')[0]}=...), or write a Profile of your own."
            )
