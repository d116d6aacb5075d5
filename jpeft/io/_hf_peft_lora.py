"""The HF PEFT format of LoRA (and rsLoRA, DoRA, LoRA-FA, LoRA+): ``lora_A``/``lora_B`` pairs and ``modules_to_save``.

See ``jpeft/io/_hf_peft.py`` for the key layout; reached through ``jpeft.export_hf`` and
``jpeft.import_hf``, which check the files (``_hf_peft_files.py``) and dispatch here.
"""

from __future__ import annotations

import difflib
import math
import os
import re
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from jpeft import _tree
from jpeft._errors import JpeftError
from jpeft._method import Context
from jpeft._tree import RESERVED, Path, PyTree, join
from jpeft.io._hf_peft import PREFIX, _check_profile, _layout, _resolve, _targets_for_torch, adapter
from jpeft.io._hf_peft_files import CONFIG, WEIGHTS, write
from jpeft.methods._lora import LoRA

_KEY = re.compile(
    r"(?P<module>.+)\.(?P<kind>lora_A\.weight|lora_B\.weight|lora_embedding_A(?:\.weight)?|"
    r"lora_embedding_B(?:\.weight)?|lora_magnitude_vector(?:\.weight)?)"
)
_LEAF = {"lora_A": "lora_a", "lora_B": "lora_b", "lora_embedding_A": "lora_a", "lora_embedding_B": "lora_b"}
_LEAF["lora_magnitude_vector"] = "magnitude"


def _to_torch(owner: str, path: Path, leaf: str, x: Any) -> tuple[str, np.ndarray]:
    """A base leaf of a saved module to its torch name and layout (the inverse of the loader's renaming)."""
    x = np.asarray(x)
    if leaf == "kernel":
        if x.ndim not in (2, 4):
            raise JpeftError(
                f"{owner}: {join(path + (leaf,))} has shape {x.shape}; modules_to_save holds 2-D Linear or 4-D "
                "convolution kernels only. Narrow extra_trainable."
            )
        return "weight", np.ascontiguousarray(x.T if x.ndim == 2 else np.transpose(x, (3, 2, 0, 1)))
    return ("weight" if leaf in ("embedding", "scale") else leaf), np.ascontiguousarray(x)


def _from_torch(name: str, x: np.ndarray, own: Mapping[str, Any]) -> tuple[str, np.ndarray]:
    """A torch parameter of a saved module to its Flax leaf name and layout, given the module's leaves."""
    if name == "weight" and "weight" not in own:
        for leaf in ("scale", "embedding"):
            if leaf in own:
                return leaf, x
        if "kernel" in own:
            return "kernel", x.T if x.ndim == 2 else np.transpose(x, (2, 3, 1, 0))
    return name, x


def lora_config(
    method: Any,
    extra: Mapping[str, Any],
    target_modules: Any,
    fan_in_fan_out: bool,
    use_dora: bool,
    modules_to_save: Any,
) -> dict[str, Any]:
    """The ``adapter_config.json`` of a LoRA export (linen and NNX)."""
    return {
        "peft_type": "LORA",
        **extra,
        "r": method.rank,
        "lora_alpha": _scalar(method.alpha),
        "lora_dropout": float(method.dropout),
        "target_modules": target_modules,
        "fan_in_fan_out": fan_in_fan_out,
        "bias": "none",
        "use_rslora": method.use_rslora,
        "use_dora": use_dora,
        "modules_to_save": modules_to_save,
        "init_lora_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }


def _scalar(x: float) -> int | float:
    return int(x) if float(x).is_integer() else float(x)


def export_lora(
    path: str, method: LoRA, peft_params: PyTree, profile: Any, name: str, extra: Mapping[str, Any]
) -> None:
    """Writes a LoRA adapter of a linen tree; see ``jpeft.export_hf``."""
    owner = "jpeft.export_hf"
    overrides = tuple(method.layouts) + _check_profile(owner, profile)
    ctx = Context(peft_params)
    modules = _tree.modules(peft_params)
    # QLoRA also selects the modules it quantised but does not target: their adapter nodes hold no factors.
    targets = [t for t in method.select(peft_params) if adapter(owner, peft_params, t, name)]
    tensors: dict[str, np.ndarray] = {}
    transposed = False
    for target in targets:
        own = modules[target]
        layout = _layout(owner, target, own, ctx, overrides)
        transposed |= layout.kind == "transposed"
        deltas = adapter(owner, peft_params, target, name)
        key = PREFIX + ".".join(target)
        a, b = (np.ascontiguousarray(np.asarray(deltas[k]).T) for k in ("lora_a", "lora_b"))
        if layout.kind == "embed":
            tensors[key + ".lora_embedding_A"], tensors[key + ".lora_embedding_B"] = a, b
        else:
            tensors[key + ".lora_A.weight"], tensors[key + ".lora_B.weight"] = a, b
        if method.use_dora:
            tensors[key + ".lora_magnitude_vector.weight"] = np.ascontiguousarray(np.asarray(deltas["magnitude"]))
    saved: dict[Path, dict[str, Any]] = {}
    if method.extra_trainable is not None:
        for leaf_path, x in _tree.leaves(peft_params):
            if RESERVED not in leaf_path and re.fullmatch(method.extra_trainable, join(leaf_path)):
                saved.setdefault(leaf_path[:-1], {})[leaf_path[-1]] = x
    for module, leaves in sorted(saved.items()):
        if not module:
            raise JpeftError(
                f"{owner}: extra_trainable={method.extra_trainable!r} selects {sorted(leaves)} at the root of the "
                "tree, outside any module; HF PEFT's modules_to_save holds named modules only. Narrow the regex."
            )
        if module in targets or set(leaves) != set(modules[module]):
            raise JpeftError(
                f"{owner}: extra_trainable={method.extra_trainable!r} selects {sorted(leaves)} of module "
                f"{join(module)!r}, which has {sorted(modules[module])}"
                f"{' and is a LoRA target' if module in targets else ''}. HF PEFT's modules_to_save holds whole, "
                "named modules that are not LoRA targets: make the regex select every leaf of such modules, "
                f"e.g. extra_trainable=r'{join(module)}/.*'."
            )
        for leaf, x in leaves.items():
            torch_name, value = _to_torch(owner, module, leaf, x)
            tensors[PREFIX + ".".join(module + (torch_name,))] = value
    target_modules = (
        [t.replace("/", ".") for t in method.targets]
        if isinstance(method.targets, tuple)
        else _targets_for_torch(targets, list(modules))
    )
    saved_modules = _targets_for_torch(sorted(saved), list(modules)) if saved else None
    config = lora_config(method, extra, target_modules, transposed, method.use_dora, saved_modules)
    write(path, tensors, config)


def _saved(torch_module: str, to_save: list[str]) -> bool:
    """Whether a torch module is, or sits inside, a module that ``modules_to_save`` names."""
    parts = torch_module.split(".")
    heads = [".".join(parts[: i + 1]) for i in range(len(parts))]
    return any(h == t or h.endswith("." + t) for h in heads for t in to_save)


def import_lora(
    path: str, config: Mapping[str, Any], tensors: Mapping[str, np.ndarray], params: PyTree, layouts: tuple, name: str
) -> tuple[LoRA, PyTree]:
    """Reads a LoRA adapter into a linen tree; see ``jpeft.import_hf``."""
    owner = "jpeft.import_hf"
    file = os.path.join(path, WEIGHTS)
    modules = _tree.modules(params)
    to_save = config.get("modules_to_save") or []
    if not isinstance(to_save, list) or not all(isinstance(t, str) for t in to_save):
        raise JpeftError(f"{owner}: modules_to_save={to_save!r} in {CONFIG} must be a list of module names.")
    found: dict[Path, dict[str, tuple[str, np.ndarray]]] = {}
    saved: dict[Path, dict[str, tuple[str, np.ndarray]]] = {}
    unknown = []
    for key in sorted(tensors):
        m = _KEY.fullmatch(key[len(PREFIX) :]) if key.startswith(PREFIX) else None
        torch_module, _, param = key[len(PREFIX) :].rpartition(".")
        if m is None and key.startswith(PREFIX) and _saved(torch_module, to_save):
            target = _resolve(torch_module, modules)
            if target is None:
                unknown.append(key)
            else:
                saved.setdefault(target, {})[param] = (key, tensors[key])
            continue
        if m is None:
            raise JpeftError(
                f"{owner}: {file!r} has key {key!r}, which is not a LoRA key "
                f"'{PREFIX}<module>.lora_A.weight' (lora_B, lora_embedding_A/B, lora_magnitude_vector) nor "
                f"in modules_to_save={to_save}. Is it an HF PEFT LoRA adapter?"
            )
        target = _resolve(m["module"], modules)
        if target is None:
            unknown.append(key)
            continue
        leaf = _LEAF[m["kind"].split(".")[0]]
        found.setdefault(target, {})[leaf] = (key, tensors[key])
    if unknown:
        near = difflib.get_close_matches(
            unknown[0][len(PREFIX) :].rsplit(".lora", 1)[0].replace(".", "/"), [join(p) for p in modules], n=3, cutoff=0
        )
        raise JpeftError(
            f"{owner}: {file!r} is for another model: {len(unknown)} keys name modules that params lacks, "
            f"such as {unknown[0]!r}. Nearest module paths of params: {near}. Pass the params of the base "
            "model the adapter was trained on."
        )
    if not found:
        raise JpeftError(f"{owner}: {file!r} holds no LoRA factors; expected '{PREFIX}<module>.lora_A.weight' keys.")
    if to_save and not saved:
        raise JpeftError(
            f"{owner}: {CONFIG} lists modules_to_save={to_save}, but {file!r} holds none of their weights. "
            "Save the adapter again with its modules."
        )
    extra = "(?:" + "|".join(re.escape(join(p)) for p in sorted(saved)) + ")/[^/]+" if saved else None
    rank, use_dora = config.get("r", 8), bool(config.get("use_dora", False))
    torch_targets = config.get("target_modules")
    paths = sorted(found)
    targets: str | tuple[str, ...] = "|".join(re.escape(join(p)) for p in paths)
    if isinstance(torch_targets, list) and torch_targets:
        suffixes = tuple(t.replace(".", "/") for t in torch_targets)
        if sorted(p for p in modules if _tree.matches(suffixes, p)) == paths:
            targets = suffixes
    try:
        method = LoRA(
            targets=targets,
            rank=rank,
            alpha=config.get("lora_alpha", 8),
            dropout=config.get("lora_dropout", 0.0),
            use_rslora=config.get("use_rslora", False),
            use_dora=use_dora,
            layouts=layouts,
            extra_trainable=extra,
        )
    except JpeftError as e:
        raise JpeftError(f"{owner}: {os.path.join(path, CONFIG)!r} does not make a valid LoRA: {e}") from None
    ctx = Context(params)
    out = _tree.as_dicts(params)
    want_leaves = {"lora_a", "lora_b"} | ({"magnitude"} if use_dora else set())
    for target in paths:
        own = modules[target]
        layout = _layout(owner, target, own, ctx, tuple(layouts))
        kernel = own[layout.leaf]
        leaves = found[target]
        if set(leaves) != want_leaves:
            raise JpeftError(
                f"{owner}: {file!r} has {sorted(k for k, _ in leaves.values())} for module {join(target)!r}; "
                f"with use_dora={use_dora} every target needs exactly {sorted(want_leaves)} "
                "(lora_A, lora_B" + (", lora_magnitude_vector)." if use_dora else ").")
            )
        a_shape, b_shape = layout.factor_shapes(tuple(kernel.shape), rank)
        _, _, d_out = layout.split(tuple(kernel.shape))
        want = {"lora_a": a_shape[::-1], "lora_b": b_shape[::-1], "magnitude": (math.prod(d_out),)}
        dtype = jnp.promote_types(kernel.dtype, jnp.float32)
        deltas = {}
        for leaf, (key, x) in sorted(leaves.items()):
            if tuple(x.shape) != want[leaf]:
                raise JpeftError(
                    f"{owner}: {key!r} has shape {tuple(x.shape)} {x.dtype}, but {join(target + (layout.leaf,))} "
                    f"{tuple(kernel.shape)} (layout {layout.spec()!r}) with r={rank} needs {want[leaf]}. The "
                    "adapter was trained on another model or another r: check params and adapter_config.json."
                )
            deltas[leaf] = jnp.asarray(x if leaf == "magnitude" else x.T, dtype)
        node = _tree.get(out, target)
        store = node.get(RESERVED, {})
        if name in store:
            raise JpeftError(f"{owner}: adapter {name!r} already exists at {join(target)!r}; pass another name=...")
        node[RESERVED] = {**store, name: deltas}
    for target, leaves in sorted(saved.items()):
        own = modules[target]
        node = _tree.get(out, target)
        new = {}
        for param, (key, x) in sorted(leaves.items()):
            leaf, y = _from_torch(param, x, own)
            if leaf not in own or tuple(y.shape) != tuple(own[leaf].shape):
                want = tuple(own[leaf].shape) if leaf in own else f"one of {sorted(own)}"
                raise JpeftError(
                    f"{owner}: {key!r} has shape {tuple(x.shape)} {x.dtype}; as {join(target + (leaf,))} it needs "
                    f"{want}. The modules_to_save weights were trained on another model."
                )
            new[leaf] = jnp.asarray(y, own[leaf].dtype)
        if set(new) != set(own):
            raise JpeftError(
                f"{owner}: {file!r} holds {sorted(new)} of saved module {join(target)!r}, which has {sorted(own)}; "
                "modules_to_save needs every parameter of the module."
            )
        node.update(new)
    return method, out
