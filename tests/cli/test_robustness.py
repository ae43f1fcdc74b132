"""What a killed, concurrent or starved run leaves on disk (issue 7): OUT is whole or absent, the input is
untouched, nothing stray survives the next run, and the same input always gives the same bytes."""

from __future__ import annotations

import errno
import json
import os
import random
import resource
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from typer.testing import CliRunner

from bnbcli.checkpoint.journal import JOURNAL_NAME
from bnbcli.cli.app import app

from helpers.bnb_process import (
    COMMAND,
    EXIT_FAILED,
    HANG_SECONDS,
    assert_no_debris,
    bnb_env,
    long_checkpoint,
    run_bnb,
    tree_digest,
)

QUANTIZE = ("--scheme", "nf4", "--double-quant", "--no-progress")


def shard_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.safetensors"))}


def manifest_without_run(out: Path) -> dict:
    manifest = json.loads((out / "bnb_manifest.json").read_text())
    manifest.pop("run")  # when, where and how long: documented as not deterministic
    return manifest


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, float]:
    """A source with many tensors, and one uninterrupted run of it: (src, out, seconds)."""
    root = tmp_path_factory.mktemp("robustness")
    src, out = root / "src", root / "reference"
    long_checkpoint(src, count=24, size=1024)
    started = time.monotonic()
    result = run_bnb("quantize", str(src), str(out), *QUANTIZE)
    assert result.returncode == 0, result.stderr
    return src, out, time.monotonic() - started


@pytest.mark.slow
def test_sigkill_anywhere_leaves_out_whole_or_absent(reference: tuple[Path, Path, float], tmp_path: Path) -> None:
    """SIGKILL at random moments of a run (start-up, planning, mid-tensor, commit): afterwards OUT is either
    absent or byte-identical to an uninterrupted run, the source is untouched, and the next run on that
    OUT sweeps whatever the killed one left (temporary folder, lock) and succeeds."""
    src, ref_out, seconds = reference
    expected = shard_bytes(ref_out)
    source_before = tree_digest(src)
    rng = random.Random(7)
    delays = sorted(rng.uniform(0.2, seconds * 1.1) for _ in range(10))

    def trial(lane: int, delay: float) -> str:
        out = tmp_path / f"lane{lane}" / "out"
        out.parent.mkdir(exist_ok=True)
        proc = subprocess.Popen(
            [*COMMAND, "quantize", str(src), str(out), *QUANTIZE, "--overwrite"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            stdin=subprocess.DEVNULL,
            env=bnb_env(),
        )
        time.sleep(delay)
        proc.kill()
        proc.wait()
        if out.exists():
            assert (out / "bnb_manifest.json").is_file(), f"killed after {delay:.2f} s: OUT without a manifest"
            assert shard_bytes(out) == expected, f"killed after {delay:.2f} s: OUT differs from a whole run"
            return "complete"
        return "absent"

    with ThreadPoolExecutor(max_workers=2) as pool:  # two lanes, each on its own OUT
        outcomes = list(pool.map(trial, [i % 2 for i in range(len(delays))], delays))
    assert tree_digest(src) == source_before, "the source changed"
    assert "absent" in outcomes  # the delays do reach inside the run
    for lane in (0, 1):
        out = tmp_path / f"lane{lane}" / "out"
        result = run_bnb("quantize", str(src), str(out), *QUANTIZE, "--overwrite")
        assert result.returncode == 0, result.stderr
        assert shard_bytes(out) == expected
        assert_no_debris(out)


def test_second_run_on_the_same_out_fails_cleanly(tmp_path: Path) -> None:
    src, out = tmp_path / "src", tmp_path / "out"
    long_checkpoint(src, count=60)  # long enough that the first run is still writing when the second comes
    first = subprocess.Popen(
        [*COMMAND, "quantize", str(src), str(out), *QUANTIZE],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        env=bnb_env(),
    )
    try:
        lock, shard = tmp_path / ".out.bnb-lock", tmp_path / f".out.bnb-tmp-{first.pid}" / "model.safetensors"
        deadline = time.monotonic() + HANG_SECONDS
        while not (lock.exists() and shard.exists() and shard.stat().st_size > 0):
            assert first.poll() is None, first.communicate()
            assert time.monotonic() < deadline, "the first run never started writing"
            time.sleep(0.01)
        before = tree_digest(src)
        # In this process (a subprocess would spend seconds importing while the first one finishes);
        # --overwrite too: even then it must not touch the first run's work.
        second = CliRunner().invoke(app, ["quantize", str(src), str(out), *QUANTIZE, "--overwrite"])
        assert first.poll() is None, "the first run ended too soon for this test"
        assert second.exit_code == EXIT_FAILED, second.output
        message = second.exception.message  # type: ignore[union-attr]
        assert message == f"another bnb (pid {first.pid}) is writing {out}", message
        _, stderr = first.communicate(timeout=HANG_SECONDS)
    finally:
        if first.poll() is None:
            first.kill()
            first.communicate()
    assert first.returncode == 0, stderr
    assert (out / "bnb_manifest.json").is_file() and shard_bytes(out)
    assert tree_digest(src) == before
    assert_no_debris(out)


def _limit_file_size(limit: int):
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write then fails with EFBIG instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


@pytest.mark.parametrize("verb", ["quantize", "dequantize"])
def test_file_size_limit_is_a_clear_error(verb: str, reference: tuple[Path, Path, float], tmp_path: Path) -> None:
    src, ref_out, _ = reference
    source = src if verb == "quantize" else ref_out
    before = tree_digest(source)
    out = tmp_path / "out"
    result = run_bnb(verb, str(source), str(out), "--no-progress", preexec_fn=_limit_file_size(1_000_000))
    assert result.returncode == EXIT_FAILED, result.stderr
    error, hint = result.stderr.splitlines()
    assert error == f"error: cannot write {out}: File too large", result.stderr
    assert hint.startswith("hint: a file size limit stopped it")
    assert not out.exists()
    assert_no_debris(out)
    assert tree_digest(source) == before


@pytest.mark.parametrize(("code", "words"), [(errno.ENOSPC, "No space left"), (errno.EACCES, "Permission denied")])
def test_disk_full_and_permission_errors(
    code: int, words: str, reference: tuple[Path, Path, float], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same contract when the disk fills up or a write is refused mid-way (simulated: this suite may
    run as root, for whom permissions never refuse)."""
    src, _, _ = reference
    real_pwrite = os.pwrite
    written = [0]

    def failing_pwrite(fd: int, data, offset: int) -> int:
        written[0] += 1
        if written[0] > 3:  # a few tensors in: a partial shard exists when it fails
            raise OSError(code, os.strerror(code))
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", failing_pwrite)
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["quantize", str(src), str(out), *QUANTIZE])
    assert result.exit_code == EXIT_FAILED, result.output
    assert f"cannot write {out}: {words}" in str(result.exception.message)  # type: ignore[union-attr]
    assert not out.exists()
    assert_no_debris(out)


@pytest.mark.parametrize("threads", [None, "1"])
def test_same_input_same_bytes(threads: str | None, reference: tuple[Path, Path, float], tmp_path: Path) -> None:
    """Byte-identical shards and manifest (its `run` block aside) from a second run of the same input,
    also with one thread instead of every core."""
    src, ref_out, _ = reference
    out = tmp_path / "again"
    env = {"OMP_NUM_THREADS": threads} if threads else None
    result = run_bnb("quantize", str(src), str(out), *QUANTIZE, env=env)
    assert result.returncode == 0, result.stderr
    assert shard_bytes(out) == shard_bytes(ref_out)
    assert manifest_without_run(out) == manifest_without_run(ref_out)


def test_config_describing_a_huge_model_is_refused(tmp_path: Path) -> None:
    """config.json says 2**31 layers for a one-layer checkpoint: building that model on the meta device
    would run for hours (found by the fuzzer); it stops at a budget and the planners fall back."""
    from safetensors.torch import save_file

    from helpers.fuzz_harness import LLAMA_CONFIG, llama_tensors

    save_file(llama_tensors(0), tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps({**LLAMA_CONFIG, "num_hidden_layers": 2**31}))
    plan = CliRunner().invoke(app, ["quantize", str(tmp_path), str(tmp_path.parent / "q"), "--dry-run", "--json"])
    footprint = CliRunner().invoke(app, ["footprint", str(tmp_path), "--json"])
    assert plan.exit_code == 0, plan.output
    component = json.loads(plan.stdout)["components"][0]
    assert component["planner"] == "name-rules" and "more than" in component["planner_reason"]
    assert footprint.exit_code == 0, footprint.output


# ------------------------------------------------------------------------------------------- --resume

RESUMABLE = (*QUANTIZE, "--max-shard-size", "2MB")  # ~7 output shards: a kill leaves some finished


def _killed_after_shards(src: Path, out: Path, shards: int) -> None:
    """Start a run and SIGKILL it once its journal records ``shards`` finished shards."""
    proc = subprocess.Popen(
        [*COMMAND, "quantize", str(src), str(out), *RESUMABLE],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
        env=bnb_env(),
    )
    journal = out.parent / f".{out.name}.bnb-tmp-{proc.pid}" / JOURNAL_NAME
    deadline = time.monotonic() + HANG_SECONDS
    try:
        while True:
            assert proc.poll() is None, "the run finished before it could be killed"
            assert time.monotonic() < deadline, "no journal appeared"
            try:
                lines = [json.loads(line) for line in journal.read_text().splitlines()[1:]]
                if len(lines) >= shards and any(line["source_sha256"] for line in lines):
                    break
            except (OSError, ValueError, KeyError):
                pass
            time.sleep(0.01)
    finally:
        proc.kill()
        proc.wait()
    assert not out.exists()


@pytest.fixture(scope="module")
def resumable_reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("resume")
    src, out = root / "src", root / "reference"
    long_checkpoint(src, count=24, size=1024)
    result = run_bnb("quantize", str(src), str(out), *RESUMABLE)
    assert result.returncode == 0, result.stderr
    assert len(shard_bytes(out)) >= 5
    return src, out


@pytest.mark.slow
def test_resume_keeps_finished_shards_and_matches_an_uninterrupted_run(
    resumable_reference: tuple[Path, Path], tmp_path: Path
) -> None:
    src, ref_out = resumable_reference
    out = tmp_path / "out"
    _killed_after_shards(src, out, shards=2)
    result = run_bnb("quantize", str(src), str(out), *RESUMABLE, "--resume")
    assert result.returncode == 0, result.stderr
    manifest = json.loads((out / "bnb_manifest.json").read_text())
    assert manifest["run"]["resumed_shards"] >= 2
    assert shard_bytes(out) == shard_bytes(ref_out)
    assert manifest_without_run(out) == manifest_without_run(ref_out)
    assert not (out / JOURNAL_NAME).exists()
    assert_no_debris(out)


@pytest.mark.slow
def test_resume_refuses_what_changed(resumable_reference: tuple[Path, Path], tmp_path: Path) -> None:
    """A source with a new mtime: the journal is set aside and everything is converted again. A source
    whose bytes changed under the same size and mtime: the end-of-run sha256 check fails the run."""
    ref_src, ref_out = resumable_reference
    src = tmp_path / "src"
    src.mkdir()
    (src / "model.safetensors").write_bytes((ref_src / "model.safetensors").read_bytes())
    out = tmp_path / "out"

    _killed_after_shards(src, out, shards=2)
    os.utime(src / "model.safetensors")  # touched: another source as far as the journal knows
    result = run_bnb("quantize", str(src), str(out), *RESUMABLE, "--resume")
    assert result.returncode == 0, result.stderr
    assert json.loads((out / "bnb_manifest.json").read_text())["run"]["resumed_shards"] == 0
    assert shard_bytes(out) == shard_bytes(ref_out)

    out2 = tmp_path / "out2"
    _killed_after_shards(src, out2, shards=2)
    path = src / "model.safetensors"
    stat = path.stat()
    data = bytearray(path.read_bytes())
    data[-1] ^= 1  # the last weight's last byte: same size
    path.write_bytes(bytes(data))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    result = run_bnb("quantize", str(src), str(out2), *RESUMABLE, "--resume")
    assert result.returncode == EXIT_FAILED, result.stderr
    assert "changed since the interrupted run" in result.stderr
    assert not out2.exists()
    assert_no_debris(out2)


@pytest.mark.parametrize(("key", "value"), [("model_type", ["llama"]), ("architectures", "Llama"), ("dtype", {})])
@pytest.mark.parametrize("verb", ["quantize", "footprint"])
def test_config_fields_of_the_wrong_type_are_bad_input(key: str, value: object, verb: str, tmp_path: Path) -> None:
    """Found by the fuzzer: a list for model_type reached the planners (TypeError: unhashable type)."""
    from safetensors.torch import save_file

    from helpers.fuzz_harness import LLAMA_CONFIG, llama_tensors

    save_file(llama_tensors(0), tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps({**LLAMA_CONFIG, key: value}))
    args = [verb, str(tmp_path)] + ([str(tmp_path.parent / "out")] if verb == "quantize" else [])
    result = CliRunner().invoke(app, args)
    assert result.exit_code == EXIT_FAILED, result.output
    assert f"{key!r} is" in result.exception.message  # type: ignore[union-attr]


def test_a_ctrl_c_whose_keyboardinterrupt_was_lost_still_stops_the_commit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Python drops a KeyboardInterrupt raised inside some callbacks (importlib's module-lock cleanup);
    the SIGINT handler's note still keeps OUT from appearing, and the temporary folder goes."""
    from bnbcli import interrupts
    from bnbcli.checkpoint.atomic import AtomicOutputDir

    out = tmp_path / "out"
    monkeypatch.setattr(interrupts, "_requested", True)
    output = AtomicOutputDir(out)
    with pytest.raises(KeyboardInterrupt), output as tmp:
        (tmp / "model.safetensors").write_bytes(b"whole")
        output.commit()
    assert not out.exists()
    assert_no_debris(out)


def test_only_lost_keyboardinterrupts_are_kept_quiet(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import sys
    from types import SimpleNamespace

    from bnbcli.cli.entry import _unraisable

    passed_on: list[BaseException] = []
    monkeypatch.setattr(sys, "__unraisablehook__", lambda args: passed_on.append(args.exc_value))

    def report(exc: BaseException) -> SimpleNamespace:
        return SimpleNamespace(exc_type=type(exc), exc_value=exc, exc_traceback=None, err_msg=None, object=None)

    lost, real = KeyboardInterrupt(), ValueError("a real problem")
    _unraisable(report(lost))  # type: ignore[arg-type]
    _unraisable(report(real))  # type: ignore[arg-type]
    assert passed_on == [real]  # Python's own report for everything but a lost Ctrl-C
    assert sys.unraisablehook is not _unraisable  # installed by the `bnb` command only
