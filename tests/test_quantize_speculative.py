"""The speculative start (bnbcli.quantize.quantize_while_planning): weights are written on the name-rules
draft while transformers plans; the result is always the real plan's files, whether the draft is kept,
thrown away, or the planning fails."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from concurrent.futures import Future
from dataclasses import replace
from pathlib import Path

import pytest
from golden import golden_dir

import bnbcli.output_plan as output_plan
from bnbcli.errors import InputError
from bnbcli.quantize import (
    QuantizeRequest,
    can_start_before_planning,
    open_source,
    plan_request,
    quantize,
    quantize_while_planning,
)
from bnbcli.scheme import QuantScheme

SRC = golden_dir() / "models" / "gpt2" / "src"  # Conv1D: the draft must transpose as transformers does
MANIFEST = "bnb_manifest.json"


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _same_checkpoint(a: Path, b: Path) -> None:
    ours, theirs = _files(a), _files(b)
    assert sorted(ours) == sorted(theirs)
    for name in ours:
        if name == MANIFEST:  # everything but the run's time and place
            first, second = json.loads(ours[name]), json.loads(theirs[name])
            first.pop("run"), second.pop("run")
            assert first == second
        else:
            assert ours[name] == theirs[name], name


def _request(out: Path) -> QuantizeRequest:
    return QuantizeRequest(src=str(SRC), out=out, scheme=QuantScheme(method="nf4", double_quant=True), backend="cpu")


def _planned(out: Path) -> Path:
    request = _request(out)
    quantize(request, plan_request(request), lambda n: None)
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The checkpoint written the plain way: plan first, then execute."""
    return _planned(tmp_path_factory.mktemp("planned") / "out")


def _spy_progress() -> tuple[list[int], object]:
    seen: list[int] = []
    return seen, seen.append


def test_it_applies_here(monkeypatch: pytest.MonkeyPatch) -> None:
    import bnbcli.quantize as module

    for name in ("transformers", "diffusers"):  # as in a fresh `bnb` process
        monkeypatch.delitem(sys.modules, name, raising=False)
    request = _request(Path("x"))
    checkpoint = open_source(request)
    assert not can_start_before_planning(request, checkpoint)  # too small to gain anything
    monkeypatch.setattr(module.isolated, "SPECULATE_MIN_BYTES", checkpoint.tensor_bytes)
    assert can_start_before_planning(request, checkpoint)  # transformers is installed for the tests
    assert not can_start_before_planning(replace(request, planner="name-rules"), checkpoint)
    assert not can_start_before_planning(replace(request, resume=True), checkpoint)


def test_kept_draft_gives_the_planned_files(reference: Path, tmp_path: Path) -> None:
    request = _request(tmp_path / "out")
    checkpoint = open_source(request)
    seen, progress = _spy_progress()
    outcome = quantize_while_planning(request, checkpoint, progress)
    assert outcome.plan.components[0].planner == "transformers"
    assert outcome.manifest["run"]["planning"]["draft"] == "kept"
    assert outcome.manifest["run"]["planning"]["planned_in"] == "a child process"
    _same_checkpoint(outcome.out, reference)
    assert sum(seen) == checkpoint.tensor_bytes
    assert len(seen) == sum(len(source.tensors) for source in checkpoint.components.values())  # a call a tensor


def test_wrong_draft_is_thrown_away(reference: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A draft that keeps one weight the real plan quantizes: its files are discarded, the real plan's
    written, and neither the progress bar nor its count of tensors runs past the total."""
    real_plan_model = output_plan.plan_model
    drafts = []

    def plan_model(config, shapes, scheme, planner=None):
        plan = real_plan_model(config, shapes, scheme, planner=planner)
        if planner != "name-rules":
            return plan
        name = plan.quantized[0]
        decisions = dict(plan.decisions)
        decisions[name] = replace(decisions[name], action="keep", reason="a wrong draft")
        drafts.append(name)
        return replace(plan, decisions=decisions)

    monkeypatch.setattr(output_plan, "plan_model", plan_model)
    request = _request(tmp_path / "out")
    checkpoint = open_source(request)
    seen, progress = _spy_progress()
    outcome = quantize_while_planning(request, checkpoint, progress)
    assert drafts, "the draft was planned"
    assert outcome.manifest["run"]["planning"]["draft"] == "discarded"
    _same_checkpoint(outcome.out, reference)
    assert sum(seen) == checkpoint.tensor_bytes
    assert len(seen) == sum(len(source.tensors) for source in checkpoint.components.values())  # a call a tensor
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary folder or lock left


def test_child_errors_come_back_whole() -> None:
    """An input error found by the planner in the child is raised here, the same class, hint included."""
    from bnbcli.planning.isolated import plan_in_child

    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "quantization_config": {"x": 1}}
    future = plan_in_child(config, {}, QuantScheme())
    with pytest.raises(InputError, match="already quantized") as raised:
        future.result(timeout=120)
    assert raised.value.hint


def test_child_plans_what_this_process_plans() -> None:
    from bnbcli.checkpoint.source import open_checkpoint
    from bnbcli.output_plan import tensor_shapes
    from bnbcli.plan import plan_quantization
    from bnbcli.planning.isolated import plan_in_child

    source = open_checkpoint(str(SRC)).components[""]
    scheme = QuantScheme(method="int8", skip=("mlp",))
    there = plan_in_child(source.config, tensor_shapes(source), scheme).result(timeout=120)
    here = plan_quantization(source.config, tensor_shapes(source), scheme, planner=None)
    assert there.planner == "transformers"
    assert there == here


def test_planning_here_stops_a_child_that_was_never_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    """A child started early (for a speculative run) that the run then does not ask — the plan cache
    answered, or the run plans first — is ended at once instead of importing transformers on a core for
    nothing; a child that has answered is kept for the next request (the tests and the fuzzer plan often)."""
    from bnbcli.planning import isolated

    asked = isolated._child()
    asked.asked = True  # as after a request
    plan_request(_request(Path("x")))
    assert isolated._running is asked and asked.proc.poll() is None

    monkeypatch.setattr(isolated, "_running", None)  # undone after the test: the answered child comes back
    unasked = isolated._child()
    plan_request(_request(Path("x")))
    assert isolated._running is None and unasked.proc.wait(timeout=10) is not None


def test_failed_planning_stops_the_draft(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The real planner fails while the draft is being written: the error comes out, the draft's thread
    has stopped, and nothing is left beside OUT."""

    def failing(config, tensors, scheme) -> Future:
        future: Future = Future()
        timer = threading.Timer(0.2, future.set_exception, [InputError("the real planner failed", hint="a test")])
        timer.start()  # while the draft is under way
        return future

    import bnbcli.quantize as module

    monkeypatch.setattr(module, "plan_in_child", failing)
    request = _request(tmp_path / "out")
    with pytest.raises(InputError, match="real planner failed") as raised:
        quantize_while_planning(request, open_source(request), lambda n: None)
    assert raised.value.hint == "a test"
    run_threads = ("bnb-draft", "bnb-read", "bnb-write", "bnb-out")  # not the shared part-reading pool
    assert not [t for t in threading.enumerate() if t.name.startswith(run_threads) and "part" not in t.name]
    assert list(tmp_path.iterdir()) == []


def test_the_command_starts_the_child_early_only_when_it_will_ask(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from bnbcli.planning import isolated

    started: list[bool] = []
    monkeypatch.setattr(isolated, "_child", lambda: started.append(True))
    monkeypatch.setattr(isolated, "SPECULATE_MIN_BYTES", 1000)
    src = tmp_path / "src"
    src.mkdir()
    (src / "model.safetensors").write_bytes(b"x" * 1000)

    def starts(*argv: str) -> bool:
        started.clear()
        isolated.start_early(list(argv))
        return bool(started)

    assert not starts("quantize", str(src), "out")  # no config.json: name rules
    (src / "config.json").write_text("{}")
    assert starts("quantize", str(src), "out", "--scheme", "nf4")
    assert not starts("quantize", str(src), "out", "--dry-run")
    assert not starts("quantize", str(src), "out", "--planner=name-rules")
    assert not starts("quantize", str(src), "out", "--planner", "transformers")
    assert starts("quantize", str(src), "out", "--planner", "auto")
    assert starts("quantize", str(src), "out", "--planner=auto")
    assert not starts("quantize", str(src), "out", "--resume")
    assert not starts("inspect", str(src), "out")
    assert not starts("quantize", "--scheme", "nf4")
    monkeypatch.setattr(isolated, "SPECULATE_MIN_BYTES", 1001)
    assert not starts("quantize", str(src), "out")  # too small


def test_the_planner_child_imports_transformers_without_scikit_learn() -> None:
    """The child hides packages planning never uses (scikit-learn: seconds of transformers' import when
    it is installed), and still has transformers ready to plan."""
    code = (
        "import importlib.util, sys\n"
        "from bnbcli.planning import isolated\n"
        "isolated._preload()\n"
        "assert importlib.util.find_spec('sklearn') is None and 'sklearn' in sys.modules\n"
        "assert 'transformers.modeling_utils' in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
