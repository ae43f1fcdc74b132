import os
import sys
from pathlib import Path

import pytest

# The shared helpers import as `helpers.<module>` (tests/helpers/) from every test folder, whichever file or
# folder pytest is given. The test folders have no __init__.py: pytest imports each test file by its name alone,
# so two test files may not share a name.
sys.path.insert(0, str(Path(__file__).parent))

# Every test plans afresh (and writes nothing under ~/.cache), in this process and in the `bnb` processes
# it starts; tests/unit/test_plan_cache.py turns the plan cache on where it is the subject.
os.environ["BNB_PLAN_CACHE"] = "off"
# One table width whatever runs the tests (a terminal, a pipe, pytest-xdist's workers, which set COLUMNS=80):
# Rich shortens cells to fit, and tests read words in those cells.
os.environ["COLUMNS"] = "200"


def _gpu_missing() -> str | None:
    """Why GPU-marked tests cannot run here, or None when they can."""
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    if not torch.cuda.is_available():
        return "no CUDA GPU visible to torch"
    try:
        import cupy  # noqa: F401
    except Exception as exc:
        return f"CuPy cannot be imported: {type(exc).__name__}"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    gpu_items = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu_items:
        return
    reason = _gpu_missing()
    if reason:
        skip = pytest.mark.skip(reason=f"gpu test: {reason}")
        for item in gpu_items:
            item.add_marker(skip)
