"""The wheel carries every package and the CUDA kernel sources (pyproject lists packages by hand)."""

from __future__ import annotations

import sys
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_is_listed_for_the_wheel():
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    on_disk = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "bnbcli").rglob("__init__.py")}
    assert set(setuptools["packages"]) == on_disk | {"bnbcli.cuda_kernels"}
    assert setuptools["package-dir"]["bnbcli.cuda_kernels"] == "cuda_kernels"


def test_kernel_sources_match_the_packaged_patterns():
    from bnbcli.backends.cuda_runtime import SOURCES, kernel_dir

    assert kernel_dir() == ROOT / "cuda_kernels"
    for name in SOURCES:
        assert (kernel_dir() / name).is_file(), name
        assert name.endswith(".cu")
