"""`bnb inspect` as CI runs it: gate exit codes (0 pass, 1 fail naming each tensor, 2 usage), --json as one
document, the HTML report self-contained, bad input as one line without a traceback, and the wiring of
--activations (against a stand-in for bnbcli.inspect.activations). The gates and --json run as real `bnb`
processes (exit 0 and exit 1, stdout and stderr as CI sees them); the rest through main() in this process."""

from __future__ import annotations

import json
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from helpers.bnb_inprocess import bnb_here
from helpers.bnb_process import EXIT_FAILED, EXIT_USAGE, HANG_SECONDS, run_bnb
from helpers.golden import golden_dir

WEIGHTS = [f"model.layers.{i}.mlp.{p}.weight" for i in range(3) for p in ("up_proj", "down_proj")]
OUTLIER = "model.layers.1.mlp.up_proj.weight"  # the one matrix with an outlier input column


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """No config.json (name rules, no transformers import): six weights, a norm gain, an embedding."""
    folder = tmp_path_factory.mktemp("inspect") / "model"
    folder.mkdir()
    g = torch.Generator().manual_seed(0)
    tensors = {name: torch.randn(96, 64, generator=g).to(torch.bfloat16) for name in WEIGHTS}
    tensors[OUTLIER][:, 5] *= 20
    tensors["model.layers.0.input_layernorm.weight"] = torch.ones(64, dtype=torch.bfloat16)
    tensors["model.embed_tokens.weight"] = torch.randn(100, 64, generator=g).to(torch.bfloat16)
    save_file(tensors, folder / "model.safetensors")
    return folder


def _failed_tensors(stderr: str) -> set[str]:
    return {line.split(": ", 2)[1] for line in stderr.splitlines() if line.startswith("fail: ")}


def test_gates_pass_with_exit_0(model: Path) -> None:
    result = run_bnb("inspect", str(model), "--max-rel-error", "0.5", "--max-outlier-dims", "1", "--max-nonfinite", "0")
    assert result.returncode == 0, result.stderr
    assert "fail:" not in result.stderr
    assert "model.layers.1.mlp.up_proj.weight" in result.stdout


def test_rel_error_gate_fails_with_exit_1_naming_each_tensor(model: Path) -> None:
    result = run_bnb("inspect", str(model), "--max-rel-error", "0.05", "--gate-scheme", "nf4", "--json")
    assert result.returncode == EXIT_FAILED
    document = json.loads(result.stdout)  # the report still comes, as one document
    expected = {t["name"] for t in document["tensors"] if (t["errors"].get("nf4") or {}).get("rel_fro", 0) > 0.05}
    assert expected == set(WEIGHTS)  # nf4's error on Gaussian weights is ~10%
    assert _failed_tensors(result.stderr) == expected
    assert document["gates"]["passed"] is False
    assert {f["scheme"] for f in document["gates"]["failures"]} == {"nf4"}
    assert "Traceback" not in result.stderr and "error: 6 tensors failed the gates" in result.stderr


def test_outlier_gate_names_only_the_matrix_with_an_outlier(model: Path) -> None:
    result = bnb_here("inspect", str(model), "--max-outlier-dims", "0", "--schemes", "int8")
    assert result.code == EXIT_FAILED
    assert _failed_tensors(result.stderr) == {OUTLIER}


def test_json_is_one_parseable_document(model: Path) -> None:
    result = run_bnb("inspect", str(model), "--json", "--schemes", "nf4,fp4-dq,int8")
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)  # fails on a second document or any other text
    assert document["schema_version"] == 1
    assert document["settings"]["schemes"] == ["nf4", "fp4-dq", "int8"]
    weights = [t for t in document["tensors"] if t["role"] == "weight"]
    assert {t["name"] for t in weights} == set(WEIGHTS)
    assert all(set(t["errors"]) == {"nf4", "fp4-dq", "int8"} for t in weights)
    (row,) = [t for t in weights if t["name"] == OUTLIER]
    assert [d["dim"] for d in row["outliers"]["in_dims"]] == [5]
    assert result.stderr == ""


def test_html_report_is_self_contained(model: Path, tmp_path: Path) -> None:
    page = tmp_path / "report.html"
    result = bnb_here("inspect", str(model), "--report", str(page), "-q", "--min-layer-share", "0.3")
    assert result.code == 0, result
    html = page.read_text()
    assert html.startswith("<!DOCTYPE html>") and html.count("<svg") >= 1
    assert "http://" not in html and "https://" not in html and "<script" not in html
    assert "model.layers.1.mlp.up_proj.weight" in html and result.stdout == ""


def test_golden_llama_html_has_bars_and_heatmap(tmp_path: Path) -> None:
    page = tmp_path / "llama.html"
    src = golden_dir() / "models" / "llama" / "src"
    result = bnb_here("inspect", str(src), "--report", str(page), "--planner", "name-rules", "--schemes", "nf4", "-q")
    assert result.code == 0, result
    html = page.read_text()
    assert html.count("<svg") == 2 and "dim 3 (in)" in html
    assert "http://" not in html and "https://" not in html


@pytest.mark.parametrize(
    "args",
    [
        ("--max-rel-error", "-1"),
        ("--schemes", "nf5"),
        ("--schemes", "nf4", "--gate-scheme", "int8"),
        ("--text-file", "texts.txt"),
        ("--against", "."),
        ("--outlier-factor", "0.5"),
        ("--backend", "cpu", "--backend", "tpu"),
        ("--max-outlier-dims", "two"),
    ],
)
def test_usage_errors_exit_2(
    model: Path, args: tuple[str, ...], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from bnbcli.cli.app import main

    monkeypatch.chdir(model)  # "." for --against: an unquantized folder
    monkeypatch.delenv("BNB_DEBUG", raising=False)
    monkeypatch.setattr(sys, "argv", ["bnb", "inspect", str(model), "--backend", "cpu", *args])
    with pytest.raises(SystemExit) as exit_:
        main()
    captured = capsys.readouterr()
    assert exit_.value.code == EXIT_USAGE, captured.err
    assert "Traceback" not in captured.err and captured.out == ""


def test_bad_input_is_one_line_exit_1(tmp_path: Path) -> None:
    missing = bnb_here("inspect", str(tmp_path / "missing"))
    assert missing.code == EXIT_FAILED
    assert missing.stderr.startswith("error:") and "Traceback" not in missing.stderr
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    result = bnb_here("inspect", str(broken))
    assert result.code == EXIT_FAILED and "Traceback" not in result.stderr
    assert [line for line in result.stderr.splitlines() if line.startswith("error:")]


# --- --activations wiring, in-process, with a stand-in for the activations module ---------------


@dataclass(frozen=True)
class _Criteria:
    threshold: float = 6.0
    min_layer_share: float = 0.25
    min_position_share: float = 0.06


@dataclass
class _Calls:
    seen: list[dict] = field(default_factory=list)


def _fake_activations(calls: _Calls) -> types.ModuleType:
    module = types.ModuleType("bnbcli.inspect.activations")

    class Report:
        def as_dict(self) -> dict:
            return {
                "model_class": "FakeModel",
                "tokens": 7,
                "outlier_dims": [
                    {
                        "dim": 3,
                        "layer_count": 2,
                        "layer_share": 1.0,
                        "position_share": 0.5,
                        "max_magnitude": 42.0,
                        "layers": ["a", "b"],
                    }
                ],
                "suggested_threshold": 6.0,
                "suggested_skip_modules": [],
            }

    def find_activation_outliers(model_dir, texts=None, criteria=_Criteria(), device="cpu"):
        calls.seen.append({"model_dir": model_dir, "texts": texts, "criteria": criteria, "device": device})
        return Report()

    module.ActivationCriteria = _Criteria  # type: ignore[attr-defined]
    module.find_activation_outliers = find_activation_outliers  # type: ignore[attr-defined]
    return module


def test_activations_are_wired_into_json_and_html(
    model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from bnbcli.cli.app import main

    calls = _Calls()
    monkeypatch.setitem(sys.modules, "bnbcli.inspect.activations", _fake_activations(calls))
    texts = tmp_path / "texts.txt"
    texts.write_text("hello world\n\nsecond text\n")
    page = tmp_path / "r.html"
    argv = [
        "bnb",
        "inspect",
        str(model),
        "--schemes",
        "int8",
        "--activations",
        "--text-file",
        str(texts),
        "--activation-threshold",
        "4.5",
        "--json",
        "--report",
        str(page),
        "--backend",
        "cpu",
    ]
    monkeypatch.setattr(sys, "argv", argv)
    main()
    document = json.loads(capsys.readouterr().out)
    assert document["activations"]["model_class"] == "FakeModel"
    (call,) = calls.seen
    assert call["texts"] == ["hello world", "second text"] and call["criteria"].threshold == 4.5
    assert Path(call["model_dir"]).resolve() == model.resolve() and call["device"] == "cpu"
    assert "Activations" in page.read_text() and "FakeModel" in page.read_text()


def test_without_activations_the_module_is_not_imported(model: Path) -> None:
    code = (
        "import sys; from bnbcli.cli.app import main; sys.argv=['bnb','inspect',sys.argv[1],'--schemes','int8','-q']\n"
        "try:\n    main()\nfinally:\n    assert 'bnbcli.inspect.activations' not in sys.modules\n"
        "    assert 'transformers' not in sys.modules"
    )
    import subprocess

    result = subprocess.run(
        [sys.executable, "-c", code, str(model)], capture_output=True, text=True, timeout=HANG_SECONDS
    )
    assert result.returncode == 0, result.stderr
