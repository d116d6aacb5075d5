"""The ``adapter_config.json`` fields of HF PEFT 0.21.2, and what ``jpeft.import_hf`` does with each.

HF PEFT's ``PeftConfig.from_pretrained`` ignores a field its config class lacks, with a warning
("Unexpected keyword arguments ... these are ignored"), so that configs saved by a newer PEFT load.
jpeft matches that for values that mean "off" (``null``, ``false``, ``{}``, ``[]``, ``""``: a newer
PEFT's option left unset; old PEFT's ``enable_lora: null``, ``merge_weights: false``), and refuses
any other value of a field it does not know: it cannot tell a newer option that changes the adapter
from a harmless one, nor a typo (``"lora_aplha": 16``, which PEFT would replace by the default 8)
from either. A field PEFT knows but jpeft cannot honour (``layer_replication``, ``use_qalora``,
``lora_bias``, activated LoRA's ``alora_invocation_tokens``, ...) must hold its off value
(:data:`OFF`). Fields that only say how PEFT initialised or where the base lives are read as is.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from typing import Any

from jpeft._errors import JpeftError

_COMMON = ("task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision")
_COMMON += ("inference_mode", "modules_to_save")
_PROMPT = ("num_virtual_tokens", "token_dim", "num_transformer_submodules", "num_attention_heads", "num_layers")

KNOWN = {
    "LORA": _COMMON
    + ("r", "target_modules", "exclude_modules", "lora_alpha", "lora_dropout", "fan_in_fan_out", "bias")
    + ("use_rslora", "init_lora_weights", "layers_to_transform", "layers_pattern", "rank_pattern")
    + ("alpha_pattern", "megatron_config", "megatron_core", "trainable_token_indices", "loftq_config")
    + ("eva_config", "corda_config", "lora_ga_config", "use_dora", "velora_config", "alora_invocation_tokens")
    + ("use_qalora", "qalora_group_size", "monteclora_config", "layer_replication", "runtime_config", "lora_bias")
    + ("target_parameters", "use_bdlora", "arrow_config", "kasa_config", "ensure_weight_tying"),
    "IA3": _COMMON + ("target_modules", "exclude_modules", "feedforward_modules", "fan_in_fan_out", "init_ia3_weights"),
    "PROMPT_TUNING": _COMMON
    + _PROMPT
    + ("prompt_tuning_init", "prompt_tuning_init_text", "tokenizer_name_or_path", "tokenizer_kwargs"),
    "PREFIX_TUNING": _COMMON + _PROMPT + ("init_weights", "encoder_hidden_size", "prefix_projection"),
    "P_TUNING": _COMMON
    + _PROMPT
    + ("encoder_reparameterization_type", "encoder_hidden_size", "encoder_num_layers", "encoder_dropout"),
}
"""Every field of HF PEFT 0.21.2's config class for each ``peft_type`` jpeft reads."""

OFF = {
    "LORA": {
        "bias": "none",
        "rank_pattern": {},
        "alpha_pattern": {},
        "layer_replication": None,
        "use_qalora": False,
        "lora_bias": False,
        "alora_invocation_tokens": None,
        "target_parameters": None,
        "trainable_token_indices": None,
        "use_bdlora": None,
        "arrow_config": None,
        "kasa_config": None,
        "monteclora_config": None,
    },
}
"""Fields HF PEFT knows that change what the adapter computes, which ``jpeft.LoRA`` has no equivalent
for: each must be absent, ``null`` or empty, or hold this value."""


def _is_off(value: Any) -> bool:
    return value is None or value is False or (isinstance(value, (dict, list, str)) and not value)


def check_fields(owner: str, file: str, config: Mapping[str, Any]) -> None:
    """Refuses fields HF PEFT 0.21.2 does not know (unless off) and options jpeft cannot honour.

    Example:
      >>> check_fields("demo", "adapter_config.json", {"peft_type": "LORA", "r": 8, "future_option": None})
      >>> check_fields("demo", "adapter_config.json", {"peft_type": "LORA", "lora_aplha": 16})
      Traceback (most recent call last):
      ...
      jpeft._errors.JpeftError: demo: 'adapter_config.json' has lora_aplha=16, a field HF PEFT 0.21.2's LORA config does not have (did you mean 'lora_alpha'?). HF PEFT ignores it with a warning; jpeft cannot tell a typo or a newer PEFT option that changes the adapter from a harmless field, so it refuses it. Fix the name, or delete the field if it is harmless.
    """
    kind = config.get("peft_type")
    known = KNOWN.get(kind, ())
    for field, value in config.items():
        if field in known or _is_off(value):
            continue
        near = difflib.get_close_matches(field, known, n=1, cutoff=0.75)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        raise JpeftError(
            f"{owner}: {file!r} has {field}={value!r}, a field HF PEFT 0.21.2's {kind} config does not have{hint}. "
            "HF PEFT ignores it with a warning; jpeft cannot tell a typo or a newer PEFT option that changes the "
            "adapter from a harmless field, so it refuses it. Fix the name, or delete the field if it is harmless."
        )
    for field, default in OFF.get(kind, {}).items():
        got = config.get(field, default)
        if got != default and not _is_off(got):
            raise JpeftError(
                f"{owner}: {file!r} has {field}={got!r}; jpeft.LoRA has no equivalent (expected {default!r}). "
                "Re-save the adapter without it."
            )
