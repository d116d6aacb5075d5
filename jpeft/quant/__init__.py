"""NF4 quantisation with double quantisation, the storage format of QLoRA."""

from jpeft.quant._nf4 import NF4 as NF4
from jpeft.quant._nf4 import NF4_LEVELS as NF4_LEVELS
from jpeft.quant._nf4 import NF4Array as NF4Array
from jpeft.quant._nf4 import bits_per_param as bits_per_param
from jpeft.quant._nf4 import dequantize as dequantize
from jpeft.quant._nf4 import dequantize_array as dequantize_array
from jpeft.quant._nf4 import nf4_levels as nf4_levels
from jpeft.quant._nf4 import quantize as quantize
from jpeft.quant._nf4 import quantize_array as quantize_array

__all__ = [
    "NF4",
    "NF4_LEVELS",
    "NF4Array",
    "bits_per_param",
    "dequantize",
    "dequantize_array",
    "nf4_levels",
    "quantize",
    "quantize_array",
]
