"""BitFit: train the bias terms of the base model, and nothing else.

BitFit adds no parameters (``has_deltas = False``): the chosen ``bias`` leaves are labelled
``'trainable'``, so ``jpeft.optimizer`` and ``jpeft.split`` train them in place. ``jpeft.wrap``
returns the model's own apply and ``jpeft.merge`` is the identity: the trained biases already
replace the old ones.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable

from jpeft import _errors, _tree
from jpeft._errors import JpeftError
from jpeft._method import Method
from jpeft._tree import RESERVED, Path, PyTree, join

VARIANTS = ("all", "query_ffn")


@dataclasses.dataclass(frozen=True, kw_only=True)
class BitFit(Method):
    """Bias-terms fine-tuning: only the biases train.

    ``variant="all"`` trains every leaf named ``bias`` in the modules that ``targets`` selects
    (``None``: every module), that is the attention q, k, v and output biases, both FFN biases and
    the LayerNorm betas; for BERT, ``L (7 d + d_ff)`` plus the embedding LayerNorm's and the
    pooler's ``d`` each (about 0.09% of BERT-base). ``variant="query_ffn"`` trains only the query
    bias and the FFN intermediate bias, found with the detected architecture profile's ``query``
    and ``ffn_in`` patterns: ``L (d + d_ff)``. The task head trains through ``extra_trainable``
    (its bias is already a bias under ``variant="all"``).

    GPT-2 fuses q, k and v into ``c_attn``, whose bias is ``[b_q; b_k; b_v]``. Labels train whole
    leaves, so its first third cannot train alone: ``variant="query_ffn"`` raises on a profile with
    a fused projection (use ``variant="all"``, or ``targets``).

    Args:
      targets: with ``variant="all"``, a regex over '/'-joined module paths or a sequence of
        module-name suffixes whose biases train; ``None`` for all. Must be ``None`` with
        ``variant="query_ffn"``, which picks its own modules.
      variant: ``"all"`` or ``"query_ffn"``.
      extra_trainable: regex over base leaf paths that train too (e.g. ``r"classifier/.*"``).

    Raises:
      JpeftError: on a bad field, a tree without biases where asked, ``"query_ffn"`` on a tree
        without a detected profile or with a fused q/k/v projection.

    Example:
      >>> import jax, jax.numpy as jnp, flax.linen as nn, jpeft
      >>> class MLP(nn.Module):
      ...   @nn.compact
      ...   def __call__(self, x):
      ...     return nn.Dense(3, name="out")(nn.LayerNorm(name="ln")(nn.Dense(8, name="hidden")(x)))
      >>> params = MLP().init(jax.random.key(0), jnp.ones((1, 4)))["params"]
      >>> method = jpeft.BitFit()
      >>> peft = jpeft.apply(method, params, key=jax.random.key(1))
      >>> sorted(jpeft.labels(method, peft)["ln"].items()), method.param_count(params)
      ([('bias', 'trainable'), ('scale', 'frozen')], 19)

    References:
      Ben Zaken, Ravfogel and Goldberg, "BitFit: Simple Parameter-efficient Fine-tuning for
      Transformer-based Masked Language-models", ACL 2022.
    """

    targets: str | tuple[str, ...] | None = None
    variant: str = "all"

    has_deltas = False

    def __post_init__(self) -> None:
        super().__post_init__()
        name = self._name()
        _errors.one_of(name, "variant", self.variant, VARIANTS)
        if self.targets is not None:
            if self.variant == "query_ffn":
                raise JpeftError(
                    f"{name}(targets={self.targets!r}, variant='query_ffn'): the variant picks the query and "
                    "FFN intermediate modules from the architecture profile; pass targets only with "
                    "variant='all'."
                )
            object.__setattr__(self, "targets", _tree.normalize_targets(name, self.targets))

    def _module_filter(self, paths: list[Path]) -> Callable[[Path], bool]:
        """Which module paths' biases train, given every base leaf path of the tree."""
        if self.variant == "all":
            return (lambda m: True) if self.targets is None else (lambda m: _tree.matches(self.targets, m))
        from jpeft import profiles

        joined = [join(p) for p in paths]
        found = [p for p in profiles.ALL if any(re.fullmatch(p.detect, s) for s in joined)]
        if not found:
            raise JpeftError(
                f"{self._name()}(variant='query_ffn'): no architecture profile matches this tree (paths look "
                f"like {joined[0] if joined else '<none>'!r}), so the query and FFN intermediate modules are "
                "unknown. Use BitFit(targets=r'.*/(query|intermediate)') with your model's module names."
            )
        for p in found:
            if p.qkv_fused is not None and any(re.fullmatch(p.qkv_fused, join(q[:-1])) for q in paths):
                raise JpeftError(
                    f"{self._name()}(variant='query_ffn'): {p.name} fuses q, k and v into one projection "
                    f"({p.qkv_fused!r}), whose bias is [b_q; b_k; b_v]; labels train whole leaves, so the "
                    "query third cannot train alone. Use variant='all', or targets= for the modules you want."
                )
        pattern = "|".join(f"(?:{getattr(p, site)})" for p in found for site in ("query", "ffn_in"))
        return lambda m: re.fullmatch(pattern, join(m)) is not None

    def _biases(self, tree: PyTree) -> set[Path]:
        paths = [p for p in _tree.all_paths(tree) if RESERVED not in p]
        keep = self._module_filter(paths)
        return {p for p in paths if p[-1] == "bias" and keep(p[:-1])}

    def select(self, params: PyTree) -> list[Path]:
        biases = self._biases(params)
        if not biases:
            n = len(_tree.modules(params))
            what = "" if self.targets is None else f" in the modules that targets={self.targets!r} selects"
            raise JpeftError(
                f"{self._name()}(variant={self.variant!r}) found no 'bias' leaf{what} among {n} modules: "
                "the model has no biases there (Llama-style models have none). Use a method that adds "
                "parameters, such as jpeft.LoRA or jpeft.IA3."
            )
        return sorted({p[:-1] for p in biases})

    def base_labeller(self, tree: PyTree) -> Callable[[Path], str]:
        biases = self._biases(tree)

        def label(path: Path) -> str:
            return "trainable" if path in biases else self.base_label(path)

        return label

    def param_count(self, params: PyTree) -> int:
        label = self.base_labeller(params)
        return sum(_tree.size(x) for p, x in _tree.leaves(params) if RESERVED not in p and label(p) != "frozen")
