"""`bnb inspect --activations`: run the model on text and find LLM.int8's outlier features in the inputs of
its Linear layers; suggest ``llm_int8_threshold`` and modules to keep in 16-bit.

**The run.** transformers loads the checkpoint's folder (``AutoModelForCausalLM`` when config.json's
``architectures`` name a causal LM, ``*ForCausalLM`` or ``GPT2LMHeadModel``, else ``AutoModel``; float32 on
the CPU, bf16/fp16 weights upcast; the checkpoint's own dtype on a GPU), in eval mode under
``torch.inference_mode()``, with the tokenizer of the same folder. A forward pre-hook on every
``nn.Linear`` (the exact type, so no quantized subclass) and on transformers' ``Conv1D`` (GPT-2) sees each
module's input. The texts (``BUILTIN_TEXTS``, or ``--text-file``, one per line) run one at a time: batch 1,
so nothing is padded (the attention mask still selects the positions that count), truncated to
``MAX_TOKENS``. Only counts are kept — per hooked module and input dimension the positions where
|x| ≥ threshold and the largest |x|; per forward, the columns that reached the threshold — so memory is
the model plus one forward's activations.

**Outlier features** (Dettmers et al. 2022, *LLM.int8()*, §4.1: magnitude ≥ 6, in ≥ 25% of the layers, at
≥ 6% of the sequence positions). A *dimension* is an index of the model's hidden size, so the criterion
looks at the **hidden-width modules**: the hooked modules whose input width is config.json's
``hidden_size`` and that get one input row per token (attention q/k/v/o, the FFN's first layer(s), the
LM head). Modules with another input width (the FFN's down projection reads the intermediate size) index a
different space: they are reported one by one (``inputs``) and, under the same criteria among the modules of
their width, in ``other_widths``. Modules that see one row per text (BERT's pooler) or a subset of the
tokens (MoE experts) stay out of the criterion: a position share needs a row per token.

A *layer* is a transformer layer, as in the paper: a module's name up to its first numeric part
(``model.layers.7``, ``encoder.layer.3``); a hidden-width module outside numbered stacks (the LM head) is a
layer of its own. Not each hooked Linear: q, k and v read one input and would count three times, and the
attention output projection reads the attention's result, not the residual stream, so a feature present in
every layer's FFN input but not in its attention input would reach only a fifth of the modules. Dimension
``d`` is an outlier feature when

- *layers*: |x_d| ≥ ``threshold`` at one position or more, in an input of at least ``min_layer_share`` of
  the layers (``layer_count``; ``modules`` lists the Linear modules where it did), and
- *positions*: its **position share** is at least ``min_position_share``. The position share is the share
  of all tokens (special tokens included) at which |x_d| ≥ ``threshold`` in at least one hidden-width
  module: the paper's "6% of all sequence dimensions across all hidden states", a union over layers rather
  than a per-layer share or its maximum, because LLM.int8 decomposes per forward — a token whose dimension
  d is large in any layer sends d through 16-bit there — and a feature that surfaces at different tokens in
  different layers is still one feature of the residual stream.

Dimensions that reach the threshold somewhere but miss a criterion are listed as ``near_misses`` (by layer
count × position share), each with the tokens it peaks at, so that a short text set (where special tokens
weigh more) can be judged.

**Suggested threshold.** LLM.int8 runs the input columns with any |x| ≥ ``llm_int8_threshold`` (in the
forward's batch) in 16-bit and the rest in int8 with a per-row absmax scale: a lower threshold bounds the
int8 part's scale tighter (less error) at the cost of more 16-bit columns. The suggestion is the lowest
value of ``THRESHOLD_GRID`` at which at most ``DECOMPOSITION_BUDGET`` (1%) of the input columns of a forward
would run in 16-bit, over the forwards and the hooked modules that stay int8 (the suggested skip modules
left out); and never above ``threshold`` when outlier features were found, so that they stay decomposed.
Longer sequences and larger batches than one text of the set pull more columns: the suggestion holds for
inputs like the texts measured.

**Suggested skip modules** (``llm_int8_skip_modules``, ``bnb quantize --skip``). A quantized weight's error
reaches the output multiplied by the input: column j adds ``x_j · Δw_j``, and LLM.int8's 16-bit part still
multiplies outlier columns by the int8-rounded weights. A module whose input spikes an order of magnitude
above its peers' (the *activation spikes* of a few early or late FFN down projections; T5's ``wo``, which
transformers keeps in float32) concentrates that error, and keeping it in 16-bit removes it. A hooked module
is suggested when its input's max |x| is at least ``threshold`` and at least ``SPIKE_FACTOR`` (10) times the
median max |x| of the hooked modules of its input width (three or more of them). The names are module names
of the model as loaded; transformers also matches them as suffixes of a model with a head.
"""

from __future__ import annotations

import contextlib
import math
from inspect import signature
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bnbcli.errors import InputError, UsageError
from bnbcli.inspect.activation_criteria import (
    activation_spikes,
    blocks,
    decomposed_shares,
    outlier_dims,
    suggest_threshold,
)
from bnbcli.inspect.activation_hooks import ModuleStats, Positions, Recorder, hookable_types, in_features
from bnbcli.inspect.activation_report import (
    MAX_TOKENS,
    ActivationCriteria,
    ActivationOutlierDim,
    ActivationReport,
    WidthGroup,
)
from bnbcli.inspect.hf_models import first_line, import_transformers, is_causal_lm, model_context, silent_libraries

MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")  # of the tokenizer's output, when forward names them

BUILTIN_TEXTS: tuple[str, ...] = (
    "The ferry left the harbour a few minutes late, its deck crowded with cyclists, a school class on an "
    "outing and a man carrying a cello case. By the time the lighthouse slid past, most of the passengers had "
    "given up on the wind and gone below for coffee.",
    "Photosynthesis turns light, water and carbon dioxide into sugar and oxygen. The light-dependent "
    "reactions take place in the thylakoid membranes, where chlorophyll absorbs mostly red and blue light, "
    "while the Calvin cycle fixes carbon in the stroma of the chloroplast.",
    "def moving_average(values, window):\n    if window <= 0:\n        raise ValueError('window must be "
    "positive')\n    total = sum(values[:window])\n    out = [total / window]\n    for i in range(window, "
    "len(values)):\n        total += values[i] - values[i - window]\n        out.append(total / window)\n"
    "    return out",
    "Quarterly revenue rose 4.2% to $18.7 million, while operating costs fell from $6.1 million to "
    "$5.8 million. The board approved a dividend of 12 cents per share, payable on 15 March 2024 to holders "
    "of record on 1 March.",
    '"Did you lock the back door?" she asked from the top of the stairs.\n"I thought you did," he '
    'answered, already reaching for his shoes. "Never mind, I\'ll check. Go back to sleep."',
    "To make a simple tomato sauce, warm three tablespoons of olive oil, add two sliced cloves of garlic and "
    "cook until just golden. Tip in a tin of chopped tomatoes, a pinch of salt and a few basil leaves, then "
    "simmer for twenty minutes, stirring now and then.",
    "The tenant shall give the landlord no less than sixty (60) days' written notice before vacating the "
    "premises. Any deposit held under this agreement shall be returned within thirty days of the end of the "
    "tenancy, less reasonable deductions for damage beyond normal wear and tear.",
    "Autumn came early to the valley that year: the birches turned first, then the maples, and by the end "
    "of September the hills looked as if someone had spilled a box of copper coins across them.",
    "Why does ice float? Water molecules in ice form a hexagonal lattice held together by hydrogen bonds, "
    "which keeps them further apart than in the liquid. Ice is therefore about nine percent less dense than "
    "water at zero degrees Celsius.",
    "Troubleshooting: if the printer shows error E-04, switch it off, remove the paper tray and check for "
    "torn sheets behind the rollers. Restart the device; if the error persists, update the firmware from the "
    "settings menu or contact support.",
    "In 1869 the first transcontinental railroad in the United States was completed at Promontory Summit, "
    "Utah, cutting the journey from New York to San Francisco from several months to about a week.",
    "Shopping list: oats, two litres of milk, eggs, spinach, lemons, a loaf of rye bread, coffee beans, "
    "dish soap and batteries (AA, not AAA). Also ask the pharmacy whether the prescription is ready.",
)


# --- loading ------------------------------------------------------------------------------------------


def read_config(transformers: Any, model_dir: Path) -> Any:
    if not (model_dir / "config.json").is_file():
        pipeline = (model_dir / "model_index.json").is_file()
        raise InputError(
            f"--activations: {model_dir} {'is a diffusers pipeline' if pipeline else 'has no config.json'}",
            hint="--activations runs a transformers model: a folder with config.json, weights and tokenizer",
        )
    try:
        config = transformers.AutoConfig.from_pretrained(str(model_dir), local_files_only=True)
    except Exception as exc:
        raise InputError(
            f"--activations: transformers {transformers.__version__} cannot build {model_dir}: {first_line(exc)}",
            hint="a model transformers knows (an unknown model_type needs a newer transformers); "
            "the weights are inspected without --activations",
        ) from None
    if getattr(config, "quantization_config", None):
        raise InputError(
            f"--activations: {model_dir} is quantized (config.json has a quantization_config)",
            hint="measure the activations of the original checkpoint: they choose how to quantize it",
        )
    return config


def load_model(transformers: Any, model_dir: Path, config: Any, device: torch.device) -> torch.nn.Module:
    cls = transformers.AutoModelForCausalLM if is_causal_lm(config) else transformers.AutoModel
    dtype: Any = torch.float32 if device.type == "cpu" else "auto"
    try:
        model = cls.from_pretrained(str(model_dir), config=config, dtype=dtype, local_files_only=True)
        model = model.to(device)
    except Exception as exc:
        raise InputError(
            f"--activations: transformers cannot load {model_dir}: {first_line(exc)}",
            hint="the folder needs the model's weights beside config.json",
        ) from None
    model.eval()
    with contextlib.suppress(Exception):
        model.config.use_cache = False
    return model


def load_tokenizer(transformers: Any, model_dir: Path) -> Any:
    hint = "--activations tokenizes the texts with the model's own tokenizer: its files (tokenizer.json, "
    hint += "tokenizer_config.json, vocab…) belong beside config.json"
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    except Exception as exc:
        raise InputError(f"--activations: no tokenizer in {model_dir} ({first_line(exc)})", hint=hint) from None
    # transformers builds a tokenizer without a vocabulary when the files are missing: every word unknown
    probe = tokenizer(BUILTIN_TEXTS[0], add_special_tokens=False)["input_ids"]
    unknown = getattr(tokenizer, "unk_token_id", None)
    if len(tokenizer) <= 32 or (unknown is not None and probe and probe.count(unknown) >= len(probe) / 2):
        raise InputError(f"--activations: no tokenizer in {model_dir} (no vocabulary found)", hint=hint)
    return tokenizer


def token_limit(config: Any, tokenizer: Any) -> int:
    limit = model_context(config, tokenizer)
    return MAX_TOKENS if limit is None else min(MAX_TOKENS, limit)


# --- the run ------------------------------------------------------------------------------------------


def find_activation_outliers(
    model_dir: Path,
    texts: list[str] | None = None,
    criteria: ActivationCriteria = ActivationCriteria(),  # noqa: B008  (frozen: a shared default is safe)
    device: str = "cpu",
) -> ActivationReport:
    """Run the model in ``model_dir`` on ``texts`` (default: ``BUILTIN_TEXTS``) and apply the LLM.int8
    criteria to the inputs of its Linear layers (module docstring)."""
    texts = list(BUILTIN_TEXTS) if texts is None else [t for t in texts if t.strip()]
    if not texts:
        raise UsageError("--activations: no text to run the model on", hint="one text per line")
    model_dir = Path(model_dir)
    try:
        torch_device = torch.device(device)
    except RuntimeError as exc:
        raise UsageError(f"--activations: unknown device {device!r} ({exc})", hint="use cpu or cuda") from None
    transformers = import_transformers("--activations")
    with silent_libraries(transformers):
        config = read_config(transformers, model_dir)
        tokenizer = load_tokenizer(transformers, model_dir)
        model = load_model(transformers, model_dir, config, torch_device)
        recorder, positions, tokens, truncated = _run(model, tokenizer, config, texts, criteria, torch_device)
    return _report(model, config, tokenizer, recorder, positions, tokens, len(texts), truncated, criteria)


def _run(
    model: torch.nn.Module,
    tokenizer: Any,
    config: Any,
    texts: list[str],
    criteria: ActivationCriteria,
    device: torch.device,
) -> tuple[Recorder, Positions, int, int]:
    recorder = Recorder(criteria.threshold, device)
    kinds = hookable_types()
    handles = [
        module.register_forward_pre_hook(recorder.hook(name, in_features(module)), with_kwargs=True)
        for name, module in model.named_modules()
        if type(module) in kinds
    ]
    if not handles:
        raise InputError(
            f"--activations: {type(model).__name__} has no Linear layers to hook",
            hint="leave out --activations: it measures the inputs of Linear layers",
        )
    max_length = token_limit(config, tokenizer)
    accepted = set(signature(model.forward).parameters)
    keys = [k for k in MODEL_INPUTS if k == "input_ids" or k in accepted]
    positions = Positions()
    tokens = truncated = 0
    try:
        with torch.inference_mode():
            for text in texts:
                full = len(tokenizer(text)["input_ids"])
                encoded = tokenizer(text, return_tensors="pt", truncation=True, max_length=max_length)
                ids = encoded["input_ids"]
                if ids.numel() == 0:
                    continue
                truncated += full > ids.shape[-1]
                mask = encoded.get("attention_mask")
                recorder.mask = (mask if mask is not None else torch.ones_like(ids)).reshape(-1).bool().to(device)
                recorder.union = {}
                inputs = {k: v.to(device) for k, v in encoded.items() if k in keys}
                if getattr(config, "is_encoder_decoder", False):
                    inputs["decoder_input_ids"] = inputs["input_ids"]
                try:
                    model(**inputs)
                except Exception as exc:
                    raise InputError(
                        f"--activations: {type(model).__name__} failed on the text: {first_line(exc)}",
                        hint="--activations runs text models (a tokenizer's input_ids in, hidden states out)",
                    ) from None
                positions.add(recorder.union, ids.reshape(-1)[recorder.mask.cpu()])
                tokens += int(recorder.mask.sum())
    finally:
        for handle in handles:
            handle.remove()
    if tokens == 0:
        raise InputError("--activations: the texts give no tokens", hint="give texts with words in them")
    return recorder, positions, tokens, truncated


def _hidden_size(config: Any, modules: list[ModuleStats]) -> int:
    size = getattr(config.get_text_config(), "hidden_size", None)
    widths = [s.width for s in modules if s.per_token]
    if isinstance(size, int) and size in widths:
        return size
    return max(set(widths), key=widths.count) if widths else 0  # the commonest per-token input width


def _report(
    model: torch.nn.Module,
    config: Any,
    tokenizer: Any,
    recorder: Recorder,
    positions: Positions,
    tokens: int,
    texts: int,
    truncated: int,
    criteria: ActivationCriteria,
) -> ActivationReport:
    modules = list(recorder.modules.values())
    hidden = _hidden_size(config, modules)

    def decode(token: int) -> str:
        return str(tokenizer.convert_ids_to_tokens(int(token)))

    def group(width: int) -> tuple[list[ModuleStats], list[ActivationOutlierDim], list[ActivationOutlierDim]]:
        members = [s for s in modules if s.width == width and s.per_token]
        if not members:
            return [], [], []
        hits = positions.hits.get(width, np.zeros(width, dtype=np.int64))
        found, near = outlier_dims(members, hits, tokens, criteria, lambda d: positions.top(width, d, decode))
        return members, found, near

    hidden_modules, found, near = group(hidden)
    others = []
    for width in sorted({s.width for s in modules if s.per_token} - {hidden}):
        members, other_found, _ = group(width)
        others.append(WidthGroup(width, len(blocks(members)), len(members), tuple(other_found)))
    spikes = activation_spikes(modules, criteria.threshold)
    skip = {name for name, _ in spikes}
    int8 = [s for s in modules if s.name not in skip]
    columns = sum(s.calls * s.width for s in int8)
    at_threshold = sum(s.cols_hit for s in int8) / columns if columns else 0.0
    suggested, suggested_share = suggest_threshold(decomposed_shares(int8), criteria.threshold, bool(found))
    if math.isnan(suggested_share):
        suggested_share = at_threshold
    return ActivationReport(
        model_class=type(model).__name__,
        tokens=tokens,
        linear_layers=len(modules),
        criteria=criteria,
        outlier_dims=tuple(found),
        suggested_threshold=suggested,
        suggested_skip_modules=tuple(name for name, _ in spikes),
        texts=texts,
        truncated=truncated,
        hidden_size=hidden,
        hidden_layers=tuple(blocks(hidden_modules)),
        hidden_modules=tuple(s.name for s in hidden_modules),
        near_misses=tuple(near),
        other_widths=tuple(others),
        inputs=tuple(s.as_input() for s in modules),
        decomposed_share=at_threshold,
        suggested_decomposed_share=suggested_share,
        skip_reasons=tuple(why for _, why in spikes),
        device=str(next(model.parameters()).device),
        dtype=str(next(model.parameters()).dtype).removeprefix("torch."),
    )
