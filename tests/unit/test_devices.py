"""--device / --devices parsing and checks (no GPU needed)."""

from __future__ import annotations

import pytest

from bnbcli.backends.devices import cuda_devices, parse_devices
from bnbcli.errors import UsageError


@pytest.mark.parametrize(
    ("device", "devices", "expected"),
    [(None, None, ()), ("cuda:1", None, (1,)), ("0", None, (0,)), (None, "0,1", (0, 1)), (None, " 2, 0 ", (2, 0))],
)
def test_parse_devices(device, devices, expected) -> None:
    assert parse_devices(device, devices) == expected


@pytest.mark.parametrize(
    ("device", "devices", "words"),
    [
        ("cuda:0", "0,1", "exclusive"),
        ("gpu0", None, "'gpu0' is not a GPU"),
        (None, "0,0", "twice"),
        (None, ",", "empty"),
        (None, "0,x", "'x' is not a GPU"),
    ],
)
def test_parse_devices_refuses(device, devices, words) -> None:
    with pytest.raises(UsageError, match=words):
        parse_devices(device, devices)


def test_a_gpu_this_host_lacks_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="GPU 999 does not exist"):
        cuda_devices((999,))
