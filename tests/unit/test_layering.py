"""The package's dependencies point one way: cli → pipeline → plan → checkpoint, formats, backends;
inspect/, footprint/ and eval/ stand beside pipeline; nothing takes another module's private names."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest


def _repo_root() -> Path:
    """The folder with pyproject.toml above this file (tests may sit in subfolders)."""
    return next(p for p in Path(__file__).resolve().parents if (p / "pyproject.toml").is_file())


PACKAGE = _repo_root() / "bnbcli"
# a layer imports only layers below it (and the top-level helpers: errors, output, units, …)
RANK = {"checkpoint": 1, "formats": 1, "backends": 1, "plan": 2, "pipeline": 3, "inspect": 3, "footprint": 3,
        "eval": 3, "cli": 4}  # fmt: skip


def _imports() -> list[tuple[str, str, list[str]]]:
    """(importing module, imported module, names taken) for every import of bnbcli inside bnbcli."""
    found = []
    for path in PACKAGE.rglob("*.py"):
        module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("bnbcli"):
                found.append((module, node.module, [a.name for a in node.names]))
            elif isinstance(node, ast.Import):
                found += [(module, a.name, []) for a in node.names if a.name.startswith("bnbcli")]
    return found


def _layer(module: str) -> str:
    return module.split(".")[1] if "." in module else ""


def test_no_layer_imports_a_layer_above_it() -> None:
    upward = [
        f"{a} imports {b}"
        for a, b, _ in _imports()
        if _layer(a) in RANK and _layer(b) in RANK and RANK[_layer(b)] > RANK[_layer(a)]
    ]
    assert not upward, upward


def test_pipeline_does_not_import_the_read_only_verbs() -> None:
    sideways = [f"{a} imports {b}" for a, b, _ in _imports() if _layer(a) == "pipeline" and _layer(b) in RANK
                and RANK[_layer(b)] == 3 and _layer(b) != "pipeline"]  # fmt: skip
    assert not sideways, sideways


@pytest.mark.parametrize("imported", ["a private name", "a private module attribute"])
def test_no_module_takes_another_modules_private_names(imported: str) -> None:
    if imported == "a private name":
        taken = [
            f"{a} takes {b}.{n}"
            for a, b, names in _imports()
            for n in names
            if n.startswith("_") and not n.startswith("__") and a != b
        ]
    else:  # module._name, where module is a bnbcli module imported by name
        taken = []
        for path in PACKAGE.rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if (
                    isinstance(node, ast.Attribute)
                    and node.attr.startswith("_")
                    and not node.attr.startswith("__")
                    and isinstance(node.value, ast.Name)
                    and node.value.id in _bnbcli_module_names()
                ):
                    taken.append(f"{path.name}: {node.value.id}.{node.attr}")
    assert not taken, taken


def _bnbcli_module_names() -> set[str]:
    return {p.stem for p in PACKAGE.rglob("*.py")} - {"__init__"}
