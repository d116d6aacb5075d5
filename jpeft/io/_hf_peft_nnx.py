"""HF PEFT adapters on NNX models whose module names differ from torch's (tunix's decoders).

The profile's ``hf_names`` translate module names: ``layers/0/attn/q_proj`` is torch's
``model.layers.0.self_attn.q_proj``. Einsum weights keep their axes in jpeft and are flattened in
torch's ``Linear`` layout, row-major:

* q, k, v (``w: (D, N, H)``): ``lora_A (r, D)`` is ``A: (D, r)`` transposed, and ``lora_B (N·H, r)``
  is ``B: (r, N, H)`` reshaped to ``(r, N·H)`` and transposed;
* o (``w: (N, H, D)``): ``lora_A (r, N·H)`` is ``A: (N, H, r)`` reshaped to ``(N·H, r)`` and
  transposed, and ``lora_B (D, r)`` is ``B: (r, D)`` transposed.

Stacked weights (tunix Gemma 3's ``kv_einsum`` ``w: (2, K, D, H)``, ``B: (r, 2, K, H)``) hold several
torch modules; ``hf_names`` name slice ``j`` of B's first output axis as ``path[j]``
(``kv_einsum[1]`` is ``v_proj``). Export writes one torch LoRA per slice, the same ``A`` and
``B[:, j]`` (exact). Import gives every target rank ``n r`` when ``n`` slices of one weight are
adapted: slice ``k``'s A and B fill rank block ``k`` (zeros elsewhere; other targets use block 0)
and alpha becomes ``n alpha`` (rsLoRA: ``sqrt(n) alpha``), so the scale and the function are
torch's, DoRA magnitudes included. (IA)^3 files on stacked weights are refused.

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
from jpeft.methods._dora import DoRA
from jpeft.methods._lora import LoRA, LoRAFA, LoRAPlus
from jpeft.profiles import Profile
from jpeft.profiles import detect as detect_profile


def _pattern(template: str, sep: str) -> re.Pattern:
    parts = re.split(r"\{(\w+)\}", template)
    out = "".join(re.escape(p) if i % 2 == 0 else f"(?P<{p}>[^{re.escape(sep)}]+)" for i, p in enumerate(parts))
    return re.compile(out)


def _matches(name: str, pairs: tuple[tuple[str, str], ...], *, to_torch: bool) -> list[str]:
    """Every translation of ``name`` (a jpeft module path if ``to_torch``, else a torch module name)."""
    out = []
    for ours, theirs in pairs:
        src, dst = (ours, theirs) if to_torch else (theirs, ours)
        m = _pattern(src, "/" if to_torch else ".").fullmatch(name)
        if m is not None:
            out.append(dst.format(**m.groupdict()))
    return out


def _translate(name: str, pairs: tuple[tuple[str, str], ...], *, to_torch: bool) -> str | None:
    """A jpeft module path to its torch module name (``to_torch``), or the reverse; ``None`` if no pair fits."""
    found = _matches(name, pairs, to_torch=to_torch)
    return found[0] if found else None


_PART = re.compile(r"(?P<path>.*)\[(?P<part>\d+)\]")
"""``hf_names`` spell a slice of a stacked weight ``path[j]``: part ``j`` of B's first output axis
(tunix Gemma 3's ``kv_einsum[1]`` is torch's ``v_proj``)."""


def _profile(owner: str, model: Any, profile: Profile | None) -> Profile:
    if profile is None:
        profile = detect_profile(_nnx.tree(model))
    if not isinstance(profile, Profile) or not profile.hf_names:
        raise JpeftError(
            f"{owner}: HF PEFT files on an NNX model need a profile with hf_names (the torch module names); "
            f"{getattr(profile, 'name', profile)!r} has none. Pass profile=jpeft.profiles.TUNIX or your own."
        )
    return profile


def target_part(
    owner: str, file: str, key: str, torch_module: str, profile: Profile, modules: dict
) -> tuple[Path, int | None]:
    """The NNX module path of a torch module name in an HF PEFT file and the part of its stacked
    weight that it is (``None``: the whole module), or raises naming the key."""
    found = _matches(torch_module, profile.hf_names, to_torch=False)
    if not found:
        raise JpeftError(
            f"{owner}: {file!r} has key {key!r}, which names torch module {torch_module!r}; profile "
            f"{profile.name!r} maps no module of the model to it (its hf_names cover {[t for _, t in profile.hf_names]}; "
            "its docstring says what it leaves out)."
        )
    for ours in found:
        m = _PART.fullmatch(ours)
        path = tuple((m["path"] if m else ours).split("/"))
        if path in modules:
            return path, (int(m["part"]) if m else None)
    raise JpeftError(
        f"{owner}: {file!r} has key {key!r}, which names torch module {torch_module!r}; it maps to "
        f"{' or '.join(repr(f) for f in found)} under profile {profile.name!r}, and the model has no such module. "
        "Pass the base model the adapter was trained on."
    )


def target(owner: str, file: str, key: str, torch_module: str, profile: Profile, modules: dict) -> Path:
    """The NNX module path of a torch module name in an HF PEFT file, or raises naming the key."""
    path, part = target_part(owner, file, key, torch_module, profile, modules)
    if part is not None:
        raise JpeftError(
            f"{owner}: {file!r} has key {key!r}, which names torch module {torch_module!r}: part {part} of the "
            f"stacked weight of {join(path)!r} under profile {profile.name!r}. Only LoRA (and DoRA) files import "
            "into stacked weights; drop this module from the adapter's target_modules."
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


def torch_parts(owner: str, path: Path, profile: Profile) -> list[tuple[int | None, str]]:
    """``[(part, torch module name)]`` of an NNX module path: ``[(None, name)]`` for a whole module,
    one entry per part of a stacked weight (``kv_einsum``: ``k_proj``, ``v_proj``); or raises."""
    out = _parts(path, profile)
    if not out:
        raise JpeftError(
            f"{owner}: {join(path)!r} has no torch name under profile {profile.name!r} (hf_names "
            f"{[p for p, _ in profile.hf_names]})."
        )
    return out


def _parts(path: Path, profile: Profile) -> list[tuple[int | None, str]]:
    theirs = _translate(join(path), profile.hf_names, to_torch=True)
    if theirs is not None:
        return [(None, theirs)]
    out: list[tuple[int | None, str]] = []
    while (theirs := _translate(f"{join(path)}[{len(out)}]", profile.hf_names, to_torch=True)) is not None:
        out.append((len(out), theirs))
    return out


def torch_targets(owner: str, paths: list[Path], modules: Any, profile: Profile) -> list[str]:
    """HF PEFT ``target_modules`` for the adapted ``paths``: the torch module names' last components
    (``o_proj``) when they select exactly those, else the full torch names."""
    torch_names = [t for p in sorted(paths) for _, t in torch_parts(owner, p, profile)]
    names = {t.rsplit(".", 1)[-1] for t in torch_names}
    twins = [p for p in modules if p and any(t.rsplit(".", 1)[-1] in names for _, t in _parts(p, profile))]
    return sorted(names) if sorted(twins) == sorted(paths) else torch_names


def torch_name(owner: str, path: Path, profile: Profile) -> str:
    """The torch module name of an NNX module path (a whole module), or raises."""
    parts = torch_parts(owner, path, profile)
    if parts[0][0] is not None:
        raise JpeftError(
            f"{owner}: {join(path)!r} stacks torch modules {[t for _, t in parts]} in one weight under profile "
            f"{profile.name!r}; only LoRA (and DoRA) export them, one slice each. Exclude it from targets."
        )
    return parts[0][1]


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
    from jpeft.io._hf_peft import PREFIX
    from jpeft.io._hf_peft_files import CONFIG
    from jpeft.io._hf_peft_lora import _KEY

    owner = "jpeft.import_hf"
    file = os.path.join(path, CONFIG)
    kind = config["peft_type"]
    if kind == "IA3":
        from jpeft.io._hf_peft_nnx_ia3 import import_ia3_nnx

        return import_ia3_nnx(path, config, tensors, model, _profile(owner, model, profile), name)
    if kind != "LORA":
        from jpeft.io._hf_peft_nnx_prompt import import_prompt_nnx

        return import_prompt_nnx(path, config, tensors, model, profile, name)
    if config.get("modules_to_save"):
        raise JpeftError(
            f"{owner}: {file!r} has modules_to_save={config['modules_to_save']!r}; on NNX models import_hf reads "
            "the LoRA factors only and writes no base weights. Re-save the adapter without it."
        )
    use_dora = bool(config.get("use_dora", False))
    profile = _profile(owner, model, profile)
    modules = _nnx.modules(model)
    found: dict[Path, dict[int | None, dict[str, tuple[str, np.ndarray]]]] = {}
    for key in sorted(tensors):
        m = _KEY.fullmatch(key[len(PREFIX) :]) if key.startswith(PREFIX) else None
        kind = m["kind"].split(".")[0] if m is not None else None
        if kind not in ("lora_A", "lora_B", "lora_magnitude_vector"):
            raise JpeftError(
                f"{owner}: {file!r} has key {key!r}; on NNX models import_hf reads "
                f"'{PREFIX}<module>.lora_A.weight', '.lora_B.weight' (and DoRA's '.lora_magnitude_vector') keys only."
            )
        leaf = {"lora_A": "lora_a", "lora_B": "lora_b", "lora_magnitude_vector": "magnitude"}[kind]
        t, part = target_part(owner, file, key, m["module"], profile, modules)
        found.setdefault(t, {}).setdefault(part, {})[leaf] = (key, tensors[key])
    if not found:
        raise JpeftError(f"{owner}: {file!r} holds no LoRA factors; expected '{PREFIX}<module>.lora_A.weight' keys.")
    want_leaves = {"lora_a", "lora_b"} | ({"magnitude"} if use_dora else set())
    for t, parts in found.items():
        for leaves in parts.values():
            if set(leaves) != want_leaves:
                raise JpeftError(
                    f"{owner}: {file!r} has {sorted(k for k, _ in leaves.values())} for module {join(t)!r}; with "
                    f"use_dora={use_dora} every target needs exactly {sorted(want_leaves)}."
                )
    paths = sorted(found)
    # Torch modules stacked in one weight (k_proj and v_proj in Gemma 3's kv_einsum) have an A each;
    # with n of them on one weight, every target gets rank n r: part k's A and B fill rank block k
    # (zeros elsewhere) and alpha grows so that the scale alpha / r (or / sqrt(r)) is kept.
    blocks = max(len(parts) for parts in found.values())
    rank, alpha, rslora = config.get("r", 8), config.get("lora_alpha", 8), config.get("use_rslora", False)
    try:
        method = LoRA(
            targets=spelled(config.get("target_modules"), paths, modules),
            rank=rank * blocks,
            alpha=alpha * (blocks**0.5 if rslora else blocks),
            dropout=config.get("lora_dropout", 0.0),
            use_rslora=rslora,
            use_dora=use_dora,
        )
    except JpeftError as e:
        raise JpeftError(f"{owner}: {file!r} does not make a valid LoRA: {e}") from None
    peft = jpeft.apply(method, model, key=jax.random.key(0), name=name)
    stores = adapted(peft, name)
    for t in paths:
        store = stores[t]
        a_full = np.zeros(store["lora_a"].shape, np.float32)
        b_full = np.zeros(store["lora_b"].shape, np.float32)
        magnitude = np.asarray(_nnx.read(store["magnitude"]), np.float32).copy() if use_dora else None
        for k, (part, leaves) in enumerate(sorted(found[t].items(), key=lambda kv: -1 if kv[0] is None else kv[0])):
            out = b_full.shape[1:] if part is None else b_full.shape[2:]
            n_in, n_out = int(np.prod(a_full.shape[:-1])), int(np.prod(out))
            shapes = {"lora_a": (rank, n_in), "lora_b": (n_out, rank), "magnitude": (n_out,)}
            for leaf, (key, x) in leaves.items():
                if tuple(x.shape) != shapes[leaf]:
                    raise JpeftError(
                        f"{owner}: {key!r} has shape {tuple(x.shape)}, but {join(t)}'s {leaf} needs "
                        f"{shapes[leaf]} in HF PEFT's layout. The adapter was trained on another model or with "
                        "other options (r)."
                    )
            cols = slice(k * rank, (k + 1) * rank)
            a_full[..., cols] = np.asarray(leaves["lora_a"][1], np.float32).T.reshape(a_full.shape[:-1] + (rank,))
            b = np.asarray(leaves["lora_b"][1], np.float32).T.reshape((rank,) + out)
            if part is None:
                b_full[cols] = b
            else:
                b_full[cols, part] = b
            if use_dora:
                mag = np.asarray(leaves["magnitude"][1], np.float32).reshape(out)
                if part is None:
                    magnitude = mag
                else:
                    magnitude[part] = mag
        _nnx.write(store["lora_a"], jnp.asarray(a_full, store["lora_a"].dtype))
        _nnx.write(store["lora_b"], jnp.asarray(b_full, store["lora_b"].dtype))
        if use_dora:
            _nnx.write(store["magnitude"], jnp.asarray(magnitude, store["magnitude"].dtype))
    return method, peft


def export_nnx(path: str, method: Any, model: Any, profile: Profile | None, name: str, extra: dict) -> None:
    """``jpeft.export_hf`` for an NNX model, see the module docstring."""
    from jpeft.io._hf_peft import PREFIX
    from jpeft.io._hf_peft_files import write
    from jpeft.io._hf_peft_lora import lora_config
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
        magnitude = np.asarray(_nnx.read(store["magnitude"])) if method.use_dora else None
        for part, theirs in torch_parts(owner, t, profile):  # a stacked weight: one torch module per slice
            key = PREFIX + theirs
            b_part, m_part = (
                (b, magnitude) if part is None else (b[:, part], None if magnitude is None else magnitude[part])
            )
            tensors[key + ".lora_A.weight"] = np.ascontiguousarray(a.reshape(-1, a.shape[-1]).T)
            tensors[key + ".lora_B.weight"] = np.ascontiguousarray(b_part.reshape(b_part.shape[0], -1).T)
            if method.use_dora:
                tensors[key + ".lora_magnitude_vector.weight"] = m_part.reshape(-1)
    targets = torch_targets(owner, list(stores), _nnx.modules(model), profile)
    write(path, tensors, lora_config(method, extra, targets, False, method.use_dora, None))
