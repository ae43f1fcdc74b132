"""CLI contract: exit codes, stdout is data, errors are one line on stderr, no tracebacks."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import bnbcli

from helpers.bnb_process import HANG_SECONDS


def bnb(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", "from bnbcli.cli.app import main; main()", *args],
        capture_output=True,
        text=True,
        timeout=HANG_SECONDS,
    )


def test_version() -> None:
    result = bnb("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"bnb {bnbcli.__version__}"


def test_help_documents_exit_codes() -> None:
    result = bnb("--help")
    assert result.returncode == 0
    flat = " ".join(result.stdout.split())
    assert "130" in flat and "usage or internal error" in flat
    assert "env" in result.stdout


def test_env_json_is_one_document() -> None:
    result = bnb("env", "--json")
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["schema_version"] == 1
    assert document["bnbcli"] == bnbcli.__version__
    assert "cpu" in document["backends"]
    assert isinstance(document["gpus"], list)


def test_env_without_a_driver_reports_torch_as_torch_does_without_importing_it() -> None:
    """No NVIDIA driver, no GPU: `bnb env` reads the versions from the installed packages (torch's import
    alone took seconds on a 2-core machine), and they are the ones the imported modules give."""
    code = (
        "import json, sys\n"
        "from bnbcli.environment import describe_environment, nvidia_driver_present\n"
        "found = describe_environment()\n"
        "imported = sorted({'torch', 'cupy', 'numpy'} & set(sys.modules))\n"
        "import numpy, torch\n"
        "print(json.dumps([nvidia_driver_present(), imported, found.torch, torch.__version__,"
        " found.torch_cuda, torch.version.cuda, found.numpy, numpy.__version__, found.gpus]))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=HANG_SECONDS)
    assert result.returncode == 0, result.stderr
    driver, imported, torch_seen, torch_version, cuda_seen, cuda, numpy_seen, numpy_version, gpus = json.loads(
        result.stdout
    )
    assert (torch_seen, cuda_seen, numpy_seen) == (torch_version, cuda, numpy_version)
    if not driver:
        assert imported == [] and gpus == []


def test_env_table() -> None:
    result = bnb("env")
    assert result.returncode == 0
    assert "torch" in result.stdout


def test_unknown_command_is_a_usage_error_without_traceback() -> None:
    result = bnb("frobnicate")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "frobnicate" in result.stderr
    assert result.stdout == ""


def test_unknown_option_is_a_usage_error() -> None:
    result = bnb("env", "--nope")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr


def test_console_script_is_installed() -> None:
    from pathlib import Path

    script = Path(sys.executable).parent / "bnb"
    assert script.exists(), "`pip install -e .` should install the bnb console script"
    result = subprocess.run([str(script), "--version"], capture_output=True, text=True, timeout=HANG_SECONDS)
    assert result.returncode == 0 and bnbcli.__version__ in result.stdout


def test_debug_shows_the_traceback_wherever_it_is_given(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A real process once (the interpreter prints the traceback of what main() lets through, exit 1); where
    --debug may stand is main()'s own parsing, run here: with it the error escapes main(), without it no."""
    from bnbcli.errors import InputError

    from helpers.bnb_inprocess import bnb_here

    missing = str(tmp_path / "missing")
    result = bnb("quantize", missing, str(tmp_path / "out"), "--debug")
    assert result.returncode == 1, result.stderr
    assert "Traceback" in result.stderr and "no such file or folder" in result.stderr

    monkeypatch.setenv("BNB_DEBUG", "")  # off; and monkeypatch takes back what --debug sets below
    plain = bnb_here("quantize", missing, str(tmp_path / "out"))
    assert plain.code == 1 and "Traceback" not in plain.stderr, plain
    for args in (
        ("--debug", "quantize", missing, str(tmp_path / "out")),
        ("quantize", missing, str(tmp_path / "out"), "--debug"),
    ):
        monkeypatch.setenv("BNB_DEBUG", "")  # --debug turned it on for the rest of the process
        with pytest.raises(InputError, match="no such file or folder"):
            bnb_here(*args)


def test_the_command_lets_openmp_threads_sleep_when_they_wait() -> None:
    """`bnb` sets OMP_WAIT_POLICY=PASSIVE before torch loads libgomp (its threads otherwise spin between
    parallel regions, which collapses on a machine shared with other processes); a user's setting wins."""
    from helpers.bnb_process import COMMAND, bnb_env

    def policy(**extra: str) -> object:
        env = {k: v for k, v in bnb_env().items() if k != "OMP_WAIT_POLICY"} | extra
        command = [*COMMAND, "env", "--json"]
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=HANG_SECONDS)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)["cpu_threads"]["omp_wait_policy"]

    assert policy() == "PASSIVE"
    assert policy(OMP_WAIT_POLICY="active") == "active"


# What the command line imports before a verb needs the library: help, the version and usage errors come
# without torch, transformers or CuPy (a verb imports them when it runs).
_HEAVY = ("torch", "transformers", "diffusers", "cupy", "accelerate", "bitsandbytes")
_IMPORTS_AT_EXIT = (
    "import atexit, sys\n"
    f"atexit.register(lambda: print('imported:', sorted(m for m in {_HEAVY!r} if m in sys.modules)))\n"
    "sys.argv = ['bnb', *sys.argv[1:]]\n"
    "from bnbcli.cli.entry import console\n"
    "console()\n"
)


@pytest.mark.parametrize(
    "args",
    [
        ["--help"],
        ["--version"],
        ["quantize", "--help"],
        ["dequantize", "--help"],
        ["inspect", "--help"],
        ["footprint", "--help"],
        ["eval", "--help"],
        ["env", "--help"],
        ["quantize"],  # a missing argument
        ["quantize", "a", "b", "--frobnicate"],
        ["quantize", "a", "b", "--blocksize", "abc"],
        ["footprint", "a", "--gpu-memory", "24"],
        ["eval", "q", "--min-top1", "1.5"],  # eval's arguments are checked before it imports torch
        ["eval", "q", "--top-k", "many"],
        ["eval", "q", "--top-k", "0"],
        ["eval", "q", "--max-memory", "lots"],
        ["frobnicate"],
    ],
    ids=" ".join,
)
def test_help_version_and_usage_errors_import_no_heavy_library(args: list[str]) -> None:
    done = subprocess.run(
        [sys.executable, "-c", _IMPORTS_AT_EXIT, *args], capture_output=True, text=True, timeout=HANG_SECONDS
    )
    assert done.returncode in (0, 2), done.stderr
    assert done.stdout.splitlines()[-1] == "imported: []", done.stdout[-500:]
    if args[0] == "eval" and len(args) > 2:  # the bad argument's own error, not QUANT's (which needs torch)
        assert done.stderr.startswith("error: ") and args[-1] in done.stderr.splitlines()[0], done.stderr


_CONSOLE_WITH_A_FINALIZER = (
    "import atexit, sys\n"
    "sys.argv = ['bnb', *sys.argv[1:]]\n"
    "class Freed:\n"
    "    def __del__(self):\n"
    "        print('torn down', flush=True)\n"
    "kept = Freed()  # a module global: freed by the interpreter's teardown, if it makes one\n"
    "atexit.register(lambda: print('exit handlers ran'))\n"
    "from bnbcli.cli.entry import console\n"
    "console()\n"
)


@pytest.mark.parametrize(("args", "code"), [(["--version"], 0), (["quantize"], 2), (["inspect", "/no/such/model"], 1)])
def test_the_command_exits_with_its_code_and_handlers_but_no_teardown(args: list[str], code: int) -> None:
    """`bnb` leaves without freeing a run's objects one by one (200,000 tiny tensors: 6 s), yet with the
    exit code main() gave, its output flushed and the exit handlers run."""
    done = subprocess.run(
        [sys.executable, "-c", _CONSOLE_WITH_A_FINALIZER, *args],
        capture_output=True,
        text=True,
        timeout=HANG_SECONDS,
        stdin=subprocess.DEVNULL,
    )
    assert done.returncode == code, done.stderr
    assert "exit handlers ran" in done.stdout and "torn down" not in done.stdout
    assert (bnbcli.__version__ in done.stdout) if code == 0 else done.stderr.startswith("error:")
