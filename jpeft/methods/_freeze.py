"""Full fine-tuning and Freeze (train the last l layers): the selective baselines.

Both only choose which *base* leaves train (``has_deltas = False``): ``jpeft.apply`` validates and
adds nothing, ``jpeft.wrap`` returns the model's own apply and ``jpeft.merge`` is the identity. The
labels do the work: ``jpeft.optimizer`` and ``jpeft.split`` freeze the rest.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from jpeft import _errors, _tree
from jpeft._errors import JpeftError
from jpeft._method import Method
from jpeft._tree import RESERVED, Path, PyTree, join


def _base_paths(tree: PyTree) -> list[Path]:
    """Every base leaf path of ``tree``, ``None`` holes included and delta leaves excluded."""
    return [p for p in _tree.all_paths(tree) if RESERVED not in p]


@dataclasses.dataclass(frozen=True, kw_only=True)
class Full(Method):
    """Full fine-tuning: every base parameter trains. The baseline of every comparison.

    Trainable parameters: all of them, ``L P_layer + embeddings + head``. Nothing to merge; each
    task keeps a full copy of the model.

    Example:
      >>> import jax, jax.numpy as jnp, jpeft
      >>> params = {"dense": {"kernel": jnp.ones((4, 3)), "bias": jnp.zeros(3)}}
      >>> jpeft.labels(jpeft.Full(), params)
      {'dense': {'kernel': 'trainable', 'bias': 'trainable'}}
      >>> jpeft.Full().param_count(params)
      15

    References:
      Devlin et al., "BERT: Pre-training of Deep Bidirectional Transformers for Language
      Understanding", 2019.
    """

    has_deltas = False

    def select(self, params: PyTree) -> list[Path]:
        mods = sorted(_tree.modules(params))
        if not mods:
            raise JpeftError(f"{self._name()}: the tree holds no parameters; pass variables['params'].")
        return mods

    def param_count(self, params: PyTree) -> int:
        return sum(_tree.size(x) for p, x in _tree.leaves(params) if RESERVED not in p)

    def base_label(self, path: Path) -> str:
        return "trainable"


@dataclasses.dataclass(frozen=True, kw_only=True)
class Freeze(Method):
    r"""Trains the last ``l`` layers fully; everything else stays frozen (top-l fine-tuning).

    The layer index of a leaf is group 1 of ``layer_pattern``, ``re.search``-ed on its '/'-joined
    path; by default the pattern of the detected architecture profile (for BERT,
    ``r'(?:^|/)encoder/layer/(\d+)(?=/|$)'``). Layers are counted per *stack*, the path before the
    index: an encoder-decoder (BART) trains the last ``l`` layers of the encoder and of the decoder.
    The task head usually trains too: pass it as ``extra_trainable`` (say ``r'classifier/.*'``).
    Trainable parameters: ``l P_layer`` per stack, plus ``extra_trainable``.

    **Stacked layers** (``nn.scan``/``nn.vmap``: one leaf such as ``'layers/q/kernel'`` of shape
    ``(L, d, d)`` holds every layer) carry no layer index in their paths: name them with
    ``scan_layers``, a regex over base *leaf* paths whose leading axis is the layer axis. Labels are
    per leaf, so such a leaf gets the label ``'freeze_stacked'`` (``'frozen'`` when ``l = 0``,
    ``'trainable'`` when ``l = L``) and :meth:`wrap_optimizer` masks it before and after the
    user's transform: ``optax.chain(mask, tx, mask)``, where ``mask`` multiplies by ``m = [0]*(L-l) + [1]*l`` along
    the leading axis. Masking the gradients keeps the optimizer state of frozen slices at zero, and
    masking the updates keeps those slices bit-identical (Adam's update of a zero gradient is not
    zero once its moments are). ``tx`` is one instance over every trainable leaf, so a clipping
    transform inside it sees the stacked leaves (their frozen slices masked to 0) together with the
    ``'trainable'`` ones. On ``jpeft.split``'s lean path a stacked leaf is in the trainable half,
    so the gradient of all its ``L`` slices is computed (and masked by the optimizer).
    Trainable parameters: ``l/L`` of each stacked leaf.

    Args:
      trainable_layers: l, the number of top layers that train (0 trains only ``extra_trainable``).
      layer_pattern: a regex with one group that captures the layer index; ``None`` takes the
        detected profile's. Not needed when ``scan_layers`` names every layer leaf.
      scan_layers: a regex over '/'-joined base leaf paths (``re.fullmatch``) of leaves stacked along
        a leading layer axis, such as ``r'layers/.*'`` for an ``nn.scan`` named ``layers``.
      extra_trainable: regex over base leaf paths that train too (the task head).

    Raises:
      JpeftError: on a bad ``trainable_layers``, ``layer_pattern`` or ``scan_layers``, a tree without
        a detected profile and no ``layer_pattern``, a pattern that finds no layer, ``scan_layers``
        leaves with no leading axis or leading axes of different lengths, a leaf that both patterns
        match, or ``l`` above a stack's depth.

    Example:
      >>> import jax.numpy as jnp, jpeft
      >>> params = {"layer": {str(i): {"dense": {"kernel": jnp.ones((2, 2))}} for i in range(3)},
      ...           "head": {"kernel": jnp.ones((2, 1))}}
      >>> method = jpeft.Freeze(trainable_layers=1, layer_pattern=r"layer/(\d+)", extra_trainable="head/.*")
      >>> jpeft.labels(method, params)["layer"]
      {'0': {'dense': {'kernel': 'frozen'}}, '1': {'dense': {'kernel': 'frozen'}}, '2': {'dense': {'kernel': 'trainable'}}}
      >>> method.param_count(params)
      6
      >>> stacked = {"layers": {"dense": {"kernel": jnp.ones((3, 2, 2))}}}  # nn.scan: 3 layers, 1 leaf
      >>> method = jpeft.Freeze(trainable_layers=1, scan_layers=r"layers/.*")
      >>> jpeft.labels(method, stacked), method.param_count(stacked)
      ({'layers': {'dense': {'kernel': 'freeze_stacked'}}}, 4)

    References:
      Houlsby et al., "Parameter-Efficient Transfer Learning for NLP", 2019 (the top-k baseline).
    """

    trainable_layers: int
    layer_pattern: str | None = None
    scan_layers: str | None = None

    has_deltas = False

    def __post_init__(self) -> None:
        super().__post_init__()
        name = self._name()
        value = self.trainable_layers
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise JpeftError(
                f"{name}(trainable_layers={value!r}): trainable_layers must be an int >= 0 (the number of "
                f"top layers that train); got {value!r}."
            )
        if self.layer_pattern is not None:
            _errors.regex(name, "layer_pattern", self.layer_pattern)
            if re.compile(self.layer_pattern).groups != 1:
                raise JpeftError(
                    f"{name}(layer_pattern={self.layer_pattern!r}): the pattern must have exactly one group, "
                    r"the layer index, e.g. r'(?:^|/)layers/(\d+)(?=/|$)'; use (?:...) for the others."
                )
        if self.scan_layers is not None:
            _errors.regex(name, "scan_layers", self.scan_layers)

    def _stacked(self, tree: PyTree) -> dict[Path, int]:
        """Maps each base leaf path that ``scan_layers`` matches to its number of layers ``L``.

        ``None`` holes (a half of ``jpeft.split``) keep their path and map to ``-1``.
        """
        if self.scan_layers is None:
            return {}
        leaves = dict(_tree.leaves(tree))
        out: dict[Path, int] = {}
        for path in _base_paths(tree):
            if not re.fullmatch(self.scan_layers, join(path)):
                continue
            leaf = leaves.get(path)
            shape = tuple(getattr(leaf, "shape", ()))
            if leaf is not None and not shape:
                raise JpeftError(
                    f"{self._name()}(scan_layers={self.scan_layers!r}): {join(path)!r} has shape {shape} and "
                    "no leading layer axis. Narrow scan_layers to the leaves of the nn.scan stack."
                )
            out[path] = shape[0] if leaf is not None else -1
        if not out:
            sample = join(_base_paths(tree)[0]) if _base_paths(tree) else "<none>"
            raise JpeftError(
                f"{self._name()}(scan_layers={self.scan_layers!r}) matches none of the leaf paths, such as "
                f"{sample!r}; it must fullmatch '/'-joined leaf paths, e.g. r'layers/.*'."
            )
        depths = {n for n in out.values() if n >= 0}
        if len(depths) > 1:
            by = {n: next(join(p) for p, m in out.items() if m == n) for n in sorted(depths)}
            raise JpeftError(
                f"{self._name()}(scan_layers={self.scan_layers!r}): the matched leaves have leading axes of "
                f"different lengths {by}, so the layer axis is ambiguous. Match the leaves of one nn.scan "
                "stack only."
            )
        if depths and self.trainable_layers > min(depths):
            raise JpeftError(
                f"{self._name()}(trainable_layers={self.trainable_layers}): the scan_layers stack has "
                f"{min(depths)} layers; pass trainable_layers <= {min(depths)}."
            )
        return out

    def _layers(self, tree: PyTree, stacked: dict[Path, int]) -> dict[Path, bool]:
        """Maps each base leaf path inside an indexed layer to whether it trains."""
        paths = _base_paths(tree)
        joined = [join(p) for p in paths]
        pattern = self.layer_pattern
        if pattern is None and stacked:
            from jpeft import profiles

            found = [p for p in profiles.ALL if any(re.fullmatch(p.detect, s) for s in joined)]
            if not found:
                return {}
            pattern = found[0].layer_pattern
        if pattern is None:
            from jpeft import profiles

            found = [p for p in profiles.ALL if any(re.fullmatch(p.detect, s) for s in joined)]
            if not found:
                raise JpeftError(
                    f"{self._name()}(trainable_layers={self.trainable_layers}): no architecture profile "
                    f"matches this tree (paths look like {joined[0] if joined else '<none>'!r}), so the layer "
                    r"index is unknown. Pass layer_pattern=r'(?:^|/)layers/(\d+)(?=/|$)' (one group, the index)."
                )
            pattern = found[0].layer_pattern
        where: dict[Path, tuple[str, int]] = {}
        for path, s in zip(paths, joined, strict=True):
            m = re.search(pattern, s)
            if m is None:
                continue
            if not m.group(1) or not m.group(1).isdigit():
                raise JpeftError(
                    f"{self._name()}(layer_pattern={pattern!r}): group 1 captured {m.group(1)!r} in {s!r}; "
                    r"it must capture the layer index, digits only, e.g. r'layers/(\d+)'."
                )
            if path in stacked:
                raise JpeftError(
                    f"{self._name()}: {s!r} matches both layer_pattern={pattern!r} (layer {m.group(1)}) and "
                    f"scan_layers={self.scan_layers!r}; a leaf is either one layer or a stack of them. "
                    "Narrow one of the two patterns."
                )
            where[path] = (s[: m.start(1)], int(m.group(1)))
        if not where and stacked:
            return {}
        if not where:
            raise JpeftError(
                f"{self._name()}(layer_pattern={pattern!r}) finds no layer index in the {len(paths)} leaf paths, "
                f"such as {joined[0] if joined else '<none>'!r}. If the layers are stacked by nn.scan or "
                "nn.vmap (one leaf holds every layer), name those leaves with scan_layers=r'layers/.*'. "
                "Otherwise fix layer_pattern."
            )
        stacks: dict[str, set[int]] = {}
        for stack, index in where.values():
            stacks.setdefault(stack, set()).add(index)
        top = {}
        for stack, indices in stacks.items():
            if self.trainable_layers > len(indices):
                raise JpeftError(
                    f"{self._name()}(trainable_layers={self.trainable_layers}): the stack {stack!r} has "
                    f"{len(indices)} layers; pass trainable_layers <= {len(indices)}."
                )
            top[stack] = set(sorted(indices)[len(indices) - self.trainable_layers :])
        return {path: index in top[stack] for path, (stack, index) in where.items()}

    def _labels(self, tree: PyTree) -> dict[Path, str]:
        """The label of every base leaf inside a layer or a stack of layers."""
        stacked = self._stacked(tree)
        out = {p: "trainable" if trains else "frozen" for p, trains in self._layers(tree, stacked).items()}
        for path, depth in stacked.items():
            top = self.trainable_layers
            out[path] = "frozen" if top == 0 else "trainable" if top == depth else "freeze_stacked"
        return out

    def select(self, params: PyTree) -> list[Path]:
        return sorted({p[:-1] for p, label in self._labels(params).items() if label != "frozen"})

    def base_labeller(self, tree: PyTree) -> Callable[[Path], str]:
        labels = self._labels(tree)

        def label(path: Path) -> str:
            own = labels.get(path, "frozen")
            return own if own != "frozen" else self.base_label(path)

        return label

    def param_count(self, params: PyTree) -> int:
        label = self.base_labeller(params)
        total = 0
        for p, x in _tree.leaves(params):
            if RESERVED in p or label(p) == "frozen":
                continue
            n = _tree.size(x)
            total += n if label(p) == "trainable" else n // x.shape[0] * self.trainable_layers
        return total

    def wrap_optimizer(self, tx: optax.GradientTransformation, only: Any) -> optax.GradientTransformation:
        mask = only("freeze_stacked", _top_slices(self.trainable_layers))
        return optax.chain(mask, tx, mask)


def _top_slices(top: int) -> optax.GradientTransformation:
    """Multiplies each leaf by ``[0]*(L-top) + [1]*top`` along its leading (layer) axis."""

    def update(updates: Any, state: Any, params: Any = None) -> tuple[Any, Any]:
        def one(u: jax.Array) -> jax.Array:
            keep = jnp.arange(u.shape[0]) >= u.shape[0] - top
            return jnp.where(keep.reshape((-1,) + (1,) * (u.ndim - 1)), u, jnp.zeros((), u.dtype))

        return jax.tree.map(one, updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)
