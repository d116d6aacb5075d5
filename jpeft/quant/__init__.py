"""Quantised bases: NF4 (QLoRA's format), INT8 and INT4, and any method on them (``on_quantized``)."""

from jpeft.quant._api import dequantize as dequantize
from jpeft.quant._api import quantize as quantize
from jpeft.quant._base import OnQuantized as OnQuantized
from jpeft.quant._base import merge_requantized as merge_requantized
from jpeft.quant._base import on_quantized as on_quantized
from jpeft.quant._int import Int4 as Int4
from jpeft.quant._int import Int8 as Int8
from jpeft.quant._int import IntArray as IntArray
from jpeft.quant._int import IntFormat as IntFormat
from jpeft.quant._int import dequantize_array as int_dequantize_array
from jpeft.quant._int import is_quantized as is_quantized
from jpeft.quant._int import quantize_array as int_quantize_array
from jpeft.quant._nf4 import NF4 as NF4
from jpeft.quant._nf4 import NF4_LEVELS as NF4_LEVELS
from jpeft.quant._nf4 import NF4Array as NF4Array
from jpeft.quant._nf4 import bits_per_param as bits_per_param
from jpeft.quant._nf4 import dequantize_array as dequantize_array
from jpeft.quant._nf4 import nf4_levels as nf4_levels
from jpeft.quant._nf4 import quantize_array as quantize_array

__all__ = [
    "Int4",
    "Int8",
    "IntArray",
    "IntFormat",
    "NF4",
    "NF4_LEVELS",
    "NF4Array",
    "OnQuantized",
    "bits_per_param",
    "dequantize",
    "dequantize_array",
    "int_dequantize_array",
    "int_quantize_array",
    "is_quantized",
    "merge_requantized",
    "nf4_levels",
    "on_quantized",
    "quantize",
    "quantize_array",
]
