"""`bnb env`: versions of bnbcli, torch, CuPy and CUDA, the GPUs seen, the planners and their cache."""

from __future__ import annotations

from bnbcli import output
from bnbcli.cli.options import JsonFlag, QuietFlag, VerboseFlag


def env(json_output: JsonFlag = False, quiet: QuietFlag = False, verbose: VerboseFlag = False) -> None:
    """Show the versions bnb runs with and the GPUs it can use (-v shows no more: it is all here)."""
    from bnbcli.environment import describe_environment

    found = describe_environment()
    if json_output:
        output.emit_json(found.as_dict())
        return
    none = "-"
    planners = ", ".join(f"{library} {version}" for library, version in found.planners.items() if version)
    cache = found.plan_cache
    threads = found.cpu_threads
    plans = f"{cache['folder']} ({cache['plans']} plans)" if cache["enabled"] else "off (BNB_PLAN_CACHE)"
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
            ("planners", planners or "name rules only (neither transformers nor diffusers is installed)"),
            ("plan cache", plans),
            (
                "CPU threads",
                f"{threads['cpus']} CPUs, OMP_NUM_THREADS {threads['omp_num_threads'] or 'unset'}, "
                f"OpenMP wait policy {threads['omp_wait_policy'] or 'default'}",
            ),
        ],
    )
