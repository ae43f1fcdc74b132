"""`bnb env`: versions of bnbcli, torch, CuPy and CUDA, and the GPUs seen."""

from __future__ import annotations

from bnbcli import output
from bnbcli.cli.options import JsonFlag
from bnbcli.environment import describe_environment


def env(json_output: JsonFlag = False) -> None:
    """Show the versions bnb runs with and the GPUs it can use."""
    found = describe_environment()
    if json_output:
        output.emit_json(found.as_dict())
        return
    none = "-"
    output.emit_table(
        "bnb environment",
        [
            ("bnbcli", found.bnbcli),
            ("python", f"{found.python} ({found.platform})"),
            ("torch", f"{found.torch} (CUDA {found.torch_cuda or none})"),
            ("numpy", found.numpy),
            ("safetensors", found.safetensors or none),
            ("cupy", found.cupy or "not installed"),
            ("CUDA runtime", found.cuda_runtime or none),
            ("GPUs", ", ".join(found.gpus) or "none"),
            ("backends", ", ".join(found.backends)),
        ],
    )
