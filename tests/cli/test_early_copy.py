"""The pass-through tensors written while torch imports (pipeline/early_copy.py, issue 17): the same bytes and
manifest with and without it, taken for a table-planned model before torch is imported, and a Ctrl-C or a
failed write during it end as they always did."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import save_file

from bnbcli.pipeline import early_copy
from bnbcli.pipeline.early_copy import EarlyCopy

from helpers.bnb_inprocess import bnb_here, quantize
from helpers.bnb_process import HANG_SECONDS, assert_no_debris, bnb_env, tree_digest
from helpers.fuzz_harness import LLAMA_CONFIG, llama_tensors

MARK = "kept tensors written"


@pytest.fixture
def llama(tmp_path: Path) -> Path:
    """A Llama the planner table plans: embed_tokens, lm_head and the norms are kept as they are."""
    src = tmp_path / "src"
    src.mkdir()
    save_file(llama_tensors(0), src / "model.safetensors")
    (src / "config.json").write_text(json.dumps(LLAMA_CONFIG))
    return src


def _without_run(out: Path) -> dict:
    manifest = json.loads((out / "bnb_manifest.json").read_text())
    return {k: v for k, v in manifest.items() if k != "run"}


def _files(out: Path) -> dict[str, str]:
    return {name: digest for name, digest in tree_digest(out).items() if name != "bnb_manifest.json"}


@pytest.mark.parametrize(
    "flags",
    [("--config", "nf4-dq"), ("--scheme", "int8"), ("--scheme", "nf4", "--max-shard-size", "13KB")],
    ids=["nf4-dq", "int8", "shards"],
)
def test_the_same_output_and_manifest_with_the_early_copy_on_and_off(
    llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, flags: tuple[str, ...]
) -> None:
    """Torch is loaded in this process, so the early copy is forced on (and off) here; 1,000-byte pieces
    make each tensor several reads, hashes and writes. The sharded case has a shard that the early copy
    alone fills (embed_tokens), finished by the executor after its stream."""
    monkeypatch.setattr(early_copy, "CHUNK_BYTES", 1000)
    runs = {}
    for on in (True, False):
        monkeypatch.setattr(early_copy, "worthwhile", lambda plan, on=on: on)
        out = tmp_path / f"out-{on}"
        quantize(llama, out, *flags)
        runs[on] = out
    assert _files(runs[True]) == _files(runs[False])
    assert _without_run(runs[True]) == _without_run(runs[False])
    on_marks = json.loads((runs[True] / "bnb_manifest.json").read_text())["run"]["timeline"]
    off_marks = json.loads((runs[False] / "bnb_manifest.json").read_text())["run"]["timeline"]
    assert MARK in on_marks and MARK not in off_marks
    if "--max-shard-size" in flags:
        components = _without_run(runs[True])["components"][0]
        by_shard: dict[str, set[str]] = {}
        for tensor in components["tensors"]:
            by_shard.setdefault(tensor["shard"], set()).add(tensor["action"])
        assert len(by_shard) > 1 and {"keep"} in by_shard.values(), by_shard


def test_a_budget_run_copies_nothing_early(llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Only a plain run starts the thread: --keep-budget's plan comes from scores that need torch."""
    monkeypatch.setattr(early_copy, "worthwhile", lambda plan: True)
    quantize(llama, tmp_path / "out", "--keep-budget", "10%")
    timeline = json.loads((tmp_path / "out" / "bnb_manifest.json").read_text())["run"]["timeline"]
    assert MARK not in timeline


def test_a_failed_early_write_ends_as_a_write_error(
    llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full disk under the early copy: one error line, one hint, exit 1, no OUT and nothing beside it."""

    def full(self: EarlyCopy, *args: object) -> str:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(early_copy, "worthwhile", lambda plan: True)
    monkeypatch.setattr(EarlyCopy, "_copy", full)
    before = tree_digest(llama)
    out = tmp_path / "out"
    ran = bnb_here("quantize", str(llama), str(out), "--no-progress")
    assert ran.code == 1, ran
    error, hint = ran.error_and_hint()
    assert error == f"cannot write {out}: No space left on device", ran
    assert hint.startswith("free some space where OUT goes"), ran
    assert not out.exists()
    assert_no_debris(out)
    assert tree_digest(llama) == before


def test_the_early_copy_asks_for_writeback_of_small_tensors_together(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """4,000 biases of 1 KiB: a few writeback requests, not one per tensor, and together they cover every
    byte the early copy wrote."""
    import torch

    from bnbcli.checkpoint.safetensors_file import SafetensorsFile
    from bnbcli.checkpoint.writer import WRITEBACK_SPAN

    src = tmp_path / "src"
    src.mkdir()
    count, numel = 4000, 256
    save_file({f"block.{i}.bias": torch.full((numel,), float(i)) for i in range(count)}, src / "model.safetensors")
    made: list[tuple[int, int]] = []
    monkeypatch.setattr(early_copy, "worthwhile", lambda plan: True)
    monkeypatch.setattr(early_copy, "start_writeback", lambda fd, offset, length: made.append((offset, length)))
    out = tmp_path / "out"
    quantize(src, out, "--scheme", "nf4")
    written = SafetensorsFile.open(out / "model.safetensors")
    ranges = sorted((t.start, t.start + t.nbytes) for t in written.tensors.values())
    assert len(ranges) == count
    assert 1 <= len(made) <= count * numel * 4 // WRITEBACK_SPAN + 1, len(made)
    spans = sorted((offset, offset + length) for offset, length in made)
    assert all(any(a <= begin and end <= b for a, b in spans) for begin, end in ranges)


# `bnb` in a new interpreter, as a user runs it, with EarlyCopy watched: it notes whether torch was imported
# when the early copy starts, then (with "interrupt") sends the process SIGINT from inside the copy and
# waits for the run to stop it, as a Ctrl-C in the middle of the copy would.
SPIED_BNB = """
import os, signal, sys
from bnbcli.pipeline.early_copy import EarlyCopy
real_enter, real_copy = EarlyCopy.__enter__, EarlyCopy._copy
def enter(self):  # enters OUT's temporary folder and starts the thread, importing nothing
    with open(os.environ["SPY_FILE"], "w") as f:
        f.write(str("torch" in sys.modules))
    return real_enter(self)
def copy(self, job, *files_and_offset):
    if os.environ["SPY_MODE"] == "interrupt":
        os.kill(os.getpid(), signal.SIGINT)
        assert self._stop.wait(600), "the run did not stop the early copy"
    return real_copy(self, job, *files_and_offset)
EarlyCopy.__enter__, EarlyCopy._copy = enter, copy
from bnbcli.cli.entry import console
console()
"""


def _spied_bnb(src: Path, out: Path, spy: Path, mode: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", SPIED_BNB, "quantize", str(src), str(out), "--no-progress", "-v"],
        capture_output=True,
        text=True,
        timeout=HANG_SECONDS,
        env=bnb_env() | {"SPY_FILE": str(spy), "SPY_MODE": mode},
        stdin=subprocess.DEVNULL,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # as a terminal starts it
    )


def test_the_early_copy_starts_before_torch_is_imported(llama: Path, tmp_path: Path) -> None:
    out, spy = tmp_path / "out", tmp_path / "spy"
    ran = _spied_bnb(llama, out, spy, "watch")
    assert ran.returncode == 0, ran.stderr
    assert spy.read_text() == "False"
    timeline = json.loads((out / "bnb_manifest.json").read_text())["run"]["timeline"]
    assert MARK in timeline
    assert f"{MARK} " in ran.stdout  # -v prints the timeline


def test_ctrl_c_during_the_early_copy_leaves_no_out(llama: Path, tmp_path: Path) -> None:
    out, spy = tmp_path / "out", tmp_path / "spy"
    before = tree_digest(llama)
    ran = _spied_bnb(llama, out, spy, "interrupt")
    assert ran.returncode == 130, ran.stderr
    assert ran.stderr.splitlines() == ["error: interrupted"] and ran.stdout == "", ran.stderr
    assert not out.exists()
    assert_no_debris(out)
    assert tree_digest(llama) == before


def test_the_manifest_names_the_dtypes_of_the_settings(llama: Path, tmp_path: Path) -> None:
    """`settings` holds dtype names, as before dtypes were bnb's own DType (asdict once made dicts of them)."""
    quantize(llama, tmp_path / "out", "--config", "nf4-dq", "--compute-dtype", "float32")
    settings = json.loads((tmp_path / "out" / "bnb_manifest.json").read_text())["settings"]
    assert (settings["quant_storage"], settings["compute_dtype"], settings["dtype"]) == ("uint8", "float32", None)
