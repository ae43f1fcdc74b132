"""The wheel carries every package and the CUDA kernel sources (pyproject lists packages by hand)."""

from __future__ import annotations

import sys

from helpers import REPO

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def test_every_package_is_listed_for_the_wheel():
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    on_disk = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "bnbcli").rglob("__init__.py")}
    assert set(setuptools["packages"]) == on_disk | {"bnbcli.cuda_kernels", "bnbcli.configs"}
    assert setuptools["package-dir"]["bnbcli.cuda_kernels"] == "cuda_kernels"
    assert setuptools["package-dir"]["bnbcli.configs"] == "configs"


def test_every_data_file_is_packaged():
    """Files the package reads at run time (the planner table, the reciprocal table, bnb eval's texts) match
    a package-data pattern, or a wheel would lack them while an editable install works."""
    from fnmatch import fnmatch

    patterns = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    folders = {"bnbcli.data": REPO / "bnbcli" / "data", "bnbcli.eval": REPO / "bnbcli" / "eval"}
    folders |= {"bnbcli.configs": REPO / "configs", "bnbcli.cuda_kernels": REPO / "cuda_kernels"}
    for package, folder in folders.items():
        data = [p.name for p in folder.iterdir() if p.is_file() and p.suffix not in (".py", ".pyc")]
        assert data, package
        for name in data:
            assert any(fnmatch(name, pattern) for pattern in patterns[package]), f"{package}/{name} is not packaged"


def test_kernel_sources_match_the_packaged_patterns():
    from bnbcli.backends.cuda_runtime import SOURCES, kernel_dir

    assert kernel_dir() == REPO / "cuda_kernels"
    for name in SOURCES:
        assert (kernel_dir() / name).is_file(), name
        assert name.endswith(".cu")


def test_public_api_loads_on_first_use() -> None:
    """`import bnbcli` stays light (the command's start does not wait for torch); every name in
    __all__ is there when asked for."""
    import subprocess
    import sys

    code = (
        "import sys, bnbcli; assert 'torch' not in sys.modules, 'torch imported'; "
        "[getattr(bnbcli, n) for n in bnbcli.__all__]; assert 'torch' in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
