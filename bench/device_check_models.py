"""On a GPU machine: load what `bnb quantize` wrote with a plain from_pretrained(OUT) on the GPU and
compare its logits with the golden logits bitsandbytes + transformers produced (H100, same ids).

    PYTHONPATH=. python bench/device_check_models.py WORK_DIR [GOLDEN_MODELS_DIR]

GOLDEN_MODELS_DIR defaults to the project's own golden set (tests/helpers/golden.py: tests/data/golden, its outputs
rebuilt and verified byte for byte).

Prints one line per family/variant and `models: M/T logits identical`; exits 1 on any difference.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from bnbcli.cli.app import app

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from helpers.golden import VARIANT_FLAGS, golden_dir


def main(models: Path, work: Path) -> int:
    from transformers import AutoModelForCausalLM

    meta = json.loads((models / "logits_meta.json").read_text())
    golden_logits = load_file(models / "logits.safetensors")
    work.mkdir(parents=True, exist_ok=True)
    ids = torch.tensor(meta["input_ids"]).cuda()
    total = same = 0
    for family in sorted(p for p in models.iterdir() if p.is_dir()):
        for variant in sorted(p for p in family.iterdir() if p.is_dir() and p.name != "src"):
            out = work / f"{family.name}-{variant.name}"
            result = CliRunner().invoke(
                app,
                [
                    "quantize",
                    str(family / "src"),
                    str(out),
                    "-q",
                    "--overwrite",
                    "--backend",
                    "cpu",
                    *VARIANT_FLAGS[variant.name],
                ],
            )
            if result.exit_code != 0:
                print(f"{family.name}/{variant.name}: quantize failed: {result.output} {result.exception!r}")
                total += 1
                continue
            key = f"{family.name}__{variant.name}"
            total += 1
            if family.name == "flux_tiny":
                ok, note = check_flux(out, variant)  # the golden variant's folder
            else:
                model = AutoModelForCausalLM.from_pretrained(out)
                with torch.no_grad():
                    logits = model(ids).logits.float().cpu()
                expected = golden_logits[key]
                ok = torch.equal(logits, expected)
                note = "identical" if ok else f"max abs diff {float((logits - expected).abs().max()):.3g}"
                if variant.name == "int8-skip-down" and not ok:
                    note += " (expected: ours keeps lm_head in bf16, transformers quantized it)"
                del model
            same += ok
            print(f"{family.name}/{variant.name}: {note}")
    print(f"models: {same}/{total} logits identical")
    return 0 if same == total else 1


def check_flux(out: Path, golden: Path) -> tuple[bool, str]:
    """diffusers loads ours and the golden variant; same state and the same forward output."""
    from diffusers import FluxTransformer2DModel

    ours = FluxTransformer2DModel.from_pretrained(out)
    theirs = FluxTransformer2DModel.from_pretrained(golden)
    torch.manual_seed(0)
    cfg = ours.config
    tokens, txt = 16, 8
    inputs = dict(
        hidden_states=torch.randn(1, tokens, cfg.in_channels, device="cuda", dtype=torch.bfloat16),
        encoder_hidden_states=torch.randn(1, txt, cfg.joint_attention_dim, device="cuda", dtype=torch.bfloat16),
        pooled_projections=torch.randn(1, cfg.pooled_projection_dim, device="cuda", dtype=torch.bfloat16),
        timestep=torch.tensor([0.5], device="cuda", dtype=torch.bfloat16),
        img_ids=torch.zeros(tokens, 3, device="cuda", dtype=torch.bfloat16),
        txt_ids=torch.zeros(txt, 3, device="cuda", dtype=torch.bfloat16),
    )
    with torch.no_grad():
        a = ours(**inputs).sample
        b = theirs(**inputs).sample
    ok = torch.equal(a, b)
    return (
        ok,
        "diffusers forward identical to the golden variant" if ok else f"max abs diff {float((a - b).abs().max()):.3g}",
    )


if __name__ == "__main__":
    work_dir = Path(sys.argv[1])
    sys.exit(main(Path(sys.argv[2]) if len(sys.argv) > 2 else golden_dir() / "models", work_dir))
