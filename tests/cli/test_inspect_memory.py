"""Streaming: `bnb inspect` holds one tensor at a time, so its peak RSS does not grow with the model.

A generated sharded checkpoint of LAYERS identical-shape weights is inspected in a child process, and so
is a two-tensor checkpoint of the same shape; the difference of their peak RSS (the child's own VmHWM,
glibc's mmap threshold pinned: see tests/cli/test_quantize_memory.py and tests/helpers/peak_rss.py) is what the
model's size costs. It must stay under K tensors, while holding the model would cost LAYERS - 2 of them.

Why two tensors and not one: the first round trip leaves ~48 MiB resident that later tensors reuse (the
4-bit fast path's buffers), so a run's peak steps up once at the second tensor and then stays flat.
Measured here (2 cores, 2048×2048 bf16 = 8 MiB tensors, nf4+int8) for 1, 2, 6, 12 and 24 tensors:
444, 492, 493, 491, 491 MiB.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from safetensors.torch import save_file

from helpers.peak_rss import peak_rss, weights, write_sharded

SHAPE = (2048, 2048)  # 8 MiB in bf16
LAYERS = 12
SHARDS = 3
TENSOR_BYTES = SHAPE[0] * SHAPE[1] * 2
K = 3  # tensors; measured 0.5 (see the printed report)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="peak RSS is read from Linux /proc"),
]


def test_inspect_peak_rss_is_bounded_by_the_largest_tensor(tmp_path: Path) -> None:
    tiny, big = tmp_path / "tiny", tmp_path / "big"
    tiny.mkdir()
    big.mkdir()
    save_file(weights(2, 1, SHAPE), tiny / "model.safetensors")
    write_sharded(big, weights(LAYERS, 0, SHAPE), SHARDS)
    model_bytes = sum(f.stat().st_size for f in big.glob("*.safetensors"))
    bound = K * TENSOR_BYTES
    assert bound < model_bytes - 2 * TENSOR_BYTES, "holding the model must break the bound"

    # No config.json: name rules make every up_proj a weight; nf4 has the largest working set.
    flags = ("--schemes", "nf4,int8", "--json", "--no-progress")
    one, _ = peak_rss(tmp_path / "tiny.peak", "inspect", str(tiny), *flags)
    many, document = peak_rss(tmp_path / "big.peak", "inspect", str(big), *flags)

    assert document["summary"]["nf4"]["tensors"] == LAYERS  # every tensor was read and measured
    mib = 1 << 20
    report = (
        f"peak RSS {one / mib:.0f} MiB two tensors, {many / mib:.0f} MiB the model ({model_bytes / mib:.0f} MiB = "
        f"{model_bytes / TENSOR_BYTES:.1f} tensors of {TENSOR_BYTES / mib:.0f} MiB); model - two tensors = "
        f"{(many - one) / mib:.1f} MiB = {(many - one) / TENSOR_BYTES:.2f} tensors (bound {K})"
    )
    print(report)
    assert many - one < bound, report
