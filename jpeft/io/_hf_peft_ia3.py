"""The HF PEFT format of (IA)^3: ``base_model.model.<module>.ia3_l`` and ``peft_type: "IA3"``.

HF PEFT keeps one vector per target, ``ia3_l``, of shape ``(out, 1)`` for an output-scaled module
and ``(1, in)`` for one of ``feedforward_modules`` (input-scaled), for ``nn.Linear`` and GPT-2's
``Conv1D`` alike (its ``fan_in_fan_out`` only says how the base weight is laid out). jpeft's
``ia3_out: (out,)`` and ``ia3_in: (in,)`` are the same numbers, reshaped. Reached through
``jpeft.export_hf`` and ``jpeft.import_hf``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from jpeft import _tree
from jpeft._errors import JpeftError
from jpeft._method import Context
from jpeft._tree import RESERVED, Path, PyTree, join
from jpeft.io._hf_peft import PREFIX, _check_profile, _layout, _resolve, _targets_for_torch, adapter
from jpeft.io._hf_peft_files import CONFIG, WEIGHTS, write
from jpeft.methods._ia3 import IA3, IN, OUT, _vector_shape

LEAF = ".ia3_l"


def _torch_names(paths: list[Path], modules: list[Path]) -> list[str]:
    names = _targets_for_torch(paths, modules)
    return [names] if isinstance(names, str) else names


def export_ia3(
    path: str, method: IA3, peft_params: PyTree, profile: Any, *, name: str, extra: Mapping[str, Any]
) -> None:
    """Writes an IA3 adapter; see ``jpeft.export_hf``."""
    owner = "jpeft.export_hf"
    overrides = tuple(method.layouts) + _check_profile(owner, profile)
    if method.extra_trainable is not None:
        raise JpeftError(
            f"{owner}: IA3(extra_trainable={method.extra_trainable!r}) has base leaves that train; the IA3 export "
            "writes the ia3_l vectors only. Save the whole tree with jpeft.io.save, or use extra_trainable=None."
        )
    ctx = Context(peft_params)
    modules = _tree.modules(peft_params)
    sites = method._sites(peft_params)
    tensors: dict[str, np.ndarray] = {}
    transposed = False
    for target, side in sorted(sites.items()):
        own = modules[target]
        layout = _layout(owner, target, own, ctx, overrides)
        if layout.kind == "embed":
            raise JpeftError(
                f"{owner}: IA3 target {join(target)!r} is an embedding; HF PEFT's IA3 has Linear, Conv1D and "
                "Conv2d/3d targets only. Drop it from targets, or save with jpeft.io.save."
            )
        transposed |= layout.kind == "transposed"
        v = np.asarray(adapter(owner, peft_params, target, name)[side])
        tensors[PREFIX + ".".join(target) + LEAF] = np.ascontiguousarray(
            v.reshape(-1, 1) if side == OUT else v.reshape(1, -1)
        )
    everything = list(modules)
    targets = _torch_names(sorted(sites), everything)
    ff_paths = sorted(p for p, side in sites.items() if side == IN)
    feedforward = _torch_names(ff_paths, everything) if ff_paths else []
    config = {
        "peft_type": "IA3",
        **extra,
        # PEFT wants feedforward_modules a subset of target_modules; adding ff names selects nothing new
        "target_modules": sorted(set(targets) | set(feedforward)),
        "feedforward_modules": feedforward,
        "fan_in_fan_out": transposed,
        "init_ia3_weights": True,
        "modules_to_save": None,
    }
    write(path, tensors, config)


def _names(config: Mapping[str, Any], field: str, file: str) -> list[str] | str:
    names = config.get(field) or []
    if isinstance(names, str) or (isinstance(names, list) and all(isinstance(t, str) for t in names)):
        return names
    raise JpeftError(f"jpeft.import_hf: {field}={names!r} in {file!r} must be a regex str or a list of module names.")


def _torch_match(names: list[str] | str, torch_module: str) -> bool:
    """HF PEFT's own matching of ``target_modules``/``feedforward_modules`` against a torch module path."""
    if isinstance(names, str):
        return re.fullmatch(names, torch_module) is not None
    return any(torch_module == t or torch_module.endswith("." + t) for t in names)


def _spelled(names: list[str] | str, paths: list[Path], modules: list[Path]) -> str | tuple[str, ...]:
    """jpeft targets for ``paths``: the file's names as suffixes when they select exactly ``paths``."""
    if isinstance(names, list) and names:
        suffixes = tuple(t.replace(".", "/") for t in names)
        if sorted(p for p in modules if _tree.matches(suffixes, p)) == paths:
            return suffixes
    return "|".join(re.escape(join(p)) for p in paths)


def read_vectors(
    path: str, config: Mapping[str, Any], tensors: Mapping[str, np.ndarray], resolve: Callable[[str, str], Path]
) -> dict[Path, tuple[str, np.ndarray, str]]:
    """``{module path: (key, ia3_l, IN or OUT)}`` of an IA3 file (linen and NNX); ``resolve(key,
    torch_module)`` gives a key's module path or raises."""
    owner = "jpeft.import_hf"
    file, config_file = os.path.join(path, WEIGHTS), os.path.join(path, CONFIG)
    if config.get("modules_to_save"):
        raise JpeftError(
            f"{owner}: {config_file!r} has modules_to_save={config['modules_to_save']!r}; the IA3 import reads "
            "ia3_l vectors only. Re-save the adapter without modules_to_save."
        )
    ff_names = _names(config, "feedforward_modules", config_file)
    found: dict[Path, tuple[str, np.ndarray, str]] = {}
    for key in sorted(tensors):
        if not (key.startswith(PREFIX) and key.endswith(LEAF)):
            raise JpeftError(
                f"{owner}: {file!r} has key {key!r}, which is not an IA3 key '{PREFIX}<module>{LEAF}'. "
                "Is it an HF PEFT IA3 adapter?"
            )
        torch_module = key[len(PREFIX) : -len(LEAF)]
        found[resolve(key, torch_module)] = (key, tensors[key], IN if _torch_match(ff_names, torch_module) else OUT)
    if not found:
        raise JpeftError(f"{owner}: {file!r} holds no IA3 vectors; expected '{PREFIX}<module>{LEAF}' keys.")
    return found


def import_ia3(
    path: str, config: Mapping[str, Any], tensors: Mapping[str, np.ndarray], params: PyTree, layouts: tuple, name: str
) -> tuple[IA3, PyTree]:
    """Reads an IA3 adapter; see ``jpeft.import_hf``."""
    owner = "jpeft.import_hf"
    file, config_file = os.path.join(path, WEIGHTS), os.path.join(path, CONFIG)
    ff_names = _names(config, "feedforward_modules", config_file)
    modules = _tree.modules(params)

    def resolve(key: str, torch_module: str) -> Path:
        target = _resolve(torch_module, modules)
        if target is None:
            raise JpeftError(
                f"{owner}: {file!r} is for another model: {key!r} names module {torch_module!r}, which params "
                f"lacks (module paths look like {join(next(iter(modules)))!r}). Pass the params of the base model "
                "the adapter was trained on."
            )
        return target

    found = read_vectors(path, config, tensors, resolve)
    paths = sorted(found)
    ff_paths = sorted(p for p in paths if found[p][2] == IN)
    everything = list(modules)
    method = IA3(
        targets=_spelled(_names(config, "target_modules", config_file), paths, everything),
        feedforward=_spelled(ff_names, ff_paths, everything) if ff_paths else None,
        layouts=layouts,
    )
    want_sides = {p: found[p][2] for p in paths}
    if method._sites(params) != want_sides:
        raise JpeftError(
            f"{owner}: {config_file!r} has no feedforward_modules among its targets, but jpeft.IA3(feedforward=None) "
            f"scales the profile's FFN output projections {[join(p) for p in paths if method._sites(params)[p] == IN]} "
            "on their input. Build jpeft.IA3 yourself with an explicit feedforward=..., or re-save the adapter "
            "with those modules in feedforward_modules."
        )
    ctx = Context(params)
    out = _tree.as_dicts(params)
    for target in paths:
        key, x, side = found[target]
        own = modules[target]
        layout = _layout(owner, target, own, ctx, tuple(layouts))
        kernel = own[layout.leaf]
        (n,) = _vector_shape(layout, tuple(kernel.shape), side)
        want = (n, 1) if side == OUT else (1, n)
        if tuple(x.shape) != want:
            raise JpeftError(
                f"{owner}: {key!r} has shape {tuple(x.shape)} {x.dtype}, but {join(target + (layout.leaf,))} "
                f"{tuple(kernel.shape)} (layout {layout.spec()!r}) scaled on its {'output' if side == OUT else 'input'} "
                f"needs {want}. The adapter was trained on another model: check params and feedforward_modules."
            )
        node = _tree.get(out, target)
        store = node.get(RESERVED, {})
        if name in store:
            raise JpeftError(f"{owner}: adapter {name!r} already exists at {join(target)!r}; pass another name=...")
        dtype = jnp.promote_types(kernel.dtype, jnp.float32)
        node[RESERVED] = {**store, name: {side: jnp.asarray(x.reshape(-1), dtype)}}
    return method, out
