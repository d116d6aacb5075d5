"""The HF PEFT format of prompt tuning, P-tuning and prefix tuning: one tensor, ``prompt_embeddings``.

* ``PROMPT_TUNING`` and ``P_TUNING``: ``prompt_embeddings: (P, d)``, the virtual token embeddings (for
  P-tuning, the prompt encoder's output), which are jpeft's ``<embedding>/__jpeft__/<name>/prompt``.
* ``PREFIX_TUNING``: ``prompt_embeddings: (P, 2 L d)``, the prefix encoder's output (the MLP is
  folded, as HF PEFT saves it). ``PeftModel.get_prompt`` views it as ``(P, L, 2, heads, d / heads)``
  and hands layer ``l`` the keys ``[:, l, 0]`` and values ``[:, l, 1]`` as its past key/value cache,
  i.e. column ``(2 l + s) d + j`` is feature ``j`` (head-major, as the projection splits heads) of
  layer ``l``'s key (``s = 0``) or value (``s = 1``). That is jpeft's prefix MLP output order, and
  the per-layer ``prefix`` (or fused ``prefix_key``/``prefix_value``) leaves of P-tuning v2.

Both put the real tokens at positions ``P ..`` (prompt tuning: the model numbers ``[prompt; x]``;
prefix tuning: the cache length ``P`` shifts ``cache_position``), as jpeft's extended call does, so
outputs agree exactly. Rotary models (Llama; tunix's Qwen 3 and Llama 3) are refused for prefixes:
HF PEFT's cache holds keys *after* RoPE (and Qwen 3's ``k_norm``), which the model never rotates,
while jpeft's prefixes are projection outputs that the model rotates at positions ``0 .. P-1``. Encoder-decoders are refused too (HF PEFT's seq2seq layout,
``num_transformer_submodules = 2``, shares one prefix between both stacks).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from jpeft import _tree
from jpeft._errors import JpeftError
from jpeft._tree import RESERVED, Path, PyTree, join
from jpeft.io._hf_peft import _check_profile, adapter
from jpeft.io._hf_peft_files import CONFIG, WEIGHTS, write
from jpeft.methods._prefix import PrefixTuning, PTuningV2, _Site
from jpeft.methods._prompt import VirtualTokens
from jpeft.methods._prompt_tuning import PromptTuning
from jpeft.profiles import LLAMA, TUNIX, Profile

KEY = "prompt_embeddings"


def _check_profile_kind(owner: str, method: VirtualTokens, profile: Profile, what: str) -> None:
    if profile.encoder_prefix is not None:
        raise JpeftError(
            f"{owner}: {type(method).__name__} on the encoder-decoder profile {profile.name!r}; the {what} covers "
            "decoder-only and encoder-only models (HF PEFT's seq2seq layout, num_transformer_submodules=2, has no "
            "jpeft equivalent). Save with jpeft.io.save instead."
        )
    if isinstance(method, PrefixTuning) and any(profile.name == p.name or profile.key == p.key for p in (LLAMA, TUNIX)):
        raise JpeftError(
            f"{owner}: PrefixTuning on the rotary (RoPE) profile {profile.name!r}; HF PEFT's prefixes are cached keys "
            f"after RoPE (and after Qwen 3's k_norm), jpeft's are key projections that the model normalises and "
            f"rotates, so the {what} would change the outputs. Save with jpeft.io.save instead."
        )


def _layers(owner: str, sites: list[_Site]) -> tuple[int, int]:
    """``(L, d)`` of HF PEFT's layout, checking that the sites are L x [key (d), value (d)], unstacked."""
    d = sites[0].features
    pairs = [(a.leaf, b.leaf) for a, b in zip(sites[::2], sites[1::2], strict=False)]
    if (
        len(sites) % 2
        or any(s.stack or s.features != d or len(s.features) != 1 for s in sites)
        or any(p not in (("prefix", "prefix"), ("prefix_key", "prefix_value")) for p in pairs)
    ):
        got = [(join(s.path), s.leaf, s.stack + s.features) for s in sites[:4]]
        raise JpeftError(
            f"{owner}: HF PEFT's prefix layout is, per layer, one key and one value prefix of the same width, "
            f"unstacked; this model's prefix sites are {got}{' ...' if len(sites) > 4 else ''} ({len(sites)} in all). "
            "Stacked (nn.scan) layers, cross-attention and uneven widths have no HF PEFT equivalent; save with "
            "jpeft.io.save instead."
        )
    return len(sites) // 2, d[0]


def export_prompt(
    path: str, method: VirtualTokens, peft_params: PyTree, profile: Any, *, name: str, extra: Mapping[str, Any]
) -> None:
    """Writes a prompt or prefix adapter; see ``jpeft.export_hf``."""
    owner = "jpeft.export_hf"
    _check_profile(owner, profile)
    if profile is not None and method.profile is None:
        method = dataclasses.replace(method, profile=profile)
    if method.extra_trainable is not None:
        raise JpeftError(
            f"{owner}: {type(method).__name__}(extra_trainable={method.extra_trainable!r}) has base leaves that "
            "train; the prompt export writes prompt_embeddings only. Save the whole tree with jpeft.io.save."
        )
    found = method.profile_of(peft_params)
    n = method.num_virtual_tokens
    config = {**extra, "num_virtual_tokens": n, "num_transformer_submodules": 1, "num_attention_heads": None}
    if isinstance(method, PromptTuning):
        _check_profile_kind(owner, method, found, "export")
        site, table = method.embedding_site(peft_params)
        prompt = np.asarray(method.prompt(adapter(owner, peft_params, site, name)))
        # P-tuning's encoder output is its cached prompt: HF PEFT loads it as prompt tuning
        config.update(peft_type="PROMPT_TUNING", token_dim=int(table.shape[1]), num_layers=None)
        config.update(prompt_tuning_init="RANDOM", prompt_tuning_init_text=None, tokenizer_name_or_path=None)
    else:  # PrefixTuning and PTuningV2
        _check_profile_kind(owner, method, found, "export")
        sites = method.prefix_sites(peft_params)
        layers, d = _layers(owner, sites)
        if method.prefix_projection:
            embedding = method.embedding_site(peft_params)[0]
            adapter(owner, peft_params, embedding, name)
            leaves = method.prefixes(peft_params, name)
            blocks = [leaves[s.path][s.leaf] for s in sites]
        else:
            blocks = [adapter(owner, peft_params, s.path, name)[s.leaf] for s in sites]
        prompt = np.concatenate([np.asarray(b) for b in blocks], axis=1)
        config.update(peft_type="PREFIX_TUNING", token_dim=d, num_layers=layers, prefix_projection=False)
        config.update(encoder_hidden_size=d)
    write(path, {KEY: np.ascontiguousarray(prompt)}, config)


def import_prompt(
    path: str, config: Mapping[str, Any], tensors: Mapping[str, np.ndarray], params: PyTree, profile: Any, name: str
) -> tuple[VirtualTokens, PyTree]:
    """Reads a prompt (``PROMPT_TUNING``, ``P_TUNING``) or prefix adapter; see ``jpeft.import_hf``."""
    owner = "jpeft.import_hf"
    file, config_file = os.path.join(path, WEIGHTS), os.path.join(path, CONFIG)
    kind = config["peft_type"]
    if set(tensors) != {KEY}:
        raise JpeftError(
            f"{owner}: {file!r} holds {sorted(tensors)[:4]}; a {kind} adapter holds exactly one tensor, {KEY!r}."
        )
    n = config.get("num_virtual_tokens")
    if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
        raise JpeftError(f"{owner}: {config_file!r} has num_virtual_tokens={n!r}, expected a positive int.")
    if config.get("num_transformer_submodules") not in (None, 1):
        raise JpeftError(
            f"{owner}: {config_file!r} has num_transformer_submodules={config['num_transformer_submodules']!r}, an "
            "encoder-decoder adapter; jpeft reads decoder-only and encoder-only prompt adapters (1)."
        )
    x = tensors[KEY]
    method: VirtualTokens
    if kind == "PREFIX_TUNING":
        method = PTuningV2(num_virtual_tokens=n, profile=profile)
        _check_profile_kind(owner, method, method.profile_of(params), "import")
        sites = method.prefix_sites(params)
        layers, d = _layers(owner, sites)
        want = (n, 2 * layers * d)
        if config.get("num_layers") not in (None, layers):
            raise JpeftError(
                f"{owner}: {config_file!r} has num_layers={config['num_layers']!r}, but params has {layers} attention "
                f"layers ({join(sites[0].path)!r} ...). The adapter was trained on another model."
            )
    else:
        method = PromptTuning(num_virtual_tokens=n, profile=profile)
        _check_profile_kind(owner, method, method.profile_of(params), "import")
        site, table = method.embedding_site(params)
        want = (n, int(table.shape[1]))
    if tuple(x.shape) != want:
        raise JpeftError(
            f"{owner}: {KEY!r} in {file!r} has shape {tuple(x.shape)} {x.dtype}, but {kind} with num_virtual_tokens={n} "
            f"on this model needs {want}"
            + (f" (P, num_layers * 2 * token_dim) with {layers} layers of width {d}" if kind == "PREFIX_TUNING" else "")
            + ". The adapter was trained on another model: check params and adapter_config.json."
        )
    out = _tree.as_dicts(params)
    modules = _tree.modules(params)
    leaves: dict[Path, dict[str, Any]] = {}
    if kind == "PREFIX_TUNING":
        for i, s in enumerate(sites):
            dtype = method.delta_dtype(next(iter(modules[s.path].values())).dtype)  # as PTuningV2's init
            leaves.setdefault(s.path, {})[s.leaf] = jnp.asarray(x[:, i * d : (i + 1) * d], dtype)
    else:
        leaves[site] = {"prompt": jnp.asarray(x, method.delta_dtype(table.dtype))}  # as PromptTuning's init
    for target, deltas in leaves.items():
        node = _tree.get(out, target)
        store = node.get(RESERVED, {})
        if name in store:
            raise JpeftError(f"{owner}: adapter {name!r} already exists at {join(target)!r}; pass another name=...")
        node[RESERVED] = {**store, name: deltas}
    return method, out
