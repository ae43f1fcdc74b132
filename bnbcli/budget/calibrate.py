"""`--calibrate`: each module's error measured through the model, on text.

transformers loads the source folder (float32 on the CPU) and its tokenizer, as `bnb inspect --activations`
does, and runs the texts (its built-in ones, or ``--text-file``) one at a time. For a module with weight W
and quantization error ΔW = Ŵ − W, quantizing it moves its output by δ = ΔW·x at every token, x being its
real input (a forward hook keeps it). How much that moves the model's output is read from the gradient g of
the output with respect to the module's output (a hook on it): to second order, the output error grows by
½·E[(Σ_t g_t·δ_t)²] over random draws of g. For a language model g is the gradient of log p(y) at tokens y
drawn from the model itself (the Fisher information): the increase of the KL divergence `bnb eval` reports.
For an encoder g is the gradient of r·p/‖p‖, p the text's mean-pooled embedding and r a random direction
across p: the increase of the cosine distance between the embeddings `bnb eval` compares. The score is that
mean over ``PROBES`` draws per text, summed over the texts: the expected output error the module adds, in
the unit of the model's own measure, so that scores compare across layers and kinds of modules.

One forward and ``PROBES`` backward passes per text (the draws come from a generator seeded with 0, so the
same texts give the same scores). torch's CPU kernels may change the last digits with the thread count, so
the scores are rounded to 6 significant digits before they choose anything.
"""

from __future__ import annotations

from collections.abc import Callable
from inspect import signature
from pathlib import Path
from typing import Any

import torch

from bnbcli.errors import BnbError
from bnbcli.inspect import activations as act
from bnbcli.inspect.hf_models import import_transformers, silent_libraries

PROBES = 8  # draws of y (or r) per text
Restore = Callable[[str, torch.Tensor], torch.Tensor]  # module, its weight [out, in] → quantized and restored


class _Taps:
    """Per module: its input kept on the forward, its output's gradient on each backward."""

    def __init__(self, modules: dict[str, torch.nn.Module]) -> None:
        self.inputs: dict[str, torch.Tensor] = {}
        self.grads: dict[str, torch.Tensor] = {}
        self.handles = [m.register_forward_hook(self._tap(name)) for name, m in modules.items()]

    def _tap(self, name: str) -> Any:
        def hook(module: torch.nn.Module, args: Any, output: torch.Tensor) -> None:
            self.inputs[name] = args[0].detach()
            if output.requires_grad:
                output.register_hook(lambda g: self.grads.__setitem__(name, g.detach()))

        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _out_in(module: torch.nn.Module) -> torch.Tensor:
    """The weight as bitsandbytes quantizes it, [out, in] (Conv1D holds [in, out])."""
    weight = module.weight
    assert isinstance(weight, torch.Tensor)
    return weight.detach() if isinstance(module, torch.nn.Linear) else weight.detach().t()


def output_errors(model_dir: Path, names: list[str], restore: Restore, texts: list[str] | None) -> dict[str, float]:
    """module → the expected output error its quantization adds, over ``texts`` (module docstring)."""
    model, tokenizer, config = _load(Path(model_dir))
    found = dict(model.named_modules())
    modules = {n: found[n] for n in names if n in found}
    errors = {n: restore(n, _out_in(m)).float() - _out_in(m).float() for n, m in modules.items()}
    for p in model.parameters():
        p.requires_grad_(False)
    taps = _Taps(modules)
    sums = dict.fromkeys(modules, 0.0)
    generator = torch.Generator().manual_seed(0)
    try:
        for encoded in _encoded(model, tokenizer, config, list(act.BUILTIN_TEXTS) if texts is None else texts):
            _probe(model, encoded, taps, errors, sums, generator)
    finally:
        taps.remove()
    return {n: float(f"{s / (2 * PROBES):.6g}") for n, s in sums.items()}


def _load(model_dir: Path) -> tuple[torch.nn.Module, Any, Any]:
    try:
        transformers = import_transformers("--calibrate")
        with silent_libraries(transformers):
            config = act.read_config(transformers, model_dir)
            tokenizer = act.load_tokenizer(transformers, model_dir)
            model = act.load_model(transformers, model_dir, config, torch.device("cpu"))
    except BnbError as e:  # the loading rules of --activations, said for --calibrate
        message, hint = (s.replace("--activations", "--calibrate") for s in (e.message, e.hint))
        raise type(e)(message, hint) from None
    return model, tokenizer, config


def _encoded(model: torch.nn.Module, tokenizer: Any, config: Any, texts: list[str]) -> Any:
    limit = act.token_limit(config, tokenizer)
    accepted = set(signature(model.forward).parameters)
    for text in texts:
        encoded = tokenizer(text, return_tensors="pt", truncation=True, max_length=limit)
        if encoded["input_ids"].numel():
            yield {k: v for k, v in encoded.items() if k == "input_ids" or k in accepted}


def _probe(
    model: Any,  # a transformers PreTrainedModel
    encoded: dict[str, torch.Tensor],
    taps: _Taps,
    errors: dict[str, torch.Tensor],
    sums: dict[str, float],
    generator: torch.Generator,
) -> None:
    """One text: a forward with gradients from the input embeddings on, then PROBES backward passes."""
    embed = model.get_input_embeddings()  # the weights need no gradient: the graph starts here
    inputs = {k: v for k, v in encoded.items() if k != "input_ids"}
    inputs["inputs_embeds"] = embed(encoded["input_ids"]).detach().requires_grad_(True)
    with torch.enable_grad():
        output = model(**inputs)
        logits = getattr(output, "logits", None)
        head = (logits if logits is not None else output[0])[0].float()
        moved = {n: taps.inputs[n] @ e.t() for n, e in errors.items() if n in taps.inputs}  # δ = ΔW·x
        for _ in range(PROBES):
            taps.grads.clear()
            _draw(head, logits is not None, generator).backward(retain_graph=True)
            for name, delta in moved.items():
                grad = taps.grads.get(name)
                if grad is not None:  # None: the module does not reach the output (BERT's pooler)
                    sums[name] += float((grad.double() * delta.double()).sum()) ** 2


def _draw(head: torch.Tensor, causal: bool, generator: torch.Generator) -> torch.Tensor:
    """A language model: log p(y) summed over tokens y drawn from its own logits. An encoder: r·p, p the text's
    mean-pooled embedding (as `bnb eval` compares them) and r a random direction across p, over ‖p‖, so that
    ½·E[(r·δp)²] is the cosine distance δp adds."""
    if causal:
        logp = torch.log_softmax(head, dim=-1)
        drawn = torch.multinomial(logp.detach().exp(), 1, generator=generator)[:, 0]
        return logp[torch.arange(drawn.numel()), drawn].sum()
    pooled = head.mean(dim=0)
    unit = pooled.detach() / pooled.detach().norm()
    r = torch.randn(pooled.shape, generator=generator)
    return (pooled * (r - (r @ unit) * unit)).sum() / pooled.detach().norm()
