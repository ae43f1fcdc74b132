"""Peak RSS of one `bnb` command in a fresh process, and generated checkpoints to measure it on.

Shared by the memory tests of `bnb quantize` and `bnb inspect`; tests/cli/test_quantize_memory.py says why
the child reads its own VmHWM and why glibc's mmap threshold is pinned.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from helpers.bnb_process import HANG_SECONDS

MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(1 << 20)}  # see tests/cli/test_quantize_memory.py

# The child runs the CLI as `bnb` does and reports its own peak RSS however main() ends.
CHILD = """
import os
from bnbcli.cli.app import main
try:
    main()
finally:
    with open("/proc/self/status") as status:
        hwm = next(line for line in status if line.startswith("VmHWM:"))
    with open(os.environ["BNB_TEST_PEAK_FILE"], "w") as out:
        out.write(hwm.split()[1])  # kB
"""


def weights(count: int, seed: int, shape: tuple[int, int]) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        f"model.layers.{i}.mlp.up_proj.weight": torch.randn(shape, generator=generator, dtype=torch.bfloat16)
        for i in range(count)
    }


def write_sharded(folder: Path, tensors: dict[str, torch.Tensor], shards: int) -> None:
    names = list(tensors)
    weight_map = {}
    for s in range(shards):
        file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = names[s::shards]
        save_file({n: tensors[n] for n in part}, folder / file)
        weight_map.update(dict.fromkeys(part, file))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


def peak_rss(peak_file: Path, *args: str) -> tuple[int, dict]:
    """(peak RSS in bytes, the --json document) of `bnb *args` (which must include --json)."""
    result = subprocess.run(
        [sys.executable, "-c", CHILD, *args],
        capture_output=True,
        text=True,
        timeout=HANG_SECONDS,
        env={**os.environ, **MALLOC_ENV, "BNB_TEST_PEAK_FILE": str(peak_file)},
    )
    assert result.returncode == 0, result.stderr
    return int(peak_file.read_text()) * 1024, json.loads(result.stdout)
