"""`bnb footprint` as a command and at scale: a 70B-shaped checkpoint of headers alone answers with flat
memory (little more than a 2-layer checkpoint of the same width needs); a Hub repo is read through
huggingface_hub's header requests (a stand-in client, offline), never downloading a weight; the CLI
contract (one JSON document, a table, errors)."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from bnbcli.footprint import FootprintRequest, footprint, make_schemes

from helpers.bnb_process import HANG_SECONDS
from helpers.bnb_process import run_main as bnb
from helpers.golden import golden_dir

pytest.importorskip("transformers")
MODELS = golden_dir() / "models"

# --- 70B, headers only -------------------------------------------------------------------------------

LLAMA_70B = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 8192,
    "intermediate_size": 28672,
    "num_hidden_layers": 80,
    "num_attention_heads": 64,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "tie_word_embeddings": False,
    "dtype": "bfloat16",
}
SHARD_BYTES = 5 * 10**9


def llama_70b_headers(folder: Path, layers: int = 80) -> Path:
    """Llama-3-70B's tensors (or its first `layers`) as bf16 safetensors shards that hold a header and no
    data: each file is extended to its full size with ftruncate, a sparse file that takes no disk (and has
    nothing to read)."""
    c = LLAMA_70B | {"num_hidden_layers": layers}
    h, inter = c["hidden_size"], c["intermediate_size"]
    kv = c["num_key_value_heads"] * h // c["num_attention_heads"]
    tensors: list[tuple[str, list[int]]] = [("model.embed_tokens.weight", [c["vocab_size"], h])]
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        tensors += [(p + "input_layernorm.weight", [h]), (p + "post_attention_layernorm.weight", [h])]
        tensors += [(p + f"self_attn.{n}_proj.weight", s) for n, s in (("q", [h, h]), ("k", [kv, h]), ("v", [kv, h]))]
        tensors += [(p + "self_attn.o_proj.weight", [h, h]), (p + "mlp.down_proj.weight", [h, inter])]
        tensors += [(p + "mlp.gate_proj.weight", [inter, h]), (p + "mlp.up_proj.weight", [inter, h])]
    tensors += [("model.norm.weight", [h]), ("lm_head.weight", [c["vocab_size"], h])]
    shards: list[list[tuple[str, list[int], int]]] = [[]]
    for name, shape in tensors:
        nbytes = 2 * shape[0] * (shape[1] if len(shape) > 1 else 1)
        if shards[-1] and sum(t[2] for t in shards[-1]) + nbytes > SHARD_BYTES:
            shards.append([])
        shards[-1].append((name, shape, nbytes))
    folder.mkdir(parents=True)
    weight_map = {}
    for k, shard in enumerate(shards):
        filename = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        header: dict = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name, shape, nbytes in shard:
            header[name] = {"dtype": "BF16", "shape": shape, "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
            weight_map[name] = filename
        raw = json.dumps(header).encode()
        with open(folder / filename, "wb") as f:
            f.write(struct.pack("<Q", len(raw)) + raw)
            f.truncate(8 + len(raw) + offset)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps(c))
    return folder


_CHILD = """
import json, sys
from bnbcli.footprint import FootprintRequest, footprint
footprint(FootprintRequest(sys.argv[1]))  # imports and first-use costs, on a tiny model
def rss(field):
    with open("/proc/self/status") as status:
        return int(next(line for line in status if line.startswith(field)).split()[1]) * 1024
measured = {}
for src in sys.argv[2:]:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM (the peak RSS) to the current RSS
    before = rss("VmRSS:")
    report = footprint(FootprintRequest(src, gpu_memory=48 * 10**9)).as_dict()
    measured[src] = {"peak_growth": rss("VmHWM:") - before, "report": report}
print(json.dumps(measured))
"""


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="peak RSS is reset through Linux /proc")
def test_70b_headers_answer_with_flat_memory(tmp_path: Path) -> None:
    small = llama_70b_headers(tmp_path / "llama-70b-2-layers", layers=2)
    src = llama_70b_headers(tmp_path / "llama-70b")
    assert sum(p.stat().st_blocks for p in src.iterdir()) * 512 < 10**7  # sparse: no data on disk
    result = subprocess.run(
        [sys.executable, "-c", _CHILD, str(MODELS / "llama" / "src"), str(small), str(src)],
        capture_output=True,
        text=True,
        timeout=HANG_SECONDS,
        env={**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20)},  # freed blocks leave RSS (test_quantize_memory)
    )
    assert result.returncode == 0, result.stderr[-3000:]
    runs = json.loads(result.stdout.splitlines()[-1])
    measured, growth_small = runs[str(src)], runs[str(small)]["peak_growth"]
    print(
        f"peak RSS growth: 2 layers {growth_small / 2**20:.1f} MiB, 80 layers {measured['peak_growth'] / 2**20:.1f} MiB"
    )
    # Flat: 40x the layers and 29x the bytes (141 GB) cost the per-module records (~11 MiB), never the data.
    assert measured["peak_growth"] < growth_small + 64 * 2**20, (growth_small, measured["peak_growth"])
    schemes = {s["name"]: s for s in measured["report"]["schemes"]}
    assert schemes["stored"]["file_bytes"] == sum(p.stat().st_size for p in src.glob("*.safetensors"))
    assert schemes["stored"]["params_kept"] == 70_553_706_496
    # NF4 + double quant, 4.127 bits per quantized parameter, is the only scheme of these under 48 GB here
    assert [n for n, s in schemes.items() if s["fits"]] == ["nf4", "nf4-dq", "fp4"]
    assert schemes["nf4-dq"]["file_bytes"] < schemes["nf4"]["file_bytes"] < schemes["int8"]["file_bytes"]


# --- the Hub, offline -------------------------------------------------------------------------------


class StandInHub:
    """The four HfApi calls `bnb footprint` makes, answered from a local folder; it records every call."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.downloads: list[str] = []
        self.headers: list[str] = []

    def model_info(self, repo_id: str, revision: str | None = None, files_metadata: bool = False):
        files = sorted(p.relative_to(self.root).as_posix() for p in self.root.rglob("*") if p.is_file())
        return SimpleNamespace(
            sha="0123456789abcdef" * 2 + "01234567",
            siblings=[
                SimpleNamespace(rfilename=f, size=(self.root / f).stat().st_size if files_metadata else None)
                for f in files
            ],
        )

    def hf_hub_download(self, repo_id: str, filename: str, revision: str | None = None) -> str:
        assert not filename.endswith((".safetensors", ".bin")), f"downloaded weights {filename}"
        self.downloads.append(filename)
        return str(self.root / filename)

    def parse_safetensors_file_metadata(self, repo_id: str, filename: str, revision: str | None = None):
        from huggingface_hub.utils import SafetensorsFileMetadata, TensorInfo

        self.headers.append(filename)
        with open(self.root / filename, "rb") as f:  # what a range request for the header returns
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
        metadata = header.pop("__metadata__", {})
        tensors = {
            k: TensorInfo(dtype=v["dtype"], shape=v["shape"], data_offsets=tuple(v["data_offsets"]))
            for k, v in header.items()
        }
        return SafetensorsFileMetadata(metadata=metadata, tensors=tensors)


def _pipeline(root: Path) -> Path:
    shutil.copytree(MODELS / "flux_tiny" / "src", root / "transformer")
    shutil.copytree(MODELS / "llama" / "src", root / "text_encoder")
    (root / "transformer" / "diffusion_pytorch_model.fp16.safetensors").write_bytes(b"not read")  # a variant
    (root / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    return root


@pytest.mark.parametrize("layout", ["model", "sharded", "pipeline"])
def test_hub_repo_reads_headers_only(layout: str, tmp_path: Path) -> None:
    if layout == "model":
        local = MODELS / "llama" / "src"
    elif layout == "sharded":
        local = llama_sharded(tmp_path / "sharded")
    else:
        local = _pipeline(tmp_path / "pipe")
    hub = StandInHub(local)
    schemes = make_schemes(("stored", "int8", "nf4-dq"))
    remote = footprint(FootprintRequest("org/model", schemes=schemes), api=hub).as_dict()
    here = footprint(FootprintRequest(str(local), schemes=schemes)).as_dict()
    assert remote["source"]["repo_id"] == "org/model" and remote["source"]["revision"] == hub.model_info("").sha
    assert remote["schemes"] == here["schemes"]
    weights = sorted(p.relative_to(local).as_posix() for p in local.rglob("*.safetensors"))
    assert sorted(set(hub.headers)) == [w for w in weights if not w.endswith(".fp16.safetensors")]
    assert all(name.endswith(".json") for name in hub.downloads)


def llama_sharded(folder: Path) -> Path:
    """golden llama/src as two shards and an index."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(MODELS / "llama" / "src" / "model.safetensors")
    names = sorted(tensors)
    halves = {"model-00001-of-00002.safetensors": names[:10], "model-00002-of-00002.safetensors": names[10:]}
    folder.mkdir(parents=True)
    for shard, keys in halves.items():
        save_file({k: tensors[k] for k in keys}, folder / shard, metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {k: s for s, keys in halves.items() for k in keys}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    shutil.copy(MODELS / "llama" / "src" / "config.json", folder / "config.json")
    return folder


def test_hub_errors_are_input_errors(capsys, monkeypatch) -> None:
    """Offline and not cached: one `error:` line with a hint, exit 1 (huggingface_hub's own exception)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    code, stdout, stderr = bnb(["footprint", "no-such-org/no-such-model"], capsys, monkeypatch)
    assert code == 1 and stdout == "" and stderr.startswith("error:") and "hint:" in stderr, stderr


# --- the command ------------------------------------------------------------------------------------


def test_json_document(capsys, monkeypatch) -> None:
    args = ["footprint", str(MODELS / "gpt2" / "src"), "--json", "--gpu-memory", "1GB", "--seq-len", "128"]
    code, stdout, stderr = bnb(args, capsys, monkeypatch)
    assert code == 0, stderr
    document = json.loads(stdout)
    assert document["schema_version"] == 1
    assert [s["name"] for s in document["schemes"]] == ["stored", "fp8", "int8", "nf4", "nf4-dq", "fp4"]
    assert document["settings"] == {
        "dtype": None,
        "seq_len": 128,
        "batch": 1,
        "gpu_memory": 10**9,
        "max_shard_size": 50 * 10**9,
    }
    for s in document["schemes"]:
        assert s["fits"] is True and s["headroom"] == 10**9 - s["runtime"]["total"]
        # gpt2: n_layer 2, 4 heads of 32, 128 tokens, bf16 keys and values
        assert s["runtime"]["kv_cache"] == 2 * 2 * 4 * 32 * 128 * 2


def test_table(capsys, monkeypatch) -> None:
    code, stdout, stderr = bnb(
        ["footprint", str(MODELS / "llama" / "src"), "--gpu-memory", "24GiB"], capsys, monkeypatch
    )
    assert code == 0, stderr
    for words in ("as stored", "fp8 e4m3", "int8 (LLM.int8)", "nf4 + double quant", "fits", "25.77 GB"):
        assert words in stdout, words


@pytest.mark.parametrize(
    ("args", "code", "words"),
    [
        (["--schemes", "nf5"], 2, ("'nf5'",)),
        (["--seq-len", "0"], 2, ("--seq-len",)),
        (["--gpu-memory", "lots"], 2, ("'lots'",)),
    ],
)
def test_usage_errors(args: list[str], code: int, words: tuple[str, ...], capsys, monkeypatch) -> None:
    result, stdout, stderr = bnb(["footprint", str(MODELS / "llama" / "src"), *args], capsys, monkeypatch)
    assert result == code and stdout == "" and all(w in stderr for w in words), stderr


def test_quantized_source_is_refused(capsys, monkeypatch) -> None:
    code, stdout, stderr = bnb(["footprint", str(MODELS / "llama" / "nf4")], capsys, monkeypatch)
    assert code == 1 and stdout == "" and "already quantized" in stderr and "dequantize" in stderr


def test_a_second_footprint_of_an_unchanged_checkpoint_comes_from_the_cache_without_torch(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The report is kept (BNB_CACHE_DIR/footprints): asked again, the same document comes back and
    neither torch nor transformers is imported; a changed config.json or other arguments compute afresh.

    The repeat runs as a `bnb` process of its own, whose imports are read; the reports that must be
    computed run here (torch is imported in this process already), each seen adding its entry."""
    from helpers.bnb_process import run_bnb

    src = tmp_path / "gpt2"
    shutil.copytree(MODELS / "gpt2" / "src", src)
    entries = tmp_path / "cache" / "footprints"
    monkeypatch.setenv("BNB_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("BNB_PLAN_CACHE", "on")

    def computed(*args: str) -> dict:
        before = len(list(entries.glob("*.json"))) if entries.is_dir() else 0
        code, stdout, stderr = bnb(["footprint", str(src), "--json", *args], capsys, monkeypatch)
        assert code == 0, stderr
        assert len(list(entries.glob("*.json"))) == before + 1, "not computed afresh"
        return json.loads(stdout)

    first = computed()
    again = run_bnb("footprint", str(src), "--json", env={"PYTHONPROFILEIMPORTTIME": "1"})
    assert again.returncode == 0, again.stderr
    imported = {line.rsplit("|", 1)[-1].strip() for line in again.stderr.splitlines() if "|" in line}
    assert imported and not {"torch", "transformers"} & imported
    assert json.loads(again.stdout) == first
    assert len(list(entries.glob("*.json"))) == 1
    other = computed("--seq-len", "128")
    assert other["settings"]["seq_len"] == 128
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps(config | {"dtype": "float16"}))
    assert computed() != first
