"""The two checkpoints of `bnb eval`: which ones, whether they belong together, and loading them as users do.

QUANT must be a bitsandbytes checkpoint (config.json's ``quantization_config``, quant_method
"bitsandbytes"); ORIG is ``--against`` or the source recorded in QUANT's bnb_manifest.json, unquantized,
with the same architecture and every QUANT tensor's plain name and shape (headers only, nothing read).
Each loads with ``from_pretrained(folder)`` — bitsandbytes' own layers run QUANT — placed on the chosen
device, in the dtype it loads in by itself: ORIG in its stored dtype (bf16 stays bf16, also on the CPU),
QUANT with the compute dtype its config names.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bnbcli.checkpoint.manifest import MANIFEST_NAME
from bnbcli.checkpoint.source import Checkpoint, ModelSource, open_checkpoint
from bnbcli.errors import BackendUnavailable, InputError, UsageError
from bnbcli.inspect.activations import _causal as is_causal_lm
from bnbcli.inspect.activations import _first_line as first_line
from bnbcli.inspect.activations import _import_transformers
from bnbcli.plan.dequantize_layout import plan_component

NOT_ITS_SOURCE = "--against must be the checkpoint QUANT was quantized from"
TOKENIZER_HINT = (
    "bnb eval tokenizes with the checkpoint's own tokenizer: put its files (tokenizer.json, tokenizer_config.json, "
    "vocab…) beside QUANT's or ORIG's config.json"
)


@dataclass(frozen=True)
class Pair:
    quant: ModelSource
    orig: ModelSource
    orig_label: str  # as given (--against) or as the manifest records it
    causal: bool  # a causal LM (logits over a vocabulary) rather than an encoder

    @property
    def orig_bytes(self) -> int:
        return sum(t.nbytes for t in self.orig.tensors.values())

    @property
    def quant_bytes(self) -> int:
        return sum(t.nbytes for t in self.quant.tensors.values())


def import_transformers() -> Any:
    return _import_transformers("bnb eval")


def open_pair(quant: str, against: str | None) -> Pair:
    quant_source = _model(open_checkpoint(quant), quant)
    config = quant_source.config or {}
    method = (config.get("quantization_config") or {}).get("quant_method")
    if method != "bitsandbytes":
        found = f"quantized with {method}" if method else "not quantized (config.json has no quantization_config)"
        raise InputError(
            f"{quant} is {found}",
            hint="bnb eval measures a bitsandbytes checkpoint: make one with `bnb quantize SRC OUT`, "
            "then run `bnb eval OUT`",
        )
    label, revision = (against, None) if against is not None else _recorded_source(quant_source, quant)
    orig_source = _model(open_checkpoint(label, revision=revision), label)
    if (orig_source.config or {}).get("quantization_config"):
        raise InputError(f"{label} is quantized too (config.json has a quantization_config)", hint=NOT_ITS_SOURCE)
    _check_same_model(quant_source, orig_source, label)
    return Pair(quant_source, orig_source, label, is_causal_lm(_Config(config)))


class _Config:
    """config.json's architectures, as the attribute transformers' configs have."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.architectures = config.get("architectures")


def _model(checkpoint: Checkpoint, label: str) -> ModelSource:
    if checkpoint.kind == "diffusers":
        raise InputError(
            f"{label} is a diffusers pipeline", hint="bnb eval runs transformers models (text in, logits or states out)"
        )
    source = checkpoint.components[""]
    if source.config is None:
        raise InputError(f"{label} has no config.json", hint="bnb eval loads the model folder with transformers")
    return source


def _recorded_source(quant: ModelSource, label: str) -> tuple[str, str | None]:
    """(path or Hub repo id, revision) of the source bnb quantize recorded."""
    path = quant.root / MANIFEST_NAME
    hint = "pass --against ORIG: the checkpoint QUANT was quantized from (a folder or a Hub repo id)"
    try:
        source = json.loads(path.read_text())["source"]
    except FileNotFoundError:
        raise UsageError(f"{label} has no {MANIFEST_NAME} that names its source", hint=hint) from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InputError(f"{path} cannot be read: {first_line(exc)}", hint=hint) from None
    recorded = source.get("repo_id") or source.get("path") if isinstance(source, dict) else None
    if not isinstance(recorded, str):
        raise InputError(f"{path} names no source", hint=hint)
    if source.get("repo_id") is None and not Path(recorded).exists():
        raise InputError(f"the source recorded in {path}, {recorded}, is not there any more", hint=hint)
    return recorded, source.get("revision")


def _check_same_model(quant: ModelSource, orig: ModelSource, label: str) -> None:
    def identity(config: dict[str, Any] | None) -> tuple[Any, Any]:
        config = config or {}
        return config.get("model_type"), config.get("architectures")

    if identity(quant.config) != identity(orig.config):
        q, o = identity(quant.config), identity(orig.config)
        raise InputError(
            f"{label} is not QUANT's source: it is {o[0]} {o[1]}, QUANT is {q[0]} {q[1]}", hint=NOT_ITS_SOURCE
        )
    for tensor in plan_component(quant, None, None).tensors:
        info = orig.tensors.get(tensor.name)
        if info is None:
            raise InputError(f"{label} is not QUANT's source: it has no tensor {tensor.name}", hint=NOT_ITS_SOURCE)
        if tuple(info.shape) != tuple(tensor.shape):
            raise InputError(
                f"{label} is not QUANT's source: {tensor.name} is {list(info.shape)} there and "
                f"{list(tensor.shape)} in QUANT",
                hint=NOT_ITS_SOURCE,
            )


# --- running them ------------------------------------------------------------------------------------------


def resolve_device(name: str) -> torch.device:
    """auto: the current GPU when torch sees one, else the CPU."""
    if name == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name}: not a device", hint="use auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"--device {name}: bnb eval runs on cpu or cuda", hint="use auto, cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise BackendUnavailable(f"--device {name}: torch sees no CUDA GPU here", hint="use --device cpu")
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index >= torch.cuda.device_count():
            raise BackendUnavailable(
                f"--device {name}: there are {torch.cuda.device_count()} GPUs", hint="use cuda:0 … or auto"
            )
        device = torch.device("cuda", index)
    return device


def load_model(transformers: Any, source: ModelSource, causal: bool, device: torch.device, role: str) -> Any:
    cls = transformers.AutoModelForCausalLM if causal else transformers.AutoModel
    try:
        model = cls.from_pretrained(str(source.root), device_map={"": str(device)}, local_files_only=True)
    except torch.cuda.OutOfMemoryError:
        raise InputError(
            f"{role} does not fit in the memory of {device}",
            hint="use --one-at-a-time (the original is freed before QUANT loads), or --device cpu",
        ) from None
    except Exception as exc:
        raise InputError(
            f"transformers cannot load {role} ({source.root}): {first_line(exc)}",
            hint="bnb eval runs models transformers can load with from_pretrained(folder)",
        ) from None
    model.eval()
    return model


def load_config(transformers: Any, pair: Pair) -> Any:
    try:
        return transformers.AutoConfig.from_pretrained(str(pair.quant.root), local_files_only=True)
    except Exception as exc:
        raise InputError(
            f"transformers {transformers.__version__} cannot read QUANT's config.json: {first_line(exc)}",
            hint="bnb eval runs models transformers knows (an unknown model_type needs a newer transformers)",
        ) from None


def load_tokenizer(transformers: Any, pair: Pair) -> Any:
    """QUANT's own tokenizer (bnb quantize copies it), else ORIG's."""
    last: BaseException | None = None
    for source in (pair.quant, pair.orig):
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(str(source.root), local_files_only=True)
        except Exception as exc:
            last = exc
            continue
        if len(tokenizer) > 32:  # a tokenizer built without its vocabulary files has a handful of tokens
            return tokenizer
    why = f" ({first_line(last)})" if last is not None else " (no vocabulary found)"
    raise InputError(f"no tokenizer beside QUANT or ORIG{why}", hint=TOKENIZER_HINT)


def layer_modules(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """The transformer layers: modules of the first numbered stack (``model.layers.7``, ``encoder.layer.3``,
    ``transformer.h.0``), in order."""
    return [
        (name, module)
        for name, module in model.named_modules()
        if (parts := name.split("."))[-1].isdigit() and len(parts) > 1 and not any(p.isdigit() for p in parts[:-1])
    ]


class LayerTap:
    """Forward hooks that keep each layer's output hidden state [tokens, hidden] of the last forward."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.names = [name for name, _ in layer_modules(model)]
        self.outputs: list[torch.Tensor | None] = [None] * len(self.names)
        self._handles = [
            module.register_forward_hook(self._hook(i)) for i, (_, module) in enumerate(layer_modules(model))
        ]

    def _hook(self, i: int) -> Callable[..., None]:
        def keep(module: torch.nn.Module, args: Any, output: Any) -> None:
            hidden = output[0] if isinstance(output, tuple) else output
            if isinstance(hidden, torch.Tensor):
                self.outputs[i] = hidden.detach().reshape(-1, hidden.shape[-1])

        return keep

    def take(self) -> list[torch.Tensor]:
        taken = [t for t in self.outputs if t is not None]
        self.outputs = [None] * len(self.names)
        return taken

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
