"""Model loading: Hugging Face PyTorch-format checkpoints into ``transformers`` Flax models, without torch;
SmolLM2-135M-Instruct (a GGUF file) into an NNX Llama decoder."""

from jpeft.models._safetensors import FAMILIES as FAMILIES
from jpeft.models._safetensors import convert as convert
from jpeft.models._safetensors import load_hf_safetensors as load_hf_safetensors
from jpeft.models._smollm import smollm2 as smollm2

__all__ = ["FAMILIES", "convert", "load_hf_safetensors", "smollm2"]
