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
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from inspect import signature
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bnbcli.errors import BackendUnavailable, InputError, UsageError
from bnbcli.inspect.outliers import layer_of

MAX_TOKENS = 512  # per text; longer texts are truncated
MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")  # of the tokenizer's output, when forward names them
DECOMPOSITION_BUDGET = 0.01  # the share of input columns in 16-bit the suggested threshold allows
SPIKE_FACTOR = 10.0  # a module's max |x| over its peers' median max |x|: a spike
NEAR_MISSES = 10  # dimensions listed that reach the threshold but miss a criterion
TOP_TOKENS = 3  # tokens listed per dimension
ATTRIBUTION_CAP = 200_000  # distinct (dimension, token) pairs counted before token attribution stops
_STEPS = tuple(1.0 + 0.5 * i for i in range(11))  # 1.0, 1.5, …, 6.0
THRESHOLD_GRID = (*_STEPS, 7.0, 8.0, 10.0, 12.0, 16.0, 20.0, 24.0, 32.0, 48.0, 64.0, 96.0, 128.0, 256.0, 512.0, 1024.0)

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


@dataclass(frozen=True)
class ActivationCriteria:
    threshold: float = 6.0  # |activation| ≥ this (LLM.int8's default llm_int8_threshold)
    min_layer_share: float = 0.25  # the dimension reaches it in ≥ 25% of the layers (transformer layers)
    min_position_share: float = 0.06  # ... and at ≥ 6% of the tokens, in one of them or another (module docstring)

    def __post_init__(self) -> None:
        if not self.threshold > 0:
            raise UsageError(f"--activation-threshold must be above 0, not {self.threshold}", hint="6.0 is the default")
        if not (0 <= self.min_layer_share <= 1 and 0 <= self.min_position_share <= 1):
            raise UsageError("the activation criteria's shares must be within [0, 1]", hint="0.25 and 0.06 by default")

    def as_dict(self) -> dict[str, float]:
        return {
            "threshold": self.threshold,
            "min_layer_share": self.min_layer_share,
            "min_position_share": self.min_position_share,
        }


@dataclass(frozen=True)
class ActivationOutlierDim:
    dim: int
    layer_count: int  # transformer layers where |x_dim| ≥ threshold at some position, in an input of its width
    layer_share: float  # of the layers with inputs of its width
    position_share: float  # of all tokens: |x_dim| ≥ threshold in at least one module of its width
    max_magnitude: float  # max |x_dim| over those modules and all tokens
    layers: tuple[str, ...]  # the layers' module names (model.layers.7)
    modules: tuple[str, ...] = ()  # the Linear modules where |x_dim| ≥ threshold
    top_tokens: tuple[tuple[str, int], ...] = ()  # (token, positions) where it reaches the threshold, most first

    def as_dict(self) -> dict[str, Any]:
        return {
            "dim": self.dim,
            "layer_count": self.layer_count,
            "layer_share": self.layer_share,
            "position_share": self.position_share,
            "max_magnitude": _finite(self.max_magnitude),
            "layers": list(self.layers),
            "module_count": len(self.modules),
            "modules": list(self.modules),
            "top_tokens": [[token, count] for token, count in self.top_tokens],
        }


@dataclass(frozen=True)
class LinearInput:
    """One hooked module's input over all texts."""

    name: str
    in_features: int
    positions: int  # input rows seen (tokens, for a module with a row per token)
    max_magnitude: float  # max |x|
    peak_dim: int  # the dimension of max |x|
    outlier_position_share: float  # rows with some |x| ≥ threshold
    outlier_columns: int  # dimensions with |x| ≥ threshold somewhere
    decomposed_share: float  # input columns per forward with |x| ≥ threshold (what LLM.int8 runs in 16-bit)
    per_token: bool  # one input row per token (in the outlier criterion when hidden-width)

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "in_features": self.in_features,
            "positions": self.positions,
            "max_magnitude": _finite(self.max_magnitude),
            "peak_dim": self.peak_dim,
            "outlier_position_share": self.outlier_position_share,
            "outlier_columns": self.outlier_columns,
            "decomposed_share": self.decomposed_share,
            "per_token": self.per_token,
        }


@dataclass(frozen=True)
class WidthGroup:
    """The outlier criterion among the modules of an input width other than the hidden size."""

    in_features: int
    layers: int
    modules: int
    outlier_dims: tuple[ActivationOutlierDim, ...]

    def as_dict(self) -> dict[str, Any]:
        return {
            "in_features": self.in_features,
            "layers": self.layers,
            "modules": self.modules,
            "outlier_dims": [d.as_dict() for d in self.outlier_dims],
        }


@dataclass(frozen=True)
class ActivationReport:
    model_class: str
    tokens: int  # all positions of all texts (special tokens included; nothing padded)
    linear_layers: int  # hooked Linear modules that ran
    criteria: ActivationCriteria
    outlier_dims: tuple[ActivationOutlierDim, ...]  # in the hidden size, most layers first
    suggested_threshold: float
    suggested_skip_modules: tuple[str, ...]
    texts: int = 0
    truncated: int = 0  # texts cut at MAX_TOKENS
    hidden_size: int = 0
    hidden_layers: tuple[str, ...] = ()  # the layers the criterion counts (model.layers.7, lm_head)
    hidden_modules: tuple[str, ...] = ()  # their hidden-width Linear modules with a row per token
    near_misses: tuple[ActivationOutlierDim, ...] = ()
    other_widths: tuple[WidthGroup, ...] = ()
    inputs: tuple[LinearInput, ...] = ()
    decomposed_share: float = 0.0  # at criteria.threshold, over the modules that stay int8
    suggested_decomposed_share: float = 0.0  # at the suggested threshold
    skip_reasons: tuple[str, ...] = ()  # one per suggested skip module
    device: str = "cpu"
    dtype: str = "float32"

    def as_dict(self) -> dict[str, Any]:
        return {
            "model_class": self.model_class,
            "device": self.device,
            "dtype": self.dtype,
            "texts": self.texts,
            "truncated": self.truncated,
            "tokens": self.tokens,
            "linear_layers": self.linear_layers,
            "hidden_size": self.hidden_size,
            "hidden_layers": list(self.hidden_layers),
            "hidden_modules": list(self.hidden_modules),
            "criteria": self.criteria.as_dict(),
            "outlier_dims": [d.as_dict() for d in self.outlier_dims],
            "near_misses": [d.as_dict() for d in self.near_misses],
            "other_widths": [g.as_dict() for g in self.other_widths],
            "suggested_threshold": self.suggested_threshold,
            "decomposed_share": self.decomposed_share,
            "suggested_decomposed_share": self.suggested_decomposed_share,
            "suggested_skip_modules": list(self.suggested_skip_modules),
            "skip_reasons": list(self.skip_reasons),
            "inputs": [i.as_dict() for i in self.inputs],
            "method": {
                "threshold_grid": list(THRESHOLD_GRID),
                "decomposition_budget": DECOMPOSITION_BUDGET,
                "spike_factor": SPIKE_FACTOR,
                "max_tokens": MAX_TOKENS,
            },
        }


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


# --- measuring ----------------------------------------------------------------------------------------


class _ModuleStats:
    """Counts for one hooked module's input, accumulated over calls."""

    def __init__(self, name: str, width: int) -> None:
        self.name = name
        self.width = width
        self.calls = 0
        self.positions = 0
        self.per_token = True  # every call had one row per token
        self.hits = np.zeros(width, dtype=np.int64)  # positions with |x_d| ≥ threshold
        self.peak = np.zeros(width, dtype=np.float64)  # max |x_d|
        self.rows_hit = 0  # positions with some |x| ≥ threshold
        self.cols_hit = 0  # Σ over calls: columns with some |x| ≥ threshold
        self.grid_cols = np.zeros(len(THRESHOLD_GRID), dtype=np.int64)  # the same at each grid value

    def as_input(self) -> LinearInput:
        seen = self.positions > 0
        return LinearInput(
            name=self.name,
            in_features=self.width,
            positions=self.positions,
            max_magnitude=float(self.peak.max()) if seen else 0.0,
            peak_dim=int(self.peak.argmax()) if seen else 0,
            outlier_position_share=self.rows_hit / self.positions if seen else 0.0,
            outlier_columns=int((self.hits > 0).sum()),
            decomposed_share=self.cols_hit / (self.calls * self.width) if self.calls else 0.0,
            per_token=self.per_token,
        )


class _Recorder:
    """Forward pre-hooks that count; per forward, the positions where each dimension reached the threshold
    in some per-token module (one boolean [tokens, width] mask per input width)."""

    def __init__(self, threshold: float, device: torch.device) -> None:
        self.threshold = threshold
        self.modules: dict[str, _ModuleStats] = {}
        self.mask: torch.Tensor | None = None  # [tokens] bool: the positions that count in this forward
        self.union: dict[int, torch.Tensor] = {}
        self.grid = torch.tensor(THRESHOLD_GRID, dtype=torch.float32, device=device)

    def hook(self, name: str, width: int) -> Any:
        def pre_hook(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            x = args[0] if args else kwargs.get("input", kwargs.get("x"))
            if isinstance(x, torch.Tensor) and x.is_floating_point() and x.numel() and x.shape[-1] == width:
                self._record(name, width, x.detach())

        return pre_hook

    def _record(self, name: str, width: int, x: torch.Tensor) -> None:
        stats = self.modules.get(name)
        if stats is None:
            stats = self.modules[name] = _ModuleStats(name, width)
        rows = x.reshape(-1, width)
        per_token = self.mask is not None and rows.shape[0] == self.mask.numel()
        if per_token:
            assert self.mask is not None
            rows = rows[self.mask]
        else:
            stats.per_token = False
        if rows.shape[0] == 0:
            return
        a = rows.abs().float()
        a = torch.where(torch.isnan(a), torch.zeros((), dtype=a.dtype, device=a.device), a)
        hit = a >= self.threshold
        colmax = a.amax(dim=0)
        stats.calls += 1
        stats.positions += rows.shape[0]
        stats.hits += hit.sum(dim=0).cpu().numpy()
        stats.peak = np.maximum(stats.peak, colmax.double().cpu().numpy())
        stats.rows_hit += int(hit.any(dim=1).sum())
        stats.cols_hit += int((colmax >= self.threshold).sum())
        stats.grid_cols += (colmax[None, :] >= self.grid[:, None]).sum(dim=1).cpu().numpy()
        if per_token:
            seen = self.union.get(width)
            self.union[width] = hit if seen is None else seen | hit


@dataclass
class _Positions:
    """Per input width: the tokens at which each dimension reached the threshold in some per-token module,
    and (while the (dimension, token) pairs stay under ATTRIBUTION_CAP) which tokens those were."""

    hits: dict[int, np.ndarray] = field(default_factory=dict)
    tokens: dict[tuple[int, int], dict[int, int]] = field(default_factory=dict)  # (width, dim) → token id → count
    pairs: int = 0
    attributed: bool = True

    def add(self, union: dict[int, torch.Tensor], ids: torch.Tensor) -> None:
        for width, mask in union.items():
            counts = mask.sum(dim=0).cpu().numpy().astype(np.int64)
            self.hits[width] = self.hits.get(width, np.zeros(width, dtype=np.int64)) + counts
            if not self.attributed:
                continue
            where = mask.nonzero().cpu().numpy()  # (position, dim)
            token_ids = ids.cpu().numpy()[where[:, 0]]
            pairs, n = np.unique(np.stack([where[:, 1], token_ids], axis=1), axis=0, return_counts=True)
            if self.pairs + len(pairs) > ATTRIBUTION_CAP:
                self.attributed, self.tokens = False, {}
                continue
            for (dim, token), count in zip(pairs.tolist(), n.tolist(), strict=True):
                by_token = self.tokens.setdefault((width, dim), {})
                self.pairs += token not in by_token
                by_token[token] = by_token.get(token, 0) + count

    def top(self, width: int, dim: int, decode: Any) -> tuple[tuple[str, int], ...]:
        found = sorted(self.tokens.get((width, dim), {}).items(), key=lambda tc: (-tc[1], tc[0]))
        return tuple((decode(token), count) for token, count in found[:TOP_TOKENS])


def _hookable() -> tuple[type, ...]:
    try:
        from transformers.pytorch_utils import Conv1D

        return (torch.nn.Linear, Conv1D)
    except ImportError:
        return (torch.nn.Linear,)


def _in_features(module: torch.nn.Module) -> int:
    if isinstance(module, torch.nn.Linear):
        return int(module.in_features)
    weight = module.weight
    assert isinstance(weight, torch.Tensor)
    return int(weight.shape[0])  # Conv1D stores [in, out]


# --- loading ------------------------------------------------------------------------------------------


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    line = text[0] if text else ""
    line = line if len(line) <= 200 else line[:197] + "…"
    return f"{type(err).__name__}: {line}" if line else type(err).__name__


def _import_transformers(feature: str = "--activations") -> Any:
    try:
        import transformers
    except Exception as exc:
        raise BackendUnavailable(
            f"{feature} needs transformers, which cannot be imported ({type(exc).__name__})",
            hint="pip install 'bnbcli[hf]'",
        ) from None
    return transformers


@contextlib.contextmanager
def _silent(transformers: Any) -> Iterator[None]:
    """No config warnings and no "Loading weights" bar: output.py alone writes to the terminal."""
    from bnbcli.plan.planners.hf_transformers import quiet

    logging = transformers.utils.logging
    bars = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        with quiet():
            yield
    finally:
        if bars:
            logging.enable_progress_bar()


def _read_config(transformers: Any, model_dir: Path) -> Any:
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
            f"--activations: transformers {transformers.__version__} cannot build {model_dir}: {_first_line(exc)}",
            hint="a model transformers knows (an unknown model_type needs a newer transformers); "
            "the weights are inspected without --activations",
        ) from None
    if getattr(config, "quantization_config", None):
        raise InputError(
            f"--activations: {model_dir} is quantized (config.json has a quantization_config)",
            hint="measure the activations of the original checkpoint: they choose how to quantize it",
        )
    return config


def _causal(config: Any) -> bool:
    """config.json's architectures name a causal LM (``*ForCausalLM``, or a class transformers' causal-LM
    auto mapping holds, such as ``GPT2LMHeadModel``)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    causal = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    archs = getattr(config, "architectures", None) or []
    return any(isinstance(a, str) and (a.endswith("CausalLM") or a in causal) for a in archs)


def _load_model(transformers: Any, model_dir: Path, config: Any, device: torch.device) -> torch.nn.Module:
    cls = transformers.AutoModelForCausalLM if _causal(config) else transformers.AutoModel
    dtype: Any = torch.float32 if device.type == "cpu" else "auto"
    try:
        model = cls.from_pretrained(str(model_dir), config=config, dtype=dtype, local_files_only=True)
        model = model.to(device)
    except Exception as exc:
        raise InputError(
            f"--activations: transformers cannot load {model_dir}: {_first_line(exc)}",
            hint="the folder needs the model's weights beside config.json",
        ) from None
    model.eval()
    with contextlib.suppress(Exception):
        model.config.use_cache = False
    return model


def _load_tokenizer(transformers: Any, model_dir: Path) -> Any:
    hint = "--activations tokenizes the texts with the model's own tokenizer: its files (tokenizer.json, "
    hint += "tokenizer_config.json, vocab…) belong beside config.json"
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    except Exception as exc:
        raise InputError(f"--activations: no tokenizer in {model_dir} ({_first_line(exc)})", hint=hint) from None
    # transformers builds a tokenizer without a vocabulary when the files are missing: every word unknown
    probe = tokenizer(BUILTIN_TEXTS[0], add_special_tokens=False)["input_ids"]
    unknown = getattr(tokenizer, "unk_token_id", None)
    if len(tokenizer) <= 32 or (unknown is not None and probe and probe.count(unknown) >= len(probe) / 2):
        raise InputError(f"--activations: no tokenizer in {model_dir} (no vocabulary found)", hint=hint)
    return tokenizer


def model_context(config: Any, tokenizer: Any) -> int | None:
    """The longest sequence the model takes: its position embeddings, or the tokenizer's limit (None: neither
    says)."""
    limits = []
    positions = getattr(config.get_text_config(), "max_position_embeddings", None)
    if isinstance(positions, int) and positions > 0:
        limits.append(positions)
    model_max = getattr(tokenizer, "model_max_length", None)
    if isinstance(model_max, int) and 0 < model_max < 1_000_000:
        limits.append(model_max)
    return min(limits) if limits else None


def _max_length(config: Any, tokenizer: Any) -> int:
    limit = model_context(config, tokenizer)
    return MAX_TOKENS if limit is None else min(MAX_TOKENS, limit)


# --- the criteria -------------------------------------------------------------------------------------


def block_of(module: str) -> str:
    """The transformer layer of a module: its name up to the first numeric part, else the name itself."""
    return layer_of(module + ".weight") or module


def blocks(modules: list[_ModuleStats]) -> dict[str, list[int]]:
    """layer → the indexes of its modules, in order."""
    out: dict[str, list[int]] = {}
    for i, s in enumerate(modules):
        out.setdefault(block_of(s.name), []).append(i)
    return out


def _dims(
    modules: list[_ModuleStats],
    hits: np.ndarray,
    tokens: int,
    criteria: ActivationCriteria,
    top_tokens: Any,
) -> tuple[list[ActivationOutlierDim], list[ActivationOutlierDim]]:
    """(outlier features, near misses) among the modules of one input width."""
    by_module = np.stack([s.hits > 0 for s in modules])  # [modules, width]
    layers = blocks(modules)
    by_layer = np.stack([by_module[i].any(axis=0) for i in layers.values()])  # [layers, width]
    names = list(layers)
    peak = np.stack([s.peak for s in modules]).max(axis=0)
    layer_count = by_layer.sum(axis=0)
    found: list[ActivationOutlierDim] = []
    near: list[ActivationOutlierDim] = []
    for d in np.nonzero(layer_count)[0].tolist():
        layer_share = int(layer_count[d]) / len(names)
        position_share = int(hits[d]) / tokens if tokens else 0.0
        dim = ActivationOutlierDim(
            dim=d,
            layer_count=int(layer_count[d]),
            layer_share=layer_share,
            position_share=position_share,
            max_magnitude=float(peak[d]),
            layers=tuple(name for name, r in zip(names, by_layer[:, d], strict=True) if r),
            modules=tuple(s.name for s, r in zip(modules, by_module[:, d], strict=True) if r),
        )
        if layer_share >= criteria.min_layer_share and position_share >= criteria.min_position_share:
            found.append(dim)
        else:
            near.append(dim)
    found.sort(key=lambda x: (-x.layer_count, -x.position_share, x.dim))
    near.sort(key=lambda x: (-x.layer_count * x.position_share, -x.max_magnitude, x.dim))
    return [replace(x, top_tokens=top_tokens(x.dim)) for x in found], [
        replace(x, top_tokens=top_tokens(x.dim)) for x in near[:NEAR_MISSES]
    ]


def _spikes(modules: list[_ModuleStats], threshold: float) -> list[tuple[str, str]]:
    """(module, why) for the modules whose input's max |x| is ≥ threshold and ≥ SPIKE_FACTOR × the median
    max |x| of the hooked modules of its input width (three or more), the largest first."""
    by_width: dict[int, list[_ModuleStats]] = {}
    for s in modules:
        by_width.setdefault(s.width, []).append(s)
    out: list[tuple[float, str, str]] = []
    for width, peers in by_width.items():
        if len(peers) < 3:
            continue
        median = float(np.median([float(s.peak.max()) for s in peers]))
        for s in peers:
            peak = float(s.peak.max())
            if peak >= threshold and peak >= SPIKE_FACTOR * median:
                ratio = peak / median if median > 0 else math.inf
                why = (
                    f"{s.name}: max |x| {peak:.4g} at dim {int(s.peak.argmax())}, {ratio:.3g}× the median "
                    f"max |x| ({median:.4g}) of the {len(peers)} modules with {width} inputs"
                )
                out.append((peak, s.name, why))
    out.sort(key=lambda t: -t[0])
    return [(name, why) for _, name, why in out]


def _decomposed(modules: list[_ModuleStats]) -> np.ndarray:
    """Per grid value: the share of input columns per forward with some |x| ≥ it, over ``modules``."""
    columns = sum(s.calls * s.width for s in modules)
    if not columns:
        return np.zeros(len(THRESHOLD_GRID))
    return sum((s.grid_cols for s in modules), np.zeros(len(THRESHOLD_GRID), dtype=np.int64)) / columns


def _suggest_threshold(share: np.ndarray, threshold: float, outliers: bool) -> tuple[float, float]:
    """(the lowest grid value within DECOMPOSITION_BUDGET — at most ``threshold`` when outlier features were
    found —, its decomposed share)."""
    index = next((i for i, s in enumerate(share) if s <= DECOMPOSITION_BUDGET), len(THRESHOLD_GRID) - 1)
    value = THRESHOLD_GRID[index]
    if outliers and value > threshold:
        return threshold, math.nan  # measured exactly by the caller
    return value, float(share[index])


# --- the run ------------------------------------------------------------------------------------------


def find_activation_outliers(
    model_dir: Path,
    texts: list[str] | None = None,
    criteria: ActivationCriteria = ActivationCriteria(),  # frozen: a shared default is safe
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
    transformers = _import_transformers()
    with _silent(transformers):
        config = _read_config(transformers, model_dir)
        tokenizer = _load_tokenizer(transformers, model_dir)
        model = _load_model(transformers, model_dir, config, torch_device)
        recorder, positions, tokens, truncated = _run(model, tokenizer, config, texts, criteria, torch_device)
    return _report(model, config, tokenizer, recorder, positions, tokens, len(texts), truncated, criteria)


def _run(
    model: torch.nn.Module,
    tokenizer: Any,
    config: Any,
    texts: list[str],
    criteria: ActivationCriteria,
    device: torch.device,
) -> tuple[_Recorder, _Positions, int, int]:
    recorder = _Recorder(criteria.threshold, device)
    kinds = _hookable()
    handles = [
        module.register_forward_pre_hook(recorder.hook(name, _in_features(module)), with_kwargs=True)
        for name, module in model.named_modules()
        if type(module) in kinds
    ]
    if not handles:
        raise InputError(
            f"--activations: {type(model).__name__} has no Linear layers to hook",
            hint="leave out --activations: it measures the inputs of Linear layers",
        )
    max_length = _max_length(config, tokenizer)
    accepted = set(signature(model.forward).parameters)
    keys = [k for k in MODEL_INPUTS if k == "input_ids" or k in accepted]
    positions = _Positions()
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
                        f"--activations: {type(model).__name__} failed on the text: {_first_line(exc)}",
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


def _hidden_size(config: Any, modules: list[_ModuleStats]) -> int:
    size = getattr(config.get_text_config(), "hidden_size", None)
    widths = [s.width for s in modules if s.per_token]
    if isinstance(size, int) and size in widths:
        return size
    return max(set(widths), key=widths.count) if widths else 0  # the commonest per-token input width


def _report(
    model: torch.nn.Module,
    config: Any,
    tokenizer: Any,
    recorder: _Recorder,
    positions: _Positions,
    tokens: int,
    texts: int,
    truncated: int,
    criteria: ActivationCriteria,
) -> ActivationReport:
    modules = list(recorder.modules.values())
    hidden = _hidden_size(config, modules)

    def decode(token: int) -> str:
        return str(tokenizer.convert_ids_to_tokens(int(token)))

    def group(width: int) -> tuple[list[_ModuleStats], list[ActivationOutlierDim], list[ActivationOutlierDim]]:
        members = [s for s in modules if s.width == width and s.per_token]
        if not members:
            return [], [], []
        hits = positions.hits.get(width, np.zeros(width, dtype=np.int64))
        found, near = _dims(members, hits, tokens, criteria, lambda d: positions.top(width, d, decode))
        return members, found, near

    hidden_modules, found, near = group(hidden)
    others = []
    for width in sorted({s.width for s in modules if s.per_token} - {hidden}):
        members, other_found, _ = group(width)
        others.append(WidthGroup(width, len(blocks(members)), len(members), tuple(other_found)))
    spikes = _spikes(modules, criteria.threshold)
    skip = {name for name, _ in spikes}
    int8 = [s for s in modules if s.name not in skip]
    columns = sum(s.calls * s.width for s in int8)
    at_threshold = sum(s.cols_hit for s in int8) / columns if columns else 0.0
    suggested, suggested_share = _suggest_threshold(_decomposed(int8), criteria.threshold, bool(found))
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
