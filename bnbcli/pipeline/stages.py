"""The threads of the streaming executor and what passes between them: one-slot handoffs that give up
when another stage failed, stage threads that keep their exception for the caller, the per-stage busy
seconds, and the cancellation another thread may ask for."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

POLL_SECONDS = 0.1  # how often a blocked stage looks whether another one failed
END = object()  # the last item a handoff carries


@dataclass
class StageSeconds:
    """Seconds each stage spent working rather than waiting for another: the largest one bounds the
    run. ``results`` is the writer waiting for a GPU's results (kernels and device→host copies);
    ``hashing`` is the wait at the end for the source sha256s that ran beside everything."""

    read: float = 0.0
    convert: float = 0.0
    results: float = 0.0
    write: float = 0.0
    hashing: float = 0.0

    @contextmanager
    def timing(self, stage: str) -> Iterator[None]:
        # Each stage's field is only ever written by its own thread.
        started = time.perf_counter()
        try:
            yield
        finally:
            setattr(self, stage, getattr(self, stage) + time.perf_counter() - started)

    def as_dict(self) -> dict[str, float]:
        return {k: round(v, 3) for k, v in asdict(self).items()}


class Stopped(Exception):
    """Another stage failed; this one leaves quietly."""


class Cancelled(Exception):
    """The caller cancelled the run (``Cancellation.cancel()``); what it wrote is to be discarded."""


class Cancellation:
    """Lets another thread stop a run: it stops the stages of the component being written, as a
    failed stage would, and the run raises ``Cancelled``."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._requested = False
        self._stops: list[threading.Event] = []

    def watch(self, stop: threading.Event) -> None:
        with self._lock:
            self._stops.append(stop)
            if self._requested:
                stop.set()

    def cancel(self) -> None:
        with self._lock:
            self._requested = True
            for stop in self._stops:
                stop.set()


class Handoff:
    """A one-slot queue between two stages that gives up when ``stop`` is set, so a failed stage
    never leaves the others blocked forever."""

    def __init__(self, stop: threading.Event) -> None:
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=1)
        self._stop = stop

    def put(self, item: Any) -> None:
        while True:
            if self._stop.is_set():
                raise Stopped
            try:
                self._queue.put(item, timeout=POLL_SECONDS)
                return
            except queue.Full:
                continue

    def get(self) -> Any:
        while True:
            if self._stop.is_set():
                raise Stopped
            try:
                return self._queue.get(timeout=POLL_SECONDS)
            except queue.Empty:
                continue

    def items(self) -> Iterator[Any]:
        while (item := self.get()) is not END:
            yield item


class Stage(threading.Thread):
    """A daemon thread whose exception is kept for the caller, and which stops the others on failure."""

    def __init__(self, name: str, target: Callable[[], None], stop: threading.Event) -> None:
        super().__init__(name=name, daemon=True)
        self._target_fn = target
        self._stop_all = stop
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self._target_fn()
        except Stopped:
            pass
        except BaseException as exc:  # handed to the calling thread, which raises it
            self.error = exc
            self._stop_all.set()
