"""The golden vectors — what bitsandbytes' CUDA kernels and transformers/diffusers wrote — and byte comparisons.

The repository carries them in tests/data/golden (scripts/vendor_golden.py; README there): inputs as bytes,
expected outputs as records (each safetensors file's header and a sha256 per tensor). `golden_dir()` is a
folder laid out like the full golden set:

- `BNB_GOLDEN_DIR`, when set: a full set, used as it is;
- otherwise the vendored copy, with every expected output rebuilt: each tensor comes from bnb's own output
  (`bnb quantize` of the golden source, the CPU API for the kernel cases) and is written only if its sha256
  equals the record's, and each model file only if its whole sha256 does. So the files there are the golden
  bytes, verified; a tensor that bnb gets wrong is missing, and `build_errors()` says which.

Conformance tests compare against the records directly (`assert_matches`): every output byte, through the
sha256 of the exact bytes, whichever way golden_dir() was made.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
from functools import lru_cache
from pathlib import Path

import torch
from filelock import FileLock
from safetensors.torch import load_file, save_file

from helpers import REPO

VENDORED = REPO / "tests" / "data" / "golden"
BUILDS = REPO / ".pytest_cache" / "bnb-golden"  # rebuilt outputs, reused while the vendored set is unchanged

# The golden variants' BitsAndBytesConfig (golden README) as `bnb quantize` flags.
VARIANT_FLAGS = {
    "nf4-dq": ["--scheme", "nf4", "--double-quant"],
    "nf4": ["--scheme", "nf4", "--no-double-quant"],
    "fp4-dq": ["--scheme", "fp4", "--double-quant", "--compute-dtype", "float32"],
    "nf4-storage-bf16": ["--scheme", "nf4", "--quant-storage", "bfloat16", "--compute-dtype", "float32"],
    "int8": ["--scheme", "int8"],
    "int8-skip-down": ["--scheme", "int8", "--skip", "down_proj", "--skip", "fc2", "--skip", "c_proj"],
}
SAFETENSORS_DTYPES = {
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "I16": torch.int16,
    "I32": torch.int32,
    "I64": torch.int64,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "F64": torch.float64,
}


# --- bytes and comparisons ----------------------------------------------------------------------------------


def tensor_bytes(t: torch.Tensor) -> bytes:
    t = t.contiguous()
    return t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""


def sha256_of(t: torch.Tensor) -> str:
    return hashlib.sha256(tensor_bytes(t)).hexdigest()


def assert_same_tensor(ours: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """Same dtype, same shape, same bytes; on failure say how many elements differ and where first."""
    assert ours.dtype == expected.dtype, f"{what}: dtype {ours.dtype} != {expected.dtype}"
    assert tuple(ours.shape) == tuple(expected.shape), f"{what}: shape {tuple(ours.shape)} != {tuple(expected.shape)}"
    if tensor_bytes(ours) == tensor_bytes(expected):
        return
    a = ours.contiguous().reshape(-1)
    b = expected.contiguous().reshape(-1)
    width = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    diff = torch.nonzero(a.view(width) != b.view(width)).reshape(-1)
    i = int(diff[0])
    raise AssertionError(f"{what}: {diff.numel()} of {a.numel()} elements differ; first at {i}: {a[i]} != {b[i]}")


def differs_from_record(t: torch.Tensor, record: dict) -> str | None:
    """Why a tensor is not the recorded one (dtype, shape or bytes), or None when it is."""
    if t.dtype != SAFETENSORS_DTYPES[record["dtype"]]:
        return f"dtype {t.dtype}, recorded {record['dtype']}"
    if list(t.shape) != record["shape"]:
        return f"shape {list(t.shape)}, recorded {record['shape']}"
    if sha256_of(t) != record["sha256"]:
        return "bytes differ (sha256)"
    return None


def assert_matches(ours: torch.Tensor, key: str, what: str) -> None:
    """`ours` is byte for byte the golden kernel output `key` (its record); a failure names the case and
    field, and where the rebuilt golden bytes are at hand, the first element that differs."""
    why = differs_from_record(ours, output_records()[key])
    if why is None:
        return
    rebuilt = kernel_outputs().get(key)
    if rebuilt is not None and why == "bytes differ (sha256)":
        assert_same_tensor(ours, rebuilt, f"{key} ({what})")
    raise AssertionError(f"{key} ({what}): {why}")


# --- the records --------------------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def output_records() -> dict[str, dict]:
    """Every golden kernel output: {key: {dtype, shape, sha256}}."""
    return json.loads((VENDORED / "kernels" / "outputs.safetensors.json").read_text())["tensors"]


def variant_records(family: str, variant: str) -> dict[str, dict]:
    """{file name: record} for the safetensors files transformers/diffusers wrote for that variant."""
    folder = VENDORED / "models" / family / variant
    return {p.name.removesuffix(".json"): json.loads(p.read_text()) for p in sorted(folder.glob("*.safetensors.json"))}


def golden_variants() -> list[tuple[str, str]]:
    """(family, variant) of every golden quantized checkpoint, from the vendored records."""
    models = VENDORED / "models"
    return [
        (family.name, variant.name)
        for family in sorted(p for p in models.iterdir() if p.is_dir())
        for variant in sorted(p for p in family.iterdir() if p.is_dir() and p.name != "src")
    ]


# --- the folder the tests read ------------------------------------------------------------------------------


_build_errors: list[str] = []


@lru_cache(maxsize=1)
def golden_dir() -> Path:
    named = os.environ.get("BNB_GOLDEN_DIR")
    if named:
        return Path(named)
    return _built()


def build_errors() -> list[str]:
    """What could not be rebuilt from bnb's output (empty with BNB_GOLDEN_DIR or when all matched)."""
    golden_dir()
    return list(_build_errors)


@lru_cache(maxsize=1)
def kernel_cases() -> dict:
    return json.loads((golden_dir() / "kernels" / "cases.json").read_text())


@lru_cache(maxsize=1)
def kernel_inputs() -> dict[str, torch.Tensor]:
    return load_file(golden_dir() / "kernels" / "inputs.safetensors")


@lru_cache(maxsize=1)
def kernel_outputs() -> dict[str, torch.Tensor]:
    return load_file(golden_dir() / "kernels" / "outputs.safetensors")


def _built() -> Path:
    """The vendored set with its outputs rebuilt and verified, made once per vendored set (under a file
    lock, so that parallel test processes share it); a build with errors is used but never kept."""
    key = hashlib.sha256((VENDORED / "PROVENANCE.json").read_bytes()).hexdigest()[:16]
    done = BUILDS / key
    BUILDS.mkdir(parents=True, exist_ok=True)
    with FileLock(str(BUILDS / "build.lock")):
        if (done / "BUILT.json").is_file() and _intact(done):
            return done
        for stale in BUILDS.iterdir():
            if stale.is_dir():
                shutil.rmtree(stale)
        staging = BUILDS / f"{key}.building"
        errors = _build(staging)
        _build_errors[:] = errors
        if errors:
            return staging
        staging.rename(done)
        return done


def _intact(folder: Path) -> bool:
    built = json.loads((folder / "BUILT.json").read_text())
    return all(_sha256_file(folder / rel) == sha for rel, sha in built.items())


def _sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else ""


def _build(staging: Path) -> list[str]:
    shutil.copytree(
        VENDORED,
        staging,
        ignore=shutil.ignore_patterns("*.safetensors.json", "*.extra.safetensors", "README.md", "PROVENANCE.json"),
    )
    errors = _build_kernel_outputs(staging)
    for family, variant in golden_variants():
        errors += _build_variant(staging, family, variant)
    built = {p.relative_to(staging).as_posix(): _sha256_file(p) for p in staging.rglob("*.safetensors")}
    (staging / "BUILT.json").write_text(json.dumps(built, indent=1))
    return errors


def _kernel_case_outputs(case: dict, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """{output key: tensor} for one golden kernel case, from bnbcli's CPU reference."""
    import bnbcli

    op = case["op"]
    if op == "quantize_4bit":
        q = bnbcli.quantize_4bit(x, case["quant_type"], case["blocksize"], case["double_quant"])
        fields = {"packed": q.packed, "absmax": q.absmax, "quant_map": q.quant_map}
        if case["double_quant"]:
            fields |= {"nested_absmax": q.nested_absmax, "nested_quant_map": q.nested_quant_map}
        if "dequant" in case:
            fields["dequant"] = bnbcli.dequantize_4bit(q)
    elif op == "quantize_blockwise":
        q8 = bnbcli.quantize_blockwise8(x, case["blocksize"], case["nested"])
        fields = {"q": q8.q, "absmax": q8.absmax, "code": q8.code}
        if case["nested"]:
            fields["nested_absmax"] = q8.nested_absmax
        if "dequant" in case:
            fields["dequant"] = bnbcli.dequantize_blockwise8(q8)
    else:  # int8_vectorwise_quant, Int8Params
        i8 = bnbcli.quantize_int8_rowwise(x, case.get("threshold", 0.0))
        fields = {"CB": i8.CB, "SCB": i8.SCB}
    return {case[field]: t for field, t in fields.items() if field in case}


def _build_kernel_outputs(staging: Path) -> list[str]:
    cases = json.loads((staging / "kernels" / "cases.json").read_text())["cases"]
    inputs = load_file(staging / "kernels" / "inputs.safetensors")
    records = output_records()
    verified: dict[str, torch.Tensor] = {}
    errors = []
    for case in cases:
        for key, t in _kernel_case_outputs(case, inputs["in." + case["input"]]).items():
            why = differs_from_record(t, records[key])
            if why:
                errors.append(f"kernel output {key}: {why}")
            else:
                verified[key] = t.contiguous().clone()
    made = set(verified) | {e.split()[2].rstrip(":") for e in errors}
    errors += [f"kernel output {key}: no golden case makes it" for key in sorted(set(records) - made)]
    save_file(verified, staging / "kernels" / "outputs.safetensors")
    return errors


def _build_variant(staging: Path, family: str, variant: str) -> list[str]:
    """Each golden file of the variant, assembled from its recorded header and bnb's tensors."""
    from typer.testing import CliRunner

    from bnbcli.cli.app import app

    folder = staging / "models" / family / variant
    ours = folder.with_name(f".{variant}.bnb")
    args = ["quantize", str(staging / "models" / family / "src"), str(ours), "-q", *VARIANT_FLAGS[variant]]
    result = CliRunner().invoke(app, args)
    if result.exit_code != 0:
        return [f"{family}/{variant}: bnb quantize failed: {result.output.strip()} {result.exception!r}"]
    pool: dict[str, bytes] = {}
    for path in sorted(ours.glob("*.safetensors")):
        pool |= {k: tensor_bytes(v) for k, v in load_file(path).items()}
    shutil.rmtree(ours)
    errors = []
    for name, record in variant_records(family, variant).items():
        extra = VENDORED / "models" / family / variant / name.replace(".safetensors", ".extra.safetensors")
        tensors = pool | ({k: tensor_bytes(v) for k, v in load_file(extra).items()} if extra.is_file() else {})
        errors += _assemble(folder / name, record, tensors, f"{family}/{variant}/{name}")
    return errors


def _assemble(path: Path, record: dict, tensors: dict[str, bytes], what: str) -> list[str]:
    """Write the safetensors file the record describes, if every tensor's bytes match its sha256."""
    header = json.loads(record["header"])
    entries = sorted((v["data_offsets"], k) for k, v in header.items() if k != "__metadata__")
    errors = []
    data = bytearray()
    for (start, end), name in entries:
        raw = tensors.get(name)
        if raw is None:
            errors.append(f"{what}: bnb wrote no tensor {name}")
        elif hashlib.sha256(raw).hexdigest() != record["tensors"][name]["sha256"] or len(raw) != end - start:
            errors.append(f"{what}: {name} differs from the golden bytes")
        elif start != len(data):
            errors.append(f"{what}: {name} is not where the header puts it")
        else:
            data += raw
    if errors:
        return errors
    encoded = record["header"].encode()
    content = struct.pack("<Q", len(encoded)) + encoded + bytes(data)
    if hashlib.sha256(content).hexdigest() != record["sha256"]:
        return [f"{what}: the assembled file's sha256 differs from the golden file's"]
    path.write_bytes(content)
    return []
