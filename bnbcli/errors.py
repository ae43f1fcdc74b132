"""Typed errors with a one-line message, a hint and an exit code. Only the CLI's main() renders them."""

from __future__ import annotations

# Exit codes are a contract for CI scripts (documented in `bnb --help` and README.md).
EXIT_OK = 0
EXIT_FAILED = 1  # the input or the result failed: bad checkpoint, a threshold missed
EXIT_USAGE = 2  # usage or internal error
EXIT_INTERRUPTED = 130  # Ctrl-C (SIGINT)
EXIT_TERMINATED = 143  # SIGTERM: 128 + 15, as a shell reports it


# What to do about a bug in bnb itself (the CLI says it for any exception that is not a BnbError, too).
REPORT_HINT = "rerun with --debug and report it"


class BnbError(Exception):
    """An error the user can act on: ``message`` says what happened, ``hint`` what to do. The hint is
    required: every `error:` line comes with a `hint:` line, and following it must work."""

    exit_code = EXIT_FAILED

    def __init__(self, message: str, hint: str) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __reduce__(self) -> tuple:
        # Pickled whole, hint included: the planner's child process hands its errors back this way.
        return (type(self), (self.message, self.hint))


class UsageError(BnbError, ValueError):
    """Arguments that cannot work (an unsupported blocksize, an unknown scheme, …)."""

    exit_code = EXIT_USAGE


class BackendUnavailable(BnbError):
    """A backend was asked for that this machine cannot run."""

    exit_code = EXIT_USAGE


class InputError(BnbError):
    """The input (a checkpoint, a tensor) is malformed or unusable."""

    exit_code = EXIT_FAILED


class OutputError(BnbError):
    """OUT could not be written (disk full, file size limit, permissions, read-only filesystem)."""

    exit_code = EXIT_FAILED


class GateFailed(BnbError):
    """A CI gate of `bnb inspect` was missed (--max-rel-error, …): the result failed."""

    exit_code = EXIT_FAILED


class InternalError(BnbError):
    """A check of bnb's own work failed (a bug, not the input's fault)."""

    exit_code = EXIT_USAGE

    def __init__(self, message: str, hint: str = REPORT_HINT) -> None:
        super().__init__(message, hint)
