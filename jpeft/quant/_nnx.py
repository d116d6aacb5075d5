"""NF4 quantisation of ``flax.nnx`` models: ``jpeft.quantize`` and ``jpeft.dequantize`` on a module.

The selected kernels stay where they are (the same ``Variable`` type at the same state path); only
their value becomes an :class:`jpeft.NF4Array`. ``jpeft.QLoRA`` then computes those layers itself
(its ``base_forward``), on NNX as on linen. The input model is not changed: both functions return
a new model object that shares every other array with it.
"""

from __future__ import annotations

from typing import Any

from flax import nnx

from jpeft._tree import Path


def _variables(model: nnx.Module) -> dict[Path, nnx.Variable]:
    """The model's variables by the leaf paths of ``jpeft._nnx.tree`` (a tunix ``w`` shown as ``kernel``)."""
    from jpeft import _nnx, _nnx_linear

    out = {tuple(str(k) for k in p): v for p, v in nnx.to_flat_state(nnx.state(model, _nnx.TREE_TYPES))}
    for path, module in _nnx.modules(model).items():
        linear = _nnx_linear.record(module)
        if linear is not None and linear.weight is not None and linear.weight != "kernel":
            if path + (linear.weight,) in out:
                out[path + ("kernel",)] = out.pop(path + (linear.weight,))
    return out


def quantize_model(model: nnx.Module, hits: Any, quantize_array: Any) -> nnx.Module:
    """A copy of ``model`` whose variables at the ``hits`` paths hold ``quantize_array(value)``.

    ``hits(tree)`` returns the selected ``(path, array)`` pairs of the model's tree view (the
    selection and its checks are those of ``jpeft.quantize`` on trees).
    """
    from jpeft import _nnx, _nnx_apply

    new = _nnx_apply.copy(model)
    found = _variables(new)
    for path, x in hits(_nnx.tree(new)):
        found[path].set_value(quantize_array(x))
    return new


def dequantize_model(model: nnx.Module, dequantize_array: Any, is_quantised: Any) -> nnx.Module:
    """A copy of ``model`` whose quantised variables hold float arrays again."""
    from jpeft import _nnx_apply

    new = _nnx_apply.copy(model)
    for var in _variables(new).values():
        value = var.get_value()
        if is_quantised(value):
            var.set_value(dequantize_array(value))
    return new
