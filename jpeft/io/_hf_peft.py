"""The HF PEFT adapter format: ``adapter_config.json`` and ``adapter_model.safetensors``.

HF PEFT stores a LoRA adapter of a torch model under the keys

* ``base_model.model.<module>.lora_A.weight``: ``(r, in)``, and ``.lora_B.weight``: ``(out, r)``;
* ``base_model.model.<module>.lora_embedding_A``: ``(r, vocab)``, and ``.lora_embedding_B``:
  ``(dim, r)``, for embeddings;
* ``base_model.model.<module>.lora_magnitude_vector.weight``: ``(out,)``, DoRA's magnitude
  (PEFT before 0.11 wrote it without ``.weight``);

with the adapter name left out. ``<module>`` is the torch module path, such as
``bert.encoder.layer.0.attention.self.query``. The ``transformers`` Flax classes name their
modules exactly as their torch twins, so the name map is the Flax module path with ``'.'`` for
``'/'``; a checkpoint made on the bare torch model imports into a Flax task-head model (and the
reverse) by adding or stripping the first component. jpeft's factors are ``a: (in, r)`` and
``b: (r, out)`` for every kernel layout, GPT-2's ``(out, in)`` ``Conv1D`` included, so both are
transposed; HF PEFT's ``fan_in_fan_out`` only says how the *base* weight is laid out.

IA3 (``ia3_l``), prompt tuning and prefix tuning (``prompt_embeddings``) are in ``_hf_peft_ia3.py``
and ``_hf_peft_prompt.py``; :func:`export_hf` and :func:`import_hf` dispatch on the method and on
``peft_type``.

Only safetensors is read or written, never pickle.
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

from jpeft import _nnx, _tree
from jpeft._errors import JpeftError
from jpeft._layout import Layout
from jpeft._method import Context, Method
from jpeft._tree import RESERVED, Path, PyTree, join
from jpeft.io._hf_peft_files import CONFIG, WEIGHTS, check_export_path, read_adapter, write
from jpeft.methods._ia3 import IA3
from jpeft.methods._lora import LoRA
from jpeft.methods._prompt import VirtualTokens
from jpeft.profiles import Profile

PREFIX = "base_model.model."
"""The prefix of every key: PEFT wraps the model in a ``PeftModel`` and a ``LoraModel``."""


_KEY = re.compile(
    r"(?P<module>.+)\.(?P<kind>lora_A\.weight|lora_B\.weight|lora_embedding_A(?:\.weight)?|"
    r"lora_embedding_B(?:\.weight)?|lora_magnitude_vector(?:\.weight)?)"
)
_LEAF = {"lora_A": "lora_a", "lora_B": "lora_b", "lora_embedding_A": "lora_a", "lora_embedding_B": "lora_b"}
_LEAF["lora_magnitude_vector"] = "magnitude"


def _check_profile(owner: str, profile: Any) -> tuple[tuple[str, str], ...]:
    if profile is None:
        return ()
    if not isinstance(profile, Profile):
        raise JpeftError(
            f"{owner}(profile={profile!r}): profile must be a jpeft.profiles.Profile (e.g. "
            "jpeft.profiles.GPT2) or None to detect the family from the tree."
        )
    return profile.layouts


def _layout(owner: str, path: Path, own: Mapping[str, Any], ctx: Context, overrides: tuple) -> Layout:
    """The layout of a target, refused unless HF PEFT has the same module (2-D, no stack axis)."""
    layout = ctx.layout(owner, path, own, overrides)
    shape = tuple(own[layout.leaf].shape)
    if layout.kind not in ("dense", "transposed", "embed") or len(shape) != 2:
        raise JpeftError(
            f"{owner}: {join(path + (layout.leaf,))} has shape {shape} and layout {layout.spec()!r}; HF "
            "PEFT has only 2-D Linear, Conv1D and Embedding targets, one per layer. Stacked (nn.scan) "
            "kernels and multi-axis or convolution kernels have no HF PEFT key: unstack the layers, or "
            "save with jpeft's own checkpoints instead."
        )
    return layout


def _targets_for_torch(paths: list[Path], modules: list[Path]) -> list[str] | str:
    """HF PEFT ``target_modules`` that select exactly ``paths`` among ``modules``.

    The shortest common suffix depth that is exact, as a list of '.'-joined names (PEFT matches
    ``name == t or name.endswith('.' + t)``); the full paths are always exact.
    """
    chosen = set(paths)
    for depth in range(1, max(len(p) for p in paths) + 1):
        names = sorted({".".join(p[-depth:]) for p in paths})
        hit = {m for m in modules if any(".".join(m) == t or ".".join(m).endswith("." + t) for t in names)}
        if hit == chosen:
            return names
    return sorted(".".join(p) for p in paths)  # unreachable: full paths are exact


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


def adapter(owner: str, tree: PyTree, target: Path, name: str) -> Mapping[str, Any]:
    """The delta leaves of adapter ``name`` at module ``target``."""
    store = _tree.get(tree, target).get(RESERVED, {})
    if name not in store:
        raise JpeftError(
            f"{owner}: {join(target)!r} has no adapter {name!r} (it has {sorted(store)}). Pass the "
            "tree returned by jpeft.apply(method, params, key=..., name=...) and the same name."
        )
    return store[name]


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


def export_hf(
    path: str,
    method: Method,
    peft_params: PyTree,
    profile: Profile | None = None,
    *,
    name: str = "default",
    base_model_name_or_path: str | None = None,
    task_type: str | None = None,
) -> None:
    """Writes an adapter in the HF PEFT format: ``adapter_config.json`` and ``adapter_model.safetensors``.

    For each target, ``lora_A = a.T: (r, in)`` and ``lora_B = b.T: (out, r)`` under
    ``base_model.model.<torch module>.lora_A.weight`` (``lora_embedding_A``/``_B`` for embeddings,
    ``lora_magnitude_vector.weight`` for DoRA's ``m``), so that HF PEFT computes
    ``y = x W^T + s (x A^T) B^T`` with the same ``s``. LoRA-FA and LoRA+ save as plain LoRA: their
    difference is only in training. The modules whose leaves ``extra_trainable`` selects (a task
    head) are saved whole as HF PEFT's ``modules_to_save``, under ``base_model.model.<module>.weight``
    in torch layout.

    Other methods (``extra_trainable`` must be ``None``):

    - ``jpeft.IA3`` (``peft_type: "IA3"``): ``base_model.model.<module>.ia3_l`` of shape ``(out, 1)``
      (``ia3_out``) or ``(1, in)`` (``ia3_in``, listed in ``feedforward_modules``); 2-D Linear and
      Conv1D targets only.
    - ``jpeft.PromptTuning`` (``"PROMPT_TUNING"``): ``prompt_embeddings: (P, d)``; ``jpeft.PTuning``
      writes its encoder's output the same way (HF PEFT's cached P-tuning prompt).
    - ``jpeft.PrefixTuning`` / ``jpeft.PTuningV2`` (``"PREFIX_TUNING"``): ``prompt_embeddings: (P, 2 L d)``,
      layer ``l``'s key prefix in columns ``2 l d .. (2 l + 1) d`` and its value prefix next, with the
      MLP folded. Decoder-only and encoder-only models without rotary positions (GPT-2, BERT); see
      ``jpeft/io/_hf_peft_prompt.py``. Prompt methods need ``task_type`` (e.g. ``'CAUSAL_LM'``) for
      ``PeftModel.from_pretrained`` to run them.

    Args:
      path: the directory to write; created if missing. Existing files of the same names are
        replaced: both are written to a temporary directory inside ``path`` first, then renamed,
        weights first; the weights' safetensors metadata holds the config's SHA-256
        (``jpeft_config_sha256``), which ``import_hf`` checks, so a pair torn by a killed or
        concurrent export is refused rather than loaded with the old config.
      method: the ``jpeft.LoRA`` (or DoRA, LoRA-FA, LoRA+), ``IA3``, ``PromptTuning``, ``PTuning``,
        ``PrefixTuning`` or ``PTuningV2`` that made the deltas.
      peft_params: the tree holding the deltas, from ``jpeft.apply`` and training.
      profile: the architecture profile, for kernel layouts of a family jpeft does not detect.
      name: the adapter to write.
      base_model_name_or_path: recorded in the config, e.g. ``'gpt2'``.
      task_type: HF PEFT's task type, e.g. ``'SEQ_CLS'`` or ``'CAUSAL_LM'``; ``None`` is fine.

    Raises:
      JpeftError: if the method is none of those, the adapter is missing at a target, a target has no
        HF PEFT equivalent (stacked or multi-axis kernel, an IA3 embedding, prefixes of a rotary,
        encoder-decoder, stacked or uneven model), or ``extra_trainable`` selects part of a module,
        a LoRA target or a root leaf (``modules_to_save`` holds whole named modules), or is set for
        a method other than LoRA; if ``path`` is a file or holds a directory named like one of the
        two files, ``base_model_name_or_path`` or ``task_type`` is not a str, or a delta holds NaN or
        Inf. All of these are raised before anything is written.

    Example:
      >>> import json, os, tempfile, jax, jax.numpy as jnp, flax.linen as nn, jpeft
      >>> params = {"query": nn.Dense(4).init(jax.random.key(0), jnp.ones((1, 6)))["params"]}
      >>> method = jpeft.LoRA(targets=["query"], rank=2, alpha=4)
      >>> peft = jpeft.apply(method, params, key=jax.random.key(1))
      >>> out = tempfile.mkdtemp()
      >>> jpeft.export_hf(out, method, peft)
      >>> sorted(os.listdir(out))
      ['adapter_config.json', 'adapter_model.safetensors']
      >>> json.load(open(os.path.join(out, "adapter_config.json")))["target_modules"]
      ['query']
      >>> ia3 = jpeft.IA3(targets=["query"])  # (IA)^3: one ia3_l vector of shape (out, 1)
      >>> jpeft.export_hf(out, ia3, jpeft.apply(ia3, params, key=jax.random.key(1)))
      >>> json.load(open(os.path.join(out, "adapter_config.json")))["peft_type"]
      'IA3'
      >>> type(jpeft.import_hf(out, params)[0]).__name__
      'IA3'

    References:
      HF PEFT, "PEFT checkpoint format", https://huggingface.co/docs/peft/developer_guides/checkpoint
    """
    owner = "jpeft.export_hf"
    check_export_path(owner, path)
    for field, value in (("base_model_name_or_path", base_model_name_or_path), ("task_type", task_type)):
        if value is not None and not isinstance(value, str):
            raise JpeftError(
                f"{owner}({field}={value!r}): expected a str or None, written to {CONFIG} as is; got a "
                f"{type(value).__name__}. Pass str(...) of it."
            )
    extra = {
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "inference_mode": True,
    }
    if _nnx.is_model(peft_params):
        from jpeft.io._hf_peft_nnx import export_nnx

        return export_nnx(path, method, peft_params, profile, name, extra)
    if not isinstance(peft_params, Mapping):
        raise JpeftError(
            f"{owner} expects the params collection as a nested mapping; got {type(peft_params).__name__}."
        )
    if isinstance(method, IA3):
        from jpeft.io._hf_peft_ia3 import export_ia3

        return export_ia3(path, method, peft_params, profile, name=name, extra=extra)
    if isinstance(method, VirtualTokens):
        from jpeft.io._hf_peft_prompt import export_prompt

        return export_prompt(path, method, peft_params, profile, name=name, extra=extra)
    if not isinstance(method, LoRA):
        raise JpeftError(
            f"{owner}: HF PEFT's format holds jpeft.LoRA and its variants (DoRA, LoRA-FA, LoRA+), IA3, "
            f"PromptTuning, PTuning, PrefixTuning and PTuningV2; got {type(method).__name__}. Save other methods "
            "with jpeft's own checkpoints (jpeft.io.save)."
        )
    overrides = tuple(method.layouts) + _check_profile(owner, profile)
    ctx = Context(peft_params)
    modules = _tree.modules(peft_params)
    targets = method.select(peft_params)
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


def _check_lora_config(owner: str, path: str, config: Mapping[str, Any]) -> None:
    file = os.path.join(path, CONFIG)
    unsupported = {
        "bias": (config.get("bias", "none"), "none"),
        "rank_pattern": (config.get("rank_pattern") or {}, {}),
        "alpha_pattern": (config.get("alpha_pattern") or {}, {}),
    }
    for field, (got, default) in unsupported.items():
        if got != default:
            raise JpeftError(
                f"{owner}: {file!r} has {field}={got!r}; jpeft.LoRA has no equivalent (expected {default!r}). "
                "Re-save the adapter without it."
            )


def _saved(torch_module: str, to_save: list[str]) -> bool:
    """Whether a torch module is, or sits inside, a module that ``modules_to_save`` names."""
    parts = torch_module.split(".")
    heads = [".".join(parts[: i + 1]) for i in range(len(parts))]
    return any(h == t or h.endswith("." + t) for h in heads for t in to_save)


def _resolve(torch_path: str, modules: Mapping[Path, Any]) -> Path | None:
    """The Flax module of a torch module path: as is, without its first component, or with one more."""
    p = tuple(torch_path.split("."))
    tops = sorted({m[0] for m in modules if m})
    for candidate in [p, *([p[1:]] if len(p) > 1 else []), *((t,) + p for t in tops)]:
        if candidate in modules:
            return candidate
    return None


def import_hf(
    path: str, params: PyTree, profile: Profile | None = None, *, name: str = "default"
) -> tuple[Method, PyTree]:
    """Reads an HF PEFT adapter into a jpeft method and a tree with its delta leaves.

    The inverse of :func:`export_hf`: ``a = lora_A.T: (in, r)``, ``b = lora_B.T: (r, out)`` and DoRA's
    ``m`` as is, cast to the dtype ``jpeft.apply`` would give them (the kernel's, at least float32).
    The method is ``jpeft.LoRA(rank=r, alpha=lora_alpha, dropout=lora_dropout, use_rslora=...,
    use_dora=...)``, whose targets are ``target_modules`` when they select exactly the modules in
    the file, else those modules' paths. ``modules_to_save`` weights (a task head) replace the
    base leaves of their modules in the returned tree, in Flax layout, and become the method's
    ``extra_trainable``.

    The other ``peft_type`` values, the inverse of :func:`export_hf`'s: ``"IA3"`` gives ``jpeft.IA3``
    (``targets`` and ``feedforward`` from the file); ``"PROMPT_TUNING"`` and ``"P_TUNING"`` (whose
    saved ``prompt_embeddings`` is the encoder's output) give ``jpeft.PromptTuning``;
    ``"PREFIX_TUNING"`` gives ``jpeft.PTuningV2`` with the per-layer prefixes.

    Args:
      path: a directory with ``adapter_config.json`` and ``adapter_model.safetensors``.
      params: the base model's ``params`` collection (a ``transformers`` Flax model's, whose module
        names are the torch ones).
      profile: the architecture profile, for kernel layouts of a family jpeft does not detect; its
        ``layouts`` become the method's.
      name: the adapter name to store the deltas under.

    Returns:
      ``(method, peft_params)``, as from ``jpeft.apply(method, params, key=..., name=name)`` with the
      file's values in place of the initial ones. The base leaves are the same objects as in
      ``params``, except those of ``modules_to_save``; ``params`` itself is not changed.

    Raises:
      JpeftError: on a missing, invalid (not UTF-8 JSON) or truncated file, a ``peft_type`` outside
        ``jpeft.io._hf_peft_files.PEFT_TYPES``, a config field of the wrong type (``use_dora: "false"``,
        a non-finite ``lora_alpha``, an invalid ``target_modules`` / ``feedforward_modules`` regex), a
        tensor that is not a float or holds NaN or Inf, weights that ``export_hf`` wrote beside another
        config (a killed or concurrent export, or an edited config), options jpeft lacks (``bias``,
        ``rank_pattern``, ``alpha_pattern``; ``modules_to_save`` for IA3; encoder-decoder prompts),
        or a checkpoint for another model: a key whose module ``params`` lacks, a tensor whose shape
        does not fit (naming the key and both shapes), or a prefix file with another number of layers.

    Example:
      >>> import tempfile, jax, jax.numpy as jnp, flax.linen as nn, jpeft
      >>> params = {"query": nn.Dense(4).init(jax.random.key(0), jnp.ones((1, 6)))["params"]}
      >>> method = jpeft.LoRA(targets=["query"], rank=2, alpha=4)
      >>> peft = jpeft.apply(method, params, key=jax.random.key(1))
      >>> out = tempfile.mkdtemp()
      >>> jpeft.export_hf(out, method, peft)
      >>> method2, peft2 = jpeft.import_hf(out, params)
      >>> method2.rank, method2.alpha, method2.targets
      (2, 4, ('query',))
      >>> bool((peft2["query"]["__jpeft__"]["default"]["lora_a"] == peft["query"]["__jpeft__"]["default"]["lora_a"]).all())
      True

    References:
      HF PEFT, "PEFT checkpoint format", https://huggingface.co/docs/peft/developer_guides/checkpoint
    """
    owner = "jpeft.import_hf"
    if _nnx.is_model(params):
        from jpeft.io._hf_peft_nnx import import_nnx

        if not isinstance(name, str) or not name or "/" in name:
            raise JpeftError(f"{owner}: adapter name must be a non-empty str without '/'; got {name!r}.")
        config, tensors = read_adapter(owner, path)
        return import_nnx(path, config, tensors, params, profile, name)
    if not isinstance(params, Mapping):
        raise JpeftError(f"{owner} expects the params collection as a nested mapping; got {type(params).__name__}.")
    if not isinstance(name, str) or not name or "/" in name:
        raise JpeftError(f"{owner}: adapter name must be a non-empty str without '/'; got {name!r}.")
    layouts = _check_profile(owner, profile)
    config, tensors = read_adapter(owner, path)
    file = os.path.join(path, WEIGHTS)
    if config["peft_type"] == "IA3":
        from jpeft.io._hf_peft_ia3 import import_ia3

        return import_ia3(path, config, tensors, params, layouts, name)
    if config["peft_type"] != "LORA":
        from jpeft.io._hf_peft_prompt import import_prompt

        return import_prompt(path, config, tensors, params, profile, name)
    _check_lora_config(owner, path, config)
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
