"""Mutation fuzzing of every command that reads checkpoints (issue 7).

Each case starts from a small real checkpoint (a few bf16 weights, config.json, and for some cases an
index over two shards, or a bnb checkpoint made by `bnb quantize`), applies one or two seeded mutations
— the header length field, bytes and structure of the header JSON, dtypes, shapes, offsets, index files,
truncation, random bytes anywhere, a config.json that is valid JSON but nonsense (negative or huge sizes,
an unknown model_type) — and runs `bnb footprint`, `bnb quantize`, `bnb dequantize` and, when the command
exists, `bnb inspect` on it, in this process (a subprocess per run would spend its time importing torch).
Some cases are served as a Hub repo id from a Hugging Face cache, offline (HF_HUB_OFFLINE), the cache
itself sometimes damaged (a file or a blob missing, no refs/main).

A run is a **crash** when it ends in anything but a typed bnb error, a usage error or success: an
unexpected exception (what the CLI would print as "internal error"), an exit code other than 0/1/2, a
signal, a run longer than ``CASE_SECONDS`` (a hang), a read outside the file (every ``os.preadv`` and
``os.pread`` is checked against the file's size), or peak memory growing by more than
``MAX_GROWTH_BYTES`` (a hostile header must be refused before anything is allocated for it). A case with a
nonsense config.json is also planned with the default planner (`quantize --dry-run --json`): when name rules
stand in for transformers, a run that says nothing about it is a **silent fallback**.

A share of the cases (``PATH_SHARE``) are **hostile paths** instead (issue 16): OUT is "", ".", "..",
the home folder, a device, a FIFO, a socket, a file, a link, someone's folder or a name too long; SRC has a
file that links out of it; `inspect --report` points at something that is not a report; or a signal
(SIGINT, SIGTERM) reaches a real `bnb` process group at a random moment. Each runs in a sandbox folder of
its own, and besides the crashes above, a **finding** is any entry that existed before the run and was
replaced or changed, a file from outside SRC found under the sandbox, anything bnb left beside OUT, and
for a signal anything but "exit 0 with OUT whole" or "exit 130/143, one line, no OUT".

    python scripts/fuzz.py --cases 10000      # or: make fuzz
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import shutil
import signal
import socket
import stat
import struct
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import typer
from safetensors.torch import save_file

from bnbcli.cli.app import app
from bnbcli.errors import BnbError

from helpers.bnb_process import HANG_SECONDS, debris, interruptible_bnb, snapshot, wait_for_handlers
from helpers.hub_cache import make_hub_cache

CASE_SECONDS = 20
MAX_GROWTH_BYTES = 512 << 20
LLAMA_CONFIG: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 1,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "vocab_size": 96,
    "torch_dtype": "bfloat16",
    "tie_word_embeddings": False,
}


class CaseTimeout(BaseException):
    """Raised by SIGALRM in the middle of a run: a BaseException, so no handler of ours swallows it."""


@dataclass
class Finding:
    case: int
    verb: str
    # crash | hang | out-of-file read | memory | silent fallback | replaced | copied from outside SRC | debris | signal
    kind: str
    detail: str


@dataclass
class Tally:
    cases: int = 0
    runs: int = 0
    exits: dict[int, int] = field(default_factory=dict)
    classes: dict[str, int] = field(default_factory=dict)  # cases of the classes that are not every case's
    findings: list[Finding] = field(default_factory=list)
    paths: dict[str, int] = field(default_factory=dict)  # hostile-path cases run, by kind


# ------------------------------------------------------------------------------------------ seeds


def llama_tensors(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    c = LLAMA_CONFIG
    h, i, v = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    shapes = {
        "model.embed_tokens.weight": (v, h),
        "model.layers.0.input_layernorm.weight": (h,),
        "model.layers.0.self_attn.q_proj.weight": (h, h),
        "model.layers.0.self_attn.k_proj.weight": (h, h),
        "model.layers.0.self_attn.v_proj.weight": (h, h),
        "model.layers.0.self_attn.o_proj.weight": (h, h),
        "model.layers.0.post_attention_layernorm.weight": (h,),
        "model.layers.0.mlp.gate_proj.weight": (i, h),
        "model.layers.0.mlp.up_proj.weight": (i, h),
        "model.layers.0.mlp.down_proj.weight": (h, i),
        "model.norm.weight": (h,),
        "lm_head.weight": (v, h),
    }
    return {k: (torch.randn(s, generator=g) * 0.02).to(torch.bfloat16) for k, s in shapes.items()}


UP_PROJ = "model.layers.0.mlp.up_proj.weight"


def write_llama(folder: Path, change: Callable[[dict[str, torch.Tensor]], None] = lambda t: None) -> Path:
    """The fuzzer's tiny Llama (one layer, hidden 64), with ``change`` applied to its tensors."""
    folder.mkdir(parents=True)
    tensors = llama_tensors(0)
    change(tensors)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(LLAMA_CONFIG))
    return folder


def make_seeds(root: Path) -> dict[str, Path]:
    """The unmutated checkpoints: one file, two shards with an index, one with no config.json, and a
    bnb nf4-dq checkpoint of the first."""
    seeds = {}
    single = root / "single"
    single.mkdir(parents=True)
    save_file(llama_tensors(0), single / "model.safetensors", metadata={"format": "pt"})
    (single / "config.json").write_text(json.dumps(LLAMA_CONFIG))
    seeds["single"] = single

    sharded = root / "sharded"
    sharded.mkdir()
    tensors = llama_tensors(1)
    names = list(tensors)
    parts = {"model-00001-of-00002.safetensors": names[:6], "model-00002-of-00002.safetensors": names[6:]}
    for file, keys in parts.items():
        save_file({k: tensors[k] for k in keys}, sharded / file, metadata={"format": "pt"})
    weight_map = {k: f for f, keys in parts.items() for k in keys}
    total = sum(t.numel() * 2 for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    (sharded / "config.json").write_text(json.dumps(LLAMA_CONFIG))
    seeds["sharded"] = sharded

    bare = root / "bare"
    bare.mkdir()
    save_file(llama_tensors(2), bare / "model.safetensors")
    seeds["bare"] = bare

    quantized = root / "bnb-nf4-dq"
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        app(["quantize", str(single), str(quantized), "--config", "nf4-dq", "-q"], standalone_mode=False)
    seeds["bnb"] = quantized
    return seeds


# ------------------------------------------------------------------------------------------ mutations


def _header(path: Path) -> tuple[int, bytes, bytes]:
    data = path.read_bytes()
    if len(data) < 8:  # an earlier mutation cut it
        return 0, b"", data
    (n,) = struct.unpack("<Q", data[:8])
    return n, data[8 : 8 + n], data[8 + n :]


def _write(path: Path, header: bytes, rest: bytes, length: int | None = None) -> None:
    value = len(header) if length is None else length % 2**64
    path.write_bytes(struct.pack("<Q", value) + header + rest)


def _weird_number(rng: random.Random) -> object:
    return rng.choice(
        [0, -1, 1, 2**31, 2**32 + 1, 2**48, 2**63, 2**64 + 5, 10**30, 7, 1.5, "3", None, [], {}, True, float("nan")]
    )


def _mutate_header_json(rng: random.Random, path: Path) -> str:
    _, header, rest = _header(path)
    try:
        doc = json.loads(header)
    except ValueError:
        return "header already broken"
    if not isinstance(doc, dict):
        return "header already not an object"
    keys = [k for k in doc if k != "__metadata__"]
    if not keys:
        return "no tensors"
    key = rng.choice(keys)
    entry = doc[key]
    kind = rng.choice(["dtype", "shape", "offsets", "entry", "metadata", "key", "drop", "duplicate-range"])
    if kind in ("dtype", "shape", "offsets") and not isinstance(entry, dict):
        return "entry already not an object"  # an earlier mutation of this case replaced it
    if kind == "dtype":
        entry["dtype"] = rng.choice(["F64", "I64", "I8", "U8", "BOOL", "F8_E4M3", "F8_E5M2", "F4", "XYZ", "", 5, None])
    elif kind == "shape":
        shape = list(entry["shape"]) if isinstance(entry.get("shape"), list) else []
        choice = rng.random()
        if choice < 0.3 and shape:
            shape[rng.randrange(len(shape))] = _weird_number(rng)
        elif choice < 0.5:
            shape.append(rng.choice([0, 1, 2, 2**40]))
        elif choice < 0.7:
            shape = shape[:-1]
        else:
            shape = _weird_number(rng)  # type: ignore[assignment]
        entry["shape"] = shape
    elif kind == "offsets":
        offsets = entry.get("data_offsets")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)):
            offsets = [0, 0]  # an earlier mutation of this case broke them
        offsets[rng.randrange(2)] = rng.choice([_weird_number(rng), offsets[0] + rng.randint(-9, 9), len(rest) + 1])
        entry["data_offsets"] = offsets if rng.random() < 0.9 else offsets[:1]
    elif kind == "entry":
        doc[key] = _weird_number(rng)
    elif kind == "metadata":
        doc["__metadata__"] = rng.choice([{"format": 5}, [], "x", {"format": "pt", "a": {"b": 1}}, None])
    elif kind == "key":
        doc[rng.choice(["", "../x", "a" * 5000, "\x00", "model.layers.0.mlp.up_proj.weight.absmax"])] = entry
    elif kind == "drop":
        del doc[key]
    else:
        other = doc[rng.choice(keys)]
        if isinstance(other, dict) and isinstance(entry, dict):
            entry["data_offsets"] = other.get("data_offsets")
    new = json.dumps(doc, allow_nan=True).encode()
    _write(path, new, rest)
    return f"header json {kind} of {key}"


def _mutate_header_bytes(rng: random.Random, path: Path) -> str:
    _, header, rest = _header(path)
    b = bytearray(header)
    for _ in range(rng.randint(1, 4)):
        if b:
            b[rng.randrange(len(b))] = rng.randrange(256)
    if rng.random() < 0.3:
        b = b[: rng.randrange(len(b) + 1)]
    _write(path, bytes(b), rest, length=len(header) if rng.random() < 0.5 else None)
    return "header bytes"


def _mutate_length(rng: random.Random, path: Path) -> str:
    n, header, rest = _header(path)
    size = 8 + n + len(rest)
    value = rng.choice([0, 1, 7, n - 1, n + 1, n + 8, size, size + 1, 2**31, 2**63, 2**64 - 1, 100_000_001])
    _write(path, header, rest, length=max(0, value))
    return f"header length {value}"


def _truncate(rng: random.Random, path: Path) -> str:
    data = path.read_bytes()
    cut = rng.randrange(len(data))
    path.write_bytes(data[:cut])
    return f"truncated at {cut}"


def _random_bytes(rng: random.Random, path: Path) -> str:
    data = bytearray(path.read_bytes())
    start = rng.randrange(len(data))
    for k in range(start, min(len(data), start + rng.randint(1, 64))):
        data[k] = rng.randrange(256)
    path.write_bytes(bytes(data))
    return f"random bytes at {start}"


def _json_or_none(path: Path) -> dict | None:
    """The file's JSON object, or None when an earlier mutation already broke it."""
    try:
        doc = json.loads(path.read_bytes())
    except ValueError:
        return None
    return doc if isinstance(doc, dict) and doc else None


def _mutate_index(rng: random.Random, path: Path) -> str:
    doc = _json_or_none(path)
    if doc is None or not isinstance(doc.get("weight_map"), dict) or not doc["weight_map"]:
        return "index already broken"
    kind = rng.choice(["missing", "escape", "not-dict", "drop", "garbage", "total"])
    weight_map = doc["weight_map"]
    key = rng.choice(list(weight_map))
    if kind == "missing":
        weight_map[key] = "model-00009-of-00009.safetensors"
    elif kind == "escape":
        weight_map[key] = rng.choice(["../single/model.safetensors", "/etc/passwd", "sub/../../x.safetensors"])
    elif kind == "not-dict":
        doc["weight_map"] = _weird_number(rng)
    elif kind == "drop":
        del weight_map[key]
    elif kind == "garbage":
        path.write_bytes(bytes(rng.randrange(256) for _ in range(rng.randint(0, 40))))
        return "index garbage"
    else:
        doc["metadata"] = {"total_size": _weird_number(rng)}
    path.write_text(json.dumps(doc))
    return f"index {kind}"


def _mutate_config(rng: random.Random, path: Path) -> str:
    doc = _json_or_none(path)
    if doc is None:
        return "config already broken"
    key = rng.choice(list(doc))
    doc[key] = _weird_number(rng)
    if rng.random() < 0.2:
        path.write_text("{" * rng.randint(0, 3))
        return "config garbage"
    path.write_text(json.dumps(doc))
    return f"config {key}"


# Sizes a config.json may hold that no model has: negative, zero, absurdly large (a trillion parameters).
NONSENSE_SIZES = (-1, 0, 3, 2**31, 10**7, 10**12)
SIZE_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")


NONSENSE_MODEL_TYPES = ["frobnik", "", "bert", "t5"]
NONSENSE_ARCHITECTURES = ["FrobnikForCausalLM", "BertModel", "GPT2LMHeadModel"]


def _nonsense_config(rng: random.Random, path: Path) -> str:
    """Valid JSON, but no model: a size no model has, or a model_type/architecture transformers does not know
    (or one it knows, that the checkpoint is not)."""
    doc = _json_or_none(path)
    if doc is None:
        return "config already broken"
    kind = rng.choice(["size", "size", "model_type", "architectures"])
    if kind == "size":
        doc[rng.choice(SIZE_KEYS)] = rng.choice(NONSENSE_SIZES)
    elif kind == "model_type":
        doc.pop("architectures", None)
        doc["model_type"] = rng.choice(NONSENSE_MODEL_TYPES)
    else:
        doc["architectures"] = [rng.choice(NONSENSE_ARCHITECTURES)]
    path.write_text(json.dumps(doc))
    return f"nonsense config {kind}"


SAFETENSORS_MUTATIONS: list[Callable[[random.Random, Path], str]] = [
    _mutate_header_json,
    _mutate_header_json,
    _mutate_header_bytes,
    _mutate_length,
    _truncate,
    _random_bytes,
]


def mutate(rng: random.Random, folder: Path) -> list[str]:
    """One or two mutations of files in ``folder``; returns what was done."""
    done = []
    for _ in range(rng.choice([1, 1, 2])):
        files = sorted(folder.glob("*.safetensors"))
        others = [p for p in (folder / "model.safetensors.index.json", folder / "config.json") if p.exists()]
        roll = rng.random()
        if (folder / "config.json").exists() and roll < 0.1:
            done.append(_nonsense_config(rng, folder / "config.json"))
        elif others and roll < 0.25:
            target = rng.choice(others)
            mutation = _mutate_index if target.name.endswith("index.json") else _mutate_config
            done.append(mutation(rng, target))
        elif files:
            done.append(rng.choice(SAFETENSORS_MUTATIONS)(rng, rng.choice(files)))
    return done


# ------------------------------------------------------------------------------------------ the Hub, offline

HUB_REPO = "fuzz/case"
HUB_SHARE = 0.15  # of the cases, served as HUB_REPO from an offline Hugging Face cache


def into_hub_cache(rng: random.Random, case: Path, cache: Path) -> str:
    """The case as a Hugging Face cache holds a downloaded repo (HUB_REPO), sometimes damaged the way a
    cache gets damaged: a file or a blob missing, no refs/main. Returns what was done."""
    shutil.rmtree(cache, ignore_errors=True)
    snapshot = make_hub_cache(cache, HUB_REPO, {p.name: p.read_bytes() for p in sorted(case.iterdir()) if p.is_file()})
    damage = rng.choice(["none", "none", "missing file", "missing blob", "no ref"])
    files = sorted(snapshot.iterdir())
    if damage == "missing file" and files:
        rng.choice(files).unlink()
    elif damage == "missing blob" and files:
        rng.choice(files).resolve().unlink()
    elif damage == "no ref":
        (snapshot.parent.parent / "refs" / "main").unlink()
    return f"served offline from the Hub cache ({damage})"


@contextlib.contextmanager
def offline_hub(cache: Path) -> Iterator[None]:
    """HF_HUB_OFFLINE and HF_HUB_CACHE as huggingface_hub sees them (it reads the variables at import)."""
    from huggingface_hub import constants

    saved = constants.HF_HUB_OFFLINE, constants.HF_HUB_CACHE
    constants.HF_HUB_OFFLINE, constants.HF_HUB_CACHE = True, str(cache)
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE, constants.HF_HUB_CACHE = saved


# ------------------------------------------------------------------------------------------ running


def _vm_hwm() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def _reset_peak() -> int:
    """The peak RSS brought down to the current RSS (Linux: "5" into clear_refs), and its value: a peak
    left by earlier work in this process (another test) would otherwise hide the growth of the cases."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")
    return _vm_hwm()


@contextlib.contextmanager
def _checked_reads(violations: list[str]) -> Iterator[None]:
    """Every positional read must stay inside its file."""
    real_preadv, real_pread = os.preadv, os.pread

    def check(fd: int, length: int, offset: int) -> None:
        size = os.fstat(fd).st_size
        if offset < 0 or offset + length > size:
            violations.append(f"read [{offset}, {offset + length}) of a {size}-byte file")

    def preadv(fd: int, buffers, offset: int, *args):  # type: ignore[no-untyped-def]
        check(fd, sum(len(memoryview(b)) for b in buffers), offset)
        return real_preadv(fd, buffers, offset, *args)

    def pread(fd: int, length: int, offset: int):  # type: ignore[no-untyped-def]
        check(fd, length, offset)
        return real_pread(fd, length, offset)

    os.preadv, os.pread = preadv, pread  # type: ignore[assignment]
    try:
        yield
    finally:
        os.preadv, os.pread = real_preadv, real_pread  # type: ignore[assignment]


def _on_alarm(signum: int, frame: object) -> None:
    raise CaseTimeout


def run_verb(
    args: list[str], out: io.StringIO | None = None, seconds: int = CASE_SECONDS
) -> tuple[int | None, str | None]:
    """(exit code, None) for an orderly end, or (None, what went wrong) for a crash or a hang; ``out``
    receives what the run printed on stdout."""
    out = out or io.StringIO()
    previous = signal.signal(signal.SIGALRM, _on_alarm)
    signal.alarm(seconds)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
            code = app(args, standalone_mode=False)
        return (int(code) if isinstance(code, int) else 0), None
    except BnbError as exc:
        return exc.exit_code, None
    except typer.Exit as exc:
        return exc.exit_code, None
    except CaseTimeout:
        return None, f"hang: no answer within {CASE_SECONDS} s"
    except Exception as exc:
        if callable(getattr(exc, "show", None)) and getattr(exc, "exit_code", None) == 2:
            return 2, None  # Click's usage errors
        return None, "".join(traceback.format_exception(exc)[-6:])
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def verbs(src: str, out: Path) -> list[tuple[str, list[str]]]:
    runs = [
        ("footprint", ["footprint", src, "--json", "--planner", "name-rules"]),
        ("quantize", ["quantize", src, str(out / "q"), "--config", "nf4-dq", "-q", "--planner", "name-rules"]),
        ("dequantize", ["dequantize", src, str(out / "d"), "-q"]),
    ]
    if "inspect" in {c.name or c.callback.__name__ for c in app.registered_commands}:  # type: ignore[union-attr]
        runs.append(("inspect", ["inspect", src, "--json", "--schemes", "nf4"]))
    return runs


def silent_fallback(case: Path, printed: str) -> str | None:
    """What a `quantize --dry-run --json` run printed: a component that name rules planned although
    config.json is there, with no warning saying so, is a finding."""
    try:
        plan = json.loads(printed)
    except ValueError:
        return "stdout is not one JSON document"
    if not (case / "config.json").is_file() or "components" not in plan:
        return None  # no config to fall back from, or an error document
    if any(c["planner"] == "name-rules" for c in plan["components"]) and not plan.get("warnings"):
        return "planned by name rules with config.json present, and no warning"
    return None


# ------------------------------------------------------------------------------- hostile paths (issue 16)

PATH_SHARE = 0.25  # of the cases
SECRET = b"a file outside SRC: never to be found in an output\n"
PATH_KINDS = (
    "out-empty",
    "out-dot",
    "out-parent",
    "out-home",
    "out-device",
    "out-fifo",
    "out-socket",
    "out-file",
    "out-link",
    "out-dangling-link",
    "out-foreign-folder",
    "out-long-name",
    "src-link-out",
    "report-not-ours",
    "signal",
)


def _bnb_like(folder: Path) -> None:
    """A folder that looks like bnb's output: only the rules about places keep it from being replaced."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "bnb_manifest.json").write_text("{}")
    (folder / "precious.txt").write_text("an earlier result")


def _not_ours(rng: random.Random, sandbox: Path, kind: str) -> Path:
    """Make, at ``sandbox / "target"``, something of ``kind`` that bnb did not write."""
    target = sandbox / "target"
    if kind == "device":
        try:
            os.mknod(target, 0o666 | stat.S_IFCHR, os.makedev(1, 3))  # like /dev/null, never /dev/null itself
            return target
        except PermissionError:
            kind = "fifo"  # not root: a FIFO stands for it
    if kind == "fifo":
        os.mkfifo(target)
    elif kind == "socket":
        with contextlib.chdir(sandbox):  # a socket's path is limited to ~100 bytes
            server = socket.socket(socket.AF_UNIX)
            server.bind("target")
            server.close()
    elif kind == "file":
        target.write_text(rng.choice(["someone's notes", "<!DOCTYPE html><p>mine</p>"]))
    elif kind == "link":
        _bnb_like(sandbox / "linked")
        target.symlink_to(sandbox / "linked")
    elif kind == "dangling-link":
        target.symlink_to(sandbox / "nowhere")
    else:  # "foreign-folder"
        target.mkdir()
        (target / "precious.txt").write_text("someone's work")
    return target


def path_case(rng: random.Random, seeds: dict[str, Path], sandbox: Path) -> tuple[str, list[str], Path, Path]:
    """Build one hostile situation in ``sandbox``: (what, arguments, the folder to run in, OUT)."""
    kind = rng.choice(PATH_KINDS)
    verb = rng.choice(["quantize", "dequantize"])
    src = sandbox / "src"
    shutil.copytree(seeds["bnb" if verb == "dequantize" else rng.choice(["single", "sharded", "bare"])], src)
    secret = sandbox / "secret"
    secret.write_bytes(SECRET)
    secret.chmod(0o640)
    cwd = sandbox / "cwd"
    _bnb_like(cwd)
    out: Path | str = sandbox / "out"
    if kind == "out-empty":
        out = ""
    elif kind == "out-dot":
        out = "."
    elif kind == "out-parent":
        (cwd / "inner").mkdir()
        cwd, out = cwd / "inner", ".."
    elif kind == "out-home":
        _bnb_like(sandbox / "home")
        out = sandbox / "home"  # and HOME points there (``run_path_case``)
    elif kind == "out-long-name":
        out = sandbox / ("o" * rng.randint(200, 300))
    elif kind.startswith("out-"):
        out = _not_ours(rng, sandbox, kind.removeprefix("out-"))
    elif kind == "src-link-out":
        name = rng.choice(["tokenizer.json", "config.json", "vocab.txt", "sub/leak.txt", "model.safetensors"])
        (src / name).parent.mkdir(exist_ok=True)
        (src / name).unlink(missing_ok=True)
        (src / name).symlink_to(secret)
    elif kind == "report-not-ours":
        report = rng.choice(["", ".", "not ours"])
        if report == "not ours":
            report = str(_not_ours(rng, sandbox, rng.choice(["device", "fifo", "file", "link"])))
        args = ["inspect", str(src), "--schemes", "nf4", "--planner", "name-rules", "-q", "--report", report]
        return f"{kind} {report!r}", args, cwd, sandbox / "out"
    flags = ["-q", "--overwrite"] if rng.random() < 0.8 else ["-q"]
    if verb == "quantize":
        flags += ["--planner", "name-rules"]
    args = [verb, str(src), str(out), *flags]
    return f"{kind} ({verb} … {str(out)[-40:]!r} {' '.join(flags)})", args, cwd, Path(os.path.normpath(cwd / out))


def _leaks(sandbox: Path) -> list[str]:
    """Files under ``sandbox``, other than the secret itself, that hold its bytes."""
    found = []
    for dirpath, _, filenames in os.walk(sandbox):
        for name in filenames:
            path = Path(dirpath) / name
            if path != sandbox / "secret" and path.is_file() and not path.is_symlink() and SECRET in path.read_bytes():
                found.append(str(path.relative_to(sandbox)))
    return found


def run_path_case(rng: random.Random, seeds: dict[str, Path], sandbox: Path) -> tuple[str, str, list[tuple[str, str]]]:
    """One hostile-path case: (what, verb, findings as (kind, detail))."""
    what, args, cwd, out = path_case(rng, seeds, sandbox)
    before = snapshot(sandbox)
    if what.startswith("signal"):
        return what, "signal", _signal_run(rng, args, out)
    home = os.environ.get("HOME")
    os.environ["HOME"] = str(sandbox / "home")
    try:
        with contextlib.chdir(cwd):
            code, problem = run_verb(args)
    finally:
        if home is None:
            del os.environ["HOME"]
        else:
            os.environ["HOME"] = home
    findings = []
    if problem is not None:
        findings.append(("hang" if problem.startswith("hang") else "crash", problem))
    elif code not in (0, 1, 2):
        findings.append(("crash", f"exit code {code}"))
    after = snapshot(sandbox)
    changed = sorted(k for k, v in before.items() if after.get(k) != v)
    if changed:
        findings.append(("replaced", f"exit {code}; changed or gone: {changed[:5]}"))
    if leaks := _leaks(sandbox):
        findings.append(("copied from outside SRC", f"exit {code}; the secret's bytes in {leaks[:5]}"))
    if left := debris(out):
        findings.append(("debris", f"exit {code}; left beside OUT: {left}"))
    return what, args[0], findings


def _signal_run(rng: random.Random, args: list[str], out: Path) -> list[tuple[str, str]]:
    """A real `bnb` process; SIGINT or SIGTERM to its process group at a random moment after its
    handlers are in place."""
    signum = rng.choice([signal.SIGINT, signal.SIGTERM])
    delay = rng.uniform(0.0, 3.0)
    proc = interruptible_bnb(*args)
    try:
        wait_for_handlers(proc)
        time.sleep(delay)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signum)
        stdout, stderr = proc.communicate(timeout=HANG_SECONDS)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    code = proc.returncode
    expected = {signal.SIGINT: (130, "error: interrupted"), signal.SIGTERM: (143, "error: terminated (SIGTERM)")}
    detail = f"{signal.Signals(signum).name} after {delay:.2f} s: exit {code}\n{stderr[-2000:]}"
    findings = []
    if code == 0:
        if not (out / "bnb_manifest.json").is_file():
            findings.append(("signal", detail + "\nexit 0 without a whole OUT"))
    elif (code, stderr.splitlines()) != (expected[signum][0], [expected[signum][1]]) or stdout or out.exists():
        findings.append(("signal", detail))
    if left := debris(out):
        findings.append(("debris", f"{detail}\nleft beside OUT: {left}"))
    return findings


def warm_up(seeds: dict[str, Path], work: Path) -> None:
    """Run every verb once on each seed, and plan each nonsense config once, before the first case: the
    libraries that bnb imports on first need (transformers and the model modules it picks for a config) then
    load here, not inside a case, where the import would count against the case's time (a busy machine
    took more than CASE_SECONDS for it) and its memory cap (which is about what a hostile header makes bnb
    allocate)."""
    work.mkdir(parents=True, exist_ok=True)
    configs = [{"model_type": t} for t in NONSENSE_MODEL_TYPES] + [
        {"architectures": [a]} for a in NONSENSE_ARCHITECTURES
    ]
    for i, change in enumerate(configs):
        folder = work / f"config-{i}"
        shutil.copytree(seeds["single"], folder)
        config = {k: v for k, v in LLAMA_CONFIG.items() if not ("model_type" in change and k == "architectures")}
        (folder / "config.json").write_text(json.dumps({**config, **change}))
        run_verb(["footprint", str(folder), "--json"], seconds=HANG_SECONDS)
        run_verb(["quantize", str(folder), str(work / f"plan-{i}"), "--dry-run", "--json"], seconds=HANG_SECONDS)
    for name, src in seeds.items():
        for _, args in verbs(str(src), work / name):
            run_verb(args, seconds=HANG_SECONDS)


def fuzz(cases: int, seed: int, work: Path, progress: Callable[[Tally], None] | None = None) -> Tally:
    work.mkdir(parents=True, exist_ok=True)
    seeds = make_seeds(work / "seeds")
    warm_up(seeds, work / "warm-up")
    tally = Tally()
    baseline = _reset_peak()
    os.environ["HF_HUB_OFFLINE"] = "1"
    for case in range(cases):
        rng = random.Random(seed * 1_000_003 + case)
        if random.Random(f"paths {seed} {case}").random() < PATH_SHARE:
            sandbox = work / "sandbox"
            shutil.rmtree(sandbox, ignore_errors=True)
            sandbox.mkdir()
            what, verb, findings = run_path_case(rng, seeds, sandbox)
            kind = what.split()[0]
            tally.paths[kind] = tally.paths.get(kind, 0) + 1
            tally.runs += 1
            tally.findings.extend(Finding(case, verb, kind, f"{what}\n{detail}") for kind, detail in findings)
            tally.cases += 1
            if progress:
                progress(tally)
            continue
        name = rng.choice(sorted(seeds))
        src = work / "case"
        shutil.rmtree(src, ignore_errors=True)
        shutil.copytree(seeds[name], src)
        what = f"{name}: " + "; ".join(mutate(rng, src))
        out = work / "out"
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir()
        hub = rng.random() < HUB_SHARE
        if hub:
            what += "; " + into_hub_cache(rng, src, work / "hub")
        runs = verbs(HUB_REPO if hub else str(src), out)
        if "nonsense config" in what and not hub:
            runs.append(("plan", ["quantize", str(src), str(out / "p"), "--dry-run", "--json"]))
        for label, member in (("offline Hub", hub), ("nonsense config", "nonsense config" in what)):
            tally.classes[label] = tally.classes.get(label, 0) + member
        with offline_hub(work / "hub") if hub else contextlib.nullcontext():
            for verb, args in runs:
                violations: list[str] = []
                printed = io.StringIO()
                with _checked_reads(violations):
                    code, problem = run_verb(args, printed)
                tally.runs += 1
                if problem is not None:
                    kind = "hang" if problem.startswith("hang") else "crash"
                    tally.findings.append(Finding(case, verb, kind, f"{what}\n{problem}"))
                else:
                    assert code is not None
                    tally.exits[code] = tally.exits.get(code, 0) + 1
                    if code not in (0, 1, 2):
                        tally.findings.append(Finding(case, verb, "crash", f"{what}\nexit code {code}"))
                    if verb == "plan" and code == 0 and (why := silent_fallback(src, printed.getvalue())):
                        tally.findings.append(Finding(case, verb, "silent fallback", f"{what}\n{why}"))
                if violations:
                    tally.findings.append(Finding(case, verb, "out-of-file read", f"{what}\n{violations[0]}"))
                if _vm_hwm() - baseline > MAX_GROWTH_BYTES:
                    tally.findings.append(Finding(case, verb, "memory", f"{what}\npeak RSS grew past the cap"))
                    baseline = _vm_hwm()
        tally.cases += 1
        if progress:
            progress(tally)
    for left in ("case", "out", "hub", "sandbox"):
        shutil.rmtree(work / left, ignore_errors=True)
    return tally
