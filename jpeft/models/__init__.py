"""Model loading: Hugging Face PyTorch-format checkpoints into ``transformers`` Flax models, without torch."""

from jpeft.models._safetensors import FAMILIES as FAMILIES
from jpeft.models._safetensors import convert as convert
from jpeft.models._safetensors import load_hf_safetensors as load_hf_safetensors

__all__ = ["FAMILIES", "convert", "load_hf_safetensors"]
