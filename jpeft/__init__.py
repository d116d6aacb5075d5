"""jpeft: parameter-efficient fine-tuning for JAX and Flax, as pure functions on parameter trees."""

from jpeft import profiles as profiles
from jpeft._core import apply as apply
from jpeft._core import combine as combine
from jpeft._core import labels as labels
from jpeft._core import merge as merge
from jpeft._core import optimizer as optimizer
from jpeft._core import regularizer as regularizer
from jpeft._core import split as split
from jpeft._core import summary as summary
from jpeft._core import wrap as wrap
from jpeft._errors import JpeftError as JpeftError
from jpeft._intercept import Linear as Linear
from jpeft._intercept import register_linear as register_linear
from jpeft._layout import Layout as Layout
from jpeft._method import Method as Method
from jpeft._tree import RESERVED as RESERVED
from jpeft._tree import list_paths as list_paths
from jpeft.methods._lora import DoRA as DoRA
from jpeft.methods._lora import LoRA as LoRA
from jpeft.methods._lora import LoRAFA as LoRAFA
from jpeft.methods._lora import LoRAPlus as LoRAPlus

__version__ = "0.1.0"

__all__ = [
    "RESERVED",
    "DoRA",
    "JpeftError",
    "Layout",
    "Linear",
    "LoRA",
    "LoRAFA",
    "LoRAPlus",
    "Method",
    "apply",
    "combine",
    "labels",
    "list_paths",
    "merge",
    "optimizer",
    "profiles",
    "register_linear",
    "regularizer",
    "split",
    "summary",
    "wrap",
]
