"""jpeft: parameter-efficient fine-tuning for JAX and Flax, as pure functions on parameter trees."""

from jpeft import models as models
from jpeft import profiles as profiles
from jpeft._core import apply as apply
from jpeft._core import merge as merge
from jpeft._core import regularizer as regularizer
from jpeft._errors import JpeftError as JpeftError
from jpeft._generate import generate as generate
from jpeft._intercept import Linear as Linear
from jpeft._intercept import register_linear as register_linear
from jpeft._layout import Layout as Layout
from jpeft._method import Method as Method
from jpeft._method_dict import method_from_dict as method_from_dict
from jpeft._method_dict import method_to_dict as method_to_dict
from jpeft._named import adapters as adapters
from jpeft._named import add_weighted as add_weighted
from jpeft._named import remove as remove
from jpeft._nnx import Delta as Delta
from jpeft._nnx import DeltaRng as DeltaRng
from jpeft._nnx import FrozenDelta as FrozenDelta
from jpeft._nnx import LoRADelta as LoRADelta
from jpeft._nnx_api import call as call
from jpeft._nnx_api import set_adapter as set_adapter
from jpeft._nnx_linear import einsum_linear as einsum_linear
from jpeft._nnx_train import trainable as trainable
from jpeft._router import Router as Router
from jpeft._router import fit_router as fit_router
from jpeft._router import run_routed as run_routed
from jpeft._sharding import partition_specs as partition_specs
from jpeft._train import check as check
from jpeft._train import combine as combine
from jpeft._train import labels as labels
from jpeft._train import optimizer as optimizer
from jpeft._train import split as split
from jpeft._train import summary as summary
from jpeft._tree import RESERVED as RESERVED
from jpeft._tree import list_paths as list_paths
from jpeft._wrap import wrap as wrap
from jpeft.io._checkpoint import restore as restore
from jpeft.io._checkpoint import save as save
from jpeft.io._hf_peft import export_hf as export_hf
from jpeft.io._hf_peft import import_hf as import_hf
from jpeft.methods._adalora import AdaLoRA as AdaLoRA
from jpeft.methods._adalora import adalora_ranks as adalora_ranks
from jpeft.methods._adapters import HoulsbyAdapter as HoulsbyAdapter
from jpeft.methods._adapters import PfeifferAdapter as PfeifferAdapter
from jpeft.methods._bitfit import BitFit as BitFit
from jpeft.methods._compose import Compose as Compose
from jpeft.methods._compose import compose as compose
from jpeft.methods._diff_pruning import DiffPruning as DiffPruning
from jpeft.methods._dora import DoRA as DoRA
from jpeft.methods._freeze import Freeze as Freeze
from jpeft.methods._freeze import Full as Full
from jpeft.methods._fusion import AdapterFusion as AdapterFusion
from jpeft.methods._ia3 import IA3 as IA3
from jpeft.methods._intrinsic_prompt import IntrinsicProjection as IntrinsicProjection
from jpeft.methods._intrinsic_prompt import IntrinsicPromptTuning as IntrinsicPromptTuning
from jpeft.methods._intrinsic_prompt import fit_intrinsic_projection as fit_intrinsic_projection
from jpeft.methods._lora import LoRA as LoRA
from jpeft.methods._lora import LoRAFA as LoRAFA
from jpeft.methods._lora import LoRAPlus as LoRAPlus
from jpeft.methods._lora_drop import LoRADrop as LoRADrop
from jpeft.methods._lora_drop import lora_drop_importance as lora_drop_importance
from jpeft.methods._lora_drop import lora_drop_select as lora_drop_select
from jpeft.methods._lst import LadderSideTuning as LadderSideTuning
from jpeft.methods._mam import MAM as MAM
from jpeft.methods._parallel import MultiHeadParallelAdapter as MultiHeadParallelAdapter
from jpeft.methods._parallel import ParallelAdapter as ParallelAdapter
from jpeft.methods._parallel import ScaledParallelAdapter as ScaledParallelAdapter
from jpeft.methods._prefix import PrefixTuning as PrefixTuning
from jpeft.methods._prefix import PTuningV2 as PTuningV2
from jpeft.methods._prompt_ensemble import PromptEnsemble as PromptEnsemble
from jpeft.methods._prompt_tuning import PromptTuning as PromptTuning
from jpeft.methods._ptuning import PTuning as PTuning
from jpeft.methods._qlora import QLoRA as QLoRA
from jpeft.methods._unipelt import UniPELT as UniPELT
from jpeft.quant._api import dequantize as dequantize
from jpeft.quant._api import quantize as quantize
from jpeft.quant._base import OnQuantized as OnQuantized
from jpeft.quant._base import on_quantized as on_quantized
from jpeft.quant._int import Int4 as Int4
from jpeft.quant._int import Int8 as Int8
from jpeft.quant._int import IntArray as IntArray
from jpeft.quant._nf4 import NF4 as NF4
from jpeft.quant._nf4 import NF4Array as NF4Array

__version__ = "0.1.0"

__all__ = [
    "UniPELT",
    "MAM",
    "AdapterFusion",
    "export_hf",
    "import_hf",
    "models",
    "NF4",
    "NF4Array",
    "Int8",
    "Int4",
    "IntArray",
    "OnQuantized",
    "on_quantized",
    "QLoRA",
    "dequantize",
    "quantize",
    "RESERVED",
    "BitFit",
    "DiffPruning",
    "Freeze",
    "Full",
    "IA3",
    "IntrinsicProjection",
    "IntrinsicPromptTuning",
    "fit_intrinsic_projection",
    "HoulsbyAdapter",
    "MultiHeadParallelAdapter",
    "ParallelAdapter",
    "PfeifferAdapter",
    "ScaledParallelAdapter",
    "AdaLoRA",
    "Compose",
    "Delta",
    "DeltaRng",
    "DoRA",
    "FrozenDelta",
    "JpeftError",
    "LadderSideTuning",
    "Layout",
    "Linear",
    "LoRA",
    "LoRADelta",
    "LoRAFA",
    "LoRAPlus",
    "LoRADrop",
    "PrefixTuning",
    "PromptEnsemble",
    "PromptTuning",
    "PTuning",
    "PTuningV2",
    "generate",
    "Method",
    "method_from_dict",
    "method_to_dict",
    "adapters",
    "compose",
    "add_weighted",
    "adalora_ranks",
    "apply",
    "call",
    "einsum_linear",
    "check",
    "combine",
    "labels",
    "list_paths",
    "lora_drop_importance",
    "lora_drop_select",
    "merge",
    "optimizer",
    "partition_specs",
    "profiles",
    "register_linear",
    "regularizer",
    "restore",
    "set_adapter",
    "save",
    "remove",
    "split",
    "summary",
    "trainable",
    "wrap",
    "Router",
    "fit_router",
    "run_routed",
]
