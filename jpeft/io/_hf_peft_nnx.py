"""HF PEFT adapters on NNX models whose module names differ from torch's (tunix's decoders).

The profile's ``hf_names`` translate module names: ``layers/0/attn/q_proj`` is torch's
``model.layers.0.self_attn.q_proj``. Einsum weights keep their axes in jpeft and are flattened in
torch's ``Linear`` layout, row-major:

* q, k, v (``w: (D, N, H)``): ``lora_A (r, D)`` is ``A: (D, r)`` transposed, and ``lora_B (N·H, r)``
  is ``B: (r, N, H)`` reshaped to ``(r, N·H)`` and transposed;
* o (``w: (N, H, D)``): ``lora_A (r, N·H)`` is ``A: (N, H, r)`` reshaped to ``(N·H, r)`` and
  transposed, and ``lora_B (D, r)`` is ``B: (r, D)`` transposed.

LoRA, rsLoRA and DoRA here: DoRA's ``lora_magnitude_vector (out,)`` is the norm per output feature
of torch's ``(out, in)`` weight, a row of it, i.e. jpeft's ``magnitude`` over the kernel's output
axes (``(N, H)`` for q, k, v; ``(D,)`` for o) flattened row-major. (IA)^3 is in
``_hf_peft_nnx_ia3.py``, prompt tuning (and the prefix refusal) in ``_hf_peft_nnx_prompt.py``.
``modules_to_save``, ``rank_pattern`` and ``alpha_pattern`` are refused with an error: jpeft.LoRA
has one rank and alpha for all targets, and the NNX import writes no base weights.
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
from jpeft.methods._lora import DoRA, LoRA, LoRAFA, LoRAPlus
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


def target(owner: str, file: str, key: str, torch_module: str, profile: Profile, modules: dict) -> Path:
    """The NNX module path of a torch module name in an HF PEFT file, or raises naming the key."""
    ours = _translate(torch_module, profile.hf_names, to_torch=False)
    path = tuple(ours.split("/")) if ours is not None else None
    if ours is None:
        raise JpeftError(
            f"{owner}: {file!r} has key {key!r}, which names torch module {torch_module!r}; profile "
            f"{profile.name!r} maps no module of the model to it (its hf_names cover {[t for _, t in profile.hf_names]}; "
            "its docstring says what it leaves out)."
        )
    if path not in modules:
        raise JpeftError(
            f"{owner}: {file!r} has key {key!r}, which names torch module {torch_module!r}; it maps to {ours!r} "
            f"under profile {profile.name!r}, and the model has no such module. Pass the base model the adapter "
            "was trained on."
        )
    return path


def spelled(names: Any, paths: list[Path], modules: Any) -> str | tuple[str, ...]:
    """jpeft targets for ``paths``: the file's module names (``q_proj``) as suffixes when they select
    exactly ``paths``, else a regex of the paths."""
    if isinstance(names, list) and names and all(isinstance(t, str) and "." not in t for t in names):
        suffixes = tuple(names)
        if sorted(p for p in modules if p and _tree.matches(suffixes, p)) == sorted(paths):
            return suffixes
    return "|".join(re.escape(join(p)) for p in sorted(paths))


def torch_targets(owner: str, paths: list[Path], modules: Any, profile: Profile) -> list[str]:
    """HF PEFT ``target_modules`` for the adapted ``paths``: the torch module names' last components
    (``o_proj``) when they select exactly those, else the full torch names."""
    torch_names = [torch_name(owner, p, profile) for p in sorted(paths)]
    names = {t.rsplit(".", 1)[-1] for t in torch_names}
    twins = [
        p
        for p in modules
        if p and (_translate(join(p), profile.hf_names, to_torch=True) or ".").rsplit(".", 1)[-1] in names
    ]
    return sorted(names) if sorted(twins) == sorted(paths) else torch_names


def torch_name(owner: str, path: Path, profile: Profile) -> str:
    """The torch module name of an NNX module path, or raises."""
    theirs = _translate(join(path), profile.hf_names, to_torch=True)
    if theirs is None:
        raise JpeftError(
            f"{owner}: {join(path)!r} has no torch name under profile {profile.name!r} (hf_names "
            f"{[p for p, _ in profile.hf_names]})."
        )
    return theirs


def adapted(model: Any, name: str) -> dict[Path, Any]:
    """``{path: delta store of adapter name}`` of the model's adapted modules, sorted."""
    out = {}
    for path, module in sorted(_nnx.modules(model).items()):
        store = vars(module).get(RESERVED)
        if store is not None and name in store:
            out[path] = store[name]
    return out


def write_leaf(owner: str, var: Any, key: str, x: np.ndarray, path: Path, leaf: str, want: tuple) -> None:
    """Writes HF PEFT tensor ``x`` (of torch shape ``want``) into the delta Variable ``var``, reshaped."""
    if tuple(x.shape) != want:
        raise JpeftError(
            f"{owner}: {key!r} has shape {tuple(x.shape)}, but {join(path)}'s {leaf} {tuple(var.shape)} needs {want} "
            "in HF PEFT's layout. The adapter was trained on another model or with other options (r)."
        )
    x = np.asarray(x) if leaf in _FLAT else np.asarray(x).T
    _nnx.write(var, jnp.asarray(x.reshape(var.shape), var.dtype))


_FLAT = ("magnitude", "ia3_out", "ia3_in", "prompt")
"""Leaves that HF PEFT stores as the same numbers, only reshaped (no transpose)."""


def import_nnx(path: str, config: dict, tensors: dict, model: Any, profile: Profile | None, name: str) -> Any:
    """``jpeft.import_hf`` for an NNX model: ``(method, peft_model)``, see the module docstring."""
    import jpeft
    from jpeft.io._hf_peft import _KEY, CONFIG, PREFIX, _check_lora_config

    owner = "jpeft.import_hf"
    file = os.path.join(path, CONFIG)
    kind = config["peft_type"]
    if kind == "IA3":
        from jpeft.io._hf_peft_nnx_ia3 import import_ia3_nnx

        return import_ia3_nnx(path, config, tensors, model, _profile(owner, model, profile), name)
    if kind != "LORA":
        from jpeft.io._hf_peft_nnx_prompt import import_prompt_nnx

        return import_prompt_nnx(path, config, tensors, model, profile, name)
    _check_lora_config(owner, path, config)
    if config.get("modules_to_save"):
        raise JpeftError(
            f"{owner}: {file!r} has modules_to_save={config['modules_to_save']!r}; on NNX models import_hf reads "
            "the LoRA factors only and writes no base weights. Re-save the adapter without it."
        )
    use_dora = bool(config.get("use_dora", False))
    profile = _profile(owner, model, profile)
    modules = _nnx.modules(model)
    found: dict[Path, dict[str, tuple[str, np.ndarray]]] = {}
    for key in sorted(tensors):
        m = _KEY.fullmatch(key[len(PREFIX) :]) if key.startswith(PREFIX) else None
        kind = m["kind"].split(".")[0] if m is not None else None
        if kind not in ("lora_A", "lora_B", "lora_magnitude_vector"):
            raise JpeftError(
                f"{owner}: {file!r} has key {key!r}; on NNX models import_hf reads "
                f"'{PREFIX}<module>.lora_A.weight', '.lora_B.weight' (and DoRA's '.lora_magnitude_vector') keys only."
            )
        leaf = {"lora_A": "lora_a", "lora_B": "lora_b", "lora_magnitude_vector": "magnitude"}[kind]
        found.setdefault(target(owner, file, key, m["module"], profile, modules), {})[leaf] = (key, tensors[key])
    if not found:
        raise JpeftError(f"{owner}: {file!r} holds no LoRA factors; expected '{PREFIX}<module>.lora_A.weight' keys.")
    want_leaves = {"lora_a", "lora_b"} | ({"magnitude"} if use_dora else set())
    for t, leaves in found.items():
        if set(leaves) != want_leaves:
            raise JpeftError(
                f"{owner}: {file!r} has {sorted(k for k, _ in leaves.values())} for module {join(t)!r}; with "
                f"use_dora={use_dora} every target needs exactly {sorted(want_leaves)}."
            )
    paths = sorted(found)
    try:
        method = LoRA(
            targets=spelled(config.get("target_modules"), paths, modules),
            rank=config.get("r", 8),
            alpha=config.get("lora_alpha", 8),
            dropout=config.get("lora_dropout", 0.0),
            use_rslora=config.get("use_rslora", False),
            use_dora=use_dora,
        )
    except JpeftError as e:
        raise JpeftError(f"{owner}: {file!r} does not make a valid LoRA: {e}") from None
    peft = jpeft.apply(method, model, key=jax.random.key(0), name=name)
    stores = adapted(peft, name)
    for t in paths:
        for leaf, (key, x) in found[t].items():
            shape = tuple(stores[t][leaf].shape)
            want = {
                "lora_a": (shape[-1], int(np.prod(shape[:-1]))),
                "lora_b": (int(np.prod(shape[1:])), shape[0]),
                "magnitude": (int(np.prod(shape)),),
            }[leaf]
            write_leaf(owner, stores[t][leaf], key, x, t, leaf, want)
    return method, peft


def export_nnx(path: str, method: Any, model: Any, profile: Profile | None, name: str, extra: dict) -> None:
    """``jpeft.export_hf`` for an NNX model, see the module docstring."""
    from jpeft.io._hf_peft import PREFIX, lora_config, write
    from jpeft.methods._ia3 import IA3
    from jpeft.methods._prompt import VirtualTokens

    owner = "jpeft.export_hf"
    profile = _profile(owner, model, profile)
    if isinstance(method, IA3):
        from jpeft.io._hf_peft_nnx_ia3 import export_ia3_nnx

        return export_ia3_nnx(path, method, model, profile, name, extra)
    if isinstance(method, VirtualTokens):
        from jpeft.io._hf_peft_nnx_prompt import export_prompt_nnx

        return export_prompt_nnx(path, method, model, profile, name, extra)
    if type(method) not in (LoRA, DoRA, LoRAFA, LoRAPlus) or method.extra_trainable is not None:
        raise JpeftError(
            f"{owner}: on NNX models export_hf writes jpeft.LoRA (rsLoRA, DoRA, LoRA-FA, LoRA+), IA3 and PromptTuning/"
            f"PTuning; got {type(method).__name__} (extra_trainable={getattr(method, 'extra_trainable', None)!r}, "
            "which HF PEFT would need as modules_to_save, not written on NNX). Save it with jpeft.save instead."
        )
    stores = adapted(model, name)
    if not stores:
        raise JpeftError(f"{owner}: the model has no adapter {name!r}; pass the model jpeft.apply returned.")
    tensors: dict[str, np.ndarray] = {}
    for t, store in stores.items():
        a, b = (np.asarray(_nnx.read(store[n])) for n in ("lora_a", "lora_b"))
        key = PREFIX + torch_name(owner, t, profile)
        tensors[key + ".lora_A.weight"] = np.ascontiguousarray(a.reshape(-1, a.shape[-1]).T)
        tensors[key + ".lora_B.weight"] = np.ascontiguousarray(b.reshape(b.shape[0], -1).T)
        if method.use_dora:
            tensors[key + ".lora_magnitude_vector.weight"] = np.asarray(_nnx.read(store["magnitude"])).reshape(-1)
    targets = torch_targets(owner, list(stores), _nnx.modules(model), profile)
    write(path, tensors, lora_config(method, extra, targets, False, method.use_dora, None))
