"""`bnb inspect` on the golden models: the injected outliers are found, and each scheme's reported error
equals the error of the golden quantized tensors (what bitsandbytes' CUDA kernels wrote) against src.

The golden src weights (golden/README.md) have one column scaled ×25 and one large value per matrix. The
test finds both in the stored tensors itself (the stored column with the largest mean |w|, the largest
|w| outside it) and checks inspect reports them. A Conv1D weight (gpt2) is stored [in, out]: its stored
column is an *output* dimension, which inspect reports on the "out" axis, at the transposed position.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from bnbcli.checkpoint.source import open_checkpoint
from bnbcli.checkpoint.tensor_reads import read_tensor
from bnbcli.inspect.criteria import OutlierCriteria
from bnbcli.inspect.gates import Gates
from bnbcli.inspect.outliers import layer_of
from bnbcli.inspect.report import AGAINST, InspectReport
from bnbcli.inspect.run import InspectRequest, inspect, open_source
from bnbcli.inspect.stats import tensor_stats
from bnbcli.pipeline.dequantize import restore
from bnbcli.plan.dequantize_layout import plan_component

from helpers.golden import golden_dir

MODELS = golden_dir() / "models"
FAMILIES = ("llama", "gpt2", "opt", "qwen2_tied", "flux_tiny")
# Round-trip errors are summed in float32 blocks and added in float64 (formats/metrics.py): ~1e-8 relative
# to a float64 computation here, well under this bound.
SUMS_REL = 1e-6
# golden variant → the inspect scheme that writes the same values
VARIANT_SCHEMES = {"nf4": "nf4", "nf4-dq": "nf4-dq", "fp4-dq": "fp4-dq", "int8": "int8", "nf4-storage-bf16": "nf4"}


def _variants(family: str) -> list[str]:
    return [v for v in VARIANT_SCHEMES if (MODELS / family / v).is_dir()]


@cache
def _report(src: str, schemes: tuple[str, ...] = (), against: str | None = None) -> InspectReport:
    request = InspectRequest(src=src, schemes=schemes or ("nf4",), against=against, backend="cpu")
    return inspect(request, open_source(request))


def _src_report(family: str) -> InspectReport:
    schemes = tuple(dict.fromkeys(VARIANT_SCHEMES[v] for v in _variants(family)))
    return _report(str(MODELS / family / "src"), schemes)


def _error(original: torch.Tensor, restored: torch.Tensor) -> tuple[float, float]:
    """(relative Frobenius error, max abs error), computed here in plain float64."""
    x, d = original.double(), original.double() - restored.double()
    return float(d.norm() / x.norm()), float(d.abs().max())


def _golden_restored(path: Path) -> dict[str, torch.Tensor]:
    """Every quantized weight of a golden variant, dequantized (int8: float32, as bitsandbytes'
    int8_vectorwise_dequant gives it), in the plain (stored) layout."""
    source = open_checkpoint(str(path)).components[""]
    return {
        t.name: restore(t, "cpu", cast=False) for t in plan_component(source, None, None).tensors if t.kind != "copy"
    }


@pytest.mark.parametrize("family", FAMILIES)
def test_errors_equal_the_golden_quantized_tensors(family: str) -> None:
    report = _src_report(family)
    src = {t.name: t for t in report.weights()}
    stored = open_checkpoint(str(MODELS / family / "src")).components[""].tensors
    for variant in _variants(family):
        scheme = VARIANT_SCHEMES[variant]
        restored = _golden_restored(MODELS / family / variant)
        assert set(restored) == set(src), f"{variant}: the weights inspect measures are the ones quantized"
        for name, values in restored.items():
            rel, max_abs = _error(read_tensor(stored[name]), values)
            reported = src[name].errors[scheme]
            assert reported is not None
            assert reported.rel_fro == pytest.approx(rel, rel=SUMS_REL, abs=0), f"{family}/{variant} {name}"
            assert reported.max_abs == pytest.approx(max_abs, rel=1e-9, abs=0), f"{family}/{variant} {name}"


@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "flux_tiny"])
def test_finds_the_injected_outlier_column_and_large_value(family: str) -> None:
    report = _src_report(family)
    stored = open_checkpoint(str(MODELS / family / "src")).components[""].tensors
    transposed = {
        t.name
        for t in plan_component(open_checkpoint(str(MODELS / family / "nf4")).components[""], None, None).tensors
        if t.transpose
    }
    weights = report.weights()
    layers = {layer_of(t.name) for t in weights} - {None}
    columns = set()
    for t in weights:
        w = read_tensor(stored[t.name]).double()
        column = int(w.abs().mean(0).argmax())  # the injected column, as stored
        columns.add(column)
        rest = w.clone()
        rest[:, column] = 0
        row, col = divmod(int(rest.abs().argmax()), w.shape[1])
        conv1d = t.name in transposed
        assert t.outliers is not None
        found = t.outliers.out_dims if conv1d else t.outliers.in_dims
        other = t.outliers.in_dims if conv1d else t.outliers.out_dims
        assert [d.dim for d in found] == [column], t.name
        assert other == (), t.name
        assert t.outliers.large_values == 1, t.name
        top = t.outliers.top_values[0]
        assert (top.row, top.col) == ((col, row) if conv1d else (row, col)), t.name
        assert top.value == pytest.approx(float(w[row, col]))
    (column,) = columns  # the same dimension in every matrix
    axis = "out" if transposed else "in"
    recurring = {(r.axis, r.dim): r for r in report.recurring}
    assert set(recurring) == {(axis, column)}
    assert set(recurring[(axis, column)].layers) == layers and len(layers) >= 2
    assert len(recurring[(axis, column)].tensors) == len(weights)


def test_flux_has_no_injected_outliers() -> None:
    report = _src_report("flux_tiny")
    assert report.weights() and report.recurring == ()
    assert all(t.outliers is not None and t.outliers.count == 0 for t in report.weights())


@pytest.mark.parametrize(
    ("family", "variant"),
    [("llama", v) for v in (*_variants("llama"), "int8-skip-down")] + [("gpt2", "nf4-dq"), ("flux_tiny", "int8")],
)
def test_bnb_checkpoint_is_recognised_and_compared_against_the_original(family: str, variant: str) -> None:
    path = MODELS / family / variant
    config = json.loads((path / "config.json").read_text())["quantization_config"]
    if config.get("load_in_8bit"):
        expected_format = "int8 rowwise"
    else:
        dq = " +dq" if config["bnb_4bit_use_double_quant"] else ""
        expected_format = f"{config['bnb_4bit_quant_type']} b64{dq}"
    report = _report(str(path), against=str(MODELS / family / "src"))
    assert report.kind == "bitsandbytes" and report.schemes == (AGAINST,)
    restored = _golden_restored(path)
    assert {t.name for t in report.weights()} == set(restored)
    assert {t.format for t in report.weights()} == {expected_format}
    skipped = set(config["llm_int8_skip_modules"] or ())
    src = {t.name: t for t in _src_report(family).weights()}
    scheme = VARIANT_SCHEMES.get(variant, "int8")
    originals = open_checkpoint(str(MODELS / family / "src")).components[""].tensors
    for t in report.tensors:
        if t.role != "weight":
            assert not t.errors and not t.format.startswith(("nf4", "fp4", "int8")), t.name
            continue
        assert not any(t.name.startswith(s + ".") or f".{s}." in t.name for s in skipped if s != "lm_head")
        error = t.errors[AGAINST]
        assert error is not None
        rel, max_abs = _error(read_tensor(originals[t.name]), restored[t.name])
        assert (error.rel_fro, error.max_abs) == pytest.approx((rel, max_abs), rel=SUMS_REL), t.name
        if t.name in src:  # the number inspecting the original gives under the scheme that wrote it (a Conv1D
            # weight is summed in its other orientation there: the same figure to the sums' rounding)
            expected = src[t.name].errors[scheme]
            assert expected is not None and error.rel_fro == pytest.approx(expected.rel_fro, rel=SUMS_REL), t.name


def test_stats_match_torch(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 70, generator=g, dtype=torch.float64) * 3 + 1
    x[0, 0], x[1, 1], x[2, 2], x[3, 3] = 0.0, float("nan"), float("inf"), 100.0
    s = tensor_stats(x.to(torch.float32))
    f = x.to(torch.float32).double()
    good = f[torch.isfinite(f)]
    mean, std = good.mean(), good.std(unbiased=False)
    assert (s.nan, s.inf, s.zeros, s.numel) == (1, 1, 1, x.numel())
    assert s.absmax == pytest.approx(100.0)
    assert s.std == pytest.approx(float(std), rel=1e-12)
    assert s.kurtosis == pytest.approx(float(((good - mean) ** 4).mean() / std**4 - 3), rel=1e-9)
    assert s.beyond_6sigma == pytest.approx(float(((good - mean).abs() > 6 * std).double().mean()))


def test_nonfinite_weight_is_reported_not_measured(tmp_path: Path) -> None:
    w = torch.randn(64, 64).to(torch.bfloat16)
    w[5, 7] = float("nan")
    save_file({"model.layers.0.mlp.up_proj.weight": w}, tmp_path / "model.safetensors")
    request = InspectRequest(str(tmp_path), schemes=("nf4", "int8"), backend="cpu", gates=Gates(max_nonfinite=0))
    report = inspect(request, open_source(request))
    (t,) = report.weights()
    assert t.errors == {"nf4": None, "int8": None} and t.note and "NaN" in t.note
    assert [f.gate for f in report.failures] == ["--max-nonfinite"]
    json.dumps(report.as_dict(), allow_nan=False)  # still one valid JSON document


def test_outlier_factor_is_tunable(tmp_path: Path) -> None:
    w = torch.randn(256, 64, generator=torch.Generator().manual_seed(1))
    w[:, 9] *= 4  # a column 4× the others: an outlier at factor 3, not at the default 5
    save_file({"model.layers.0.mlp.up_proj.weight": w}, tmp_path / "model.safetensors")
    for factor, dims in ((3.0, [9]), (5.0, [])):
        request = InspectRequest(str(tmp_path), backend="cpu", criteria=OutlierCriteria(factor=factor))
        (t,) = inspect(request, open_source(request)).weights()
        assert t.outliers is not None and [d.dim for d in t.outliers.in_dims] == dims


@pytest.mark.gpu
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_cuda_backend_reports_what_the_cpu_reports(family: str) -> None:
    """The bit-exact formats give the same restored values on both backends; only the sums of the errors
    differ: the CPU sums each block in float32 (pairwise, under 1e-6 relative: ``formats/metrics.py``), the
    GPU in float64. So the errors agree to 2e-6 relative and the rest exactly."""
    reports = {}
    for backend in ("cpu", "cuda"):
        request = InspectRequest(src=str(MODELS / family / "src"), schemes=("nf4", "fp4", "int8"), backend=backend)
        reports[backend] = inspect(request, open_source(request)).as_dict()
    cpu, cuda = reports["cpu"]["tensors"], reports["cuda"]["tensors"]
    assert [t["name"] for t in cpu] == [t["name"] for t in cuda]
    for a, b in zip(cpu, cuda, strict=True):
        assert {k: v for k, v in a.items() if k != "errors"} == {k: v for k, v in b.items() if k != "errors"}
        assert set(a["errors"]) == set(b["errors"])
        for scheme, error in a["errors"].items():
            other = b["errors"][scheme]
            assert (error is None) == (other is None), f"{a['name']} {scheme}"
            for key, value in (error or {}).items():
                assert other[key] == pytest.approx(value, rel=2e-6, abs=1e-12), f"{a['name']} {scheme} {key}"
