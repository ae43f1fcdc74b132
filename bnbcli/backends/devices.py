"""Which GPUs a cuda run uses: `--device cuda:N` (one) or `--devices 0,1,…` (tensors spread round-robin)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from bnbcli.errors import UsageError

if TYPE_CHECKING:  # parsing the flags needs no torch (`bnb quantize` plans before importing it)
    import torch


def _index(text: str, flag: str) -> int:
    value = text.strip().removeprefix("cuda:")
    if not value.isdigit():
        raise UsageError(f"{flag}: {text!r} is not a GPU", hint="give a GPU index such as 0, or cuda:0")
    return int(value)


def parse_devices(device: str | None, devices: str | None) -> tuple[int, ...]:
    """GPU indices asked for, in order, without checking that they exist; () means "the current one"."""
    if device is not None and devices is not None:
        raise UsageError("--device and --devices are exclusive", hint="use --devices 0,1 for several GPUs")
    if device is not None:
        return (_index(device, "--device"),)
    if devices is None:
        return ()
    indices = tuple(_index(d, "--devices") for d in devices.split(",") if d.strip())
    if not indices:
        raise UsageError("--devices is empty", hint="give GPU indices, for example --devices 0,1")
    if len(set(indices)) != len(indices):
        raise UsageError(f"--devices {devices!r} names a GPU twice", hint="name each GPU once")
    return indices


def cuda_devices(indices: tuple[int, ...]) -> tuple[torch.device, ...]:
    """torch devices for ``indices`` (the current GPU when empty); each must exist on this host."""
    import torch

    count = torch.cuda.device_count()
    for index in indices:
        if index >= count:
            raise UsageError(
                f"GPU {index} does not exist: this host has {count}",
                hint=f"use indices 0 to {count - 1}" if count else "use --backend cpu",
            )
    return tuple(torch.device("cuda", i) for i in indices) or (torch.device("cuda", torch.cuda.current_device()),)
