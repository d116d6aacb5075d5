"""Prompt tuning: ``P`` trainable input embeddings in front of the token embeddings.

The extend-and-overwrite machinery (``VirtualTokens``) is in ``_prompt.py``; P-tuning, which
computes the prompt with an encoder, is in ``_ptuning.py``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jpeft import _errors
from jpeft._errors import JpeftError
from jpeft._method import Context
from jpeft._tree import Path, PyTree, join
from jpeft.methods._prompt import _WRITE, VirtualTokens, _uniform, overwrite


@dataclasses.dataclass(frozen=True, kw_only=True)
class PromptTuning(VirtualTokens):
    """Prompt tuning: ``P`` trainable input embeddings in front of the token embeddings.

    ``X' = [prompt; E(x)]`` with ``prompt: (P, d)``, stored at ``<embedding>/__jpeft__/<name>/prompt``.
    The model, including the embedding table, stays frozen. Trainable parameters: ``P d``. Not
    identity at init and not mergeable (``jpeft.merge`` raises): keep ``jpeft.wrap`` for inference.
    On an encoder-decoder (BART) the prompt goes in front of the encoder input only, as HF PEFT
    does for seq2seq models; the decoder's inputs and outputs keep their length.

    Args:
      num_virtual_tokens: P.
      init: ``"random"`` (uniform in ``±0.5``, as in the paper), ``"vocab"`` (rows of the embedding
        table at uniformly sampled token ids) or ``"text"`` (the embeddings of ``init_ids``, repeated
        or truncated to P, as HF PEFT's TEXT init).
      init_ids: token ids for ``init="text"``.
      init_text: text for ``init="text"``, tokenised once by ``tokenizer`` when ``init_ids`` is None.
      tokenizer: ``tokenizer(text) -> ids`` (a list of ints, or a mapping with ``'input_ids'`` as HF
        tokenizers return). It is used in the constructor and not kept, so the method stays hashable
        and serialisable.
      profile: the architecture profile; ``None`` detects one.
      dtype: dtype of the prompt; by default the embedding table's, promoted to at least float32.
      extra_trainable: regex over base leaf paths that train fully (e.g. a classifier head).

    Raises:
      JpeftError: on ``num_virtual_tokens <= 0``, an unknown ``init``, ``init="text"`` without ids,
        ids outside the vocabulary, a non-float ``dtype``, or a tree whose profile cannot be detected.

    Example:
      >>> import jax, jax.numpy as jnp, jpeft, transformers
      >>> config = transformers.GPT2Config(vocab_size=50, n_embd=16, n_layer=1, n_head=2, n_positions=32)
      >>> with jax.numpy_rank_promotion("allow"):  # HF's Flax code relies on implicit rank promotion
      ...   model = transformers.FlaxGPT2LMHeadModel(config, seed=0)
      >>> method = jpeft.PromptTuning(num_virtual_tokens=4, init="text", init_ids=(5, 6))
      >>> peft = jpeft.apply(method, model.params, key=jax.random.key(0))
      >>> peft["transformer"]["wte"]["__jpeft__"]["default"]["prompt"].shape
      (4, 16)
      >>> ids = jnp.ones((1, 3), jnp.int32)
      >>> with jax.numpy_rank_promotion("allow"):
      ...   out = jpeft.wrap(model.module.apply, method)({"params": peft}, ids, jnp.ones((1, 3)), jnp.arange(3)[None])
      >>> out.logits.shape  # the caller's length, not 4 + 3
      (1, 3, 50)

    References:
      Lester, Al-Rfou and Constant, "The Power of Scale for Parameter-Efficient Prompt Tuning", 2021.
    """

    num_virtual_tokens: int = 20
    init: str = "random"
    init_ids: tuple[int, ...] | None = None
    init_text: str | None = None
    tokenizer: Callable[[str], Any] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        name = self._name()
        _errors.one_of(name, "init", self.init, ("random", "vocab", "text"))
        ids = self.init_ids
        if ids is None and self.init_text is not None:
            if self.tokenizer is None:
                raise JpeftError(
                    f"{name}(init_text={self.init_text!r}): init_text needs tokenizer=..., a callable "
                    "text -> token ids (e.g. an HF tokenizer), or pass init_ids=... instead."
                )
            ids = self.tokenizer(self.init_text)
            ids = ids["input_ids"] if isinstance(ids, Mapping) else ids
        if ids is not None:
            try:
                ids = tuple(int(i) for i in ids)
            except (TypeError, ValueError):
                raise JpeftError(f"{name}(init_ids={ids!r}): init_ids must be a sequence of int token ids.") from None
            if not ids:
                raise JpeftError(f"{name}(init_ids=()): init_ids must hold at least one token id.")
        if self.init == "text" and ids is None:
            raise JpeftError(
                f"{name}(init='text'): pass init_ids=(...) (token ids), or init_text='...' with tokenizer=..."
            )
        object.__setattr__(self, "init_ids", ids)
        object.__setattr__(self, "tokenizer", None)

    def select(self, params: PyTree) -> list[Path]:
        return [self.embedding_site(params)[0]]

    def init_module(self, key: jax.Array, path: Path, own: Mapping[str, Any], ctx: Context) -> dict[str, jax.Array]:
        table = own["embedding"]
        vocab, d = table.shape
        n, dtype = self.num_virtual_tokens, self.delta_dtype(table.dtype)
        if self.init == "random":
            return {"prompt": _uniform(key, (n, d), 0.5, dtype)}
        if self.init == "vocab":
            return {"prompt": jnp.take(table, jax.random.randint(key, (n,), 0, vocab), axis=0).astype(dtype)}
        ids = (self.init_ids * math.ceil(n / len(self.init_ids)))[:n]
        bad = [i for i in ids if not 0 <= i < vocab]
        if bad:
            raise JpeftError(
                f"{self._name()}(init_ids=...): ids {bad} are outside the vocabulary of {join(path)}/embedding "
                f"(shape {tuple(table.shape)}); expected 0 <= id < {vocab}."
            )
        return {"prompt": jnp.take(table, jnp.asarray(ids, jnp.int32), axis=0).astype(dtype)}

    def param_count(self, params: PyTree) -> int:
        return self.num_virtual_tokens * int(self.embedding_site(params)[1].shape[1])

    def prompt(self, deltas: Any) -> jax.Array:
        """The ``(P, d)`` virtual token embeddings of one adapter's delta leaves."""
        return deltas["prompt"]

    def forward(self, module: nn.Module, next_fun: Any, args: tuple, kwargs: dict, deltas: Any) -> Any:
        y = next_fun(*args, **kwargs)
        n = _WRITE.get()
        return y if n is None else overwrite(y, self.prompt(deltas), n)
