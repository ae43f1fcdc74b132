"""The model-aware planner in a child process, so that importing transformers never stalls our threads.

Importing transformers (and the torch modules it pulls in) takes seconds to tens of seconds, most of it
holding the GIL: compiling and running module code. Done in this process while the draft plan's weights
were being written, it starved the pipeline's threads (on the GPU machine the GPU stage went from 1.7 s
to 12 s). A child process imports and plans on a core of its own and hands back the very ``QuantPlan``
the same code gives in this process (``plan_quantization``), or its error.

The child is this package run as a module (``python -m bnbcli.planning.isolated``), talking pickles
over its stdin/stdout: length-prefixed requests, one at a time. It lives as long as this process, so a
program that plans many times (the tests, the fuzzer) starts it once. It prints nothing, ignores Ctrl-C
(the parent handles it) and exits when the parent is gone, however the parent ended.
"""

from __future__ import annotations

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
from types import MappingProxyType
from typing import IO, Any

from bnbcli.plan import QuantPlan, plan_quantization
from bnbcli.planning.common import Tensors
from bnbcli.scheme import QuantScheme

_HEADER = struct.Struct("<Q")


class ChildFailed(RuntimeError):
    """The child could not start, or died: the caller plans in its own process instead."""


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

    def ask(self, request: Any) -> Any:
        assert self.proc.stdin is not None and self.proc.stdout is not None
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


def _serve(parent: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.2)
        os._exit(0)

    threading.Thread(target=watch, daemon=True).start()
    requests, answers = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr  # a library's print must not corrupt the answers
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
