"""The CUDA warm-up that `bnb quantize` starts before it imports torch: the guess it starts on imports
nothing heavy and never misses a run that will use the GPU; on a GPU, the warm-up loads every module."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from helpers.bnb_process import HANG_SECONDS

GUESS = """
import json, sys
from bnbcli.backends import cuda_expected
from bnbcli.backends import cuda_modules
guesses = {name: cuda_expected(name) for name in ("cpu", "cuda", "auto")}
imported = sorted({"torch", "numpy", "cupy"} & set(sys.modules))
from bnbcli.backends import resolve_backend
print(json.dumps([guesses, imported, resolve_backend("auto")]))
"""


def test_the_guess_imports_nothing_heavy_and_agrees_with_the_backend_choice() -> None:
    run = subprocess.run([sys.executable, "-c", GUESS], capture_output=True, text=True, timeout=HANG_SECONDS)
    assert run.returncode == 0, run.stderr
    guesses, imported, auto = json.loads(run.stdout)
    assert imported == []
    assert guesses["cpu"] is False and guesses["cuda"] is True
    if auto == "cuda":  # a run on the GPU always finds its context and kernels started early
        assert guesses["auto"] is True


@pytest.mark.gpu
def test_the_warm_up_loads_every_module_on_the_device() -> None:
    from bnbcli.backends import cuda_modules

    for thread in cuda_modules.warm_up((0,)):
        thread.join(timeout=HANG_SECONDS)
    assert {source for device, source in cuda_modules._modules if device == 0} == set(cuda_modules.SOURCES)
