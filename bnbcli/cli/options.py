"""Options shared by several verbs, declared once: each is parsed and checked by Click before the command
runs, so a bad value fails at once, and the same way in every verb."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from bnbcli import output
from bnbcli.errors import UsageError
from bnbcli.units import parse_size

T = TypeVar("T")

JsonFlag = Annotated[
    bool,
    typer.Option("--json", help="Print one JSON document on stdout (no color; progress, if any, as lines on stderr)."),
]
QuietFlag = Annotated[bool, typer.Option("--quiet", "-q", help="Print nothing but errors.")]
VerboseFlag = Annotated[bool, typer.Option("--verbose", "-v", help="Print more detail.")]
NoProgressFlag = Annotated[
    bool,
    typer.Option(
        "--no-progress",
        help="No progress bar, nor the progress line printed every "
        f"{output.PROGRESS_LINE_SECONDS:g} s when stderr is not a terminal.",
    ),
]


class BadValue(typer.BadParameter):
    """A bad option value: Click's usage error (exit 2), with the hint main() prints under it."""

    def __init__(self, message: str, hint: str) -> None:
        super().__init__(message)
        self.hint = hint


def _checked(parse: Callable[[str], T]) -> Callable[[str], T]:
    """A Click parser from a library validator: its UsageError becomes a BadValue, hint included."""

    def parser(text: str) -> T:
        try:
            return parse(text)
        except UsageError as e:
            raise BadValue(e.message, e.hint) from None

    return parser


def size_option(flag: str, help: str) -> Any:
    """A byte size with its unit ("5GB", "24GiB"), parsed by ``bnbcli.units.parse_size``."""
    return typer.Option(flag, help=help, metavar="SIZE", parser=_checked(parse_size))


class Components(tuple[str, ...]):
    """diffusers component names as --components gives them (a class of its own: Typer reads a plain
    tuple annotation as an option that takes several values)."""


def parse_components(text: str) -> Components:
    names = Components(c.strip() for c in text.split(","))
    if not all(names):
        raise UsageError(f"{text!r} has an empty name", hint="name them, comma-separated: --components unet,vae")
    return names


def components_option(help: str) -> Any:
    """diffusers components, comma-separated; an empty list is refused (it would mean "all")."""
    return typer.Option("--components", help=help, metavar="A,B", parser=_checked(parse_components))


OutArgument = Annotated[
    str,
    typer.Argument(
        help="The folder to write (must not exist unless --overwrite).",
        show_default=False,
    ),
]


OverwriteFlag = Annotated[
    bool, typer.Option("--overwrite", help="Replace OUT if it exists and bnb wrote it (or it is an empty folder).")
]


def output_path(value: str, name: str = "OUT", what: str = "folder") -> Path:
    """A path to write, as given. An empty one (an unset variable in a script) would be taken for the
    current folder: refused."""
    if not value:
        raise UsageError(f"{name} is empty", hint=f"give the {what} to write (is the variable meant to hold it unset?)")
    return Path(value)
