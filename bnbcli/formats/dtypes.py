"""The dtypes bitsandbytes quantizes, and how bnb spells a dtype.

The safetensors names of dtypes ("BF16") belong to the container: ``checkpoint/safetensors_file.py``.
A dtype's size in bytes is torch's own ``dtype.itemsize``.
"""

from __future__ import annotations

import torch

# bitsandbytes' 4-bit kernels read fp16/bf16/fp32 and Linear4bit computes in one of them
# (`_ops.py` dequantize_4bit checks `dtype in (float16, bfloat16, float32)`); int8 quantizes the same.
FLOAT_DTYPES: tuple[torch.dtype, ...] = (torch.float16, torch.bfloat16, torch.float32)


def dtype_name(dtype: torch.dtype) -> str:
    """'bfloat16' for torch.bfloat16: the spelling of config.json, a quant_state's JSON and bnb's reports."""
    return str(dtype).removeprefix("torch.")
