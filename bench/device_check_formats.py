"""On a GPU machine: our CPU formats against bitsandbytes' CUDA kernels on many inputs, byte for byte.

The golden vectors fix a few hundred cases; this script draws many more (random shapes, every
blocksize and dtype, and adversarial values: NaN, ±inf, all-NaN and all-zero blocks, subnormals,
exact thresholds, ±0) and compares every output of quantize and dequantize.

    PYTHONPATH=.:<bitsandbytes> python bench/device_check_formats.py [--quick]

Prints `formats: M/T match` and the first mismatches; exits 1 on any mismatch.
"""

from __future__ import annotations

import argparse
import hashlib
import sys

import numpy as np
import torch

import bnbcli
from bnbcli.formats.codes import DYNAMIC_CODE, FP4_THRESHOLDS, NF4_THRESHOLDS

BLOCKS4 = (32, 64, 128, 256, 512, 1024, 2048, 4096)
BLOCKS8 = (64, 128, 256, 512, 1024, 2048, 4096)
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def raw(t: torch.Tensor) -> bytes:
    t = t.detach().contiguous().cpu()
    return t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""


def inputs(rng: np.random.Generator, quick: bool):
    """(name, float32 array) pairs; each is run in every dtype."""
    shapes = [(3, 100), (257, 129), (1, 4097), (64, 64), (7,), (1000, 33), (2, 3, 50)]
    if not quick:
        shapes += [(4096, 4096), (1024, 11008), (8191, 3)]
    for shape in shapes:
        yield f"randn{shape}", rng.standard_normal(shape).astype(np.float32)
        yield f"student{shape}", (rng.standard_t(3, size=shape) * 0.02).astype(np.float32)
    special = rng.standard_normal((24, 256)).astype(np.float32)
    special[0] = 0.0  # all-zero rows / blocks
    special[1] = np.nan  # all-NaN
    special[2, ::7] = np.nan
    special[3, 5] = np.inf
    special[4, 9] = -np.inf
    special[5] = 1e-39  # subnormal in fp32/bf16
    special[6, ::3] = -1e-40
    special[7] = -0.0
    special[8] = 3.0  # constant
    special[9, :] = 0.0
    special[9, 17] = 1e-38
    special[10, :128] = 0.0
    yield "special", special
    # Exact thresholds times a power-of-two absmax: every tie rule.
    for name, table in (
        ("nf4", NF4_THRESHOLDS),
        ("fp4", FP4_THRESHOLDS),
        ("dyn", ((DYNAMIC_CODE[:-1] + DYNAMIC_CODE[1:]) * np.float32(0.5)).astype(np.float32)),
    ):
        row = np.concatenate([[1.0, -1.0], table, -table, np.nextafter(table, 2), np.nextafter(table, -2)]).astype(
            np.float32
        )
        tiled = np.resize(row, (8, 4096)).astype(np.float32)
        yield f"ties_{name}", tiled * np.float32(4.0)
    wide = (rng.standard_normal((16, 512)) * 10.0 ** rng.integers(-30, 20, (16, 1))).astype(np.float32)
    yield "wide_range", wide


def same_offset(theirs: torch.Tensor, ours: float) -> bool:
    """Equal float32 bits, or NaN on both sides (inf and -FLT_MAX absmax values can make the mean
    NaN; its sign and payload are not kept: ours is a Python float, as in the quant_state JSON)."""
    value = theirs.float().reshape(())
    if bool(torch.isnan(value)) and np.isnan(ours):
        return True
    return raw(value) == np.float32(ours).tobytes()


def check_4bit(F, x: torch.Tensor, qt: str, bs: int, dq: bool) -> list[str]:
    packed, state = F.quantize_4bit(x.cuda(), blocksize=bs, compress_statistics=dq, quant_type=qt)
    ours = bnbcli.quantize_4bit(x, qt, bs, dq)
    bad = []
    if raw(packed) != raw(ours.packed):
        bad.append("packed")
    if raw(state.absmax) != raw(ours.absmax):
        bad.append("absmax")
    if dq:
        if raw(state.state2.absmax) != raw(ours.nested_absmax):
            bad.append("nested_absmax")
        if not same_offset(state.offset, ours.nested_offset):
            bad.append("nested_offset")
    deq = F.dequantize_4bit(packed, state)
    if raw(deq) != raw(bnbcli.dequantize_4bit(ours)):
        bad.append("dequant")
    return bad


def check_blockwise8(F, x: torch.Tensor, bs: int, nested: bool) -> list[str]:
    q, state = F.quantize_blockwise(x.cuda(), blocksize=bs, nested=nested)
    ours = bnbcli.quantize_blockwise8(x, bs, nested)
    bad = []
    if raw(q) != raw(ours.q):
        bad.append("q")
    if raw(state.absmax) != raw(ours.absmax):
        bad.append("absmax")
    if nested and not same_offset(state.offset, ours.nested_offset):
        bad.append("nested_offset")
    if raw(F.dequantize_blockwise(q, state)) != raw(bnbcli.dequantize_blockwise8(ours)):
        bad.append("dequant")
    return bad


def check_int8(F, x: torch.Tensor, threshold: float) -> list[str]:
    x16 = x.to(torch.float16)
    if x16.dim() < 2:
        x16 = x16.reshape(1, -1)
    cb, scb, cols = F.int8_vectorwise_quant(x16.cuda(), threshold=threshold)
    ours = bnbcli.quantize_int8_rowwise(x16, threshold)
    bad = []
    if raw(cb) != raw(ours.CB):
        bad.append("CB")
    if raw(scb) != raw(ours.SCB):
        bad.append("SCB")
    theirs_cols = None if cols is None else cols.cpu().tolist()
    ours_cols = None if ours.outlier_cols is None else ours.outlier_cols.tolist()
    if theirs_cols != ours_cols and not (theirs_cols in (None, []) and ours_cols in (None, [])):
        bad.append("outlier_cols")
    # bitsandbytes' dequant broadcasts SCB over 2-D rows only (transformers' weights are 2-D).
    theirs_deq = F.int8_vectorwise_dequant(cb.reshape(-1, cb.shape[-1]), scb).reshape(cb.shape)
    if raw(theirs_deq) != raw(bnbcli.dequantize_int8_rowwise(ours.CB, ours.SCB)):
        bad.append("dequant")
    return bad


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seed", type=int, default=2026)
    args = parser.parse_args()
    import bitsandbytes.functional as F

    rng = np.random.default_rng(args.seed)
    total = 0
    failures: list[str] = []
    for name, values in inputs(rng, args.quick):
        for dtype in DTYPES:
            x = torch.from_numpy(values).to(dtype)
            big = x.numel() > 2_000_000
            runs = []
            for qt in ("nf4", "fp4"):
                for bs in (64,) if big else BLOCKS4:
                    for dq in (False, True):
                        runs.append(
                            (
                                f"q4 {qt} bs{bs} dq{int(dq)}",
                                lambda qt=qt, bs=bs, dq=dq, x=x: check_4bit(F, x, qt, bs, dq),
                            )
                        )
            for bs in (4096,) if big else BLOCKS8:
                for nested in (False, True):
                    runs.append(
                        (f"q8 bs{bs} nested{int(nested)}", lambda bs=bs, n=nested, x=x: check_blockwise8(F, x, bs, n))
                    )
            for threshold in (0.0, 6.0):
                runs.append((f"int8 thr{threshold}", lambda t=threshold, x=x: check_int8(F, x, t)))
            for label, run in runs:
                total += 1
                try:
                    bad = run()
                except Exception as exc:  # a refusal by bitsandbytes is reported, not hidden
                    bad = [f"raised {type(exc).__name__}: {str(exc)[:80]}"]
                if bad:
                    failures.append(f"{name} {str(dtype)[6:]} {label}: {', '.join(bad)}")
    print(f"formats: {total - len(failures)}/{total} match")
    for line in failures[:40]:
        print("  MISMATCH", line)
    digest = hashlib.sha256("\n".join(failures).encode()).hexdigest()[:12]
    print(f"mismatch digest {digest}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
