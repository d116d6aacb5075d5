"""HF PEFT prompt tuning (and P-tuning's cached prompt) on NNX models; prefix tuning refused on rotary ones.

The file format and its checks are the linen ones (``_hf_peft_prompt.py``), run on the model's
tree view (``jpeft._nnx.tree``: tunix's ``embedder/input_embedding`` is shown as
``embedder/embedding``): ``prompt_embeddings: (P, d)`` is the embedding module's
``__jpeft__/<name>/prompt``. HF PEFT runs the causal LM on ``[prompt; embed(x)]`` with the real
tokens at positions ``P ..``, as jpeft's extended root call does; its logits cover the ``P``
virtual positions too, jpeft's only the caller's.

Prefix tuning (``PREFIX_TUNING``) is refused on tunix's Qwen 3 and Llama 3 as on linen Llama:
HF PEFT's prefixes are the attention cache, keys *after* RoPE (and after Qwen 3's ``k_norm``),
which the model never rotates or normalises, while jpeft's prefixes are ``k_proj`` outputs that
the model normalises and rotates at positions ``0 .. P-1``; loading one as the other changes the
outputs.
"""

from __future__ import annotations

from typing import Any

import jax

from jpeft import _nnx
from jpeft._tree import RESERVED, Path
from jpeft.io._hf_peft_nnx import adapted
from jpeft.io._hf_peft_prompt import export_prompt, import_prompt
from jpeft.methods._prompt import VirtualTokens
from jpeft.profiles import Profile


def import_prompt_nnx(
    path: str, config: dict, tensors: dict, model: Any, profile: Profile | None, name: str
) -> tuple[VirtualTokens, Any]:
    """``jpeft.import_hf`` of a ``PROMPT_TUNING`` / ``P_TUNING`` adapter into an NNX model."""
    import jpeft

    method, tree = import_prompt(path, config, tensors, _nnx.tree(model), profile, name)
    peft = jpeft.apply(method, model, key=jax.random.key(0), name=name)
    for target, store in adapted(peft, name).items():
        for leaf, var in store.items():
            _nnx.write(var, _leaf(tree, target, name, leaf).astype(var.dtype))
    return method, peft


def _leaf(tree: Any, target: Path, name: str, leaf: str) -> Any:
    node = tree
    for k in target + (RESERVED, name, leaf):
        node = node[k]
    return node


def export_prompt_nnx(path: str, method: VirtualTokens, model: Any, profile: Profile, name: str, extra: dict) -> None:
    """``jpeft.export_hf`` of a prompt method of an NNX model (prefix methods refused on rotary models)."""
    export_prompt(path, method, _nnx.tree(model), profile, name=name, extra=extra)
