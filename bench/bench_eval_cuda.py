"""`bnb eval --device cuda` on the 8B-shaped checkpoint: tokens per second and peak GPU memory, with ORIG kept on
the GPU beside QUANT (bf16) and one at a time (ORIG's top-k kept on the host).

    python bench/bench_eval_cuda.py WORK_DIR [--layers 32] [--scheme nf4-dq] [--tokens 3072] [--context 512]

Uses (or makes) the random-weight Llama-3-8B-shaped bf16 checkpoint of bench/bench_quantize_cuda.py under
WORK_DIR (the same folder, so gpu_all.sh makes it once), adds a byte-level BPE tokenizer trained on the
built-in texts (random weights: the text does not matter, only the token count), quantizes it with
`bnb quantize` (once), then runs `bnb eval` in a fresh process for each memory plan:

* side by side: ORIG (bf16, ~16 GB) and QUANT both on the GPU, exact over the 128,256-token vocabulary;
* one at a time, top-1024: ORIG runs first and is freed before QUANT loads;
* one at a time, the whole vocabulary (`--top-k all`): the host keeps every log-probability.

Each row: forward tokens/s through both models (the tokens of the texts over ORIG's + QUANT's forward
seconds), end-to-end seconds of the process, loading seconds, peak GPU memory (NVML's per-process
figure, CUDA context included, and torch's peak reserved), peak host RSS, and the mean KLD with its top-k
bound (random weights: the figures show the arithmetic agrees, not a model's quality).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

from bench_quantize_cuda import LLAMA_8B, make_checkpoint, measured

EVAL = """
import contextlib, io, sys
sys.argv = ["bnb", "eval", QUANT, "--device", "cuda", "--json", "--context", str(CONTEXT),
            "--max-tokens", str(TOKENS), *EXTRA]
from bnbcli.cli.entry import main
captured = io.StringIO()
with contextlib.redirect_stdout(captured):
    try:
        main()
    except SystemExit as stop:
        if stop.code:
            raise
with open(EVAL_JSON, "w") as f:
    f.write(captured.getvalue())
_report()
"""

PLANS = {
    "side by side (ORIG bf16 on the GPU)": [],
    "one at a time, top-1024": ["--one-at-a-time"],
    "one at a time, whole vocabulary": ["--one-at-a-time", "--top-k", "all"],
}


def add_tokenizer(folder: Path) -> None:
    """A byte-level BPE (2,000 tokens, all ids inside the 128,256 vocabulary) trained on the built-in texts."""
    if (folder / "tokenizer.json").exists():
        return
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from bnbcli.eval.texts import builtin_texts

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=2000, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(builtin_texts(), trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok).save_pretrained(folder)


def quantized(src: Path, out: Path, scheme: str) -> Path:
    if not (out / "bnb_manifest.json").exists():
        command = [sys.executable, "-m", "bnbcli", "quantize", str(src), str(out), "--config", scheme, "--overwrite"]
        subprocess.run([*command, "--backend", "auto", "-q"], check=True)
    return out


def run_plan(quant: Path, work: Path, name: str, extra: list[str], tokens: int, context: int) -> dict:
    slug = name.split(" (")[0].replace(" ", "-").replace(",", "")
    values = {"QUANT": str(quant), "CONTEXT": context, "TOKENS": tokens, "EXTRA": extra}
    values["EVAL_JSON"] = str(work / f"eval-{slug}.json")
    result = measured(EVAL, values, work / f"report-eval-{slug}.json")
    result["eval"] = json.loads(Path(values["EVAL_JSON"]).read_text())
    return result


def row(name: str, r: dict) -> str:
    e = r["eval"]
    s = e["seconds"]
    forwards = s["orig_forward"] + s["quant_forward"]
    kld = e["causal"]["kld"]
    bound = kld["topk_error_bound"]["mean"] or 0.0
    gib = 1 << 30
    return (
        f"| {name} | {e['texts']['tokens']} | {e['texts']['tokens'] / forwards:,.0f} | {r['wall']:.1f} | "
        f"{s['orig_load']:.1f} + {s['quant_load']:.1f} | {r['peak_gpu_nvml'] / gib:.1f} | "
        f"{r.get('peak_gpu_torch_reserved', 0) / gib:.1f} | {r['peak_rss'] / gib:.1f} | "
        f"{kld['value']:.4f} (+≤{bound:.4f}) |"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("work", type=Path)
    parser.add_argument("--layers", type=int, default=LLAMA_8B["layers"])
    parser.add_argument("--scheme", default="nf4-dq")
    parser.add_argument("--tokens", type=int, default=3072)
    parser.add_argument("--context", type=int, default=512)
    args = parser.parse_args()
    import torch

    src = args.work / f"llama8b-shaped-{args.layers}L"
    make_checkpoint(src, args.layers)
    add_tokenizer(src)
    quant = quantized(src, args.work / f"eval-{args.scheme}", args.scheme)
    rows = []
    for name, extra in PLANS.items():
        result = run_plan(quant, args.work, name, extra, args.tokens, args.context)
        rows.append(row(name, result))
        print(rows[-1], f"  plan: {result['eval']['memory']['reason']}", flush=True)
    device = torch.cuda.get_device_name(0)
    print(
        f"\n{time.strftime('%Y-%m-%d')}, {device}, torch {torch.__version__}, {platform.node()}: "
        f"`bnb eval --device cuda` on the {args.layers}-layer Llama-8B-shaped checkpoint "
        f"({args.scheme}, random weights), "
        f"{args.tokens} tokens in windows of {args.context}"
    )
    print(
        "| plan | tokens | tokens/s (forwards) | end to end s | load s (ORIG + QUANT) | peak GPU GiB (NVML) | "
        "peak GPU GiB (torch reserved) | peak host RSS GiB | mean KLD (top-k bound) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
