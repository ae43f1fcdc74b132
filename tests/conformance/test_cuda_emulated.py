"""The CUDA backend's kernels and wrappers, run on the CPU, against the CPU formats: byte for byte.

The kernel sources are compiled with g++ and tests/helpers/cuda_host_shim.h (C++ twins of the PTX primitives,
a CTA of 256 fibers meeting at barriers), and ``bnbcli.backends.cuda`` is driven with CPU tensors, its launches
routed to that build. This checks everything but the instructions themselves: the wrappers' argument
lists against the kernel signatures (sizes and pointer-ness), indexing, tails, nibble packing,
reductions and tables. The real instructions are checked by tests/gpu/test_cuda_kernels.py on a GPU.
Skipped where no C++20 g++ with _Float16 and <ucontext.h> is at hand.
"""

from __future__ import annotations

import ctypes
import dataclasses
import re
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from bnbcli.backends import cuda, cuda_launches, cuda_runtime
from bnbcli.formats import blockwise8, fourbit, int8
from bnbcli.formats.cuda_mean import cuda_mean_f32
from bnbcli.formats.dtypes import UINT8
from bnbcli.formats.gpu_math import rcp_steps
from bnbcli.pipeline import convert

from helpers import REPO
from helpers.cuda_cases import assert_same, inputs

pytestmark = pytest.mark.slow

SHIM = REPO / "tests" / "helpers" / "cuda_host_shim.h"
CXX = shutil.which("g++")
CXXFLAGS = ["-std=c++20", "-O1", "-ffp-contract=off", "-fPIC", "-shared"]
PROBE = "#include <ucontext.h>\nint main() { ucontext_t c; getcontext(&c); _Float16 h = 1; return int(h) - 1; }\n"


def _symbol(name: str) -> str:
    return re.sub(r"\W+", "_", name).strip("_")


_HARNESS_HEAD = """
#include <type_traits>
#include <utility>

template <class... P, unsigned long... I>
void call_indexed(void (*k)(P...), void** a, std::index_sequence<I...>) {
    k(*static_cast<std::remove_reference_t<P>*>(a[I])...);
}
template <class... P>
void call_with(void (*k)(P...), void** a) { call_indexed(k, a, std::index_sequence_for<P...>{}); }
template <class... P>
int signature_of(void (*)(P...), int* sizes, int* pointers) {
    int i = 0;
    ((sizes[i] = int(sizeof(P)), pointers[i] = int(std::is_pointer_v<P>), i++), ...);
    return i;
}
"""


def _harness() -> str:
    """One translation unit: every kernel source, then a launcher and a signature per instantiation."""
    lines = [f'#include "{source}"' for source in cuda_runtime.SOURCES]
    lines.append(_HARNESS_HEAD)
    for names in cuda_runtime.SOURCES.values():
        for name in names:
            s = _symbol(name)
            lines.append(f'extern "C" void launch_{s}(int grid, void** a) {{')
            lines.append(f"    emulate_launch(grid, [&] {{ call_with(&{name}, a); }});")
            lines.append("}")
            lines.append(f'extern "C" int signature_{s}(int* sizes, int* pointers) {{')
            lines.append(f"    return signature_of(&{name}, sizes, pointers);")
            lines.append("}")
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="session")
def cxx(tmp_path_factory: pytest.TempPathFactory) -> str:
    """g++, where it builds the shim (else the tests skip)."""
    if CXX is None:
        pytest.skip("no g++")
    work = tmp_path_factory.mktemp("cxx_probe")
    (work / "probe.cpp").write_text(PROBE)
    if subprocess.run([CXX, "-std=c++20", "probe.cpp", "-o", "probe"], cwd=work).returncode:
        pytest.skip("g++ lacks C++20, <ucontext.h> or _Float16")
    return CXX


@pytest.fixture(scope="session")
def kernels(cxx: str, tmp_path_factory: pytest.TempPathFactory) -> ctypes.CDLL:
    work = tmp_path_factory.mktemp("cuda_emulated")
    source = _harness()
    (work / "harness.cpp").write_text(source)
    kernel_dir = cuda_runtime.kernel_dir()
    command = [cxx, *CXXFLAGS, "-include", str(SHIM), f"-I{kernel_dir}", "harness.cpp"]
    done = subprocess.run([*command, "-o", "kernels.so"], cwd=work, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-4000:]
    lib = ctypes.CDLL(str(work / "kernels.so"))
    steps = np.ascontiguousarray(rcp_steps().numpy().astype(np.int8))
    lib.set_rcp_steps(steps.ctypes.data_as(ctypes.c_void_p))
    lib._keep = steps  # the table must outlive every launch
    return lib


# The emulator's own execution model: a CTA's threads meet at __syncthreads and at every warp exchange,
# a read with no barrier after another thread's write shows the race, a barrier some thread never
# reaches aborts (the GPU hangs), and __shfl/__reduce_max see the whole warp.
_MODEL_CHECK = r"""
#include <cstdio>
__global__ void reverse(int* out, bool sync) {
    __shared__ int s[256];
    s[threadIdx.x] = int(threadIdx.x) * 3 + int(blockIdx.x);
    if (sync) __syncthreads();
    out[blockIdx.x * 256 + threadIdx.x] = s[255 - threadIdx.x];
}
__global__ void warp_ops(int* out) {
    const int lane = int(threadIdx.x & 31), v = int((threadIdx.x * 37) % 101) - 50;
    const int from_next = __shfl_sync(0xffffffffu, v, (lane + 1) & 31);
    const int from_xor = __shfl_xor_sync(0xffffffffu, v, 5);
    out[3 * threadIdx.x] = from_next;
    out[3 * threadIdx.x + 1] = from_xor;
    out[3 * threadIdx.x + 2] = __reduce_max_sync(0xffffffffu, v);
}
__global__ void diverge(int* out) {
    if (threadIdx.x == 7) return;
    __syncthreads();
    out[threadIdx.x] = 1;
}
static int value(int t) { return (t * 37) % 101 - 50; }
int main(int argc, char** argv) {
    static int out[3 * 256];
    for (int sync = 1; sync >= 0; sync--) {
        emulate_launch(3, [&] { reverse(out, sync); });
        int wrong = 0;
        for (int t = 0; t < 256; t++) wrong += out[2 * 256 + t] != (255 - t) * 3 + 2;
        std::printf("reverse sync=%d wrong=%d\n", sync, wrong);
    }
    emulate_launch(2, [&] { warp_ops(out); });
    int wrong = 0;
    for (int t = 0; t < 256; t++) {
        const int warp = t & ~31, lane = t & 31;
        int m = value(warp);
        for (int l = 1; l < 32; l++) m = max(m, value(warp + l));
        wrong += out[3 * t] != value(warp + ((lane + 1) & 31)) || out[3 * t + 1] != value(warp + (lane ^ 5));
        wrong += out[3 * t + 2] != m;
    }
    std::printf("warp ops wrong=%d\n", wrong);
    if (argc > 1) emulate_launch(1, [&] { diverge(out); });
    return 0;
}
"""


def test_the_emulator_keeps_the_gpus_barrier_semantics(cxx: str, tmp_path: Path) -> None:
    (tmp_path / "model.cpp").write_text(_MODEL_CHECK)
    flags = [f for f in CXXFLAGS if f not in ("-fPIC", "-shared")]
    command = [cxx, *flags, "-include", str(SHIM), "model.cpp", "-o", "model"]
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-4000:]
    ran = subprocess.run(["./model"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert ran.returncode == 0, ran.stderr
    lines = ran.stdout.splitlines()
    assert lines[0] == "reverse sync=1 wrong=0"  # behind __syncthreads every thread reads every write
    assert lines[1] != "reverse sync=0 wrong=0" and lines[1].startswith("reverse sync=0")  # the race shows
    assert lines[2] == "warp ops wrong=0"
    hang = subprocess.run(["./model", "diverge"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert hang.returncode != 0 and "deadlocks at a barrier" in hang.stderr, hang


def _emulated_launch(lib: ctypes.CDLL):
    def launch(device: torch.device, source: str, name: str, grid: int, args: tuple) -> None:
        symbol = _symbol(name)
        assert name in cuda_runtime.SOURCES[source], f"{name} is not instantiated in {source}"
        sizes, pointers = (ctypes.c_int * 32)(), (ctypes.c_int * 32)()
        count = getattr(lib, f"signature_{symbol}")(sizes, pointers)
        assert count == len(args), f"{name}: {len(args)} arguments for {count} parameters"
        holders: list[ctypes._SimpleCData] = []
        for i, arg in enumerate(args):
            if isinstance(arg, torch.Tensor):
                assert pointers[i], f"{name} parameter {i}: a tensor for a scalar"
                assert arg.is_contiguous() and arg.device.type == "cpu"
                holders.append(ctypes.c_void_p(arg.data_ptr()))
            else:
                assert isinstance(arg, np.generic), f"{name} parameter {i}: {type(arg).__name__} is not a numpy scalar"
                assert arg.dtype.itemsize == sizes[i], f"{name} parameter {i}: {arg.dtype} for {sizes[i]} bytes"
                if pointers[i]:
                    assert arg.dtype == np.uint64 and int(arg) == 0, f"{name} parameter {i}: only NULL as a scalar"
                holders.append((ctypes.c_char * sizes[i]).from_buffer_copy(arg.tobytes()))
        array = (ctypes.c_void_p * len(holders))(*[ctypes.addressof(h) for h in holders])
        getattr(lib, f"launch_{symbol}")(ctypes.c_int(grid), array)

    return launch


@pytest.fixture
def emulated(kernels: ctypes.CDLL, monkeypatch: pytest.MonkeyPatch):
    """bnbcli.backends.cuda taking CPU tensors, its kernels (launched by cuda_launches) running on the emulator."""
    monkeypatch.setattr(cuda_launches, "launch", _emulated_launch(kernels))
    monkeypatch.setattr(cuda_launches, "on_gpu", lambda x, what="": x.device)
    monkeypatch.setattr(cuda_launches, "sm_count", lambda index: 1)
    monkeypatch.setattr(cuda_launches, "resident_ctas", lambda index, source, name: 2)  # two CTAs stride the tiles
    # The geometry the CPU twin of torch's CUDA mean assumes (an H100's).
    monkeypatch.setattr(cuda_launches, "reduce_geometry", lambda index: (132, 2048))
    return cuda


CASES = list(inputs(seed=20261124, count=10, max_numel=12000))


@pytest.mark.parametrize(("name", "x"), CASES, ids=[c[0] for c in CASES])
def test_4bit_matches_cpu(emulated, name: str, x: torch.Tensor) -> None:
    rng = np.random.default_rng(abs(hash(name)) % 2**32)
    for quant_type in ("nf4", "fp4"):
        for blocksize in (32, 64, int(rng.choice([128, 256, 512, 1024, 2048, 4096]))):
            double_quant = bool(rng.integers(0, 2)) or blocksize == 64
            expected = fourbit.quantize_4bit(x, quant_type, blocksize, double_quant)
            q = emulated.quantize_4bit(x, quant_type, blocksize, double_quant)
            what = f"{name} {quant_type} {blocksize} dq={double_quant}"
            assert_same(q, expected, what)
            assert_same(emulated.dequantize_4bit(q), fourbit.dequantize_4bit(expected), what + " dequant")


@pytest.mark.parametrize(("name", "x"), CASES, ids=[c[0] for c in CASES])
def test_blockwise8_matches_cpu(emulated, name: str, x: torch.Tensor) -> None:
    rng = np.random.default_rng(abs(hash(name)) % 2**32)
    for blocksize in (64, int(rng.choice([128, 256, 512, 1024, 2048, 4096]))):
        for nested in (False, True):
            expected = blockwise8.quantize_blockwise8(x, blocksize, nested)
            q = emulated.quantize_blockwise8(x, blocksize, nested)
            what = f"{name} {blocksize} nested={nested}"
            assert_same(q, expected, what)
            assert_same(emulated.dequantize_blockwise8(q), blockwise8.dequantize_blockwise8(expected), what + " dq")


@pytest.mark.parametrize(("name", "x"), CASES, ids=[c[0] for c in CASES])
def test_int8_matches_cpu(emulated, name: str, x: torch.Tensor) -> None:
    for threshold in (0.0, 1.5):
        expected = int8.reference_quantize_int8_rowwise(x, threshold)
        q = emulated.quantize_int8_rowwise(x, threshold)
        assert_same(q, expected, f"{name} threshold={threshold}")
        restored = emulated.dequantize_int8_rowwise(q.CB, q.SCB)
        assert_same(restored, int8.dequantize_int8_rowwise(expected.CB, expected.SCB), f"{name} dequant")


def test_quant_storage_and_long_rows(emulated) -> None:
    """Packed bytes viewed as wider storage (the dropped trailing byte), and an int8 row longer than
    the kernel keeps in registers (its remainder is read twice)."""
    x = torch.randn(3, 7, dtype=torch.bfloat16)
    for storage in (torch.bfloat16, torch.float32):
        expected = fourbit.quantize_4bit(x, "nf4", 64, True, storage)
        q = emulated.quantize_4bit(x, "nf4", 64, True, storage)
        assert_same(q, expected, f"storage {storage}")
        assert_same(emulated.dequantize_4bit(q), fourbit.dequantize_4bit(expected), f"storage {storage} dequant")
    long_rows = torch.randn(2, 8192 + 2048 + 8, dtype=torch.float16)
    long_rows[1, 9000] = 100.0
    for threshold in (0.0, 6.0):
        assert_same(
            emulated.quantize_int8_rowwise(long_rows, threshold),
            int8.reference_quantize_int8_rowwise(long_rows, threshold),
            f"long rows {threshold}",
        )


# Lengths that walk torch's reduction geometries: one to a few lanes, the float4 switch at 128, tails
# of 1-3 elements, one CTA up to 130560 values and several above.
MEAN_LENGTHS = [1, 2, 3, 5, 31, 64, 100, 127, 128, 129, 131, 255, 513, 2050, 4099, 130559, 130560, 130561, 262147]


@pytest.mark.parametrize("n", MEAN_LENGTHS)
def test_nested_offset_is_torchs_cuda_mean(emulated, n: int) -> None:
    """kTorchMeanPartials + the fold in kQuantizeBlockwise give the bits of the CPU twin of torch's
    CUDA mean (values over eight decades, so the order of the sums shows in the last bits)."""
    rng = np.random.default_rng(n)
    values = (rng.lognormal(0.0, 4.0, n) * rng.choice([-1.0, 1.0], n)).astype(np.float32)
    codes, nested_absmax, on_device = emulated._nested(torch.from_numpy(values), 256, None)
    offset = np.float32(on_device.item())  # _nested leaves the offset on the device
    assert offset.tobytes() == cuda_mean_f32(values).tobytes()
    expected_codes, expected_absmax = blockwise8.quantize_codes(torch.from_numpy(values - offset), 256)
    assert_same(codes, expected_codes, f"n={n} codes")
    assert_same(nested_absmax, expected_absmax, f"n={n} absmax")


def test_queued_double_quant_offset_stays_on_the_device(emulated) -> None:
    """The pipeline's path: the offset is read by the dequantize kernel from device memory, and the
    record takes it afterwards; both give the reference's bytes."""
    x = torch.randn(37, 300, dtype=torch.bfloat16)
    expected = fourbit.quantize_4bit(x, "nf4", 64, True)
    q, offset = emulated.quantize_4bit_queued(x, "nf4", 64, True)
    assert offset is not None and np.isnan(q.nested_offset)
    assert_same(emulated.dequantize_4bit(q, offset), fourbit.dequantize_4bit(expected), "dequant, offset on device")
    assert_same(dataclasses.replace(q, nested_offset=float(offset)), expected, "record with the offset")


def test_converter_entries_with_the_offset_left_on_the_device(emulated) -> None:
    """What `bnb quantize --backend cuda` does per double-quantized weight, minus the streams: the
    entries are made before the offset is read, then its quant_state entry is rebuilt; every entry and
    the round trip equal the CPU reference's."""
    x = torch.randn(64, 96, dtype=torch.bfloat16)
    reference = fourbit.quantize_4bit(x, "nf4", 64, True)
    expected = reference.state_dict("w")
    job = SimpleNamespace(source=SimpleNamespace(name="w"), entries=[SimpleNamespace(key=k) for k in expected])
    scheme = SimpleNamespace(method="nf4", blocksize=64, double_quant=True, quant_storage=UINT8)
    entries, restored, pending = convert._quantize(job, x, scheme, "cuda")  # type: ignore[arg-type]
    assert pending is not None
    fields, offset = pending
    assert fields.packed.numel() == 0  # nothing of the device record is kept
    key, value = convert._quant_state_entry(fields, offset, "w")
    entries[key] = value
    assert list(entries) == list(expected)
    for name, tensor in expected.items():
        assert_same(entries[name], tensor, name)
    assert_same(restored, fourbit.dequantize_4bit(reference), "round trip")
