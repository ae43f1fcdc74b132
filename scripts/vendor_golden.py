"""Copy the golden vectors (what bitsandbytes' CUDA kernels and transformers/diffusers wrote) into the
repository, as the tests' own oracle: `python scripts/vendor_golden.py GOLDEN_DIR`.

GOLDEN_DIR is a full golden set (kernels/, models/, README.md), such as the team's reference desk. What
lands in tests/data/golden/ (see its README.md):

- inputs as bytes: the kernel inputs, every model's `src/` checkpoint, the reference logits, cases.json
  and every small file (config.json, generation_config.json);
- outputs as records: for each safetensors file the exact header bytes, a sha256 per tensor and the
  sha256 of the whole file. The tests compare every byte through those digests and rebuild the files
  from bnb's own output only where each digest matches (tests/helpers/golden.py);
- the few tensors bnb never writes by design, as bytes (EXTRA below);
- PROVENANCE.json: where each file came from, its size and sha256, and how it was stored.

Rerun it only when the golden set itself changes; it replaces tests/data/golden/ whole.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import shutil
import struct
import sys
from pathlib import Path

from safetensors.torch import load_file, save_file

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "tests" / "data" / "golden"
# Expected outputs (safetensors) that are stored as records; everything else is copied as bytes.
RECORDED = ("kernels/outputs.safetensors",)
# transformers let the user's skip list replace its default and quantized lm_head in this variant; bnb
# adds the user's list to the defaults and keeps lm_head 16-bit, so these tensors are never bnb's output.
EXTRA = {"models/llama/int8-skip-down/model.safetensors": ("lm_head.weight", "lm_head.SCB", "lm_head.weight_format")}


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def is_recorded(rel: str) -> bool:
    """Outputs become records: the kernels' outputs and every quantized variant of a model."""
    parts = rel.split("/")
    return rel in RECORDED or (
        parts[0] == "models" and len(parts) == 4 and parts[2] != "src" and rel.endswith(".safetensors")
    )


def safetensors_record(path: Path) -> dict:
    """The header bytes verbatim and each tensor's sha256: enough to check, and to rebuild, the file."""
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header_text = raw[8 : 8 + length].decode("utf-8")
    header = json.loads(header_text)
    data = raw[8 + length :]
    tensors = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        start, end = entry["data_offsets"]
        tensors[name] = {
            "dtype": entry["dtype"],
            "shape": entry["shape"],
            "sha256": hashlib.sha256(data[start:end]).hexdigest(),
        }
    return {"size": len(raw), "sha256": hashlib.sha256(raw).hexdigest(), "header": header_text, "tensors": tensors}


def provenance_line(golden: Path) -> str:
    """The golden README's first paragraph: which GPU, library versions and date made these bytes."""
    text = (golden / "README.md").read_text()
    paragraphs = [p.strip() for p in text.split("\n\n") if p.strip() and not p.startswith("#")]
    return " ".join(paragraphs[0].split())


def vendor(golden: Path, out: Path) -> dict:
    if not (golden / "kernels" / "cases.json").is_file():
        sys.exit(f"error: {golden} is not a golden set (no kernels/cases.json)")
    staging = out.with_name(out.name + ".new")
    shutil.rmtree(staging, ignore_errors=True)
    files = []
    for path in sorted(p for p in golden.rglob("*") if p.is_file()):
        rel = path.relative_to(golden).as_posix()
        if rel == "README.md":
            continue  # its provenance paragraph goes into PROVENANCE.json; our README explains the layout
        entry = {"path": rel, "size": path.stat().st_size, "sha256": sha256_file(path)}
        target = staging / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if is_recorded(rel):
            record = safetensors_record(path)
            extra = EXTRA.get(rel, ())
            if extra:
                tensors = load_file(path)
                save_file({k: tensors[k] for k in extra}, target.with_suffix(".extra.safetensors"))
                record["extra"] = list(extra)
            target.with_suffix(".safetensors.json").write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
            entry["stored"] = "record" + (" + extra tensors" if extra else "")
        else:
            shutil.copyfile(path, target)
            entry["stored"] = "bytes"
        files.append(entry)
    cases = json.loads((golden / "kernels" / "cases.json").read_text())
    provenance = {
        "what": "golden vectors: bitsandbytes' CUDA kernels and transformers/diffusers, the tests' oracle",
        "made": provenance_line(golden),
        "kernels": {k: cases[k] for k in ("generator", "bitsandbytes", "torch", "device", "seed")},
        "vendored_by": "scripts/vendor_golden.py",
        "vendored_on": datetime.date.today().isoformat(),
        "files": files,
    }
    (staging / "PROVENANCE.json").write_text(json.dumps(provenance, indent=1) + "\n")
    readme = out / "README.md"
    if readme.is_file():  # hand-written, kept across re-vendoring
        shutil.copyfile(readme, staging / "README.md")
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)
    return provenance


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("golden", type=Path, help="a full golden set (kernels/, models/, README.md)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    provenance = vendor(args.golden.resolve(), args.out)
    stored = sum(p.stat().st_size for p in args.out.rglob("*") if p.is_file())
    source = sum(f["size"] for f in provenance["files"])
    count = len(provenance["files"])
    print(f"{count} files, {source / 1e6:.1f} MB in the golden set -> {stored / 1e6:.1f} MB in {args.out}")


if __name__ == "__main__":
    main()
