"""Tied embeddings in ``jpeft.merge``.

An output head tied to the token embedding (``FlaxGPT2LMHeadModel``, ``FlaxBartForConditionalGeneration``,
``FlaxBertForMaskedLM``, ...) multiplies by the embedding *leaf*; it never calls the embedding module. Under
``jpeft.wrap`` a delta at the embedding therefore adapts only the input lookup, which is HF PEFT's semantics.
Folding that delta into the leaf would change the head as well, so ``merge`` refuses, as HF PEFT warns.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from jpeft._errors import JpeftError
from jpeft._method import Context, Method
from jpeft._tree import Path, join


def merge_module(method: Method, path: Path, own: Mapping[str, Any], deltas: Any, ctx: Context) -> dict[str, Any]:
    """``method.merge_module``, refused when it would change a tied embedding leaf."""
    update = method.merge_module(path, own, deltas, ctx)
    changed = [join(path + (k,)) for k, v in update.items() if v is not own.get(k)]
    if not changed:
        return update
    tied = getattr(ctx, "_jpeft_tied", None)
    if tied is None:  # computed once per merge, and only when a site changes a leaf
        from jpeft.profiles._families import tied_heads

        tied = tied_heads(ctx.params)
        ctx._jpeft_tied = tied
    for leaf in changed:
        if leaf in tied:
            raise JpeftError(
                f"jpeft.merge({type(method).__name__}): {leaf!r} is a tied embedding: the model's output head "
                "reads this leaf directly, so folding the delta into it would change the output head too, while "
                "jpeft.wrap (like HF PEFT) adapts only the input lookup. Keep jpeft.wrap(apply_fn, method) for "
                "inference, or untie the head: build the model with tie_word_embeddings=False and add "
                f"{tied[leaf]!r} (the embedding, transposed) to the params before jpeft.merge; or exclude the "
                "embedding from targets."
            )
    return update
