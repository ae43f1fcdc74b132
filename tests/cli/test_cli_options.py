"""The command line's options: declared once (bnbcli/cli/options.py), typed choices shown in --help and
checked before the command runs, and -q / -v meaning the same in every verb."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from typer.main import get_command

from bnbcli import output
from bnbcli.cli.app import app

from helpers.bnb_process import run_main
from helpers.eval_models import golden_pair
from helpers.golden import golden_dir

GPT2 = golden_dir() / "models" / "gpt2"
VERBS = ("quantize", "dequantize", "inspect", "footprint", "eval", "env")
SHARED = ("--backend", "--planner", "--dtype", "--compute-dtype", "--quant-storage", "--revision", "--components")
SHARED += ("--max-shard-size", "--skip", "--json", "--quiet", "--verbose", "--no-progress")


def _commands() -> dict[str, Any]:
    return dict(get_command(app).commands)  # type: ignore[attr-defined]


def _options(command: Any) -> dict[str, Any]:
    return {opt: param for param in command.params for opt in param.opts if opt.startswith("--")}


def test_verbs_are_named_alike() -> None:
    """Each verb is the function of its own module, named as the verb."""
    commands = _commands()
    assert sorted(commands) == sorted(VERBS)
    for verb, command in commands.items():
        assert command.callback.__name__ == verb
        assert command.callback.__module__ == f"bnbcli.cli.{verb}"


def test_every_verb_takes_q_and_v_declared_once() -> None:
    for verb, command in _commands().items():
        options = _options(command)
        assert options["--quiet"].opts == ["--quiet", "-q"], verb
        assert options["--verbose"].opts == ["--verbose", "-v"], verb
    for flag in SHARED:
        declared = {(p.help, str(p.metavar)) for c in _commands().values() if (p := _options(c).get(flag)) is not None}
        assert len(declared) == 1, f"{flag} is declared in more than one way: {declared}"


@pytest.mark.parametrize(
    ("verb", "flag", "shown"),
    [
        ("quantize", "--backend", "<auto|cpu|cuda>"),
        ("inspect", "--backend", "<auto|cpu|cuda>"),
        ("quantize", "--planner", "<auto|transformers|diffusers|name-rules>"),
        ("footprint", "--planner", "<auto|transformers|diffusers|name-rules>"),
        ("quantize", "--scheme", "<nf4|fp4|int8>"),
        ("inspect", "--gate-scheme", "<nf4|fp4|int8>"),
        ("dequantize", "--dtype", "<float16|bfloat16|float32>"),
        ("footprint", "--compute-dtype", "<float16|bfloat16|float32>"),
        ("quantize", "--quant-storage", "<uint8|int8|float16|bfloat16|float32|float64>"),
    ],
)
def test_choices_are_shown_in_help(verb: str, flag: str, shown: str, capsys, monkeypatch) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    code, stdout, _ = run_main([verb, "--help"], capsys, monkeypatch)
    assert code == 0
    line = next(line for line in stdout.splitlines() if f" {flag} " in line)
    assert shown in line
    assert "<str>" not in "".join(line for line in stdout.splitlines() if line.lstrip("│ ").startswith("--"))


def test_a_choice_takes_its_aliases(tmp_path: Path, capsys, monkeypatch) -> None:
    """--dtype bf16 is bfloat16, as parse_dtype (and a TOML preset) reads it; case does not matter."""
    code, stdout, stderr = run_main(["footprint", str(GPT2 / "src"), "--dtype", "BF16", "--json"], capsys, monkeypatch)
    assert code == 0, stderr
    assert json.loads(stdout)["settings"]["dtype"] == "bfloat16"


# ------------------------------------------------------------------------------------------- -q and -v

EVAL_SHORT = ("--context", "32", "--max-tokens", "40", "--device", "cpu")
PROGRESS = re.compile(r"^(quantizing|dequantizing|inspecting|tokens): ")


def _args(verb: str, tmp_path: Path, run: str) -> list[str]:
    out = str(tmp_path / run)
    pair = (tmp_path / "pair" / "int8", tmp_path / "pair" / "src")  # eval: gpt2 and its tokenizer (made below)
    return {
        "quantize": ["quantize", str(GPT2 / "src"), out],
        "dequantize": ["dequantize", str(GPT2 / "nf4"), out],
        "inspect": ["inspect", str(GPT2 / "src"), "--schemes", "nf4"],
        "footprint": ["footprint", str(GPT2 / "src")],
        "eval": ["eval", str(pair[0]), "--against", str(pair[1]), *EVAL_SHORT],
        "env": ["env"],
    }[verb]


@pytest.mark.parametrize("verb", VERBS)
def test_q_and_v_mean_the_same_in_every_verb(verb: str, tmp_path: Path, capsys, monkeypatch) -> None:
    """-q: nothing on stdout and no progress (stderr not a terminal here: the lines would show), warnings
    and errors only; -v: all that the plain run prints, and maybe more; --json's document stays with -q."""
    if verb == "eval":
        pytest.importorskip("transformers")
        pytest.importorskip("bitsandbytes")
        golden_pair(tmp_path / "pair", "gpt2", "int8")
    monkeypatch.setattr(output, "PROGRESS_LINE_SECONDS", 0.0)
    runs = {}
    for run, flags in {"plain": [], "quiet": ["-q"], "verbose": ["-v"], "quiet-json": ["-q", "--json"]}.items():
        code, stdout, stderr = run_main([*_args(verb, tmp_path, run), *flags], capsys, monkeypatch)
        assert code == 0, f"{run}: {stderr}"
        runs[run] = (stdout.replace(str(tmp_path / run), "OUT"), stderr)
    plain, quiet, verbose = runs["plain"][0], runs["quiet"][0], runs["verbose"][0]
    assert plain.strip(), "the plain run prints something"
    assert quiet == ""
    assert not [line for line in runs["quiet"][1].splitlines() if PROGRESS.match(line)]
    assert json.loads(runs["quiet-json"][0])["schema_version"] == 1
    assert len(verbose.splitlines()) >= len(plain.splitlines())
    # What the plain run says, -v says too (tables may be laid out anew: compared by their words), but for
    # a pointer to -v itself.
    said = "\n".join(line for line in plain.splitlines() if "-v" not in line)
    missing = set(re.findall(r"[A-Za-z_][\w.-]*", said)) - set(re.findall(r"[A-Za-z_][\w.-]*", verbose))
    assert not missing, missing
    if verb not in ("env", "footprint"):  # the others print progress in a CI log: -q silenced it above
        assert [line for line in runs["plain"][1].splitlines() if PROGRESS.match(line)]


def test_the_float_dtype_choices_are_the_dtypes_bitsandbytes_quantizes() -> None:
    """The command line's choices are spelled without torch (plan/scheme_names.py); the dtypes themselves
    live in formats/dtypes.py: one list, the other checked against it."""
    from typing import get_args

    from bnbcli.formats.dtypes import FLOAT_DTYPES, dtype_name
    from bnbcli.plan.scheme_names import FloatDtypeName

    assert get_args(FloatDtypeName) == tuple(dtype_name(d) for d in FLOAT_DTYPES)
