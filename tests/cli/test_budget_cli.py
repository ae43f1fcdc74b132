"""`bnb quantize --keep-budget / --target-size` on the golden models: the budget is never exceeded (counted
from the files written), 0% is uniform, a budget larger than everything keeps everything and says so, the
dry run and the manifest say what was kept and why, and config.json's explicit skip list is what a loader
needs to keep exactly those modules."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from helpers.bnb_inprocess import bnb_here, quantize
from helpers.eval_models import with_tokenizer
from helpers.golden import golden_dir

MODELS = golden_dir() / "models"
LLAMA = MODELS / "llama" / "src"
SCHEMES = {
    "nf4": ["--scheme", "nf4"],
    "nf4-dq": ["--config", "nf4-dq"],
    "fp4": ["--scheme", "fp4"],
    "int8": ["--scheme", "int8"],
}


def dry_run(src: Path, *flags: str) -> dict:
    ran = bnb_here("quantize", str(src), "/nonexistent/out", "--dry-run", "--json", *flags)
    assert ran.code == 0, ran
    return ran.document()


def tensor_bytes(out: Path) -> int:
    """The tensor data of the weight files (each file less its 8-byte length and header)."""
    total = 0
    for path in out.glob("*.safetensors"):
        with path.open("rb") as f:
            header = struct.unpack("<Q", f.read(8))[0]
        total += path.stat().st_size - 8 - header
    return total


def file_bytes(out: Path) -> int:
    return sum(p.stat().st_size for p in out.glob("*.safetensors"))


def manifest(out: Path) -> dict:
    return json.loads((out / "bnb_manifest.json").read_text())


def skip_list(out: Path) -> list[str]:
    return json.loads((out / "config.json").read_text())["quantization_config"]["llm_int8_skip_modules"]


@pytest.fixture(scope="module")
def uniform(tmp_path_factory: pytest.TempPathFactory):
    made: dict[str, Path] = {}

    def get(scheme: str) -> Path:
        if scheme not in made:
            made[scheme] = tmp_path_factory.mktemp(f"uniform-{scheme}") / "out"
            quantize(LLAMA, made[scheme], *SCHEMES[scheme])
        return made[scheme]

    return get


@pytest.mark.parametrize("scheme", list(SCHEMES))
@pytest.mark.parametrize("budget", ["5%", "20%", "50%"])
def test_the_budget_is_never_exceeded(scheme: str, budget: str, uniform, tmp_path: Path) -> None:
    out = tmp_path / "out"
    quantize(LLAMA, out, *SCHEMES[scheme], "--keep-budget", budget)
    choice = manifest(out)["keep_budget"]
    grown = tensor_bytes(out) - tensor_bytes(uniform(scheme))
    assert choice["kept"], "every budget here has room for a module"
    assert 0 < grown <= choice["spent"] <= choice["allowance"]
    assert choice["allowance"] == int(float(budget.rstrip("%")) / 100 * choice["linear_bytes"])
    if scheme != "nf4-dq":  # exact without double quant; with it, spent counts the shortest nested_offset
        assert grown == choice["spent"]
    kept = {k["module"] for k in choice["kept"]}
    assert kept <= set(skip_list(out))
    assert set(skip_list(out)) - kept == set(skip_list(uniform(scheme)))  # the defaults, and nothing else


def test_zero_percent_is_uniform(uniform, tmp_path: Path) -> None:
    out = tmp_path / "out"
    quantize(LLAMA, out, "--config", "nf4-dq", "--keep-budget", "0%")
    for name in ("model.safetensors", "config.json"):
        assert (out / name).read_bytes() == (uniform("nf4-dq") / name).read_bytes(), name
    assert manifest(out)["keep_budget"]["kept"] == []


@pytest.mark.parametrize("budget", [["--keep-budget", "100%"], ["--keep-budget", "1GB"], ["--target-size", "1GB"]])
def test_a_budget_larger_than_everything_keeps_everything(budget: list[str], tmp_path: Path) -> None:
    ran = bnb_here("quantize", str(LLAMA), str(tmp_path / "out"), "--scheme", "nf4", *budget)
    assert ran.code == 0, ran
    assert "0 tensors quantized" in ran.stdout
    assert "keeps every one of the 14 modules" in ran.stdout  # and says so
    assert manifest(tmp_path / "out")["keep_budget"]["everything_kept"] is True


def test_target_size_bounds_the_whole_output(uniform, tmp_path: Path) -> None:
    smallest = file_bytes(uniform("nf4"))
    for extra in (40_000, 150_000):
        out = tmp_path / f"out{extra}"
        quantize(LLAMA, out, "--scheme", "nf4", "--target-size", f"{smallest + extra}B")
        assert smallest < file_bytes(out) <= smallest + extra
        assert manifest(out)["keep_budget"]["uniform_bytes"] == smallest


def test_target_size_exactly_the_smallest_output_is_uniform(uniform, tmp_path: Path) -> None:
    smallest = file_bytes(uniform("nf4"))
    quantize(LLAMA, tmp_path / "out", "--scheme", "nf4", "--target-size", f"{smallest}B")
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == (uniform("nf4") / "model.safetensors").read_bytes()


def test_dry_run_lists_the_kept_modules_with_bytes_and_why() -> None:
    ran = bnb_here("quantize", str(LLAMA), "/nonexistent/out", "--dry-run", "--keep-budget", "20%")
    assert ran.code == 0, ran
    plan = dry_run(LLAMA, "--keep-budget", "20%")
    choice = plan["keep_budget"]
    assert choice["method"].startswith("weights")
    assert len(choice["scores"]) == 14 and choice["candidates"] == 14
    ranks = [k["rank"] for k in choice["kept"]]
    assert ranks == sorted(ranks) and len(set(ranks)) == len(ranks)
    for kept in choice["kept"]:
        assert kept["module"] in ran.stdout and f"{kept['score']:.4g}" in ran.stdout
        assert kept["score"] == choice["scores"][kept["module"]] and kept["bytes"] > 0
        row = next(t for t in plan["components"][0]["tensors"] if t["name"] == kept["module"] + ".weight")
        assert row["action"] == "keep" and row["reason"].startswith(f"kept by the budget: rank {kept['rank']}")
    assert "keep budget: 20% of the Linear weights'" in ran.stdout
    assert "of the best possible choice's error saved" in ran.stdout
    assert 0 < choice["near_optimal_bound"] <= 1


def test_the_manifest_records_budget_method_and_scores(tmp_path: Path) -> None:
    quantize(LLAMA, tmp_path / "out", "--scheme", "nf4", "--keep-budget", "150KB")
    choice = manifest(tmp_path / "out")["keep_budget"]
    assert choice["budget"] == {"share": None, "size": 150_000, "target_size": None}
    assert choice["allowance"] == 150_000
    assert set(choice["scores"]) == {k.removesuffix(".weight") for k in _linear_weights()}
    assert all(w["rel_error"] > 0 for w in choice["weights"].values())


def _linear_weights() -> list[str]:
    plan = dry_run(LLAMA, "--scheme", "nf4")
    return [t["name"] for t in plan["components"][0]["tensors"] if t["action"] == "quantize"]


def test_the_same_input_gives_the_same_choice_and_bytes(tmp_path: Path) -> None:
    for name in ("a", "b"):
        quantize(LLAMA, tmp_path / name, "--config", "nf4-dq", "--keep-budget", "20%")
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()
    assert manifest(tmp_path / "a")["keep_budget"] == manifest(tmp_path / "b")["keep_budget"]


def test_calibrate_scores_every_module_on_text(tmp_path: Path) -> None:
    src = with_tokenizer(LLAMA, tmp_path / "src")
    (tmp_path / "texts.txt").write_text("The ferry left the harbour late.\nA second text, about bread.\n")
    plan = dry_run(src, "--keep-budget", "20%", "--calibrate", "--text-file", str(tmp_path / "texts.txt"))
    choice = plan["keep_budget"]
    assert choice["method"].startswith("calibrated") and choice["texts"] == 2
    assert len(choice["scores"]) == 14 and all(s > 0 for s in choice["scores"].values())
    assert choice["kept"]
    weights_only = dry_run(src, "--keep-budget", "20%")["keep_budget"]["scores"]
    assert choice["scores"] != weights_only


def test_footprint_shows_the_size_quantize_writes(tmp_path: Path) -> None:
    """`bnb footprint --keep-budget` chooses as bnb quantize does, and its files column is the files written."""
    ran = bnb_here("footprint", str(LLAMA), "--schemes", "nf4,int8", "--keep-budget", "20%", "--json")
    assert ran.code == 0, ran
    for scheme in ran.document()["schemes"]:
        out = tmp_path / scheme["name"]
        quantize(LLAMA, out, "--scheme", scheme["name"], "--keep-budget", "20%")
        assert scheme["keep_budget"] == manifest(out)["keep_budget"]
        assert scheme["file_bytes"] == file_bytes(out)
    text = bnb_here("footprint", str(LLAMA), "--schemes", "nf4", "--keep-budget", "20%")
    assert "nf4: kept in 16-bit by the budget" in text.stdout and "model.layers.1.self_attn.v_proj" in text.stdout


def test_footprint_without_a_budget_is_unchanged() -> None:
    ran = bnb_here("footprint", str(LLAMA), "--schemes", "nf4", "--json")
    assert ran.document()["schemes"][0]["keep_budget"] is None


def test_inspect_shows_the_choice_per_scheme(tmp_path: Path) -> None:
    ran = bnb_here("inspect", str(LLAMA), "--schemes", "nf4,int8", "--target-size", "700KB", "--json", "-q")
    assert ran.code == 0, ran
    choices = ran.document()["keep_budget"]
    assert set(choices) == {"nf4", "int8"}
    quantize(LLAMA, tmp_path / "out", "--scheme", "nf4", "--target-size", "700KB")
    assert {k: v for k, v in choices["nf4"].items() if k not in ("bytes_out", "file_bytes")} == manifest(
        tmp_path / "out"
    )["keep_budget"]
    assert choices["nf4"]["file_bytes"] == file_bytes(tmp_path / "out") <= 700_000
