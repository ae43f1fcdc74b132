"""Every JSON file bnb writes is whole after a failure (bnbcli/checkpoint/durable.py): a write that fails
half-way leaves the old content and no temporary file. The failure is real: a child process under a
file size limit (RLIMIT_FSIZE) that the new content passes, so the kernel stops the write part-way."""

from __future__ import annotations

import json
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from bnbcli.checkpoint.durable import write_atomically, write_json
from bnbcli.checkpoint.manifest import MANIFEST_NAME

from helpers.bnb_process import HANG_SECONDS, bnb_env

LIMIT = 4096  # bytes: the old content fits, the new one does not
BIG = {f"key{i}": "x" * 64 for i in range(1000)}  # ~70 KB of JSON

# Each writer, given the folder and a document: what it writes there and the file that ends up holding it.
WRITERS = {
    "write_json": "from bnbcli.checkpoint.durable import write_json; write_json(folder / 'f.json', doc)",
    "manifest": "from bnbcli.checkpoint.manifest import write_manifest; write_manifest(folder, doc)",
    "plan cache": "from bnbcli.plan.planners import cache; cache._store('entry', doc)",
}
TARGETS = {
    "write_json": "f.json",
    "manifest": MANIFEST_NAME,
    "plan cache": "plans/entry.json",
}

CHILD = """
import json, resource, signal, sys
from pathlib import Path
folder, doc = Path(sys.argv[1]), json.loads(sys.argv[2])
{imports}
if {limit}:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write then fails with EFBIG instead of killing
    resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))
try:
    {write}
except OSError as exc:
    sys.exit(f"failed: {{exc.strerror}}")
"""


def _write_in_child(writer: str, folder: Path, document: object, limit: int = 0) -> subprocess.CompletedProcess[str]:
    imports, write = WRITERS[writer].split("; ", 1)
    code = CHILD.format(imports=imports, write=write, limit=limit)
    env = bnb_env() | {"BNB_CACHE_DIR": str(folder), "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.run(
        [sys.executable, "-c", code, str(folder), json.dumps(document)],
        capture_output=True,
        text=True,
        timeout=HANG_SECONDS,
        env=env,
    )


@pytest.mark.parametrize("writer", list(WRITERS))
def test_a_write_that_fails_half_way_keeps_the_old_file(writer: str, tmp_path: Path) -> None:
    old = _write_in_child(writer, tmp_path, {"old": True}, 0)
    assert old.returncode == 0, old.stderr
    target = tmp_path / TARGETS[writer]
    before = target.read_bytes()
    assert b"old" in before
    result = _write_in_child(writer, tmp_path, BIG, LIMIT)
    if writer != "plan cache":  # the cache is best effort: it says nothing and only loses the speed-up
        assert result.returncode != 0 and "File too large" in result.stderr, result.stderr
    assert target.read_bytes() == before, "the old content was lost"
    assert sorted(p.name for p in target.parent.iterdir()) == [target.name], "a temporary file was left"
    # Without the limit the same write goes through: the limit, not the document, stopped it.
    assert _write_in_child(writer, tmp_path, BIG, 0).returncode == 0
    assert json.loads(target.read_text()) != json.loads(before)


def test_a_killed_writer_leaves_the_old_file(tmp_path: Path) -> None:
    """SIGKILL after the new bytes are on disk but before the rename: readers still see the old file."""
    target = tmp_path / "f.json"
    write_json(target, {"old": True})
    code = (
        "import os, signal, sys\n"
        "from pathlib import Path\n"
        "from bnbcli.checkpoint import durable\n"
        "durable.os.replace = lambda *a: os.kill(os.getpid(), signal.SIGKILL)\n"
        "durable.write_json(Path(sys.argv[1]), {'new': True})\n"
    )
    result = subprocess.run([sys.executable, "-c", code, str(target)], timeout=HANG_SECONDS, env=bnb_env())
    assert result.returncode == -signal.SIGKILL
    assert json.loads(target.read_text()) == {"old": True}
    write_json(target, {"new": True})  # and the next write is not hindered by what the killed one left
    assert json.loads(target.read_text()) == {"new": True}


def test_written_like_a_plain_file(tmp_path: Path) -> None:
    """Same bytes and permissions as ``Path.write_text``: the umask decides, not the temporary file."""
    plain, atomic = tmp_path / "plain.json", tmp_path / "atomic.json"
    plain.write_text('{"a": 1}\n')
    write_atomically(atomic, '{"a": 1}\n')
    assert atomic.read_bytes() == plain.read_bytes()
    assert stat.S_IMODE(atomic.stat().st_mode) == stat.S_IMODE(plain.stat().st_mode)
    write_json(atomic, {"a": 1}, indent=2)
    assert atomic.read_text() == json.dumps({"a": 1}, indent=2) + "\n"
