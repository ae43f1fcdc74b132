"""`bnb quantize` runs without automatic garbage collection (cli/heap.collections_paused), and leaves the
collector as it found it, on success and on failure."""

from __future__ import annotations

import gc
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from bnbcli.cli import heap
from bnbcli.pipeline import executor

from helpers.bnb_inprocess import bnb_here


@pytest.mark.parametrize("enabled", [True, False])
def test_collections_paused_restores_the_collector(enabled: bool) -> None:
    was = gc.isenabled()
    try:
        (gc.enable if enabled else gc.disable)()
        with heap.collections_paused():
            assert not gc.isenabled()
        assert gc.isenabled() is enabled
        with pytest.raises(RuntimeError), heap.collections_paused():
            raise RuntimeError("a failed run")
        assert gc.isenabled() is enabled
    finally:
        (gc.enable if was else gc.disable)()


def test_quantize_writes_its_weights_with_collections_paused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "src").mkdir()
    weights = {f"layers.{i}.weight": torch.randn(16, 16) for i in range(4)}
    save_file(weights, str(tmp_path / "src" / "model.safetensors"))
    seen: list[bool] = []
    real = executor.write_weights

    def watching(*args, **kwargs):
        seen.append(gc.isenabled())
        return real(*args, **kwargs)

    monkeypatch.setattr("bnbcli.pipeline.quantize.write_weights", watching)
    assert gc.isenabled()
    ran = bnb_here("quantize", str(tmp_path / "src"), str(tmp_path / "out"), "-q", "--scheme", "nf4")
    assert ran.code == 0, ran
    assert seen == [False]
    assert gc.isenabled()
    failed = bnb_here("quantize", str(tmp_path / "src"), str(tmp_path / "out"), "-q")  # OUT exists: refused in the run
    assert failed.code != 0
    assert gc.isenabled()


def test_the_library_is_imported_without_collections_then_frozen(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(heap, "_frozen", False)
    frozen: list[bool] = []
    monkeypatch.setattr(gc, "freeze", lambda: frozen.append(gc.isenabled()))
    assert gc.isenabled()
    with heap.library_import():
        assert not gc.isenabled()
    assert frozen == [False] and gc.isenabled()
    with heap.library_import():  # once per process
        pass
    assert frozen == [False] and gc.isenabled()
