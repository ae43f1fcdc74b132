"""Every `hint:` is true: following it works (issue 16).

Each case below is a bad command whose `error:`/`hint:` pair this suite triggers: the cases of this file
and those of tests/cli/test_quantize_errors.py. The hint is read by the rules in FOLLOW (each turns one kind
of advice into the command it asks for: add this flag, use that value, run this first) and the command
the hint asks for must then succeed. A hint that no rule can follow must be one of NOT_HERE, advice that
a test cannot act out (download the file again, re-export the checkpoint); any other hint fails the test,
so a new hint comes with a way to follow it. The Hub's hints are followed in tests/cli/test_inputs.py (they
need a process of their own for HF_HUB_OFFLINE).
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from helpers.activation_model import save_model as save_model_with_tokenizer
from helpers.bnb_inprocess import Ran, bnb_here
from helpers.fuzz_harness import UP_PROJ, write_llama
from helpers.quantize_cases import CASES as QUANTIZE_CASES


def _cast_up_proj(dtype: torch.dtype) -> Callable[[dict[str, torch.Tensor]], None]:
    def change(tensors: dict[str, torch.Tensor]) -> None:
        tensors[UP_PROJ] = tensors[UP_PROJ].to(dtype)

    return change


@dataclass(frozen=True)
class Step:
    """What a hint asks for: run ``before`` first (each a bnb command that must succeed), then ``args``."""

    args: list[str]
    before: tuple[list[str], ...] = ()


def _set(args: list[str], flag: str, value: str | None) -> list[str]:
    """``args`` with ``flag`` given ``value`` (added, or its value replaced); ``None`` drops the flag."""
    if flag in args:
        i = args.index(flag)
        rest = args[:i] + args[i + 2 :]
    else:
        rest = list(args)
    return rest if value is None else [*rest, flag, value]


def _replace_rejected(args: list[str], error: str, value: str) -> list[str]:
    """The option the error is about (named, or whose value it quotes) set to ``value``."""
    for arg in args[:-1]:
        if arg.startswith("--") and arg in error:
            return _set(args, arg, value)
    for i, arg in enumerate(args):
        if f"'{arg}'" in error or f" {arg} " in f" {error} ":
            return [*args[:i], value, *args[i + 1 :]]
    raise AssertionError(f"no argument of {args} is what the error is about: {error}")


def _rewrite_toml(args: list[str], line: str) -> Step:
    """Replace the setting the hint shows in the TOML file given to --config."""
    path = Path(args[args.index("--config") + 1])
    path.write_text(line + "\n")
    return Step(args)


@dataclass(frozen=True)
class Context:
    args: list[str]  # the command that failed, after the verb
    verb: str
    error: str
    hint: str
    work: Path  # a folder for what following the hint makes
    model: Path  # a good model folder


Rule = Callable[[Context, re.Match[str]], Step]

# hint → the command it asks for; the first rule whose pattern is found in the hint applies.
FOLLOW: list[tuple[str, Rule]] = [
    (r"--dtype (\w+) casts it", lambda c, m: Step(_set(c.args, "--dtype", m[1]))),
    (r"^--skip ('[^']+'|\S+) keeps it", lambda c, m: Step([*c.args, "--skip", m[1].strip("'")])),
    (r"(?:pass|^add) (--[\w-]+)", lambda c, m: Step([*c.args, m[1]])),
    (r"use (--[\w-]+) ([\w.%-]+)", lambda c, m: Step(_set(c.args, m[1], m[2]))),
    (r"leave (--[\w-]+) out", lambda c, m: Step(_set(c.args, m[1], None))),
    (r"leave out the revision", lambda c, m: Step(_set(c.args, "--revision", None))),
    (
        r"(?:use one of|choose from|presets:|write it like|give a size like|^write(?= \d)) ([\w.-]+)",
        lambda c, m: Step(_replace_rejected(c.args, c.error, m[1])),
    ),
    (r"^([\d.]+) is the default", lambda c, m: Step(_replace_rejected(c.args, c.error, m[1]))),
    (
        r"for example ((?:--[\w-]+ [\w.-]+ ?)+)",
        lambda c, m: Step(_set_all(c.args, re.findall(r"(--[\w-]+) ([\w.-]+)", m[1]))),
    ),
    (r"(\w+ = \S+)$|a setting looks like (.+)$", lambda c, m: _rewrite_toml(c.args, m[1] or m[2])),
    (
        r"give (--[\w-]+) a file in a folder you can write",
        lambda c, m: Step(_set(c.args, m[1], str(c.work / "r.html"))),
    ),
    (
        r"write OUT elsewhere|^choose another OUT",
        lambda c, m: Step([c.args[0], str(c.work / "elsewhere"), *c.args[2:]]),
    ),
    (
        r"`bnb dequantize SRC OUT` writes one",
        lambda c, m: Step(
            [str(c.work / "plain"), *c.args[1:]], before=(["dequantize", c.args[0], str(c.work / "plain")],)
        ),
    ),
    (r"give a \.safetensors file, a model folder", lambda c, m: Step([str(c.model), *c.args[1:]])),
    (r"`bnb (\w+) --help` shows the usage", lambda c, m: Step(["--help"])),
]

# Advice a test cannot act out, and why.
NOT_HERE = {
    r"download it again|fetch the missing shard|re-export|download or save it again": "the file itself is broken",
    r"the file is corrupt or not a safetensors file|supported dtypes:": "the file itself is broken",
    r"shard names must be relative paths": "the index itself is broken",
    r"do not belong together": "the checkpoint contradicts its config.json",
    r"convert it to safetensors first": "the case's pickle is a stand-in, not a model",
    r"--components unet,vae": "needs a diffusers pipeline",
}


def _set_all(args: list[str], pairs: list[tuple[str, str]]) -> list[str]:
    for flag, value in pairs:
        args = _set(args, flag, value)
    return args


@dataclass(frozen=True)
class HintCase:
    verb: str
    build: Callable[[Path, Path], list[str]]  # (case folder, good model) → the arguments after the verb


def _with(*flags: str) -> Callable[[Path, Path], list[str]]:
    return lambda root, model: [str(model), *flags]


def _out(*flags: str) -> Callable[[Path, Path], list[str]]:
    return lambda root, model: [str(model), str(root / "out"), *flags]


def _weight_of(dtype: torch.dtype, verb_args: Callable[[Path], list[str]]) -> Callable[[Path, Path], list[str]]:
    return lambda root, model: verb_args(write_llama(root / "src", _cast_up_proj(dtype)))


def _with_tokenizer(*flags: str) -> Callable[[Path, Path], list[str]]:
    """A model that --activations can run (test_inspect_activations' tiny Llama and word tokenizer); a
    --text-file flag gets a file of one short text."""

    def build(root: Path, model: Path) -> list[str]:
        save_model_with_tokenizer(root / "act", inject=False)
        (root / "texts.txt").write_text("A zebra and a horse walk along the river bank at dawn.\n")
        return [str(root / "act"), *(f if f != "--text-file" else f"--text-file={root / 'texts.txt'}" for f in flags)]

    return build


def _quantized_file(root: Path, model: Path) -> list[str]:
    """An nf4-dq checkpoint's weights alone, without its config.json (row 8 of issue 16)."""
    ran = bnb_here("quantize", str(model), str(root / "q"), "--config", "nf4-dq", "-q")
    assert ran.code == 0, ran
    (root / "file").mkdir()
    shutil.copy(root / "q" / "model.safetensors", root / "file" / "model.safetensors")
    return [str(root / "file" / "model.safetensors"), str(root / "out")]


def _quantized_folder(root: Path, model: Path) -> list[str]:
    ran = bnb_here("quantize", str(model), str(root / "q"), "-q")
    assert ran.code == 0, ran
    return [str(root / "q")]


def _toml(text: str, *more: str) -> Callable[[Path, Path], list[str]]:
    def build(root: Path, model: Path) -> list[str]:
        root.mkdir(parents=True, exist_ok=True)
        (root / "my.toml").write_text(text)
        return [str(model), str(root / "out"), "--config", str(root / "my.toml"), *more]

    return build


def _odd_weight(*flags: str) -> Callable[[Path, Path], list[str]]:
    """A 3×3 weight: 5 packed bytes, which a 4-byte quant_storage cannot hold."""

    def build(root: Path, model: Path) -> list[str]:
        (root / "src").mkdir()
        save_file({"layer.fc.weight": torch.ones(3, 3, dtype=torch.bfloat16)}, root / "src" / "model.safetensors")
        return [str(root / "src"), str(root / "out"), *flags]

    return build


def _no_config(root: Path, model: Path) -> list[str]:
    write_llama(root / "src")
    (root / "src" / "config.json").unlink()
    return [str(root / "src"), str(root / "out"), "--planner", "transformers"]


CATALOG: dict[str, HintCase] = {
    "int64-weight": HintCase("quantize", _weight_of(torch.int64, lambda src: [str(src), str(src.parent / "out")])),
    "bool-weight": HintCase("quantize", _weight_of(torch.bool, lambda src: [str(src), str(src.parent / "out")])),
    "float64-weight": HintCase("quantize", _weight_of(torch.float64, lambda src: [str(src), str(src.parent / "out")])),
    "footprint-int64-weight": HintCase("footprint", _weight_of(torch.int64, lambda src: [str(src)])),
    "already-quantized-file": HintCase("quantize", _quantized_file),
    "footprint-already-quantized": HintCase("footprint", _quantized_folder),
    "gpu-memory-no-unit": HintCase("footprint", _with("--gpu-memory", "24")),
    "gpu-memory-zero": HintCase("footprint", _with("--gpu-memory", "0GB")),
    "footprint-max-shard-size-zero": HintCase("footprint", _with("--max-shard-size", "0")),
    "dequantize-max-shard-size-no-unit": HintCase(
        "dequantize", lambda root, model: [*_quantized_folder(root, model), str(root / "out"), "--max-shard-size", "2"]
    ),
    "footprint-unknown-scheme": HintCase("footprint", _with("--schemes", "nf5")),
    "footprint-seq-len-zero": HintCase("footprint", _with("--seq-len", "0")),
    "components-empty": HintCase("footprint", _with("--components", "")),
    "inspect-top-negative": HintCase("inspect", _with("--top", "-1")),
    "inspect-outlier-factor": HintCase("inspect", _with("--outlier-factor", "1")),
    "inspect-min-layer-share": HintCase("inspect", _with("--min-layer-share", "2")),
    "inspect-max-rel-error": HintCase("inspect", _with("--max-rel-error", "-1")),
    "inspect-activation-threshold": HintCase(
        "inspect", _with_tokenizer("--activations", "--activation-threshold", "-1")
    ),
    "activation-threshold-alone": HintCase("inspect", _with_tokenizer("--activation-threshold", "3")),
    "text-file-alone": HintCase("inspect", _with_tokenizer("--text-file")),
    "inspect-gate-scheme": HintCase("inspect", _with("--schemes", "nf4", "--gate-scheme", "int8")),
    "inspect-report-folder-missing": HintCase(
        "inspect", lambda root, model: [str(model), "--report", str(root / "missing" / "r.html")]
    ),
    "config-file-missing": HintCase(
        "quantize", lambda root, model: [str(model), str(root / "out"), "--config", "x.toml"]
    ),
    "config-wrong-type": HintCase("quantize", _toml("method = 5\n")),
    "config-bad-syntax": HintCase("quantize", _toml("method = \n")),
    "unknown-option": HintCase("quantize", _out("--frobnicate")),
    "missing-argument": HintCase("quantize", lambda root, model: [str(model)]),
    "not-an-integer": HintCase("quantize", _out("--blocksize", "abc")),
    "planner-needs-config": HintCase("quantize", _no_config),
    "quant-storage-too-wide": HintCase("quantize", _odd_weight("--quant-storage", "float32")),
    "revision-on-a-path": HintCase("quantize", _out("--revision", "v1")),
    "keep-budget-negative": HintCase("quantize", _out("--keep-budget", "-5%")),
    "keep-budget-over-100": HintCase("quantize", _out("--keep-budget", "150%")),
    "keep-budget-unreadable": HintCase("quantize", _out("--keep-budget", "abc")),
    "keep-budget-no-unit": HintCase("quantize", _out("--keep-budget", "10")),
    "target-size-too-small": HintCase("quantize", _out("--target-size", "1KB")),
    "target-size-unreadable": HintCase("quantize", _out("--target-size", "big")),
    "keep-budget-and-target-size": HintCase("quantize", _out("--keep-budget", "5%", "--target-size", "1GB")),
    "calibrate-without-budget": HintCase("quantize", _out("--calibrate")),
    "text-file-without-calibrate": HintCase(
        "quantize",
        lambda root, model: [*_with_tokenizer("--text-file")(root, model), str(root / "out"), "--keep-budget", "20%"],
    ),
    # a value outside an option's choices: Click refuses it before the command runs
    "backend-unknown": HintCase("quantize", _out("--backend", "gpu")),
    "scheme-unknown": HintCase("quantize", _out("--scheme", "nf5")),
    "dtype-unknown": HintCase("quantize", _out("--dtype", "float8")),
    "quant-storage-unknown": HintCase("quantize", _out("--quant-storage", "int4")),
    "planner-unknown": HintCase("footprint", _with("--planner", "transformer")),
    "compute-dtype-unknown": HintCase("footprint", _with("--compute-dtype", "fp8")),
    "gate-scheme-unknown": HintCase("inspect", _with("--schemes", "nf4", "--gate-scheme", "nf4-dq")),
}


def _quantize_case(name: str) -> HintCase:
    case = QUANTIZE_CASES[name]
    return HintCase("quantize", lambda root, model: case.build(root))


# tests/cli/test_quantize_errors.py's cases that fail (the others succeed, with no hint to follow)
ALL = {**CATALOG, **{f"quantize-errors/{n}": _quantize_case(n) for n, c in QUANTIZE_CASES.items() if c.code != 0}}


def follow(ctx: Context) -> Step | None:
    for pattern, rule in FOLLOW:
        if (m := re.search(pattern, ctx.hint)) is not None:
            return rule(ctx, m)
    return None


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_llama(tmp_path_factory.mktemp("hints") / "llama")


@pytest.mark.parametrize("name", list(ALL))
def test_following_the_hint_works(name: str, model: Path, tmp_path: Path) -> None:
    case = ALL[name]
    (tmp_path / "case").mkdir()
    args = case.build(tmp_path / "case", model)
    failed = bnb_here(case.verb, *args)
    assert failed.code in (1, 2), failed
    assert "Traceback" not in failed.stderr, failed
    error, hint = failed.error_and_hint()
    assert "internal error" not in error, failed
    (tmp_path / "work").mkdir()
    step = follow(Context(args, case.verb, error, hint, tmp_path / "work", model))
    if step is None:
        reasons = [why for pattern, why in NOT_HERE.items() if re.search(pattern, hint)]
        assert reasons, f"nothing here follows this hint, and it is not known to be unfollowable:\n{failed}"
        return
    for before in step.before:
        ran = bnb_here(*before)
        assert ran.code == 0, f"following the hint of\n{failed}\nthis failed:\n{ran}"
    followed: Ran = bnb_here(case.verb, *step.args)
    assert followed.code == 0, f"following the hint of\n{failed}\nthis failed:\n{followed}"
