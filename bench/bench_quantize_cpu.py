"""Time `bnb quantize` against transformers' own route (load with BitsAndBytesConfig, save_pretrained) on the CPU.

    python bench/bench_quantize_cpu.py [--hidden 1024] [--intermediate 2816] [--layers 8] [--vocab 32000]
                                       [--schemes nf4-dq,int8] [--repeats 1] [--workdir DIR] [--json]

One seeded bf16 Llama checkpoint (config.json for LlamaForCausalLM, one model.safetensors; the sizes are
flags, the defaults give ~340 MB) is converted by each side in its own fresh process:

* ours:   `bnb quantize SRC OUT --scheme nf4 --double-quant` (or `--scheme int8`);
* theirs: `AutoModelForCausalLM.from_pretrained(SRC, quantization_config=BitsAndBytesConfig(...),
  device_map="cpu")` then `save_pretrained(OUT)`: the whole model is loaded and quantized by
  bitsandbytes' CPU path, then written.

Wall time is the whole process (interpreter, imports, conversion, writing), as a user waits for it;
"work" is the part after the imports. Peak RSS is the process's own VmHWM, read by the process at its
end (a parent's ``wait4`` would report the parent's high-water mark, which Linux carries across exec).
Ratios are theirs / ours. The outputs are compared tensor by tensor: bitsandbytes' CPU path does not
reproduce its CUDA kernels' bytes and ours does, so the count of byte-identical tensors is reported,
not asserted. If a route fails (transformers refusing 8-bit on the CPU, say), its error is reported.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

import bnbcli

SCHEMA_VERSION = 1
SEED = 0
INIT_STD = 0.02  # LlamaConfig.initializer_range: weights of the scale a trained model has
SCHEMES = ("nf4-dq", "int8")
OUR_FLAGS = {"nf4-dq": ["--scheme", "nf4", "--double-quant"], "int8": ["--scheme", "int8"]}

# Both children time their work after their imports and write {seconds, VmHWM} where the parent says.
_REPORT = """
def _report(started):
    import json, os, time
    with open("/proc/self/status") as status:
        hwm = next(line for line in status if line.startswith("VmHWM:"))
    with open(os.environ["BENCH_REPORT"], "w") as out:
        json.dump({"work_s": time.perf_counter() - started, "peak_rss": int(hwm.split()[1]) * 1024}, out)
"""

_OURS = (
    _REPORT
    + """
import atexit, sys, time
from bnbcli.cli.entry import console  # what the `bnb` script runs (it sets the process up, then imports the app)
started = time.perf_counter()
atexit.register(_report, started)  # console() exits as `bnb` does: the exit handlers run, then no teardown
console()
"""
)

_THEIRS = (
    _REPORT
    + """
import sys, time
import torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig
src, out, scheme = sys.argv[1:4]
if scheme == "int8":
    config = BitsAndBytesConfig(load_in_8bit=True)
else:
    config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
started = time.perf_counter()
model = AutoModelForCausalLM.from_pretrained(src, quantization_config=config, device_map="cpu")
model.save_pretrained(out)
_report(started)
"""
)


def write_checkpoint(folder: Path, hidden: int, intermediate: int, layers: int, vocab: int, heads: int) -> int:
    """A seeded bf16 LlamaForCausalLM checkpoint; returns the weights' bytes. The tensor names and
    shapes come from transformers' own model, built on the meta device (no memory, no init)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        vocab_size=vocab,
        tie_word_embeddings=False,
        dtype="bfloat16",
        architectures=["LlamaForCausalLM"],
    )
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in LlamaForCausalLM(config).state_dict().items()}
    generator = torch.Generator().manual_seed(SEED)
    weights = {
        name: torch.ones(shape, dtype=torch.bfloat16)
        if name.endswith("norm.weight")
        else (torch.randn(shape, generator=generator) * INIT_STD).to(torch.bfloat16)
        for name, shape in shapes.items()
    }
    folder.mkdir(parents=True, exist_ok=True)
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    config.save_pretrained(folder)
    return sum(t.numel() * t.element_size() for t in weights.values())


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_side(script: str, args: list[str], report: Path) -> dict[str, Any]:
    """One conversion in a fresh process: wall/work seconds, CPU seconds (user + system, all its threads:
    on a shared machine the wall time grows with the load, the CPU time much less) and peak RSS, or the
    error it ended with."""
    env = {**os.environ, "BENCH_REPORT": str(report), "TRANSFORMERS_VERBOSITY": "error", "TQDM_DISABLE": "1"}
    os.sync()  # the other side's output written back now, not into this side's time (ours fsyncs, theirs not)
    cpu = _children_cpu()
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - started
    cpu = _children_cpu() - cpu
    if result.returncode != 0:
        lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
        return {"error": lines[-1] if lines else f"exit code {result.returncode}"}
    measured = json.loads(report.read_text())
    return {"wall_s": wall, "work_s": measured["work_s"], "cpu_s": cpu, "peak_rss": measured["peak_rss"]}


def _tensor_files(folder: Path) -> dict[str, Path]:
    where = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(file, "pt") as f:
            where.update(dict.fromkeys(f.keys(), file))
    return where


def _raw(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""


def _kind(key: str) -> str:
    """The entry a key names: "weight" for the quantized weight itself, else its suffix after ".weight."."""
    _, sep, tail = key.partition(".weight.")
    return tail.split(".")[0] if sep else key.rsplit(".", 1)[-1]


def compare_outputs(ours: Path, theirs: Path) -> dict[str, Any]:
    """Byte-identical tensors between the two outputs, read one tensor at a time."""
    a, b = _tensor_files(ours), _tensor_files(theirs)
    common = sorted(set(a) & set(b))
    identical = 0
    differing: dict[str, int] = {}
    for key in common:
        with safe_open(a[key], "pt") as fa, safe_open(b[key], "pt") as fb:
            x, y = fa.get_tensor(key), fb.get_tensor(key)
        if x.dtype == y.dtype and x.shape == y.shape and _raw(x) == _raw(y):
            identical += 1
        else:
            differing[_kind(key)] = differing.get(_kind(key), 0) + 1
    return {
        "common": len(common),
        "identical": identical,
        "only_ours": len(set(a) - set(b)),
        "only_theirs": len(set(b) - set(a)),
        "differing_by_kind": differing,
    }


def _folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def _median_runs(runs: list[dict[str, Any]]) -> dict[str, Any]:
    failed = [r for r in runs if "error" in r]
    if failed:
        return failed[0]
    return {key: statistics.median(r[key] for r in runs) for key in ("wall_s", "work_s", "cpu_s", "peak_rss")}


def bench_scheme(scheme: str, src: Path, work: Path, repeats: int) -> dict[str, Any]:
    runs: dict[str, list[dict[str, Any]]] = {"ours": [], "theirs": []}
    outs = {side: work / f"{scheme}-{side}" for side in runs}
    for _ in range(repeats):  # alternate, so that machine noise hits both sides alike
        for side, script in (("ours", _OURS), ("theirs", _THEIRS)):
            out = outs[side]
            shutil.rmtree(out, ignore_errors=True)
            if side == "ours":
                args = ["quantize", str(src), str(out), *OUR_FLAGS[scheme], "-q", "--no-progress"]
            else:
                args = [str(src), str(out), scheme]
            runs[side].append(run_side(script, args, work / f"{scheme}-{side}.report.json"))
    row: dict[str, Any] = {"scheme": scheme, **{side: _median_runs(r) for side, r in runs.items()}}
    for side in runs:
        if "error" not in row[side]:
            row[side]["out_bytes"] = _folder_bytes(outs[side])
            row[side]["runs"] = runs[side]  # every run, for a noisy machine's sake
    if "error" not in row["ours"] and "error" not in row["theirs"]:
        row["ratio"] = {k: row["theirs"][k] / row["ours"][k] for k in ("wall_s", "work_s", "cpu_s", "peak_rss")}
        row["tensors"] = compare_outputs(outs["ours"], outs["theirs"])
    return row


def _versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"bnbcli": bnbcli.__version__, "torch": torch.__version__}
    for name in ("transformers", "bitsandbytes", "safetensors"):
        try:  # the installed version, without importing bitsandbytes here (it prints on import)
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    versions["python"] = platform.python_version()
    return versions


def _print_table(info: dict[str, Any]) -> None:
    m = info["model"]
    print(
        f"LlamaForCausalLM bf16: hidden {m['hidden']}, intermediate {m['intermediate']}, {m['layers']} layers, "
        f"vocab {m['vocab']}: {m['bytes'] / 1e6:.0f} MB; {info['cpu_count']} CPUs, "
        f"{info['torch_threads']} torch threads; median of {info['repeats']}; load average "
        f"{info['load_average']['before'][0]:.1f} before, {info['load_average']['after'][0]:.1f} after"
    )
    print(", ".join(f"{k} {v}" for k, v in info["versions"].items()))
    mib = 1 << 20
    print(f"{'scheme':<8} {'side':<13} {'wall s':>8} {'work s':>8} {'CPU s':>8} {'peak RSS MiB':>13} {'out MB':>8}")
    for row in info["results"]:
        for side in ("ours", "theirs"):
            r = row[side]
            label = "bnb quantize" if side == "ours" else "transformers"
            if "error" in r:
                print(f"{row['scheme']:<8} {label:<13} failed: {r['error']}")
                continue
            print(
                f"{row['scheme']:<8} {label:<13} {r['wall_s']:8.1f} {r['work_s']:8.1f} {r['cpu_s']:8.1f} "
                f"{r['peak_rss'] / mib:13.0f} {r['out_bytes'] / 1e6:8.1f}"
            )
        if "ratio" in row:
            q = row["ratio"]
            print(
                f"{row['scheme']:<8} {'theirs/ours':<13} {q['wall_s']:7.2f}x {q['work_s']:7.2f}x {q['cpu_s']:7.2f}x "
                f"{q['peak_rss']:12.2f}x"
            )
            t = row["tensors"]
            kinds = ", ".join(f"{k} {n}" for k, n in sorted(t["differing_by_kind"].items())) or "none"
            print(
                f"{'':<8} byte-identical tensors: {t['identical']} of {t['common']} in both "
                f"(only ours {t['only_ours']}, only theirs {t['only_theirs']}); differing: {kinds}"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=2816)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--schemes", default=",".join(SCHEMES), help="comma-separated: nf4-dq, int8")
    parser.add_argument("--repeats", type=int, default=1, help="runs per side; the table gives medians")
    parser.add_argument("--workdir", type=Path, help="keep the checkpoint and outputs here (default: a temp dir)")
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of the table")
    args = parser.parse_args()
    schemes = [s.strip() for s in args.schemes.split(",") if s.strip()]
    unknown = set(schemes) - set(SCHEMES)
    if unknown:
        parser.error(f"unknown scheme(s) {', '.join(sorted(unknown))}; choose from {', '.join(SCHEMES)}")

    with tempfile.TemporaryDirectory(prefix="bench-quantize-") as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        src = work / "llama-bf16"
        model_bytes = write_checkpoint(src, args.hidden, args.intermediate, args.layers, args.vocab, args.heads)
        load_before = os.getloadavg()
        results = [bench_scheme(scheme, src, work, args.repeats) for scheme in schemes]
        load_after = os.getloadavg()

    info = {
        "schema_version": SCHEMA_VERSION,
        "model": {
            "architecture": "LlamaForCausalLM",
            "hidden": args.hidden,
            "intermediate": args.intermediate,
            "layers": args.layers,
            "vocab": args.vocab,
            "heads": args.heads,
            "dtype": "bfloat16",
            "bytes": model_bytes,
        },
        "versions": _versions(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average": {"before": load_before, "after": load_after},  # 1, 5, 15 minutes
        "repeats": args.repeats,
        "results": results,
    }
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        _print_table(info)


if __name__ == "__main__":
    main()
