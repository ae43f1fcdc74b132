"""Code tables and kernel constants, as float32 bit patterns, with where each comes from.

Everything here is what bitsandbytes' CUDA kernels compute with. The kernels spell their thresholds as
decimal literals which nvcc rounds to float32 *once* (decimal -> float32); Python's
``np.float32(float("0.84..."))`` rounds twice and is an ulp off for some of them, so every constant is
kept as its bit pattern and ``tests/unit/test_codes.py`` re-derives the bits from the literals with a
correctly rounded conversion.
"""

from __future__ import annotations

import numpy as np


def _f32(bits: str) -> np.ndarray:
    return np.array([int(b, 16) for b in bits.split()], dtype=np.uint32).view(np.float32)


# NF4 table, index = 4-bit code (bitsandbytes functional.get_4bit_type("nf4"); the same values as the
# CUDA LUT nf4_dequantization_lut in csrc/kernels.cu).
NF4_CODE = _f32(
    "bf800000 bf3239b1 bf066b30 beca32a0 be91a24d be3d353f bdba7871 00000000 "
    "3da2faff 3e24cae3 3e7c04dd 3ead033a 3ee1a4b8 3f1007ab 3f3913b3 3f800000"
)

# Decision thresholds of dQuantizeNF4: code k+1 when x > NF4_THRESHOLDS[k] (strict, ties go down).
# Source literals, in order: -0.8480964004993439 -0.6106329262256622 -0.4599952697753906
# -0.33967943489551544 -0.23460740596055984 -0.13791173323988914 -0.045525018125772476
# 0.03979014977812767 0.1202552504837513 0.2035212516784668 0.2920137718319893 0.3893125355243683
# 0.5016634166240692 0.6427869200706482 0.8614784181118011
NF4_THRESHOLD_LITERALS = (
    "-0.8480964004993439 -0.6106329262256622 -0.4599952697753906 -0.33967943489551544 "
    "-0.23460740596055984 -0.13791173323988914 -0.045525018125772476 0.03979014977812767 "
    "0.1202552504837513 0.2035212516784668 0.2920137718319893 0.3893125355243683 "
    "0.5016634166240692 0.6427869200706482 0.8614784181118011"
)
NF4_THRESHOLDS = _f32(
    "bf591cd9 bf1c5270 beeb8480 beadea76 be703cec be0d38bc bd3a7871 3d22faff "
    "3df64863 3e5067e0 3e9582d4 3ec753f9 3f006d03 3f248daf 3f5c89d9"
)

# FP4 (e2m1, bias 2) table as bitsandbytes stores it in quant_map: the raw list divided by 12 in
# float32. Index 8 is +0.0 (the Python source writes the integer -0).
FP4_CODE = _f32(
    "00000000 3baaaaab 3f2aaaab 3f800000 3eaaaaab 3f000000 3e2aaaab 3e800000 "
    "00000000 bbaaaaab bf2aaaab bf800000 beaaaaab bf000000 be2aaaab be800000"
)

# dQuantizeFP4 compares |x| against these literals (sorted ascending here). They are *not* the
# midpoints of the table: 0.583333f sits several ulps below its midpoint.
FP4_THRESHOLD_LITERALS = "0.00260417 0.0859375 0.20833333 0.29166667 0.4166667 0.583333 0.8333333"
FP4_THRESHOLDS = _f32("3b2aaab9 3db00000 3e555555 3e955555 3ed55556 3f155550 3f555555")
# The magnitude bits of the i-th interval of |x| (the decision tree is monotone in |x|).
FP4_MAGNITUDE_BITS = np.array([0b000, 0b001, 0b110, 0b111, 0b100, 0b101, 0b010, 0b011], dtype=np.uint8)
FP4_SIGN_BIT = 0b1000

# The signed "dynamic" 8-bit map (functional.create_dynamic_map(signed=True)), index = code. It depends
# on torch's CPU linspace using FMA, so it is hardcoded from real bitsandbytes output, not regenerated.
DYNAMIC_CODE = _f32(
    "bf7e3333 bf7a999a bf770000 bf736666 bf6fcccd bf6c3333 bf68999a bf650000 "  # 0
    "bf616666 bf5dcccd bf5a3333 bf56999a bf530000 bf4f6666 bf4bcccd bf483333 "  # 8
    "bf44999a bf410000 bf3d6666 bf39cccd bf363334 bf32999a bf2f0000 bf2b6666 "  # 16
    "bf27cccd bf243334 bf20999a bf1d0000 bf196666 bf15cccd bf123334 bf0e999a "  # 24
    "bf0b0000 bf076666 bf03cccc bf003333 bef93332 bef20000 beeacccc bee3999a "  # 32
    "bedc6666 bed53333 bece0000 bec6cccc bebf999a beb86666 beb13333 beaa0000 "  # 40
    "bea2cccc be9b999a be946666 be8d3334 be860000 be7d9999 be6f3333 be60cccd "  # 48
    "be526666 be440000 be35999a be273333 be18cccd be0a6666 bdf80000 bddb3334 "  # 56
    "bdc9eb85 bdc428f7 bdbe6667 bdb8a3d7 bdb2e148 bdad1eb8 bda75c2a bda1999a "  # 64
    "bd9bd70a bd96147b bd9051eb bd8a8f5d bd84cccd bd7e147b bd728f5d bd670a3d "  # 72
    "bd5b851f bd500000 bd447ae1 bd38f5c3 bd2d70a3 bd21eb85 bd166667 bd0ae148 "  # 80
    "bcfeb852 bce7ae15 bcd0a3d7 bcb9999a bca28f5d bc8b851f bc68f5c3 bc3ae148 "  # 88
    "bc1f3b64 bc160418 bc0ccccd bc039581 bbf4bc6a bbe24dd3 bbcfdf3b bbbd70a4 "  # 96
    "bbab020d bb989374 bb8624dd bb676c8a bb428f5c bb1db22d baf1a9fc baa7ef9d "  # 104
    "ba7765ff ba59e83e ba3c6a80 ba1eecc1 ba016f01 b9c7e283 b98ce705 b923d70b "  # 112
    "b8ba1f4b b88aefb3 b8378034 b7b24206 b70205ff b65a1a94 b513a3b7 00000000 "  # 120
    "3513a3b7 365a1a94 370205ff 37b24206 38378034 388aefb3 38ba1f4b 3923d70b "  # 128
    "398ce705 39c7e283 3a016f01 3a1eecc1 3a3c6a80 3a59e83e 3a7765ff 3aa7ef9d "  # 136
    "3af1a9fc 3b1db22d 3b428f5c 3b676c8a 3b8624dd 3b989374 3bab020d 3bbd70a4 "  # 144
    "3bcfdf3b 3be24dd3 3bf4bc6a 3c039581 3c0ccccd 3c160418 3c1f3b64 3c3ae148 "  # 152
    "3c68f5c3 3c8b851f 3ca28f5d 3cb9999a 3cd0a3d7 3ce7ae15 3cfeb852 3d0ae148 "  # 160
    "3d166667 3d21eb85 3d2d70a3 3d38f5c3 3d447ae1 3d500000 3d5b851f 3d670a3d "  # 168
    "3d728f5d 3d7e147b 3d84cccd 3d8a8f5d 3d9051eb 3d96147b 3d9bd70a 3da1999a "  # 176
    "3da75c2a 3dad1eb8 3db2e148 3db8a3d7 3dbe6667 3dc428f7 3dc9eb85 3ddb3334 "  # 184
    "3df80000 3e0a6666 3e18cccd 3e273333 3e35999a 3e440000 3e526666 3e60cccd "  # 192
    "3e6f3333 3e7d9999 3e860000 3e8d3334 3e946666 3e9b999a 3ea2cccc 3eaa0000 "  # 200
    "3eb13333 3eb86666 3ebf999a 3ec6cccc 3ece0000 3ed53333 3edc6666 3ee3999a "  # 208
    "3eeacccc 3ef20000 3ef93332 3f003333 3f03cccc 3f076666 3f0b0000 3f0e999a "  # 216
    "3f123334 3f15cccd 3f196666 3f1d0000 3f20999a 3f243334 3f27cccd 3f2b6666 "  # 224
    "3f2f0000 3f32999a 3f363334 3f39cccd 3f3d6666 3f410000 3f44999a 3f483333 "  # 232
    "3f4bcccd 3f4f6666 3f530000 3f56999a 3f5a3333 3f5dcccd 3f616666 3f650000 "  # 240
    "3f68999a 3f6c3333 3f6fcccd 3f736666 3f770000 3f7a999a 3f7e3333 3f800000 "  # 248
)

# transformers/bitsandbytes dequantize int8 rows as (q * SCB) * (1/127): float32(1/127) = 0x3C010204.
INT8_INV_127 = np.array([0x3C010204], dtype=np.uint32).view(np.float32)[0]
INT8_SCALE_NUMERATOR = np.float32(127.0)

FLT_MIN = np.float32(np.finfo(np.float32).tiny)  # smallest normal float32; below it ftz flushes to 0
FLT_MAX = np.float32(np.finfo(np.float32).max)
