"""The speculative start (bnbcli.quantize.quantize_while_planning): weights are written on the name-rules
draft while transformers plans; the result is always the real plan's files, whether the draft is kept,
thrown away, or the planning fails."""

from __future__ import annotations

import json
import threading
import time
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


def test_it_applies_here() -> None:
    assert can_start_before_planning(_request(Path("x")))  # transformers is installed for the tests
    assert not can_start_before_planning(replace(_request(Path("x")), planner="name-rules"))
    assert not can_start_before_planning(replace(_request(Path("x")), resume=True))


def test_kept_draft_gives_the_planned_files(reference: Path, tmp_path: Path) -> None:
    request = _request(tmp_path / "out")
    checkpoint = open_source(request)
    seen, progress = _spy_progress()
    outcome = quantize_while_planning(request, checkpoint, progress)
    assert outcome.plan.components[0].planner == "transformers"
    _same_checkpoint(outcome.out, reference)
    assert sum(seen) == checkpoint.tensor_bytes


def test_wrong_draft_is_thrown_away(reference: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A draft that keeps one weight the real plan quantizes: its files are discarded, the real plan's
    written, and the progress bar never runs past the total."""
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
    _same_checkpoint(outcome.out, reference)
    assert sum(seen) == checkpoint.tensor_bytes
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary folder or lock left


def test_failed_planning_stops_the_draft(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The real planner fails while the draft is being written: the error comes out, the draft's thread
    has stopped, and nothing is left beside OUT."""
    real_plan_request = plan_request

    def failing(request, checkpoint=None):
        if request.planner is None:
            time.sleep(0.2)  # the draft is under way
            raise InputError("the real planner failed", hint="a test")
        return real_plan_request(request, checkpoint)

    import bnbcli.quantize as module

    monkeypatch.setattr(module, "plan_request", failing)
    request = _request(tmp_path / "out")
    with pytest.raises(InputError, match="real planner failed"):
        quantize_while_planning(request, open_source(request), lambda n: None)
    assert not [t for t in threading.enumerate() if t.name.startswith("bnb-")]
    assert list(tmp_path.iterdir()) == []
