r"""The profiles of the reference families, and :func:`detect`, which picks one for a tree.

The paths are those of ``transformers``' Flax models (4.57), bare or under a task head, and of
tunix's NNX decoders (Qwen 3 and Llama 3; Gemma 3) as ``jpeft._nnx.tree`` shows them.

Example:
    >>> from jpeft import profiles
    >>> [p.name for p in profiles.ALL]
    ['bert', 'roberta', 'gpt2', 'llama', 'bart', 'tunix', 'tunix_gemma3']
    >>> profiles.BART.inputs[:4]
    ('input_ids', 'attention_mask', 'decoder_input_ids', 'decoder_attention_mask')
"""

from __future__ import annotations

import dataclasses
import re

from jpeft.profiles._profile import Profile, ProfileError, PyTree, TiedHead, leaf_paths

BERT = Profile(
    name="bert",
    detect=r"(?!(.*/)?roberta/)(.*/)?encoder/layer/\d+/attention/self/query/kernel",
    lora_default=("query", "value"),
    embedding=r"(.*/)?embeddings/word_embeddings",
    query=r"(.*/)?encoder/layer/\d+/attention/self/query",
    key=r"(.*/)?encoder/layer/\d+/attention/self/key",
    value=r"(.*/)?encoder/layer/\d+/attention/self/value",
    attn_out=r"(.*/)?encoder/layer/\d+/attention/output/dense",
    ffn_in=r"(.*/)?encoder/layer/\d+/intermediate/dense",
    ffn_out=r"(.*/)?encoder/layer/\d+/output/dense",
    layer_pattern=r"(?:^|/)encoder/layer/(\d+)(?=/|$)",
    inputs=("input_ids", "attention_mask", "token_type_ids", "position_ids"),
    # FlaxBertForMaskedLM / ForPreTraining / ForCausalLM: cls/predictions reads the word embedding.
    tied_heads=(
        TiedHead(
            embedding=r"(?P<root>(?:.*/)?)bert/embeddings/word_embeddings/embedding",
            head="cls/predictions/decoder/kernel",
            keys=("bert", "cls"),
        ),
    ),
)
"""BERT (``FlaxBertModel`` and its task heads). It also claims a *bare* ``FlaxRobertaModel``,
whose tree is indistinguishable from BERT's; every site is the same."""

ROBERTA = dataclasses.replace(
    BERT,
    name="roberta",
    detect=r"(.*/)?roberta/encoder/layer/\d+/attention/self/query/kernel",
    # FlaxRobertaForMaskedLM / ForCausalLM: lm_head reads the word embedding.
    tied_heads=(
        TiedHead(
            embedding=r"(?P<root>(?:.*/)?)roberta/embeddings/word_embeddings/embedding",
            head="lm_head/decoder/kernel",
            keys=("lm_head", "roberta"),
        ),
    ),
)
"""RoBERTa under a task head (its tree nests ``roberta/``). Its position ids start at
``pad_token_id + 1`` and skip padding: extended inputs need position ids computed the same way."""

GPT2 = Profile(
    name="gpt2",
    detect=r"(.*/)?h/\d+/attn/c_attn/kernel",
    lora_default=("c_attn",),
    layouts=((r"(.*/)?h/\d+/(attn/c_attn|attn/c_proj|mlp/c_fc|mlp/c_proj)", "transposed"),),
    embedding=r"(.*/)?wte",
    query=r"(.*/)?h/\d+/attn/c_attn",
    key=r"(.*/)?h/\d+/attn/c_attn",
    value=r"(.*/)?h/\d+/attn/c_attn",
    qkv_fused=r"(.*/)?h/\d+/attn/c_attn",
    attn_out=r"(.*/)?h/\d+/attn/c_proj",
    ffn_in=r"(.*/)?h/\d+/mlp/c_fc",
    ffn_out=r"(.*/)?h/\d+/mlp/c_proj",
    layer_pattern=r"(?:^|/)h/(\d+)(?=/|$)",
    inputs=("input_ids", "attention_mask", "position_ids"),
    # FlaxGPT2LMHeadModel with tie_word_embeddings (the default): its tree is only 'transformer'.
    tied_heads=(
        TiedHead(
            embedding=r"(?P<root>(?:.*/)?)transformer/wte/embedding", head="lm_head/kernel", keys=("transformer",)
        ),
    ),
)
"""GPT-2. Its ``FlaxConv1D`` kernels are ``(out, in)``; ``c_attn`` is ``(3 * hidden, hidden)``."""

LLAMA = Profile(
    name="llama",
    detect=r"(.*/)?layers/\d+/self_attn/o_proj/kernel",
    lora_default=("q_proj", "v_proj"),
    embedding=r"(.*/)?embed_tokens",
    query=r"(.*/)?layers/\d+/self_attn/q_proj",
    key=r"(.*/)?layers/\d+/self_attn/k_proj",
    value=r"(.*/)?layers/\d+/self_attn/v_proj",
    attn_out=r"(.*/)?layers/\d+/self_attn/o_proj",
    ffn_in=r"(.*/)?layers/\d+/mlp/(gate_proj|up_proj)",
    ffn_out=r"(.*/)?layers/\d+/mlp/down_proj",
    layer_pattern=r"(?:^|/)layers/(\d+)(?=/|$)",
    inputs=("input_ids", "attention_mask", "position_ids"),
)
"""Llama-style decoders (gated FFN). With grouped-query attention, ``k_proj`` and ``v_proj``
output ``num_key_value_heads * head_dim`` features, fewer than ``q_proj``. ``FlaxLlamaForCausalLM``
always applies its own ``lm_head`` kernel, even with ``tie_word_embeddings``, so it has no tied head."""

BART = Profile(
    name="bart",
    detect=r"(.*/)?decoder/layers/\d+/encoder_attn/k_proj/kernel",
    lora_default=("q_proj", "v_proj"),
    embedding=r"(.*/)?shared",
    query=r"(.*/)?layers/\d+/self_attn/q_proj",
    key=r"(.*/)?layers/\d+/self_attn/k_proj",
    value=r"(.*/)?layers/\d+/self_attn/v_proj",
    attn_out=r"(.*/)?layers/\d+/self_attn/out_proj",
    ffn_in=r"(.*/)?layers/\d+/fc1",
    ffn_out=r"(.*/)?layers/\d+/fc2",
    layer_pattern=r"(?:^|/)layers/(\d+)(?=/|$)",
    encoder_prefix=r"(.*/)?encoder",
    decoder_prefix=r"(.*/)?decoder",
    cross_attention=r"(.*/)?decoder/layers/\d+/encoder_attn",
    inputs=(
        "input_ids",
        "attention_mask",
        "decoder_input_ids",
        "decoder_attention_mask",
        "position_ids",
        "decoder_position_ids",
    ),
    # FlaxBartForConditionalGeneration (and FlaxBartForCausalLM) with tie_word_embeddings (the default).
    tied_heads=(
        TiedHead(
            embedding=r"(?P<root>(?:.*/)?)model/shared/embedding",
            head="lm_head/kernel",
            keys=("final_logits_bias", "model"),
        ),
        TiedHead(
            embedding=r"(?P<root>(?:.*/)?)model/decoder/embed_tokens/embedding", head="lm_head/kernel", keys=("model",)
        ),
    ),
)
"""BART encoder-decoders. The ``shared`` embedding embeds both the encoder's and the decoder's
tokens, so its site fires twice per forward pass."""

TUNIX = Profile(
    name="tunix",
    detect=r"(.*/)?layers/\d+/attn/o_proj/kernel",
    lora_default=("q_proj", "v_proj"),
    embedding=r"(.*/)?embedder",
    query=r"(.*/)?layers/\d+/attn/q_proj",
    key=r"(.*/)?layers/\d+/attn/k_proj",
    value=r"(.*/)?layers/\d+/attn/v_proj",
    attn_out=r"(.*/)?layers/\d+/attn/o_proj",
    ffn_in=r"(.*/)?layers/\d+/mlp/(gate_proj|up_proj)",
    ffn_out=r"(.*/)?layers/\d+/mlp/down_proj",
    layer_pattern=r"(?:^|/)layers/(\d+)(?=/|$)",
    inputs=("input_tokens", "positions", "cache", "attention_mask"),
    layouts=(  # the einsum weights, for code that reads the tree alone (prefix sites); NNX reads the modules
        (r"(.*/)?layers/\d+/attn/(q_proj|k_proj|v_proj)", "dense_general:1,2"),
        (r"(.*/)?layers/\d+/attn/o_proj", "dense_general:2,1"),
    ),
    hf_names=(
        ("layers/{i}/attn/{m}", "model.layers.{i}.self_attn.{m}"),
        ("layers/{i}/mlp/{m}", "model.layers.{i}.mlp.{m}"),
        ("embedder", "model.embed_tokens"),
        ("lm_head", "lm_head"),
    ),
)
"""tunix's NNX decoders, ``tunix.models.qwen3.model.Qwen3`` and ``tunix.models.llama3.model.Llama3``
(their module paths are the same; Qwen 3 adds ``attn/q_norm`` and ``attn/k_norm``). The attention
projections are tunix ``Einsum`` modules, ``w: (D, N, H)`` for q, ``(D, K, H)`` for k and v and
``(N, H, D)`` for o, so LoRA's A takes the contracted axes and B the output axes (``q_proj``'s B is
``(r, N, H)``); the MLP is ``nnx.Linear``. ``hf_names`` maps them to the torch ``Qwen3ForCausalLM``
/ ``LlamaForCausalLM`` names, so HF PEFT LoRA adapters import and export. With tied embeddings
(``use_tied_embedding`` / ``weight_tying``) there is no ``lm_head`` module."""

TUNIX_GEMMA3 = Profile(
    name="tunix_gemma3",
    detect=r"(.*/)?layers/\d+/attn/attn_vec_einsum/kernel",
    lora_default=("q_einsum", "kv_einsum"),
    layouts=((r"(.*/)?layers/\d+/attn/attn_vec_einsum", "dense_general:2,1"),),
    embedding=r"(.*/)?embedder",
    query=r"(.*/)?layers/\d+/attn/(q_einsum|qkv_einsum)",
    key=r"(.*/)?layers/\d+/attn/(kv_einsum|qkv_einsum)",
    value=r"(.*/)?layers/\d+/attn/(kv_einsum|qkv_einsum)",
    attn_out=r"(.*/)?layers/\d+/attn/attn_vec_einsum",
    ffn_in=r"(.*/)?layers/\d+/mlp/(gate_proj|up_proj)",
    ffn_out=r"(.*/)?layers/\d+/mlp/down_proj",
    layer_pattern=r"(?:^|/)layers/(\d+)(?=/|$)",
    inputs=("last_tokens", "positions", "cache", "attention_mask"),
    hf_names=(
        ("layers/{i}/attn/q_einsum", "model.layers.{i}.self_attn.q_proj"),
        ("layers/{i}/attn/kv_einsum[0]", "model.layers.{i}.self_attn.k_proj"),
        ("layers/{i}/attn/kv_einsum[1]", "model.layers.{i}.self_attn.v_proj"),
        ("layers/{i}/attn/qkv_einsum[0]", "model.layers.{i}.self_attn.q_proj"),
        ("layers/{i}/attn/qkv_einsum[1]", "model.layers.{i}.self_attn.k_proj"),
        ("layers/{i}/attn/qkv_einsum[2]", "model.layers.{i}.self_attn.v_proj"),
        ("layers/{i}/attn/attn_vec_einsum", "model.layers.{i}.self_attn.o_proj"),
        ("layers/{i}/mlp/{m}", "model.layers.{i}.mlp.{m}"),
        ("embedder", "model.embed_tokens"),
    ),
)
"""tunix's NNX Gemma 3 decoder, ``tunix.models.gemma3.model.Gemma3`` (text only). Its attention
einsums keep their axes in their own order: ``attn/q_einsum`` ``w: (N, D, H)`` (``'BTD,NDH->BTNH'``),
``attn/kv_einsum`` stacking key and value, ``w: (2, K, D, H)`` with an output ``(2, B, T, K, H)``,
with as many key-value heads as query heads a single ``attn/qkv_einsum`` ``w: (3, N, D, H)``, and
``attn/attn_vec_einsum`` ``w: (N, H, D)`` (torch's ``o_proj``). LoRA's A takes the contracted axis
``D`` and B the others in the weight's order (``kv_einsum``: ``A: (D, r)``, ``B: (r, 2, K, H)``), so
one LoRA on ``kv_einsum`` adapts key and value with a shared A. The gated MLP is ``nnx.Linear``
(``gate_proj``, ``up_proj``, ``down_proj``). ``lora_default`` is ``q_einsum`` and ``kv_einsum``, the
nearest to HF PEFT's ``q_proj``, ``v_proj`` (every released Gemma 3 has fewer key-value heads than
query heads; with as many, target ``qkv_einsum``). ``hf_names`` map ``kv_einsum[0]`` / ``[1]`` to
torch's ``k_proj`` / ``v_proj`` (``qkv_einsum[j]``: ``q_proj``, ``k_proj``, ``v_proj``): exported,
a stacked LoRA is one torch LoRA per slice with the same A; imported, torch LoRAs of n slices of
one weight become rank ``n r`` (block-diagonal, alpha scaled to keep the scale), exact for LoRA,
rsLoRA and DoRA. (IA)^3 files on the stacked weights and prefix tuning (stacked key-value output)
are refused. The embeddings are always tied (no ``lm_head``)."""

ALL = (BERT, ROBERTA, GPT2, LLAMA, BART, TUNIX, TUNIX_GEMMA3)
"""The shipped profiles, in the order :func:`detect` tries them."""


def matching(params: PyTree) -> tuple[Profile, ...]:
    """Returns every shipped profile whose ``detect`` regex matches a leaf path of ``params``.

    A tree can hold several families (say, a BERT encoder beside a GPT-2 decoder).

    Example:
        >>> import numpy as np
        >>> from jpeft import profiles
        >>> [p.name for p in profiles.matching({"h": {"0": {"attn": {"c_attn": {"kernel": np.zeros(1)}}}}})]
        ['gpt2']
    """
    paths = leaf_paths(params)
    return tuple(p for p in ALL if any(re.fullmatch(p.detect, path) for path in paths))


def tied_embeddings(params: PyTree) -> tuple[str, ...]:
    """Returns the leaf paths of token embeddings that an output head of ``params`` reads directly.

    The head of such a model (``FlaxGPT2LMHeadModel``, ``FlaxBartForConditionalGeneration``,
    ``FlaxBertForMaskedLM``, ... with ``tie_word_embeddings``) multiplies by the embedding leaf
    without calling the embedding module. ``jpeft.wrap`` therefore adapts only the input lookup, as
    HF PEFT does, and ``jpeft.merge`` refuses to fold a delta into these leaves. A tree that holds the
    head's own kernel (``lm_head/kernel``) is untied.

    Example:
        >>> import numpy as np
        >>> from jpeft import profiles
        >>> lm = {"transformer": {"wte": {"embedding": np.zeros((10, 4))},
        ...                       "h": {"0": {"attn": {"c_attn": {"kernel": np.zeros((12, 4))}}}}}}
        >>> profiles.tied_embeddings(lm)
        ('transformer/wte/embedding',)
        >>> profiles.tied_embeddings({**lm, "lm_head": {"kernel": np.zeros((4, 10))}})
        ()
    """
    return tuple(tied_heads(params))


def tied_heads(params: PyTree) -> dict[str, str]:
    """``{embedding leaf path: the head kernel path that would untie it}`` for :func:`tied_embeddings`."""
    out: dict[str, str] = {}
    for profile in matching(params):
        for tie in profile.tied_heads:
            for path in tie.tied(params):
                out.setdefault(path, re.fullmatch(tie.embedding, path).group("root") + tie.head)
    return out


def detect(params: PyTree, *, strict: bool = True) -> Profile | None:
    """Returns the shipped profile whose ``detect`` regex matches a leaf path of ``params``.

    Args:
      params: a nested mapping of arrays (dict or ``FrozenDict``), such as a Flax ``params``
        collection, bare or under a task head.
      strict: whether to raise when no family matches; otherwise return ``None``.

    Returns:
      The profile of the one family that matches, or ``None`` when none does and not ``strict``.

    Raises:
      ProfileError: if no family matches and ``strict``, or if several do.

    Example:
        >>> import numpy as np
        >>> from jpeft import profiles
        >>> params = {"transformer": {"h": {"0": {"attn": {"c_attn": {"kernel": np.zeros((96, 32))}}}}}}
        >>> profiles.detect(params).name
        'gpt2'
        >>> print(profiles.detect({"dense": {"kernel": 0}}, strict=False))
        None
    """
    found = matching(params)
    if len(found) > 1:
        raise ProfileError(
            f"jpeft.profiles.detect: the tree matches several families, {[p.name for p in found]}. "
            "Pass the profile you mean explicitly."
        )
    if not found and strict:
        paths = leaf_paths(params)
        raise ProfileError(
            f"jpeft.profiles.detect: no known architecture matches the {len(paths)} parameter paths, "
            f"such as {', '.join(repr(p) for p in paths[:3])}.\n"
            f"Known families: {', '.join(p.name for p in ALL)}. For another family, write a "
            "jpeft.profiles.Profile of your own and pass it explicitly."
        )
    return found[0] if found else None
