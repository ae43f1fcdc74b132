"""`bnb eval QUANT [--against ORIG]`: how far a bitsandbytes checkpoint's outputs are from its original's."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from bnbcli import output
from bnbcli.cli.options import JsonFlag, NoProgressFlag, QuietFlag, ReportOption, VerboseFlag, output_path
from bnbcli.errors import GateFailed, UsageError
from bnbcli.eval import DEFAULT_TOP_K, check_top_k
from bnbcli.units import parse_size

if TYPE_CHECKING:  # the command line is imported without torch: the library comes in when the command runs
    from bnbcli.eval.report import EvalReport

FITS = (
    "Memory, defaults (bf16 ORIG, nf4 QUANT, one GPU): side by side up to ~8B parameters on 24 GB, ~14B on 40 GB, "
    "~29B on 80 GB, ~53B on 141 GB; one at a time (ORIG alone must fit) up to ~10B, ~18B, ~38B, ~68B."
)


Quant = Annotated[
    str,
    typer.Argument(help="A bitsandbytes checkpoint (folder or Hub repo id), e.g. bnb quantize's OUT."),
]
Against = Annotated[
    str | None,
    typer.Option(
        "--against",
        metavar="ORIG",
        help="The original (folder or Hub repo id); default: the source in QUANT's manifest.",
    ),
]
TextFile = Annotated[
    Path | None,
    typer.Option("--text-file", metavar="FILE", help="One text per line (default: ~3,200 built-in tokens)."),
]
Context = Annotated[int | None, typer.Option("--context", help="Join the texts and run them in windows of N tokens.")]
MaxTokens = Annotated[int | None, typer.Option("--max-tokens", help="Stop after N tokens.")]
Device = Annotated[
    str,
    typer.Option("--device", metavar="<auto|cpu|cuda|cuda:N>", help="auto: a GPU when torch sees one, else cpu."),
]
OneAtATime = Annotated[
    bool, typer.Option("--one-at-a-time", help="Run ORIG over every text first, keep its top-k, free it, then QUANT.")
]
TopK = Annotated[
    str, typer.Option("--top-k", metavar="<N|all>", help="One at a time: ORIG's tokens kept per position (all: exact).")
]
MaxMemory = Annotated[
    str | None,
    typer.Option(
        "--max-memory", metavar="SIZE", help="Memory the run may use on the device, e.g. 20GB (default: free)."
    ),
]
MaxKld = Annotated[float | None, typer.Option("--max-kld", help="Gate: mean KLD above X fails.")]
MinTop1 = Annotated[float | None, typer.Option("--min-top1", help="Gate: same top-1 share (0-1) below X fails.")]
MaxPplRatio = Annotated[float | None, typer.Option("--max-ppl-ratio", help="Gate: PPL(QUANT)/PPL(ORIG) above X fails.")]
MinCosine = Annotated[
    float | None, typer.Option("--min-cosine", help="Gate: output cosine below X fails (encoders: embedding cosine).")
]


def eval(
    quant: Quant,
    against: Against = None,
    text_file: TextFile = None,
    context: Context = None,
    max_tokens: MaxTokens = None,
    device: Device = "auto",
    one_at_a_time: OneAtATime = False,
    top_k: TopK = str(DEFAULT_TOP_K),
    max_memory: MaxMemory = None,
    max_kld: MaxKld = None,
    min_top1: MinTop1 = None,
    max_ppl_ratio: MaxPplRatio = None,
    min_cosine: MinCosine = None,
    report_file: ReportOption = None,
    json_output: JsonFlag = False,
    quiet: QuietFlag = False,
    verbose: VerboseFlag = False,
    no_progress: NoProgressFlag = False,
) -> None:
    """Run QUANT and its original on the same tokens, with bitsandbytes' own kernels, and print what
    `llama-perplexity --kl-divergence` prints (PPL ratio, KLD and its percentiles, same top-1, RMS Δp) — or, for
    an encoder, the cosines of its hidden states and embeddings — and each layer's hidden-state error.
    Gates exit 1 and name what failed."""
    from bnbcli.eval.gates import EvalGates

    # The arguments first, without torch: a mistyped one is reported in a moment.
    gates = EvalGates(max_kld, min_top1, max_ppl_ratio, min_cosine)
    keep_top_k = _top_k(top_k)
    memory = parse_size(max_memory) if max_memory is not None else None

    from bnbcli.eval.html import check_report_path
    from bnbcli.eval.run import EvalRequest, evaluate, prepare
    from bnbcli.eval.texts import read_text_file

    report_path = output_path(report_file, "--report", "file") if report_file is not None else None
    if report_path is not None:
        check_report_path(report_path)  # before the models run, which may take minutes
    request = EvalRequest(
        quant=quant,
        against=against,
        texts=tuple(read_text_file(text_file)) if text_file is not None else None,
        text_source=str(text_file) if text_file is not None else "built-in",
        context=context,
        max_tokens=max_tokens,
        device=device,
        one_at_a_time=one_at_a_time,
        top_k=keep_top_k,
        max_memory=memory,
        gates=gates,
    )
    prepared = prepare(request)
    with output.CountProgress(prepared.total_tokens, "tokens", enabled=not no_progress, bar=not json_output) as bar:
        report = evaluate(prepared, bar.advance)
    _emit(report, report_path, json_output, quiet, verbose)


def _emit(report: EvalReport, report_path: Path | None, json_output: bool, quiet: bool, verbose: bool) -> None:
    """The HTML report, stdout (JSON or the table), then the gates: each failure named, exit 1."""
    if report_path is not None:
        from bnbcli.eval.html import write_report

        write_report(report, report_path)
    if json_output:
        output.emit_json(report.as_dict())
    elif not quiet:
        from bnbcli.eval.terminal import render

        render(report, verbose)
    for failure in report.failures:
        output.failure(failure.line())
    if report.failures:
        names = ", ".join(f.gate for f in report.failures)
        raise GateFailed(
            f"{len(report.failures)} gate{'s' if len(report.failures) != 1 else ''} failed: {names}",
            hint="the figures are above (or in --json); bnb quantize --scheme int8, or --skip on the layers that "
            "diverge, loses less",
        )


eval.__doc__ = f"{eval.__doc__}\n\n    {FITS}"


def _top_k(text: str) -> int | None:
    if text == "all":
        return None
    try:
        top_k = int(text)
    except ValueError:
        raise UsageError(
            f"--top-k {text}: a number of tokens, or all", hint=f"the default is {DEFAULT_TOP_K}"
        ) from None
    check_top_k(top_k)
    return top_k
