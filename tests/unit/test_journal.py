"""The --resume journal (bnbcli/checkpoint/journal.py): what a run records is what a resumed run keeps,
each shard is one appended line, and an append cut short loses that shard only."""

from __future__ import annotations

from pathlib import Path

from bnbcli.checkpoint.journal import JOURNAL_NAME, Journal


def _shard(folder: Path, name: str, size: int) -> None:
    (folder / name).write_bytes(b"\0" * size)


def _record(journal: Journal, folder: Path, name: str, size: int, sources: dict[str, str]) -> None:
    _shard(folder, name, size)
    journal.record_shard(name, size - 8, size, {f"{name}.w": {"outputs": {"w": "ab"}, "error": None}}, sources)


def test_a_resumed_run_keeps_what_was_recorded(tmp_path: Path) -> None:
    journal = Journal(tmp_path, "fp", resume=False)
    _record(journal, tmp_path, "a.safetensors", 100, {"src": "1"})
    _record(journal, tmp_path, "b.safetensors", 200, {"src": "1"})
    resumed = Journal(tmp_path, "fp", resume=True)
    assert sorted(resumed.finished) == ["a.safetensors", "b.safetensors"]
    assert resumed.finished["b.safetensors"].size == 200
    assert resumed.finished["b.safetensors"].records == {"b.safetensors.w": {"outputs": {"w": "ab"}, "error": None}}
    assert resumed.source_sha256 == {"src": "1"}
    assert not resumed.discarded


def test_each_shard_appends_one_line_and_leaves_the_earlier_ones(tmp_path: Path) -> None:
    journal = Journal(tmp_path, "fp", resume=False)
    _record(journal, tmp_path, "a.safetensors", 100, {"src": "1"})
    before = (tmp_path / JOURNAL_NAME).read_bytes()
    _record(journal, tmp_path, "b.safetensors", 100, {"src": "1"})
    after = (tmp_path / JOURNAL_NAME).read_bytes()
    assert after.startswith(before)
    assert after[len(before) :].count(b"\n") == 1 and after.endswith(b"\n")
    assert b'"src"' not in after[len(before) :], "a sha256 already recorded is written again"


def test_an_append_cut_short_loses_that_shard_only(tmp_path: Path) -> None:
    journal = Journal(tmp_path, "fp", resume=False)
    _record(journal, tmp_path, "a.safetensors", 100, {"src": "1"})
    _record(journal, tmp_path, "b.safetensors", 100, {})
    path = tmp_path / JOURNAL_NAME
    path.write_bytes(path.read_bytes()[:-10])  # the last line torn, as a crash mid-write leaves it
    resumed = Journal(tmp_path, "fp", resume=True)
    assert list(resumed.finished) == ["a.safetensors"]


def test_a_shard_whose_file_changed_size_is_not_kept(tmp_path: Path) -> None:
    journal = Journal(tmp_path, "fp", resume=False)
    _record(journal, tmp_path, "a.safetensors", 100, {"src": "1"})
    _record(journal, tmp_path, "b.safetensors", 100, {})
    _shard(tmp_path, "a.safetensors", 50)
    assert list(Journal(tmp_path, "fp", resume=True).finished) == ["b.safetensors"]


def test_another_fingerprint_discards_the_journal(tmp_path: Path) -> None:
    _record(Journal(tmp_path, "fp", resume=False), tmp_path, "a.safetensors", 100, {"src": "1"})
    other = Journal(tmp_path, "another plan", resume=True)
    assert other.finished == {} and other.discarded


def test_without_every_source_sha256_nothing_is_kept(tmp_path: Path) -> None:
    _record(Journal(tmp_path, "fp", resume=False), tmp_path, "a.safetensors", 100, {"src": "1"})
    resumed = Journal(tmp_path, "fp", resume=True)
    resumed.require_sources([Path("src"), Path("other")])
    assert resumed.finished == {} and resumed.discarded


def test_the_resumed_run_journals_the_kept_shards_again(tmp_path: Path) -> None:
    """Killed twice: the second resume still keeps what the first run finished."""
    _record(Journal(tmp_path, "fp", resume=False), tmp_path, "a.safetensors", 100, {"src": "1"})
    resumed = Journal(tmp_path, "fp", resume=True)
    _record(resumed, tmp_path, "b.safetensors", 100, {"src": "1"})
    again = Journal(tmp_path, "fp", resume=True)
    assert sorted(again.finished) == ["a.safetensors", "b.safetensors"]
    assert again.source_sha256 == {"src": "1"}
