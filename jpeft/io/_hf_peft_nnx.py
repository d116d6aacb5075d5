"""HF PEFT LoRA adapters on NNX models whose module names differ from torch's (tunix's decoders).

The profile's ``hf_names`` translate module names: ``layers/0/attn/q_proj`` is torch's
``model.layers.0.self_attn.q_proj``. Einsum weights keep their axes in jpeft and are flattened in
torch's ``Linear`` layout, row-major:

* q, k, v (``w: (D, N, H)``): ``lora_A (r, D)`` is ``A: (D, r)`` transposed, and ``lora_B (N·H, r)``
  is ``B: (r, N, H)`` reshaped to ``(r, N·H)`` and transposed;
* o (``w: (N, H, D)``): ``lora_A (r, N·H)`` is ``A: (N, H, r)`` reshaped to ``(N·H, r)`` and
  transposed, and ``lora_B (D, r)`` is ``B: (r, D)`` transposed.

Plain LoRA and rsLoRA only; DoRA (whose norm axes differ per layout), ``modules_to_save``,
``rank_pattern`` and ``alpha_pattern`` are refused with an error.
"""

from __future__ import annotations

import os
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jpeft import _nnx, _tree
from jpeft._errors import JpeftError
from jpeft._tree import RESERVED, Path, join
from jpeft.methods._lora import LoRA
from jpeft.profiles import Profile
from jpeft.profiles import detect as detect_profile


def _pattern(template: str, sep: str) -> re.Pattern:
    parts = re.split(r"\{(\w+)\}", template)
    out = "".join(re.escape(p) if i % 2 == 0 else f"(?P<{p}>[^{re.escape(sep)}]+)" for i, p in enumerate(parts))
    return re.compile(out)


def _translate(name: str, pairs: tuple[tuple[str, str], ...], *, to_torch: bool) -> str | None:
    """A jpeft module path to its torch module name (``to_torch``), or the reverse; ``None`` if no pair fits."""
    for ours, theirs in pairs:
        src, dst = (ours, theirs) if to_torch else (theirs, ours)
        m = _pattern(src, "/" if to_torch else ".").fullmatch(name)
        if m is not None:
            return dst.format(**m.groupdict())
    return None


def _profile(owner: str, model: Any, profile: Profile | None) -> Profile:
    if profile is None:
        profile = detect_profile(_nnx.tree(model))
    if not isinstance(profile, Profile) or not profile.hf_names:
        raise JpeftError(
            f"{owner}: HF PEFT files on an NNX model need a profile with hf_names (the torch module names); "
            f"{getattr(profile, 'name', profile)!r} has none. Pass profile=jpeft.profiles.TUNIX or your own."
        )
    return profile


def _store(owner: str, module: Any, path: Path, name: str) -> Any:
    store = vars(module).get(RESERVED)
    if store is None or name not in store:
        raise JpeftError(f"{owner}: module {join(path)!r} has no adapter {name!r}.")
    return store[name]


def import_nnx(path: str, config: dict, tensors: dict, model: Any, profile: Profile | None, name: str) -> Any:
    """``jpeft.import_hf`` for an NNX model: ``(method, peft_model)``, see the module docstring."""
    import jpeft
    from jpeft.io._hf_peft import _KEY, CONFIG, PREFIX, _check_lora_config

    owner = "jpeft.import_hf"
    file = os.path.join(path, CONFIG)
    if config["peft_type"] != "LORA":
        raise JpeftError(
            f"{owner}: {file!r} has peft_type={config['peft_type']!r}; on NNX models import_hf reads LORA adapters "
            "only so far."
        )
    _check_lora_config(owner, path, config)
    for field in ("use_dora", "modules_to_save"):
        if config.get(field):
            raise JpeftError(
                f"{owner}: {file!r} has {field}={config[field]!r}; on NNX models import_hf reads plain LoRA and "
                "rsLoRA only so far. Re-save the adapter without it."
            )
    profile = _profile(owner, model, profile)
    modules = _nnx.modules(model)
    found: dict[Path, dict[str, tuple[str, np.ndarray]]] = {}
    for key in sorted(tensors):
        m = _KEY.fullmatch(key[len(PREFIX) :]) if key.startswith(PREFIX) else None
        kind = m["kind"].split(".")[0] if m is not None else None
        if kind not in ("lora_A", "lora_B"):
            raise JpeftError(
                f"{owner}: {file!r} has key {key!r}; on NNX models import_hf reads "
                f"'{PREFIX}<module>.lora_A.weight' and '.lora_B.weight' keys only."
            )
        ours = _translate(m["module"], profile.hf_names, to_torch=False)
        target = tuple(ours.split("/")) if ours is not None else None
        if target not in modules:
            raise JpeftError(
                f"{owner}: {key!r} names torch module {m['module']!r}, which maps to "
                f"{ours!r} under profile {profile.name!r}; the model has no such module. Pass the base model "
                "the adapter was trained on."
            )
        found.setdefault(target, {})["lora_a" if kind == "lora_A" else "lora_b"] = (key, tensors[key])
    if not found:
        raise JpeftError(f"{owner}: {file!r} holds no LoRA factors; expected '{PREFIX}<module>.lora_A.weight' keys.")
    paths = sorted(found)
    targets: str | tuple[str, ...] = "|".join(re.escape(join(p)) for p in paths)
    torch_targets = config.get("target_modules")
    if isinstance(torch_targets, list) and torch_targets and all("." not in t for t in torch_targets):
        suffixes = tuple(torch_targets)
        if sorted(p for p in modules if p and _tree.matches(suffixes, p)) == paths:
            targets = suffixes
    try:
        method = LoRA(
            targets=targets,
            rank=config.get("r", 8),
            alpha=config.get("lora_alpha", 8),
            dropout=config.get("lora_dropout", 0.0),
            use_rslora=config.get("use_rslora", False),
        )
    except JpeftError as e:
        raise JpeftError(f"{owner}: {file!r} does not make a valid LoRA: {e}") from None
    peft = jpeft.apply(method, model, key=jax.random.key(0), name=name)
    adapted = _nnx.modules(peft)
    for target in paths:
        store = _store(owner, adapted[target], target, name)
        for leaf, (key, x) in found[target].items():
            var = store[leaf]
            shape = tuple(var.shape)
            want = (shape[-1], int(np.prod(shape[:-1]))) if leaf == "lora_a" else (int(np.prod(shape[1:])), shape[0])
            if tuple(x.shape) != want:
                raise JpeftError(
                    f"{owner}: {key!r} has shape {tuple(x.shape)}, but {join(target)}'s {leaf} {shape} needs {want} "
                    "in HF PEFT's layout. The adapter was trained on another model or another r."
                )
            _nnx.write(var, jnp.asarray(np.asarray(x).T.reshape(shape), var.dtype))
    return method, peft


def export_nnx(path: str, method: Any, model: Any, profile: Profile | None, name: str, extra: dict) -> None:
    """``jpeft.export_hf`` for an NNX model, see the module docstring."""
    from jpeft.io._hf_peft import PREFIX, lora_config, write

    owner = "jpeft.export_hf"
    if type(method) is not LoRA or method.use_dora or method.extra_trainable is not None:
        raise JpeftError(
            f"{owner}: on NNX models export_hf writes plain jpeft.LoRA (rsLoRA included) only so far; got "
            f"{type(method).__name__} (use_dora={getattr(method, 'use_dora', None)}, extra_trainable="
            f"{getattr(method, 'extra_trainable', None)!r}). Save it with jpeft.save instead."
        )
    profile = _profile(owner, model, profile)
    tensors: dict[str, np.ndarray] = {}
    torch_names, adapted = [], []
    modules = _nnx.modules(model)
    for target, module in sorted(modules.items()):
        store = vars(module).get(RESERVED)
        if store is None or name not in store:
            continue
        theirs = _translate(join(target), profile.hf_names, to_torch=True)
        if theirs is None:
            raise JpeftError(
                f"{owner}: {join(target)!r} has no torch name under profile {profile.name!r} (hf_names "
                f"{[p for p, _ in profile.hf_names]})."
            )
        a, b = (np.asarray(_nnx.read(store[name][n])) for n in ("lora_a", "lora_b"))
        key = PREFIX + theirs
        tensors[key + ".lora_A.weight"] = np.ascontiguousarray(a.reshape(-1, a.shape[-1]).T)
        tensors[key + ".lora_B.weight"] = np.ascontiguousarray(b.reshape(b.shape[0], -1).T)
        torch_names.append(theirs)
        adapted.append(target)
    if not tensors:
        raise JpeftError(f"{owner}: the model has no adapter {name!r}; pass the model jpeft.apply returned.")
    # Torch module-name suffixes when they select exactly the adapted modules, else the full torch names.
    names = {t.rsplit(".", 1)[-1] for t in torch_names}
    twins = [
        p
        for p in modules
        if p and (_translate(join(p), profile.hf_names, to_torch=True) or ".").rsplit(".", 1)[-1] in names
    ]
    target_modules = sorted(names) if sorted(twins) == adapted else torch_names
    config = lora_config(method, extra, target_modules, False, False, None)
    write(path, tensors, config)
