"""Full fine-tuning and Freeze (train the last l layers): the selective baselines.

Both only choose which *base* leaves train (``has_deltas = False``): ``jpeft.apply`` validates and
adds nothing, ``jpeft.wrap`` returns the model's own apply and ``jpeft.merge`` is the identity. The
labels do the work: ``jpeft.optimizer`` and ``jpeft.split`` freeze the rest.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable

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
    ``(L, d, d)`` holds every layer) carry no layer index in their paths, and labels freeze whole
    leaves, so the last ``l`` slices of a stacked leaf cannot train alone. ``jpeft.apply`` raises
    when ``layer_pattern`` finds no layer; unstack the layers, or use :class:`Full`.

    Args:
      trainable_layers: l, the number of top layers that train (0 trains only ``extra_trainable``).
      layer_pattern: a regex with one group that captures the layer index; ``None`` takes the
        detected profile's.
      extra_trainable: regex over base leaf paths that train too (the task head).

    Raises:
      JpeftError: on a bad ``trainable_layers`` or ``layer_pattern``, a tree without a detected
        profile and no ``layer_pattern``, a pattern that finds no layer, or ``l`` above a stack's
        depth.

    Example:
      >>> import jax.numpy as jnp, jpeft
      >>> params = {"layer": {str(i): {"dense": {"kernel": jnp.ones((2, 2))}} for i in range(3)},
      ...           "head": {"kernel": jnp.ones((2, 1))}}
      >>> method = jpeft.Freeze(trainable_layers=1, layer_pattern=r"layer/(\d+)", extra_trainable="head/.*")
      >>> jpeft.labels(method, params)["layer"]
      {'0': {'dense': {'kernel': 'frozen'}}, '1': {'dense': {'kernel': 'frozen'}}, '2': {'dense': {'kernel': 'trainable'}}}
      >>> method.param_count(params)
      6

    References:
      Houlsby et al., "Parameter-Efficient Transfer Learning for NLP", 2019 (the top-k baseline).
    """

    trainable_layers: int
    layer_pattern: str | None = None

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

    def _layers(self, tree: PyTree) -> dict[Path, bool]:
        """Maps each base leaf path inside a layer to whether it trains."""
        paths = _base_paths(tree)
        joined = [join(p) for p in paths]
        pattern = self.layer_pattern
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
            where[path] = (s[: m.start(1)], int(m.group(1)))
        if not where:
            raise JpeftError(
                f"{self._name()}(layer_pattern={pattern!r}) finds no layer index in the {len(paths)} leaf paths, "
                f"such as {joined[0] if joined else '<none>'!r}. If the layers are stacked by nn.scan or "
                "nn.vmap (one leaf holds every layer), labels cannot train the last slices of a leaf alone: "
                "unstack the layers, or use jpeft.Full(). Otherwise fix layer_pattern."
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

    def select(self, params: PyTree) -> list[Path]:
        layers = self._layers(params)
        return sorted({p[:-1] for p, trains in layers.items() if trains})

    def base_labeller(self, tree: PyTree) -> Callable[[Path], str]:
        layers = self._layers(tree)

        def label(path: Path) -> str:
            return "trainable" if layers.get(path, False) else self.base_label(path)

        return label

    def param_count(self, params: PyTree) -> int:
        label = self.base_labeller(params)
        return sum(_tree.size(x) for p, x in _tree.leaves(params) if RESERVED not in p and label(p) != "frozen")
