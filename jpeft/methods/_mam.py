"""The MAM adapter of the unified view: prefix tuning on attention plus a scaled parallel FFN adapter."""

from __future__ import annotations

import dataclasses

from jpeft import _errors
from jpeft._method import Method
from jpeft.methods._compose import Compose
from jpeft.methods._parallel import ScaledParallelAdapter
from jpeft.methods._prefix import PrefixTuning
from jpeft.profiles import Profile


@dataclasses.dataclass(frozen=True, kw_only=True)
class MAM(Compose):
    """Mix-and-match adapter: ``PrefixTuning`` (l prefixes per attention) + ``ScaledParallelAdapter``.

    A named composition (see :class:`Compose`) with components ``'prefix'`` and ``'adapter'``:

    - attention: per-layer key and value prefixes of length ``l = prefix_tokens``, as plain
      parameters (``2 L l d`` trainable); ``prefix_projection=True`` trains Li and Liang's MLP
      reparameterisation instead;
    - FFN: ``h <- h + s f(x W_down + b_down) W_up + b_up`` parallel to the FFN, bottleneck
      ``r = adapter_bottleneck`` and ``s = adapter_scaling`` (``L (2 d r + r + d)`` trainable).

    He et al. report 6.7% trainable parameters on BART-large with l = 30, r = 512, s = 4.

    Args:
      prefix_tokens: l.
      adapter_bottleneck: r.
      adapter_scaling: s, or ``"learned"``.
      prefix_projection: train prefixes through an MLP (then ``jpeft.merge`` cannot fold the
        composition; keep it off for the paper's count).
      profile: the architecture profile; ``None`` detects one.
      dtype: dtype of both components' trainable leaves; by default the base's, promoted to at
        least float32.

    Example:
      >>> import jpeft
      >>> mam = jpeft.MAM(prefix_tokens=30, adapter_bottleneck=512)
      >>> mam.keys, type(mam.methods[1]).__name__, mam.methods[1].scaling
      (('prefix', 'adapter'), 'ScaledParallelAdapter', 4.0)

    References:
      He et al., "Towards a Unified View of Parameter-Efficient Transfer Learning", ICLR 2022.
    """

    prefix_tokens: int = 30
    adapter_bottleneck: int = 512
    adapter_scaling: float | str = 4.0
    prefix_projection: bool = False
    profile: Profile | None = None
    dtype: str | None = None
    methods: tuple[Method, ...] = ()
    keys: tuple[str, ...] | None = ("prefix", "adapter")

    def __post_init__(self) -> None:
        _errors.positive_int("MAM", "prefix_tokens", self.prefix_tokens)
        _errors.positive_int("MAM", "adapter_bottleneck", self.adapter_bottleneck)
        object.__setattr__(self, "dtype", _errors.float_dtype("MAM", "dtype", self.dtype))
        prefix = PrefixTuning(
            num_virtual_tokens=self.prefix_tokens,
            prefix_projection=self.prefix_projection,
            profile=self.profile,
            dtype=self.dtype,
        )
        adapter = ScaledParallelAdapter(
            bottleneck=self.adapter_bottleneck, scaling=self.adapter_scaling, profile=self.profile, dtype=self.dtype
        )
        object.__setattr__(self, "methods", (prefix, adapter))
        object.__setattr__(self, "keys", ("prefix", "adapter"))
        super().__post_init__()
