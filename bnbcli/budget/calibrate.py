"""`--calibrate`: each module's error measured where it lands, on text run through the model.

transformers loads the source folder (float32 on the CPU) and its tokenizer, as `bnb inspect --activations`
does, and runs the texts (its built-in ones, or ``--text-file``) one at a time. At every transformer layer
(``model.layers.7``, ``encoder.layer.3``: ``bnbcli.eval.models.layer_modules``) a forward hook runs the layer
again once per quantizable module in it, with that module's weight replaced by its quantized-and-restored
copy (the bit-exact formats), and adds up ‖h_q − h‖² and ‖h‖² of the layer's output hidden state. A module's
score is their ratio: the relative error its quantization puts into the residual stream, seen through its
real inputs and through the layer (softmax, activation functions). A module outside the numbered layers
(BERT's pooler, a quantized head) is measured the same way at the model's output, rerunning the model: a
module whose output the model's first output does not use scores 0. The scores are sums over all tokens,
so they do not depend on the order of the texts; torch's CPU matmuls may change their last digits with the
thread count, so the scores are rounded to 6 significant digits before they choose anything.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from inspect import signature
from pathlib import Path
from typing import Any

import torch

from bnbcli.errors import BnbError
from bnbcli.eval.models import layer_modules
from bnbcli.inspect import activations as act

Restore = Callable[[str, torch.Tensor], torch.Tensor]  # module, its weight [out, in] → quantized and restored


class _Sums:
    def __init__(self) -> None:
        self.error: dict[str, float] = {}
        self.signal: dict[str, float] = {}

    def add(self, module: str, changed: torch.Tensor, base: torch.Tensor) -> None:
        self.error[module] = self.error.get(module, 0.0) + float(((changed.double() - base.double()) ** 2).sum())
        self.signal[module] = self.signal.get(module, 0.0) + float((base.double() ** 2).sum())

    def ratios(self) -> dict[str, float]:
        return {m: float(f"{self.error[m] / self.signal[m]:.6g}") if self.signal[m] > 0 else 0.0 for m in self.error}


def _hidden(output: Any) -> torch.Tensor:
    """A layer's hidden state, or a model's first output (logits, last hidden state)."""
    return output if isinstance(output, torch.Tensor) else output[0]


class _Probe:
    """The forward hooks: per layer, rerun it with each module quantized; elsewhere, the module itself."""

    def __init__(self, model: torch.nn.Module, modules: Mapping[str, torch.nn.Module], restore: Restore) -> None:
        self.sums = _Sums()
        self.busy = False
        self.quantized = {name: restore(name, _as_out_in(m)).to(torch.float32) for name, m in modules.items()}
        self.handles = []
        inside: set[str] = set()
        for layer_name, layer in layer_modules(model):
            members = {n: m for n, m in modules.items() if n.startswith(layer_name + ".")}
            inside.update(members)
            if members:
                self.handles.append(layer.register_forward_hook(self._rerun(members), with_kwargs=True))
        outside = {n: m for n, m in modules.items() if n not in inside}
        if outside:
            self.handles.append(model.register_forward_hook(self._rerun(outside), with_kwargs=True))

    def _rerun(self, members: dict[str, torch.nn.Module]) -> Any:
        def hook(block: torch.nn.Module, args: Any, kwargs: Any, output: Any) -> None:
            if self.busy:
                return
            self.busy = True
            try:
                base = _hidden(output).detach()
                for name, module in members.items():
                    weight = module.weight
                    assert isinstance(weight, torch.Tensor)
                    original = weight.data.clone()
                    # Conv1D holds [in, out]
                    weight.data.copy_(
                        self.quantized[name] if isinstance(module, torch.nn.Linear) else self.quantized[name].t()
                    )
                    try:
                        self.sums.add(name, _hidden(block(*args, **kwargs)).detach(), base)
                    finally:
                        weight.data.copy_(original)
            finally:
                self.busy = False

        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _as_out_in(module: torch.nn.Module) -> torch.Tensor:
    weight = module.weight
    assert isinstance(weight, torch.Tensor)
    return weight.detach() if isinstance(module, torch.nn.Linear) else weight.detach().t()


def layer_output_errors(
    model_dir: Path, names: list[str], restore: Restore, texts: list[str] | None
) -> dict[str, float]:
    """module → the relative squared error its quantization adds to its layer's output, over ``texts``."""
    try:
        transformers = act._import_transformers("--calibrate")
        with act._silent(transformers):
            config = act._read_config(transformers, Path(model_dir))
            tokenizer = act._load_tokenizer(transformers, Path(model_dir))
            model = act._load_model(transformers, Path(model_dir), config, torch.device("cpu"))
    except BnbError as e:  # the loading rules of --activations, said for --calibrate
        raise type(e)(
            e.message.replace("--activations", "--calibrate"), e.hint.replace("--activations", "--calibrate")
        ) from None
    found = dict(model.named_modules())
    probe = _Probe(model, {n: found[n] for n in names if n in found}, restore)
    try:
        _run(model, tokenizer, config, list(act.BUILTIN_TEXTS) if texts is None else texts)
    finally:
        probe.remove()
    return probe.sums.ratios()


def _run(model: torch.nn.Module, tokenizer: Any, config: Any, texts: list[str]) -> None:
    limit = act._max_length(config, tokenizer)
    accepted = set(signature(model.forward).parameters)
    with torch.inference_mode():
        for text in texts:
            encoded = tokenizer(text, return_tensors="pt", truncation=True, max_length=limit)
            if encoded["input_ids"].numel():
                model(**{k: v for k, v in encoded.items() if k == "input_ids" or k in accepted})
