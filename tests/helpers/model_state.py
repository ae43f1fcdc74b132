"""A model that transformers loaded, as comparable values: every module's class, parameters and buffers
(dtype, shape, raw bytes), each QuantState field and the settings a bitsandbytes layer computes with. Two
loads are the same model when these are equal (assert_same_state names the entries that differ)."""

from __future__ import annotations

from typing import Any

import torch

from helpers.golden import tensor_bytes


def _value(v: Any) -> Any:
    """A comparable form: tensors as (dtype, shape, raw bytes), QuantState as a dict of its fields."""
    import bitsandbytes as bnb

    if isinstance(v, torch.Tensor):
        return ("tensor", str(v.dtype), tuple(v.shape), tensor_bytes(v.detach().cpu()))
    if isinstance(v, bnb.functional.QuantState):
        return {k: _value(x) for k, x in sorted(vars(v).items())}
    if isinstance(v, torch.Size):
        return tuple(v)
    if isinstance(v, torch.dtype):
        return str(v)
    return v


def module_state(model: torch.nn.Module, exclude: tuple[str, ...] = ()) -> dict[str, Any]:
    """Flat {what: value} for every module: its class, its own parameters and buffers (bytes, dtype,
    shape), and for quantized layers every QuantState field (absmax, code, blocksize, shape, dtype,
    quant_type, offset, state2/nested) or Int8Params' CB/SCB, plus the settings the layer computes with."""
    import bitsandbytes as bnb

    state: dict[str, Any] = {}
    for name, module in model.named_modules():
        if name in exclude or any(name.startswith(e + ".") for e in exclude):
            continue
        state[f"{name}:class"] = type(module).__qualname__
        for pname, p in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            key = f"{name}.{pname}"
            state[key] = _value(p)
            state[f"{key}:type"] = type(p).__qualname__
            if isinstance(p, bnb.nn.Params4bit):
                assert p.quant_state is not None, f"{key}: Params4bit without a quant_state"
                for field, v in _value(p.quant_state).items():
                    state[f"{key}.quant_state.{field}"] = v
            if isinstance(p, bnb.nn.Int8Params):
                state[f"{key}.CB"] = _value(p.CB)
                state[f"{key}.SCB"] = _value(p.SCB)
                state[f"{key}.has_fp16_weights"] = p.has_fp16_weights
        if isinstance(module, bnb.nn.Linear4bit):
            state[f"{name}:compute_dtype"] = str(module.compute_dtype)
            state[f"{name}:quant_storage"] = str(module.quant_storage)
        if isinstance(module, bnb.nn.Linear8bitLt):
            state[f"{name}:threshold"] = module.state.threshold
            state[f"{name}:has_fp16_weights"] = module.state.has_fp16_weights
    return state


def state_dict_bytes(model: torch.nn.Module, exclude: tuple[str, ...] = ()) -> dict[str, Any]:
    """The state_dict transformers would save again (quant_state serialized), as comparable values."""
    return {
        k: _value(v) for k, v in model.state_dict().items() if not any(k == e or k.startswith(e + ".") for e in exclude)
    }


def assert_same_state(ours: dict[str, Any], theirs: dict[str, Any], what: str) -> None:
    assert set(ours) == set(theirs), (
        f"{what}: only ours {sorted(set(ours) - set(theirs))[:5]}, only theirs {sorted(set(theirs) - set(ours))[:5]}"
    )
    differing = [k for k in theirs if ours[k] != theirs[k]]
    assert not differing, f"{what}: {len(differing)} of {len(theirs)} entries differ, e.g. {differing[:5]}"
