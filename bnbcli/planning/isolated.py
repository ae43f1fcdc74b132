"""The model-aware planner in a child process, so that importing transformers never stalls our threads.

Importing transformers (and the torch modules it pulls in) takes seconds to tens of seconds, most of it
holding the GIL: compiling and running module code. Done in this process while the draft plan's weights
were being written, it starved the pipeline's threads (on the GPU machine the GPU stage went from 1.7 s
to 12 s). A child process imports and plans on a core of its own and hands back the very ``QuantPlan``
the same code gives in this process (``plan_quantization``), or its error.

The child is this package run as a module (``python -m bnbcli.planning.isolated``), talking pickles
over its stdin/stdout: length-prefixed requests, one at a time. It imports transformers as soon as it
starts, before any request, and the `bnb` command starts it before importing torch itself
(``start_early``), so that both processes' imports run side by side. It lives as long as this process,
so a program that plans many times (the tests, the fuzzer) starts it once. It prints nothing, ignores
Ctrl-C (the parent handles it) and exits when the parent is gone, however the parent ended.

This module imports nothing heavy at the top: ``start_early`` runs before torch is imported.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import signal
import struct
import subprocess
import sys
import threading
import time
from concurrent.futures import Future
from dataclasses import replace
from importlib.util import find_spec
from pathlib import Path
from types import MappingProxyType
from typing import IO, TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bnbcli.plan import QuantPlan
    from bnbcli.planning.common import Tensors
    from bnbcli.scheme import QuantScheme

_HEADER = struct.Struct("<Q")

# Below this many bytes of tensors a run's pipeline is done about as soon as the planner, and the child
# (its own torch import) costs more than the overlap saves: `bnb quantize` plans first, in-process.
SPECULATE_MIN_BYTES = 256 << 20
# Flags after which `bnb quantize` plans first (or not at all): no child to start early.
_PLANS_FIRST = ("--dry-run", "--resume", "--help", "-h")


class ChildFailed(RuntimeError):
    """The child could not start, or died: the caller plans in its own process instead."""


def start_early(argv: list[str]) -> None:
    """Start the child now when ``bnb quantize SRC OUT …`` will likely ask it: SRC a local checkpoint
    folder with a config.json and SPECULATE_MIN_BYTES or more of weights, no flag that makes it plan
    first. A guess from the command line alone, before torch is imported: a wrong guess costs a child
    that is never asked and exits with us."""
    if len(argv) < 3 or argv[0] != "quantize" or any(a.split("=")[0] in _PLANS_FIRST for a in argv):
        return
    named = dict(zip(argv, [*argv[1:], ""], strict=True)) | dict(a.split("=", 1) for a in argv if "=" in a)
    if named.get("--planner", "auto") != "auto":
        return
    src = Path(argv[1])
    if not any((src / name).is_file() for name in ("config.json", "model_index.json")):
        return  # a lone file or a folder without config.json: name rules plan it, in no time
    try:
        files = [*src.glob("*.safetensors"), *src.glob("*/*.safetensors")]
        size = sum(f.stat().st_size for f in files)
    except OSError:
        return
    if size >= SPECULATE_MIN_BYTES and find_spec("transformers") is not None:
        _child()


def plan_in_child(config: dict[str, Any] | None, tensors: Tensors, scheme: QuantScheme) -> Future[QuantPlan]:
    """``plan_quantization(config, tensors, scheme)`` with the default planner choice, in the child.
    The future holds the plan, the planner's own error, or ``ChildFailed``."""
    future: Future[QuantPlan] = Future()
    request = (config, dict(tensors), scheme)

    def ask() -> None:
        try:
            outcome = _child().ask(request)
        except Exception as exc:  # reaches the caller through the future
            future.set_exception(exc if isinstance(exc, ChildFailed) else ChildFailed(str(exc)))
            return
        if isinstance(outcome, BaseException):
            future.set_exception(outcome)
        else:
            future.set_result(replace(outcome, decisions=MappingProxyType(outcome.decisions)))

    threading.Thread(target=ask, name="bnb-planner", daemon=True).start()
    return future


class _Child:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bnbcli.planning.isolated", str(os.getpid())],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        self.asked = False

    def ask(self, request: Any) -> Any:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.asked = True
        with self.lock:  # one request at a time over the one pipe
            try:
                _send(self.proc.stdin, request)
                return _receive(self.proc.stdout)
            except (OSError, EOFError, pickle.UnpicklingError) as exc:
                raise ChildFailed(f"the planner's child process failed: {exc}") from None


_started = threading.Lock()
_running: _Child | None = None


def _child() -> _Child:
    global _running
    with _started:
        if _running is None or _running.proc.poll() is not None:
            _running = _Child()
        return _running


def stop_unused() -> None:
    """End the child if it was started (early) but never asked: this run plans elsewhere, and its
    imports would only take a core. A child that has answered stays, for the next request."""
    global _running
    with _started:
        if _running is not None and not _running.asked:
            with contextlib.suppress(OSError):
                _running.proc.kill()
            _running.proc.wait()
            _running = None


def _send(stream: IO[bytes], value: Any) -> None:
    data = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(_HEADER.pack(len(data)) + data)
    stream.flush()


def _receive(stream: IO[bytes]) -> Any:
    header = stream.read(_HEADER.size)
    if len(header) < _HEADER.size:
        raise EOFError("the child closed its pipe")
    (size,) = _HEADER.unpack(header)
    data = stream.read(size)
    if len(data) < size:
        raise EOFError("the child closed its pipe mid-answer")
    return pickle.loads(data)  # our own child's answer, over our own pipe


# Packages that transformers imports when they are installed and that planning never uses: hidden from
# the child, whose import is the planner's whole cost. scikit-learn comes in through assisted
# generation (transformers.generation.candidate_generator): 1.8 s of the 7.6 s import on an H200
# machine (2026-11-24, `python -X importtime`).
_UNUSED_BY_PLANNING = ("sklearn",)


def _preload() -> None:
    """What the transformers planner imports first, before it is asked (that is the slow part)."""
    for name in _UNUSED_BY_PLANNING:
        sys.modules.setdefault(name, None)  # type: ignore[arg-type]  # None: find_spec says absent, import fails
    from bnbcli.planning.hf_transformers import preload

    preload()


def _serve(parent: int) -> None:
    from bnbcli.plan import plan_quantization

    signal.signal(signal.SIGINT, signal.SIG_IGN)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.2)
        os._exit(0)

    threading.Thread(target=watch, daemon=True).start()
    requests, answers = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr  # a library's print must not corrupt the answers
    with contextlib.suppress(Exception):  # a request meets the same failure and reports it
        _preload()
    while True:
        try:
            config, tensors, scheme = _receive(requests)
        except EOFError:
            return
        try:
            plan = plan_quantization(config, tensors, scheme, planner=None)
            answer: Any = replace(plan, decisions=dict(plan.decisions))  # a mapping proxy does not pickle
        except Exception as exc:  # handed back whole: the parent raises it
            answer = exc
        try:
            _send(answers, answer)
        except pickle.PicklingError:
            _send(answers, ChildFailed(f"{type(answer).__name__}: {answer}"))


if __name__ == "__main__":
    _serve(int(sys.argv[1]))
