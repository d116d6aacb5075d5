"""Tiny Hugging Face Flax models for tests, built offline from configs.

``make(family)`` returns a :class:`HFModel` for one of :data:`FAMILIES`: the task-head model, its
parameters as a plain nested dict, an ``apply`` with :meth:`flax.linen.Module.apply`'s signature
that fills in what the bare Flax module needs, example inputs and a ``logits`` extractor.

The HF wrappers (``model(input_ids)``) compute position ids, masks and decoder inputs for you;
the bare modules do not, so :func:`make` builds them the same way the wrappers do.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import transformers
from transformers.models.bart.modeling_flax_bart import shift_tokens_right
from transformers.models.roberta.modeling_flax_roberta import create_position_ids_from_input_ids

FAMILIES = ("bert", "roberta", "gpt2", "llama", "bart")
BATCH, SEQ, VOCAB, HIDDEN, LAYERS, HEADS, FFN = 2, 8, 100, 32, 2, 4, 64

_ENCODER = dict(
    vocab_size=VOCAB,
    hidden_size=HIDDEN,
    num_hidden_layers=LAYERS,
    num_attention_heads=HEADS,
    intermediate_size=FFN,
    max_position_embeddings=64,
)


@dataclasses.dataclass(frozen=True, kw_only=True)
class HFModel:
    """A tiny HF Flax model and what a test needs to run it.

    Attributes:
      model: the ``transformers`` Flax model object.
      params: its parameters, a plain nested dict of arrays.
      apply: ``apply(variables, **inputs)`` runs ``model.module.apply`` deterministically.
      inputs: example inputs, batch 2 and sequence 8; row 1 has one padded position at the end.
      logits: extracts the main output array from what ``apply`` returns.
    """

    model: Any
    params: dict[str, Any]
    apply: Callable[..., Any]
    inputs: dict[str, jax.Array]
    logits: Callable[[Any], jax.Array]


def _config(family: str) -> tuple[type, Any]:
    if family == "bert":
        return transformers.FlaxBertForSequenceClassification, transformers.BertConfig(**_ENCODER, num_labels=3)
    if family == "roberta":
        config = transformers.RobertaConfig(**_ENCODER, num_labels=3)
        return transformers.FlaxRobertaForSequenceClassification, config
    if family == "gpt2":
        config = transformers.GPT2Config(
            vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_inner=FFN, n_positions=64
        )
        return transformers.FlaxGPT2LMHeadModel, config
    if family == "llama":
        return transformers.FlaxLlamaForCausalLM, transformers.LlamaConfig(**_ENCODER, num_key_value_heads=HEADS)
    if family == "bart":
        config = transformers.BartConfig(
            vocab_size=VOCAB,
            d_model=HIDDEN,
            encoder_layers=LAYERS,
            decoder_layers=LAYERS,
            encoder_attention_heads=HEADS,
            decoder_attention_heads=HEADS,
            encoder_ffn_dim=FFN,
            decoder_ffn_dim=FFN,
            max_position_embeddings=64,
        )
        return transformers.FlaxBartForConditionalGeneration, config
    raise ValueError(f"make(family={family!r}): family must be one of {FAMILIES}; got {family!r}.")


def _inputs(family: str, config: Any) -> dict[str, jax.Array]:
    """The inputs the bare module needs, computed as the HF wrapper's ``__call__`` would."""
    pad = config.pad_token_id if config.pad_token_id is not None else 0
    ids = np.random.RandomState(0).randint(3, VOCAB, (BATCH, SEQ))
    ids[1, -1] = pad
    mask = np.ones((BATCH, SEQ))
    mask[1, -1] = 0
    positions = np.broadcast_to(np.arange(SEQ), (BATCH, SEQ))
    if family == "roberta":
        positions = create_position_ids_from_input_ids(ids, pad)
    inputs = {"input_ids": ids, "attention_mask": mask}
    if family in ("bert", "roberta"):
        inputs["token_type_ids"] = np.zeros((BATCH, SEQ))
    inputs["position_ids"] = positions
    if family == "bart":
        inputs["decoder_input_ids"] = shift_tokens_right(ids, pad, config.decoder_start_token_id)
        inputs["decoder_attention_mask"] = np.ones((BATCH, SEQ))
        inputs["decoder_position_ids"] = positions
    return {k: jnp.asarray(v, jnp.int32) for k, v in inputs.items()}


@functools.cache
def _build(family: str, dtype: Any) -> tuple[Any, dict[str, Any]]:
    cls, config = _config(family)
    with jax.numpy_rank_promotion("allow"):  # HF's init relies on it too; see ``apply`` below.
        model = cls(config, seed=0, dtype=dtype)
    params = jax.tree.map(lambda x: jnp.asarray(x, dtype), flax.core.unfreeze(model.params))
    return model, params


def make(family: str, *, dtype: Any = jnp.float32) -> HFModel:
    """Builds (once per family and dtype) a tiny HF Flax model with a task head.

    BERT and RoBERTa get sequence classification (3 labels), GPT-2 and Llama a causal LM head, and
    BART conditional generation. ``dtype`` is both the computation dtype and the parameter dtype.

    Args:
      family: one of ``'bert'``, ``'roberta'``, ``'gpt2'``, ``'llama'``, ``'bart'``.
      dtype: the dtype of the parameters and of the computation.

    Returns:
      An :class:`HFModel`. Its ``params`` is a fresh dict tree (the arrays are shared).
    """
    model, params = _build(family, jnp.dtype(dtype))
    extra = {"head_mask": None} if family in ("bert", "roberta") else {}

    def apply(variables: Any, **inputs: Any) -> Any:
        # HF's GPT-2, Llama and BART code relies on implicit rank promotion ((B, T, D) + (D,)),
        # which jax_numpy_rank_promotion="raise" refuses. This also allows it in any jpeft code
        # that runs inside the forward pass.
        with jax.numpy_rank_promotion("allow"):
            return model.module.apply(variables, **{"deterministic": True, **extra, **inputs})

    return HFModel(
        model=model,
        params=jax.tree.map(lambda x: x, params),
        apply=apply,
        inputs=_inputs(family, model.config),
        logits=lambda outputs: outputs.logits,
    )
