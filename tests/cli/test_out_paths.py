"""What bnb may write over, and what it may copy (issue 16, rows 1, 2, 3, 12, 13).

`--overwrite` replaces only a folder bnb wrote (its bnb_manifest.json is in it) or an empty folder: never
the current folder, one that holds it, the home folder, a file, a link, a device, a FIFO or a socket, and
without --overwrite nothing at all. An empty OUT (an unset `$OUT`) is a usage error. A file of SRC that links
out of SRC is refused; copied files are no more readable than their source. Each refusal is one `error:`
line and one true `hint:` line, and nothing on disk changes: every entry under the test's folder keeps its
type, inode, size, time and bytes.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from helpers.bnb_process import EXIT_FAILED, EXIT_USAGE, assert_no_debris, run_main, snapshot

MANIFEST = "bnb_manifest.json"


def tiny_model(folder: Path) -> Path:
    """Two projection weights and an embedding, no config.json: planned by name rules in no time."""
    g = torch.Generator().manual_seed(0)
    tensors = {
        "model.embed_tokens.weight": torch.randn(32, 64, generator=g).to(torch.bfloat16),
        "model.layers.0.mlp.up_proj.weight": torch.randn(128, 64, generator=g).to(torch.bfloat16),
        "model.layers.0.mlp.down_proj.weight": torch.randn(64, 128, generator=g).to(torch.bfloat16),
    }
    folder.mkdir(parents=True)
    save_file(tensors, folder / "model.safetensors")
    return folder


def assert_refused(code: int, stdout: str, stderr: str, words: tuple[str, ...], exit_code: int = EXIT_FAILED) -> None:
    shown = f"exit {code}\n--- stdout\n{stdout}\n--- stderr\n{stderr}"
    assert code == exit_code, shown
    assert stdout == "" and "Traceback" not in stderr and "internal error" not in stderr, shown
    lines = stderr.splitlines()
    assert len(lines) == 2 and lines[0].startswith("error: ") and lines[1].startswith("hint: "), shown
    assert all(word in stderr for word in words), shown


@pytest.fixture(scope="module")
def src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_model(tmp_path_factory.mktemp("paths") / "src")


@pytest.fixture(scope="module")
def quantized(src: Path) -> Path:
    """A checkpoint `bnb quantize` wrote: the source of `bnb dequantize`, and a folder bnb may replace."""
    out = src.parent / "quantized"
    from typer.testing import CliRunner

    from bnbcli.cli.app import app

    result = CliRunner().invoke(app, ["quantize", str(src), str(out), "-q"])
    assert result.exit_code == 0, result.output
    return out


def verb_args(verb: str, src: Path, quantized: Path) -> list[str]:
    return [verb, str(src if verb == "quantize" else quantized)]


# ------------------------------------------------------------------------------------------- row 1: empty OUT


@pytest.mark.parametrize("verb", ["quantize", "dequantize"])
def test_an_empty_out_is_a_usage_error_and_touches_nothing(
    verb: str, src: Path, quantized: Path, tmp_path: Path, capsys, monkeypatch
) -> None:
    """`bnb quantize SRC "$OUT" --overwrite` with OUT unset: the current folder was deleted and replaced."""
    (tmp_path / "precious").write_text("mine")
    monkeypatch.chdir(tmp_path)
    before = snapshot(tmp_path)
    code, stdout, stderr = run_main([*verb_args(verb, src, quantized), "", "--overwrite"], capsys, monkeypatch)
    assert_refused(code, stdout, stderr, ("OUT is empty",), EXIT_USAGE)
    assert snapshot(tmp_path) == before


def test_an_empty_report_path_is_a_usage_error(src: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    code, stdout, stderr = run_main(["inspect", str(src), "--report", "", "-q"], capsys, monkeypatch)
    assert_refused(code, stdout, stderr, ("--report is empty",), EXIT_USAGE)
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------- rows 1, 2, 13: what --overwrite may replace


def _bnb_folder(folder: Path) -> None:
    """A folder that looks like bnb's output: only a protected place may keep it from being replaced."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / MANIFEST).write_text("{}")
    (folder / "model.safetensors").write_bytes(b"earlier")


def _current_folder(root: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    _bnb_folder(root / "work")
    monkeypatch.chdir(root / "work")
    return "."


def _holds_current_folder(root: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    _bnb_folder(root / "work")
    (root / "work" / "inner").mkdir()
    monkeypatch.chdir(root / "work" / "inner")
    return ".."


def _home(root: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    _bnb_folder(root / "home")
    monkeypatch.setenv("HOME", str(root / "home"))
    return str(root / "home")


def _foreign_folder(root: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    (root / "out").mkdir()
    (root / "out" / "precious.txt").write_text("someone's work")
    return str(root / "out")


def _manifest_is_a_link(root: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    (root / "elsewhere.json").write_text("{}")
    (root / "out").mkdir()
    (root / "out" / "precious.txt").write_text("someone's work")
    (root / "out" / MANIFEST).symlink_to(root / "elsewhere.json")
    return str(root / "out")


def _file(root: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    (root / "out").write_text("a file")
    return str(root / "out")


def _link_to_bnb_folder(root: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    _bnb_folder(root / "real")
    (root / "out").symlink_to(root / "real")
    return str(root / "out")


def _dangling_link(root: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    (root / "out").symlink_to(root / "nowhere")
    return str(root / "out")


def _fifo(root: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    os.mkfifo(root / "out")
    return str(root / "out")


def _socket(root: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.chdir(root)  # a socket's path is limited to ~100 bytes: bind a relative one
    server = socket.socket(socket.AF_UNIX)
    server.bind("out")
    server.close()  # the socket file stays
    return str(root / "out")


def _device(root: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A character device like /dev/null (1, 3), made here: never the machine's own /dev/null."""
    try:
        os.mknod(root / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    except PermissionError:
        pytest.skip("making a device node needs CAP_MKNOD (root); the FIFO and socket cases cover the rule")
    return str(root / "null")


NOT_OURS: dict[str, tuple[Callable[[Path, pytest.MonkeyPatch], str], str]] = {
    "current-folder": (_current_folder, "is the current folder"),
    "holds-current-folder": (_holds_current_folder, "holds the current folder"),
    "home-folder": (_home, "is the home folder"),
    "foreign-folder": (_foreign_folder, f"no {MANIFEST} in it"),
    "manifest-is-a-link": (_manifest_is_a_link, f"no {MANIFEST} in it"),
    "file": (_file, "is a file, not a folder"),
    "link-to-bnb-folder": (_link_to_bnb_folder, "is a link, not a folder"),
    "dangling-link": (_dangling_link, "is a link, not a folder"),
    "fifo": (_fifo, "is a FIFO, not a folder"),
    "socket": (_socket, "is a socket, not a folder"),
    "device": (_device, "is a device, not a folder"),
}


@pytest.mark.parametrize("overwrite", [True, False])
@pytest.mark.parametrize("case", list(NOT_OURS))
@pytest.mark.parametrize("verb", ["quantize", "dequantize"])
def test_out_that_bnb_did_not_write_is_never_replaced(
    verb: str, case: str, overwrite: bool, src: Path, quantized: Path, tmp_path: Path, capsys, monkeypatch
) -> None:
    make, words = NOT_OURS[case]
    out = make(tmp_path, monkeypatch)
    before = snapshot(tmp_path)
    args = [*verb_args(verb, src, quantized), out, *(["--overwrite"] if overwrite else [])]
    code, stdout, stderr = run_main(args, capsys, monkeypatch)
    assert_refused(code, stdout, stderr, ("already exists and", words, "hint: choose another OUT"))
    assert snapshot(tmp_path) == before
    assert_no_debris(Path(os.path.abspath(out)))


@pytest.mark.parametrize("verb", ["quantize", "dequantize"])
def test_overwrite_replaces_a_folder_bnb_wrote_or_an_empty_one(
    verb: str, src: Path, quantized: Path, tmp_path: Path, capsys, monkeypatch
) -> None:
    """Row 13 as well: nothing of the replaced OUT (`.OUT.bnb-tmp-old-PID`) stays beside it."""
    out = tmp_path / "out"
    assert run_main([*verb_args(verb, src, quantized), str(out), "-q"], capsys, monkeypatch)[0] == 0
    (out / "stale.txt").write_text("from an earlier run")
    # Without --overwrite: refused, and the hint says what works.
    code, stdout, stderr = run_main([*verb_args(verb, src, quantized), str(out), "-q"], capsys, monkeypatch)
    assert_refused(code, stdout, stderr, ("already exists", "pass --overwrite"))
    code, _, stderr = run_main([*verb_args(verb, src, quantized), str(out), "-q", "--overwrite"], capsys, monkeypatch)
    assert code == 0, stderr
    assert (out / MANIFEST).is_file() and not (out / "stale.txt").exists()
    assert_no_debris(out)

    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, stderr = run_main([*verb_args(verb, src, quantized), str(empty), "-q", "--overwrite"], capsys, monkeypatch)
    assert code == 0, stderr
    assert (empty / MANIFEST).is_file()
    assert_no_debris(empty)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "out"]


def test_out_that_appears_during_the_run_is_not_replaced(
    src: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The rule holds at the final rename too, not only when the run starts."""
    from bnbcli.checkpoint.atomic import AtomicOutputDir
    from bnbcli.errors import InputError

    out = tmp_path / "out"
    output = AtomicOutputDir(out, overwrite=True)
    with pytest.raises(InputError, match="bnb did not write it"), output as tmp:
        (tmp / "model.safetensors").write_bytes(b"whole")
        out.mkdir()
        (out / "precious.txt").write_text("someone's work")
        output.commit()
    assert [p.name for p in out.iterdir()] == ["precious.txt"]
    assert_no_debris(out)


# ------------------------------------------------------------------------------------ row 12: a long name


def test_an_out_name_too_long_is_a_clear_error_and_the_hint_is_true(
    src: Path, tmp_path: Path, capsys, monkeypatch
) -> None:
    """Over 255 bytes: "internal error: OSError ENAMETOOLONG" before; and bnb writes beside OUT under a
    name 21 bytes longer, so the limit is lower than the filesystem's."""
    for length in (300, 240):
        out = tmp_path / ("o" * length)
        code, stdout, stderr = run_main(["quantize", str(src), str(out)], capsys, monkeypatch)
        assert_refused(code, stdout, stderr, (f"error: cannot write {out}: name too long",))
        assert list(tmp_path.iterdir()) == []
    room = int(stderr.split("at most ")[1].split(" bytes")[0])
    out = tmp_path / ("o" * room)
    code, _, stderr = run_main(["quantize", str(src), str(out), "-q"], capsys, monkeypatch)
    assert code == 0, stderr
    assert_no_debris(out)


@pytest.mark.parametrize("where", ["config.json", "index", "header"])
def test_json_nested_too_deeply_is_not_valid_json(where: str, src: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    """100,000 nested `[`: "internal error: RecursionError" before."""
    model = tmp_path / "model"
    shutil.copytree(src, model)
    deep = "[" * 100_000
    if where == "config.json":
        (model / "config.json").write_text(deep)
    elif where == "index":
        (model / "model.safetensors").rename(model / "model-00001-of-00001.safetensors")
        (model / "model.safetensors.index.json").write_text(deep)
    else:
        (model / "model.safetensors").write_bytes(len(deep).to_bytes(8, "little") + deep.encode())
    code, stdout, stderr = run_main(["quantize", str(model), str(tmp_path / "out")], capsys, monkeypatch)
    assert_refused(code, stdout, stderr, ("not valid JSON: nested too deeply",))
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------- row 3: links out of SRC


SECRET = b"root:$6$secret-hash:19000:0:99999:7:::\n"


def _diffusers(root: Path, src: Path) -> Path:
    pipeline = root / "pipeline"
    (pipeline / "transformer").mkdir(parents=True)
    shutil.copy(src / "model.safetensors", pipeline / "transformer" / "diffusion_pytorch_model.safetensors")
    (pipeline / "model_index.json").write_text(json.dumps({"_class_name": "P", "transformer": ["x", "T"]}))
    (pipeline / "scheduler").mkdir()
    (pipeline / "scheduler" / "scheduler_config.json").write_text("{}")
    return pipeline


@pytest.mark.parametrize(
    "link",
    ["tokenizer.json", "config.json", "sub/vocab.txt", "model.safetensors", "diffusers:scheduler/leak.txt"],
)
def test_a_link_out_of_src_is_refused(link: str, src: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    """`ln -s /etc/shadow M/tokenizer.json`: OUT got a byte copy of it, mode 0644. A link to a weight file
    outside counts too: bnb would read a checkpoint the folder does not hold."""
    secret = tmp_path / "secret"
    secret.write_bytes(SECRET if not link.endswith(".safetensors") else (src / "model.safetensors").read_bytes())
    secret.chmod(0o640)
    if link.startswith("diffusers:"):
        model, link = _diffusers(tmp_path, src), link.removeprefix("diffusers:")
    else:
        model = tmp_path / "model"
        shutil.copytree(src, model)
    (model / link).parent.mkdir(exist_ok=True)
    (model / link).unlink(missing_ok=True)
    (model / link).symlink_to(secret)
    out = tmp_path / "out"
    code, stdout, stderr = run_main(["quantize", str(model), str(out), "--planner", "name-rules"], capsys, monkeypatch)
    assert_refused(code, stdout, stderr, (f"{model / link} is a link to {secret}", "outside the model folder"))
    assert not out.exists()
    assert_no_debris(out)


def test_links_inside_src_are_followed(src: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    model = tmp_path / "model"
    shutil.copytree(src, model)
    (model / "vocab.txt").write_text("a\nb\n")
    (model / "tokenizer.txt").symlink_to("vocab.txt")
    out = tmp_path / "out"
    code, _, stderr = run_main(["quantize", str(model), str(out), "-q"], capsys, monkeypatch)
    assert code == 0, stderr
    assert (out / "tokenizer.txt").read_text() == "a\nb\n" and not (out / "tokenizer.txt").is_symlink()


@pytest.mark.parametrize("verb", ["quantize", "dequantize"])
def test_copied_files_are_never_more_readable_than_their_source(
    verb: str, src: Path, quantized: Path, tmp_path: Path, capsys, monkeypatch
) -> None:
    """A 0640 file came out 0644. A read-only one still comes out writable by its owner."""
    model = tmp_path / "model"
    shutil.copytree(src if verb == "quantize" else quantized, model)
    modes = {"private.json": 0o600, "group.json": 0o640, "read-only.txt": 0o444, "public.txt": 0o644}
    for name, mode in modes.items():
        (model / name).write_text(name)
        (model / name).chmod(mode)
    out = tmp_path / "out"
    previous = os.umask(0o022)
    try:
        code, _, stderr = run_main([verb, str(model), str(out), "-q"], capsys, monkeypatch)
    finally:
        os.umask(previous)
    assert code == 0, stderr
    got = {name: stat.S_IMODE((out / name).stat().st_mode) for name in modes}
    assert got == {"private.json": 0o600, "group.json": 0o640, "read-only.txt": 0o644, "public.txt": 0o644}
    assert all((out / name).read_text() == name for name in modes)


# ----------------------------------------------------------------- inspect --report: replace only ours


def test_report_replaces_only_a_report_bnb_wrote(src: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    page = tmp_path / "report.html"
    args = ["inspect", str(src), "--schemes", "nf4", "--planner", "name-rules", "-q", "--report", str(page)]
    code, _, stderr = run_main(args, capsys, monkeypatch)
    assert code == 0, stderr
    first = page.read_bytes()
    page.write_bytes(first.replace(b"</body>", b"<!-- edited --></body>"))
    code, _, stderr = run_main(args, capsys, monkeypatch)  # a report bnb wrote: replaced
    assert code == 0, stderr
    assert page.read_bytes() == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.html"]  # no temporary file left

    notes = tmp_path / "notes.html"
    notes.write_text("<p>my notes</p>")
    os.mkfifo(tmp_path / "pipe")
    (tmp_path / "link.html").symlink_to(page)
    for target, words in [(notes, "bnb did not write it"), (tmp_path / "pipe", "is a FIFO"), (tmp_path, "a folder")]:
        before = snapshot(tmp_path)
        code, stdout, stderr = run_main([*args[:-1], str(target)], capsys, monkeypatch)
        assert_refused(code, stdout, stderr, (f"{target} already exists and", words, "choose another file name"))
        assert snapshot(tmp_path) == before
    code, stdout, stderr = run_main([*args[:-1], str(tmp_path / "link.html")], capsys, monkeypatch)
    assert_refused(code, stdout, stderr, ("is a link, not a file",))
