"""`bnb` entry point and the one error boundary: typed errors become `error:`/`hint:` and an exit code."""

from __future__ import annotations

import os
import sys
from typing import Annotated, NoReturn

import typer
from rich.markup import escape

from bnbcli import __version__, interrupts, output
from bnbcli.cli.dequantize import dequantize
from bnbcli.cli.entry import interrupted_exit
from bnbcli.cli.env import env
from bnbcli.cli.eval import eval
from bnbcli.cli.footprint import footprint
from bnbcli.cli.inspect import inspect
from bnbcli.cli.quantize import quantize
from bnbcli.errors import EXIT_INTERRUPTED, EXIT_USAGE, REPORT_HINT, BnbError

EPILOG = (
    "Exit codes: 0 ok; 1 the input or the result failed (bad checkpoint, a threshold missed); "
    "2 usage or internal error; 130 interrupted (Ctrl-C); 143 terminated (SIGTERM). "
    "Set BNB_DEBUG=1 or pass --debug for a traceback."
)

app = typer.Typer(
    name="bnb",
    help="Convert and inspect model checkpoints for bitsandbytes quantization.",
    epilog=EPILOG,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def _version(value: bool) -> None:
    if value:
        output.stdout.print(f"bnb {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks.")] = False,
) -> None:
    if debug:
        os.environ["BNB_DEBUG"] = "1"


# Each verb is the function of its own module, named as the verb.
for verb in (quantize, dequantize, inspect, footprint, eval, env):
    app.command(epilog=EPILOG)(verb)


def _debugging() -> bool:
    return os.environ.get("BNB_DEBUG", "") not in ("", "0") or "--debug" in sys.argv


def _is_usage_error(exc: Exception) -> bool:
    """Click's usage errors (bad option, unknown command), recognised by their public interface
    rather than by a class that Typer may move (Typer 0.29 carries its own copy of Click)."""
    return callable(getattr(exc, "show", None)) and getattr(exc, "exit_code", None) == EXIT_USAGE


def _usage_hint(exc: Exception) -> str:
    """A bad option value's own hint (``BadValue``), else where the usage is explained."""
    ctx = getattr(exc, "ctx", None)
    command = getattr(ctx, "command_path", None) or "bnb"
    return getattr(exc, "hint", None) or f"`{command} --help` shows the usage and every option"


def _error(message: str, hint: str, code: int) -> None:
    """The one way a run that failed ends: `error:` and `hint:` on stderr and, when --json was asked for
    and nothing was printed yet, the same as the one JSON document on stdout."""
    # Messages carry paths and tensor names, which may contain "[…]": Rich would take that for markup
    # and drop it, or raise MarkupError (a traceback from the error boundary itself) on "[/…]".
    output.error(escape(message), escape(hint))
    _json_error(message, hint, code)


def _json_error(message: str, hint: str | None, code: int) -> None:
    if _wants_json(sys.argv[1:]) and not output.json_emitted():
        output.emit_json({"error": {"message": message, "hint": hint, "exit_code": code}})


def _wants_json(args: list[str]) -> bool:
    """--json anywhere before `--` (every command has the flag): also when Click could not parse the rest."""
    end = args.index("--") if "--" in args else len(args)
    return "--json" in args[:end]


def _without_debug_flag(args: list[str]) -> list[str]:
    """`--debug` is accepted anywhere (people add it after the command when a run fails): it is taken out
    before Click parses, and turned into BNB_DEBUG. Arguments after `--` are left alone."""
    end = args.index("--") if "--" in args else len(args)
    if "--debug" not in args[:end]:
        return args
    os.environ["BNB_DEBUG"] = "1"
    return [a for a in args[:end] if a != "--debug"] + args[end:]


def _interrupted() -> NoReturn:
    """Ctrl-C or SIGTERM: the run has cleaned up on its way here. One line (it needs no hint), and with
    --json the one document says so too."""
    output.error(interrupts.message())
    _json_error(interrupts.message(), None, interrupts.exit_code())
    interrupted_exit(printed=True)


def main() -> None:
    output.new_run()
    try:
        code = app(args=_without_debug_flag(sys.argv[1:]), prog_name="bnb", standalone_mode=False)
    except BnbError as exc:
        if _debugging():
            raise
        _error(exc.message, exc.hint, exc.exit_code)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        _interrupted()
    except BrokenPipeError:
        # The reader went away (`bnb … | head`): exit quietly, without a second error on flush.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(0)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        _error("aborted", "run the command again", EXIT_INTERRUPTED)
        sys.exit(EXIT_INTERRUPTED)
    except Exception as exc:
        if _is_usage_error(exc):
            if not sys.argv[1:]:  # a bare `bnb`: the help is the answer
                exc.show()  # type: ignore[attr-defined]
            else:
                _error(exc.format_message(), _usage_hint(exc), EXIT_USAGE)  # type: ignore[attr-defined]
            sys.exit(EXIT_USAGE)
        if _debugging():
            raise
        _error(f"internal error: {type(exc).__name__}: {exc}", REPORT_HINT, EXIT_USAGE)
        sys.exit(EXIT_USAGE)
    # Without standalone mode Click returns the code of a `typer.Exit` instead of exiting; Typer turns
    # Ctrl-C into Exit(130) itself (older releases raised Abort, handled above).
    if code == EXIT_INTERRUPTED:
        _interrupted()
    if isinstance(code, int) and code:
        sys.exit(code)
