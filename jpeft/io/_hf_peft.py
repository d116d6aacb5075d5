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

The LoRA keys are read and written in ``_hf_peft_lora.py``; IA3 (``ia3_l``), prompt tuning and
prefix tuning (``prompt_embeddings``) in ``_hf_peft_ia3.py`` and ``_hf_peft_prompt.py``; the two
files themselves (checks, hash, staged writes) in ``_hf_peft_files.py``. :func:`export_hf` and
:func:`import_hf` dispatch on the method and on ``peft_type``.

Only safetensors is read or written, never pickle.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from jpeft import _nnx, _tree
from jpeft._errors import JpeftError
from jpeft._layout import Layout
from jpeft._method import Context, Method
from jpeft._tree import RESERVED, Path, PyTree, join
from jpeft.io._hf_peft_files import CONFIG, check_export_path, read_adapter
from jpeft.methods._ia3 import IA3
from jpeft.methods._lora import LoRA
from jpeft.methods._prompt import VirtualTokens
from jpeft.profiles import Profile

PREFIX = "base_model.model."
"""The prefix of every key: PEFT wraps the model in a ``PeftModel`` and a ``LoraModel``."""


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


def adapter(owner: str, tree: PyTree, target: Path, name: str) -> Mapping[str, Any]:
    """The delta leaves of adapter ``name`` at module ``target``."""
    store = _tree.get(tree, target).get(RESERVED, {})
    if name not in store:
        raise JpeftError(
            f"{owner}: {join(target)!r} has no adapter {name!r} (it has {sorted(store)}). Pass the "
            "tree returned by jpeft.apply(method, params, key=..., name=...) and the same name."
        )
    return store[name]


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
        concurrent export is refused rather than loaded with the old config. In a multi-host run, call
        export_hf on every process: deltas spanning other processes' devices are gathered (a
        collective) and every process writes the same two files.
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
    peft_params = _on_host(method, peft_params)
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
    from jpeft.io._hf_peft_lora import export_lora

    return export_lora(path, method, peft_params, profile, name, extra)


def _on_host(method: Method, peft_params: PyTree) -> PyTree:
    """The tree with the leaves export_hf reads (deltas, ``extra_trainable`` leaves) gathered to this host
    where they are global arrays spanning other processes' devices (a multi-host run, where every process
    calls export_hf and each writes the same two files); base kernels stay as they are."""
    import jax

    if jax.process_count() == 1:
        return peft_params
    from jax.experimental import multihost_utils

    def host(x: Any) -> Any:  # a collective: every process gathers the same leaves in the same order
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return multihost_utils.process_allgather(x, tiled=True)
        return x

    if _nnx.is_model(peft_params):
        from flax import nnx

        graphdef, deltas, rest = nnx.split(peft_params, nnx.Any(_nnx.Delta, _nnx.FrozenDelta), ...)
        return nnx.merge(graphdef, jax.tree.map(host, deltas), rest)
    extra = getattr(method, "extra_trainable", None)

    def walk(tree: Any, path: Path) -> Any:
        if isinstance(tree, Mapping):
            return {k: walk(v, path + (str(k),)) for k, v in tree.items()}
        read = RESERVED in path or (isinstance(extra, str) and re.fullmatch(extra, join(path)) is not None)
        return jax.tree.map(host, tree) if read else tree

    return walk(peft_params, ())


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
    if config["peft_type"] == "IA3":
        from jpeft.io._hf_peft_ia3 import import_ia3

        return import_ia3(path, config, tensors, params, layouts, name)
    if config["peft_type"] != "LORA":
        from jpeft.io._hf_peft_prompt import import_prompt

        return import_prompt(path, config, tensors, params, profile, name)
    from jpeft.io._hf_peft_lora import import_lora

    return import_lora(path, config, tensors, params, layouts, name)
