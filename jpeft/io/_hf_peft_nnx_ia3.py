"""HF PEFT (IA)^3 adapters on NNX models with torch module names in a profile (tunix's decoders).

HF PEFT's ``ia3_l`` is ``(out, 1)`` on an output-scaled module and ``(1, in)`` on one of
``feedforward_modules``; jpeft's ``ia3_out`` / ``ia3_in`` run over the kernel's output / input
axes, so on an einsum projection (tunix's k: ``w (D, K, H)``) ``ia3_out: (K, H)`` is ``ia3_l``'s
``K·H`` numbers, row-major, as torch's ``k_proj`` output ``(K·H,)`` is laid out. Reached through
``jpeft.import_hf`` / ``jpeft.export_hf``; the names come from ``_hf_peft_nnx``.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np

from jpeft import _nnx
from jpeft._errors import JpeftError
from jpeft._tree import join
from jpeft.io._hf_peft import PREFIX
from jpeft.io._hf_peft_files import CONFIG, WEIGHTS, write
from jpeft.io._hf_peft_ia3 import LEAF, _names, read_vectors
from jpeft.io._hf_peft_nnx import adapted, spelled, target, torch_name, torch_targets, write_leaf
from jpeft.methods._ia3 import IA3, IN, OUT
from jpeft.profiles import Profile


def import_ia3_nnx(path: str, config: dict, tensors: dict, model: Any, profile: Profile, name: str) -> tuple[IA3, Any]:
    """``jpeft.import_hf`` of an ``"IA3"`` adapter into an NNX model."""
    import jpeft

    owner = "jpeft.import_hf"
    file, config_file = os.path.join(path, WEIGHTS), os.path.join(path, CONFIG)
    ff_names = _names(config, "feedforward_modules", config_file)
    modules = _nnx.modules(model)
    found = read_vectors(path, config, tensors, lambda key, t: target(owner, file, key, t, profile, modules))
    paths = sorted(found)
    ff_paths = [p for p in paths if found[p][2] == IN]
    method = IA3(
        targets=spelled(_names(config, "target_modules", config_file), paths, modules),
        feedforward=spelled(ff_names, ff_paths, modules) if ff_paths else None,
    )
    sites = method._sites(_nnx.tree(model))
    if sites != {p: found[p][2] for p in paths}:
        raise JpeftError(
            f"{owner}: {config_file!r} scales {[join(p) for p in ff_paths]} on their input (feedforward_modules), "
            f"but jpeft.IA3(feedforward=None) scales the profile's FFN output projections "
            f"{[join(p) for p in paths if sites.get(p) == IN]}. Re-save the adapter with those modules in "
            "feedforward_modules."
        )
    peft = jpeft.apply(method, model, key=jax.random.key(0), name=name)
    stores = adapted(peft, name)
    for t in paths:
        key, x, side = found[t]
        n = int(np.prod(stores[t][side].shape))
        write_leaf(owner, stores[t][side], key, x, t, side, (n, 1) if side == OUT else (1, n))
    return method, peft


def export_ia3_nnx(path: str, method: IA3, model: Any, profile: Profile, name: str, extra: dict) -> None:
    """``jpeft.export_hf`` of a ``jpeft.IA3`` adapter of an NNX model."""
    owner = "jpeft.export_hf"
    if method.extra_trainable is not None:
        raise JpeftError(
            f"{owner}: IA3(extra_trainable={method.extra_trainable!r}) has base leaves that train; the IA3 export "
            "writes the ia3_l vectors only. Save the model with jpeft.save, or use extra_trainable=None."
        )
    stores = adapted(model, name)
    if not stores:
        raise JpeftError(f"{owner}: the model has no adapter {name!r}; pass the model jpeft.apply returned.")
    tensors, ff = {}, []
    for t, store in stores.items():
        side = IN if IN in store else OUT
        v = np.asarray(_nnx.read(store[side])).reshape(-1)
        tensors[PREFIX + torch_name(owner, t, profile) + LEAF] = v.reshape(-1, 1) if side == OUT else v.reshape(1, -1)
        ff += [t] if side == IN else []
    modules = _nnx.modules(model)
    feedforward = torch_targets(owner, ff, modules, profile) if ff else []
    config = {
        "peft_type": "IA3",
        **extra,
        # PEFT wants feedforward_modules a subset of target_modules
        "target_modules": sorted(set(torch_targets(owner, list(stores), modules, profile)) | set(feedforward)),
        "feedforward_modules": feedforward,
        "fan_in_fan_out": False,
        "init_ia3_weights": True,
        "modules_to_save": None,
    }
    write(path, tensors, config)
