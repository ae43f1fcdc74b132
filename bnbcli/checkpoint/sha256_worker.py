"""sha256 of files, and a tiny program that hashes files for another process.

Standard library only, and importing nothing of bnbcli: `bnb quantize` runs this file as a program
(``python -I sha256_worker.py PARENT_PID WORKERS FILE...``) before it imports torch, so that hashing the
source shards never competes with that import for the interpreter lock (in-process hashing threads made
the start-up 0.4-1.4 s slower on an H100 machine). It prints ``INDEX<TAB>SHA256`` for each file as it is
done (``INDEX<TAB>!`` when a file cannot be read: the parent hashes that one itself and reports the
error), and exits with its parent.
"""

from __future__ import annotations

import hashlib
import os
import queue
import sys
import threading
import time

CHUNK = 16 << 20  # bytes per read: large enough that hashlib drops the GIL, small enough to stay in cache
SMALL_CHUNK = 64 << 10  # for a file smaller than CHUNK: a buffer its size at the least


def sha256_of(path: str | os.PathLike[str]) -> str:
    """The sha256 of the file's bytes; OSError when it cannot be read."""
    digest = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        # Allocated once the file is open (a file that cannot be opened leaves no buffer in the frame its
        # error's traceback keeps) and no larger than the file needs: a process that hashes many small
        # files (the fuzzer) is not left with 16 MiB holes in malloc's arenas.
        buffer = bytearray(min(CHUNK, max(SMALL_CHUNK, os.fstat(f.fileno()).st_size)))
        view = memoryview(buffer)
        while n := f.readinto(buffer):
            digest.update(view[:n])
    return digest.hexdigest()


def _serve(parent: int, workers: int, paths: list[str]) -> None:
    def watch() -> None:  # the parent is gone (an error, a Ctrl-C): nobody wants the rest
        while os.getppid() == parent:
            time.sleep(0.2)
        os._exit(0)

    threading.Thread(target=watch, daemon=True).start()
    jobs: queue.SimpleQueue[int] = queue.SimpleQueue()
    for index in range(len(paths)):
        jobs.put(index)
    lock = threading.Lock()

    def work() -> None:
        while True:
            try:
                index = jobs.get_nowait()
            except queue.Empty:
                return
            try:
                answer = sha256_of(paths[index])
            except OSError:
                answer = "!"
            with lock:
                sys.stdout.write(f"{index}\t{answer}\n")
                sys.stdout.flush()

    threads = [threading.Thread(target=work) for _ in range(max(1, workers))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


if __name__ == "__main__":
    _serve(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3:])
